"""What plugin routes use: decorators that mark a view's access, and body reading."""

from .views import (
    AuthInfo,
    container_scoped,
    current_auth,
    public,
    read_json,
)

__all__ = ["AuthInfo", "container_scoped", "current_auth", "public", "read_json"]
