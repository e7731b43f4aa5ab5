"""The blocking halves of a transfer (run in worker threads): the source's archive and the
target's staged extraction.

Source: ``lightd.files.write_tar_zst`` walks the volume (links stored as links, never
followed) → one ``zstandard`` compressor (multi-threaded, like ``zstd -T0``) → pieces of
about ``CHUNK`` bytes, the sha256 of the compressed stream computed on the way. For a
stopped server the stream is the same bytes every time it is made (same walk, same
headers, zstd's output does not depend on its thread count), so a resume makes it again
and skips the ``skip`` bytes the target already holds, comparing their sha256 with the
target's (``prefix``) before it sends one byte more: a volume changed in between fails
the transfer instead of splicing two archives.

Target: the pieces received are read by ``stage`` → ``lightd.files.zst_reader`` →
``lightd.files.extract_tar`` into a private staging folder beside the volumes (same file
system: becoming the volume is a rename), every entry checked (absolute, ``..``, links
leaving the tree, devices: ``Invalid archive: <reason>``), at most ``max_total`` bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from lightd.files import (
    CHUNK,
    BadArchive,
    NoSpace,
    Owner,
    Root,
    extract_tar,
    remove_private_folder,
    sweep_private_folders,
    write_tar_zst,
    zst_reader,
)

__all__ = ["STAGING_PREFIX", "produce", "remove_staging", "stage", "sweep_staging"]

#: Staging folders beside the volumes (removed at start if a crash left one).
STAGING_PREFIX = ".lightd-transfer-"

Emit = Callable[[tuple[Literal["data", "prefix"], bytes | str]], None]


def produce(
    folder: Path,
    emit: Emit,
    *,
    skip: int,
    level: int,
    threads: int,
    checkpoint: Callable[[], None],
    progress: Callable[[int], None],
) -> tuple[int, str]:
    """Archive the volume at ``folder`` as ``tar.zst``; hand ``("data", piece)`` to
    ``emit`` for every byte after the first ``skip`` (and, when ``skip``, first
    ``("prefix", sha256 hex of those bytes)``). Returns ``(size, sha256 hex)`` of the
    whole archive."""
    out = _Hasher(emit, skip)
    with Root.open_volume(folder) as root:
        write_tar_zst(
            root, out, level=level, threads=threads, checkpoint=checkpoint, progress=progress
        )
        out.finish()
    return out.offset, out.sha.hexdigest()


class _Hasher:
    """The compressor's output (see ``produce``)."""

    def __init__(self, emit: Emit, skip: int) -> None:
        self.emit = emit
        self.skip = skip
        self.offset = 0
        self.sha = hashlib.sha256()
        self.buffer = bytearray()
        self.prefix_told = skip == 0

    def write(self, data: bytes) -> int:
        n = len(data)
        start = self.offset
        self.offset += n
        if not self.prefix_told:
            if self.offset < self.skip:
                self.sha.update(data)
                return n
            cut = self.skip - start
            self.sha.update(data[:cut])
            self.emit(("prefix", self.sha.hexdigest()))
            self.prefix_told = True
            data = data[cut:]
        self.sha.update(data)
        if not self.buffer and len(data) >= CHUNK // 2:
            self.emit(("data", bytes(data)))
        else:
            self.buffer += data
            if len(self.buffer) >= CHUNK:
                self.flush()
        return n

    def flush(self) -> None:
        if self.buffer:
            self.emit(("data", bytes(self.buffer)))
            self.buffer.clear()

    def finish(self) -> None:
        self.flush()
        if not self.prefix_told:  # the target holds more than the archive has
            raise BadArchive("the volume changed since the transfer began")


def stage(
    parent: Path,
    staging: str,
    read: Callable[[int], bytes],
    *,
    max_total: int,
    max_entries: int,
    owner: Owner | None,
    checkpoint: Callable[[], None],
    tick: Callable[[int], None],
) -> None:
    """Extract the ``tar.zst`` read by ``read`` (pieces, ``b""`` at the end) into the
    staging folder ``staging`` of ``parent`` (made here, or there already); the whole
    stream is read, past the archive's end too. ``BadArchive`` for a refused or corrupt
    archive; ``NoSpace`` when the disk is full."""
    with Root.open(parent) as top:
        with contextlib.suppress(FileExistsError):
            os.mkdir(staging, 0o700, dir_fd=top.fd)
        with Root.open_at(top.fd, staging, no_links=True, owner=owner) as tree:
            try:
                decompressed = zst_reader(read)
                extract_tar(
                    tree,
                    decompressed,
                    max_total=max_total,
                    max_entries=max_entries,
                    checkpoint=checkpoint,
                    tick=tick,
                )
                while decompressed(CHUNK):  # the tar's end marker may leave a few blocks
                    checkpoint()
                while read(CHUNK):  # anything after the frame: read, not used
                    checkpoint()
            except OSError as exc:
                if exc.errno in (28, 122):  # ENOSPC, EDQUOT
                    raise NoSpace() from exc
                raise


def remove_staging(parent: Path, name: str) -> None:
    remove_private_folder(parent, name, STAGING_PREFIX)


def sweep_staging(parent: Path) -> int:
    """Remove staging folders a crash left beside the volumes; how many."""
    return sweep_private_folders(parent, STAGING_PREFIX)
