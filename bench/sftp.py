"""SFTP (contract §19): the agent's server against OpenSSH's own, same client, same run.

Measures, with OpenSSH's ``sftp -b`` as the client of both:
  1. upload and download of one big file (default 512 MiB, ``--size-mb``);
  2. upload (``put -r``) and download (``get -r``) of a folder of ``--files`` (2000) small
     files (1 to 16 KiB);
against ``sshd`` (started here on a free loopback port with its own config and host key,
``Subsystem sftp internal-sftp``, public-key login). Each run is one client process
(connection and login included, on both sides).

Rounds (``--repeat``, 5): a round runs each transfer on both servers back to back (which
goes first alternates), and its ratio is agent/sshd throughput in that round; the headline
is the median of the rounds' ratios (every round's ratio, the min and max, and the
best-of figures are printed too). The machine may be shared and drift between rounds: a
ratio compares two runs a few seconds apart.

Both sides meet the same disk state: sshd serves the agent's volume folder itself, so
both read the same files (seeded there once, untimed) and upload into the same folder.
Each small-files upload goes to a new folder (``up-<round>-<side>``) and nothing is
deleted between timed runs: ext4 makes creating files for about 30 s after many were
deleted in the same block group costly (``recently_deleted``: each new inode skips the
recently freed ones), a cost that fell on whichever side ran next after the bench had
removed the previous run's 2 000 files. Before each timed run, what the last run left
(a big file, a download) is removed and dirty pages are written out (``sync``), for both.
The cipher is whatever the client and each server agree on (printed; ``--cipher`` pins it).

Targets: median ratio agent/sshd >= 0.5 for each transfer; the agent's RSS growth during
the whole run (peak minus before) < 50 MB. The agent's CPU seconds per run (median) are
printed for its own trend.

The agent runs as its own process (``bench.websocket.agent_process``) with
``sftp.enabled``; the login is ``vol.<volume_id>`` with the master token.

Run::

    .venv/bin/python -m bench.sftp [--size-mb 512] [--files 2000] [--repeat 5] [--json]
        [--ops upload-small,download-small]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import trio

from .http import free_port
from .websocket import TOKEN, VENDOR, AgentProcess, agent_process

TARGET_RATIO = 0.5
TARGET_RSS_MB = 50
SSHD = "/usr/sbin/sshd"


def _need(binary: str, package: str) -> None:
    if not shutil.which(binary) and not Path(binary).exists():
        raise SystemExit(f"{binary} is needed: apt-get install {package}")


class Sshd:
    """OpenSSH's sshd on loopback with a config, host key and client key of its own."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.key = folder / "client_key"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        f = self.folder
        for name in ("host_key", "client_key"):
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(f / name)], check=True
            )
        (f / "authorized_keys").write_text((f / "client_key.pub").read_text())
        (f / "sshd_config").write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {f / 'host_key'}\n"
            f"PidFile {f / 'sshd.pid'}\nAuthorizedKeysFile {f / 'authorized_keys'}\n"
            "PermitRootLogin yes\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            "UsePAM no\nStrictModes no\nSubsystem sftp internal-sftp\n"
        )
        Path("/run/sshd").mkdir(exist_ok=True)  # privilege separation folder sshd wants
        self.proc = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", str(f / "sshd_config")],
            stdout=subprocess.DEVNULL,
            stderr=(f / "sshd.log").open("wb"),
            start_new_session=True,
        )
        deadline = time.monotonic() + 10
        while b"listening" not in (f / "sshd.log").read_bytes().lower():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"sshd did not start:\n{(f / 'sshd.log').read_text()}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def sftp_run(
    port: int, user: str, commands: str, cwd: Path, *, password: str | None, key: Path | None,
    cipher: str | None,
) -> tuple[float, str]:  # fmt: skip
    """One ``sftp -b`` session: its wall time and the cipher it used."""
    batch = cwd / ".batch"
    batch.write_text(commands)
    argv = ["sftp", "-v", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"]
    env = dict(os.environ)
    if password is not None:
        askpass = cwd / ".askpass"
        askpass.write_text('#!/bin/sh\nprintf "%s\\n" "$BENCH_SFTP_PASSWORD"\n')
        askpass.chmod(0o700)
        env |= {
            "SSH_ASKPASS": str(askpass),
            "SSH_ASKPASS_REQUIRE": "force",
            "DISPLAY": ":0",
            "BENCH_SFTP_PASSWORD": password,
        }
        argv += ["-o", "BatchMode=no", "-o", "PubkeyAuthentication=no"]
    if key is not None:
        argv += ["-i", str(key), "-o", "PasswordAuthentication=no"]
    if cipher:
        argv += ["-c", cipher]
    argv += ["-P", str(port), "-b", str(batch), f"{user}@127.0.0.1"]
    started = time.perf_counter()
    done = subprocess.run(
        argv, cwd=cwd, env=env, capture_output=True, stdin=subprocess.DEVNULL,
        start_new_session=True, check=False, timeout=900,
    )  # fmt: skip
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"sftp failed ({commands.strip()!r}):\n{done.stderr.decode()[-3000:]}")
    used = "?"
    for line in done.stderr.decode(errors="replace").splitlines():
        if "kex: server->client cipher:" in line:
            used = line.split("cipher:")[1].split()[0]
    return elapsed, used


@contextmanager
def rss_peak(agent: AgentProcess) -> Iterator[dict[str, int]]:
    """The agent's RSS before and at its peak during the block (sampled every 20 ms)."""
    seen = {"before": agent.rss(), "peak": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.02):
            seen["peak"] = max(seen["peak"], agent.rss())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        thread.join()
        seen["peak"] = max(seen["peak"], agent.rss())


def make_data(folder: Path, size_mb: int, files: int) -> tuple[Path, Path, int]:
    big = folder / "big.bin"
    with big.open("wb") as out:
        for _ in range(size_mb):
            out.write(os.urandom(1 << 20))
    small = folder / "small"
    small.mkdir()
    rng = random.Random(7)
    total = 0
    for i in range(files):
        n = rng.randint(1024, 16384)
        total += n
        (small / f"f{i:05d}.dat").write_bytes(rng.randbytes(n))
    return big, small, total


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=512)
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=5, help="rounds (default 5)")
    parser.add_argument("--cipher", default=None, help="pin the cipher (sftp -c)")
    parser.add_argument("--dir", default=None, help="where to put the data (default /tmp)")
    parser.add_argument(
        "--ops",
        default=None,
        help="comma-separated transfers to run (default all): upload-big, download-big, "
        "upload-small, download-small",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    _need("sftp", "openssh-client")
    _need(SSHD, "openssh-server")
    with tempfile.TemporaryDirectory(prefix="bench-sftp-", dir=args.dir) as tmp:
        work = Path(tmp)
        local = work / "local"
        local.mkdir()
        big, _small, small_bytes = await trio.to_thread.run_sync(
            make_data, local, args.size_mb, args.files
        )
        big_bytes = big.stat().st_size
        (work / "sshd").mkdir()
        sshd = Sshd(work / "sshd")
        await trio.to_thread.run_sync(sshd.start)
        port = free_port()
        agent_dir = work / "agent"
        agent_dir.mkdir()
        try:
            async with agent_process(
                agent_dir,
                {},
                extra={"sftp": {"enabled": True, "host": "127.0.0.1", "port": port}},
            ) as agent:
                headers = {"Accept": VENDOR, "Authorization": f"Bearer {TOKEN}"}
                async with httpx.AsyncClient(
                    base_url=agent.url, headers=headers, timeout=60
                ) as api:
                    made = (await api.post("/volumes")).json()
                volume_root = Path(made["path"])
                agent_user = f"vol.{made['volume_id']}"
                await trio.to_thread.run_sync(
                    run_all, args, agent, sshd, port, agent_user, volume_root, local,
                    big_bytes, small_bytes,
                )  # fmt: skip
        finally:
            await trio.to_thread.run_sync(sshd.stop)


def run_all(
    args: argparse.Namespace, agent: AgentProcess, sshd: Sshd, port: int, agent_user: str,
    volume_root: Path, local: Path, big_bytes: int, small_bytes: int,
) -> None:  # fmt: skip
    # {r}: the remote folder ("" for the agent: its session's / is the volume; the volume's
    # path for sshd), {l}: ours, {n}: a name new to this run
    ops = {
        "upload big": ("put big.bin {r}big.up\n", big_bytes),
        "download big": ("get {r}big.bin {l}/big.down\n", big_bytes),
        "upload small": ("put -r small {r}{n}\n", small_bytes),
        "download small": ("get -r {r}small {l}/{n}\n", small_bytes),
    }
    if args.ops:
        wanted = {name.strip().replace("-", " ") for name in args.ops.split(",")}
        unknown = wanted - ops.keys()
        if unknown:
            raise SystemExit(f"unknown --ops: {', '.join(sorted(unknown))}")
        ops = {op: value for op, value in ops.items() if op in wanted}
    # what the downloads read, the same files for both sides (untimed)
    if "download big" in ops:
        shutil.copyfile(local / "big.bin", volume_root / "big.bin")
    if "download small" in ops:
        shutil.copytree(local / "small", volume_root / "small")
    times: dict[str, dict[str, list[float]]] = {op: {"agent": [], "sshd": []} for op in ops}
    cpu: dict[str, list[float]] = {op: [] for op in ops}
    ciphers: dict[str, str] = {}
    with rss_peak(agent) as rss:
        for round_ in range(args.repeat):
            for op, (template, _size) in ops.items():
                order = ["agent", "sshd"] if round_ % 2 == 0 else ["sshd", "agent"]
                for side in order:
                    # not timed, the same for both: what the last run left, then sync
                    (volume_root / "big.up").unlink(missing_ok=True)
                    (local / "big.down").unlink(missing_ok=True)
                    os.sync()
                    commands = template.format(
                        r="" if side == "agent" else f"{volume_root}/",
                        l=local,
                        n=f"{op.split()[0]}-{round_}-{side}",
                    )
                    if side == "agent":
                        before = agent.cpu()
                        elapsed, cipher = sftp_run(
                            port, agent_user, commands, local, password=TOKEN, key=None,
                            cipher=args.cipher,
                        )  # fmt: skip
                        cpu[op].append(agent.cpu() - before)
                    else:
                        elapsed, cipher = sftp_run(
                            sshd.port, "root", commands, local, password=None, key=sshd.key,
                            cipher=args.cipher,
                        )  # fmt: skip
                    ciphers[side] = cipher
                    times[op][side].append(elapsed)
    growth_mb = (rss["peak"] - rss["before"]) / 1e6
    results: dict[str, Any] = {"ops": {}, "rss_before_mb": rss["before"] / 1e6}
    print(
        f"bench.sftp: big file {big_bytes >> 20} MiB, {args.files} small files "
        f"({small_bytes / 1e6:.1f} MB), {args.repeat} rounds; ciphers: agent "
        f"{ciphers.get('agent')}, sshd {ciphers.get('sshd')}; shared machine: ratios only"
    )
    print(
        f"{'transfer':<16}{'agent MB/s':>11}{'sshd MB/s':>10}{'ratio':>7}{'min':>6}{'max':>6}"
        f"{'best-of':>8}{'agent cpu':>10}  target: median >= {TARGET_RATIO}"
    )
    for op, (_template, size) in ops.items():
        agent_s, sshd_s = times[op]["agent"], times[op]["sshd"]
        ratios = [s / a for a, s in zip(agent_s, sshd_s, strict=True)]  # per round
        ratio = statistics.median(ratios)
        best = min(sshd_s) / min(agent_s)
        agent_rate = size / statistics.median(agent_s) / 1e6
        sshd_rate = size / statistics.median(sshd_s) / 1e6
        results["ops"][op] = {
            "agent_mb_s": agent_rate,
            "sshd_mb_s": sshd_rate,
            "ratio": ratio,
            "round_ratios": ratios,
            "best_of_ratio": best,
            "agent_cpu_s": statistics.median(cpu[op]),
        }
        verdict = "ok" if ratio >= TARGET_RATIO else "MISSED"
        print(
            f"{op:<16}{agent_rate:>11.1f}{sshd_rate:>10.1f}{ratio:>7.2f}{min(ratios):>6.2f}"
            f"{max(ratios):>6.2f}{best:>8.2f}{statistics.median(cpu[op]):>9.2f}s  {verdict}"
        )
        print(f"{'':<16}rounds: {' '.join(f'{r:.2f}' for r in ratios)}")
    print(
        "(MB/s: medians of the rounds; ratio: median of the rounds' agent/sshd, min, max; "
        "best-of: best agent run / best sshd run; agent cpu: median seconds a run)"
    )
    verdict = "ok" if growth_mb < TARGET_RSS_MB else "MISSED"
    print(
        f"agent RSS: {rss['before'] / 1e6:.1f} MB before, peak {rss['peak'] / 1e6:.1f} MB, "
        f"growth {growth_mb:.1f} MB (target < {TARGET_RSS_MB}): {verdict}"
    )
    results["rss_growth_mb"] = growth_mb
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    try:
        trio.run(main)
    except KeyboardInterrupt:
        sys.exit(130)
