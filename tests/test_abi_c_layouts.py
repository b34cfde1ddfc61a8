"""Every registered layout against the C compiler's answer from the real headers.

The test generates one C program that includes the installed Xen 4.17 headers
(``libxen-dev``) and prints ``sizeof`` and ``offsetof`` for every struct and
member our ``shared.abi`` modules declare, then compares line by line.
"""

from __future__ import annotations

import importlib
import subprocess

import pytest

from shared.abi import _layout
from tests.cbuild import compile_c

ABI_MODULES = [
    "shared.abi.ring",
    "shared.abi.blkif",
    "shared.abi.netif",
    "shared.abi.grant",
    "shared.abi.xs_wire",
    "shared.abi.sharedinfo",
    "shared.abi.hypercall",
]

REQUIRED = {
    "struct blkif_sring",
    "struct blkif_request",
    "struct blkif_response",
    "struct blkif_request_indirect",
    "struct blkif_request_segment",
    "struct netif_tx_request",
    "struct netif_tx_response",
    "struct netif_rx_request",
    "struct netif_rx_response",
    "struct grant_entry_v1",
    "struct xsd_sockmsg",
}


def _layouts() -> list[_layout.Layout]:
    for name in ABI_MODULES:
        importlib.import_module(name)
    seen: dict[str, _layout.Layout] = {}
    for lay in _layout.registered():
        seen.setdefault(lay.c_type, lay)
    return list(seen.values())


def _program(layouts: list[_layout.Layout]) -> str:
    headers = sorted({lay.header for lay in layouts})
    lines = [
        "#include <stdio.h>",
        "#include <stddef.h>",
        "#include <stdint.h>",
        "#include <xen/xen.h>",
    ]
    lines += [f"#include <{h}>" for h in headers]
    lines.append("int main(void) {")
    for lay in layouts:
        lines.append(f'  printf("sizeof %s %zu\\n", "{lay.c_type}", sizeof({lay.c_type}));')
        for member, _ in lay.checked_offsets():
            lines.append(
                f'  printf("%s %s %zu\\n", "{lay.c_type}", "{member}", offsetof({lay.c_type}, {member}));'
            )
    lines += ["  return 0;", "}"]
    return "\n".join(lines) + "\n"


def test_required_structures_are_declared() -> None:
    declared = {lay.c_type for lay in _layouts()}
    assert REQUIRED <= declared, REQUIRED - declared


def test_sizes_and_offsets_match_real_headers(tmp_path) -> None:
    layouts = _layouts()
    exe = compile_c(tmp_path, "layouts.c", _program(layouts))
    out = subprocess.run([exe], capture_output=True, text=True, check=True, timeout=30).stdout
    c_answer = dict(line.rsplit(" ", 1) for line in out.splitlines())
    mismatches = []
    for lay in layouts:
        c_size = int(c_answer[f"sizeof {lay.c_type}"])
        if c_size != lay.size:
            mismatches.append(f"{lay.c_type}: size {lay.size} != C {c_size}")
        for member, offset in lay.checked_offsets():
            c_off = int(c_answer[f"{lay.c_type} {member}"])
            if c_off != offset:
                mismatches.append(f"{lay.c_type}.{member}: offset {offset} != C {c_off}")
    assert not mismatches, "\n".join(mismatches)
    assert len(c_answer) >= sum(1 + len(list(lay.checked_offsets())) for lay in layouts)


@pytest.mark.parametrize("c_type", sorted(REQUIRED))
def test_each_required_structure_has_offsets(c_type: str) -> None:
    lay = {lay.c_type: lay for lay in _layouts()}[c_type]
    assert list(lay.checked_offsets()), f"{c_type} declares no checked members"
