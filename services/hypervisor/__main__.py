"""`python -m services.hypervisor`: the hypervisor service of one host."""

from shared.service import main

if __name__ == "__main__":
    main("hypervisor")
