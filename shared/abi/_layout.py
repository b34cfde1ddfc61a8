"""C struct layouts described once, with natural x86_64 alignment.

A :class:`Layout` lists a struct's fields in declaration order. From that it
derives the little-endian ``struct`` format (padding made explicit), the size and
every field's offset, and it remembers which C type and header it mirrors so a
test can compile the real header and compare sizes and offsets field by field.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence

import attrs

_PRIMITIVE_SIZE = {"b": 1, "B": 1, "h": 2, "H": 2, "i": 4, "I": 4, "q": 8, "Q": 8, "s": 1}


@attrs.frozen
class Field:
    """One member: ``code`` is a struct code (``B``, ``H``, ``I``, ``Q``, signed
    variants, or ``s`` for raw bytes) or a nested :class:`Layout`; ``count`` makes
    it an array; ``c_name`` is the C member path when it differs from ``name``
    (``u.ref``); ``align`` overrides the natural alignment (unions of bytes)."""

    name: str
    code: str | Layout
    count: int = 1
    c_name: str | None = None
    align: int | None = None

    @property
    def element_size(self) -> int:
        return self.code.size if isinstance(self.code, Layout) else _PRIMITIVE_SIZE[self.code]

    @property
    def alignment(self) -> int:
        if self.align is not None:
            return self.align
        return self.code.alignment if isinstance(self.code, Layout) else self.element_size

    @property
    def size(self) -> int:
        return self.element_size * self.count

    @property
    def checked(self) -> bool:
        """Padding members (leading underscore) have no C counterpart to check."""
        return not self.name.startswith("_")


@attrs.define(eq=False)
class Layout:
    """A C struct as a sequence of fields. ``size`` pads the end to the
    alignment of the widest member unless ``size`` is given explicitly."""

    c_type: str
    header: str
    fields: Sequence[Field]
    explicit_size: int | None = None
    offsets: dict[str, int] = attrs.field(init=False)
    size: int = attrs.field(init=False)
    alignment: int = attrs.field(init=False)
    format: str = attrs.field(init=False)
    struct: struct.Struct = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        offset = 0
        fmt: list[str] = []
        self.offsets = {}
        self.alignment = max((f.alignment for f in self.fields), default=1)
        for f in self.fields:
            aligned = -(-offset // f.alignment) * f.alignment
            if aligned > offset:
                fmt.append(f"{aligned - offset}x")
            offset = aligned
            self.offsets[f.name] = offset
            fmt.append(_field_format(f))
            offset += f.size
        size = -(-offset // self.alignment) * self.alignment
        if self.explicit_size is not None:
            if self.explicit_size < offset:
                raise ValueError(f"{self.c_type}: explicit size {self.explicit_size} < {offset}")
            size = self.explicit_size
        if size > offset:
            fmt.append(f"{size - offset}x")
        self.size = size
        self.format = "<" + "".join(fmt)
        self.struct = struct.Struct(self.format)
        if self.struct.size != self.size:  # pragma: no cover - a bug in this module
            raise AssertionError(f"{self.c_type}: format {self.format} is not {self.size} bytes")
        _REGISTRY.append(self)

    def checked_offsets(self) -> Iterator[tuple[str, int]]:
        """(C member path, offset) for every member that has a C counterpart."""
        for f in self.fields:
            if f.checked:
                yield (f.c_name or f.name, self.offsets[f.name])


def _field_format(f: Field) -> str:
    if isinstance(f.code, Layout):
        return f.code.format[1:] * f.count
    if f.code == "s":
        return f"{f.count}s"
    return f"{f.count}{f.code}" if f.count > 1 else f.code


def layout(c_type: str, header: str, *fields: Field | tuple, size: int | None = None) -> Layout:
    """Build and register a :class:`Layout`; tuples are ``Field`` arguments."""
    built = [f if isinstance(f, Field) else Field(*f) for f in fields]
    return Layout(c_type, header, built, size)


_REGISTRY: list[Layout] = []


def registered() -> list[Layout]:
    """Every layout defined so far (import the ABI modules first)."""
    return list(_REGISTRY)
