"""``python -m services.toolstack``: the same CLI as ``domsplit``."""

import sys

from services.toolstack.cli import main

if __name__ == "__main__":
    sys.exit(main())
