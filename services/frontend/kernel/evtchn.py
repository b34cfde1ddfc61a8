"""The guest side of event channels: the upcall handler's scan and the port
table (FreeBSD ``xen_intr.c``), sans-IO over the real ``shared_info`` bytes.

:class:`UpcallScanner` does ``xen_intr_handle_upcall``: clear
``evtchn_upcall_pending``, take ``evtchn_pending_sel``, and walk the words and
bits it names *round-robin*, resuming after the last port handled, so a busy
low port cannot starve a high one. A port is active when it is pending, not
masked and serviced by this CPU (``mine``, FreeBSD's per-CPU enabled bits).
Each active port's pending bit is cleared just before it is handed out
(edge semantics: sends before that merged into this one).
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator

from services.frontend.kernel.state import PortBinding, UpcallState
from shared.abi import sharedinfo as si

NR_WORDS = 64


class UpcallScanner:
    """One CPU's upcall handler state: where the last scan stopped, counters."""

    def __init__(
        self,
        shared: memoryview | bytearray,
        vcpu_info: tuple[memoryview | bytearray, int],
        mine: Callable[[int], bool],
    ) -> None:
        self.shared = shared
        self.vbuf, self.voff = vcpu_info
        self.mine = mine
        self.last_l1i = NR_WORDS - 1
        self.last_l2i = 63
        self.upcalls = 0
        self.per_port: collections.Counter[int] = collections.Counter()
        self.apic: collections.Counter[int] = collections.Counter()
        self.stray = 0

    def _active(self, word: int) -> int:
        bits = si.pending_word(self.shared, word)
        if not bits:
            return 0
        active = 0
        while bits:
            low = bits & -bits
            bits ^= low
            if self.mine(word * 64 + low.bit_length() - 1):
                active |= low
        return active

    def scan(self) -> Iterator[int]:
        """Ports to dispatch, in fair order; each one's pending bit is already clear."""
        self.upcalls += 1
        si.set_upcall_pending(self.vbuf, self.voff, False)  # first, as Xen expects
        l1 = si.take_pending_sel(self.vbuf, self.voff)
        if not l1:
            self.stray += 1
            return
        found = False
        l1i, l2i = self.last_l1i, self.last_l2i + 1
        if l2i == 64:
            l1i, l2i = (l1i + 1) % NR_WORDS, 0
        while l1:
            masked = l1 & (~0 << l1i) & ((1 << NR_WORDS) - 1)
            if not masked:  # wrap around to word 0
                l1i, l2i = 0, 0
                masked = l1
            low = masked & -masked
            l1i = low.bit_length() - 1
            while True:
                active = self._active(l1i) & (~0 << l2i)
                if not active:
                    break
                lowbit = active & -active
                l2i = lowbit.bit_length() - 1
                port = l1i * 64 + l2i
                if si.evtchn_clear_pending(self.shared, port):
                    self.per_port[port] += 1
                    self.last_l1i, self.last_l2i = l1i, l2i
                    found = True
                    yield port
                l2i += 1
                if l2i == 64:
                    break
            if not self._active(l1i):  # drop the word only when nothing active remains
                l1 &= ~(1 << l1i)
            l1i, l2i = (l1i + 1) % NR_WORDS, 0
        if not found:
            self.stray += 1

    def state(self) -> UpcallState:
        return UpcallState(
            self.last_l1i,
            self.last_l2i,
            self.upcalls,
            dict(self.per_port),
            dict(self.apic),
            self.stray,
        )


class PortTable:
    """The ports this CPU bound or knows (``port_to_isrc``)."""

    def __init__(self) -> None:
        self.bindings: dict[int, PortBinding] = {}

    def add(self, binding: PortBinding) -> None:
        self.bindings[binding.port] = binding

    def get(self, port: int) -> PortBinding | None:
        return self.bindings.get(port)

    def of_kind(self, kind: str) -> list[PortBinding]:
        return [b for b in self.bindings.values() if b.kind == kind]

    def state(self) -> tuple[PortBinding, ...]:
        return tuple(self.bindings[p] for p in sorted(self.bindings))
