"""Hypercall argument records: pack/unpack round trips, byte positions of the
reference tables (xen-reference 7.1, 8.1, 9.1), the evtchn_status union, and the
one member the shared C layout test cannot name (xen_add_to_physmap.size)."""

from __future__ import annotations

import struct

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.abi import hypercall as hc
from shared.abi.constants import DOMID, EVTCHNSTAT, HVM_PARAM, VIRQ, XENMAPSPACE

RECORDS = sorted(
    {
        t
        for table in (
            hc.EVTCHNOP_ARGS,
            hc.VCPUOP_ARGS,
            hc.HVMOP_ARGS,
            hc.SCHEDOP_ARGS,
            hc.XENMEM_ARGS,
            hc.XENVER_ARGS,
        )
        for t in table.values()
    },
    key=lambda t: t.__name__,
)
_BITS = {"B": 8, "H": 16, "I": 32, "Q": 64}


def _strategy(cls: type) -> st.SearchStrategy:
    codes = {f.name.lstrip("_"): f.code for f in cls.LAYOUT.fields}
    return st.builds(
        cls, **{a.name: st.integers(0, 2 ** _BITS[codes[a.name]] - 1) for a in attrs.fields(cls)}
    )


def test_every_struct_of_the_brief_has_a_record() -> None:
    assert {t.LAYOUT.c_type for t in RECORDS} == {
        "struct evtchn_alloc_unbound",
        "struct evtchn_bind_interdomain",
        "struct evtchn_bind_virq",
        "struct evtchn_bind_ipi",
        "struct evtchn_close",
        "struct evtchn_send",
        "struct evtchn_status",
        "struct evtchn_bind_vcpu",
        "struct evtchn_unmask",
        "struct vcpu_set_singleshot_timer",
        "struct vcpu_set_periodic_timer",
        "struct vcpu_register_vcpu_info",
        "struct xen_hvm_param",
        "struct xen_hvm_evtchn_upcall_vector",
        "struct xen_add_to_physmap",
        "struct xen_feature_info",
        "struct sched_shutdown",
        "struct sched_remote_shutdown",
    }


@pytest.mark.parametrize(
    "cls", [c for c in RECORDS if c is not hc.EvtchnStatus], ids=lambda c: c.__name__
)
@given(data=st.data())
def test_round_trip(cls: type, data: st.DataObject) -> None:
    rec = data.draw(_strategy(cls))
    raw = rec.pack()
    assert len(raw) == cls.LAYOUT.size
    assert cls.unpack(raw) == rec
    assert cls.unpack(b"\xff" * 8 + raw, offset=8) == rec


statuses = st.one_of(
    st.builds(
        hc.EvtchnStatus,
        st.integers(0, 0xFFFF),
        st.integers(0, 2**32 - 1),
        st.just(EVTCHNSTAT.interdomain),
        st.integers(0, 2**32 - 1),
        remote_dom=st.integers(0, 0xFFFF),
        remote_port=st.integers(0, 2**32 - 1),
    ),
    st.builds(
        hc.EvtchnStatus,
        st.integers(0, 0xFFFF),
        st.integers(0, 2**32 - 1),
        st.just(EVTCHNSTAT.unbound),
        st.integers(0, 2**32 - 1),
        remote_dom=st.integers(0, 0xFFFF),
    ),
    st.builds(
        hc.EvtchnStatus,
        st.integers(0, 0xFFFF),
        st.integers(0, 2**32 - 1),
        st.sampled_from([EVTCHNSTAT.pirq, EVTCHNSTAT.virq]),
        st.integers(0, 2**32 - 1),
        irq=st.integers(0, 2**32 - 1),
    ),
    st.builds(
        hc.EvtchnStatus,
        st.integers(0, 0xFFFF),
        st.integers(0, 2**32 - 1),
        st.sampled_from([EVTCHNSTAT.closed, EVTCHNSTAT.ipi]),
        st.integers(0, 2**32 - 1),
    ),
)


@given(statuses)
def test_status_round_trip(rec: hc.EvtchnStatus) -> None:
    raw = rec.pack()
    assert len(raw) == 24
    assert hc.EvtchnStatus.unpack(raw) == rec


def test_status_union_positions() -> None:
    inter = hc.EvtchnStatus(DOMID.SELF, 5, EVTCHNSTAT.interdomain, 1, remote_dom=3, remote_port=9)
    assert inter.pack() == struct.pack("<HxxIIIHxxI", DOMID.SELF, 5, 2, 1, 3, 9)
    virq = hc.EvtchnStatus(DOMID.SELF, 6, EVTCHNSTAT.virq, 2, irq=VIRQ.TIMER)
    assert virq.pack()[16:] == bytes(8)
    assert hc.EvtchnStatus(0, 6, EVTCHNSTAT.virq, 2, irq=VIRQ.XENPMU).pack()[16:20] == b"\x0d\0\0\0"


@pytest.mark.parametrize(
    ("rec", "wire"),
    [
        (hc.EvtchnBindInterdomain(1, 5, 7), struct.pack("<HxxII", 1, 5, 7)),
        (hc.EvtchnBindVirq(VIRQ.TIMER, 3, 11), struct.pack("<III", 0, 3, 11)),
        (hc.EvtchnAllocUnbound(DOMID.SELF, 0, 4), struct.pack("<HHI", 0x7FF0, 0, 4)),
        (hc.EvtchnBindIpi(2, 8), struct.pack("<II", 2, 8)),
        (hc.EvtchnBindVcpu(8, 2), struct.pack("<II", 8, 2)),
        (hc.VcpuSetSingleshotTimer(10**9, 1), struct.pack("<QIxxxx", 10**9, 1)),
        (hc.VcpuRegisterVcpuInfo(0x1234, 64), struct.pack("<QII", 0x1234, 64, 0)),
        (
            hc.XenHvmParam(DOMID.SELF, HVM_PARAM.CALLBACK_IRQ, 2 << 56 | 0xF3),
            struct.pack("<HHIQ", 0x7FF0, 0, 0, 2 << 56 | 0xF3),
        ),
        (hc.XenHvmEvtchnUpcallVector(1, 0xF3), struct.pack("<IBxxx", 1, 0xF3)),
        (
            hc.XenAddToPhysmap(DOMID.SELF, XENMAPSPACE.shared_info, 0, 0xFEFFF),
            struct.pack("<HHIQQ", 0x7FF0, 0, 0, 0, 0xFEFFF),
        ),
        (hc.XenFeatureInfo(0, 0x12305), struct.pack("<II", 0, 0x12305)),
        (hc.SchedRemoteShutdown(4, 2), struct.pack("<HxxI", 4, 2)),
    ],
    ids=lambda v: type(v).__name__ if not isinstance(v, bytes) else "",
)
def test_reference_byte_positions(rec: object, wire: bytes) -> None:
    assert rec.pack() == wire


def test_padding_is_written_as_zero_and_ignored_on_read() -> None:
    junk = struct.pack("<HHIQ", 0x7FF0, 0xBEEF, 2, 77)
    rec = hc.XenHvmParam.unpack(junk)
    assert rec == hc.XenHvmParam(DOMID.SELF, HVM_PARAM.STORE_EVTCHN, 77)
    assert rec.pack()[2:4] == b"\0\0"
    rsvd = struct.pack("<QII", 1, 2, 0xFFFFFFFF)
    assert hc.VcpuRegisterVcpuInfo.unpack(rsvd).pack()[12:] == bytes(4)


def test_hypervisor_answer_is_the_record_evolved() -> None:
    req = hc.EvtchnBindVirq.unpack(struct.pack("<III", VIRQ.TIMER, 0, 0))
    assert attrs.evolve(req, port=12).pack()[8:] == struct.pack("<I", 12)
