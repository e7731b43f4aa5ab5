"""Attack suite (and operability), file ownership: with ``containers.user`` set, every
file, folder and link the API creates in a volume belongs to that uid/gid, so a game
server that runs as a non-root user can change what the panel wrote for it."""

from __future__ import annotations

import os
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from lightd.errors import ConfigError
from lightd.runtime import open_agent

from ..conftest import StartAgent, api_client
from ..plugins.conftest import new_volume
from ..plugins.volumes_corpus import tar_bytes, tar_entry

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="giving files away needs root")


def owners_below(folder: Path) -> dict[str, tuple[int, int]]:
    """Relative path → (uid, gid) of everything below ``folder`` (links not followed)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            out[os.path.relpath(os.path.join(dirpath, name), folder)] = (st.st_uid, st.st_gid)
    return out


@pytest.mark.parametrize(("user", "owner"), [("1234:2345", (1234, 2345)), (4321, (4321, 4321))])
async def test_created_files_belong_to_containers_user(
    start_agent: StartAgent,
    make_config: Callable[..., Path],
    user: object,
    owner: tuple[int, int],
) -> None:
    node = await start_agent(make_config({"containers": {"user": user}}))
    async with api_client(node.url) as client:
        volume_id, folder = await new_volume(client)
        (folder / "old.cfg").write_text("old")  # made by the host as root: keeps its owner
        (folder / "pack.tar").write_bytes(
            tar_bytes(
                [
                    tar_entry("pack/a/b.txt", b"b"),
                    tar_entry("pack/link", kind=tarfile.SYMTYPE, linkname="a"),
                ]
            )
        )
        os.chown(folder / "pack.tar", 0, 0)
        base = f"/volumes/{volume_id}"
        steps: list[tuple[str, dict[str, object]]] = [
            ("/files", {"path": "w/x/new.txt", "content": "hi"}),
            ("/files", {"path": "old.cfg", "content": "new"}),
            ("/folders", {"path": "f/g/h"}),
            ("/create-folder", {"root": "/", "name": "legacy"}),
            ("/copy", {"source": "w", "destination": "copies/w2"}),
            ("/decompress", {"archive_path": "pack.tar", "destination": "out/here"}),
            ("/compress", {"format": "tar.gz", "output_name": "backups/all", "sources": ["w"]}),
        ]
        for route, body in steps:
            with trio.fail_after(15):
                response = await client.post(base + route, json=body)
            assert response.status_code == 200, (route, response.text)
    found = owners_below(folder)
    assert found.pop("old.cfg") == (0, 0)
    assert found.pop("pack.tar") == (0, 0)
    wrong = {path: ids for path, ids in found.items() if ids != owner}
    assert not wrong, f"not owned by {owner}: {wrong}"
    for path in [
        "w/x/new.txt",
        "f/g/h",
        "legacy",
        "copies/w2/x/new.txt",
        "out/here/pack/a/b.txt",
        "out/here/pack/link",
        "backups/all.tar.gz",
    ]:
        assert path in found


@pytest.mark.parametrize("user", ["nobody", "1:2:3", "-1", 2**32, True, "１０"])
async def test_a_bad_containers_user_is_a_config_error(
    make_config: Callable[..., Path], user: object
) -> None:
    path = make_config({"containers": {"user": user}})
    with trio.fail_after(30), pytest.raises(ConfigError, match=r"^containers\.user: "):
        async with open_agent(path):
            pass
