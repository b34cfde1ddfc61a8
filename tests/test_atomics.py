"""Atomic bit updates on a shared mapping from two processes lose nothing
(the plain read-modify-write they replace does)."""

from __future__ import annotations

import mmap
import subprocess
import sys
import textwrap

WORKER = textwrap.dedent(
    """
    import mmap, os, sys
    from shared import atomics
    path, bit, rounds, plain = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
    fd = os.open(path, os.O_RDWR)
    m = mmap.mmap(fd, 4096)
    mine = 1 << bit
    lost = 0
    for _ in range(rounds):
        if plain:
            old = m[0]; m[0] = old | mine
        else:
            old = atomics.fetch_or_u8(m, 0, mine)
        lost += bool(old & mine)          # my bit was still set: my clear was undone
        if plain:
            old = m[0]; m[0] = old & ~mine & 0xFF
        else:
            old = atomics.fetch_and_u8(m, 0, ~mine & 0xFF)
        lost += not (old & mine)          # my bit was gone: my set was undone
    print(lost)
    """
)


def _race(tmp_path, plain: bool, rounds: int = 100_000) -> int:
    path = tmp_path / "page"
    path.write_bytes(bytes(4096))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(path), str(bit), str(rounds), "1" if plain else "0"],
            stdout=subprocess.PIPE,
        )
        for bit in (0, 1)
    ]
    try:
        return sum(int(p.communicate(timeout=60)[0]) for p in procs)
    finally:
        for p in procs:
            p.kill()


def test_atomic_updates_lose_nothing(tmp_path) -> None:
    assert _race(tmp_path, plain=False) == 0


def test_the_plain_read_modify_write_does_lose_updates(tmp_path) -> None:
    # Shows the race the atomics exist for (and that the check above can fail).
    assert sum(_race(tmp_path, plain=True) for _ in range(3)) > 0


def test_exchange(tmp_path) -> None:
    from shared import atomics

    with open(tmp_path / "p", "wb+") as f:
        f.write(bytes(4096))
        f.flush()
        m = mmap.mmap(f.fileno(), 4096)
        m[8:16] = (0x1234).to_bytes(8, "little")
        assert atomics.exchange_u64(memoryview(m)[0:64], 8, 0) == 0x1234
        assert m[8:16] == bytes(8)
        assert atomics.exchange_u8(m, 3, 1) == 0 and m[3] == 1
        m.close()  # no export is left behind


READER = textwrap.dedent(
    """
    import mmap, os, sys
    from shared import atomics
    fd = os.open(sys.argv[1], os.O_RDWR)
    m = mmap.mmap(fd, 4096)
    last, backwards = 0, 0
    while True:
        v = atomics.load_u32(m, 64)
        if v == 0xFFFFFFFF:
            break
        backwards += v < last
        last = max(last, v)
    print(backwards)
    """
)


def test_ring_index_stores_never_tear(tmp_path) -> None:
    """A reader in another process never sees an index go backwards (with
    struct.pack_into it saw 0 about once in 100 k reads)."""
    from shared import atomics

    path = tmp_path / "page"
    path.write_bytes(bytes(4096))
    reader = subprocess.Popen([sys.executable, "-c", READER, str(path)], stdout=subprocess.PIPE)
    try:
        with open(path, "r+b") as f:
            m = mmap.mmap(f.fileno(), 4096)
            for v in range(1, 300_000):
                atomics.store_u32(m, 64, v)
            atomics.store_u32(m, 64, 0xFFFFFFFF)
            assert int(reader.communicate(timeout=60)[0]) == 0
            m.close()
    finally:
        reader.kill()
