"""``python -m bench``: one benchmark's set-up does not leak into the next."""

from __future__ import annotations

import os
import sys
import types

import pytest

import bench.__main__ as runner


def test_a_bench_that_pins_itself_does_not_pin_the_next(monkeypatch: pytest.MonkeyPatch) -> None:
    """The transport and hypervisor benches pin the measuring process to one
    CPU; a bench after them (in ``all``) starts from every CPU it was given,
    as do the hosts it starts."""
    everything = os.sched_getaffinity(0)
    if len(everything) < 2:
        pytest.skip("needs two CPUs")
    seen: list[set[int]] = []

    def pins(quick: bool = False) -> list:
        os.sched_setaffinity(0, {min(everything)})
        return []

    def looks(quick: bool = False) -> list:
        seen.append(os.sched_getaffinity(0))
        return []

    for name, run in (("pins", pins), ("looks", looks)):
        monkeypatch.setitem(sys.modules, f"bench.{name}", types.SimpleNamespace(run=run))
    monkeypatch.setattr(runner, "BENCHES", ["pins", "looks"])
    try:
        assert runner.main(["all"]) == 0
    finally:
        os.sched_setaffinity(0, everything)
    assert seen == [everything]
