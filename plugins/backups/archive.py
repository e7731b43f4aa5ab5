"""The blocking halves of a backup and a restore (run in worker threads).

Backup: ``lightd.files.write_tar_zst`` walks the volume (links stored as links, never
followed; ``ignore`` globs pruned) → one ``zstandard`` compressor (multi-threaded, like
``zstd -T0``) → pieces of about ``CHUNK`` bytes handed to the target, with the sha256
of the compressed stream computed on the way. Walking, reading and compressing run in a
helper thread, hashing and handing on in the calling one (a ``_Pipe`` of at most
``OUT_PIECES`` pieces between them, as ``tar | zstd`` runs two processes). Nothing is
held beyond those pieces (and the s3 target's one part), nothing is written twice.

Restore: the archive is read from the target → sha256 → ``lightd.files.zst_reader`` (the
calling thread) → ``_Pipe`` (``PIPE_PIECES``) → ``lightd.files.extract_tar`` (a helper
thread) into a private staging folder beside the volume (same file
system, so moving it in is a rename), with every entry checked (absolute, ``..``, links
leaving the tree, devices: ``Invalid archive: <reason>``). Only a complete archive whose
sha256 matches the recorded one is swapped in: ``truncate`` exchanges the staging folder
and the volume folder atomically (``renameat2(RENAME_EXCHANGE)``), otherwise the staged
tree is merged in all-or-nothing (``merge_tree``). Any failure before that leaves the
volume untouched, and the staging folder is removed in every case.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import logging
import os
import queue
import secrets
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import attrs
from lightd.files import (
    CHUNK,
    BadArchive,
    FileOperationFailed,
    NoSpace,
    Owner,
    Root,
    extract_tar,
    merge_tree,
    remove_private_folder,
    rename_exchange,
    sweep_private_folders,
    write_tar_zst,
    zst_reader,
)

__all__ = [
    "STAGING_PREFIX",
    "Meter",
    "ignore_matcher",
    "restore_stage",
    "restore_swap",
    "write_backup",
]

log = logging.getLogger(__name__)

#: Decompressed pieces (of up to ``CHUNK``) waiting between the two threads of a restore.
PIPE_PIECES = 8
#: Compressed pieces (about ``CHUNK``) waiting between the two threads of a backup.
OUT_PIECES = 4
#: Staging folders beside the volumes (removed at start if a crash left one).
STAGING_PREFIX = ".lightd-restore-"


@attrs.define
class Meter:
    """Progress in bytes, written by the worker thread and read by the job."""

    done: int = 0
    total: int | None = None

    def add(self, n: int) -> None:
        self.done += n


def ignore_matcher(patterns: Sequence[str]) -> Callable[[str], bool] | None:
    """``prune(path)`` for ``ignore`` globs, gitignore-like: a pattern without ``/``
    matches a name at any depth (``*.log``, ``cache``); one with ``/`` matches the whole
    path from the volume root (``logs/*.gz``, a leading ``/`` allowed). A matching folder
    is left out with everything in it."""
    if not patterns:
        return None
    names = [p for p in patterns if "/" not in p.strip("/")]
    paths = [p.strip("/") for p in patterns if "/" in p.strip("/")]

    def prune(path: str) -> bool:
        name = path.rsplit("/", 1)[-1]
        return any(fnmatch.fnmatchcase(name, p) for p in names) or any(
            fnmatch.fnmatchcase(path, p) for p in paths
        )

    return prune


class _Out:
    """The compressor's output, gathered into pieces of at least ``CHUNK`` bytes and
    handed to the pipe (big outputs as they are: no copy)."""

    def __init__(self, pipe: _Pipe) -> None:
        self.pipe = pipe
        self.buffer = bytearray()

    def write(self, data: bytes) -> int:
        if not self.buffer and len(data) >= CHUNK // 2:
            self.pipe.put(data)
        else:
            self.buffer += data
            if len(self.buffer) >= CHUNK:
                self.flush()
        return len(data)

    def flush(self) -> None:
        if self.buffer:
            self.pipe.put(bytes(self.buffer))
            self.buffer.clear()


def _disk(exc: OSError) -> Exception:
    if exc.errno in (28, 122):  # ENOSPC, EDQUOT
        return NoSpace()
    return FileOperationFailed(exc)


def write_backup(
    folder: Path,
    ignore: Sequence[str],
    sink: Callable[[bytes], None],
    *,
    level: int,
    threads: int,
    checkpoint: Callable[[], None],
    meter: Meter,
) -> tuple[int, str]:
    """Archive the volume at ``folder`` into ``sink``; ``(size, sha256 hex)``. A helper
    thread walks, reads and compresses; this one (``sink`` and ``checkpoint`` may need
    the calling worker thread: ``trio.from_thread``) hashes and hands on the pieces."""
    prune = ignore_matcher(ignore)
    with Root.open_volume(folder) as root:
        pipe = _Pipe(OUT_PIECES)
        failure: list[BaseException] = []

        def archive() -> None:
            try:
                out = _Out(pipe)
                write_tar_zst(
                    root,
                    out,
                    level=level,
                    threads=threads,
                    prune=prune,
                    checkpoint=pipe.producer_check,
                    progress=meter.add,
                )
                out.flush()
                pipe.put(b"")
            except _Stopped:
                pass
            except BaseException as exc:
                failure.append(exc)
                pipe.fail()

        helper = threading.Thread(target=archive, name="lightd-backup-archive", daemon=True)
        helper.start()
        sha = hashlib.sha256()
        size = 0
        try:
            while piece := pipe.get():
                checkpoint()
                sha.update(piece)
                size += len(piece)
                sink(piece)
        except _Stopped:
            pass  # the archiving failed: its error is the one
        except BaseException as exc:
            pipe.stop(failed=True)
            helper.join()
            if isinstance(exc, OSError):
                raise _disk(exc) from exc
            raise
        helper.join()
        if failure:
            error = failure[0]
            if isinstance(error, OSError):
                raise _disk(error) from error
            raise error
        return size, sha.hexdigest()


class _Stopped(Exception):
    """The other side of the pipe gave up (its own error is the one reported)."""


class _Pipe:
    """Pieces handed from one thread to another, so that both run at once: in a backup,
    archiving and compressing → hashing and handing to the target; in a restore, reading,
    hashing and decompressing → extracting (like ``tar | zstd`` and ``zstd -d | tar -x``:
    zstd, hashlib and file I/O release the GIL). At most ``size`` pieces wait in between.
    Either side may stop: the other one then stops at its next ``put`` or ``check``."""

    def __init__(self, size: int) -> None:
        self._queue: queue.Queue[bytes | BaseException] = queue.Queue(size)
        #: The consumer: ``None`` while reading, ``"done"`` (it needs no more: later
        #: pieces are dropped) or ``"failed"``.
        self.consumer: str | None = None
        self.producer_failed = False
        self._ended: bytes | BaseException | None = None

    # the producing side

    def put(self, piece: bytes) -> None:
        if self.consumer == "failed":
            raise _Stopped
        if self.consumer is None:
            self._queue.put(piece)

    def producer_check(self) -> None:
        if self.consumer == "failed":
            raise _Stopped

    def fail(self) -> None:
        """The producer failed: the consumer stops."""
        self.producer_failed = True
        if self.consumer is None:
            self._queue.put(_Stopped())  # room is made by a get, or by ``stop``

    # the consuming side

    def get(self, _n: int = 0) -> bytes:
        """The next piece, ``b""`` at the end (and after)."""
        if self._ended is not None:
            if isinstance(self._ended, BaseException):
                raise self._ended
            return b""
        item = self._queue.get()
        if isinstance(item, BaseException) or not item:
            self._ended = item
            return self.get()
        return item

    def consumer_check(self) -> None:
        if self.producer_failed:
            raise _Stopped

    def stop(self, *, failed: bool) -> None:
        """Read no more; empty the queue so that the producer never waits on it."""
        self.consumer = "failed" if failed else "done"
        with contextlib.suppress(queue.Empty):
            while True:
                self._queue.get_nowait()


class _HashingSource:
    """A raw reader over the target's download, hashing what passes."""

    def __init__(self, read: Callable[[int], bytes], meter: Meter) -> None:
        self._read = read
        self.sha = hashlib.sha256()
        self.meter = meter

    def read(self, n: int = -1) -> bytes:
        data = self._read(CHUNK if n < 0 else n)
        self.sha.update(data)
        self.meter.add(len(data))
        return data


def restore_stage(
    parent: Path,
    volume_id: str,
    read: Callable[[int], bytes],
    sha256: str | None,
    *,
    max_total: int,
    max_entries: int,
    owner: Owner | None,
    checkpoint: Callable[[], None],
    meter: Meter,
) -> str:
    """Extract the archive read by ``read`` into a new staging folder in ``parent`` (the
    volumes folder); its name. ``BadArchive`` for a refused, corrupt or tampered archive
    (nothing is left then)."""
    staging = f"{STAGING_PREFIX}{volume_id}-{secrets.token_hex(6)}"
    with Root.open(parent) as top:
        os.mkdir(staging, 0o700, dir_fd=top.fd)
        try:
            source = _HashingSource(read, meter)
            with Root.open_at(top.fd, staging, no_links=True, owner=owner) as tree:
                _decompress_and_extract(
                    source,
                    tree,
                    max_total=max_total,
                    max_entries=max_entries,
                    checkpoint=checkpoint,
                )
            if sha256 is not None and source.sha.hexdigest() != sha256:
                raise BadArchive("checksum mismatch")
        except BaseException:
            remove_staging(parent, staging)
            raise
    return staging


def _decompress_and_extract(
    source: _HashingSource,
    tree: Root,
    *,
    max_total: int,
    max_entries: int,
    checkpoint: Callable[[], None],
) -> None:
    """This thread reads, hashes and decompresses (``read`` and ``checkpoint`` may need
    the calling worker thread: ``trio.from_thread``); a helper thread extracts. The whole
    archive is read, past the tar's end too (the zstd frame's checksum, the sha256)."""
    pipe = _Pipe(PIPE_PIECES)
    failure: list[BaseException] = []

    def extract() -> None:
        try:
            extract_tar(
                tree,
                pipe.get,
                max_total=max_total,
                max_entries=max_entries,
                checkpoint=pipe.consumer_check,
            )
        except BaseException as exc:
            failure.append(exc)
            pipe.stop(failed=True)
        else:
            pipe.stop(failed=False)

    helper = threading.Thread(target=extract, name="lightd-restore-extract", daemon=True)
    helper.start()
    own: BaseException | None = None
    try:
        decompressed = zst_reader(source.read)
        while piece := decompressed(CHUNK):
            checkpoint()
            pipe.put(piece)
        pipe.put(b"")
        while source.read(CHUNK):  # anything after the frame still counts
            checkpoint()
    except _Stopped:
        pass  # the extraction failed: its error is the one
    except BaseException as exc:  # corrupt data (BadArchive), cancelled, the target failed…
        own = exc
    if own is not None:
        pipe.fail()
    helper.join()
    if own is not None:
        raise own
    if failure:
        error = failure[0]
        if isinstance(error, OSError):
            raise _disk(error) from error
        raise error


def restore_swap(
    parent: Path, volume_id: str, staging: str, *, truncate: bool, checkpoint: Callable[[], None]
) -> None:
    """Put the staged tree in place of (``truncate``) or over the volume's contents, all
    or nothing; the staging folder (then holding what was replaced) is removed."""
    try:
        with Root.open(parent) as top:
            if truncate:
                old = os.stat(volume_id, dir_fd=top.fd, follow_symlinks=False)
                fd = os.open(staging, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=top.fd)
                try:
                    with contextlib.suppress(PermissionError):
                        os.fchown(fd, old.st_uid, old.st_gid)
                    os.fchmod(fd, old.st_mode & 0o7777)
                finally:
                    os.close(fd)
                rename_exchange(top.fd, staging, top.fd, volume_id)
            else:
                aside = staging + "-replaced"
                os.mkdir(aside, 0o700, dir_fd=top.fd)
                try:
                    with (
                        Root.open_at(top.fd, staging) as tree,
                        Root.open_at(top.fd, volume_id) as volume,
                        Root.open_at(top.fd, aside) as replaced,
                    ):
                        merge_tree(tree.fd, volume.fd, replaced.fd, checkpoint=checkpoint)
                finally:
                    remove_staging(parent, aside)
    except OSError as exc:
        raise _disk(exc) from exc
    finally:
        remove_staging(parent, staging)


def remove_staging(parent: Path, name: str) -> None:
    remove_private_folder(parent, name, STAGING_PREFIX)


def sweep_staging(parent: Path) -> int:
    """Remove staging folders a crash left in the volumes folder; how many."""
    return sweep_private_folders(parent, STAGING_PREFIX)
