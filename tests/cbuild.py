"""Compile small C programs against the installed Xen headers for tests."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

XEN_INCLUDE = Path("/usr/include/xen")


def require_xen_headers() -> None:
    """Fail (not skip) when the headers are missing: the set-up installs them."""
    if not (XEN_INCLUDE / "io" / "ring.h").exists():
        pytest.fail(
            "libxen-dev headers missing: run the README's test command, which installs them"
        )
    if shutil.which("gcc") is None:
        pytest.fail("gcc missing")


def compile_c(workdir: Path, name: str, source: str, extra: list[str] | None = None) -> str:
    """Write ``source`` to ``workdir/name``, build it with gcc -O2 and return the binary path."""
    require_xen_headers()
    src = Path(workdir) / name
    src.write_text(source)
    exe = str(src.with_suffix(""))
    cmd = ["gcc", "-O2", "-Wall", "-D__XEN_TOOLS__", "-o", exe, str(src), *(extra or [])]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise AssertionError(f"gcc failed for {name}:\n{proc.stderr}")
    os.chmod(exe, 0o755)
    return exe
