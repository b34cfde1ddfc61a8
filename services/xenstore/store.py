"""The node tree: values, permissions, children in insertion order, generations.

Nodes are immutable and shared: a change copies the path from the changed node
up to the root and leaves every other node in place. A snapshot of the whole
store is therefore just a reference to a root, which is what transactions
(snapshot isolation) and journal compaction build on.

Every node carries a generation count, taken from one counter that only grows,
so that removing and re-creating a node gives it a new generation (as C
xenstored's global 64-bit counter does). A node's generation changes when its
value or permissions are written and when its list of children changes; a
change further down the tree leaves it alone. Transactions compare generations
to detect conflicts; DIRECTORY_PART returns the generation so a client can
tell that a directory changed between two chunks.

Mutations are recorded in ``log`` as physical records (``set`` a node to a
value and permission list, ``rm`` a subtree), which is what the journal stores
and what :meth:`Store.apply` replays.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import attrs
import msgpack

from services.xenstore.perms import DOM0_ONLY, Perms
from shared.abi.xs_wire import parse_perms

SPECIAL_NODES = ("@introduceDomain", "@releaseDomain")

_NO_CHILDREN: dict[str, Node] = {}


@attrs.frozen(eq=True, repr=False)
class Node:
    """One node; never modified once built."""

    value: bytes  #: raw bytes, no terminator, may contain NULs
    perms: Perms  #: entry 0 = owner and default access
    children: dict[str, Node]  #: name -> node, in creation order; never mutated
    generation: int  #: changes when value, perms or the set of children change

    @property
    def owner(self) -> int:
        return self.perms[0].domid

    def __repr__(self) -> str:
        return f"Node({self.value!r}, {' '.join(map(str, self.perms))}, gen={self.generation}, children={list(self.children)})"


def split_path(path: str) -> list[str]:
    """Names along an absolute path: ``/`` is ``[]``, ``/a/b`` is ``["a", "b"]``."""
    return path.split("/")[1:] if path != "/" else []


def join_path(parent: str, name: str) -> str:
    return f"/{name}" if parent == "/" else f"{parent}/{name}"


def parent_path(path: str) -> str:
    head = path.rsplit("/", 1)[0]
    return head or "/"


@attrs.define(eq=False)
class Generations:
    """The counter every node generation is drawn from (shared with the private
    trees of transactions, so generations stay unique store-wide)."""

    last: int = 0

    def next(self) -> int:
        self.last += 1
        return self.last


def _perm_text(perms: Perms) -> str:
    return " ".join(map(str, perms))


@attrs.define(eq=False)
class Store:
    """A tree of nodes plus per-owner node counts (for the nodes quota)."""

    root: Node
    generations: Generations
    owned: dict[int, int]  #: domid -> nodes it owns (the root counts for dom0)
    specials: dict[str, Perms]  #: perms of @introduceDomain / @releaseDomain
    log: list[list[Any]] = attrs.field(factory=list)  #: physical changes since last drained

    @classmethod
    def empty(cls) -> Store:
        gens = Generations()
        root = Node(b"", DOM0_ONLY, _NO_CHILDREN, gens.next())
        return cls(root, gens, {0: 1}, {name: DOM0_ONLY for name in SPECIAL_NODES})

    def clone(self) -> Store:
        """A private copy for a transaction: shares every node, costs O(domains)."""
        return Store(self.root, self.generations, dict(self.owned), dict(self.specials), [])

    # --- reading ---------------------------------------------------------

    def get(self, path: str) -> Node | None:
        node: Node | None = self.root
        for name in split_path(path):
            node = node.children.get(name)
            if node is None:
                return None
        return node

    def nearest(self, path: str) -> tuple[str, Node]:
        """The deepest existing node on the way to ``path`` (``path`` itself if
        it exists): whose permissions decide about a missing node."""
        node, at = self.root, "/"
        for name in split_path(path):
            child = node.children.get(name)
            if child is None:
                break
            node, at = child, join_path(at, name)
        return at, node

    def missing(self, path: str) -> int:
        """How many nodes a write of ``path`` would create."""
        at, _ = self.nearest(path)
        return len(split_path(path)) - len(split_path(at))

    def walk(self, path: str = "/") -> Iterator[tuple[str, Node]]:
        """``(path, node)`` of a subtree in pre-order, iteratively (paths may be
        1500 levels deep, beyond Python's recursion limit)."""
        top = self.get(path)
        if top is None:
            return
        stack = [(path, top)]
        while stack:
            at, node = stack.pop()
            yield at, node
            for name in reversed(node.children):
                stack.append((join_path(at, name), node.children[name]))

    @property
    def node_count(self) -> int:
        return sum(self.owned.values())

    # --- mutations ---------------------------------------------------------

    def _descend(self, names: list[str]) -> list[Node | None]:
        chain: list[Node | None] = [self.root]
        node: Node | None = self.root
        for name in names:
            node = node.children.get(name) if node is not None else None
            chain.append(node)
        return chain

    def _rebuild(self, names: list[str], chain: list[Node | None], child: Node | None) -> None:
        """Install ``child`` (None: remove) at the end of ``chain``, copying the
        ancestors; only the direct parent gets a new generation, and only when
        its set of children changes."""
        for depth in range(len(names) - 1, -1, -1):
            parent = chain[depth]
            assert parent is not None
            children = dict(parent.children)
            direct = depth == len(names) - 1
            if child is None:
                del children[names[depth]]
            else:
                children[names[depth]] = child
            reshaped = direct and (child is None or chain[depth + 1] is None)
            gen = self.generations.next() if reshaped else parent.generation
            child = Node(parent.value, parent.perms, children, gen)
        assert child is not None
        self.root = child

    def write(self, path: str, value: bytes, new_perms: Callable[[Perms], Perms]) -> list[str]:
        """Set ``path`` to ``value``, creating missing ancestors with empty values.
        ``new_perms(parent_perms)`` gives the list of each created node. Returns
        the paths created, top-down (the leaf last if it was created)."""
        names = split_path(path)
        chain = self._descend(names)
        perms: list[Perms] = [self.root.perms]
        created: list[str] = []
        at = "/"
        for depth in range(1, len(chain)):
            at = join_path(at, names[depth - 1])
            old = chain[depth]
            if old is None:
                perms.append(new_perms(perms[-1]))
                created.append(at)
            else:
                perms.append(old.perms)
        # Build the missing part bottom-up, then graft it on the deepest existing node.
        leaf_old = chain[-1]
        node = Node(
            value,
            perms[-1],
            leaf_old.children if leaf_old is not None else _NO_CHILDREN,
            self.generations.next(),
        )
        depth = len(names) - 1
        while depth >= 0 and chain[depth] is None:
            node = Node(b"", perms[depth], {names[depth]: node}, self.generations.next())
            depth -= 1
        graft = depth + 1  # chain[graft] is where the new or changed node hangs
        self._rebuild(names[:graft], chain[: graft + 1], node)
        for p in created:
            owner = self.get(p).owner  # type: ignore[union-attr]
            self.owned[owner] = self.owned.get(owner, 0) + 1
            if p != path:
                self.log.append(["set", p, b"", _perm_text(self.get(p).perms)])  # type: ignore[union-attr]
        self.log.append(["set", path, value, _perm_text(perms[-1])])
        return created

    def rm(self, path: str) -> list[tuple[str, Node]]:
        """Remove the subtree at ``path`` (not ``/``); returns the removed nodes in
        pre-order (empty if there was none)."""
        names = split_path(path)
        assert names, "the root cannot be removed"
        chain = self._descend(names)
        if chain[-1] is None:
            return []
        removed = list(self.walk(path))
        self._rebuild(names, chain, None)
        for _, node in removed:
            self.owned[node.owner] -= 1
            if not self.owned[node.owner]:
                del self.owned[node.owner]
        self.log.append(["rm", path])
        return removed

    def set_perms(self, path: str, perms: Perms) -> None:
        """Replace the permission list of an existing node (or special name)."""
        if path in SPECIAL_NODES:
            self.specials[path] = perms
            self.log.append(["special", path, _perm_text(perms)])
            return
        names = split_path(path)
        chain = self._descend(names)
        old = chain[-1]
        assert old is not None
        new = Node(old.value, perms, old.children, self.generations.next())
        if names:
            self._rebuild(names, chain, new)
        else:
            self.root = new
        if old.owner != perms[0].domid:
            self._move_owner(old.owner, perms[0].domid)
        self.log.append(["set", path, old.value, _perm_text(perms)])

    def _move_owner(self, old: int, new: int) -> None:
        self.owned[old] -= 1
        if not self.owned[old]:
            del self.owned[old]
        self.owned[new] = self.owned.get(new, 0) + 1

    def put(self, path: str, value: bytes, perms: Perms) -> None:
        """Make ``path`` hold exactly ``value`` and ``perms`` (journal replay)."""
        node = self.get(path)
        if node is None:
            self.write(path, value, lambda _parent: perms)
        elif node.value != value:
            self.write(path, value, lambda _parent: perms)
        if self.get(path).perms != perms:  # type: ignore[union-attr]
            self.set_perms(path, perms)

    def apply(self, change: list[Any]) -> None:
        """Replay one physical record of ``log``."""
        kind = change[0]
        if kind == "set":
            self.put(change[1], change[2], tuple(parse_perms(change[3])))
        elif kind == "rm":
            self.rm(change[1])
        elif kind == "special":
            self.set_perms(change[1], tuple(parse_perms(change[2])))
        else:
            raise ValueError(f"unknown store record {kind!r}")

    # --- serialisation (snapshot, migration, tests) ---------------------------

    def flat(self) -> list[list[Any]]:
        """Every node as ``[path, value, perms, generation]`` in pre-order."""
        return [[p, n.value, _perm_text(n.perms), n.generation] for p, n in self.walk()]

    def serialise(self) -> bytes:
        specials = {k: _perm_text(v) for k, v in self.specials.items()}
        return msgpack.packb(
            {"generation": self.generations.last, "nodes": self.flat(), "specials": specials},
            use_bin_type=True,
        )

    @classmethod
    def deserialise(cls, data: bytes) -> Store:
        doc = msgpack.unpackb(data, raw=False)
        nodes = doc["nodes"]
        # Build bottom-up: a node is complete once all of its children are.
        kids: dict[str, dict[str, Node]] = {}
        built: Node | None = None
        owned: dict[int, int] = {}
        for path, value, perm_text, gen in reversed(nodes):
            # Children were collected last-first: restore creation order.
            children = dict(reversed(kids.pop(path, {}).items()))
            built = Node(value, tuple(parse_perms(perm_text)), children, gen)
            owned[built.owner] = owned.get(built.owner, 0) + 1
            if path != "/":
                siblings = kids.setdefault(parent_path(path), {})
                siblings[path.rsplit("/", 1)[1]] = built
        assert built is not None and not kids, "snapshot is not one tree rooted at /"
        return cls(
            built,
            Generations(doc["generation"]),
            owned,
            {k: tuple(parse_perms(v)) for k, v in doc["specials"].items()},
        )

    def dump(self, path: str = "/") -> str:
        """One line per node, ``path = "value" (perms)``, as CONTROL dump shows it."""
        lines = []
        for at, node in self.walk(path):
            value = node.value.decode("utf-8", "backslashreplace")
            lines.append(f'{at} = "{value}" ({_perm_text(node.perms)})')
        return "\n".join(lines) + "\n"
