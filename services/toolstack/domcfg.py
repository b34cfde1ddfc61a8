"""Domain configuration files in the ``xl.cfg`` style.

A file is ``key = value`` lines, values being integers, quoted strings or
``[...]`` lists of them (lists may span lines), ``#`` starting a comment::

    name = "guest1"
    vcpus = 4
    memory = 64            # MiB
    platform = "xen"       # bare | xen-legacy | xen  (the hypervisor personality)
    workloads = [ "callouts:vcpus=0/1,count=200", "ipi_pingpong:from=0,to=1" ]
    disk = [ "target=/tmp/disk.img, vdev=xvda, access=rw" ]

:func:`parse` checks the keys domsplit knows and their types and returns a
:class:`DomainConfig`; unknown keys are kept (``extra``) so a guest kernel can
read options the toolstack does not know about.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import attrs

PLATFORMS = ("bare", "xen-legacy", "xen")
_KEY = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*)$", re.S)


class ConfigError(ValueError):
    """The file is not a usable domain configuration; the message says where."""


@attrs.frozen
class DomainConfig:
    name: str
    vcpus: int = 1
    memory: int = 16  # MiB
    platform: str = "xen"
    feature_mask: int = 0xFFFFFFFF
    workloads: tuple[str, ...] = ()
    disk: tuple[str, ...] = ()
    extra: dict[str, Any] = attrs.Factory(dict)

    @property
    def pages(self) -> int:
        return self.memory * 256

    def to_json(self) -> dict[str, Any]:
        """What the guest kernel reads (the toolstack adds run-time keys)."""
        return {
            "name": self.name,
            "vcpus": self.vcpus,
            "memory": self.memory,
            "platform": self.platform,
            "workloads": [parse_workload(w) for w in self.workloads],
            "disk": list(self.disk),
            **self.extra,
        }


def parse_workload(spec: str) -> dict[str, Any]:
    """``"kind:key=value,key=value"`` → ``{"kind": ..., key: value}``; numbers
    become int or float, ``a/b/c`` a list (``vcpus=0/1/2/3``)."""
    kind, _, rest = spec.partition(":")
    out: dict[str, Any] = {"kind": kind.strip()}
    for item in filter(None, (x.strip() for x in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"workload {spec!r}: {item!r} is not key=value")
        out[key.strip()] = _scalar_or_list(value.strip())
    return out


def _scalar_or_list(value: str) -> Any:
    if "/" in value:
        return [_scalar(v) for v in value.split("/")]
    return _scalar(value)


def _scalar(value: str) -> Any:
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def _statements(text: str) -> list[tuple[int, str]]:
    """``key = value`` statements, joining lines while brackets are open."""
    out: list[tuple[int, str]] = []
    buf, start, depth = "", 0, 0
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = _strip_comment(raw)
        if not line.strip() and not buf:
            continue
        if not buf:
            start = lineno
        buf += line + "\n"
        depth += line.count("[") - line.count("]")
        if depth <= 0:
            out.append((start, buf.strip()))
            buf, depth = "", 0
    if buf:
        raise ConfigError(f"line {start}: unclosed '['")
    return out


def _strip_comment(line: str) -> str:
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
        elif ch == "#":
            return line[:i]
    return line


def parse(text: str) -> DomainConfig:
    values: dict[str, Any] = {}
    for lineno, stmt in _statements(text):
        m = _KEY.match(stmt)
        if not m:
            raise ConfigError(f"line {lineno}: expected 'key = value'")
        key, expr = m.group(1), m.group(2).strip().rstrip(";")
        try:
            value = ast.literal_eval(expr)
        except (ValueError, SyntaxError):
            raise ConfigError(f"line {lineno}: {key}: not a number, string or list") from None
        if isinstance(value, list):
            value = tuple(value)
        values[key] = value
    return _checked(values)


def _checked(values: dict[str, Any]) -> DomainConfig:
    def take(key: str, kind: type | tuple[type, ...], default: Any) -> Any:
        value = values.pop(key, default)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected {getattr(kind, '__name__', kind)}, got {value!r}")
        return value

    if "name" not in values:
        raise ConfigError("name: required")
    name = take("name", str, "")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", name):
        raise ConfigError(f"name: {name!r} is not a valid domain name")
    vcpus = take("vcpus", int, 1)
    if not 1 <= vcpus <= 32:
        raise ConfigError("vcpus: 1 to 32")
    memory = take("memory", int, 16)
    if not 1 <= memory <= 4096:
        raise ConfigError("memory: 1 to 4096 MiB")
    platform = take("platform", str, "xen")
    if platform not in PLATFORMS:
        raise ConfigError(f"platform: one of {', '.join(PLATFORMS)}")
    mask = take("feature_mask", int, 0xFFFFFFFF)
    workloads = take("workloads", tuple, ())
    disk = take("disk", tuple, ())
    for key, items in (("workloads", workloads), ("disk", disk)):
        if not all(isinstance(i, str) for i in items):
            raise ConfigError(f"{key}: a list of strings")
    for spec in workloads:
        parse_workload(spec)
    return DomainConfig(name, vcpus, memory, platform, mask, workloads, disk, values)


def load(path: str | Path) -> DomainConfig:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    return parse(text)
