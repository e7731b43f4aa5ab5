"""Byte streams of the engine: a container's attached stdio, and its multiplexed logs."""

from __future__ import annotations

import json
from typing import Any

import httpcore
import httpx
import trio

from .errors import DockerError

__all__ = ["AttachStream", "JsonLines", "demux"]


class AttachStream:
    """A container's attached stdin/stdout/stderr, trio-native (no thread per read).

    Non-TTY containers multiplex output as frames: an 8-byte header (stream id, 3 zero
    bytes, big-endian length) then the payload. ``receive`` returns the next payload
    chunk of stdout/stderr; ``send`` writes to the container's stdin.
    """

    def __init__(self, stream: httpcore.AsyncNetworkStream) -> None:
        self._stream = stream
        self._buffer = bytearray()

    async def _fill(self, size: int) -> bool:
        while len(self._buffer) < size:
            try:
                chunk = await self._stream.read(65536)
            except httpcore.NetworkError:
                return False  # the engine cut the stream: as good as the end of output
            if not chunk:
                return False
            self._buffer += chunk
        return True

    async def receive(self) -> bytes | None:
        """The next output frame's payload, or ``None`` when the container's output ends."""
        while True:
            if not await self._fill(8):
                return None
            length = int.from_bytes(self._buffer[4:8], "big")
            if not await self._fill(8 + length):
                return None
            payload = bytes(self._buffer[8 : 8 + length])
            del self._buffer[: 8 + length]
            if payload:
                return payload

    async def send(self, data: bytes) -> None:
        """Write to stdin; ``trio.BrokenResourceError`` when the stream is gone."""
        try:
            await self._stream.write(data)
        except httpcore.NetworkError as exc:
            raise trio.BrokenResourceError("the container's stdin is closed") from exc

    async def aclose(self) -> None:
        await self._stream.aclose()


class JsonLines:
    """The JSON documents of a streamed answer, one a line (stats, pull progress, events);
    ``async for item in lines``. Ends with the answer."""

    def __init__(self, response: httpx.Response) -> None:
        self._lines = response.aiter_lines()

    def __aiter__(self) -> JsonLines:
        return self

    async def __anext__(self) -> dict[str, Any]:
        while True:
            line = await self._lines.__anext__()
            if line.strip():
                try:
                    item = json.loads(line)
                except (ValueError, RecursionError):
                    raise DockerError("Docker engine sent a stream line that is not JSON") from None
                return item if isinstance(item, dict) else {"value": item}


def demux(data: bytes) -> bytes:
    """The payloads of a non-TTY container's multiplexed output, joined (stdout and stderr
    in the order written)."""
    out = bytearray()
    view = memoryview(data)
    at = 0
    while at + 8 <= len(view):
        length = int.from_bytes(view[at + 4 : at + 8], "big")
        out += view[at + 8 : at + 8 + length]
        at += 8 + length
    return bytes(out)
