"""The ``s3`` backup target against a real S3-compatible server: moto's, started on
loopback for the session (``moto_server``), spoken to over HTTP with SigV4 like AWS S3,
MinIO or Backblaze. The bucket is inspected with boto3, independently of the agent."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest

from ..conftest import RunningAgent, StartAgent, api_client
from .test_async_jobs import finished, listing
from .test_backups import backup, restore

PART = 5 * 1024 * 1024
KEYS = {"access_key": "AKIDEXAMPLE", "secret_key": "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(url + "/moto-api/", timeout=1)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def s3_client(endpoint: str) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=KEYS["access_key"],
        aws_secret_access_key=KEYS["secret_key"],
    )


@pytest.fixture
def bucket(s3_endpoint: str, request: pytest.FixtureRequest) -> str:
    name = "lightd-" + hashlib.sha1(request.node.name.encode()).hexdigest()[:12]
    s3_client(s3_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture
async def node(
    start_agent: StartAgent, make_config: Any, s3_endpoint: str, bucket: str
) -> RunningAgent:
    s3 = {"endpoint": s3_endpoint, "bucket": bucket, "prefix": "node-1/", "part_size": PART}
    return await start_agent(make_config({"backups": {"s3": {**s3, **KEYS}}}))


async def test_s3_round_trip_multipart(node: RunningAgent, s3_endpoint: str, bucket: str) -> None:
    async with api_client(node.url) as c:
        response = await c.post("/volumes")
        vid, folder = response.json()["volume_id"], Path(response.json()["path"])
        # incompressible and > 2 parts: a real multipart upload with a short last part
        (folder / "world").mkdir()
        (folder / "world" / "big.bin").write_bytes(os.urandom(2 * PART + 12345))
        (folder / "small.txt").write_text("hello")
        (folder / "link").symlink_to("small.txt")
        record = await backup(c, vid, target="s3")
        assert record["target"] == "s3" and record["size"] > 2 * PART
        key = f"node-1/{vid}/{record['backup_id']}.tar.zst"
        obj = s3_client(s3_endpoint).get_object(Bucket=bucket, Key=key)
        stored = obj["Body"].read()
        assert hashlib.sha256(stored).hexdigest() == record["sha256"]
        assert obj["ETag"].strip('"').endswith("-3")  # three parts
        uploads = s3_client(s3_endpoint).list_multipart_uploads(Bucket=bucket)
        assert not uploads.get("Uploads")
        # download streams from the bucket
        got = await c.get(f"/volumes/{vid}/backups/{record['backup_id']}/download", timeout=60)
        assert got.status_code == 200 and got.content == stored
        # restore from the bucket
        before = listing(folder)
        (folder / "world" / "big.bin").write_bytes(b"lost")
        (folder / "small.txt").unlink()
        job = await restore(c, vid, record["backup_id"], truncate=True)
        assert job["state"] == "done", job
        assert listing(folder) == before
        assert os.readlink(folder / "link") == "small.txt"
        # delete removes the object
        assert (await c.delete(f"/volumes/{vid}/backups/{record['backup_id']}")).status_code == 200
        listed = s3_client(s3_endpoint).list_objects_v2(Bucket=bucket)
        assert listed.get("KeyCount", 0) == 0


async def test_s3_failure_leaves_no_upload_behind(
    start_agent: StartAgent, make_config: Any, s3_endpoint: str, bucket: str
) -> None:
    s3 = {"endpoint": s3_endpoint, "bucket": bucket + "-missing", "part_size": PART}
    node = await start_agent(make_config({"backups": {"s3": {**s3, **KEYS}}}))
    async with api_client(node.url) as c:
        response = await c.post("/volumes")
        vid, folder = response.json()["volume_id"], Path(response.json()["path"])
        (folder / "a.bin").write_bytes(os.urandom(PART + 1))
        response = await c.post(f"/volumes/{vid}/backups", json={"target": "s3"})
        assert response.status_code == 202
        job = await finished(c, response.json()["job_id"])
        assert job["state"] == "failed" and job["error"].startswith("S3 upload failed"), job
        record = (await c.get(f"/volumes/{vid}/backups/{response.json()['backup_id']}")).json()
        assert record["state"] == "failed" and record["error"] == job["error"]
    uploads = s3_client(s3_endpoint).list_multipart_uploads(Bucket=bucket)
    assert not uploads.get("Uploads")
