"""``python -m bench NAME`` runs one benchmark, ``python -m bench all`` every one.

Each benchmark measures its baseline in the same run and ends by printing one
JSON line per metric: bench, metric, value, baseline, ratio, goal, met.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

BENCHES = ["transport", "xenstore", "hypercall", "evtchn", "timers", "ipi", "callback", "block"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("name", choices=[*BENCHES, "all"])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (smoke run)")
    args = parser.parse_args(argv)
    names = BENCHES if args.name == "all" else [args.name]
    unmet = 0
    cpus = os.sched_getaffinity(0)
    for name in names:
        # Some benches pin this process to one CPU; what they start inherits
        # it. Each starts from the CPUs we were given (in ``all``, block and
        # the guest benches had run with every process of the host on CPU 0).
        os.sched_setaffinity(0, cpus)
        module = importlib.import_module(f"bench.{name}")
        results = module.run(quick=args.quick)
        unmet += sum(r.met is False for r in results)
    return 1 if unmet and not args.quick else 0


if __name__ == "__main__":
    sys.exit(main())
