"""Hypothesis-generated ring contents from a malicious frontend: every slot gets
a response (or none is owed), blkback never crashes, counts its refusals, and
keeps serving the other guest's disk and the same guest's next good requests."""

from __future__ import annotations

import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.abi.blkif import BlkifOp, BlkifRsp
from tests.blk_frontend import frontend
from tests.blk_harness import blk_host
from tests.test_blkback_semantics import stamp

DEVID = 51712
SLOT = 112


@st.composite
def slots(draw) -> bytes:  # type: ignore[no-untyped-def]
    """112 bytes of ring slot: a chosen or random operation and fields, the
    rest random. The id (offset 8) is filled in later, unique per slot."""
    op = draw(st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 200, 255]))
    nr_segments = draw(st.integers(0, 255))
    body = draw(st.binary(min_size=SLOT - 16, max_size=SLOT - 16))
    return bytes([op, nr_segments]) + draw(st.binary(min_size=6, max_size=6)) + bytes(8) + body


def _collect(n: int) -> list[bytes]:
    found: list[bytes] = []

    @settings(max_examples=n, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(slots())
    def take(slot: bytes) -> None:
        found.append(slot)

    take()
    return found


async def test_fuzzed_ring_contents_never_crash_blkback() -> None:
    raw = _collect(120)
    with trio.fail_after(90):
        async with blk_host() as h:
            images = [h.base / "evil.img", h.base / "nice.img"]
            for img in images:
                img.write_bytes(bytes(1 << 20))
            evil, nice = await h.create_guest(), await h.create_guest()
            await h.attach(evil.domid, DEVID, str(images[0]))
            await h.attach(nice.domid, DEVID, str(images[1]))
            async with frontend(h, evil, DEVID) as fe, frontend(h, nice, DEVID) as ok:
                await fe.connect()
                await ok.connect()
                statuses = []
                for start in range(0, len(raw), 24):  # in batches that fit the ring
                    batch = [
                        s[:8] + (10_000 + start + i).to_bytes(8, "little") + s[16:]
                        for i, s in enumerate(raw[start : start + 24])
                    ]
                    statuses += await fe.wait(await fe.submit_raw(batch), timeout=30)
                    # the other guest is served between the bad batches
                    assert (await ok.io(BlkifOp.WRITE, 8 * start, stamp(start, 4096)))[0] == 0
                assert len(statuses) == len(raw)
                assert set(statuses) <= {BlkifRsp.OKAY, BlkifRsp.ERROR, BlkifRsp.EOPNOTSUPP}
                refused = sum(s != BlkifRsp.OKAY for s in statuses)
                assert refused > len(raw) // 2  # random slots are mostly nonsense
                # the same guest's next good request is served too
                assert (await fe.io(BlkifOp.WRITE, 0, stamp(99, 4096)))[0] == 0
                assert await fe.io(BlkifOp.READ, 0, nbytes=4096) == (0, stamp(99, 4096))
            status = await h.blkback_status()
            counters = status["devices"][f"{evil.domid}/{DEVID}"]["counters"]
            assert counters.get("errors", 0) + counters.get("unsupported", 0) >= refused - 5
            assert h.procs["blkback"].poll() is None  # never crashed
