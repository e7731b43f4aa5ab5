"""What plugin routes use: decorators that mark a view's access, body reading, and the
fast read path (``FAST_READS``) for a plugin's hottest ``GET``."""

from .fastpath import FAST_READS, Reader, json_body
from .views import (
    AuthInfo,
    container_scoped,
    current_auth,
    public,
    read_json,
)

__all__ = [
    "FAST_READS",
    "AuthInfo",
    "Reader",
    "container_scoped",
    "current_auth",
    "json_body",
    "public",
    "read_json",
]
