"""Transactions (xen-reference section 1.6): snapshot isolation, EAGAIN on conflict.

A transaction works on a private copy of the store taken at TRANSACTION_START
(cheap: nodes are shared until changed). Nothing it does is visible outside,
and it fires no watch, until it commits. For every node it looks at or changes
it remembers what that node was in its snapshot — a generation, "absent", or
for the deepest existing ancestor of a node it creates, merely "exists". At
commit those records are compared with the live store: any difference means
another writer got there first, and the commit fails with EAGAIN with nothing
applied (the client retries the whole transaction, as Linux and libxenstore
do). Otherwise the transaction's operations are replayed on the live store in
order, which makes the journal records and the watch events of a commit
exactly those of the same requests made outside a transaction.

Two transactions that each add a different child under the same existing
directory do not conflict (ocaml-xenstore's ``device_create_coalesce``): the
directory is recorded as "exists", not by generation, unless the transaction
listed or read it. C xenstored 4.17 checks only nodes first read in the
transaction; written nodes are checked here too (QEMU's ``tx_fail``: a blind
write racing an outside write of the same node fails with EAGAIN), which is
stricter and keeps commits serialisable.
"""

from __future__ import annotations

from typing import Any, Final

import attrs

from services.xenstore.store import Node, Store

#: accessed-record value: the node had to exist, whatever its generation
EXISTS: Final = -1


@attrs.define(eq=False)
class Transaction:
    """One open transaction of one connection."""

    id: int  #: the u32 in the header's tx_id
    tree: Store  #: the private copy-on-write tree
    ops: list[tuple[Any, ...]] = attrs.field(factory=list)  #: replayed at commit
    accessed: dict[str, int | None] = attrs.field(factory=dict)  #: path -> gen / None / EXISTS

    @classmethod
    def start(cls, tx_id: int, store: Store) -> Transaction:
        return cls(tx_id, store.clone())

    def note(self, path: str, node: Node | None) -> None:
        """Remember ``path`` as first seen (generation, or None if absent)."""
        if path not in self.accessed:
            self.accessed[path] = node.generation if node is not None else None

    def note_exists(self, path: str) -> None:
        """Remember that ``path`` existed (a new child is being hung under it)."""
        self.accessed.setdefault(path, EXISTS)

    def conflicts(self, store: Store) -> list[str]:
        """Paths whose state in ``store`` differs from what this transaction saw."""
        bad = []
        for path, seen in self.accessed.items():
            node = store.get(path)
            if seen == EXISTS:
                if node is None:
                    bad.append(path)
            elif (node.generation if node is not None else None) != seen:
                bad.append(path)
        return bad


@attrs.define(eq=False)
class TransactionTable:
    """The open transactions of one connection, and the ids it hands out."""

    open: dict[int, Transaction] = attrs.field(factory=dict)
    next_id: int = 1

    def start(self, store: Store) -> Transaction:
        # Ids count up per connection, skipping 0 and any still open (u32 wrap).
        while self.next_id == 0 or self.next_id in self.open:
            self.next_id = (self.next_id + 1) & 0xFFFFFFFF
        tx = Transaction.start(self.next_id, store)
        self.open[tx.id] = tx
        self.next_id = (self.next_id + 1) & 0xFFFFFFFF
        return tx

    def get(self, tx_id: int) -> Transaction | None:
        return self.open.get(tx_id)

    def end(self, tx_id: int) -> Transaction:
        return self.open.pop(tx_id)

    def clear(self) -> int:
        n = len(self.open)
        self.open.clear()
        return n

    def __len__(self) -> int:
        return len(self.open)
