"""Attack suite, archives: a zip's central directory cannot cost memory or time in
proportion to what a hostile archive declares, and bad entry names are a 400.

``zipfile.ZipFile()`` parses every central-directory entry (~400 B each, GIL held)
before the plugin could count them; the entry count must be read from the end records
(zip64 too) and the directory walked streaming, before ``zipfile`` sees the file.
"""

from __future__ import annotations

import io
import struct
import tracemalloc
import zipfile
from pathlib import Path

import httpx
import pytest
import trio
from lightd.files import parse
from lightd.plugins.archives import InvalidArchive, decompress

from ..conftest import StartAgent, api_client
from ..plugins.conftest import error, new_volume

_CD = struct.Struct("<4s4B4HL2L5H2L")
_EOCD = struct.Struct("<4s4H2LH")
_Z64_EOCD = struct.Struct("<4sQ2H2L4Q")
_Z64_LOCATOR = struct.Struct("<4sLQL")
ENTRIES = 200_000
LIMIT = 1000
#: What the refusal may allocate: the file's read buffer (1 MiB) and the end records;
#: parsing the 200 000 entries allocates well over 50 MB.
MEMORY_BOUND = 4 << 20


def crafted_zip(
    n: int, *, declared: int | None = None, zip64: bool = True, flags: int = 0, name: bytes = b""
) -> bytes:
    """A zip of ``n`` empty central-directory entries (no data: ``ZipFile()`` reads only
    the directory), its end record declaring ``declared`` entries (default ``n``)."""
    declared = n if declared is None else declared
    head = [_CD.pack(b"PK\x01\x02", 20, 3, 20, 0, flags, 0, 0, 0x21, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0)]
    if name:
        body = _CD.pack(
            b"PK\x01\x02", 20, 3, 20, 0, flags, 0, 0, 0x21, 0, 0, 0, len(name), 0, 0, 0, 0, 0, 0
        )
        cd = body + name
    else:
        cd = b"".join(head[0] + b"%08d" % i for i in range(n))
    if zip64:
        record = _Z64_EOCD.pack(b"PK\x06\x06", 44, 45, 45, 0, 0, declared, declared, len(cd), 0)
        locator = _Z64_LOCATOR.pack(b"PK\x06\x07", 0, len(cd), 1)
        end = _EOCD.pack(b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
        return cd + record + locator + end
    return cd + _EOCD.pack(b"PK\x05\x06", 0, 0, declared, declared, len(cd), 0, 0)


def _peak_of_refusal(tmp_path: Path, data: bytes) -> tuple[str, int]:
    (tmp_path / "bomb.zip").write_bytes(data)
    tracemalloc.start()
    try:
        with pytest.raises(InvalidArchive) as caught:
            decompress(
                tmp_path, parse("bomb.zip"), parse("out"), 1 << 30, LIMIT, checkpoint=lambda: None
            )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return caught.value.message, peak


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(crafted_zip(ENTRIES), id="zip64-count"),
        pytest.param(crafted_zip(ENTRIES, declared=1), id="zip64-record-lies"),
        pytest.param(crafted_zip(60_000, zip64=False), id="plain-count"),
        pytest.param(crafted_zip(60_000, declared=1, zip64=False), id="plain-record-lies"),
    ],
)
def test_zip_over_max_entries_is_refused_before_parsing(tmp_path: Path, data: bytes) -> None:
    message, peak = _peak_of_refusal(tmp_path, data)
    assert message == "Invalid archive: too large"
    assert peak < MEMORY_BOUND, f"refusing the archive allocated {peak / 1e6:.1f} MB"
    assert not (tmp_path / "out").exists()


def test_zip_within_limits_still_extracts(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i in range(LIMIT):
            zf.writestr(f"d/{i}.txt", b"x")
    # a prefix (self-extracting stub) shifts every offset; the directory is still found
    (tmp_path / "ok.zip").write_bytes(b"#!stub\n" * 10 + buf.getvalue())
    decompress(tmp_path, parse("ok.zip"), parse("out"), 1 << 30, LIMIT, checkpoint=lambda: None)
    assert len(list((tmp_path / "out" / "d").iterdir())) == LIMIT


async def test_api_refuses_a_zip_bomb_directory(
    start_agent: StartAgent, make_config: object, tmp_path: Path
) -> None:
    config = make_config({"archives": {"max_entries": LIMIT}})  # type: ignore[operator]
    agent = await start_agent(config)
    async with api_client(agent.url) as client:
        volume_id, folder = await new_volume(client)
        (folder / "bomb.zip").write_bytes(crafted_zip(ENTRIES, declared=1))
        with trio.fail_after(20):
            response = await client.post(
                f"/volumes/{volume_id}/decompress", json={"archive_path": "bomb.zip"}
            )
        assert response.status_code == 400, response.text
        assert error(response) == "Invalid archive: too large"
        assert sorted(p.name for p in folder.iterdir()) == ["bomb.zip"]


def _utf8_name_in_local_header() -> bytes:
    """A valid zip whose one name is flagged UTF-8 and is, in the local header only, not."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("é.txt", b"data")
    data = buf.getvalue()
    at = data.index("é".encode())  # the local header comes first
    return data[:at] + b"\xff\xfe" + data[at + 2 :]


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(crafted_zip(1, flags=0x800, name=b"bad\xff\xfe.txt"), id="directory"),
        pytest.param(_utf8_name_in_local_header(), id="local-header"),
    ],
)
async def test_invalid_utf8_name_with_utf8_flag_is_400(
    client: httpx.AsyncClient, data: bytes
) -> None:
    volume_id, folder = await new_volume(client)
    (folder / "names.zip").write_bytes(data)
    with trio.fail_after(20):
        response = await client.post(
            f"/volumes/{volume_id}/decompress", json={"archive_path": "names.zip"}
        )
    assert response.status_code == 400, response.text
    assert error(response) == "Invalid archive: entry name is not valid UTF-8"
    assert sorted(p.name for p in folder.iterdir()) == ["names.zip"]


def test_a_directory_swapped_in_after_the_checks_is_never_parsed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The container owns the archive and can rewrite it in place between the entry
    count check and ``zipfile``'s parse: the parse must see only what was checked."""
    from lightd.plugins import archives

    small = io.BytesIO()
    with zipfile.ZipFile(small, "w") as zf:
        zf.writestr("a.txt", b"a")
    (tmp_path / "swap.zip").write_bytes(small.getvalue())
    bomb = crafted_zip(ENTRIES)
    checked = archives.zip_precheck

    def check_then_swap(*args: object, **kwargs: object) -> object:
        result = checked(*args, **kwargs)  # type: ignore[arg-type]
        with open(tmp_path / "swap.zip", "r+b") as out:  # same inode, as a container would
            out.write(bomb)
        return result

    monkeypatch.setattr(archives, "zip_precheck", check_then_swap)
    tracemalloc.start()
    try:
        decompress(
            tmp_path, parse("swap.zip"), parse("out"), 1 << 30, LIMIT, checkpoint=lambda: None
        )
        _, peak = tracemalloc.get_traced_memory()
    except InvalidArchive:
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < MEMORY_BOUND, f"the swapped directory was parsed: {peak / 1e6:.1f} MB"
