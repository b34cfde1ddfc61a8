"""Byte-exact layouts of the structures Xen shares between domains.

One module per structure family (``ring``, ``blkif``, ``netif``, ``grant``,
``xs_wire``, ``sharedinfo``) plus ``constants`` for the hypercall numbers, errno
values and feature bits. Every layout registers itself with ``_layout`` so the
test suite can compare it with the C compiler's answer from the real headers.
"""
