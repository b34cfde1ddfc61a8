"""`python -m services.hypervisor`: the hypervisor of one host."""

from services.hypervisor.service import setup
from shared.service import main

if __name__ == "__main__":
    main("hypervisor", setup)
