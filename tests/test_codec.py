"""The codec: round trips, and one clear error for every kind of bad input."""

from __future__ import annotations

import enum
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared import codec
from shared.codec import CodecError, message


class Colour(enum.IntEnum):
    RED = 1
    BLUE = 2


@message(9070)
class Inner:
    a: int
    b: str


@message(9071)
class Outer:
    n: int
    f: float
    flag: bool
    name: str
    blob: bytes
    maybe: int | None
    items: tuple[int, ...]
    names: list[str]
    table: dict[int, str]
    inner: Inner
    inners: tuple[Inner, ...]
    colour: Colour
    anything: Any


@message(9072)
class Empty:
    pass


@message(9073)
class Envelope:
    inner: codec.AnyMessage
    many: tuple[codec.AnyMessage, ...]


def test_any_message_fields_nest_any_registered_message() -> None:
    env = Envelope(Inner(1, "a"), (Empty(), Inner(2, "b")))
    assert codec.decode(codec.encode(env)) == env
    with pytest.raises(CodecError):
        codec.decode(msgpack.packb([9073, 5, []]))


ints = st.integers(-(2**63), 2**64 - 1)
inner_st = st.builds(Inner, ints, st.text())
outer_st = st.builds(
    Outer,
    ints,
    st.floats(allow_nan=False),
    st.booleans(),
    st.text(),
    st.binary(),
    st.none() | ints,
    st.lists(ints).map(tuple),
    st.lists(st.text()),
    st.dictionaries(ints, st.text()),
    inner_st,
    st.lists(inner_st, max_size=4).map(tuple),
    st.sampled_from(Colour),
    st.none() | ints | st.text() | st.lists(ints),
)


@given(outer_st)
def test_round_trip(msg: Outer) -> None:
    assert codec.decode(codec.encode(msg)) == msg


@given(inner_st)
def test_wire_form_is_tag_then_fields(msg: Inner) -> None:
    assert msgpack.unpackb(codec.encode(msg)) == [9070, msg.a, msg.b]


def test_empty_message() -> None:
    assert codec.decode(codec.encode(Empty())) == Empty()


@pytest.mark.parametrize(
    "data, fragment",
    [
        (b"\xc1", "not msgpack"),
        (b"\x92\x01", "not msgpack"),  # truncated array
        (msgpack.packb({"a": 1}), "non-empty array"),
        (msgpack.packb([]), "non-empty array"),
        (msgpack.packb(["x"]), "tag must be an int"),
        (msgpack.packb([123456]), "unknown message tag 123456"),
        (msgpack.packb([9070, 1]), "takes 2 fields, got 1"),
        (msgpack.packb([9070, 1, "x", 3]), "takes 2 fields, got 3"),
        (msgpack.packb([9070, "1", "x"]), "Inner.a: expected int"),
        (msgpack.packb([9070, True, "x"]), "Inner.a: expected int"),
        (msgpack.packb([9070, 1, b"x"]), "Inner.b: expected str"),
    ],
)
def test_bad_input_raises_one_clear_error(data: bytes, fragment: str) -> None:
    with pytest.raises(CodecError, match=fragment):
        codec.decode(data)


def _outer_wire(**changes: Any) -> list:
    good = codec.to_wire(
        Outer(
            1, 1.0, True, "n", b"b", None, (1,), ["a"], {1: "x"}, Inner(1, "a"), (), Colour.RED, 0
        )
    )
    names = [f.name for f in Outer.__attrs_attrs__]
    for key, value in changes.items():
        good[1 + names.index(key)] = value
    return good


@pytest.mark.parametrize(
    "changes",
    [
        {"items": [1, "two"]},
        {"items": 5},
        {"names": [1]},
        {"table": {"k": "v"}},
        {"table": [1, 2]},
        {"inner": [9072]},
        {"inner": [9070, 1]},
        {"inners": [[9070, 1, 2]]},
        {"colour": 7},
        {"maybe": "no"},
        {"flag": 1},
        {"f": "1.0"},
    ],
)
def test_wrong_types_deep_inside_are_rejected(changes: dict) -> None:
    with pytest.raises(CodecError):
        codec.decode(msgpack.packb(_outer_wire(**changes)))


@given(st.binary(max_size=64))
def test_random_bytes_never_escape_as_other_errors(data: bytes) -> None:
    try:
        codec.decode(data)
    except CodecError:
        pass


def test_a_tag_cannot_be_taken_twice() -> None:
    with pytest.raises(ValueError, match="already used"):

        @message(9070)
        class Other:
            x: int


def test_unregistered_class_cannot_be_encoded() -> None:
    class Loose:
        pass

    with pytest.raises(CodecError):
        codec.encode(Loose())
