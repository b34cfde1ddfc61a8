"""blkback end to end: real hypervisor, xenstored and blkback processes, the
test playing toolstack and guest blkfront (tests/blk_frontend.py)."""

from __future__ import annotations

import trio

from shared.abi.blkif import BlkifOp, BlkifRsp, VDisk
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
