"""``domsplit``: the toolstack CLI (also ``python -m services.toolstack``).

Verbs live in small modules, one function each, registered with
:func:`services.toolstack._registry.verb`; importing a module here is all a new
verb (``create``, ``list``, ``destroy``, ``migrate``, ``top``...) needs.
"""

from __future__ import annotations

import os
import sys

from services.toolstack import _blk, _demo, _domains, _host  # noqa: F401  (they register their verbs)
from services.toolstack._registry import build_parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: the command line), run the verb, return its status."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except BrokenPipeError:
        # `domsplit host status --json | head`: the reader left, which is fine.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
