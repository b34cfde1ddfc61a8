"""The shared-info page (``struct shared_info``, ``xen/xen.h``) and what lives in it:
per-vCPU ``vcpu_info`` slots with their ``vcpu_time_info``, the 2-level event
channel bitmaps and the wall clock (xen-reference sections 7.4 and 9.2).

The helpers work on any writable buffer holding the page (``bytearray``,
``mmap``, ``memoryview``). Bits are set and cleared one **byte** at a time: the
hypervisor service and a vCPU process each flip their own bits, and a byte-wide
read-modify-write cannot clobber a neighbour's bit in another byte of the same
64-bit word the way a word-wide one would. (Python has no atomic bit operations
on shared memory; the services serialise writers of the same byte themselves.)
"""

from __future__ import annotations

import struct
from typing import Final

import attrs

from shared import atomics
from shared.abi._layout import layout
from shared.abi.constants import EVTCHN_2L_NR_CHANNELS, XEN_LEGACY_MAX_VCPUS

VCPU_TIME_INFO = layout(
    "struct vcpu_time_info",
    "xen/xen.h",
    ("version", "I"),  # odd while Xen is updating the fields
    ("pad0", "I"),
    ("tsc_timestamp", "Q"),
    ("system_time", "Q"),
    ("tsc_to_system_mul", "I"),
    ("tsc_shift", "b"),
    ("flags", "B"),
    ("pad1", "B", 2),
)

VCPU_INFO = layout(
    "struct vcpu_info",
    "xen/xen.h",
    ("evtchn_upcall_pending", "B"),
    ("evtchn_upcall_mask", "B"),  # PV only: Xen ignores it for HVM guests
    ("evtchn_pending_sel", "Q"),
    ("arch_cr2", "Q", 1, "arch.cr2"),
    ("arch_pad", "Q", 1, "arch.pad"),
    ("time", VCPU_TIME_INFO),
)

SHARED_INFO = layout(
    "struct shared_info",
    "xen/xen.h",
    ("vcpu_info", VCPU_INFO, XEN_LEGACY_MAX_VCPUS),
    ("evtchn_pending", "Q", 64),
    ("evtchn_mask", "Q", 64),
    ("wc_version", "I"),
    ("wc_sec", "I"),
    ("wc_nsec", "I"),
    ("wc_sec_hi", "I"),
    ("arch_max_pfn", "Q", 1, "arch.max_pfn"),
    ("arch_pfn_to_mfn_frame_list_list", "Q", 1, "arch.pfn_to_mfn_frame_list_list"),
    ("arch_nmi_reason", "Q", 1, "arch.nmi_reason"),
    ("arch_p2m_cr3", "Q", 1, "arch.p2m_cr3"),
    ("arch_p2m_vaddr", "Q", 1, "arch.p2m_vaddr"),
    ("arch_p2m_generation", "Q", 1, "arch.p2m_generation"),
)

_PENDING: Final = SHARED_INFO.offsets["evtchn_pending"]
_MASK: Final = SHARED_INFO.offsets["evtchn_mask"]
_UPCALL_PENDING: Final = VCPU_INFO.offsets["evtchn_upcall_pending"]
_PENDING_SEL: Final = VCPU_INFO.offsets["evtchn_pending_sel"]
_TIME: Final = VCPU_INFO.offsets["time"]
_U64 = struct.Struct("<Q")
_WALLCLOCK = struct.Struct("<III")  # wc_sec, wc_nsec, wc_sec_hi
_TIME_FIELDS = struct.Struct("<QQIbB")  # vcpu_time_info from tsc_timestamp to flags


def vcpu_info_offset(vcpu: int) -> int:
    """Offset of vCPU ``vcpu``'s legacy slot in shared_info (vCPUs 0..31 only; others
    must use ``VCPUOP_register_vcpu_info``)."""
    if not 0 <= vcpu < XEN_LEGACY_MAX_VCPUS:
        raise ValueError(f"vCPU {vcpu} has no slot in shared_info")
    return vcpu * VCPU_INFO.size


def port_word_bit(port: int) -> tuple[int, int]:
    """Port ``p`` is bit ``p & 63`` of word ``p >> 6`` (and selector bit ``p >> 6``)."""
    if not 0 <= port < EVTCHN_2L_NR_CHANNELS:
        raise ValueError(f"port {port} outside the 2-level ABI")
    return port >> 6, port & 63


# --- byte-granular bit operations on little-endian words ----------------------------------


def _test_bit(buf: bytearray | memoryview, base: int, nr: int) -> bool:
    return bool(buf[base + (nr >> 3)] >> (nr & 7) & 1)


def _test_and_set_bit(buf: bytearray | memoryview, base: int, nr: int) -> bool:
    # Atomic: the hypervisor and the guest's vCPU processes change these bytes
    # concurrently (a plain read-modify-write loses updates).
    bit = 1 << (nr & 7)
    return bool(atomics.fetch_or_u8(buf, base + (nr >> 3), bit) & bit)


def _test_and_clear_bit(buf: bytearray | memoryview, base: int, nr: int) -> bool:
    bit = 1 << (nr & 7)
    return bool(atomics.fetch_and_u8(buf, base + (nr >> 3), ~bit & 0xFF) & bit)


def evtchn_is_pending(buf: bytearray | memoryview, port: int) -> bool:
    port_word_bit(port)
    return _test_bit(buf, _PENDING, port)


def evtchn_set_pending(buf: bytearray | memoryview, port: int) -> bool:
    """Set the pending bit; returns whether it was already set."""
    port_word_bit(port)
    return _test_and_set_bit(buf, _PENDING, port)


def evtchn_clear_pending(buf: bytearray | memoryview, port: int) -> bool:
    """Clear the pending bit; returns whether it was set."""
    port_word_bit(port)
    return _test_and_clear_bit(buf, _PENDING, port)


def evtchn_is_masked(buf: bytearray | memoryview, port: int) -> bool:
    port_word_bit(port)
    return _test_bit(buf, _MASK, port)


def evtchn_set_mask(buf: bytearray | memoryview, port: int) -> bool:
    port_word_bit(port)
    return _test_and_set_bit(buf, _MASK, port)


def evtchn_clear_mask(buf: bytearray | memoryview, port: int) -> bool:
    port_word_bit(port)
    return _test_and_clear_bit(buf, _MASK, port)


def pending_word(buf: bytearray | memoryview, word: int) -> int:
    """``evtchn_pending[word] & ~evtchn_mask[word]``: the ports of a word to deliver."""
    pending = _U64.unpack_from(buf, _PENDING + 8 * word)[0]
    mask = _U64.unpack_from(buf, _MASK + 8 * word)[0]
    return pending & ~mask


# --- vcpu_info (``vcpu`` is the byte offset of a vcpu_info inside ``buf``) -----------------


def upcall_pending(buf: bytearray | memoryview, vcpu: int) -> bool:
    return buf[vcpu + _UPCALL_PENDING] != 0


def set_upcall_pending(buf: bytearray | memoryview, vcpu: int, value: bool = True) -> bool:
    """Write ``evtchn_upcall_pending``; returns the previous value."""
    return atomics.exchange_u8(buf, vcpu + _UPCALL_PENDING, int(value)) != 0


def pending_sel(buf: bytearray | memoryview, vcpu: int) -> int:
    return _U64.unpack_from(buf, vcpu + _PENDING_SEL)[0]


def set_pending_sel_bit(buf: bytearray | memoryview, vcpu: int, word: int) -> bool:
    """Set selector bit ``word``; returns whether it was already set."""
    return _test_and_set_bit(buf, vcpu + _PENDING_SEL, word)


def take_pending_sel(buf: bytearray | memoryview, vcpu: int) -> int:
    """The guest's ``xchg(pending_sel, 0)``: read the selector and clear it."""
    return atomics.exchange_u64(buf, vcpu + _PENDING_SEL, 0)


def evtchn_2l_set_pending(buf: bytearray | memoryview, port: int, vcpu: int) -> bool:
    """Xen's 2-level set-pending, in its order: pending bit, then (if unmasked) the
    selector bit, then upcall_pending. Returns True when the vCPU must be kicked
    (upcall_pending went 0 -> 1)."""
    if evtchn_set_pending(buf, port):
        return False  # already pending: no new edge
    if evtchn_is_masked(buf, port) or set_pending_sel_bit(buf, vcpu, port >> 6):
        return False
    return not set_upcall_pending(buf, vcpu)


def evtchn_2l_unmask(buf: bytearray | memoryview, port: int, vcpu: int) -> bool:
    """``EVTCHNOP_unmask``: clear the mask and re-deliver a port that became pending
    while masked. Returns True when the vCPU must be kicked."""
    if not evtchn_clear_mask(buf, port) or not evtchn_is_pending(buf, port):
        return False
    if set_pending_sel_bit(buf, vcpu, port >> 6):
        return False
    return not set_upcall_pending(buf, vcpu)


# --- time ---------------------------------------------------------------------------------


class TornReadError(RuntimeError):
    """A seqlock reader kept seeing an update in progress."""


@attrs.frozen
class VcpuTimeInfo:
    """The fields of ``vcpu_time_info`` a reader needs (version excluded)."""

    tsc_timestamp: int  #: guest TSC at the last update
    system_time: int  #: ns since host boot at that TSC
    tsc_to_system_mul: int  #: 32.32 fixed-point ns per (shifted) TSC tick
    tsc_shift: int  #: signed power of two applied to TSC deltas first
    flags: int = 0  #: XEN_PVCLOCK bits

    def ns_at(self, tsc: int) -> int:
        """System time at guest TSC value ``tsc`` (the pvclock formula)."""
        delta = (tsc - self.tsc_timestamp) & 0xFFFFFFFFFFFFFFFF
        delta = delta << self.tsc_shift if self.tsc_shift >= 0 else delta >> -self.tsc_shift
        return self.system_time + ((delta * self.tsc_to_system_mul) >> 32)

    @property
    def tsc_hz(self) -> int:
        hz = (10**9 << 32) // self.tsc_to_system_mul
        return hz >> self.tsc_shift if self.tsc_shift >= 0 else hz << -self.tsc_shift


def time_scale(tsc_hz: int) -> tuple[int, int]:
    """``(tsc_to_system_mul, tsc_shift)`` for a TSC of ``tsc_hz``: the shift that
    keeps the multiplier in [2**31, 2**32) so it uses all 32 bits of precision."""
    if tsc_hz <= 0:
        raise ValueError("tsc_hz must be positive")

    def mul(shift: int) -> int:
        ticks = tsc_hz << shift if shift >= 0 else tsc_hz >> -shift
        return (10**9 << 32) // ticks

    shift = 0
    while mul(shift) >= 1 << 32:  # slow TSC: scale deltas up
        shift += 1
    while mul(shift) < 1 << 31:  # fast TSC: scale deltas down
        shift -= 1
    return mul(shift), shift


def write_time_info(buf: bytearray | memoryview, vcpu: int, info: VcpuTimeInfo) -> None:
    """Publish ``info`` in the vcpu_info at ``vcpu`` the way Xen does: version made
    odd, fields written, version made even again."""
    at = vcpu + _TIME
    version = atomics.load_u32(buf, at)
    odd = ((version + 1) | 1) & 0xFFFFFFFF
    atomics.store_u32(buf, at, odd)
    _TIME_FIELDS.pack_into(
        buf,
        at + 8,
        info.tsc_timestamp,
        info.system_time,
        info.tsc_to_system_mul,
        info.tsc_shift,
        info.flags,
    )
    atomics.store_u32(buf, at, (odd + 1) & 0xFFFFFFFF)


def read_time_info(buf: bytearray | memoryview, vcpu: int, retries: int = 1000) -> VcpuTimeInfo:
    """Read with the guest's seqlock protocol: retry while the version is odd or
    changed during the copy."""
    at = vcpu + _TIME
    for _ in range(retries):
        version = atomics.load_u32(buf, at)
        if version & 1:
            continue
        fields = _TIME_FIELDS.unpack_from(buf, at + 8)
        if atomics.load_u32(buf, at) == version:
            return VcpuTimeInfo(*fields)
    raise TornReadError(f"vcpu_time_info at {at:#x} stayed mid-update")


def write_wallclock(buf: bytearray | memoryview, sec: int, nsec: int) -> None:
    """UTC at system time 0, under the ``wc_version`` seqlock; sec is 64-bit split
    into ``wc_sec`` and ``wc_sec_hi``."""
    at = SHARED_INFO.offsets["wc_version"]
    odd = ((atomics.load_u32(buf, at) + 1) | 1) & 0xFFFFFFFF
    atomics.store_u32(buf, at, odd)
    _WALLCLOCK.pack_into(buf, at + 4, sec & 0xFFFFFFFF, nsec, sec >> 32)
    atomics.store_u32(buf, at, (odd + 1) & 0xFFFFFFFF)


def read_wallclock(buf: bytearray | memoryview, retries: int = 1000) -> tuple[int, int]:
    """``(sec, nsec)`` of the wall clock at system time 0."""
    at = SHARED_INFO.offsets["wc_version"]
    for _ in range(retries):
        version = atomics.load_u32(buf, at)
        if version & 1:
            continue
        sec, nsec, sec_hi = _WALLCLOCK.unpack_from(buf, at + 4)
        if atomics.load_u32(buf, at) == version:
            return (sec_hi << 32) | sec, nsec
    raise TornReadError("wall clock stayed mid-update")
