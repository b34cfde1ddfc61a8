"""`python -m services.backend.netback`: dom0's netback."""

from shared.service import main

if __name__ == "__main__":
    main("netback")
