"""The file manager (contract §13) against its baselines, measured in the same run on the
same disk, with the agent's resident memory sampled during each measurement.

Prints, each next to its baseline and the ratio:
  1. download of a big file (default 1 GiB) over HTTP (``GET /volumes/:id/files/content``)
     vs ``cat file > /dev/null`` (target >= 0.5) and vs a bare ASGI app on the agent's
     hypercorn settings streaming the same file (target >= 0.9);
  2. upload of the same size (``PUT .../files/content``) vs the bare app receiving the
     same body into a file (target >= 0.9);
  3. search by name over 100 000 files vs ``find -iname`` (target >= 0.5), and by content
     over 10 000 small text files vs ``grep -rli`` (target >= 0.3);
  4. the agent's RSS growth during each (target < 30 MB).

The agent runs as a subprocess (``python -m lightd``); every HTTP transfer, agent's and
bare app's alike, is made by ``curl`` (so the client costs the same on both sides), the
agent's and the bare app's runs taking turns (which goes first alternates, and every
upload starts after a ``sync``), so a burst of load or the write-back of the previous
upload falls on both alike. Each figure is the best of ``--repeat`` runs; the server's
CPU seconds (user + system, median of the runs) are printed beside it, a steadier figure
than the wall time on a busy machine, and so is the load average before and after.

The bare app reads and writes in its event loop (blocking, the simplest and fastest
thing); the agent may not: it reads what the page cache holds without waiting for the
disk (``RWF_NOWAIT``) and everything else, and all writes, in worker threads. Both read
``CHUNK`` (the agent's ``READ_SIZE``) at a time and get the body as hypercorn delivers it
(64 KiB reads). As a reference for the ``cat`` target, what a server doing no work per
chunk gets through to this client is printed too: a plain socket server (no HTTP
framework, no Python per chunk) answering with ``os.sendfile``.

Run::

    .venv/bin/python -m bench.files [--size-mb 1024] [--names 100000] \\
        [--content-files 10000] [--repeat 3] [--dir /tmp] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .http import agent_like_config
from .volumes import ACCEPT, Agent, free_port

TARGETS = {
    "download_vs_cat": 0.5,
    "download_vs_bare": 0.9,
    "upload_vs_bare": 0.9,
    "search_names_vs_find": 0.5,
    "search_content_vs_grep": 0.3,
}
RSS_TARGET = 30 << 20
CHUNK = 1 << 20
NEEDLE = "needle"


# --- helpers ---------------------------------------------------------------------------------


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


@contextmanager
def peak_rss(pid: int) -> Iterator[dict[str, int]]:
    """``{"growth": bytes}``: the highest RSS seen while the block ran, less the RSS
    before it (sampled every 10 ms in a thread)."""
    result = {"growth": 0}
    before = rss(pid)
    peak = before
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, rss(pid))
            time.sleep(0.01)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()
        result["growth"] = max(peak, rss(pid)) - before


def best(repeat: int, fn: Callable[[], object]) -> float:
    """The shortest wall time of ``repeat`` runs of ``fn``."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def run_ok(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(cmd, check=True, capture_output=True, **kwargs)


def curl(url: str, *extra: str, token: str | None = None) -> list[str]:
    cmd = ["curl", "-sS", "--fail", "-o", "/dev/null", url, *extra]
    if token is not None:
        cmd += ["-H", f"Accept: {ACCEPT}", "-H", f"Authorization: Bearer {token}"]
    return cmd


def make_big(path: Path, size: int) -> None:
    block = os.urandom(CHUNK)
    with path.open("wb") as fh:
        for _ in range(size // CHUNK):
            fh.write(block)


def make_names(root: Path, count: int) -> int:
    """``count`` empty files in folders of 1 000; one in 200 has the needle in its name."""
    matches = 0
    for i in range(count):
        folder = root / f"d{i // 1000:04}"
        if i % 1000 == 0:
            folder.mkdir(parents=True)
        hit = i % 200 == 7
        matches += hit
        (folder / (f"file{i}-{NEEDLE.upper()}.txt" if hit else f"file{i}.txt")).touch()
    return matches


def make_texts(root: Path, count: int) -> int:
    """``count`` small text files (~2 KB); one in 100 holds the needle on a late line."""
    rng = random.Random(5)
    words = ["".join(rng.choices("abcdefghijklmnop", k=rng.randint(3, 9))) for _ in range(500)]
    matches = 0
    for i in range(count):
        folder = root / f"t{i // 500:03}"
        if i % 500 == 0:
            folder.mkdir(parents=True)
        lines = [" ".join(rng.choices(words, k=10)) for _ in range(30)]
        if i % 100 == 3:
            lines[25] += f" {NEEDLE}"
            matches += 1
        (folder / f"f{i}.txt").write_text("\n".join(lines) + "\n")
    return matches


# --- the bare app ------------------------------------------------------------------------------


def serve_bare(port: int, root: str) -> None:
    """A bare ASGI app on hypercorn's trio worker, set up as the agent's: ``GET /<name>``
    streams the file in ``CHUNK`` reads, ``PUT /<name>`` writes the body into it as it
    comes (``python -m bench.files --serve-bare PORT ROOT``)."""
    import hypercorn.trio
    import trio

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        path = os.path.join(root, scope["path"].lstrip("/"))
        if scope["method"] == "PUT":
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                while True:
                    message = await receive()
                    os.write(fd, message.get("body", b""))
                    if not message.get("more_body"):
                        break
            finally:
                os.close(fd)
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})
            return
        # blocking reads in the event loop: the simplest app, the fastest baseline
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        try:
            headers = [(b"content-length", b"%d" % os.fstat(fd).st_size)]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            while data := os.read(fd, CHUNK):
                await send({"type": "http.response.body", "body": data, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            os.close(fd)

    trio.run(hypercorn.trio.serve, app, agent_like_config(port))


@contextmanager
def bare_server(root: Path) -> Iterator[tuple[str, int]]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.files", "--serve-bare", str(port), str(root)],
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while subprocess.run(curl(url + "/ping"), capture_output=True).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError("the bare app did not start")
            time.sleep(0.05)
        yield url, proc.pid
    finally:
        proc.kill()
        proc.wait()


@contextmanager
def sendfile_server(path: Path) -> Iterator[str]:
    """The reference for the ``cat`` target: a plain socket server in a thread answering
    every request with ``path`` by ``os.sendfile`` (zero copy, no HTTP framework)."""
    listener = socket.create_server(("127.0.0.1", 0))
    size = path.stat().st_size

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # closed
            with conn, path.open("rb") as fh:
                conn.recv(65536)
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % size
                )
                sent = 0
                while sent < size:
                    sent += os.sendfile(conn.fileno(), fh.fileno(), sent, size - sent)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/"
    finally:
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        thread.join(5)


# --- measurements ------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def taking_turns(
    repeat: int, runs: dict[str, tuple[int, list[str]]], *, before: Callable[[], object]
) -> dict[str, tuple[float, float]]:
    """Each of ``runs`` (name: server pid, curl command) ``repeat`` times, in turns (the
    first of a turn alternates), ``before`` each: name -> (best wall time, median server
    CPU seconds)."""
    walls: dict[str, list[float]] = {name: [] for name in runs}
    cpus: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for turn in range(repeat):
        for name in names[turn % 2 :] + names[: turn % 2]:
            pid, cmd = runs[name]
            before()
            cpu = cpu_seconds(pid)
            start = time.perf_counter()
            run_ok(cmd)
            walls[name].append(time.perf_counter() - start)
            cpus[name].append(cpu_seconds(pid) - cpu)
    return {name: (min(walls[name]), statistics.median(cpus[name])) for name in runs}


def transfers(agent: Agent, volume_id: str, volume: Path, base: Path, args: Any) -> dict[str, Any]:
    size = args.size_mb << 20
    big = volume / "big.bin"
    make_big(big, size)
    run_ok(["cat", str(big)])  # page cache warm for everyone
    url = f"http://127.0.0.1:{agent.port}/volumes/{volume_id}/files/content?path="
    out: dict[str, Any] = {"size_mb": args.size_mb}
    out["cat_s"] = best(args.repeat, lambda: run_ok(["sh", "-c", f"cat '{big}' > /dev/null"]))
    with sendfile_server(big) as plain:
        out["sendfile_s"] = best(args.repeat, lambda: run_ok(curl(plain)))
    bare_root = base / "bare"
    bare_root.mkdir()
    os.link(big, bare_root / "big.bin")
    pid = agent.proc.pid
    with bare_server(bare_root) as (bare, bare_pid):
        with peak_rss(pid) as grown_down:
            down = taking_turns(
                args.repeat,
                {
                    "agent": (pid, curl(url + "big.bin", token=agent.token)),
                    "bare": (bare_pid, curl(f"{bare}/big.bin")),
                },
                before=lambda: None,
            )
        with peak_rss(pid) as grown_up:
            up = taking_turns(
                args.repeat,
                {
                    "agent": (pid, curl(url + "up.bin", "-T", str(big), token=agent.token)),
                    "bare": (bare_pid, curl(f"{bare}/up.bin", "-T", str(big))),
                },
                before=lambda: run_ok(["sync"]),  # the last upload's write-back is not theirs
            )
    out["agent_download_rss_growth"] = grown_down["growth"]
    out["agent_upload_rss_growth"] = grown_up["growth"]
    for name, (wall, cpu) in down.items():
        out[f"{name}_download_s"], out[f"{name}_download_cpu_s"] = wall, cpu
    for name, (wall, cpu) in up.items():
        out[f"{name}_upload_s"], out[f"{name}_upload_cpu_s"] = wall, cpu
    assert (volume / "up.bin").stat().st_size == size
    assert (bare_root / "up.bin").stat().st_size == size
    (volume / "up.bin").unlink()
    shutil.rmtree(bare_root)
    big.unlink()
    return out


def searches(agent: Agent, volume_id: str, volume: Path, args: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"names": args.names, "content_files": args.content_files}
    print(f"making {args.names} files …", file=sys.stderr)
    name_matches = make_names(volume / "names", args.names)
    query = urllib.parse.urlencode({"q": NEEDLE, "path": "names", "limit": 1000})

    def by_name() -> None:
        status, body = agent.request("GET", f"/volumes/{volume_id}/files/search?{query}")
        assert status == 200 and len(body["results"]) == name_matches, (status, body)

    def find() -> None:
        done = run_ok(["find", str(volume / "names"), "-iname", f"*{NEEDLE}*"])
        assert done.stdout.count(b"\n") == name_matches

    by_name()  # warm the dentry cache for both
    with peak_rss(agent.proc.pid) as grown:
        out["agent_names_s"] = best(args.repeat, by_name)
    out["agent_names_rss_growth"] = grown["growth"]
    out["find_s"] = best(args.repeat, find)
    shutil.rmtree(volume / "names")
    print(f"making {args.content_files} text files …", file=sys.stderr)
    text_matches = make_texts(volume / "texts", args.content_files)
    query = urllib.parse.urlencode({"q": NEEDLE, "path": "texts", "content": "true", "limit": 1000})

    def by_content() -> None:
        status, body = agent.request("GET", f"/volumes/{volume_id}/files/search?{query}")
        assert status == 200 and len(body["results"]) == text_matches, (status, body)

    def grep() -> None:
        done = run_ok(["grep", "-rli", NEEDLE, str(volume / "texts")])
        assert done.stdout.count(b"\n") == text_matches

    by_content()
    with peak_rss(agent.proc.pid) as grown:
        out["agent_content_s"] = best(args.repeat, by_content)
    out["agent_content_rss_growth"] = grown["growth"]
    out["grep_s"] = best(args.repeat, grep)
    shutil.rmtree(volume / "texts")
    return out


# --- report ------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="lightd-bench-files-", dir=args.dir) as tmp:
        base = Path(tmp)
        node = base / "node"
        node.mkdir()
        agent = Agent(node)
        try:
            created = agent.call("POST", "/volumes")
            volume_id, volume = created["volume_id"], Path(created["path"])
            moved: dict[str, Any] = {}
            searched: dict[str, Any] = {}
            if "transfer" in args.parts:
                print(f"transfers of {args.size_mb} MiB …", file=sys.stderr)
                moved = transfers(agent, volume_id, volume, base, args)
            if "search" in args.parts:
                searched = searches(agent, volume_id, volume, args)
        finally:
            agent.stop()
            problems = [
                line
                for line in agent.log.read_text(errors="replace").splitlines()
                if "ERROR" in line or "Traceback" in line
            ]
    return {
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "cpus": os.cpu_count(),
        "transfer": moved,
        "search": searched,
        "agent_log_problems": problems[:20],
    }


def verdict(ok: bool) -> str:
    return "ok" if ok else "BELOW TARGET"


def _line(label: str, ours: float, theirs_label: str, theirs: float, target: str) -> None:
    ratio = theirs / ours  # times: the baseline's time over ours is our speed over theirs
    ok = verdict(ratio >= TARGETS[target])
    print(
        f"  {label:<22} {ours:8.3f} s   {theirs_label:<18} {theirs:8.3f} s"
        f"   ratio {ratio:6.2f}  (target >= {TARGETS[target]})  {ok}"
    )


def _rss(label: str, growth: int) -> None:
    ok = verdict(growth < RSS_TARGET)
    print(f"  agent RSS growth during {label:<16} {growth / 2**20:7.1f} MB  (target < 30)  {ok}")


def print_report(r: dict[str, Any]) -> None:
    print(
        f"lightd file manager bench: {r['cpus']} CPUs, load average before "
        f"{r['load_average_before'][0]:.2f}, after {r['load_average_after'][0]:.2f}\n"
    )
    if t := r["transfer"]:
        mb = t["size_mb"]
        print(f"transfers of {mb} MiB (best of runs; MB/s = {mb} / time):")
        _line("agent download", t["agent_download_s"], "cat > /dev/null", t["cat_s"],
              "download_vs_cat")  # fmt: skip
        _line("agent download", t["agent_download_s"], "bare app download",
              t["bare_download_s"], "download_vs_bare")  # fmt: skip
        _line("agent upload", t["agent_upload_s"], "bare app upload", t["bare_upload_s"],
              "upload_vs_bare")  # fmt: skip
        print(
            f"  (MB/s: agent down {mb / t['agent_download_s']:.0f}, up "
            f"{mb / t['agent_upload_s']:.0f}; bare down {mb / t['bare_download_s']:.0f}, up "
            f"{mb / t['bare_upload_s']:.0f}; cat {mb / t['cat_s']:.0f}; reference: a plain "
            f"sendfile server {mb / t['sendfile_s']:.0f}, i.e. {t['cat_s'] / t['sendfile_s']:.2f}"
            " of cat at best over HTTP to curl here)"
        )
        print(
            f"  (server CPU s, median: agent down {t['agent_download_cpu_s']:.2f}, up "
            f"{t['agent_upload_cpu_s']:.2f}; bare down {t['bare_download_cpu_s']:.2f}, up "
            f"{t['bare_upload_cpu_s']:.2f})"
        )
        _rss("download", t["agent_download_rss_growth"])
        _rss("upload", t["agent_upload_rss_growth"])
        print()
    if s := r["search"]:
        print("search (best of runs):")
        _line(f"names ({s['names']})", s["agent_names_s"], "find -iname", s["find_s"],
              "search_names_vs_find")  # fmt: skip
        _line(f"content ({s['content_files']})", s["agent_content_s"], "grep -rli",
              s["grep_s"], "search_content_vs_grep")  # fmt: skip
        _rss("name search", s["agent_names_rss_growth"])
        _rss("content search", s["agent_content_rss_growth"])
    if r["agent_log_problems"]:
        print("\nagent log problems:")
        for line in r["agent_log_problems"]:
            print(f"  {line}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--serve-bare"]:
        serve_bare(int(argv[1]), argv[2])
        return 0
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1024, help="download/upload size")
    parser.add_argument("--names", type=int, default=100_000, help="files for the name search")
    parser.add_argument("--content-files", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to put the data (default: $TMPDIR)")
    parser.add_argument(
        "--parts", nargs="+", choices=["transfer", "search"], default=["transfer", "search"]
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    report = run(args)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
