"""Guest RAM files: two mappings see each other's writes; bounds are checked."""

from __future__ import annotations

import pytest

from shared.guestmem import PAGE_SIZE, GuestMemory, GuestMemoryError, ram_path


def test_two_mappings_share_pages(tmp_path) -> None:
    path = ram_path("h", 3, tmp_path)
    with GuestMemory.create(path, 16) as hv, GuestMemory.open(path) as vcpu:
        assert vcpu.nr_pages == 16
        hv.write(5, 100, b"hello")
        assert vcpu.read(5, 100, 5) == b"hello"
        vcpu.page(15)[-1] = 7
        assert hv.read(15, PAGE_SIZE - 1, 1) == b"\x07"
    path.unlink()


def test_create_refuses_an_existing_file_and_bad_sizes(tmp_path) -> None:
    path = ram_path("h", 1, tmp_path)
    with GuestMemory.create(path, 1):
        with pytest.raises(FileExistsError):
            GuestMemory.create(path, 1)
    with pytest.raises(GuestMemoryError):
        GuestMemory.create(ram_path("h", 2, tmp_path), 0)
    (tmp_path / "odd").write_bytes(b"x" * 100)
    with pytest.raises(GuestMemoryError):
        GuestMemory.open(tmp_path / "odd")


@pytest.mark.parametrize("gfn, offset, length", [(-1, 0, 1), (4, 0, 1), (0, 4000, 100), (0, -1, 1)])
def test_out_of_range_access_is_refused(tmp_path, gfn: int, offset: int, length: int) -> None:
    with GuestMemory.create(ram_path("h", 1, tmp_path), 4) as mem:
        with pytest.raises(GuestMemoryError):
            mem.read(gfn, offset, length)
        with pytest.raises(GuestMemoryError):
            mem.write(gfn, offset, b"x" * length)
