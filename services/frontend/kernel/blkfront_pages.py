"""blkfront's data pages: grants (persistent where the backend offers them,
as Linux keeps its grant pool), and the copies between the caller's buffers
and the granted pages. A mixin of :class:`~.blkfront_core.BlkfrontCore`."""

from __future__ import annotations

import collections
import operator
from collections.abc import Sequence

from services.frontend.kernel import blkfront_request as rq
from services.frontend.kernel.blkfront_gnttab import GrantTable, PagePool
from services.frontend.kernel.blkfront_state import BackendInfo, BioRecord, Part, ShadowEntry
from shared.abi.ring import PAGE_SIZE

GFN, REF = operator.itemgetter(0), operator.itemgetter(1)
_RUNS_KEPT = 4096
#: persistent pages one vbd keeps granted: 24 requests of 256 segments and an
#: indirect page each, what blkback keeps mapped (``MAX_PERSISTENT_GRANTS``).
#: 16 was all a queue of 16 one-MiB requests used, so the pages of any small
#: request beside them were peeled off a run, and the 1 MiB requests built
#: from the pieces went the slow way through blkback for good
MAX_PERSISTENT_PAGES = 24 * 257


class GrantedPages:
    """Pages and grants; ``self`` is the core."""

    grants: GrantTable
    pool: PagePool
    ram: memoryview
    backend: BackendInfo
    backend_domid: int
    bios: dict[int, BioRecord]
    _reads: dict[int, bytes | bytearray]
    #: free persistent pages as the runs requests gave back, by length (a
    #: request of the same size takes one whole: same frames, same layout),
    #: oldest first: the other side touched it longest ago, so copying into it
    #: pulls no cache lines from the other core (the newest made a 1 MiB copy
    #: take twice as long)
    persistent_free: dict[int, list[tuple[tuple[int, int], ...]]]
    _free_count: int
    persistent_all: dict[tuple[int, int], None]
    stats: collections.Counter[str]
    #: per run of persistent pages (first page, length): the pages, their refs,
    #: the run's address or None, indirect contents by sector count
    _runs: dict[tuple[tuple[int, int], int], tuple[tuple, list[int], int | None, dict]]

    @property
    def _persistent(self) -> bool:
        return self.backend.persistent

    def _data_pages(self, n: int, readonly: bool) -> Sequence[tuple[int, int]] | None:
        if not self._persistent:
            return self._grant_fresh(n, readonly)
        if n == 0:
            return []
        runs = self.persistent_free.get(n)
        if runs:  # a run a request of this size gave back: its layout is known
            return self._take_run(n, runs)  # the same tuple: _layout knows it by identity
        if len(self.persistent_all) + n <= MAX_PERSISTENT_PAGES and self.grants.available >= n:
            # a size not seen yet: new pages, one run of frames if there is one
            # (taking them from other sizes' runs would break those for good)
            gfns = self.pool.alloc_run(n) if n > 1 else None
            more = self._grant_fresh(n, readonly=False, gfns=gfns)
            if more is not None:
                self.persistent_all.update(dict.fromkeys(more))
                return more
        if self._free_count < n:
            return None  # wait for answers to give pages back
        out: list[tuple[int, int]] = []
        while len(out) < n:
            # the pool is full: peel what is needed off the shortest longer
            # run, so that long runs stay whole; failing that, take the
            # longest run whole
            need = n - len(out)
            size = min((k for k in self.persistent_free if k > need), default=0)
            size = size or max(self.persistent_free)
            run = self._take_run(size, self.persistent_free[size])
            out += run[:need]
            if len(run) > need:
                self._put_run(run[need:])
        return out

    def _take_run(self, size: int, runs: list[tuple[tuple[int, int], ...]]) -> tuple:
        run = runs.pop(0)  # the oldest: see persistent_free
        if not runs:
            del self.persistent_free[size]
        self._free_count -= size
        return run

    def _put_run(self, run: tuple[tuple[int, int], ...]) -> None:
        self.persistent_free.setdefault(len(run), []).append(run)
        self._free_count += len(run)

    def _grant_fresh(
        self, n: int, readonly: bool, gfns: list[int] | None = None
    ) -> list[tuple[int, int]] | None:
        """``n`` pages granted now (``gfns``, else any free frames)."""
        if n == 0:
            return []
        if self.grants.available < n:
            if gfns:
                self.pool.free(gfns)
            return None
        gfns = gfns or self.pool.alloc(n)
        if gfns is None:
            return None
        return [(g, self.grants.grant(self.backend_domid, g, readonly)) for g in gfns]

    def _release(self, entry: ShadowEntry) -> None:
        persistent = self._persistent
        if entry.indirect_pages:
            self._release_pages(entry.indirect_pages, persistent)
        self._release_pages(entry.pages, persistent)

    def _release_pages(self, pages: Sequence[tuple[int, int]], persistent: bool) -> None:
        # A request's pages are all persistent or none is: _data_pages takes them
        # all from the pool, and the pool is only added to or emptied whole.
        if persistent and pages and pages[0] in self.persistent_all:
            self._put_run(tuple(pages))
            return
        for gfn, ref in pages:
            self._revoke(gfn, ref)

    def _revoke(self, gfn: int, ref: int) -> None:
        if self.grants.end(ref):
            self.pool.free([gfn])
        else:
            self.pool.leak([gfn])
            self.stats["leaked_grants"] += 1

    def _layout(self, pages: tuple[tuple[int, int], ...]) -> tuple[list[int], int | None]:
        """The grant refs of ``pages`` and, when their frames follow one another
        in guest RAM, the byte address of the first (one copy moves them all).
        Persistent pages come back in the same runs request after request, so
        a run's answer is kept, keyed by its first page and checked whole."""
        if len(pages) == 1:
            ((gfn, ref),) = pages
            return [ref], gfn * PAGE_SIZE
        if not pages:
            return [], None
        key = (pages[0], len(pages))
        hit = self._runs.get(key)
        if hit is not None and (hit[0] is pages or hit[0] == pages):
            return hit[1], hit[2]
        refs = list(map(REF, pages))
        start = _one_run(pages)
        if self._persistent:
            if len(self._runs) >= _RUNS_KEPT:
                self._runs.clear()  # sizes keep changing: start over
            self._runs[key] = (pages, refs, start, {})
        return refs, start

    def _indirect(
        self, pages: tuple[tuple[int, int], ...], refs: list[int], nsectors: int
    ) -> list[bytes]:
        """The indirect pages' contents for ``pages`` (:func:`rq.indirect_contents`),
        kept with the run's layout for the next request over the same run."""
        hit = self._runs.get((pages[0], len(pages)))
        if hit is None or (hit[0] is not pages and hit[0] != pages):
            return rq.indirect_contents(nsectors, refs)
        contents = hit[3].get(nsectors)
        if contents is None:
            contents = hit[3][nsectors] = rq.indirect_contents(nsectors, refs)
        return contents

    def _forget_runs(self) -> None:
        self._runs.clear()

    def _copy_in(self, part: Part, pages: Sequence[tuple[int, int]], start: int | None) -> None:
        data = self.bios[part.bio].data
        left = part.nsectors * rq.SECTOR
        at = part.offset
        if start is not None:  # consecutive frames: one copy
            self.ram[start : start + left] = memoryview(data)[at : at + left]
            return
        for gfn, _ in pages:
            n = min(PAGE_SIZE, left)
            self.ram[gfn * PAGE_SIZE : gfn * PAGE_SIZE + n] = data[at : at + n]
            at, left = at + n, left - n

    def _copy_out(self, entry: ShadowEntry) -> None:
        part = entry.part
        left = part.nsectors * rq.SECTOR
        at = part.offset
        start = self._layout(entry.pages)[1]
        if start is not None and at == 0 and part.nsectors == self.bios[part.bio].nsectors:
            self._reads[part.bio] = self.ram[start : start + left].tobytes()  # the whole bio
            return
        size = self.bios[part.bio].nsectors * rq.SECTOR
        buf = self._reads.get(part.bio)
        if not isinstance(buf, bytearray) or len(buf) != size:
            buf = self._reads[part.bio] = bytearray(size)
        if start is not None:  # consecutive frames: one copy
            buf[at : at + left] = self.ram[start : start + left]
            return
        for gfn, _ in entry.pages:
            n = min(PAGE_SIZE, left)
            buf[at : at + n] = self.ram[gfn * PAGE_SIZE : gfn * PAGE_SIZE + n]
            at, left = at + n, left - n


def _one_run(pages: Sequence[tuple[int, int]]) -> int | None:
    """The byte address of ``pages`` when their frames follow one another in
    guest RAM, else None."""
    if not pages:
        return None
    first, last = pages[0][0], pages[-1][0]
    if last - first != len(pages) - 1 or list(map(GFN, pages)) != list(range(first, last + 1)):
        return None
    return first * PAGE_SIZE
