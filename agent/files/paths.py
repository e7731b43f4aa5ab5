"""Client paths: the rules of contract §5 "Paths", checked before any file is touched.

A ``RelPath`` is a validated path relative to a root (a volume): its components and the
client's own text, kept for messages. Nothing here does I/O.
"""

from __future__ import annotations

import os

import attrs

from .errors import InvalidPath

__all__ = ["NAME_MAX", "PATH_MAX", "ROOT", "RelPath", "parse", "parse_owner"]

#: Longest name of one component, in bytes (Linux ``NAME_MAX``).
NAME_MAX = 255
#: Longest whole path, in bytes (Linux ``PATH_MAX`` less the NUL).
PATH_MAX = 4095


@attrs.frozen
class RelPath:
    """A validated path relative to a root: its components, and the client's own text
    (for messages). No component is empty, ``.`` or ``..``; ``parts == ()`` is the root."""

    parts: tuple[str, ...]
    text: str

    @property
    def name(self) -> str | None:
        return self.parts[-1] if self.parts else None

    @property
    def parent(self) -> RelPath:
        parent = self.parts[:-1]
        return RelPath(parent, "/".join(parent) or ".")

    def child(self, name: str) -> RelPath:
        parts = (*self.parts, name)
        return RelPath(parts, "/".join(parts))

    def is_within(self, other: RelPath) -> bool:
        """``self`` is ``other`` or below it (lexically)."""
        return self.parts[: len(other.parts)] == other.parts

    def __str__(self) -> str:
        return "/".join(self.parts) or "."


#: The root itself.
ROOT = RelPath((), ".")


def _is_drive(text: str) -> bool:
    return len(text) >= 2 and text[1] == ":" and text[0].isascii() and text[0].isalpha()


def parse(text: str, *, empty_is_root: bool = False) -> RelPath:
    """Validate a client path (contract §5 "Paths") into a ``RelPath``.

    Refused (``InvalidPath``): empty, absolute (``/x``, ``\\x``, ``C:…``), a ``..``
    component, a NUL byte, names longer than 255 bytes or paths longer than 4095, text
    that cannot be a file name. ``a..b.txt`` is a name like any other; ``.`` and empty
    components are dropped.
    """
    if "\x00" in text:
        raise InvalidPath("path traversal detected", code="path_traversal")
    if not text.strip():
        if empty_is_root:
            return RelPath((), text)
        raise InvalidPath("path is empty", code="path_empty")
    if text[0] in "/\\" or _is_drive(text):
        raise InvalidPath("absolute paths are not allowed", code="absolute_path")
    parts = tuple(p for p in text.split("/") if p not in ("", "."))
    if ".." in parts:
        raise InvalidPath("path traversal detected", code="path_traversal")
    try:
        encoded = os.fsencode(text)
    except UnicodeError:
        raise InvalidPath("path is not valid UTF-8", code="invalid_encoding") from None
    if len(encoded) > PATH_MAX:
        raise InvalidPath("path too long", code="path_too_long")
    if any(len(os.fsencode(p)) > NAME_MAX for p in parts):
        raise InvalidPath("name too long", code="name_too_long")
    return RelPath(parts, text)


#: Largest uid or gid (``(uid_t) -1`` is "no change" to chown, so one less).
_MAX_ID = 2**32 - 2


def parse_owner(value: object) -> tuple[int, int] | None:
    """Config ``containers.user`` as ``(uid, gid)``: ``"root"`` (the default) is ``None``,
    files are made as before (by the agent, a write keeping the folder's owner); a uid
    (a JSON number or ``"1000"``, its gid the same) or ``"uid:gid"``. Numbers only: the
    names inside an image are not the host's. ``ValueError`` for anything else."""
    if value == "root":
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        ids = [value, value]
    elif isinstance(value, str) and value.count(":") <= 1:
        texts = value.split(":") if ":" in value else [value, value]
        if not all(t.isascii() and t.isdigit() and len(t) <= 10 for t in texts):
            raise ValueError(value)
        ids = [int(t) for t in texts]
    else:
        raise ValueError(value)
    if not all(0 <= i <= _MAX_ID for i in ids):
        raise ValueError(value)
    return ids[0], ids[1]
