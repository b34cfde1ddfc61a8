"""The guest kernel: one GENERIC kernel instance per vCPU process.

vCPU0 detects the platform (bare / legacy Xen / full PVHVM) and sets it up,
the APs come up after it, and each CPU then takes its own interrupts: event
channel upcalls (fair scan, per-port counters), PV or emulated timer
interrupts driving a per-CPU callout wheel, PV or emulated IPIs with
bitmap sub-IPIs and call-function mailboxes in guest RAM. See
:mod:`.layout` for what the processes share, :mod:`.config` for the
configuration and workloads, :mod:`.report` for the report file.
"""
