"""`python -m services.xenstore`: the xenstore service of one host."""

from shared.service import main

if __name__ == "__main__":
    main("xenstore")
