"""Records of the grant-table core: mappings, grants in use, copy moves and the
counters, as codec messages for the control channel and the adapter."""

from __future__ import annotations

from shared.codec import message


@message(221)
class GrantMapping:
    """A live ``map_grant_ref``: ``mapper`` holds ``handle`` and maps frame ``gfn``
    of ``granter``'s memory file (read-only if ``readonly``)."""

    handle: int
    mapper: int
    granter: int
    ref: int
    gfn: int
    readonly: bool


@message(222)
class GrantInUse:
    """A grant entry that is mapped: the entry as the guest wrote it (with the
    GTF_reading/writing bits Xen set) and how many mappings pin it."""

    ref: int
    domid: int  #: grantee
    frame: int
    flags: int
    readers: int  #: read-only mappings
    writers: int  #: writable mappings


@message(223)
class GnttabStats:
    """Counters: ops by name, outcomes as ``"op:gntst_name"``, live mappings."""

    ops: dict[str, int]
    status: dict[str, int]
    mappings: int


@message(224)
class CopyMove:
    """One validated ``GNTTABOP_copy``: ``len`` bytes from a frame of one domain
    to a frame of another."""

    src_dom: int
    src_gfn: int
    src_offset: int
    dst_dom: int
    dst_gfn: int
    dst_offset: int
    len: int
