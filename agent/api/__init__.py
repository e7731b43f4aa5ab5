"""What plugin routes use: decorators that mark a view's access (``public``,
``container_scoped``, ``requires`` a token permission, ``query_token`` for browser links)
and document it (``describe``), body reading (whole, or streamed in chunks:
``streams_body``/``body_chunks``/``body_batches``), how long a stream may go without
hearing from its client (``read_timeout``), and the fast read path (``FAST_READS``)
for a plugin's hottest ``GET``."""

from .fastpath import FAST_READS, Reader, json_body
from .streaming import body_batches, body_chunks, streams_body
from .views import (
    PERMISSIONS,
    AuthInfo,
    Message,
    RouteDoc,
    container_scoped,
    current_auth,
    describe,
    public,
    query_token,
    read_json,
    requires,
    wants_job,
)
from .ws import read_timeout

__all__ = [
    "FAST_READS",
    "PERMISSIONS",
    "AuthInfo",
    "Message",
    "Reader",
    "RouteDoc",
    "body_batches",
    "body_chunks",
    "container_scoped",
    "current_auth",
    "describe",
    "json_body",
    "public",
    "query_token",
    "read_json",
    "read_timeout",
    "requires",
    "streams_body",
    "wants_job",
]
