"""blkback semantics through the ring: barrier ordering in the execution log,
read-only disks and CD-ROMs with media change, bad requests."""

from __future__ import annotations

import trio

from services.backend.blkback_order import barrier_violations
from shared.abi.blkif import BlkifOp, BlkifRequest, BlkifRequestIndirect, BlkifRsp, Segment, VDisk
from tests.blk_frontend import frontend
from tests.blk_harness import blk_host

DEVID = 51712
CDROM = 5632  # hdc
OK, ERROR, EOPNOTSUPP = BlkifRsp.OKAY, BlkifRsp.ERROR, BlkifRsp.EOPNOTSUPP


def stamp(tag: int, nbytes: int) -> bytes:
    return bytes([tag & 0xFF]) * nbytes


async def test_barrier_orders_execution() -> None:
    """X, Y, then BARRIER W, then Z, all pushed at once: the log shows W start
    after X and Y are done, and Z start after W is done; flushes wait for
    earlier writes."""
    with trio.fail_after(60):
        async with blk_host() as h:
            image = h.base / "disk.img"
            image.write_bytes(bytes(16 << 20))
            created = await h.create_guest(pages=4096)
            await h.attach(created.domid, DEVID, str(image))
            async with frontend(h, created, DEVID) as fe:
                await fe.connect(order=1)
                for rnd in range(3):
                    reqs = [
                        fe.prepare(BlkifOp.WRITE, 0, stamp(1, 1 << 20)),
                        fe.prepare(BlkifOp.WRITE, 4096, stamp(2, 1 << 20)),
                        fe.prepare(BlkifOp.READ, 8192, nbytes=4096),
                        fe.prepare(BlkifOp.WRITE_BARRIER, 2048, stamp(3, 4096)),
                        fe.prepare(BlkifOp.WRITE, 2048, stamp(4, 512 * 1024)),
                        fe.prepare(BlkifOp.WRITE, 6144, stamp(5, 8192)),
                        fe.prepare(BlkifOp.FLUSH_DISKCACHE, 0),
                        fe.prepare(BlkifOp.READ, 0, nbytes=4096),
                    ]
                    results = await fe.run(reqs)
                    assert [s for s, _ in results] == [OK] * 8, rnd
                    assert results[-1][1] == stamp(1, 4096)
                log = (await h.exec_log(created.domid, DEVID)).events
                assert len(log) == 3 * 8 * 2
                assert barrier_violations(log) == []
                # the flush started only after the writes before it were done
                at = {(e.seq, e.event): i for i, e in enumerate(log)}
                for e in log:
                    if e.op == "flush" and e.event == "start":
                        earlier = [x for x in log if x.seq < e.seq and x.op == "write"]
                        assert all(at[(x.seq, "done")] < at[(e.seq, "start")] for x in earlier)
                with open(image, "rb") as f:
                    f.seek(2048 * 512)
                    assert f.read(512 * 1024) == stamp(4, 512 * 1024)  # Z after W


async def test_read_only_disk_refuses_writes() -> None:
    with trio.fail_after(60):
        async with blk_host() as h:
            image = h.base / "ro.img"
            original = stamp(9, 1 << 20)
            image.write_bytes(original)
            created = await h.create_guest()
            await h.attach(created.domid, DEVID, str(image), mode="r")
            async with frontend(h, created, DEVID) as fe:
                await fe.connect()
                assert fe.info & VDisk.READONLY
                assert fe.backend["feature-discard"] == b"0"
                assert (await fe.io(BlkifOp.WRITE, 0, stamp(1, 4096)))[0] == ERROR
                assert (await fe.io(BlkifOp.WRITE, 0, stamp(1, 4096), indirect=True))[0] == ERROR
                assert (await fe.io(BlkifOp.READ, 8, nbytes=4096)) == (OK, original[4096:8192])
            assert image.read_bytes() == original


async def test_cdrom_reads_refuses_writes_and_changes_media() -> None:
    with trio.fail_after(60):
        async with blk_host() as h:
            iso = h.base / "one.iso"
            iso.write_bytes(stamp(0x11, 2 << 20))
            other = h.base / "two.iso"
            other.write_bytes(stamp(0x22, 4 << 20))
            created = await h.create_guest()
            await h.attach(created.domid, CDROM, str(iso), mode="r", device_type="cdrom")
            async with frontend(h, created, CDROM) as fe:
                await fe.connect()
                assert fe.info & (VDisk.CDROM | VDisk.READONLY) == VDisk.CDROM | VDisk.READONLY
                assert fe.sectors == (2 << 20) // 512
                assert fe.backend["physical-sector-size"] == b"2048"
                assert await fe.io(BlkifOp.READ, 0, nbytes=4096) == (OK, stamp(0x11, 4096))
                assert (await fe.io(BlkifOp.WRITE, 0, stamp(1, 4096)))[0] == ERROR
                assert (await fe.io(BlkifOp.WRITE_BARRIER, 0, stamp(1, 512)))[0] == ERROR
                # eject: the frontend sees Connected again with no sectors
                await h.set_params(created.domid, CDROM, "")
                await fe.wait_media_change()
                assert fe.sectors == 0 and fe.info & VDisk.CDROM
                assert (await fe.io(BlkifOp.READ, 0, nbytes=4096))[0] == ERROR
                # insert another disc
                await h.set_params(created.domid, CDROM, str(other))
                await fe.wait_media_change()
                assert fe.sectors == (4 << 20) // 512
                assert await fe.io(BlkifOp.READ, 4096, nbytes=4096) == (OK, stamp(0x22, 4096))
                assert fe.media_changes == 2
            assert iso.read_bytes() == stamp(0x11, 2 << 20)
            assert other.read_bytes() == stamp(0x22, 4 << 20)


async def test_bad_requests_get_errors_and_the_other_disk_keeps_working() -> None:
    with trio.fail_after(60):
        async with blk_host() as h:
            bad_img, good_img = h.base / "bad.img", h.base / "good.img"
            bad_img.write_bytes(bytes(1 << 20))
            good_img.write_bytes(bytes(1 << 20))
            evil = await h.create_guest()
            nice = await h.create_guest()
            await h.attach(evil.domid, DEVID, str(bad_img))
            await h.attach(nice.domid, DEVID, str(good_img))
            async with frontend(h, evil, DEVID) as fe, frontend(h, nice, DEVID) as ok:
                await fe.connect()
                await ok.connect()
                gfn, ref = fe.grant_page()
                ro_gfn, ro_ref = fe.grant_page(readonly=True)
                sectors = fe.sectors

                def req(op: int, rid: int, sector: int, *segs: tuple[int, int, int]) -> bytes:
                    segments = tuple(Segment(*s) for s in segs)
                    return BlkifRequest.of(op, DEVID, rid, sector, segments).encode()

                over = BlkifRequest(BlkifOp.READ, 12, DEVID, 107, 0, ()).encode()
                slots = [
                    bytes([77]) + bytes(7) + (101).to_bytes(8, "little") + bytes(96),  # garbage op
                    req(BlkifOp.READ, 102, sectors - 4, (ref, 0, 7)),  # past the end
                    req(BlkifOp.READ, 103, 0, (9999, 0, 7)),  # a grant never made
                    req(BlkifOp.READ, 104, 0, (ro_ref, 0, 7)),  # read into a read-only grant
                    req(BlkifOp.READ, 105, 0, (ref, 5, 2)),  # first_sect > last_sect
                    req(BlkifOp.WRITE, 106, 0, (2**32 - 1, 0, 0)),  # a gref past the table
                    over,  # nr_segments over 11
                    BlkifRequestIndirect(BlkifOp.READ, 5000, 108, 0, DEVID, (ref,)).encode(),
                    req(BlkifOp.READ, 109, 0, (ref, 0, 7)),  # and a good one after all that
                ]
                statuses = await fe.wait(await fe.submit_raw([s.ljust(112, b"\0") for s in slots]))
                assert statuses == [EOPNOTSUPP] + [ERROR] * 7 + [OK]
                # the other guest's disk was served all along
                assert (await ok.io(BlkifOp.WRITE, 0, stamp(7, 4096)))[0] == OK
                assert await ok.io(BlkifOp.READ, 0, nbytes=4096) == (OK, stamp(7, 4096))
                assert (await fe.io(BlkifOp.WRITE, 0, stamp(8, 4096)))[0] == OK  # evil still served
                del gfn, ro_gfn
            status = await h.blkback_status()
            counters = status["devices"][f"{evil.domid}/{DEVID}"]["counters"]
            assert counters["errors"] == 8
            assert status["devices"][f"{nice.domid}/{DEVID}"]["counters"].get("errors", 0) == 0
