"""blkback end to end: real hypervisor, xenstored and blkback processes, the
test playing toolstack and guest blkfront (tests/blk_frontend.py)."""

from __future__ import annotations

import os
from pathlib import Path

import trio

from shared.abi.blkif import BlkifOp, BlkifRequestDiscard, BlkifRsp, VDisk
from tests.blk_frontend import frontend
from tests.blk_harness import blk_host

DEVID = 51712  # xvda
OK = BlkifRsp.OKAY


def pattern(tag: int, nbytes: int) -> bytes:
    return bytes((tag * 31 + i * 7) & 0xFF for i in range(256)) * (nbytes // 256)


async def test_raw_image_write_flush_read_back() -> None:
    with trio.fail_after(60):
        async with blk_host() as h:
            image = h.base / "disk.img"
            image.write_bytes(bytes(8 << 20))
            created = await h.create_guest()
            await h.attach(created.domid, DEVID, str(image))
            async with frontend(h, created, DEVID) as fe:
                await fe.connect()
                assert fe.sectors == (8 << 20) // 512
                assert fe.info == VDisk(0)
                assert fe.backend["feature-flush-cache"] == b"1"
                data = pattern(1, 40960)
                assert (await fe.io(BlkifOp.WRITE, 64, data))[0] == OK
                assert (await fe.io(BlkifOp.FLUSH_DISKCACHE, 0))[0] == OK
                status, back = await fe.io(BlkifOp.READ, 64, nbytes=len(data))
                assert status == OK and back == data
                with open(image, "rb") as f:
                    f.seek(64 * 512)
                    assert f.read(len(data)) == data


def on_image(image: Path, sector: int, nbytes: int) -> bytes:
    with open(image, "rb") as f:
        f.seek(sector * 512)
        return f.read(nbytes)


async def test_sparse_image_indirect_1mib_and_discard() -> None:
    with trio.fail_after(60):
        async with blk_host() as h:
            image = h.base / "sparse.img"
            with open(image, "wb") as f:
                f.truncate(64 << 20)
            assert os.stat(image).st_blocks == 0
            created = await h.create_guest(pages=4096)
            await h.attach(created.domid, DEVID, str(image))
            async with frontend(h, created, DEVID) as fe:
                await fe.connect(order=2)
                assert fe.backend["feature-discard"] == b"1"
                assert int(fe.backend["feature-max-indirect-segments"]) >= 256
                mib = pattern(3, 1 << 20)
                first = fe.prepare(BlkifOp.WRITE, 2048, mib)  # 256 segments: indirect
                second = fe.prepare(BlkifOp.WRITE, 8192, pattern(4, 1 << 20), indirect=True)
                assert [s for s, _ in await fe.run([first, second])] == [OK, OK]
                assert (await fe.io(BlkifOp.FLUSH_DISKCACHE, 0))[0] == OK
                status, back = await fe.io(BlkifOp.READ, 2048, nbytes=1 << 20)
                assert status == OK and back == mib
                assert on_image(image, 2048, 1 << 20) == mib
                assert on_image(image, 8192, 1 << 20) == pattern(4, 1 << 20)
                # an untouched region of the sparse file reads as zeros through the ring
                status, zeros = await fe.io(BlkifOp.READ, 40000, nbytes=8192)
                assert status == OK and zeros == bytes(8192)
                blocks = os.stat(image).st_blocks
                discard = BlkifRequestDiscard(0, DEVID, 999, 2048, 2048).encode().ljust(112, b"\0")
                assert await fe.wait(await fe.submit_raw([discard])) == [OK]
                assert os.stat(image).st_blocks < blocks  # a hole was punched
                assert on_image(image, 2048, 1 << 20) == bytes(1 << 20)
                assert os.stat(image).st_size == 64 << 20
            status = await h.blkback_status()
            grants = status["devices"][f"{created.domid}/{DEVID}"]["grants"]
            assert grants["maps"] == grants["unmaps"]  # every temporary mapping went back


async def test_persistent_grants_and_many_requests_in_flight() -> None:
    with trio.fail_after(60):
        async with blk_host() as h:
            image = h.base / "disk.img"
            image.write_bytes(bytes(4 << 20))
            created = await h.create_guest()
            await h.attach(created.domid, DEVID, str(image))
            async with frontend(h, created, DEVID) as fe:
                await fe.connect(order=1, persistent=True)
                assert fe.backend["feature-persistent"] == b"1"
                for rnd in range(3):
                    reqs = [
                        fe.prepare(BlkifOp.WRITE, 8 * k, pattern(k + rnd, 4096)) for k in range(48)
                    ]
                    assert {s for s, _ in await fe.run(reqs)} == {OK}
                reads = [fe.prepare(BlkifOp.READ, 8 * k, nbytes=4096) for k in range(48)]
                results = await fe.run(reads)
                assert [d for _, d in results] == [pattern(k + 2, 4096) for k in range(48)]
            dev = (await h.blkback_status())["devices"][f"{created.domid}/{DEVID}"]
            assert dev["grants"]["persistent_hits"] > 100  # grants reused, not remapped
            assert not fe.stray and set(fe.responses.values()) == {1}
