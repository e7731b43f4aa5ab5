"""What plugin routes use: decorators that mark a view's access (``public``,
``container_scoped``, ``requires`` a token permission) and document it (``describe``),
body reading (whole, or streamed in chunks: ``streams_body``/``body_chunks``), and the
fast read path (``FAST_READS``) for a plugin's hottest ``GET``."""

from .fastpath import FAST_READS, Reader, json_body
from .streaming import body_chunks, streams_body
from .views import (
    PERMISSIONS,
    AuthInfo,
    Message,
    RouteDoc,
    container_scoped,
    current_auth,
    describe,
    public,
    read_json,
    requires,
)

__all__ = [
    "FAST_READS",
    "PERMISSIONS",
    "AuthInfo",
    "Message",
    "Reader",
    "RouteDoc",
    "body_chunks",
    "container_scoped",
    "current_auth",
    "describe",
    "json_body",
    "public",
    "read_json",
    "requires",
    "streams_body",
]
