"""How the toolstack shows things: rich tables for people, JSON for scripts."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console
from rich.table import Table

from services.toolstack._protocol import HostStatusReply, ServiceState

_STATE_STYLE = {
    "running": "green",
    "starting": "yellow",
    "paused": "yellow",
    "killed": "red",
    "exited": "red",
    "stopped": "dim",
}


def console() -> Console:
    """A console for stdout; wide when it is not a terminal, so a log or a pipe
    gets whole endpoint paths instead of ellipses."""
    out = Console()
    if not out.is_terminal:
        out = Console(width=200)
    return out


def print_json(data: Any) -> None:
    json.dump(data, sys.stdout, sort_keys=True, default=str)
    sys.stdout.write("\n")
    sys.stdout.flush()


def requests_served(state: ServiceState) -> int | None:
    """Requests the service's transport server has answered, if it said."""
    if state.status is None:
        return None
    transport = state.status.stats.get("transport", {})
    return transport.get("requests") if isinstance(transport, dict) else None


def service_json(state: ServiceState) -> dict[str, Any]:
    data = {
        "service": state.service,
        "endpoint": state.endpoint,
        "pid": state.pid,
        "state": state.state,
        "alive": state.alive,
        "restarts": state.restarts,
        "uptime": round(state.uptime, 3),
        "exit_code": state.exit_code,
        "log": state.log,
        "status": None,
    }
    if state.status is not None:
        data["status"] = {
            "service": state.status.service,
            "pid": state.status.pid,
            "uptime": state.status.uptime,
            "stats": state.status.stats,
        }
    return data


def host_json(reply: HostStatusReply) -> dict[str, Any]:
    return {
        "host": reply.host,
        "up": True,
        "supervisor_pid": reply.supervisor_pid,
        "uptime": round(reply.uptime, 3),
        "services": [service_json(s) for s in reply.services],
    }


def _uptime(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 3600:
        return f"{seconds // 60}:{seconds % 60:02d}"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def host_table(reply: HostStatusReply) -> Table:
    """One row per service: the table of ``host status`` and the demo."""
    table = Table(
        title=f"host {reply.host} — supervisor pid {reply.supervisor_pid}, up {_uptime(reply.uptime)}",
        title_justify="left",
    )
    table.add_column("service")
    table.add_column("state")
    table.add_column("pid", justify="right")
    table.add_column("endpoint", overflow="fold")
    table.add_column("uptime", justify="right")
    table.add_column("requests", justify="right")
    table.add_column("restarts", justify="right")
    for s in reply.services:
        style = _STATE_STYLE.get(s.state, "")
        served = requests_served(s)
        state = s.state if s.exit_code is None or s.alive else f"{s.state} ({s.exit_code})"
        table.add_row(
            s.service,
            f"[{style}]{state}[/]" if style else state,
            str(s.pid) if s.pid else "-",
            s.endpoint,
            _uptime(s.uptime) if s.alive else "-",
            "-" if served is None else str(served),
            str(s.restarts),
        )
    return table


def service_line(state: ServiceState) -> str:
    """One line for the verbs that act on a single service."""
    alive = "alive" if state.alive else "not running"
    return f"{state.service}: {state.state}, pid {state.pid or '-'} ({alive}), restarts {state.restarts}"


def print_rows(columns: list[str], rows: list[dict[str, Any]]) -> None:
    """A plain table of ``rows`` (dicts) with the given columns."""
    table = Table(box=None, header_style="bold")
    for c in columns:
        table.add_column(c)
    for row in rows:
        table.add_row(*("" if row.get(c) is None else str(row.get(c)) for c in columns))
    console().print(table)
