"""The one exception every request handler raises to refuse a request."""

from __future__ import annotations


class XsError(Exception):
    """Refuse the current request with the XS_ERROR ``name`` (``ENOENT``, ...)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name
