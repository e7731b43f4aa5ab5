"""What plugin routes use: decorators that mark a view's access (``public``,
``container_scoped``, ``requires`` a token permission), body reading, and the
fast read path (``FAST_READS``) for a plugin's hottest ``GET``."""

from .fastpath import FAST_READS, Reader, json_body
from .views import (
    PERMISSIONS,
    AuthInfo,
    container_scoped,
    current_auth,
    public,
    read_json,
    requires,
)

__all__ = [
    "FAST_READS",
    "PERMISSIONS",
    "AuthInfo",
    "Reader",
    "container_scoped",
    "current_auth",
    "json_body",
    "public",
    "read_json",
    "requires",
]
