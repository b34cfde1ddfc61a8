"""The verb registry behind the ``domsplit`` CLI.

A verb is one function ``(args) -> exit status`` registered under its words,
with its arguments declared by decorators next to it::

    @verb("host kill", help="SIGKILL one service (not restarted)")
    @arg("service")
    @topology_args
    @json_arg
    def host_kill(args: argparse.Namespace) -> int: ...

:func:`build_parser` turns the registry into argparse subcommands, making a
parent command (``host``) for every group of words. New verbs (``create``,
``list``, ``migrate``, ...) live in their own module and only need importing
from :mod:`services.toolstack.cli`.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

VerbFn = Callable[[argparse.Namespace], int]

# Used when neither --topology nor $DOMSPLIT_TOPOLOGY names one.
DEFAULT_TOPOLOGY = Path(__file__).resolve().parents[2] / "deploy" / "demo.toml"


@attrs.frozen
class Arg:
    flags: tuple[str, ...]
    options: dict[str, Any]


@attrs.frozen
class Verb:
    words: tuple[str, ...]  # ("host", "up")
    fn: VerbFn
    help: str
    args: tuple[Arg, ...]


VERBS: dict[tuple[str, ...], Verb] = {}
GROUP_HELP: dict[str, str] = {}


def group(word: str, help: str) -> None:
    """Describe a parent command (``host``) in ``domsplit --help``."""
    GROUP_HELP[word] = help


def verb(words: str, *, help: str) -> Callable[[VerbFn], VerbFn]:
    """Register the decorated function as the verb ``words``."""

    def register(fn: VerbFn) -> VerbFn:
        key = tuple(words.split())
        if key in VERBS:
            raise ValueError(f"verb {words!r} registered twice")
        declared = tuple(reversed(getattr(fn, "_domsplit_args", ())))
        VERBS[key] = Verb(key, fn, help, declared)
        return fn

    return register


def arg(*flags: str, **options: Any) -> Callable[[VerbFn], VerbFn]:
    """Declare one argparse argument of a verb (decorators apply bottom-up,
    so arguments are collected in reverse and flipped by :func:`verb`)."""

    def add(fn: VerbFn) -> VerbFn:
        declared = getattr(fn, "_domsplit_args", [])
        fn._domsplit_args = [*declared, Arg(flags, options)]  # type: ignore[attr-defined]
        return fn

    return add


def topology_args(fn: VerbFn) -> VerbFn:
    """``--topology FILE`` and ``--host NAME``: which host a verb acts on."""
    fn = arg(
        "--host",
        default=None,
        help="host of the topology (default: the first one)",
    )(fn)
    return arg(
        "-t",
        "--topology",
        default=None,
        help=f"topology file (default: $DOMSPLIT_TOPOLOGY or {DEFAULT_TOPOLOGY.name})",
    )(fn)


def json_arg(fn: VerbFn) -> VerbFn:
    """``--json``: print machine-readable JSON instead of tables."""
    return arg("--json", action="store_true", help="print JSON for scripts")(fn)


def topology_path(args: argparse.Namespace) -> Path:
    """The topology a verb acts on, made absolute (children get this path)."""
    chosen = (
        getattr(args, "topology_file", None)
        or getattr(args, "topology", None)
        or os.environ.get("DOMSPLIT_TOPOLOGY")
        or DEFAULT_TOPOLOGY
    )
    return Path(chosen).resolve()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="domsplit",
        description="domsplit toolstack: bring hosts up and down, run the demo, manage domains.",
    )
    top = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    for words, v in sorted(VERBS.items()):
        subs = top
        for i, word in enumerate(words[:-1]):
            path = " ".join(words[: i + 1])
            if path not in groups:
                g = subs.add_parser(word, help=GROUP_HELP.get(path, ""))
                groups[path] = g.add_subparsers(dest=f"verb_{i + 1}", metavar="VERB", required=True)
            subs = groups[path]
        p = subs.add_parser(words[-1], help=v.help, description=v.help)
        for a in v.args:
            p.add_argument(*a.flags, **a.options)
        p.set_defaults(run=v.fn)
    return parser
