"""Every error the file layer raises, in one tree, and what the API answers for each.

::

    FileError               base (an ``AgentError``); ``message`` is the client's text
    ├── InvalidPath         400  Invalid path: <reason>
    │   └── PathEscapes     400  Invalid path: path escapes volume
    ├── NotAFile            400  Not a file: <path>
    ├── NotAFolder          400  Not a folder: <path>
    ├── BadArchive          400  Invalid archive: <reason>   (tarball: refused entries)
    ├── PathNotFound        404  Path not found: <path>
    ├── VolumeNotFound      404  Volume not found   (the volume's folder vanished)
    ├── FileExists          409  File already exists at path: <path>
    ├── FolderExists        409  A folder exists at path: <path>
    ├── QuotaExceeded       409  Disk quota exceeded   (the volume's size_limit, §15)
    ├── NoSpace             500  No space left in the volume
    └── FileOperationFailed 500  File operation failed: <OS reason>

These are plain exceptions: the file layer knows nothing of HTTP. Each one carries the
contract's message (``message``, also ``str(error)``) and a machine ``code``; the API
answers ``{"error": message, "code": code}`` with the status ``api_status(error)`` reads
from ``API_STATUS`` (the nearest class of the error's MRO that the table names, so a
subclass answers like its parent). Messages name only the client's relative path, never
a host path. ``OSError``\\ s met while resolving or acting on a path become one of these
through ``from_os_error``.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

from ..errors import AgentError

__all__ = [
    "API_STATUS",
    "BadArchive",
    "FileError",
    "FileExists",
    "FileOperationFailed",
    "FolderExists",
    "InvalidPath",
    "NoSpace",
    "NotAFile",
    "NotAFolder",
    "PathEscapes",
    "PathNotFound",
    "QuotaExceeded",
    "VolumeNotFound",
    "api_status",
    "from_os_error",
]

log = logging.getLogger(__name__)


class FileError(AgentError):
    """A file operation was refused or failed; nothing was left half-done."""

    #: A stable machine name for the error (the API's ``code``); a class default that one
    #: instance may narrow (``InvalidPath(..., code="path_traversal")``).
    code: str = "file_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class InvalidPath(FileError):
    """``Invalid path: <reason>``: the path breaks a rule, or resolving it does."""

    code = "invalid_path"

    def __init__(self, reason: str, *, code: str | None = None) -> None:
        super().__init__(f"Invalid path: {reason}", code=code)
        self.reason = reason


class PathEscapes(InvalidPath):
    """The path resolves (through links) to somewhere outside the root."""

    code = "path_escapes_volume"

    def __init__(self) -> None:
        super().__init__("path escapes volume")


class PathNotFound(FileError):
    code = "path_not_found"

    def __init__(self, path: str) -> None:
        super().__init__(f"Path not found: {path}")


class VolumeNotFound(FileError):
    """A registered volume's folder is missing (or is no longer a folder)."""

    code = "volume_not_found"

    def __init__(self) -> None:
        super().__init__("Volume not found")


class FileExists(FileError):
    code = "file_exists"

    def __init__(self, path: str) -> None:
        super().__init__(f"File already exists at path: {path}")


class FolderExists(FileError):
    code = "folder_exists"

    def __init__(self, path: str) -> None:
        super().__init__(f"A folder exists at path: {path}")


class NotAFolder(FileError):
    code = "not_a_folder"

    def __init__(self, path: str) -> None:
        super().__init__(f"Not a folder: {path}")


class NotAFile(FileError):
    code = "not_a_file"

    def __init__(self, path: str) -> None:
        super().__init__(f"Not a file: {path}")


class QuotaExceeded(FileError):
    """A write would take the volume over its ``size_limit`` (contract §15); raised before
    anything is written where the size is known, else after the partial output is gone."""

    code = "disk_quota_exceeded"

    def __init__(self) -> None:
        super().__init__("Disk quota exceeded")


class NoSpace(FileError):
    """The file system (or the volume's quota) is full; nothing was left half-written."""

    code = "no_space"

    def __init__(self) -> None:
        super().__init__("No space left in the volume")


class FileOperationFailed(FileError):
    """An unexpected OS error; the message carries the OS reason, never a path."""

    code = "file_operation_failed"

    def __init__(self, exc: OSError) -> None:
        super().__init__(f"File operation failed: {exc.strerror or type(exc).__name__}")
        self.errno = exc.errno


class BadArchive(FileError):
    """An archive being extracted holds an entry the file layer refuses (absolute, ``..``,
    a device, a link leaving the destination), is corrupt, or exceeds its limits."""

    code = "invalid_archive"

    def __init__(self, reason: str) -> None:
        super().__init__(f"Invalid archive: {reason}")
        self.reason = reason


#: The HTTP status the API answers for each error class (see the tree above).
API_STATUS: Final[Mapping[type[FileError], int]] = MappingProxyType(
    {
        FileError: 500,
        InvalidPath: 400,
        NotAFile: 400,
        NotAFolder: 400,
        BadArchive: 400,
        PathNotFound: 404,
        VolumeNotFound: 404,
        FileExists: 409,
        FolderExists: 409,
        QuotaExceeded: 409,
        NoSpace: 500,
        FileOperationFailed: 500,
    }
)


def api_status(error: FileError) -> int:
    """The status the API answers ``error`` with: the table's entry for its nearest class."""
    for cls in type(error).__mro__:
        if issubclass(cls, FileError) and cls in API_STATUS:
            return API_STATUS[cls]
    return API_STATUS[FileError]


def from_os_error(exc: OSError, path: str, *, no_links: bool = False) -> FileError:
    """The file error for an OS error met while resolving or acting on the client path
    ``path``; ``no_links`` says the resolution refused every link (``ELOOP`` then means
    "went through a link", not "a loop")."""
    code = exc.errno
    if code == errno.EXDEV:
        return PathEscapes()
    if code == errno.ELOOP:
        if no_links:
            return InvalidPath("path goes through a link", code="path_through_link")
        return InvalidPath("too many levels of symbolic links", code="symlink_loop")
    if code in (errno.ENOENT, errno.ENOTDIR):
        return PathNotFound(path)
    if code == errno.ENAMETOOLONG:
        return InvalidPath("name too long", code="name_too_long")
    if code in (errno.ENOSPC, errno.EDQUOT):
        return NoSpace()
    log.warning("file operation on %r failed: %s", path, exc)
    return FileOperationFailed(exc)
