"""Where the guest kernel keeps what its vCPU processes share: guest RAM.

The vCPU processes of one domain share no Python memory, only the domain's RAM
file, so every piece of kernel state another CPU must see lives in a page of
it, at a fixed place. There are no atomic read-modify-write operations across
processes here, so the rule is **one writer per word**: each word below names
the only CPU that writes it, and where many CPUs must signal one (sub-IPIs,
call-function work) each sender writes its own counter or its own ring.

=========================  ==========  ====================================================
gfn                        writer      contents
=========================  ==========  ====================================================
0 ``GLOBALS_GFN``          vCPU0       boot stage, platform decision, nr_vcpus, park
                                       generation (odd: APs must park; FreeBSD's
                                       ``started_cpus`` in reverse)
1 ``DEVTAB_GFN``           vCPU0       device-port table: per port a u32 mask of the CPUs
                                       that service it (FreeBSD's per-CPU enabled bits)
2 ``SHARED_INFO_GFN``      Xen+guest   ``struct shared_info`` (XENMEM_add_to_physmap)
3 + k (per-CPU page)       CPU k       vcpu_info (registered, offset 0), state, clamp
                                       word, IPI/timer ports, sub-IPI counters it sent
                                       and sub-IPI counters it has seen
3 + V ... (mailboxes)      see ring    one SPSC ring per (sender, receiver): the sender
                                       writes ``prod`` and slots, the receiver ``cons``
=========================  ==========  ====================================================
"""

from __future__ import annotations

import enum
import struct

import attrs

from shared.guestmem import PAGE_SIZE

GLOBALS_GFN, DEVTAB_GFN, SHARED_INFO_GFN, PERCPU_BASE_GFN = 0, 1, 2, 3
GLOBALS_MAGIC = 0x6B65726E656C0001  # "kernel" v1
MAX_VCPUS = 32
MAX_DEVICE_PORT = PAGE_SIZE // 4 - 1  # the device table holds one u32 per port
NR_BITMAP_BITS = 8
MAX_IPI_PORTS = 16

# --- globals page (vCPU0 writes) -------------------------------------------------------------
_G_HEAD = struct.Struct("<QIIIIIIIIII")  # magic, stage, mode, flags, features, version,
# nr_vcpus, shared_info_gfn, cpuid_base, nmi_mode, boot_seq
_G_PARK = 128  # u32 park generation: vCPU0 makes it odd to park the APs, even to release

# --- per-CPU page (CPU k writes) -------------------------------------------------------------
VCPU_INFO_OFFSET = 0
_P_STATE = 64  # u32 state, u32 apic id
_P_CLAMP = 72  # u64 last clock value this CPU returned (the global clamp, per writer)
_P_TIMER_PORT = 80  # u32
_P_NR_IPI = 84  # u32
_P_IPI_PORTS = 88  # u32 x MAX_IPI_PORTS
_P_SENT = 256  # u32 [receiver][bit]: sub-IPIs this CPU sent to each receiver
_P_SEEN = _P_SENT + MAX_VCPUS * NR_BITMAP_BITS * 4  # u32 [sender][bit]: sub-IPIs taken
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")

# --- mailboxes -------------------------------------------------------------------------------
RING_BYTES = 512
_R_PROD, _R_CONS, _R_SLOTS = 0, 64, 128  # prod and cons on separate cache lines
SLOT = struct.Struct("<IIQQQ")  # func, seq, a, b, c
RING_SLOTS = (RING_BYTES - _R_SLOTS) // SLOT.size


class Stage(enum.IntEnum):
    """How far vCPU0 got (``GLOBALS.stage``); APs wait for PLATFORM."""

    NONE = 0
    PLATFORM = 1  #: platform chosen, shared_info mapped, callback set
    SMP = 2  #: every AP online, device ports balanced
    DEVICES = 3  #: xenbus probed (or no xenbus): boot finished


class CpuState(enum.IntEnum):
    OFFLINE = 0
    BOOTING = 1
    ONLINE = 2
    PARKED = 3
    HALTED = 4


@attrs.frozen
class Globals:
    stage: int
    mode: int
    flags: int
    features: int
    version: int
    nr_vcpus: int
    shared_info_gfn: int
    cpuid_base: int
    nmi_mode: int
    boot_seq: int


def pages_needed(nr_vcpus: int) -> int:
    ring_bytes = nr_vcpus * nr_vcpus * RING_BYTES
    return PERCPU_BASE_GFN + nr_vcpus + -(-ring_bytes // PAGE_SIZE)


def percpu_gfn(cpu: int) -> int:
    return PERCPU_BASE_GFN + cpu


class KernelMemory:
    """Typed accessors over the guest RAM buffer (an mmap view or a bytearray)."""

    def __init__(self, ram: memoryview | bytearray, nr_vcpus: int) -> None:
        if not 1 <= nr_vcpus <= MAX_VCPUS:
            raise ValueError(f"1..{MAX_VCPUS} vCPUs")
        if len(ram) < pages_needed(nr_vcpus) * PAGE_SIZE:
            raise ValueError(f"guest RAM too small: need {pages_needed(nr_vcpus)} pages")
        self.ram = ram
        self.nr_vcpus = nr_vcpus
        self._mailbox_base = (PERCPU_BASE_GFN + nr_vcpus) * PAGE_SIZE

    # --- globals ---------------------------------------------------------------------------
    def write_globals(self, g: Globals) -> None:
        _G_HEAD.pack_into(self.ram, GLOBALS_GFN * PAGE_SIZE, GLOBALS_MAGIC, *attrs.astuple(g))

    def read_globals(self) -> Globals | None:
        magic, *fields = _G_HEAD.unpack_from(self.ram, GLOBALS_GFN * PAGE_SIZE)
        return Globals(*fields) if magic == GLOBALS_MAGIC else None

    def set_stage(self, stage: Stage) -> None:
        _U32.pack_into(self.ram, GLOBALS_GFN * PAGE_SIZE + 8, int(stage))

    def stage(self) -> int:
        if _U64.unpack_from(self.ram, GLOBALS_GFN * PAGE_SIZE)[0] != GLOBALS_MAGIC:
            return Stage.NONE
        return _U32.unpack_from(self.ram, GLOBALS_GFN * PAGE_SIZE + 8)[0]

    def park_generation(self) -> int:
        return _U32.unpack_from(self.ram, GLOBALS_GFN * PAGE_SIZE + _G_PARK)[0]

    def set_park_generation(self, gen: int) -> None:
        _U32.pack_into(self.ram, GLOBALS_GFN * PAGE_SIZE + _G_PARK, gen & 0xFFFFFFFF)

    # --- device-port table -----------------------------------------------------------------
    def port_cpus(self, port: int) -> int:
        """Mask of the CPUs that service device port ``port`` (0: not a device port)."""
        if not 0 < port <= MAX_DEVICE_PORT:
            return 0
        return _U32.unpack_from(self.ram, DEVTAB_GFN * PAGE_SIZE + 4 * port)[0]

    def set_port_cpus(self, port: int, mask: int) -> None:
        if not 0 < port <= MAX_DEVICE_PORT:
            raise ValueError(f"device port {port} outside the table")
        _U32.pack_into(self.ram, DEVTAB_GFN * PAGE_SIZE + 4 * port, mask)

    # --- per-CPU ---------------------------------------------------------------------------
    def _pc(self, cpu: int) -> int:
        if not 0 <= cpu < self.nr_vcpus:
            raise ValueError(f"no CPU {cpu}")
        return percpu_gfn(cpu) * PAGE_SIZE

    def vcpu_info_at(self, cpu: int) -> int:
        """Byte offset in RAM of CPU ``cpu``'s registered vcpu_info."""
        return self._pc(cpu) + VCPU_INFO_OFFSET

    def cpu_state(self, cpu: int) -> int:
        return _U32.unpack_from(self.ram, self._pc(cpu) + _P_STATE)[0]

    def set_cpu_state(self, cpu: int, state: CpuState) -> None:
        _U32.pack_into(self.ram, self._pc(cpu) + _P_STATE, int(state))

    def clamp(self, cpu: int) -> int:
        return _U64.unpack_from(self.ram, self._pc(cpu) + _P_CLAMP)[0]

    def set_clamp(self, cpu: int, value: int) -> None:
        _U64.pack_into(self.ram, self._pc(cpu) + _P_CLAMP, value)

    def publish_ports(self, cpu: int, timer_port: int, ipi_ports: tuple[int, ...]) -> None:
        if len(ipi_ports) > MAX_IPI_PORTS:
            raise ValueError("too many IPI ports")
        base = self._pc(cpu)
        _U32.pack_into(self.ram, base + _P_TIMER_PORT, timer_port)
        _U32.pack_into(self.ram, base + _P_NR_IPI, len(ipi_ports))
        struct.pack_into(f"<{len(ipi_ports)}I", self.ram, base + _P_IPI_PORTS, *ipi_ports)

    def ipi_ports(self, cpu: int) -> tuple[int, ...]:
        base = self._pc(cpu)
        n = min(_U32.unpack_from(self.ram, base + _P_NR_IPI)[0], MAX_IPI_PORTS)
        return struct.unpack_from(f"<{n}I", self.ram, base + _P_IPI_PORTS)

    def timer_port(self, cpu: int) -> int:
        return _U32.unpack_from(self.ram, self._pc(cpu) + _P_TIMER_PORT)[0]

    # --- bitmap sub-IPIs: per-sender counters -----------------------------------------------
    def sent(self, sender: int, receiver: int, bit: int) -> int:
        at = self._pc(sender) + _P_SENT + 4 * (receiver * NR_BITMAP_BITS + bit)
        return _U32.unpack_from(self.ram, at)[0]

    def bump_sent(self, sender: int, receiver: int, bit: int) -> None:
        """The sender's own counter: no other CPU writes it."""
        at = self._pc(sender) + _P_SENT + 4 * (receiver * NR_BITMAP_BITS + bit)
        _U32.pack_into(self.ram, at, (_U32.unpack_from(self.ram, at)[0] + 1) & 0xFFFFFFFF)

    def seen(self, receiver: int, sender: int, bit: int) -> int:
        at = self._pc(receiver) + _P_SEEN + 4 * (sender * NR_BITMAP_BITS + bit)
        return _U32.unpack_from(self.ram, at)[0]

    def set_seen(self, receiver: int, sender: int, bit: int, value: int) -> None:
        at = self._pc(receiver) + _P_SEEN + 4 * (sender * NR_BITMAP_BITS + bit)
        _U32.pack_into(self.ram, at, value & 0xFFFFFFFF)

    # --- call-function mailboxes: SPSC rings ------------------------------------------------
    def _ring(self, sender: int, receiver: int) -> int:
        if not (0 <= sender < self.nr_vcpus and 0 <= receiver < self.nr_vcpus):
            raise ValueError("no such ring")
        return self._mailbox_base + (receiver * self.nr_vcpus + sender) * RING_BYTES

    def ring_indices(self, sender: int, receiver: int) -> tuple[int, int]:
        at = self._ring(sender, receiver)
        return _U32.unpack_from(self.ram, at + _R_PROD)[0], _U32.unpack_from(
            self.ram, at + _R_CONS
        )[0]

    def ring_put(self, sender: int, receiver: int, slot: tuple[int, int, int, int, int]) -> bool:
        """Sender side: False when the ring is full (the receiver has not caught up)."""
        at = self._ring(sender, receiver)
        prod, cons = self.ring_indices(sender, receiver)
        if (prod - cons) & 0xFFFFFFFF >= RING_SLOTS:
            return False
        SLOT.pack_into(self.ram, at + _R_SLOTS + (prod % RING_SLOTS) * SLOT.size, *slot)
        _U32.pack_into(self.ram, at + _R_PROD, (prod + 1) & 0xFFFFFFFF)  # publish after the slot
        return True

    def ring_take(self, sender: int, receiver: int) -> list[tuple[int, int, int, int, int]]:
        """Receiver side: every slot published so far, consumed."""
        at = self._ring(sender, receiver)
        prod, cons = self.ring_indices(sender, receiver)
        out = []
        while cons != prod:
            out.append(SLOT.unpack_from(self.ram, at + _R_SLOTS + (cons % RING_SLOTS) * SLOT.size))
            cons = (cons + 1) & 0xFFFFFFFF
        _U32.pack_into(self.ram, at + _R_CONS, cons)
        return out
