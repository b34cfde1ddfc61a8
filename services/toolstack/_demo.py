"""``domsplit demo``: one host's services in the foreground; two guests, the
same kernel on ``xen`` and on ``xen-legacy``, run their timer and IPI
workloads and the demo shows where their interrupts went and what exits they
cost; then a live status table. Ctrl-C stops everything and exits 0.

On a terminal the table refreshes in place every ``--interval`` seconds. With
no terminal (CI, a pipe) each refresh prints the table again, after a line
``domsplit demo: host NAME up`` — less often by default, to keep logs short.
"""

from __future__ import annotations

import argparse
import sys

import trio
from rich.live import Live

from services.toolstack import _render, _showcase, supervisor
from services.toolstack._registry import arg, json_arg, topology_args, topology_path, verb
from shared.topology import TopologyError, load

NO_TERMINAL_INTERVAL = 10.0


@verb("demo", help="bring the default host up in the foreground and show its status (Ctrl-C stops)")
@topology_args
@arg(
    "--interval",
    type=float,
    default=None,
    help="seconds between refreshes (1, or 10 with no terminal)",
)
@arg(
    "--timeout",
    type=float,
    default=supervisor.READY_TIMEOUT,
    help="seconds each service gets to answer Ping",
)
@arg("--no-guests", action="store_true", help="only the services, no demo guests")
@json_arg
def demo(args: argparse.Namespace) -> int:
    try:
        topo = load(topology_path(args))
        host = topo.host(args.host)
    except TopologyError as exc:
        print(f"domsplit: error: {exc}", file=sys.stderr)
        return 1
    console = _render.console()
    interval = args.interval or (1.0 if console.is_terminal else NO_TERMINAL_INTERVAL)

    async def show(sup: supervisor.Supervisor) -> None:
        if not args.json:
            console.print(
                f"domsplit demo: host {host.name} up, {len(sup.children)} services; "
                "Ctrl-C stops them all"
            )
        if not args.no_guests and {"hypervisor", "xenstore"} <= set(host.services):
            try:
                summaries = await _showcase.run_guests(host, None if args.json else console)
            except Exception as exc:  # the host stays up for a look even so
                print(f"domsplit demo: guests failed: {exc!r}", file=sys.stderr)
            else:
                if args.json:
                    _render.print_json({"guests": summaries})
        if console.is_terminal and not args.json:
            with Live(console=console, auto_refresh=False) as live:  # no refresh thread
                while not sup.down_requested.is_set():
                    live.update(_render.host_table(await sup.status()), refresh=True)
                    await trio.sleep(interval)
        while not sup.down_requested.is_set():
            reply = await sup.status()
            if sup.down_requested.is_set():
                return  # stopping: the services are going away
            if args.json:
                _render.print_json(_render.host_json(reply))
            else:
                console.print(_render.host_table(reply))
                sys.stdout.flush()
            await trio.sleep(interval)

    if not args.json:
        console.print(f"domsplit demo: starting host {host.name} from {topo.source}")
    try:
        trio.run(lambda: supervisor.run(topo, host.name, ready_timeout=args.timeout, on_ready=show))
    except (supervisor.StartFailed, supervisor.AlreadyUp) as exc:
        print(f"domsplit: error: {exc}", file=sys.stderr)
        return 1
    if not args.json:
        console.print(f"domsplit demo: host {host.name} stopped")
    return 0
