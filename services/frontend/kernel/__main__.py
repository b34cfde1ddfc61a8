"""``python -m services.frontend.kernel --config FILE [--xenstore EP --xs-token T]
--hypervisor EP --domid D --vcpu K --token T``: one vCPU of a guest."""

from services.frontend.kernel.main import main

if __name__ == "__main__":
    main()
