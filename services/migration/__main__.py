"""`python -m services.migration`: the migration service of one host."""

from shared.service import main

if __name__ == "__main__":
    main("migration")
