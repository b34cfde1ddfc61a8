"""`python -m services.backend.blkback`: dom0's blkback."""

from shared.service import main

if __name__ == "__main__":
    main("blkback")
