"""The supervisor's control protocol (codec tags 700-719) and a client helper.

The supervisor of a host listens on ``Host.supervisor_endpoint``; the CLI
sends it these requests. Requests naming a service that the host does not run
get a ``no-such-service`` error reply; a service that does not come up again
gets ``start-failed`` with the tail of its log.

====  =====================  ==================================================
tag   request                reply
====  =====================  ==================================================
700   HostStatusRequest      HostStatusReply (702), holding ServiceState (701)
703   KillService            ServiceState: SIGKILL by PID, not restarted
704   RestartService         ServiceState: stop cleanly if alive, start, Ping
705   StopService            ServiceState: ShutdownRequest, SIGTERM, SIGKILL
706   PauseService           ServiceState: SIGSTOP
707   UnpauseService         ServiceState: SIGCONT
708   HostDown               Ack, once every service is gone and run files removed
====  =====================  ==================================================
"""

from __future__ import annotations

from typing import Any

from shared.codec import message
from shared.messages import StatusReply
from shared.transport import open_channel


class ServiceStates:
    """What ``ServiceState.state`` says about a service process."""

    STARTING = "starting"  # spawned, not answering Ping yet
    RUNNING = "running"  # answered Ping
    PAUSED = "paused"  # SIGSTOPped by PauseService
    KILLED = "killed"  # SIGKILLed by KillService
    STOPPED = "stopped"  # stopped on request (StopService, HostDown)
    EXITED = "exited"  # went away by itself (crash, error at start)
    NEVER_STARTED = "never-started"


@message(701)
class ServiceState:
    """One service of a host, as its supervisor sees it."""

    service: str
    endpoint: str
    pid: int  # the current or last process; 0 if never started
    state: str  # one of ServiceStates
    alive: bool  # the process exists (running, starting or paused)
    restarts: int  # starts after the first one
    uptime: float  # seconds since the current process was spawned (0 if dead)
    exit_code: int | None  # of the last process; negative: killed by that signal
    status: StatusReply | None  # the service's own StatusReply, None if it did not answer
    log: str  # its log file


@message(700)
class HostStatusRequest:
    pass


@message(702)
class HostStatusReply:
    host: str
    supervisor_pid: int
    uptime: float
    services: tuple[ServiceState, ...]


@message(703)
class KillService:
    service: str


@message(704)
class RestartService:
    service: str


@message(705)
class StopService:
    service: str


@message(706)
class PauseService:
    service: str


@message(707)
class UnpauseService:
    service: str


@message(708)
class HostDown:
    """Stop every service cleanly, remove the host's run files, then exit."""

    pass


async def control_call(endpoint: str, msg: Any, timeout: float = 10.0) -> Any:
    """One request to a supervisor; raises ``trio.TooSlowError`` if it is not
    reachable within ``timeout`` and the transport's errors otherwise (bare,
    not wrapped in the channel nursery's ExceptionGroup)."""
    failure: Exception | None = None
    async with open_channel(endpoint) as chan:
        try:
            await chan.wait_connected(timeout)
            reply = await chan.call(msg, timeout=timeout)
        except Exception as exc:
            failure = exc
    if failure is not None:
        raise failure
    return reply
