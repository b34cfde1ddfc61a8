"""shared_info page: offsets of the reference table, 2-level bit helpers, the Xen
set-pending/unmask order, and the vcpu_time_info / wall-clock seqlocks."""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.abi import sharedinfo as si
from shared.abi.constants import EVTCHN_2L_NR_CHANNELS, XEN_PVCLOCK
from shared.abi.sharedinfo import VcpuTimeInfo

ports = st.integers(0, EVTCHN_2L_NR_CHANNELS - 1)


def page() -> bytearray:
    return bytearray(4096)


def test_offsets_of_the_reference_table() -> None:
    assert (si.SHARED_INFO.size, si.VCPU_INFO.size, si.VCPU_TIME_INFO.size) == (3136, 64, 32)
    o = si.SHARED_INFO.offsets
    assert (o["evtchn_pending"], o["evtchn_mask"], o["wc_version"], o["wc_sec_hi"]) == (
        2048,
        2560,
        3072,
        3084,
    )
    assert (o["arch_max_pfn"], o["arch_p2m_generation"]) == (3088, 3128)
    v = si.VCPU_INFO.offsets
    assert (v["evtchn_pending_sel"], v["arch_cr2"], v["time"]) == (8, 16, 32)
    assert si.VCPU_TIME_INFO.offsets["tsc_shift"] == 28
    assert si.vcpu_info_offset(31) == 31 * 64


def test_vcpu_beyond_the_legacy_slots_has_no_offset() -> None:
    with pytest.raises(ValueError):
        si.vcpu_info_offset(32)


@pytest.mark.parametrize("port", [0, 1, 63, 64, 200, 4095])
def test_pending_bit_is_bit_p_and_63_of_word_p_shift_6(port: int) -> None:
    buf = page()
    assert si.evtchn_set_pending(buf, port) is False
    word = struct.unpack_from("<Q", buf, 2048 + 8 * (port >> 6))[0]
    assert word == 1 << (port & 63)
    assert si.evtchn_is_pending(buf, port)
    assert si.evtchn_set_pending(buf, port) is True
    assert si.evtchn_clear_pending(buf, port) is True
    assert si.evtchn_clear_pending(buf, port) is False
    assert buf == page()


@pytest.mark.parametrize("port", [-1, EVTCHN_2L_NR_CHANNELS])
def test_ports_outside_the_abi_are_refused(port: int) -> None:
    with pytest.raises(ValueError):
        si.evtchn_set_pending(page(), port)


@given(st.integers(0, 2**32), ports, st.booleans())
def test_a_bit_operation_touches_one_byte_only(seed: int, port: int, mask: bool) -> None:
    data = random.Random(seed).randbytes(4096)  # a page full of other bits
    buf = bytearray(data)
    if mask:
        si.evtchn_set_mask(buf, port)
        base = 2560
    else:
        si.evtchn_clear_pending(buf, port)
        base = 2048
    assert si.evtchn_is_masked(buf, port) if mask else not si.evtchn_is_pending(buf, port)
    changed = [i for i in range(4096) if buf[i] != data[i]]
    assert set(changed) <= {base + port // 8}


def test_mask_bits_and_deliverable_word() -> None:
    buf = page()
    for p in (64, 65, 66):
        si.evtchn_set_pending(buf, p)
    assert si.evtchn_set_mask(buf, 65) is False
    assert si.evtchn_is_masked(buf, 65)
    assert si.pending_word(buf, 1) == 0b101
    assert si.evtchn_clear_mask(buf, 65) is True
    assert si.pending_word(buf, 1) == 0b111


def test_vcpu_info_flags_and_selector() -> None:
    buf = page()
    v3 = si.vcpu_info_offset(3)
    assert si.set_upcall_pending(buf, v3) is False
    assert si.upcall_pending(buf, v3) and buf[v3] == 1
    assert si.set_pending_sel_bit(buf, v3, 63) is False
    assert si.set_pending_sel_bit(buf, v3, 0) is False
    assert si.set_pending_sel_bit(buf, v3, 0) is True
    assert si.pending_sel(buf, v3) == (1 << 63) | 1
    assert si.take_pending_sel(buf, v3) == (1 << 63) | 1
    assert si.pending_sel(buf, v3) == 0
    assert si.set_upcall_pending(buf, v3, False) is True
    assert buf == page()


def test_set_pending_kicks_once_per_edge() -> None:
    buf, v0 = page(), si.vcpu_info_offset(0)
    assert si.evtchn_2l_set_pending(buf, 5, v0) is True  # 0 -> 1: kick
    assert si.evtchn_2l_set_pending(buf, 5, v0) is False  # already pending
    assert si.evtchn_2l_set_pending(buf, 6, v0) is False  # selector already set
    assert si.pending_sel(buf, v0) == 1
    assert si.evtchn_2l_set_pending(buf, 70, v0) is False  # upcall already pending
    assert si.pending_sel(buf, v0) == 0b11


def test_masked_port_gets_no_upcall_until_unmask() -> None:
    buf, v1 = page(), si.vcpu_info_offset(1)
    si.evtchn_set_mask(buf, 9)
    assert si.evtchn_2l_set_pending(buf, 9, v1) is False
    assert si.evtchn_is_pending(buf, 9)
    assert (si.pending_sel(buf, v1), si.upcall_pending(buf, v1)) == (0, False)
    assert si.evtchn_2l_unmask(buf, 9, v1) is True
    assert (si.pending_sel(buf, v1), si.upcall_pending(buf, v1)) == (1, True)
    assert si.evtchn_2l_unmask(buf, 9, v1) is False  # not masked any more


def test_unmask_of_an_idle_port_only_clears_the_mask() -> None:
    buf, v0 = page(), si.vcpu_info_offset(0)
    si.evtchn_set_mask(buf, 3)
    assert si.evtchn_2l_unmask(buf, 3, v0) is False
    assert buf == page()


time_infos = st.builds(
    VcpuTimeInfo,
    st.integers(0, 2**64 - 1),
    st.integers(0, 2**64 - 1),
    st.integers(0, 2**32 - 1),
    st.integers(-128, 127),
    st.integers(0, 255),
)


@given(time_infos, st.integers(0, 2**32 - 1), st.integers(0, 31))
def test_time_info_seqlock_round_trip(info: VcpuTimeInfo, version: int, vcpu: int) -> None:
    buf = page()
    at = si.vcpu_info_offset(vcpu)
    struct.pack_into("<I", buf, at + 32, version)
    si.write_time_info(buf, at, info)
    new_version = struct.unpack_from("<I", buf, at + 32)[0]
    assert new_version % 2 == 0 and new_version != version
    assert si.read_time_info(buf, at) == info
    # Only this vCPU's time block changed.
    assert buf[:at] == bytes(at) and buf[at + 64 :] == bytes(4096 - at - 64)


def test_even_version_advances_by_two() -> None:
    buf = page()
    si.write_time_info(buf, 0, VcpuTimeInfo(1, 2, 3, 4))
    si.write_time_info(buf, 0, VcpuTimeInfo(1, 2, 3, 4))
    assert struct.unpack_from("<I", buf, 32)[0] == 4


def test_reader_refuses_a_block_left_mid_update() -> None:
    buf = page()
    si.write_time_info(buf, 0, VcpuTimeInfo(10, 20, 30, 1, XEN_PVCLOCK.TSC_STABLE_BIT))
    struct.pack_into("<I", buf, 32, 7)  # odd: writer in progress
    with pytest.raises(si.TornReadError):
        si.read_time_info(buf, 0, retries=5)
    struct.pack_into("<I", buf, 32, 8)
    assert si.read_time_info(buf, 0).flags == XEN_PVCLOCK.TSC_STABLE_BIT


@given(st.integers(10**6, 10**11))
def test_time_scale_converts_a_second_of_ticks_to_a_second(tsc_hz: int) -> None:
    mul, shift = si.time_scale(tsc_hz)
    assert 1 << 31 <= mul < 1 << 32
    info = VcpuTimeInfo(tsc_timestamp=1000, system_time=5, tsc_to_system_mul=mul, tsc_shift=shift)
    assert abs(info.ns_at(1000 + tsc_hz) - (5 + 10**9)) <= 1000  # 1 ppm
    assert abs(info.tsc_hz - tsc_hz) <= tsc_hz // 10**6 + 1


def test_ns_at_follows_the_pvclock_formula() -> None:
    info = VcpuTimeInfo(tsc_timestamp=100, system_time=7, tsc_to_system_mul=3 << 31, tsc_shift=-1)
    # delta 400 ticks >> 1 = 200, * 1.5 = 300 ns
    assert info.ns_at(500) == 307
    assert VcpuTimeInfo(0, 0, 1 << 31, 2).ns_at(10) == 20  # 10 << 2 = 40, * 0.5


def test_time_scale_refuses_nonsense() -> None:
    with pytest.raises(ValueError):
        si.time_scale(0)


@given(st.integers(0, 2**64 - 1), st.integers(0, 999_999_999))
def test_wallclock_round_trip(sec: int, nsec: int) -> None:
    buf = page()
    si.write_wallclock(buf, sec, nsec)
    assert si.read_wallclock(buf) == (sec, nsec)
    assert struct.unpack_from("<IIII", buf, 3072) == (2, sec & 0xFFFFFFFF, nsec, sec >> 32)
