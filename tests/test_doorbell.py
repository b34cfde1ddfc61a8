"""Doorbells: records arrive in order; a full FIFO or a gone reader is reported
to the writer (which then falls back to an nng message)."""

from __future__ import annotations

import trio

from shared.doorbell import APIC, EOI, NMI, UPCALL, DoorbellReader, DoorbellWriter, bell_path


async def test_kicks_arrive_in_order(tmp_path) -> None:
    with trio.fail_after(5):
        reader = DoorbellReader(bell_path(tmp_path / "ram", 1))
        writer = DoorbellWriter(reader.path)
        assert writer.ring(UPCALL, 0xF3, 0)
        assert writer.ring(APIC, 0xEF, EOI)
        assert writer.ring(APIC, 2, NMI)
        got = []
        while len(got) < 3:
            got += await reader.receive()
        assert got == [(UPCALL, 0xF3, 0), (APIC, 0xEF, EOI), (APIC, 2, NMI)]
        writer.close()
        reader.close()
        assert not reader.path.exists()


def test_a_full_fifo_refuses_and_nothing_is_half_written(tmp_path) -> None:
    reader = DoorbellReader(bell_path(tmp_path / "ram", 0))
    writer = DoorbellWriter(reader.path)
    rung = 0
    while writer.ring(UPCALL, 1, 0):
        rung += 1
        assert rung < 1_000_000
    assert rung * 4 >= 4096  # at least a page of records fit
    writer.close()
    reader.close()


def test_only_a_fifo_can_be_a_doorbell(tmp_path) -> None:
    plain = tmp_path / "file"
    plain.write_bytes(b"")
    try:
        DoorbellWriter(plain)
    except ValueError:
        return
    raise AssertionError("a regular file was accepted as a doorbell")
