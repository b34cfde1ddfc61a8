"""Atomic read-modify-write on shared memory, across processes.

The hypervisor sets pending bits in a guest's ``shared_info`` while that
guest's vCPU processes clear others in the same bytes; a plain Python
read-modify-write loses one of two concurrent updates (seen: a port left
pending forever). These call GCC's libatomic (``lock or``/``lock and``/
``xchg`` on x86), which is what Xen and the guest kernels use, on the address
of the byte inside the mapping.
"""

from __future__ import annotations

import ctypes

SEQ_CST = 5  # __ATOMIC_SEQ_CST

_lib = ctypes.CDLL("libatomic.so.1")


def _fn(name: str, kind: type) -> ctypes._CFuncPtr:  # type: ignore[name-defined]
    f = getattr(_lib, name)
    f.argtypes = [ctypes.c_void_p, kind, ctypes.c_int]
    f.restype = kind
    return f


_or8 = _fn("__atomic_fetch_or_1", ctypes.c_uint8)
_and8 = _fn("__atomic_fetch_and_1", ctypes.c_uint8)
_xchg8 = _fn("__atomic_exchange_1", ctypes.c_uint8)
_xchg64 = _fn("__atomic_exchange_8", ctypes.c_uint64)


def _address(buf: bytearray | memoryview, offset: int) -> int:
    # The ctypes view is dropped at once: a live export would keep the mmap from
    # closing. The address stays valid for as long as the mapping does.
    view = ctypes.c_char.from_buffer(buf, offset)
    address = ctypes.addressof(view)
    del view
    return address


def fetch_or_u8(buf: bytearray | memoryview, offset: int, bits: int) -> int:
    """``old = buf[offset]; buf[offset] |= bits`` atomically; returns old."""
    return _or8(_address(buf, offset), bits, SEQ_CST)


def fetch_and_u8(buf: bytearray | memoryview, offset: int, bits: int) -> int:
    """``old = buf[offset]; buf[offset] &= bits`` atomically; returns old."""
    return _and8(_address(buf, offset), bits, SEQ_CST)


def exchange_u8(buf: bytearray | memoryview, offset: int, value: int) -> int:
    return _xchg8(_address(buf, offset), value, SEQ_CST)


def exchange_u64(buf: bytearray | memoryview, offset: int, value: int) -> int:
    """The guest's ``xchg(pending_sel, 0)``."""
    if offset % 8:
        raise ValueError("a 64-bit exchange needs an 8-byte aligned offset")
    return _xchg64(_address(buf, offset), value, SEQ_CST)


def load_u32(buf: bytearray | memoryview, offset: int) -> int:
    """One aligned 32-bit load (``struct.unpack_from`` reads byte by byte, so a
    concurrent store can be seen half done)."""
    with memoryview(buf) as view:
        return view[offset : offset + 4].cast("I")[0]


def store_u32(buf: bytearray | memoryview, offset: int, value: int) -> None:
    """One aligned 32-bit store (``struct.pack_into`` zero-fills its target
    first: another process could read 0 meanwhile, seen as a ring index)."""
    with memoryview(buf) as view:
        view[offset : offset + 4].cast("I")[0] = value
