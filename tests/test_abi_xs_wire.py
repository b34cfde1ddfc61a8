"""XenStore wire codec: byte vectors of mirage ocaml-xenstore and of real clients
(peers.md 1.4, 1.7) parsed whole, one byte at a time and at arbitrary cut points;
framing errors; error names; path and permission syntax."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.abi import xs_wire as xs
from shared.abi.constants import XenErrno
from shared.abi.xs_wire import Perm, PermKind, XsMessage, XsParser, XsType


def hdr(type_: int, req_id: int, tx_id: int, length: int) -> bytes:
    return struct.pack("<IIII", type_, req_id, tx_id, length)


# (builder result, exact bytes on the wire)
VECTORS = [
    (xs.read("/test"), bytes.fromhex("02000000 00000000 00000000 06000000") + b"/test\0"),
    (
        xs.write("/test", b"xxx\0yyy\0\0zzz"),
        bytes.fromhex("0b000000 00000000 00000000 12000000") + b"/test\0xxx\0yyy\0\0zzz",
    ),
    (xs.error_reply(xs.read("/test"), "EINVAL"), hdr(0x10, 0, 0, 7) + b"EINVAL\0"),
    (xs.ok_reply(xs.write("/test", "x")), hdr(11, 0, 0, 3) + b"OK\0"),
    (XsMessage(XsType.GET_DOMAIN_PATH, 0, 0, b"\0"), hdr(10, 0, 0, 1) + b"\0"),
    (
        xs.get_perms_reply(xs.get_perms("/a"), xs.parse_perms("r2 n4")),
        hdr(3, 0, 0, 6) + b"r2\0n4\0",
    ),
    (xs.transaction_start_reply(xs.transaction_start(), 3), hdr(6, 0, 0, 2) + b"3\0"),
    (
        xs.directory_reply(xs.directory("/"), ["a", "b", "c", "aseasyas", "1", "2", "3"]),
        hdr(1, 0, 0, 21) + b"a\0b\0c\0aseasyas\x001\x002\x003\0",
    ),
    (xs.introduce(4, 5, 1, req_id=9), hdr(8, 9, 0, 6) + b"4\x005\x001\0"),
    # What xenstore-write, -chmod, -watch and pyxs send (peers.md 1.7).
    (xs.transaction_start(req_id=1), hdr(6, 1, 0, 1) + b"\0"),
    (xs.write("A", "v", req_id=2, tx_id=1), hdr(11, 2, 1, 3) + b"A\0v"),
    (xs.transaction_end(1, commit=True, req_id=3), hdr(7, 3, 1, 2) + b"T\0"),
    (xs.transaction_end(1, commit=False), hdr(7, 0, 1, 2) + b"F\0"),
    (
        xs.set_perms("p", xs.parse_perms(b"n0\0r1\0")),
        hdr(14, 0, 0, 8) + b"p\0n0\0r1\0",
    ),
    (xs.watch("/local", "/local"), hdr(4, 0, 0, 14) + b"/local\0/local\0"),
    (xs.watch_event("/local", "/local"), hdr(15, 0, 0, 14) + b"/local\0/local\0"),
    (xs.reset_watches(), hdr(21, 0, 0, 1) + b"\0"),
    (xs.directory_part("/a", 0, req_id=5), hdr(22, 5, 0, 5) + b"/a\x000\0"),
    (xs.mkdir("/a/b"), hdr(12, 0, 0, 5) + b"/a/b\0"),
    (xs.rm("/a/b"), hdr(13, 0, 0, 5) + b"/a/b\0"),
    (xs.read_reply(xs.read("/a"), b"value"), hdr(2, 0, 0, 5) + b"value"),
    (xs.read_reply(xs.read("/a"), b""), hdr(2, 0, 0, 0)),
    (xs.bool_reply(xs.is_domain_introduced(3), True), hdr(17, 0, 0, 2) + b"T\0"),
    (
        xs.get_domain_path_reply(xs.get_domain_path(7), xs.domain_path(7)),
        hdr(10, 0, 0, 16) + b"/local/domain/7\0",
    ),
]
STREAM = b"".join(wire for _, wire in VECTORS)
MESSAGES = [msg for msg, _ in VECTORS]


@pytest.mark.parametrize(("msg", "wire"), VECTORS)
def test_vector_encodes_to_exact_bytes(msg: XsMessage, wire: bytes) -> None:
    assert msg.encode() == wire


@pytest.mark.parametrize(("msg", "wire"), VECTORS)
def test_vector_parses_whole(msg: XsMessage, wire: bytes) -> None:
    assert XsParser().feed(wire) == [msg]
    assert XsMessage.decode(wire) == msg


@pytest.mark.parametrize(("msg", "wire"), VECTORS)
def test_vector_parses_one_byte_at_a_time(msg: XsMessage, wire: bytes) -> None:
    parser = XsParser()
    for i in range(len(wire) - 1):
        assert parser.feed(wire[i : i + 1]) == []
        assert parser.buffered == i + 1
    assert parser.feed(wire[-1:]) == [msg]
    assert parser.buffered == 0


def test_stream_of_all_vectors_one_byte_at_a_time() -> None:
    parser = XsParser()
    got = [m for i in range(len(STREAM)) for m in parser.feed(STREAM[i : i + 1])]
    assert got == MESSAGES


@given(st.lists(st.integers(0, len(STREAM)), max_size=40))
def test_stream_cut_anywhere(cuts: list[int]) -> None:
    bounds = [0, *sorted(cuts), len(STREAM)]
    parser = XsParser()
    got = [m for a, b in zip(bounds, bounds[1:], strict=False) for m in parser.feed(STREAM[a:b])]
    assert got == MESSAGES
    assert parser.buffered == 0


messages = st.builds(
    XsMessage,
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1),
    st.binary(max_size=xs.XENSTORE_PAYLOAD_MAX),
)


@given(st.lists(messages, max_size=5), st.data())
def test_round_trip_arbitrary_messages(msgs: list[XsMessage], data: st.DataObject) -> None:
    stream = b"".join(m.encode() for m in msgs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    bounds = [0, *cuts, len(stream)]
    parser = XsParser()
    got = [m for a, b in zip(bounds, bounds[1:], strict=False) for m in parser.feed(stream[a:b])]
    assert got == msgs


def test_payload_of_exactly_the_maximum_is_accepted() -> None:
    wire = hdr(2, 1, 0, 4096) + b"x" * 4096
    assert XsParser().feed(wire)[0].payload == b"x" * 4096


def test_oversize_len_is_a_protocol_error_and_the_parser_stays_broken() -> None:
    parser = XsParser()
    good = xs.read("/a", req_id=1).encode()
    with pytest.raises(xs.XsProtocolError, match="4097") as info:
        parser.feed(good + hdr(2, 2, 0, 4097))
    assert info.value.messages == [xs.read("/a", req_id=1)]
    assert parser.error is info.value
    with pytest.raises(xs.XsProtocolError):
        parser.feed(good)


def test_oversize_header_is_rejected_before_its_payload_arrives() -> None:
    parser = XsParser()
    head = hdr(11, 0, 0, 0xFFFFFFFF)
    assert parser.feed(head[:15]) == []
    with pytest.raises(xs.XsProtocolError):
        parser.feed(head[15:])


def test_encode_refuses_an_oversize_payload() -> None:
    with pytest.raises(xs.XsPayloadError):
        XsMessage(XsType.READ, 0, 0, b"x" * 4097).encode()


def test_decode_wants_exactly_one_message() -> None:
    with pytest.raises(xs.XsPayloadError):
        XsMessage.decode(STREAM)
    with pytest.raises(xs.XsPayloadError):
        XsMessage.decode(VECTORS[0][1][:-1])


def test_unknown_type_numbers_are_framed_not_rejected() -> None:
    assert XsParser().feed(hdr(20, 1, 0, 1) + b"\0") == [XsMessage(20, 1, 0, b"\0")]


# --- error names ------------------------------------------------------------------------


@pytest.mark.parametrize("name", xs.XS_ERRORS)
def test_error_names_map_both_ways(name: str) -> None:
    errno = xs.error_errno(name)
    assert errno == XenErrno[name]
    assert xs.error_name(errno) == name
    assert xs.error_errno(name.encode() + b"\0") == errno


def test_unknown_errno_is_sent_as_einval_and_unknown_name_read_as_einval() -> None:
    assert xs.error_name(XenErrno.ESRCH) == "EINVAL"
    assert xs.error_name(9999) == "EINVAL"
    assert xs.error_errno("EWHATEVER") == XenErrno.EINVAL


def test_error_reply_echoes_ids_and_accepts_errno_or_name() -> None:
    req = xs.read("/x", req_id=77, tx_id=5)
    assert xs.error_reply(req, XenErrno.ENOENT) == XsMessage(XsType.ERROR, 77, 5, b"ENOENT\0")
    assert xs.error_reply(req, -XenErrno.EACCES).payload == b"EACCES\0"
    assert xs.error_reply(req, "EAGAIN").payload == b"EAGAIN\0"
    assert xs.error_reply(req, "EBOGUS").payload == b"EINVAL\0"


def test_header_order_of_error_names() -> None:
    assert xs.XS_ERRORS[0] == "EINVAL" and xs.XS_ERRORS[-1] == "EPERM"
    assert len(xs.XS_ERRORS) == 16


# --- argument lists ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "args"),
    [
        (b"", []),
        (b"\0", [b""]),
        (b"/a\0", [b"/a"]),
        (b"/a\0tok\0", [b"/a", b"tok"]),
        (b"a\0\0", [b"a", b""]),
    ],
)
def test_split_args(payload: bytes, args: list[bytes]) -> None:
    assert xs.split_args(payload) == args


def test_split_args_rejects_an_unterminated_argument() -> None:
    with pytest.raises(xs.XsPayloadError):
        xs.split_args(b"/a\0tok")


def test_write_value_is_the_rest_of_the_payload() -> None:
    assert xs.split_write(b"/test\0xxx\0yyy\0\0zzz") == (b"/test", b"xxx\0yyy\0\0zzz")
    assert xs.split_write(b"/test\0") == (b"/test", b"")
    with pytest.raises(xs.XsPayloadError):
        xs.split_write(b"/test")


def test_watch_event_parts_and_ids() -> None:
    ev = xs.watch_event("/local/domain/1/device", "tok")
    assert (ev.req_id, ev.tx_id) == (0, 0)
    assert xs.parse_watch_event(ev.payload) == (b"/local/domain/1/device", b"tok")
    with pytest.raises(xs.XsPayloadError):
        xs.parse_watch_event(b"/only\0")


def test_directory_part_reply_marks_the_end_with_an_empty_string() -> None:
    req = xs.directory_part("/a", 0)
    assert xs.directory_part_reply(req, 7, ["x", "y"], complete=True).payload == b"7\0x\0y\0\0"
    assert xs.directory_part_reply(req, 7, ["x"], complete=False).payload == b"7\0x\0"
    assert xs.directory_part_reply(req, 7, [], complete=True).payload == b"7\0\0"


def test_empty_directory_reply_has_no_payload() -> None:
    assert xs.directory_reply(xs.directory("/a"), []).payload == b""


# --- paths ------------------------------------------------------------------------------

LOCAL = "/local/domain/12345/"


@pytest.mark.parametrize(
    ("path", "relative", "special", "valid"),
    [
        ("/", False, False, True),
        ("/local/domain/0", False, False, True),
        ("/a-b_c@d/E9", False, False, True),
        ("/a/", False, False, False),  # trailing slash
        ("/a//b", False, False, False),
        ("//", False, False, False),
        ("", True, True, False),
        ("/a b", False, False, False),
        ("/a.b", False, False, False),
        ("/a\0b", False, False, False),
        ("/é", False, False, False),
        ("device/vbd", False, False, False),  # relative not allowed here
        ("device/vbd", True, False, True),
        ("device/vbd/", True, False, False),
        ("@releaseDomain", False, False, False),
        ("@releaseDomain", False, True, True),
        ("@introduceDomain", True, True, True),
        ("@", False, True, False),
        ("/" + "a" * 2047, False, False, True),
        ("/" + "a" * 2048, False, False, False),  # outside a home: 2048 in all
        (LOCAL + "a" * 2048, False, False, True),  # the limit counts past the home
        (LOCAL + "a" * 2049, False, False, False),
        ("a" * 2048, True, False, True),
        ("a" * 2049, True, False, False),
    ],
)
def test_path_validity(path: str, relative: bool, special: bool, valid: bool) -> None:
    assert xs.is_valid_path(path, allow_relative=relative, allow_special=special) is valid
    assert xs.is_valid_path(path.encode(), allow_relative=relative, allow_special=special) is valid


def test_absolute_limit_caps_everything() -> None:
    assert len(LOCAL) + 2048 <= xs.XENSTORE_ABS_PATH_MAX
    assert not xs.is_valid_path("/local/domain/1/" + "a/" * 1600 + "a")


def test_resolve_relative_paths_against_the_callers_home() -> None:
    assert xs.resolve_path("device/vbd", 3) == "/local/domain/3/device/vbd"
    assert xs.resolve_path("/vm", 3) == "/vm"
    assert xs.resolve_path("@releaseDomain", 3) == "@releaseDomain"
    assert xs.is_special_path("@releaseDomain") and xs.is_special_path(b"@x")
    assert not xs.is_special_path("/a")


# --- permissions ------------------------------------------------------------------------


def test_parse_perms_wire_and_human_forms() -> None:
    expected = [Perm(PermKind.NONE, 0), Perm(PermKind.READ, 5)]
    assert xs.parse_perms(b"n0\0r5\0") == expected
    assert xs.parse_perms("n0 r5") == expected
    assert xs.format_perms(expected) == b"n0\0r5\0"
    assert " ".join(map(str, xs.parse_perms("r5 w2 b3"))) == "r5 w2 b3"


@pytest.mark.parametrize("bad", ["x5", "r", "5", "r-1", "r65536", "rr5", "r5x", "R5"])
def test_bad_permission_strings(bad: str) -> None:
    with pytest.raises(xs.XsPayloadError):
        xs.parse_perm(bad)


def test_perm_kinds() -> None:
    assert [(k.can_read, k.can_write) for k in PermKind] == [
        (False, False),
        (True, False),
        (False, True),
        (True, True),
    ]


@given(st.lists(st.builds(Perm, st.sampled_from(PermKind), st.integers(0, 0xFFFF)), max_size=8))
def test_perms_round_trip(perms: list[Perm]) -> None:
    assert xs.parse_perms(xs.format_perms(perms)) == perms


# --- the ring page ----------------------------------------------------------------------


def test_ring_interface_offsets_of_the_reference_table() -> None:
    lay = xs.XENSTORE_DOMAIN_INTERFACE
    assert lay.size == 2076
    assert [lay.offsets[f] for f in ("req", "rsp", "req_cons", "rsp_prod", "error")] == [
        0,
        1024,
        2048,
        2060,
        2072,
    ]
    assert xs.MASK_XENSTORE_IDX(1024 * 7 + 3) == 3
    assert xs.XSD_SOCKMSG.size == xs.XS_HEADER_SIZE == 16
