"""Safe file access inside a volume: every path is resolved beneath a directory handle.

Why this package exists: a container owns its volume and may plant or swap symlinks in
it at any moment, while the agent (root, on the host) reads and writes the same folder.
Most security advisories of peer daemons were escapes through such links, and the ones
fixed with "resolve, then check the prefix" came back as races. So nothing here turns a
client path into a host path: every operation starts from an open descriptor of the
volume root (``Root``) and resolves relative to it, never following a link out of it.

Modules, bottom up:

* ``errors``: the ``FileError`` tree (plain exceptions, no HTTP) and ``API_STATUS``, the
  status the API answers for each; the tree is drawn in that module's docstring;
* ``paths``: ``RelPath`` and ``parse``, the client path rules (no I/O);
* ``resolve``: ``openat2(RESOLVE_BENEATH)``, or the ``O_NOFOLLOW`` component walk where
  the kernel lacks it, and ``rename_noreplace``;
* ``tree``: walk, copy and all-or-nothing merge of trees, on folder descriptors;
* ``root``: ``Root``, the volume root object every plugin works through;
* ``tarball``: a tree as a streamed tar (``tar_pieces``) and the safe extraction of a tar
  stream (``extract_tar``), shared by the plugins that write or read tar archives; the same
  through zstd (``write_tar_zst``, ``zst_reader``).

This module is part of the public surface: plugins (built-in and third-party) import
the names below from ``lightd.files`` and nothing from its submodules. Everything here
blocks: call it from a worker thread.
"""

from __future__ import annotations

from .errors import (
    API_STATUS,
    BadArchive,
    FileError,
    FileExists,
    FileOperationFailed,
    FolderExists,
    InvalidPath,
    NoSpace,
    NotAFile,
    NotAFolder,
    PathEscapes,
    PathNotFound,
    QuotaExceeded,
    VolumeNotFound,
    api_status,
)
from .paths import NAME_MAX, PATH_MAX, ROOT, RelPath, parse, parse_owner
from .resolve import openat2_available, rename_exchange, rename_noreplace
from .root import (
    AtomicFile,
    DirEntry,
    Root,
    Usage,
    remove_private_folder,
    sweep_private_folders,
)
from .tarball import (
    BoundedTarInfo,
    entry_path,
    extract_tar,
    link_stays_inside,
    tar_pieces,
    write_tar_zst,
    zst_reader,
)
from .tree import (
    CHUNK,
    MAX_DEPTH,
    TEMP_PREFIX,
    Owner,
    ScanEntry,
    WalkEntry,
    copy_data,
    merge_tree,
)

__all__ = [
    "API_STATUS",
    "CHUNK",
    "MAX_DEPTH",
    "NAME_MAX",
    "PATH_MAX",
    "ROOT",
    "TEMP_PREFIX",
    "AtomicFile",
    "BadArchive",
    "BoundedTarInfo",
    "DirEntry",
    "FileError",
    "FileExists",
    "FileOperationFailed",
    "FolderExists",
    "InvalidPath",
    "NoSpace",
    "NotAFile",
    "NotAFolder",
    "Owner",
    "PathEscapes",
    "PathNotFound",
    "QuotaExceeded",
    "RelPath",
    "Root",
    "ScanEntry",
    "Usage",
    "VolumeNotFound",
    "WalkEntry",
    "api_status",
    "copy_data",
    "entry_path",
    "extract_tar",
    "link_stays_inside",
    "merge_tree",
    "openat2_available",
    "parse",
    "parse_owner",
    "remove_private_folder",
    "rename_exchange",
    "rename_noreplace",
    "sweep_private_folders",
    "tar_pieces",
    "write_tar_zst",
    "zst_reader",
]
