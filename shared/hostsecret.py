"""The host secret: a random token in the run directory (mode 0600).

Whoever can read it is a dom0 service of this host (toolstack, backends,
tests acting as dom0). Guest vCPU processes are never told it: each gets a
token of its own from the hypervisor that binds it to one (domid, vCPU).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

SECRET_FILE = "host.secret"


def host_secret(rundir: Path, *, create: bool = False) -> str:
    """The secret in ``rundir``; made (atomically, 0600) if ``create`` and missing."""
    path = Path(rundir) / SECRET_FILE
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        if not create:
            raise
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    try:
        os.link(tmp, path)  # first writer wins; later ones read its secret
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return path.read_text().strip()
