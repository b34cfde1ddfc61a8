"""The fault hook: each fault happens as configured, reproducibly by seed."""

from __future__ import annotations

import pytest
import trio

from shared import codec
from shared.transport import (
    CallTimeout,
    FaultInjector,
    FaultPlan,
    _wire,
    open_channel,
    open_server,
)
from tests.echo_service import EchoReply, EchoRequest, Note, NotesRequest, PushRequest, serve_echo

N = 300


def _note_frame(seq: int) -> bytes:
    return _wire.pack(_wire.Kind.ONEWAY, 0, codec.to_wire(Note(seq)))


def _predict(plan: FaultPlan, n: int = N) -> list[int]:
    """What a receiver sees, in order, when ``n`` notes pass this plan."""
    inj = FaultInjector(plan)
    frames = {_note_frame(i): i for i in range(n)}
    seen = []
    for i in range(n):
        for _delay, frame in inj.plan_send(_note_frame(i)):
            seen.append(frames[frame])
    held = inj.release_held()
    if held is not None:
        seen.append(frames[held])
    return seen


async def _send_notes_through(endpoint: str, plan: FaultPlan) -> list[int]:
    async with open_server(endpoint) as server, open_channel(endpoint) as chan:
        serve_echo(server)
        await chan.wait_connected()
        chan.set_faults(plan)
        for i in range(N):
            await chan.send(Note(i))
        await trio.sleep(0.2)  # a frame held for reordering is flushed by then
        chan.set_faults(FaultPlan())
        return (await chan.call(NotesRequest())).seqs


@pytest.fixture
def endpoint(tmp_path) -> str:
    return f"ipc://{tmp_path}/svc.sock"


def test_same_seed_same_decisions() -> None:
    plan = FaultPlan(drop=0.2, duplicate=0.1, reorder=0.1, seed=42)
    assert _predict(plan) == _predict(plan)
    assert _predict(plan) != _predict(FaultPlan(drop=0.2, duplicate=0.1, reorder=0.1, seed=43))


@pytest.mark.parametrize(
    "plan",
    [
        FaultPlan(drop=0.3, seed=1),
        FaultPlan(duplicate=0.25, seed=2),
        FaultPlan(reorder=0.2, seed=3),
        FaultPlan(drop=0.1, duplicate=0.1, reorder=0.1, seed=4),
    ],
    ids=["drop", "duplicate", "reorder", "mixed"],
)
async def test_faults_happen_exactly_as_planned(endpoint: str, plan: FaultPlan) -> None:
    with trio.fail_after(15):
        seen = await _send_notes_through(endpoint, plan)
    expected = _predict(plan)
    assert seen == expected
    # and the fault really happened (the plan is not a no-op for this seed)
    assert seen != list(range(N))
    if plan.drop and not plan.duplicate:
        assert len(seen) < N
    if plan.duplicate and not plan.drop:
        assert len(seen) > N
    if plan.reorder and not (plan.drop or plan.duplicate):
        assert sorted(seen) == list(range(N))


async def test_delay_holds_frames_back(endpoint: str) -> None:
    with trio.fail_after(10):
        async with open_server(endpoint) as server, open_channel(endpoint) as chan:
            serve_echo(server)
            await chan.call(EchoRequest(0))
            chan.set_faults(FaultPlan(delay_min=0.08, delay_max=0.1, seed=5))
            start = trio.current_time()
            assert await chan.call(EchoRequest(1)) == EchoReply(1)
            assert trio.current_time() - start >= 0.08
            chan.set_faults(FaultPlan())
            start = trio.current_time()
            await chan.call(EchoRequest(2))
            assert trio.current_time() - start < 0.08


async def test_partition_then_heal(endpoint: str) -> None:
    with trio.fail_after(10):
        async with open_server(endpoint) as server, open_channel(endpoint) as chan:
            serve_echo(server)
            await chan.call(EchoRequest(0))
            chan.set_faults(FaultPlan(partition=True))
            with pytest.raises(CallTimeout):
                await chan.call(EchoRequest(1), timeout=0.2)
            chan.set_faults(FaultPlan())
            assert await chan.call(EchoRequest(2)) == EchoReply(2)


async def test_server_side_faults_on_pushed_messages(endpoint: str) -> None:
    plan = FaultPlan(drop=0.5, seed=9)
    with trio.fail_after(10):
        async with open_server(endpoint) as server, open_channel(endpoint) as chan:
            serve_echo(server)
            await chan.call(EchoRequest(0))
            server.set_faults(plan)
            # the reply to PushRequest passes the plan too: retry until one gets through
            for _ in range(20):
                try:
                    await chan.call(PushRequest(40), timeout=0.3)
                    break
                except CallTimeout:
                    continue
            server.set_faults(FaultPlan())
            await chan.call(EchoRequest(1))
            got = []
            while True:
                try:
                    got.append(chan.receive_nowait().seq)
                except trio.WouldBlock:
                    break
            assert 0 < len(got) < 40 * 20
            assert server._out.faults.statistics().dropped > 0
