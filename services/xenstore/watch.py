"""Watches (xen-reference section 1.5): which changes fire which watch, and how
the event path is written.

A watch on W fires for a change of path P when P is W or lies below W. Removing
a subtree fires its root that way, plus an *exact* event for every removed
descendant that some watch names precisely (so a watch on ``/a/b/c`` learns that
``rm /a`` took its node). A watch registered with a relative path reports
relative event paths, stripped of the watcher's home ``/local/domain/<id>/``.
Special watches (``@introduceDomain``, ``@releaseDomain``) fire only on their own
name. Whether the watcher may see the event at all (read permission) is decided
by the caller, which knows the node's permissions.
"""

from __future__ import annotations

from collections.abc import Iterator

import attrs

from shared.abi.xs_wire import domain_path, resolve_path


@attrs.frozen
class Watch:
    """One registered watch."""

    path: str  #: as the client registered it (relative, absolute or @special)
    token: bytes  #: opaque, echoed in every event
    node: str  #: absolute path (or the @special name) it watches
    home: str | None  #: prefix to strip from event paths when ``path`` was relative

    @classmethod
    def register(cls, path: str, token: bytes, domid: int) -> Watch:
        relative = not path.startswith(("/", "@"))
        node = resolve_path(path, domid)
        return cls(path, token, node, domain_path(domid) + "/" if relative else None)

    @property
    def key(self) -> tuple[str, bytes]:
        """Identity for duplicate detection (C compares the canonical path)."""
        return (self.node, self.token)

    def fires(self, path: str, exact: bool = False) -> bool:
        """Whether a change of ``path`` fires this watch."""
        if self.node == path:
            return True
        if exact or path.startswith("@"):
            return False
        if self.node == "/":
            return True
        return path.startswith(self.node) and path[len(self.node) : len(self.node) + 1] == "/"

    def event_path(self, path: str) -> str:
        """``path`` as the watcher sees it: relative for a relative watch."""
        if self.home is not None and path.startswith(self.home):
            return path[len(self.home) :]
        return path


@attrs.define(eq=False)
class WatchTable:
    """The watches of one connection, in registration order."""

    watches: dict[tuple[str, bytes], Watch] = attrs.field(factory=dict)

    def add(self, watch: Watch) -> bool:
        """False if the same path and token are already watched (EEXIST)."""
        if watch.key in self.watches:
            return False
        self.watches[watch.key] = watch
        return True

    def remove(self, node: str, token: bytes) -> bool:
        return self.watches.pop((node, token), None) is not None

    def matching(self, path: str, exact: bool = False) -> Iterator[Watch]:
        for watch in self.watches.values():
            if watch.fires(path, exact):
                yield watch

    def clear(self) -> int:
        n = len(self.watches)
        self.watches.clear()
        return n

    def __len__(self) -> int:
        return len(self.watches)
