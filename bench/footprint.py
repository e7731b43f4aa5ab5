"""The agent's footprint and hot paths next to bare apps on the same stack, in one run.

Prints four ratios (issue 22), each beside its target:

1. **start-up**: process spawn → first 200 of ``GET /api/v1/public/ping`` for the agent
   (``python -m lightd``, every built-in plugin), vs spawn → first 200 of ``GET /`` for a
   hello-world quart-trio app on hypercorn with the agent's settings (``bench.http
   --serve-bare``); the median of ``--rounds`` alternating starts, after one unmeasured
   start of each (page cache, the agent's first-run store), and the CPU seconds each had
   used by then (all threads: steadier than the wall clock on a loaded machine). Byte code
   is cached for both (``PYTHONPYCACHEPREFIX`` in the run's temporary folder, written by
   the unmeasured start), as an installed package's is; ``--no-pyc-cache`` keeps the
   environment's settings. Target ≤ 1.5.
2. **idle RSS**: ``VmRSS`` of each, once it answers, has served 50 requests and has been
   left alone ``--settle`` seconds; the median of the same starts. Target ≤ 1.3.
3. **authenticated ping**: wrk requests/s (32 keep-alive connections, one thread) of the
   agent's ``GET /jobs`` with the master token and the vendor header (the lightest
   authenticated route: the whole Quart path, auth, rate limit, metrics, CORS, and an
   empty list), over the bare app's ``GET /``; the best of ``--rounds`` alternating runs
   each. Target ≥ 0.9. Beside it ``GET /remote/config`` (a heavier view) and the public
   ping, and the apps' own CPU per request called in this process (no server, no socket).
4. **GET /containers/:id** (the fast read path) p50 vs Docker's own inspect of the same
   container (``GET /containers/<id>/json``): the agent over TCP, Docker over its unix
   socket, one client for both (``http.client``, a kept-alive connection, the JSON
   decoded), in alternating blocks of 100. Target ≤ 1.0. Beside it the floor: a bare
   ASGI app on hypercorn's trio worker sending the agent's exact bytes (``bench.containers
   --serve-floor``), same client; the gap to it, target ≤ 10 %. And, for continuity with
   ``bench.containers``, the same GET through httpx vs inspect through docker-py.

Run: ``.venv/bin/python -m bench.footprint [--rounds 5] [--duration 5] [--blocks 10]
[--json]``. Needs wrk (``apt-get install wrk``) and, for part 4, the engine of
``scripts/docker-engine.sh`` (``DOCKER_HOST``) and its test image (``--no-docker`` skips
part 4). The container it makes is removed at the end, whatever happens. On a shared
2-core machine the absolute figures swing with the load; the ratios, measured side by side
in alternation, are the result.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench.http import (
    ACCEPT,
    Server,
    free_port,
    log_problems,
    log_tail,
    prepare_agent,
    run_wrk,
    stop,
)

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent
IMAGE = os.environ.get("LIGHTD_TEST_IMAGE", "lightd/busybox:latest")
PING = "/api/v1/public/ping"
START_TIMEOUT = 30.0
POLL = 0.005


# -- processes -----------------------------------------------------------------------


TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """CPU seconds a process has used so far, all its threads (less swayed by the load of
    the machine than the wall clock)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def child_environment(root: Path, cache: bool) -> dict[str, str]:
    """The servers' environment. ``cache``: byte code written once (by the unmeasured first
    start) and read by every later start, as an installed package's is (pip compiles it at
    install). Without it, where ``PYTHONDONTWRITEBYTECODE`` is set (as in this project's
    sessions), every start of an editable install compiles each of the agent's modules
    from source again, while the libraries' byte code was compiled by pip."""
    env = dict(os.environ)
    if cache:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(root / "pycache")
    return env


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def try_get(port: int, path: str) -> int:
    """The status of one request, 0 when nothing answers yet."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5.0)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.status
    except OSError:
        return 0
    finally:
        conn.close()


@contextlib.contextmanager
def started(
    name: str, argv: list[str], port: int, path: str, cwd: Path, log: Path, env: dict[str, str]
) -> Iterator[tuple[Server, float, float]]:
    """Spawn a server; yield it with the seconds from spawn to its first 200 on ``path``
    and the CPU seconds it had used by then."""
    with log.open("ab") as out:
        began = time.perf_counter()
        proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = Server(name, proc, log, port)
    try:
        while try_get(port, path) != 200:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{log_tail(log)}")
            if time.perf_counter() - began > START_TIMEOUT:
                raise RuntimeError(
                    f"{name} did not answer in {START_TIMEOUT:.0f}s:\n{log_tail(log)}"
                )
            time.sleep(POLL)
        seconds = time.perf_counter() - began
        yield server, seconds, cpu_seconds(proc.pid)
    finally:
        stop(server)


class Targets:
    """How to start the agent and the bare app, with their ports and logs."""

    def __init__(self, root: Path, cache: bool) -> None:
        self.env = child_environment(root, cache)
        self.node = root / "node"
        self.node.mkdir()
        self.config, self.token, self.agent_port = prepare_agent(self.node)
        self.agent_log = root / "agent.log"
        self.bare_log = root / "bare.log"
        self.bare_port = free_port()
        self.auth = {"Accept": ACCEPT, "Authorization": f"Bearer {self.token}"}

    def agent(self) -> contextlib.AbstractContextManager[tuple[Server, float, float]]:
        argv = [sys.executable, "-m", "lightd", "--config", str(self.config)]
        return started("agent", argv, self.agent_port, PING, self.node, self.agent_log, self.env)

    def bare(self) -> contextlib.AbstractContextManager[tuple[Server, float, float]]:
        argv = [sys.executable, "-m", "bench.http", "--serve-bare", str(self.bare_port)]
        return started("bare", argv, self.bare_port, "/", REPO, self.bare_log, self.env)


# -- 1, 2: start-up and idle RSS --------------------------------------------------------


def footprint(targets: Targets, args: argparse.Namespace) -> dict[str, dict[str, list[float]]]:
    found: dict[str, dict[str, list[float]]] = {
        name: {"startup_s": [], "startup_cpu_s": [], "rss_mb": []} for name in ("agent", "bare")
    }
    for round_ in range(args.rounds + 1):  # the first start of each is not counted
        for name, start, path in (
            ("agent", targets.agent, PING),
            ("bare", targets.bare, "/"),
        ):
            with start() as (server, seconds, cpu):
                for _ in range(50):
                    try_get(server.port, path)
                time.sleep(args.settle)  # idle: what it holds at rest
                rss = rss_bytes(server.proc.pid) / 2**20
            if round_:
                found[name]["startup_s"].append(seconds)
                found[name]["startup_cpu_s"].append(cpu)
                found[name]["rss_mb"].append(rss)
            print(
                f"  {name}: start-up {seconds:.3f} s ({cpu:.2f} s CPU), RSS {rss:.1f} MB",
                file=sys.stderr,
            )
    return found


# -- 3: authenticated ping -------------------------------------------------------------


#: wrk targets on the agent: name → (path, authenticated).
AGENT_LOADS = {
    "agent GET /jobs": ("/jobs", True),
    "agent GET /remote/config": ("/remote/config", True),
    f"agent GET {PING}": (PING, False),
}


def throughput(targets: Targets, args: argparse.Namespace) -> dict[str, float]:
    """Best requests/s of each target over alternating rounds."""
    auth = [f"{k}: {v}" for k, v in targets.auth.items()]
    best = dict.fromkeys([*AGENT_LOADS, "bare GET /"], 0.0)
    for _ in range(args.rounds):
        with targets.agent() as (agent, _, _):
            for name, (path, authenticated) in AGENT_LOADS.items():
                headers = auth if authenticated else []
                run_wrk(agent.url(path), headers, args.warmup, args.connections)
                got = run_wrk(agent.url(path), headers, args.duration, args.connections)
                check(name, got)
                best[name] = max(best[name], got["requests_per_s"])
        with targets.bare() as (bare, _, _):
            run_wrk(bare.url("/"), [], args.warmup, args.connections)
            got = run_wrk(bare.url("/"), [], args.duration, args.connections)
            check("bare GET /", got)
            best["bare GET /"] = max(best["bare GET /"], got["requests_per_s"])
        print(f"  throughput so far (best): {best}", file=sys.stderr)
    return best


def app_cost(targets: Targets, requests: int = 2000, rounds: int = 7) -> dict[str, float]:
    """CPU microseconds per request of the apps alone, called in this process at the ASGI
    level (no server, no socket): the agent's ``GET /jobs`` (master token: auth, rate
    limit, metrics, CORS) and public ping, and the bare app's ``GET /``; the least of
    ``rounds`` each, alternating. Steadier than wrk on a loaded machine; the server's own
    cost, the same for both, is not in it."""
    import trio
    from lightd.api.app import create_app
    from lightd.runtime import open_agent
    from quart_trio import QuartTrio

    bare = QuartTrio("bare")

    @bare.get("/")
    async def hello() -> dict[str, str]:
        return {"status": "ok", "message": "hello"}

    def scope(path: str, headers: dict[str, str]) -> dict[str, Any]:
        return {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": [(b"host", b"127.0.0.1")]
            + [(k.lower().encode(), v.encode()) for k, v in headers.items()],
            "client": ("127.0.0.1", 40000),
            "server": ("127.0.0.1", 8070),
        }

    async def cost(app: Any, request: dict[str, Any]) -> float:
        state = {"calls": 0, "status": 0}

        async def receive() -> dict[str, Any]:
            state["calls"] += 1
            if state["calls"] == 1:
                return {"type": "http.request", "body": b"", "more_body": False}
            await trio.sleep_forever()
            raise AssertionError

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                state["status"] = message["status"]

        began = time.thread_time()
        for _ in range(requests):
            state["calls"] = 0
            await app(dict(request), receive, send)
        if state["status"] != 200:
            raise RuntimeError(f"in-process {request['path']} answered {state['status']}")
        return (time.thread_time() - began) / requests * 1e6

    async def run() -> dict[str, float]:
        async with open_agent(targets.config) as agent:
            app = create_app(agent, agent.hooks.routes(agent))
            loads = {
                "agent GET /jobs": (app, scope("/jobs", targets.auth)),
                f"agent GET {PING}": (app, scope(PING, {})),
                "bare GET /": (bare, scope("/", {})),
            }
            best = dict.fromkeys(loads, float("inf"))
            for _ in range(rounds):
                for name, (target, request) in loads.items():
                    best[name] = min(best[name], await cost(target, request))
            return best

    return trio.run(run)


def check(name: str, figures: dict[str, Any]) -> None:
    if figures["non_2xx"] or figures["socket_errors"]:
        raise RuntimeError(
            f"{name}: {figures['non_2xx']} non-2xx, {figures['socket_errors']} errors"
        )


# -- 4: GET /containers/:id vs inspect vs the floor -------------------------------------


class UnixConnection(http.client.HTTPConnection):
    """``http.client`` over a unix socket (Docker's)."""

    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=30.0)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.socket_path)
        self.sock = sock


def docker_socket() -> str:
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if not host.startswith("unix://"):
        raise RuntimeError(f"DOCKER_HOST={host}: this bench speaks to a unix socket only")
    return host.removeprefix("unix://")


def call(
    conn: http.client.HTTPConnection,
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
    body: Any = None,
) -> tuple[int, bytes]:
    data = None if body is None else json.dumps(body).encode()
    sent = dict(headers or {})
    if data is not None:
        sent["Content-Type"] = "application/json"
    conn.request(method, path, body=data, headers=sent)
    response = conn.getresponse()
    return response.status, response.read()


def get_json(conn: http.client.HTTPConnection, path: str, headers: dict[str, str]) -> Any:
    status, body = call(conn, "GET", path, headers)
    if status != 200:
        raise RuntimeError(f"GET {path} answered {status}: {body[:300]!r}")
    return json.loads(body)


@contextlib.contextmanager
def floor_server(body: bytes, log: Path) -> Iterator[int]:
    """``bench.containers``' floor: a bare ASGI app on hypercorn answering ``body``."""
    port = free_port()
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.containers", "--serve-floor", str(port)],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        assert proc.stdin is not None
        proc.stdin.write(body)
        proc.stdin.close()
        deadline = time.monotonic() + START_TIMEOUT
        while try_get(port, "/") != 200:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the floor server did not start:\n{log_tail(log)}")
            time.sleep(POLL)
        yield port
    finally:
        stop(Server("floor", proc, log, port))


def timed_ms(fn: Callable[[], Any]) -> float:
    began = time.perf_counter()
    fn()
    return (time.perf_counter() - began) * 1000


def reads(targets: Targets, args: argparse.Namespace, root: Path) -> dict[str, float]:
    """p50 in ms of each read, in alternating blocks."""
    internal_id = f"fpbench-{os.getpid()}"
    path = f"/containers/{internal_id}"
    docker_path = docker_socket()
    api = http.client.HTTPConnection("127.0.0.1", targets.agent_port, timeout=60.0)
    engine = UnixConnection(docker_path)
    volume = ""
    try:
        with targets.agent() as (agent, _, _):
            status, body = call(api, "POST", "/volumes", targets.auth, {})
            if status not in (200, 201):
                raise RuntimeError(f"POST /volumes answered {status}: {body[:300]!r}")
            volume = json.loads(body)["volume_id"]
            create = {
                "internal_id": internal_id,
                "image": IMAGE,
                "volume_id": volume,
                "startup_command": "sleep 3600",
            }
            status, body = call(api, "POST", "/containers", targets.auth, create)
            if status not in (200, 201, 202):
                raise RuntimeError(f"POST /containers answered {status}: {body[:300]!r}")
            deadline = time.monotonic() + 120
            while (seen := get_json(api, path, targets.auth))["install_state"] != "ready":
                if seen["install_state"] == "failed" or time.monotonic() > deadline:
                    raise RuntimeError(f"{internal_id} did not install: {seen}")
                time.sleep(0.05)
            filters = json.dumps({"label": [f"lightd.internal_id={internal_id}"]})
            listed = get_json(engine, f"/containers/json?all=1&filters={_quote(filters)}", {})
            if len(listed) != 1:
                raise RuntimeError(f"Docker lists {len(listed)} containers for {internal_id}")
            inspect = f"/containers/{listed[0]['Id']}/json"
            status, sample = call(api, "GET", path, targets.auth)
            with floor_server(sample, root / "floor.log") as floor_port:
                floor = http.client.HTTPConnection("127.0.0.1", floor_port, timeout=30.0)
                ours = same_client(api, engine, floor, path, inspect, targets.auth, args)
                floor.close()
            ours.update(library_clients(agent, path, listed[0]["Id"], targets.auth, args))
            api.close()  # idle past hypercorn's keep-alive timeout meanwhile: a new one
            call(api, "DELETE", path, targets.auth)
            call(api, "DELETE", f"/volumes/{volume}", targets.auth)
        return ours
    finally:
        api.close()
        with contextlib.suppress(OSError, http.client.HTTPException):  # whatever was left
            listed = get_json(
                engine,
                "/containers/json?all=1&filters="
                + _quote(json.dumps({"label": [f"lightd.internal_id={internal_id}"]})),
                {},
            )
            for found in listed:
                call(engine, "DELETE", f"/containers/{found['Id']}?force=1&v=1")
        engine.close()


def _quote(text: str) -> str:
    from urllib.parse import quote

    return quote(text, safe="")


def same_client(
    api: http.client.HTTPConnection,
    engine: http.client.HTTPConnection,
    floor: http.client.HTTPConnection,
    path: str,
    inspect: str,
    auth: dict[str, str],
    args: argparse.Namespace,
) -> dict[str, float]:
    samples: dict[str, list[float]] = {"agent": [], "inspect": [], "floor": []}
    for _ in range(args.blocks):
        samples["agent"] += [timed_ms(lambda: get_json(api, path, auth)) for _ in range(100)]
        samples["inspect"] += [timed_ms(lambda: get_json(engine, inspect, {})) for _ in range(100)]
        samples["floor"] += [timed_ms(lambda: get_json(floor, "/", {})) for _ in range(100)]
    return {name: statistics.median(values) for name, values in samples.items()}


def library_clients(
    agent: Server, path: str, docker_id: str, auth: dict[str, str], args: argparse.Namespace
) -> dict[str, float]:
    """As ``bench.containers`` measures it: httpx for the agent, docker-py for Docker."""
    import docker
    import httpx

    raw = docker.from_env()
    gets: list[float] = []
    inspects: list[float] = []
    try:
        with httpx.Client(base_url=agent.url(""), headers=auth, timeout=30) as client:
            for _ in range(args.blocks):
                gets += [timed_ms(lambda: client.get(path).json()) for _ in range(100)]
                inspects += [
                    timed_ms(lambda: raw.api.inspect_container(docker_id)) for _ in range(100)
                ]
    finally:
        raw.close()
    return {
        "agent (httpx)": statistics.median(gets),
        "inspect (docker-py)": statistics.median(inspects),
    }


# -- report ----------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    report: dict[str, Any] = {"rounds": args.rounds, "bytecode_cached": not args.no_pyc_cache}
    with tempfile.TemporaryDirectory(prefix="lightd-footprint-") as tmp:
        root = Path(tmp)
        targets = Targets(root, not args.no_pyc_cache)
        print("start-up and idle RSS", file=sys.stderr)
        found = footprint(targets, args)
        median = {
            name: {key: statistics.median(values) for key, values in figures.items()}
            for name, figures in found.items()
        }
        agent, bare = median["agent"], median["bare"]
        report["footprint"] = {"samples": found, "median": median}
        report["ratios"] = {
            "start-up": agent["startup_s"] / bare["startup_s"],
            "start-up CPU": agent["startup_cpu_s"] / bare["startup_cpu_s"],
            "idle RSS": agent["rss_mb"] / bare["rss_mb"],
        }
        print("throughput", file=sys.stderr)
        best = throughput(targets, args)
        report["throughput"] = best
        for name in AGENT_LOADS:
            report["ratios"][name] = best[name] / best["bare GET /"]
        print("the apps' own cost, in process", file=sys.stderr)
        per_request = app_cost(targets)
        report["app_cpu_us"] = per_request
        report["ratios"]["in process, GET /jobs"] = (
            per_request["bare GET /"] / per_request["agent GET /jobs"]
        )
        if not args.no_docker:
            print("GET /containers/:id vs inspect", file=sys.stderr)
            p50 = reads(targets, args, root)
            report["reads_p50_ms"] = p50
            report["ratios"]["GET"] = p50["agent"] / p50["inspect"]
            report["ratios"]["floor"] = p50["agent"] / p50["floor"]
            report["ratios"]["GET (httpx vs docker-py)"] = (
                p50["agent (httpx)"] / p50["inspect (docker-py)"]
            )
        report["log_problems"] = log_problems(targets.agent_log) + [
            f"bare: {line}" for line in log_problems(targets.bare_log)
        ]
    return report


def print_report(report: dict[str, Any], args: argparse.Namespace) -> None:
    ratios = report["ratios"]
    median = report["footprint"]["median"]
    agent, bare = median["agent"], median["bare"]
    best = report["throughput"]

    def line(label: str, figures: str, ratio: float, target: str, ok: bool | None) -> None:
        verdict = "" if ok is None else f"  (target {target})  {'ok' if ok else 'MISSED'}"
        print(f"{label:<26}{figures:<54} ratio {ratio:5.2f}{verdict}")

    cached = "byte code cached" if report["bytecode_cached"] else "no byte-code cache"
    print(
        f"lightd footprint bench ({cached}): medians of {args.rounds} alternating starts;"
        f" wrk -t1 -c{args.connections}, best of {args.rounds} x {args.duration}s;"
        f" {args.blocks}x100 alternating reads\n"
    )
    r = ratios["start-up"]
    line(
        "start-up to first ping",
        f"agent {agent['startup_s']:.3f} s  bare {bare['startup_s']:.3f} s",
        r,
        "<= 1.5",
        r <= 1.5,
    )
    r = ratios["start-up CPU"]
    line(
        "  (CPU until then",
        f"agent {agent['startup_cpu_s']:.3f} s  bare {bare['startup_cpu_s']:.3f} s)",
        r,
        "<= 1.5",
        r <= 1.5,
    )
    r = ratios["idle RSS"]
    line(
        "idle RSS",
        f"agent {agent['rss_mb']:.1f} MB  bare {bare['rss_mb']:.1f} MB",
        r,
        "<= 1.3",
        r <= 1.3,
    )
    bare_rate = best["bare GET /"]
    for name in AGENT_LOADS:
        r = ratios[name]
        label = "authenticated ping" if name == "agent GET /jobs" else ""
        line(
            label,
            f"{name.removeprefix('agent ')} {best[name]:.0f} req/s  bare {bare_rate:.0f}",
            r,
            ">= 0.9",
            r >= 0.9,
        )
    us = report["app_cpu_us"]
    r = ratios["in process, GET /jobs"]
    line(
        "  (in process, no server",
        f"GET /jobs {us['agent GET /jobs']:.0f} us  ping {us[f'agent GET {PING}']:.0f} us"
        f"  bare {us['bare GET /']:.0f} us CPU)",
        r,
        "",
        None,
    )
    if "reads_p50_ms" in report:
        p50 = report["reads_p50_ms"]
        r = ratios["GET"]
        line(
            "GET /containers/:id p50",
            f"agent {p50['agent']:.3f} ms  inspect {p50['inspect']:.3f} ms",
            r,
            "<= 1.0",
            r <= 1.0,
        )
        r = ratios["floor"]
        line(
            "  vs the bare ASGI floor",
            f"same bytes {p50['floor']:.3f} ms  gap {r - 1:+.1%}",
            r,
            "<= 1.10",
            r <= 1.10,
        )
        r = ratios["GET (httpx vs docker-py)"]
        line(
            "  (httpx vs docker-py",
            f"agent {p50['agent (httpx)']:.3f} ms  inspect {p50['inspect (docker-py)']:.3f} ms)",
            r,
            "<= 1.0",
            r <= 1.0,
        )
    if report["log_problems"]:
        print("\nserver logs reported problems:")
        for problem in report["log_problems"][:20]:
            print(f"  {problem}")


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="alternating starts / wrk runs")
    parser.add_argument("--settle", type=float, default=2.0, help="idle seconds before RSS")
    parser.add_argument("--duration", type=int, default=5, help="wrk seconds per run")
    parser.add_argument("--warmup", type=int, default=1, help="wrk warm-up seconds")
    parser.add_argument("--connections", type=int, default=32, help=argparse.SUPPRESS)
    parser.add_argument("--blocks", type=int, default=10, help="blocks of 100 reads each")
    parser.add_argument("--no-docker", action="store_true", help="skip GET vs inspect")
    parser.add_argument(
        "--no-pyc-cache",
        action="store_true",
        help="leave the byte-code settings of the environment as they are",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.rounds < 1 or args.duration < 1 or args.blocks < 1:
        parser.error("--rounds, --duration and --blocks must be >= 1")
    if shutil.which("wrk") is None:
        print("bench/footprint.py needs wrk on PATH: apt-get install wrk", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        report = run(args)
    except KeyboardInterrupt:
        print("interrupted: servers stopped", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
