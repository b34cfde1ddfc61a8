"""attrs messages on the wire as msgpack arrays ``[tag, field...]``.

Every message class is an ``@attrs.frozen`` class registered under a small
integer tag with :func:`message`. Field types come from the annotations and are
checked on decode, so a peer's malformed bytes, an unknown tag, the wrong number
of fields or a value of the wrong type all raise one :class:`CodecError` — which
the transport turns into an error reply and a counter, never a crash.

Supported field types: ``int`` (and ``IntEnum`` subclasses), ``float``, ``bool``,
``str``, ``bytes``, ``X | None``, ``tuple[X, ...]``, ``list[X]``, ``dict[K, V]``,
``typing.Any``, other registered message classes (nested as arrays) and
:class:`AnyMessage` (any registered message).
"""

from __future__ import annotations

import enum
import types
import typing
from collections.abc import Callable
from typing import Any, TypeVar

import attrs
import msgpack

T = TypeVar("T")


class CodecError(ValueError):
    """Bytes or a value that are not a valid message."""


class AnyMessage:
    """Field annotation: any registered message, nested as its own array."""


_BY_TAG: dict[int, type] = {}
_TAG_OF: dict[type, int] = {}
_DECODERS: dict[type, Callable[[list], Any]] = {}
_ENCODERS: dict[type, Callable[[Any], list]] = {}


def message(tag: int) -> Callable[[type[T]], type[T]]:
    """Class decorator: make ``cls`` a frozen attrs message under ``tag``."""

    def register(cls: type[T]) -> type[T]:
        if not attrs.has(cls):
            cls = attrs.frozen(cls)
        if tag in _BY_TAG and _BY_TAG[tag].__qualname__ != cls.__qualname__:
            raise ValueError(f"tag {tag} already used by {_BY_TAG[tag].__qualname__}")
        _BY_TAG[tag] = cls
        _TAG_OF[cls] = tag
        _DECODERS.pop(cls, None)
        _ENCODERS.pop(cls, None)
        return cls

    return register


def tag_of(cls: type) -> int:
    return _TAG_OF[cls]


def registered_messages() -> dict[int, type]:
    return dict(_BY_TAG)


# --- encoding -------------------------------------------------------------


def to_wire(msg: Any) -> list:
    """The msgpack-ready array for a registered message."""
    enc = _ENCODERS.get(type(msg))
    if enc is None:
        enc = _ENCODERS[type(msg)] = _compile_encoder(type(msg))
    return enc(msg)


def encode(msg: Any) -> bytes:
    return msgpack.packb(to_wire(msg), use_bin_type=True)


def _compile_encoder(cls: type) -> Callable[[Any], list]:
    if cls not in _TAG_OF:
        raise CodecError(f"{cls.__qualname__} is not a registered message")
    tag = _TAG_OF[cls]
    attrs.resolve_types(cls)
    fields = attrs.fields(cls)
    names = [f.name for f in fields]
    if all(_is_plain(f.type) for f in fields):
        getter = _attrgetter(names)
        return lambda m: [tag, *getter(m)]
    convs = [_value_encoder(f.type) for f in fields]

    def encode_fields(m: Any) -> list:
        return [tag, *(c(getattr(m, n)) for n, c in zip(names, convs, strict=True))]

    return encode_fields


def _attrgetter(names: list[str]) -> Callable[[Any], tuple]:
    if len(names) == 1:
        name = names[0]
        return lambda m: (getattr(m, name),)
    import operator

    return operator.attrgetter(*names) if names else (lambda m: ())


def _is_plain(tp: Any) -> bool:
    """Types msgpack encodes as they are (no nested messages inside)."""
    if tp in (int, float, bool, str, bytes, Any, type(None)):
        return True
    if isinstance(tp, type) and issubclass(tp, enum.IntEnum):
        return True
    origin = typing.get_origin(tp)
    if origin in (tuple, list, dict, types.UnionType, typing.Union):
        return all(_is_plain(a) for a in typing.get_args(tp) if a is not Ellipsis)
    return False


def _value_encoder(tp: Any) -> Callable[[Any], Any]:
    if _is_plain(tp):
        return lambda v: v
    if tp in _TAG_OF or tp is AnyMessage:
        return to_wire
    origin = typing.get_origin(tp)
    args = [a for a in typing.get_args(tp) if a is not Ellipsis]
    if origin in (tuple, list):
        inner = _value_encoder(args[0])
        return lambda v: [inner(x) for x in v]
    if origin is dict:
        kenc, venc = _value_encoder(args[0]), _value_encoder(args[1])
        return lambda v: {kenc(k): venc(x) for k, x in v.items()}
    # a union holding a message: encode by the runtime type
    return lambda v: to_wire(v) if type(v) in _TAG_OF else v


# --- decoding -------------------------------------------------------------


def decode(data: bytes) -> Any:
    """Bytes → message; anything invalid raises :class:`CodecError`."""
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=False, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise CodecError(f"not msgpack: {exc}") from None
    return from_wire(obj)


def from_wire(obj: Any) -> Any:
    if not isinstance(obj, list) or not obj:
        raise CodecError(f"a message is a non-empty array, got {type(obj).__name__}")
    tag = obj[0]
    if type(tag) is not int:
        raise CodecError(f"message tag must be an int, got {type(tag).__name__}")
    cls = _BY_TAG.get(tag)
    if cls is None:
        raise CodecError(f"unknown message tag {tag}")
    dec = _DECODERS.get(cls)
    if dec is None:
        dec = _DECODERS[cls] = _compile_decoder(cls)
    return dec(obj)


def _compile_decoder(cls: type) -> Callable[[list], Any]:
    attrs.resolve_types(cls)
    fields = attrs.fields(cls)
    checks = [(f.name, _value_decoder(f.type)) for f in fields]
    arity = len(fields) + 1
    name = cls.__qualname__

    def decode_fields(obj: list) -> Any:
        if len(obj) != arity:
            raise CodecError(f"{name} takes {arity - 1} fields, got {len(obj) - 1}")
        values = []
        for (fname, check), raw in zip(checks, obj[1:], strict=True):
            try:
                values.append(check(raw))
            except CodecError as exc:
                raise CodecError(f"{name}.{fname}: {exc}") from None
        try:
            return cls(*values)
        except (TypeError, ValueError) as exc:  # validators on the class
            raise CodecError(f"{name}: {exc}") from None

    return decode_fields


def _value_decoder(tp: Any) -> Callable[[Any], Any]:
    if tp is Any:
        return lambda v: v
    if tp is type(None):
        return _exact(type(None), "None")
    if tp is bool:
        return _exact(bool, "bool")
    if tp is int:
        return _integer
    if tp is float:
        return _float
    if tp is str:
        return _exact(str, "str")
    if tp is bytes:
        return _exact(bytes, "bytes")
    if isinstance(tp, type) and issubclass(tp, enum.IntEnum):
        return _enum(tp)
    if tp in _TAG_OF:
        return _nested(tp)
    if tp is AnyMessage:
        return from_wire
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (types.UnionType, typing.Union):
        return _union([_value_decoder(a) for a in args])
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            inner = _value_decoder(args[0])
            return lambda v: tuple(inner(x) for x in _as_list(v))
        items = [_value_decoder(a) for a in args]
        return lambda v: _fixed_tuple(items, v)
    if origin is list:
        inner = _value_decoder(args[0])
        return lambda v: [inner(x) for x in _as_list(v)]
    if origin is dict:
        kdec, vdec = _value_decoder(args[0]), _value_decoder(args[1])

        def dict_of(v: Any) -> dict:
            if not isinstance(v, dict):
                raise CodecError(f"expected a map, got {type(v).__name__}")
            return {kdec(k): vdec(x) for k, x in v.items()}

        return dict_of
    raise TypeError(f"codec cannot handle field type {tp!r}")


def _exact(kind: type, label: str) -> Callable[[Any], Any]:
    def check(v: Any) -> Any:
        if type(v) is not kind:
            raise CodecError(f"expected {label}, got {type(v).__name__}")
        return v

    return check


def _integer(v: Any) -> int:
    if type(v) is not int:
        raise CodecError(f"expected int, got {type(v).__name__}")
    return v


def _float(v: Any) -> float:
    if type(v) is float:
        return v
    if type(v) is int:
        return float(v)
    raise CodecError(f"expected float, got {type(v).__name__}")


def _enum(tp: type[enum.IntEnum]) -> Callable[[Any], Any]:
    def check(v: Any) -> Any:
        try:
            return tp(_integer(v))
        except ValueError:
            raise CodecError(f"{v} is not a {tp.__name__}") from None

    return check


def _nested(cls: type) -> Callable[[Any], Any]:
    def check(v: Any) -> Any:
        msg = from_wire(v)
        if type(msg) is not cls:
            raise CodecError(f"expected {cls.__qualname__}, got {type(msg).__qualname__}")
        return msg

    return check


def _union(options: list[Callable[[Any], Any]]) -> Callable[[Any], Any]:
    def check(v: Any) -> Any:
        errors = []
        for opt in options:
            try:
                return opt(v)
            except CodecError as exc:
                errors.append(str(exc))
        raise CodecError(" or ".join(errors))

    return check


def _as_list(v: Any) -> list:
    if not isinstance(v, list):
        raise CodecError(f"expected an array, got {type(v).__name__}")
    return v


def _fixed_tuple(items: list[Callable[[Any], Any]], v: Any) -> tuple:
    v = _as_list(v)
    if len(v) != len(items):
        raise CodecError(f"expected {len(items)} items, got {len(v)}")
    return tuple(dec(x) for dec, x in zip(items, v, strict=True))
