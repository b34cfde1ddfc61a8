"""Real clients against the real service process: Debian's ``xenstore-*`` tools
and ``pyxs`` on the Unix socket (``XENSTORED_PATH``), and our nng client bound
as dom0 and as a guest."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import pyxs
import trio

from services.xenstore.client import XsClientError, open_xs_client
from services.xenstore.messages import XsVouch, host_secret
from shared.transport import RemoteError

REPO = Path(__file__).resolve().parent.parent


class Xenstored:
    """``python -m services.xenstore`` in a short temporary run directory."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.topology = base / "topo.toml"
        self.topology.write_text(f'[run]\ndir = "{base}/run"\n[hosts.h]\nservices = ["xenstore"]\n')
        self.rundir = base / "run" / "h"
        self.sock = self.rundir / "xenstored.socket"
        self.endpoint = f"ipc://{self.rundir}/xenstore.sock"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services.xenstore", "--topology", str(self.topology)],
            cwd=REPO,
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "xenstored exited"
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(str(self.sock))
                return
            except OSError:
                time.sleep(0.02)
        raise TimeoutError("xenstored did not come up")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            self.proc.wait(10)

    @property
    def secret(self) -> bytes:
        return host_secret(self.rundir)

    def env(self) -> dict[str, str]:
        return {**os.environ, "XENSTORED_PATH": str(self.sock)}

    def tool(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            args, env=self.env(), capture_output=True, text=True, timeout=10, check=False
        )
        if check:
            assert result.returncode == 0, result
        return result


@pytest.fixture(scope="module")
def xenstored() -> Iterator[Xenstored]:
    base = Path(tempfile.mkdtemp(prefix="xsc", dir="/tmp"))
    daemon = Xenstored(base)
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.kill(signal.SIGTERM)
        shutil.rmtree(base, ignore_errors=True)


# --- Debian's xenstore-utils ------------------------------------------------------------


def test_write_read_exists(xenstored: Xenstored) -> None:
    x = xenstored
    assert x.tool("xenstore-write", "/cli/a", "hello", "/cli/b", "world").stdout == ""
    assert x.tool("xenstore-read", "/cli/a").stdout == "hello\n"
    assert x.tool("xenstore-read", "/cli/a", "/cli/b").stdout == "hello\nworld\n"
    assert x.tool("xenstore-exists", "/cli/a").returncode == 0
    missing = x.tool("xenstore-exists", "/cli/nope", check=False)
    assert missing.returncode == 1
    bad = x.tool("xenstore-read", "/cli/nope", check=False)
    assert bad.returncode == 1 and "couldn't read path /cli/nope" in bad.stderr


def test_list_and_ls(xenstored: Xenstored) -> None:
    x = xenstored
    x.tool("xenstore-write", "/ls/one", "1", "/ls/two", "2", "/ls/two/deep", "3")
    assert x.tool("xenstore-list", "/ls").stdout == "one\ntwo\n"
    assert x.tool("xenstore-ls", "/ls").stdout == 'one = "1"\ntwo = "2"\n deep = "3"\n'
    assert x.tool("xenstore-ls", "-f", "/ls").stdout == (
        '/ls/one = "1"\n/ls/two = "2"\n/ls/two/deep = "3"\n'
    )
    assert x.tool("xenstore-list", "/ls/nope", check=False).returncode == 1


def test_chmod_and_rm(xenstored: Xenstored) -> None:
    x = xenstored
    x.tool("xenstore-write", "/perm/a", "v")
    x.tool("xenstore-chmod", "/perm/a", "n0", "r5")
    line = x.tool("xenstore-ls", "-p", "/perm").stdout
    assert line.startswith('a = "v"') and line.rstrip().endswith("(n0,r5)")
    x.tool("xenstore-rm", "/perm/a")
    assert x.tool("xenstore-exists", "/perm/a", check=False).returncode == 1
    assert x.tool("xenstore-rm", "/perm/nope/deeper", check=False).returncode == 1
    x.tool("xenstore-rm", "/perm")


def test_watch(xenstored: Xenstored) -> None:
    x = xenstored
    watcher = subprocess.Popen(
        ["xenstore-watch", "-n", "2", "/watched"],
        env=x.env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert watcher.stdout is not None
        assert watcher.stdout.readline() == "/watched\n"  # the immediate event
        x.tool("xenstore-write", "/watched/child", "1")
        out, _ = watcher.communicate(timeout=10)
        assert out == "/watched/child\n"
        assert watcher.returncode == 0
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait()


def test_relative_path_from_socket_is_dom0_home(xenstored: Xenstored) -> None:
    x = xenstored
    x.tool("xenstore-write", "rel/key", "r")
    assert x.tool("xenstore-read", "/local/domain/0/rel/key").stdout == "r\n"


# --- pyxs -----------------------------------------------------------------------------


def test_pyxs(xenstored: Xenstored) -> None:
    with pyxs.Client(unix_socket_path=str(xenstored.sock)) as c:
        c[b"/pyxs/a"] = b"1"
        assert c[b"/pyxs/a"] == b"1"
        c.mkdir(b"/pyxs/dir")
        assert sorted(c.list(b"/pyxs")) == [b"a", b"dir"]
        assert c.get_perms(b"/pyxs/a") == [b"n0"]
        c.set_perms(b"/pyxs/a", [b"b0", b"r5"])
        assert c.get_perms(b"/pyxs/a") == [b"b0", b"r5"]
        assert c.get_domain_path(999) == b"/local/domain/999"
        assert c.exists(b"/pyxs/a") and not c.exists(b"/pyxs/none")
        with pytest.raises(pyxs.PyXSError):
            c[b"/pyxs/none"]
        c.delete(b"/pyxs/dir")
        assert c.list(b"/pyxs") == [b"a"]


def test_pyxs_transaction(xenstored: Xenstored) -> None:
    with (
        pyxs.Client(unix_socket_path=str(xenstored.sock)) as c,
        pyxs.Client(unix_socket_path=str(xenstored.sock)) as other,
    ):
        c.transaction()
        c[b"/pytx/k"] = b"inside"
        assert not other.exists(b"/pytx/k")  # isolated until commit
        assert c.commit() is True
        assert other[b"/pytx/k"] == b"inside"
        # a conflicting transaction: commit says False (EAGAIN)
        c.transaction()
        assert c[b"/pytx/k"] == b"inside"
        other[b"/pytx/k"] = b"outside"
        c[b"/pytx/k"] = b"late"
        assert c.commit() is False
        assert other[b"/pytx/k"] == b"outside"


def test_pyxs_monitor(xenstored: Xenstored) -> None:
    with (
        pyxs.Client(unix_socket_path=str(xenstored.sock)) as c,
        pyxs.Client(unix_socket_path=str(xenstored.sock)) as writer,
    ):
        m = c.monitor()
        m.watch(b"/mon", b"tok")
        events = m.wait()
        assert next(events) == (b"/mon", b"tok")
        writer[b"/mon/child"] = b"x"
        assert next(events) == (b"/mon/child", b"tok")
        m.unwatch(b"/mon", b"tok")


# --- nng: dom0 services and guests ------------------------------------------------------


async def test_nng_guest_is_confined(xenstored: Xenstored) -> None:
    x = xenstored
    with trio.fail_after(15):
        async with open_xs_client(x.endpoint, 0, x.secret) as dom0:
            from shared.abi import xs_wire as w

            await dom0.request(w.introduce(12, 1, 1, req_id=dom0.next_id()))
            await dom0.write("/secret/plans", b"private")
            token = b"guest-12-token-0123456789"
            await dom0.chan.call(XsVouch(12, token))
            async with open_xs_client(x.endpoint, 12, token) as guest:
                assert await guest.read("domid") == b"12"
                await guest.write("data/hello", b"world")
                assert await dom0.read("/local/domain/12/data/hello") == b"world"
                for attempt in (guest.read("/secret/plans"), guest.read("/secret/none")):
                    with pytest.raises(XsClientError) as err:
                        await attempt
                    assert err.value.name == "EACCES"
                with pytest.raises(XsClientError) as err:
                    await guest.write("/local/domain/0/x", b"evil")
                assert err.value.name == "EACCES"
                with pytest.raises(XsClientError) as err:
                    await guest.request(w.introduce(13, 1, 1, req_id=guest.next_id()))
                assert err.value.name == "EACCES"
                await guest.watch("control/shutdown", "sd")
                assert await guest.event() == (b"control/shutdown", b"sd")
                await dom0.write("/local/domain/12/control/shutdown", b"poweroff")
                assert await guest.event() == (b"control/shutdown", b"sd")
                # the token proves domid 12 only; a guest cannot vouch for others
                with pytest.raises(RemoteError):
                    await guest.chan.call(XsVouch(13, b"x" * 20))
            with pytest.raises(RemoteError):
                async with open_xs_client(x.endpoint, 13, token):
                    pass
            with pytest.raises(RemoteError):
                async with open_xs_client(x.endpoint, 0, b"not the secret"):
                    pass
