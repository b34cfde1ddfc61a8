"""Every constant of ``shared.abi.constants`` (and the xs_wire numbers) against the
installed Xen 4.17 headers: a generated C program prints each macro/enumerator,
and ``gcc -dM -E`` lists the header's macros so a family we mirror cannot silently
miss a member.
"""

from __future__ import annotations

import enum
import re
import subprocess

import pytest

from shared.abi import constants as c
from shared.abi import xs_wire as xs
from tests.cbuild import XEN_INCLUDE, compile_c, require_xen_headers

HEADERS = [
    "stdint.h",
    "stddef.h",
    "errno.h",  # libc errno first: xs_wire.h only defines xsd_errors[] when EINVAL exists
    "xen/xen.h",
    "xen/errno.h",
    "xen/event_channel.h",
    "xen/vcpu.h",
    "xen/sched.h",
    "xen/hvm/hvm_op.h",
    "xen/hvm/params.h",
    "xen/version.h",
    "xen/features.h",
    "xen/memory.h",
    "xen/arch-x86/cpuid.h",
    "xen/io/xenbus.h",
    "xen/io/xs_wire.h",
]

# (enum, C prefix, members the 4.17 headers do not define)
FAMILIES: list[tuple[type[enum.IntEnum], str, set[str]]] = [
    (c.XenErrno, "XEN_", {"EINTR", "ERESTART"}),  # both #ifdef __XEN__ (hypervisor-internal)
    (c.DOMID, "DOMID_", set()),
    (c.Hypercall, "__HYPERVISOR_", set()),
    (c.EVTCHNOP, "EVTCHNOP_", set()),
    (c.EVTCHNSTAT, "EVTCHNSTAT_", set()),
    (c.VIRQ, "VIRQ_", set()),
    (c.VCPUOP, "VCPUOP_", set()),
    (c.RUNSTATE, "RUNSTATE_", set()),
    (c.SCHEDOP, "SCHEDOP_", set()),
    (c.SHUTDOWN, "SHUTDOWN_", set()),
    (c.HVMOP, "HVMOP_", set()),
    (c.HVM_PARAM, "HVM_PARAM_", set()),
    (c.HVM_PARAM_CALLBACK_TYPE, "HVM_PARAM_CALLBACK_TYPE_", set()),
    (c.XENVER, "XENVER_", set()),
    # 12 is commented out in the header; 18-20 arrived after 4.17.
    (
        c.XENFEAT,
        "XENFEAT_",
        {"grant_map_identity", "runstate_phys_area", "vcpu_time_phys_area", "dm_msix_all_writes"},
    ),
    (c.XENMEM, "XENMEM_", set()),
    (c.XENMAPSPACE, "XENMAPSPACE_", set()),
    (c.XEN_PVCLOCK, "XEN_PVCLOCK_", set()),
    (c.XEN_HVM_CPUID, "XEN_HVM_CPUID_", set()),
    (xs.XsType, "XS_", {"GET_FEATURE", "SET_FEATURE", "GET_QUOTA", "SET_QUOTA"}),
    (xs.XENSTORE_SERVER_FEATURE, "XENSTORE_SERVER_FEATURE_", set()),
    (xs.XENSTORE_ERROR, "XENSTORE_ERROR_", set()),
]

SCALARS: dict[str, int] = {
    "EVTCHN_2L_NR_CHANNELS": c.EVTCHN_2L_NR_CHANNELS,
    "NR_VIRQS": c.NR_VIRQS,
    "XEN_LEGACY_MAX_VCPUS": c.XEN_LEGACY_MAX_VCPUS,
    "BIND_PIRQ__WILL_SHARE": c.BIND_PIRQ__WILL_SHARE,
    "VCPU_SSHOTTMR_future": c.VCPU_SSHOTTMR_future,
    "SHUTDOWN_MAX": c.SHUTDOWN_MAX,
    "HVM_NR_PARAMS": c.HVM_NR_PARAMS,
    "HVM_PARAM_CALLBACK_IRQ_TYPE_MASK": c.HVM_PARAM_CALLBACK_IRQ_TYPE_MASK,
    "XENFEAT_NR_SUBMAPS": c.XENFEAT_NR_SUBMAPS,
    "XENMAPIDX_grant_table_status": c.XENMAPIDX_grant_table_status,
    "XEN_CPUID_FIRST_LEAF": c.XEN_CPUID_FIRST_LEAF,
    "XEN_CPUID_LEAF(4)": c.XEN_CPUID_LEAF(4),
    "XEN_CPUID_SIGNATURE_EBX": c.XEN_CPUID_SIGNATURE_EBX,
    "XEN_CPUID_SIGNATURE_ECX": c.XEN_CPUID_SIGNATURE_ECX,
    "XEN_CPUID_SIGNATURE_EDX": c.XEN_CPUID_SIGNATURE_EDX,
    "XEN_CPUID_MAX_NUM_LEAVES": c.XEN_CPUID_MAX_NUM_LEAVES,
    "XEN_CPUID_FEAT1_MMU_PT_UPDATE_PRESERVE_AD": c.XEN_CPUID_FEAT1_MMU_PT_UPDATE_PRESERVE_AD,
    "XEN_CPUID_MACHINE_ADDRESS_WIDTH_MASK": c.XEN_CPUID_MACHINE_ADDRESS_WIDTH_MASK,
    "XS_TYPE_COUNT": xs.XS_TYPE_COUNT,
    "XS_WATCH_PATH": xs.XS_WATCH_PATH,
    "XS_WATCH_TOKEN": xs.XS_WATCH_TOKEN,
    "XENSTORE_PAYLOAD_MAX": xs.XENSTORE_PAYLOAD_MAX,
    "XENSTORE_ABS_PATH_MAX": xs.XENSTORE_ABS_PATH_MAX,
    "XENSTORE_REL_PATH_MAX": xs.XENSTORE_REL_PATH_MAX,
    "XENSTORE_RING_SIZE": xs.XENSTORE_RING_SIZE,
    "MASK_XENSTORE_IDX(5000)": xs.MASK_XENSTORE_IDX(5000),
    "XENSTORE_CONNECTED": xs.XENSTORE_CONNECTION.CONNECTED,
    "XENSTORE_RECONNECT": xs.XENSTORE_CONNECTION.RECONNECT,
}

# Macros of a family's prefix that are deliberately not members: sub-operation
# numbers of multiplexed ops, counts and masks tested as scalars.
NOT_MEMBERS = re.compile(
    r"HVMOP_altp2m_\w+|HVMOP_ALTP2M_\w+|XENMEM_(paging|access|sharing)_op_\w+|"
    r"XENMEM_resource_\w+|XENMEM_[A-Z]\w+|HVM_PARAM_CALLBACK_IRQ_TYPE_MASK|__HYPERVISOR_VIRT_\w+|SHUTDOWN_MAX|XENFEAT_NR_SUBMAPS"
)


def _c_name(family: type[enum.IntEnum], prefix: str, member: str) -> str:
    if family is c.XenbusState:
        return f"XenbusState{member}"
    return prefix + member.rstrip("_")  # SCHEDOP.yield_ is SCHEDOP_yield


def _expected() -> dict[str, int]:
    table = dict(SCALARS)
    for family, prefix, missing in FAMILIES:
        for name, member in family.__members__.items():
            if name not in missing:
                table[_c_name(family, prefix, name)] = int(member)
    for member in c.XenbusState:  # canonical spellings only, not the upper-case aliases
        table[_c_name(c.XenbusState, "", member.name)] = int(member)
    return table


def _program(table: dict[str, int]) -> str:
    lines = ["#include <stdio.h>", "#include <string.h>"]
    lines += [f"#include <{h}>" for h in HEADERS]
    lines.append("int main(void) {")
    for expr in table:
        lines.append(f'  printf("%s %llu\\n", "{expr}", (unsigned long long)({expr}));')
    lines.append("  for (size_t i = 0; i < sizeof(xsd_errors) / sizeof(xsd_errors[0]); i++)")
    lines.append(
        '    printf("xsd_errors %s %d\\n", xsd_errors[i].errstring, xsd_errors[i].errnum);'
    )
    lines += ["  return 0;", "}"]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def c_output(tmp_path_factory) -> list[str]:
    workdir = tmp_path_factory.mktemp("constants")
    exe = compile_c(workdir, "constants.c", _program(_expected()))
    return subprocess.run(
        [exe], capture_output=True, text=True, check=True, timeout=30
    ).stdout.splitlines()


def test_every_value_matches_the_headers(c_output: list[str]) -> None:
    got = {}
    for line in c_output:
        if not line.startswith("xsd_errors "):
            name, value = line.rsplit(" ", 1)
            got[name] = int(value)
    expected = _expected()
    # Unsigned 64-bit print: negative Python values would show as 2**64 - x.
    mismatches = {k: (v, got.get(k)) for k, v in expected.items() if got.get(k) != v}
    assert not mismatches, mismatches
    assert len(got) == len(expected)


def test_xs_error_table_order_and_errnos_match_the_header(c_output: list[str]) -> None:
    rows = [line.split()[1:] for line in c_output if line.startswith("xsd_errors ")]
    assert [name for name, _ in rows] == list(xs.XS_ERRORS)
    for name, errnum in rows:
        assert xs.error_errno(name) == int(errnum)
        assert xs.error_name(int(errnum)) == name


@pytest.fixture(scope="module")
def header_macros(tmp_path_factory) -> dict[str, str]:
    """Object-like macros the headers define (gcc -dM -E), name -> replacement text."""
    require_xen_headers()
    src = tmp_path_factory.mktemp("macros") / "macros.c"
    src.write_text("".join(f"#include <{h}>\n" for h in HEADERS))
    out = subprocess.run(
        ["gcc", "-dM", "-E", "-D__XEN_TOOLS__", str(src)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    macros = {}
    for line in out.splitlines():
        m = re.match(r"#define (\w+) (.*)", line)
        if m:
            macros[m.group(1)] = m.group(2)
    return macros


@pytest.mark.parametrize(
    ("family", "prefix"),
    [(f, p) for f, p, _ in FAMILIES if p not in ("XEN_", "XS_")],  # those two are C enums
    ids=lambda v: v if isinstance(v, str) else v.__name__,
)
def test_family_covers_every_macro_of_its_prefix(
    family: type[enum.IntEnum], prefix: str, header_macros: dict[str, str]
) -> None:
    ours = {_c_name(family, prefix, name) for name in family.__members__}
    longer = [p for _, p, _ in FAMILIES if p != prefix and p.startswith(prefix)]
    theirs = set()
    for name, value in header_macros.items():
        if not name.startswith(prefix) or any(name.startswith(p) for p in longer):
            continue
        if NOT_MEMBERS.fullmatch(name) or re.fullmatch(r"[A-Za-z_]\w*", value.strip()):
            continue  # deliberately not a member, or an alias of another macro
        theirs.add(name)
    assert theirs, f"no {prefix}* macros found: wrong header list?"
    assert theirs <= ours, sorted(theirs - ours)


def test_per_vcpu_virqs_are_the_ones_xen_marks_v() -> None:
    require_xen_headers()
    xen_h = (XEN_INCLUDE / "xen.h").read_text()
    marked_v = {
        c.VIRQ[m.group(1)] for m in re.finditer(r"#define VIRQ_(\w+)\s+\d+\s+/\* V\.", xen_h)
    }
    assert marked_v == c.PER_VCPU_VIRQS


def test_xen_error_is_negative_errno() -> None:
    assert c.xen_error(c.XenErrno.EINVAL) == -22
    assert c.xen_error(c.XenErrno.ENOSYS) == -38
    assert c.xen_error(-c.XenErrno.ETIME) == -62


def test_callback_irq_type() -> None:
    vector = (c.HVM_PARAM_CALLBACK_TYPE.VECTOR << c.HVM_PARAM_CALLBACK_IRQ_TYPE_SHIFT) | 0xF3
    assert c.callback_irq_type(vector) == c.HVM_PARAM_CALLBACK_TYPE.VECTOR
    assert c.callback_irq_type(1) == c.HVM_PARAM_CALLBACK_TYPE.GSI
    assert c.HVM_PARAM_CALLBACK_IRQ_TYPE_MASK >> c.HVM_PARAM_CALLBACK_IRQ_TYPE_SHIFT == 0xFF


def test_xenbus_state_both_spellings_name_one_value() -> None:
    assert c.XenbusState.CONNECTED is c.XenbusState.Connected
    assert c.XenbusState(4).name == "Connected"
    assert [int(s) for s in c.XenbusState] == list(range(9))
