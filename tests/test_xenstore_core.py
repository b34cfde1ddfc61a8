"""The xenstored core, table-driven: ``(connection-as-domid, tx, request, expected)``.

Scenarios are translated from the suites peers.md lists: QEMU's test-xs-node,
ocaml-xenstore's server_test, oxenstored's unit tests, and the 2005 Xen
testsuite's watch/transaction/permission scripts. Where implementations
disagree the expectation follows C xenstored 4.17 and a comment says so.

After every step that changes the store the whole store is serialised,
deserialised and compared (what must survive restart and migration), the
journal records are replayed into a fresh core and compared, and the node
counts are checked against the tree (QEMU's live-object counter).
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from services.xenstore.control import check
from services.xenstore.core import XenStore
from services.xenstore.store import Store
from shared.abi import xs_wire as w
from shared.abi.xs_wire import XsMessage, XsType, parse_perms

# --- the harness -----------------------------------------------------------------


def P(text: str) -> list[w.Perm]:  # noqa: N802 - reads like the spec's notation
    return parse_perms(text)


class Perms:
    """Expect a GET_PERMS reply."""

    def __init__(self, text: str) -> None:
        self.payload = w.format_perms(P(text))


class Harness:
    """Connections named by domid (``1``) or domid and label (``"0:b"``)."""

    def __init__(self) -> None:
        self.xs = XenStore()
        self.conns: dict[Any, Any] = {}
        self.txs: dict[str, int] = {}
        self.events: dict[Any, list[tuple[str, str]]] = {}
        self.req_id = 0
        self.journal: list[list[Any]] = []
        self.base_nodes = self.xs.store.node_count

    def conn(self, who: Any) -> Any:
        if who not in self.conns:
            domid = int(str(who).split(":")[0])
            self.conns[who] = self.xs.connect(domid, str(who))
            self.events[who] = []
        return self.conns[who]

    def build(self, op: tuple[Any, ...], tx_id: int) -> XsMessage:
        self.req_id += 1
        kind, *args = op
        rid = self.req_id
        simple = {
            "read": w.read,
            "dir": w.directory,
            "getperms": w.get_perms,
            "mkdir": w.mkdir,
            "rm": w.rm,
        }
        if kind in simple:
            return simple[kind](args[0], req_id=rid, tx_id=tx_id)
        if kind == "write":
            return w.write(args[0], args[1], req_id=rid, tx_id=tx_id)
        if kind == "setperms":
            return w.set_perms(args[0], P(args[1]), req_id=rid, tx_id=tx_id)
        if kind == "dirpart":
            return w.directory_part(args[0], args[1], req_id=rid, tx_id=tx_id)
        if kind == "watch":
            return w.watch(args[0], args[1], req_id=rid)
        if kind == "unwatch":
            return w.unwatch(args[0], args[1], req_id=rid)
        if kind == "start":
            return XsMessage(XsType.TRANSACTION_START, rid, tx_id, b"\0")
        if kind == "end":
            return w.transaction_end(tx_id, args[0], req_id=rid)
        if kind == "introduce":
            return w.introduce(args[0], 1, 1, req_id=rid)
        if kind == "release":
            return w.release(args[0], req_id=rid)
        if kind == "set_target":
            return w.set_target(args[0], args[1], req_id=rid)
        if kind == "raw":  # (type, payload)
            return XsMessage(args[0], rid, tx_id, args[1])
        raise AssertionError(f"unknown op {kind}")

    def run(self, steps: list[tuple[Any, ...]]) -> None:
        for n, step in enumerate(steps):
            where = f"step {n}: {step}"
            if step[0] == "events":
                self.check_events(step[1], where)
                continue
            if step[0] == "nodes":
                assert self.xs.store.node_count - self.base_nodes == step[1], where
                continue
            who, tx, op, expected = step
            conn = self.conn(who)
            new_tx = op[0] == "start" and tx is not None and tx not in self.txs
            tx_id = 0 if new_tx else (self.txs.get(tx, 12345) if tx is not None else 0)
            msg = self.build(op, tx_id)
            reply = None
            for target, out in self.xs.handle(conn, msg):
                if out.type == XsType.WATCH_EVENT:
                    path, token = w.parse_watch_event(out.payload)
                    owner = next(k for k, c in self.conns.items() if c is target)
                    self.events[owner].append((path.decode(), token.decode()))
                else:
                    assert target is conn and reply is None, where
                    reply = out
            assert reply is not None and reply.req_id == msg.req_id, where
            if new_tx and reply.type == XsType.TRANSACTION_START:
                self.txs[tx] = int(reply.payload.rstrip(b"\0"))
            self.check_reply(reply, expected, where)
            self.check_state(where)

    def check_reply(self, reply: XsMessage, expected: Any, where: str) -> None:
        if expected is None:
            return
        if isinstance(expected, str) and expected.startswith("E"):
            assert reply.type == XsType.ERROR, f"{where}: got {reply}"
            assert reply.payload == expected.encode() + b"\0", f"{where}: got {reply.payload}"
            return
        assert reply.type != XsType.ERROR, f"{where}: got {reply.payload}"
        if expected == "OK":
            if reply.type not in (XsType.TRANSACTION_START, XsType.READ):
                assert reply.payload == b"OK\0", where
        elif isinstance(expected, bytes):
            assert reply.payload == expected, f"{where}: got {reply.payload!r}"
        elif isinstance(expected, list):
            assert reply.payload == w.join_args(*expected), f"{where}: got {reply.payload!r}"
        elif isinstance(expected, Perms):
            assert reply.payload == expected.payload, f"{where}: got {reply.payload!r}"
        else:
            raise AssertionError(f"bad expectation {expected!r}")

    def check_events(self, expected: dict[Any, list[tuple[str, str]]] | None, where: str) -> None:
        """Events since the last check, per connection (None: just discard them)."""
        for who in self.events:
            if expected is None:
                self.events[who] = []
                continue
            got, self.events[who] = self.events[who], []
            assert got == expected.get(who, []), f"{where}: events of {who}: {got}"

    def check_state(self, where: str) -> None:
        """Serialise/deserialise, journal replay and live-node counts agree."""
        self.journal += self.xs.take_records()
        store = self.xs.store
        again = Store.deserialise(store.serialise())
        assert again.flat() == store.flat(), where
        assert again.owned == store.owned and again.specials == store.specials, where
        assert check(self.xs) == [], where
        replayed = XenStore()
        for record in self.journal:
            replayed.apply_record(record)
        got = [n[:3] for n in replayed.store.flat()]
        assert got == [n[:3] for n in store.flat()], f"{where}: journal replay differs"
        assert replayed.domains == self.xs.domains and replayed.targets == self.xs.targets


def run(steps: list[tuple[Any, ...]]) -> Harness:
    h = Harness()
    h.run(steps)
    return h


# --- QEMU tests/unit/test-xs-node.c ------------------------------------------------

# The fixture: dom0 makes /local/domain/1 (n0 r1) and /local/domain/1/some owned by dom1.
QEMU_SETUP = [
    (0, None, ("write", "/local/domain/1", ""), "OK"),
    (0, None, ("setperms", "/local/domain/1", "n0 r1"), "OK"),
    (0, None, ("write", "/local/domain/1/some", ""), "OK"),
    (0, None, ("setperms", "/local/domain/1/some", "n1"), "OK"),
    ("nodes", 2),
]
REL = "some/relative/path"
ABS = "/local/domain/1/some/relative/path"


def test_qemu_simple() -> None:
    run(
        QEMU_SETUP
        + [
            (1, None, ("watch", "some", "guestwatch"), "OK"),
            ("events", {1: [("some", "guestwatch")]}),
            (0, None, ("watch", "/local/domain/1/some", "hostwatch"), "OK"),
            ("events", {0: [("/local/domain/1/some", "hostwatch")]}),
            (1, None, ("read", REL), "ENOENT"),
            (1, None, ("write", REL, "something"), "OK"),
            ("nodes", 4),  # "relative" and "path" were created
            ("events", {1: [(REL, "guestwatch")], 0: [(ABS, "hostwatch")]}),
            (1, None, ("read", REL), b"something"),
            (1, None, ("read", ABS), b"something"),
            (1, None, ("write", "/local/domain/badplace", "bad"), "EACCES"),
            (1, None, ("write", REL, "something else"), "OK"),
            ("nodes", 4),  # an overwrite creates nothing
            (1, None, ("write", REL + "2", "something else"), "OK"),
            (1, None, ("dir", "some/relative"), ["path", "path2"]),
            (
                "events",
                {
                    1: [(REL, "guestwatch")] + [(REL + "2", "guestwatch")],
                    0: [(ABS, "hostwatch"), (ABS + "2", "hostwatch")],
                },
            ),
            (1, None, ("unwatch", "some", "guestwatch"), "OK"),
            (1, None, ("unwatch", "some", "guestwatch"), "ENOENT"),
            (1, None, ("rm", "some/relative"), "OK"),
            ("events", {0: [("/local/domain/1/some/relative", "hostwatch")]}),
            (1, None, ("read", REL), "ENOENT"),
            ("nodes", 2),
        ]
    )


@pytest.mark.parametrize("outside_write", [False, True])
def test_qemu_tx_abort(outside_write: bool) -> None:
    steps: list[tuple[Any, ...]] = QEMU_SETUP + [
        (1, None, ("watch", "some", "w"), "OK"),
        ("events", {1: [("some", "w")]}),
        (1, "t", ("start",), "OK"),
        (1, "t", ("write", REL, "something"), "OK"),
        ("events", {}),
        (1, None, ("read", REL), "ENOENT"),
        (1, "t", ("read", REL), b"something"),
    ]
    if outside_write:
        steps += [(1, None, ("write", REL, "other"), "OK"), ("events", {1: [(REL, "w")]})]
    steps += [
        (1, "t", ("end", False), "OK"),
        ("events", {}),
        (1, None, ("read", REL), b"other" if outside_write else "ENOENT"),
    ]
    run(steps)


def test_qemu_tx_fail() -> None:
    run(
        QEMU_SETUP
        + [
            (1, None, ("watch", "some", "w"), "OK"),
            (1, "t", ("start",), "OK"),
            (1, "t", ("write", REL, "something"), "OK"),
            (1, None, ("write", REL, "another thing"), "OK"),
            ("events", {1: [("some", "w"), (REL, "w")]}),
            (1, "t", ("end", True), "EAGAIN"),
            ("events", {}),
            (1, None, ("read", REL), b"another thing"),
        ]
    )


def test_qemu_tx_succeed() -> None:
    run(
        QEMU_SETUP
        + [
            (1, None, ("watch", "some", "w"), "OK"),
            ("events", {1: [("some", "w")]}),
            (1, "t", ("start",), "OK"),
            (1, "t", ("write", REL, "something"), "OK"),
            ("events", {}),
            (1, "t", ("end", True), "OK"),
            ("events", {1: [(REL, "w")]}),
            (1, None, ("read", REL), b"something"),
        ]
    )


DEEP = "some/deep/dark/relative/path"


def test_qemu_tx_rm() -> None:
    run(
        QEMU_SETUP
        + [
            (1, None, ("write", DEEP, "hello"), "OK"),
            ("nodes", 6),
            (1, None, ("watch", "some", "w"), "OK"),
            ("events", None),
            (1, "t", ("start",), "OK"),
            (1, "t", ("rm", "some/deep/dark"), "OK"),
            ("nodes", 6),  # nothing happens outside before commit
            (1, None, ("read", DEEP), b"hello"),
            (1, "t", ("read", DEEP), "ENOENT"),
            (1, "t", ("end", True), "OK"),
            ("nodes", 3),
            ("events", {1: [("some/deep/dark", "w")]}),  # the removed top node only
            (1, None, ("read", DEEP), "ENOENT"),
        ]
    )


RESURRECT_WATCHES = [
    (1, None, ("write", DEEP, "hello"), "OK"),
    (1, None, ("watch", "some", "A"), "OK"),
    (1, None, ("watch", DEEP, "B"), "OK"),
    (1, None, ("watch", "some/deep/dark", "C"), "OK"),
    ("events", None),
    (1, "t", ("start",), "OK"),
    (1, "t", ("rm", "some/deep"), "OK"),
]


def test_qemu_tx_resurrect() -> None:
    other = "some/deep/dark/different/path"
    run(
        QEMU_SETUP
        + RESURRECT_WATCHES
        + [
            (1, "t", ("write", other, "something"), "OK"),
            ("events", {}),
            (1, "t", ("end", True), "OK"),
            # rm fires the topmost removed node, then each removed node a watch names
            # exactly; the new write fires everything at or above it.
            (
                "events",
                {
                    1: [
                        ("some/deep", "A"),
                        ("some/deep/dark", "C"),
                        (DEEP, "B"),
                        (other, "A"),
                        (other, "C"),
                    ]
                },
            ),
            (1, None, ("read", DEEP), "ENOENT"),
            (1, None, ("read", other), b"something"),
        ]
    )


def test_qemu_tx_resurrect2() -> None:
    run(
        QEMU_SETUP
        + RESURRECT_WATCHES
        + [
            (1, "t", ("write", DEEP, "something"), "OK"),
            (1, "t", ("end", True), "OK"),
            (
                "events",
                {
                    1: [
                        ("some/deep", "A"),
                        ("some/deep/dark", "C"),
                        (DEEP, "B"),
                        (DEEP, "A"),
                        (DEEP, "B"),
                        (DEEP, "C"),
                    ]
                },
            ),
            (1, None, ("read", DEEP), b"something"),
            (1, None, ("read", "some/deep/dark/relative"), b""),
        ]
    )


# --- ocaml-xenstore server_test (and the oxenstored fork's unit tests) ---------------

EXAMPLE_ACL = "r5 w2 b3"  # owner 5, others read, dom2 write, dom3 both


def test_implicit_create() -> None:
    run(
        [
            (0, None, ("read", "/a"), "ENOENT"),
            # C xenstored 4.17: "/" is n0, so a guest cannot tell a missing /a from a
            # forbidden one (EACCES); the mirage server answers ENOENT here.
            (1, None, ("read", "/a"), "EACCES"),
            (0, None, ("write", "/a/b", "hello"), "OK"),
            (1, None, ("read", "/a/b"), "EACCES"),
            (0, None, ("read", "/a"), b""),
            (1, None, ("read", "/a"), "EACCES"),
        ]
    )


def test_directory_order() -> None:
    run(
        [
            (0, None, ("write", "/a/1", ""), "OK"),
            (0, None, ("write", "/a/2/foo", ""), "OK"),
            (0, None, ("write", "/a/3", ""), "OK"),
            (0, None, ("dir", "/a"), ["1", "2", "3"]),
        ]
    )


def test_setperms_getperms() -> None:
    run(
        [
            (0, None, ("write", "/foo", ""), "OK"),
            (0, None, ("setperms", "/foo", EXAMPLE_ACL), "OK"),
            (0, None, ("getperms", "/foo"), Perms(EXAMPLE_ACL)),
        ]
    )


def test_setperms_owner() -> None:
    run(
        [
            (0, None, ("write", "/foo", ""), "OK"),
            (0, None, ("setperms", "/foo", EXAMPLE_ACL), "OK"),
            # dom2 may write /foo but does not own it.
            (2, None, ("setperms", "/foo", "r2 w2 b3"), "EACCES"),
            # C xenstored 4.17: an unprivileged owner may not give the node away
            # (EPERM); mirage allows it, oxenstored answers EACCES.
            (5, None, ("setperms", "/foo", "r2 w2 b3"), "EPERM"),
            (5, None, ("setperms", "/foo", "n5 r7"), "OK"),
            (5, None, ("getperms", "/foo"), Perms("n5 r7")),
            (0, None, ("setperms", "/foo", "n2"), "OK"),  # dom0 may
        ]
    )


def test_mkdir() -> None:
    run(
        [
            (0, None, ("read", "/a/b"), "ENOENT"),
            (0, None, ("read", "/a"), "ENOENT"),
            (0, "t", ("start",), "OK"),
            (0, "t", ("mkdir", "/bench/local/domain/0"), "OK"),
            (0, "t", ("setperms", "/bench/local/domain/0", EXAMPLE_ACL), "OK"),
            (0, "t", ("read", "/bench/local/domain/0"), b""),
            (0, "t", ("end", True), "OK"),
            (0, None, ("getperms", "/bench/local/domain/0"), Perms(EXAMPLE_ACL)),
            (0, None, ("mkdir", "/bench"), "OK"),  # existing: a no-op
            (0, None, ("read", "/bench"), b""),
        ]
    )


def test_empty() -> None:
    run([(0, None, ("write", "/a", ""), "OK"), (0, None, ("read", "/a"), b"")])


def test_rm() -> None:
    run(
        [
            (0, None, ("rm", "/a"), "OK"),  # missing leaf, parent exists
            (0, None, ("rm", "/a/b"), "ENOENT"),  # parent missing
            (0, None, ("write", "/a", "hello"), "OK"),
            (0, None, ("rm", "/a/b"), "OK"),
            (0, None, ("rm", "/"), "EINVAL"),
        ]
    )


def test_set_target() -> None:
    run(
        [
            (0, None, ("write", "/foo", "bar"), "OK"),
            (0, None, ("setperms", "/foo", EXAMPLE_ACL), "OK"),
            (7, None, ("write", "/foo", "bar"), "EACCES"),
            # C xenstored 4.17 wants both domains introduced (ENOENT otherwise).
            (0, None, ("set_target", 7, 5), "ENOENT"),
            (0, None, ("introduce", 5), "OK"),
            (0, None, ("introduce", 7), "OK"),
            (7, None, ("set_target", 7, 5), "EACCES"),  # only dom0 (oxenstored)
            (0, None, ("set_target", 7, 5), "OK"),
            (7, None, ("write", "/foo", "bar"), "OK"),
            (7, None, ("read", "/local/domain/5/domid"), b"5"),
        ]
    )


def test_transactions_are_isolated() -> None:
    run(
        [
            (0, "t", ("start",), "OK"),
            (0, "t", ("write", "/foo", "bar"), "OK"),
            (0, None, ("read", "/foo"), "ENOENT"),
            (0, "t", ("end", True), "OK"),
            (0, None, ("read", "/foo"), b"bar"),
        ]
    )


def test_independent_transactions_coalesce() -> None:
    run(
        [
            (0, None, ("mkdir", "/a/b"), "OK"),
            (0, None, ("mkdir", "/1/2"), "OK"),
            (0, "t1", ("start",), "OK"),
            (0, "t2", ("start",), "OK"),
            (0, "t1", ("write", "/a/b", "foo"), "OK"),
            (0, "t2", ("write", "/1/2", "foo"), "OK"),
            (0, "t1", ("end", True), "OK"),
            (0, "t2", ("end", True), "OK"),
            (0, None, ("read", "/a/b"), b"foo"),
            (0, None, ("read", "/1/2"), b"foo"),
        ]
    )


def test_device_create_coalesce() -> None:
    run(
        [
            (0, None, ("mkdir", "/local/domain/0/backend/vbd"), "OK"),
            (0, None, ("mkdir", "/local/domain/1/device/vbd"), "OK"),
            (0, None, ("mkdir", "/local/domain/2/device/vbd"), "OK"),
            (0, "t1", ("start",), "OK"),
            (0, "t2", ("start",), "OK"),
            (0, "t1", ("write", "/local/domain/0/backend/vbd/1/51712", "hello"), "OK"),
            (0, "t1", ("write", "/local/domain/1/device/vbd/51712", "there"), "OK"),
            (0, "t2", ("write", "/local/domain/0/backend/vbd/2/51712", "hello"), "OK"),
            (0, "t2", ("write", "/local/domain/2/device/vbd/51712", "there"), "OK"),
            (0, "t1", ("end", True), "OK"),
            (0, "t2", ("end", True), "OK"),
            (0, None, ("read", "/local/domain/0/backend/vbd/1/51712"), b"hello"),
            (0, None, ("read", "/local/domain/0/backend/vbd/2/51712"), b"hello"),
            (0, None, ("dir", "/local/domain/0/backend/vbd"), ["1", "2"]),
        ]
    )


def test_transactions_really_do_conflict() -> None:
    run(
        [
            (0, None, ("mkdir", "/a"), "OK"),
            (0, "t", ("start",), "OK"),
            (0, "t", ("dir", "/a"), []),
            (0, None, ("write", "/a/b", "outside"), "OK"),
            (0, "t", ("write", "/a/b", "inside"), "OK"),
            (0, "t", ("end", True), "EAGAIN"),
            (0, None, ("read", "/a/b"), b"outside"),
        ]
    )


def test_test_xenstore_ta_err() -> None:
    """test-xenstore.c ``ta err``: the tx keeps its snapshot, commit fails."""
    run(
        [
            (0, None, ("write", "/t/a", "a"), "OK"),
            (0, "t", ("start",), "OK"),
            (0, "t", ("read", "/t/a"), b"a"),
            (0, None, ("write", "/t/a", "b"), "OK"),
            (0, "t", ("read", "/t/a"), b"a"),
            (0, "t", ("write", "/t/a", "c"), "OK"),
            (0, "t", ("end", True), "EAGAIN"),
            (0, None, ("read", "/t/a"), b"b"),
        ]
    )


def test_simple_watches() -> None:
    run(
        [
            (0, None, ("mkdir", "/a"), "OK"),
            (0, None, ("setperms", "/a", "b0"), "OK"),
            ("events", {}),
            (0, None, ("watch", "/a", "token"), "OK"),
            ("events", {0: [("/a", "token")]}),
            (0, None, ("write", "/a", "foo"), "OK"),
            ("events", {0: [("/a", "token")]}),
            (1, None, ("write", "/a", "foo"), "OK"),
            ("events", {0: [("/a", "token")]}),
            (0, None, ("read", "/a"), b"foo"),
            (0, None, ("read", "/a/1"), "ENOENT"),
            (1, None, ("read", "/a"), b"foo"),
            (1, None, ("read", "/a/1"), "ENOENT"),
            ("events", {}),
        ]
    )


def test_relative_watches() -> None:
    run(
        [
            (0, None, ("mkdir", "/local/domain/1"), "OK"),
            (0, None, ("setperms", "/local/domain/1", "n1"), "OK"),
            (1, None, ("watch", "device", "tok"), "OK"),
            ("events", {1: [("device", "tok")]}),
            (1, None, ("write", "device/vbd", "x"), "OK"),
            ("events", {1: [("device/vbd", "tok")]}),
        ]
    )


def test_watches_read_perm() -> None:
    """Disabled in mirage; C xenstored filters events by read permission."""
    run(
        [
            (1, None, ("watch", "/a", "token"), "OK"),
            ("events", {1: [("/a", "token")]}),
            (0, None, ("write", "/a", "hello"), "OK"),
            (1, None, ("read", "/a"), "EACCES"),
            ("events", {}),
            (0, None, ("setperms", "/a", "n0 r1"), "OK"),
            ("events", {1: [("/a", "token")]}),
        ]
    )


def test_transaction_watches() -> None:
    run(
        [
            (0, None, ("watch", "/a", "token"), "OK"),
            ("events", {0: [("/a", "token")]}),
            (0, "t1", ("start",), "OK"),
            (0, "t1", ("write", "/a", "hello"), "OK"),
            ("events", {}),
            (0, "t1", ("end", False), "OK"),
            ("events", {}),
            (0, "t2", ("start",), "OK"),
            (0, "t2", ("write", "/a", "hello"), "OK"),
            (0, "t2", ("end", True), "OK"),
            ("events", {0: [("/a", "token")]}),
        ]
    )


def test_introduce_and_release_watches() -> None:
    run(
        [
            (0, None, ("watch", "@introduceDomain", "in"), "OK"),
            (0, None, ("watch", "@releaseDomain", "out"), "OK"),
            (1, None, ("watch", "@releaseDomain", "g"), "OK"),
            (
                "events",
                {
                    0: [("@introduceDomain", "in"), ("@releaseDomain", "out")],
                    1: [("@releaseDomain", "g")],
                },
            ),
            (0, None, ("introduce", 5), "OK"),
            ("events", {0: [("@introduceDomain", "in")]}),
            (0, None, ("introduce", 5), "OK"),  # again: no second event
            ("events", {}),
            (0, None, ("release", 5), "OK"),
            ("events", {0: [("@releaseDomain", "out")]}),  # not to dom1: no read access
            (0, None, ("setperms", "@releaseDomain", "n0 r1"), "OK"),
            (0, None, ("getperms", "@releaseDomain"), Perms("n0 r1")),
            (0, None, ("introduce", 6), "OK"),
            (0, None, ("release", 6), "OK"),
            (
                "events",
                {
                    0: [("@introduceDomain", "in"), ("@releaseDomain", "out")],
                    1: [("@releaseDomain", "g")],
                },
            ),
            (0, None, ("release", 6), "ENOENT"),
        ]
    )


def test_default_domain_tree() -> None:
    """libxl's layout (xen-reference 1.10): the home is read-only to the guest,
    control/shutdown and data are the guest's."""
    run(
        [
            (0, None, ("introduce", 3), "OK"),
            (0, None, ("getperms", "/local/domain/3"), Perms("n0 r3")),
            (0, None, ("getperms", "/local/domain/3/control/shutdown"), Perms("n3")),
            (3, None, ("read", "domid"), b"3"),
            (3, None, ("write", "control/shutdown", ""), "OK"),
            (3, None, ("write", "data/x", "1"), "OK"),
            (3, None, ("write", "control/other", "1"), "EACCES"),
            (3, None, ("write", "name", "evil"), "EACCES"),
            (4, None, ("read", "/local/domain/3/domid"), "EACCES"),
            (0, None, ("getperms", "/tool"), Perms("n0")),
            (0, None, ("getperms", "/vm"), Perms("n0")),
        ]
    )


# --- Xen 2005 testsuite intents: 07watch, 08transaction, 14complexperms -----------------


def test_07watch() -> None:
    run(
        [
            (0, None, ("watch", "/", "root"), "OK"),
            (0, None, ("watch", "/test", "t"), "OK"),
            ("0:b", None, ("watch", "/test", "other"), "OK"),
            ("events", None),
            (0, None, ("write", "/test", "x"), "OK"),
            # multiple watchers all get it, once per change
            ("events", {0: [("/test", "root"), ("/test", "t")], "0:b": [("/test", "other")]}),
            (0, None, ("read", "/test"), b"x"),
            (0, None, ("dir", "/test"), []),
            ("events", {}),  # reads never fire
            (0, None, ("write", "/test1", "1"), "OK"),
            (0, None, ("write", "/test2", "2"), "OK"),
            (0, None, ("write", "/test3", "3"), "OK"),
            (
                "events",
                {0: [("/test1", "root"), ("/test2", "root"), ("/test3", "root")]},
            ),  # in order
            (0, None, ("mkdir", "/test/subnode/subnode"), "OK"),
            (
                "events",
                {
                    0: [("/test/subnode/subnode", "root"), ("/test/subnode/subnode", "t")],
                    "0:b": [("/test/subnode/subnode", "other")],
                },
            ),
            (0, None, ("setperms", "/test", "n0 r1"), "OK"),
            ("events", {0: [("/test", "root"), ("/test", "t")], "0:b": [("/test", "other")]}),
            ("0:b", None, ("unwatch", "/test", "other"), "OK"),
            ("0:b", None, ("watch", "/test/subnode/subnode", "child"), "OK"),
            ("events", {"0:b": [("/test/subnode/subnode", "child")]}),
            (0, None, ("rm", "/test"), "OK"),
            # rm fires a watched child of the removed node
            (
                "events",
                {
                    0: [("/test", "root"), ("/test", "t")],
                    "0:b": [("/test/subnode/subnode", "child")],
                },
            ),
        ]
    )


def test_08transaction() -> None:
    run(
        [
            (0, None, ("write", "/test/entry", "x"), "OK"),
            (0, None, ("watch", "/test", "w"), "OK"),
            ("events", None),
            (0, "t", ("start",), "OK"),
            (0, "t", ("write", "/test/new", "1"), "OK"),
            (0, "t", ("write", "/test/new2", "2"), "OK"),
            (0, "t", ("rm", "/test/entry"), "OK"),
            (1, None, ("read", "/test/new"), "EACCES"),
            ("0:b", None, ("read", "/test/new"), "ENOENT"),
            ("0:b", None, ("read", "/test/entry"), b"x"),
            ("events", {}),
            (0, "t", ("end", True), "OK"),
            # two writes in one transaction give two events, the rm a third
            ("events", {0: [("/test/new", "w"), ("/test/new2", "w"), ("/test/entry", "w")]}),
            ("0:b", None, ("dir", "/test"), ["new", "new2"]),
        ]
    )


def test_14complexperms() -> None:
    """A guest cannot tell "missing" from "forbidden" under an unreadable node."""
    run(
        [
            (0, None, ("write", "/dir/file", "x"), "OK"),
            (0, None, ("setperms", "/dir/file", "n0 r1"), "OK"),
            (1, None, ("read", "/dir/file"), b"x"),  # its own entry lets it in...
            (1, None, ("read", "/dir/missing"), "EACCES"),  # ...nothing else shows
            (1, None, ("read", "/dir"), "EACCES"),
            (1, None, ("dir", "/dir"), "EACCES"),
            (1, None, ("write", "/dir/missing", "x"), "EACCES"),
            (1, None, ("rm", "/dir/missing"), "EACCES"),
            (1, None, ("getperms", "/nothing/at/all"), "EACCES"),
            (0, None, ("setperms", "/dir", "n0 r1"), "OK"),
            (1, None, ("read", "/dir/missing"), "ENOENT"),
            (1, None, ("write", "/dir/new", "x"), "EACCES"),  # read is not write
            (0, None, ("setperms", "/dir", "n0 b1"), "OK"),
            (1, None, ("write", "/dir/new", "x"), "OK"),
            (1, None, ("getperms", "/dir/new"), Perms("n1 b1")),  # inherited, owner replaced
        ]
    )


# --- requests every client can get wrong -------------------------------------------------


def test_protocol_rules() -> None:
    run(
        [
            (0, None, ("raw", 20, b"\0"), "ENOSYS"),  # XS_RESTRICT, removed
            (0, None, ("raw", 99, b""), "ENOSYS"),
            (0, None, ("raw", XsType.WATCH_EVENT, b"/a\0t\0"), "ENOSYS"),
            (0, None, ("raw", XsType.ERROR, b"EINVAL\0"), "ENOSYS"),
            (0, None, ("raw", XsType.GET_FEATURE, b""), "ENOSYS"),  # newer than 4.17
            (0, None, ("read", "//a"), "EINVAL"),
            (0, None, ("read", "/a/"), "EINVAL"),
            (0, None, ("read", "/a b"), "EINVAL"),
            (0, None, ("raw", XsType.READ, b"/a"), "EINVAL"),  # not NUL-terminated
            (0, None, ("raw", XsType.READ, b"/a\0/b\0"), "EINVAL"),  # two arguments
            (0, None, ("raw", XsType.WRITE, b"/a"), "EINVAL"),  # no NUL after the path
            (0, None, ("write", "/v", b"x\0y\0\0z"), "OK"),  # values may hold NULs
            (0, None, ("read", "/v"), b"x\0y\0\0z"),
            (0, "t", ("start",), "OK"),
            (0, "t", ("start",), "EBUSY"),  # no nesting
            (0, "t", ("raw", XsType.TRANSACTION_END, b"X\0"), "EINVAL"),
            (0, "nope", ("read", "/v"), "ENOENT"),
            (0, None, ("raw", XsType.TRANSACTION_END, b"T\0"), "ENOENT"),
            (0, None, ("raw", XsType.GET_DOMAIN_PATH, b"999\0"), b"/local/domain/999\0"),
            (0, None, ("raw", XsType.GET_DOMAIN_PATH, b"\0"), b"/local/domain/0\0"),
            (0, None, ("raw", XsType.GET_DOMAIN_PATH, b"x\0"), "EINVAL"),
            (1, None, ("raw", XsType.GET_DOMAIN_PATH, b"1\0"), b"/local/domain/1\0"),
            (0, None, ("raw", XsType.IS_DOMAIN_INTRODUCED, b"4\0"), b"F\0"),
            (0, None, ("introduce", 4), "OK"),
            (0, None, ("raw", XsType.IS_DOMAIN_INTRODUCED, b"4\0"), b"T\0"),
            (0, None, ("raw", XsType.RESUME, b"4\0"), "OK"),
            (0, None, ("raw", XsType.RESUME, b"9\0"), "ENOENT"),
            (0, None, ("raw", XsType.INTRODUCE, b"x\0\1\0"), "EINVAL"),
            (0, None, ("watch", "/w", "t"), "OK"),
            (0, None, ("watch", "/w", "t"), "EEXIST"),
            (0, None, ("raw", XsType.RESET_WATCHES, b"\0"), "OK"),
            (0, None, ("unwatch", "/w", "t"), "ENOENT"),
        ]
    )


def test_unknown_tx_id_is_enoent() -> None:
    h = Harness()
    conn = h.conn(0)
    for msg in (w.read("/", tx_id=77), w.write("/x", "1", tx_id=77), w.transaction_end(77)):
        (_, reply), *_ = h.xs.handle(conn, msg)
        assert reply.payload == b"ENOENT\0"
    # WATCH ignores the tx_id
    out = h.xs.handle(conn, w.request(XsType.WATCH, b"/x\0t\0", tx_id=77))
    assert out[0][1].payload == b"OK\0"
    assert h.xs.store.get("/x") is None


@pytest.mark.parametrize(
    "request_",
    [
        w.control("dump"),
        w.introduce(5, 1, 1),
        w.release(5),
        w.is_domain_introduced(5),
        w.resume(5),
        w.set_target(5, 6),
    ],
)
def test_privileged_only(request_: XsMessage) -> None:
    h = Harness()
    (_, reply), *_ = h.xs.handle(h.conn(1), request_)
    assert reply.type == XsType.ERROR and reply.payload == b"EACCES\0"


def test_control() -> None:
    h = Harness()
    conn = h.conn(0)
    h.xs.handle(conn, w.write("/a/b", "v"))
    (_, reply), *_ = h.xs.handle(conn, w.control("dump", "/a"))
    assert reply.payload == b'/a = "" (n0)\n/a/b = "v" (n0)\n\0'
    (_, reply), *_ = h.xs.handle(conn, w.control("log", "debug"))
    assert h.xs.log_level == "debug" and reply.payload == b"log level debug\n\0"
    (_, reply), *_ = h.xs.handle(conn, w.control("log", "loud"))
    assert reply.payload == b"EINVAL\0"
    (_, reply), *_ = h.xs.handle(conn, w.control("check"))
    assert reply.payload == b"OK\n\0"
    (_, reply), *_ = h.xs.handle(conn, w.control("frobnicate"))
    assert reply.payload == b"EINVAL\0"
    for i in range(300):
        h.xs.handle(conn, w.write(f"/big/node{i:04d}", "x" * 20))
    (_, reply), *_ = h.xs.handle(conn, w.control("dump", "/big"))
    assert len(reply.payload) <= 4096 and reply.payload.endswith(b"(truncated)\n\0")


def test_directory_part() -> None:
    h = Harness()
    conn = h.conn(0)
    names = [f"child-with-a-long-name-{i:04d}" for i in range(300)]
    for name in names:
        h.xs.handle(conn, w.write(f"/d/{name}", ""))
    (_, reply), *_ = h.xs.handle(conn, w.directory("/d"))
    assert reply.payload == b"E2BIG\0"
    got: list[bytes] = []
    offset, gen = 0, None
    while True:
        (_, reply), *_ = h.xs.handle(conn, w.directory_part("/d", offset))
        assert len(reply.payload) <= 4096
        head, _, rest = reply.payload.partition(b"\0")
        assert gen in (None, head)
        gen = head
        if rest.endswith(b"\0\0") or rest == b"\0":
            got += w.split_args(rest[:-1])
            break
        chunk = w.split_args(rest)
        got += chunk
        offset += len(rest)
    assert [g.decode() for g in got] == names
    (_, reply), *_ = h.xs.handle(conn, w.directory_part("/d", 10**6))
    assert reply.payload == gen + b"\0\0"


# --- quotas (C xenstored 4.17 defaults) --------------------------------------------------

GUEST_HOME = [(0, None, ("introduce", 1), "OK")]


def test_quota_watches() -> None:
    steps = GUEST_HOME + [(1, None, ("watch", f"data/w{i}", "t"), "OK") for i in range(128)]
    steps += [(1, None, ("watch", "data/one-too-many", "t"), "E2BIG")]
    steps += [(0, None, ("watch", f"/w{i}", "t"), "OK") for i in range(130)]  # dom0 exempt
    h = run(steps)
    assert h.xs.quota_refusals["watches"] == 1


def test_quota_transactions() -> None:
    steps = GUEST_HOME + [(1, f"t{i}", ("start",), "OK") for i in range(10)]
    steps += [(1, "t10", ("start",), "ENOSPC")]
    steps += [(1, "t0", ("end", False), "OK"), (1, "t11", ("start",), "OK")]
    run(steps)


def test_quota_node_size_and_perms() -> None:
    run(
        GUEST_HOME
        + [
            (1, None, ("write", "data/big", "x" * 2000), "OK"),
            (1, None, ("write", "data/big", "x" * 2100), "ENOSPC"),
            (1, None, ("read", "data/big"), b"x" * 2000),
            (0, None, ("write", "/dom0big", "x" * 4000), "OK"),
            (1, None, ("setperms", "data/big", "n1 r2 r3 r4 r5"), "OK"),
            (1, None, ("setperms", "data/big", "n1 r2 r3 r4 r5 r6"), "ENOSPC"),
        ]
    )


def test_quota_nodes() -> None:
    h = Harness()
    h.run(GUEST_HOME)
    guest = h.conn(1)
    owned = h.xs.store.owned.get(1, 0)
    for i in range(1000 - owned):
        (_, reply), *_ = h.xs.handle(guest, w.write(f"data/n{i}", ""))
        assert reply.payload == b"OK\0", i
    (_, reply), *_ = h.xs.handle(guest, w.write("data/last", ""))
    assert reply.payload == b"ENOSPC\0"
    (_, reply), *_ = h.xs.handle(guest, w.rm("data/n0"))
    (_, reply), *_ = h.xs.handle(guest, w.write("data/last", ""))
    assert reply.payload == b"OK\0"
    assert h.xs.quota_refusals["nodes"] == 1 and check(h.xs) == []


def test_quota_transaction_nodes() -> None:
    h = Harness()
    h.run(GUEST_HOME + [(1, "t", ("start",), "OK")])
    guest, tx = h.conn(1), h.txs["t"]
    errors = set()
    for i in range(1100):
        (_, reply), *_ = h.xs.handle(guest, w.read(f"data/r{i}", tx_id=tx))
        errors.add(reply.payload)
    assert b"ENOSPC\0" in errors and h.xs.quota_refusals["transaction-nodes"] > 0


def test_disconnect_aborts_transactions_and_watches() -> None:
    h = Harness()
    h.run([(1, "t", ("start",), "OK"), (1, None, ("watch", "/x", "t"), "OK")])
    h.xs.disconnect(h.conn(1))
    assert h.xs.statistics().transactions_aborted == 1
    out = h.xs.handle(h.conn(0), w.write("/x", "1"))
    assert [m.type for _, m in out] == [XsType.WRITE]


# --- a model-based check: the store against a dict, under random requests ----------------


PATHS = st.lists(st.sampled_from("abc"), min_size=1, max_size=3).map(lambda p: "/m/" + "/".join(p))
VALUES = st.binary(max_size=8)


def _model_write(model: dict[str, bytes], path: str, value: bytes) -> None:
    parts = path.split("/")
    for i in range(2, len(parts)):
        model.setdefault("/".join(parts[:i]), b"")
    model[path] = value


def _model_rm(model: dict[str, bytes], path: str) -> None:
    for p in [p for p in model if p == path or p.startswith(path + "/")]:
        del model[p]


class StoreMachine(RuleBasedStateMachine):
    """dom0 writes, removes and commits transactions; the store must equal a
    plain dict, survive serialisation and journal replay, and a transaction
    that nobody raced must commit."""

    def __init__(self) -> None:
        super().__init__()
        self.h = Harness()
        self.h.run([(0, None, ("mkdir", "/m"), "OK")])
        self.model: dict[str, bytes] = {"/m": b""}
        # id, private model, raced, ops to replay on the shared model at commit
        self.tx: tuple[int, dict[str, bytes], bool, list[Any]] | None = None

    def _do(self, msg: XsMessage) -> XsMessage:
        out = self.h.xs.handle(self.h.conn(0), msg)
        self.h.check_state(str(msg))
        return out[-1][1]

    def _outside_changed(self) -> None:
        if self.tx is not None:
            self.tx = (self.tx[0], self.tx[1], True, self.tx[3])

    @rule(path=PATHS, value=VALUES)
    def write(self, path: str, value: bytes) -> None:
        assert self._do(w.write(path, value)).payload == b"OK\0"
        _model_write(self.model, path, value)
        self._outside_changed()

    @rule(path=PATHS)
    def rm(self, path: str) -> None:
        reply = self._do(w.rm(path))
        parent = path.rsplit("/", 1)[0]
        assert reply.payload == (b"OK\0" if parent in self.model else b"ENOENT\0")
        if path in self.model:
            self._outside_changed()
        _model_rm(self.model, path)

    @rule()
    def start(self) -> None:
        if self.tx is None:
            reply = self._do(w.transaction_start())
            self.tx = (int(reply.payload[:-1]), dict(self.model), False, [])

    @rule(path=PATHS, value=VALUES)
    def tx_write(self, path: str, value: bytes) -> None:
        if self.tx is not None:
            assert self._do(w.write(path, value, tx_id=self.tx[0])).payload == b"OK\0"
            _model_write(self.tx[1], path, value)
            self.tx[3].append((_model_write, path, value))

    @rule(path=PATHS)
    def tx_read(self, path: str) -> None:
        if self.tx is not None:
            reply = self._do(w.read(path, tx_id=self.tx[0]))
            expected = self.tx[1].get(path)
            assert reply.payload == (expected if expected is not None else b"ENOENT\0")

    @rule(path=PATHS)
    def tx_rm(self, path: str) -> None:
        if self.tx is not None and path.rsplit("/", 1)[0] in self.tx[1]:
            assert self._do(w.rm(path, tx_id=self.tx[0])).payload == b"OK\0"
            _model_rm(self.tx[1], path)
            self.tx[3].append((_model_rm, path))

    @rule(commit=st.booleans())
    def end(self, commit: bool) -> None:
        if self.tx is None:
            return
        tx_id, private, raced, ops = self.tx
        self.tx = None
        reply = self._do(w.transaction_end(tx_id, commit))
        if commit and reply.payload == b"OK\0":
            for fn, *args in ops:
                fn(self.model, *args)
        elif commit:
            assert raced and reply.payload == b"EAGAIN\0"

    @invariant()
    def store_matches_model(self) -> None:
        got = {p: n.value for p, n in self.h.xs.store.walk("/m")}
        assert got == self.model


StoreMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
test_store_model = StoreMachine.TestCase
