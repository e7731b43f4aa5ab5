"""HTTP throughput of the agent's API against a bare quart-trio app on the same server stack.

Measures requests/s and p50/p99 latency with wrk (32 keep-alive connections, one thread) for
  1. the agent's authenticated ``GET /remote/config``,
  2. the agent's ``GET /api/v1/public/ping``,
  3. a hello-world QuartTrio app served by ``hypercorn.trio.serve`` with the agent's hypercorn
     settings: the ceiling, so the ratio isolates what the agent's own layers cost,
each for a fixed duration after a short warm-up, then prints the agent/bare request-rate ratios.

Target: each agent route serves at least 70 % of the bare app's requests/s.

Rate limits on vs off (``server.rate_limit``, contract §17), on the same agent, switched by
rewriting config.json and ``POST /remote/config/reload`` between measurements:
  4. the fast read path (``GET /containers``, master token, answered in front of Quart),
     off (``requests_per_minute: 0``) vs on with ``master: true``,
  5. the same route with a temporary token (through Quart: temporary tokens never take the
     fast path), off vs on,
"on" being a limit so high it is never reached, so every request pays the check and gets
the headers but none is refused. Off and on alternate ``--rounds`` times; the best of each
is kept (the machine is shared; the best is the least disturbed). Target: on/off >= 0.95.
Over sockets that ratio is only as steady as the machine is quiet, so the fast path is also
timed in process (its ASGI front called directly, CPU time of this thread, off and on
alternating): what the check itself adds to one request, in microseconds, and the on/off
ratio that cost implies at the fast path's measured rate ("projected").

Run (needs ``wrk``: ``apt-get install wrk``; no Docker engine needed)::

    .venv/bin/python -m bench.http [--duration 10] [--warmup 2] [--json]

Exits 1 when a response was not 2xx/3xx or wrk saw socket errors: such figures are void.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence
    from types import FrameType

    import hypercorn.config

HERE = Path(__file__).resolve()
CONNECTIONS = 32
TARGET_RATIO = 0.70
RATE_LIMIT_TARGET = 0.95
#: "On": a limit no bench reaches (about 16 million requests a second, a billion at once).
NEVER_REACHED = {"requests_per_minute": 10**9, "burst": 10**9, "master": True}
RATE_LIMIT_OFF = {"requests_per_minute": 0, "burst": 1, "master": True}
ACCEPT = "Application/vnd.pkglatv1+json"
#: The agent's default ``server.graceful_timeout``, so the bare server matches it.
GRACEFUL_TIMEOUT = 5.0
READY_TIMEOUT = 30.0
STOP_TIMEOUT = GRACEFUL_TIMEOUT + 10.0
_MS_PER_UNIT = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
_LOG_PROBLEM = re.compile(r"\b(ERROR|CRITICAL)\b|Traceback")


@dataclass(frozen=True, slots=True)
class Result:
    """One target's figures, as wrk reported them for the measured run."""

    name: str
    url: str
    check_status: int
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    requests: int
    non_2xx: int
    socket_errors: int


@dataclass(frozen=True, slots=True)
class Server:
    """A server subprocess, its log (shown when it fails) and where it listens."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    port: int

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


def free_port() -> int:
    """A port the kernel says is free now (tiny race until the server binds it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(no log: {exc})"


def http_get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """One plain request, for readiness polling and a status check before loading a route."""
    status, body, _ = http_request(port, "GET", path, headers)
    return status, body


def http_request(
    port: int,
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
) -> tuple[int, bytes, dict[str, str]]:
    """One request: status, body and headers (names lower-cased)."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10.0)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        found = {name.lower(): value for name, value in response.getheaders()}
        return response.status, response.read(), found
    finally:
        conn.close()


def wait_ready(server: Server, path: str) -> None:
    """Poll ``path`` until it answers 200, failing fast if the process dies."""
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if (code := server.proc.poll()) is not None:
            raise RuntimeError(
                f"{server.name} exited with {code} before it was ready; "
                f"log:\n{log_tail(server.log)}"
            )
        with contextlib.suppress(OSError):
            if http_get(server.port, path)[0] == 200:
                return
        time.sleep(0.05)
    raise RuntimeError(
        f"{server.name} not ready within {READY_TIMEOUT:.0f}s; log:\n{log_tail(server.log)}"
    )


def stop(server: Server) -> None:
    """SIGINT (the agent's graceful stop), then SIGKILL if it overstays."""
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGINT)
        try:
            server.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            print(f"{server.name} ignored SIGINT for {STOP_TIMEOUT:.0f}s: killed", file=sys.stderr)
            server.proc.kill()
            server.proc.wait()


@contextlib.contextmanager
def running(
    name: str, argv: Sequence[str], *, port: int, cwd: Path, log: Path, ready_path: str
) -> Iterator[Server]:
    """A ready server for the block's duration, stopped on the way out whatever happens.

    Its own session keeps a terminal Ctrl-C from reaching it: the bench alone stops it, once.
    """
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = Server(name, proc, log, port)
    try:
        wait_ready(server, ready_path)
        yield server
    finally:
        stop(server)


def prepare_agent(folder: Path) -> tuple[Path, str, int]:
    """Create a fresh agent config (via ``lightd --token reset``) bound to a free local port."""
    config = folder / "config.json"
    done = subprocess.run(
        [sys.executable, "-m", "lightd", "--config", str(config), "--token", "reset"],
        cwd=folder,
        capture_output=True,
        text=True,
        check=False,
    )
    found = re.search(r"New Token: (\S+)", done.stdout)
    if done.returncode != 0 or found is None:
        raise RuntimeError(f"lightd --token reset failed ({done.returncode}):\n{done.stderr}")
    raw = json.loads(config.read_text(encoding="utf-8"))
    port = free_port()
    raw["server"]["host"] = "127.0.0.1"
    raw["server"]["port"] = port
    config.write_text(json.dumps(raw, indent=2) + "\n", encoding="utf-8")
    return config, found[1], port


def to_ms(value: str, unit: str) -> float:
    return float(value) * _MS_PER_UNIT[unit]


def parse_wrk(output: str) -> dict[str, Any]:
    """The figures we report from wrk's text output (it has no machine-readable mode)."""
    rate = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.MULTILINE)
    total = re.search(r"^\s*(\d+) requests in ", output, re.MULTILINE)
    pct = {
        p: re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s|m|h)\s*$", output, re.MULTILINE)
        for p in ("50", "99")
    }
    if rate is None or total is None or pct["50"] is None or pct["99"] is None:
        raise RuntimeError(f"unexpected wrk output:\n{output}")
    # wrk prints these two lines only when the count is non-zero; "Non-2xx" means status >= 400.
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    sock = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    return {
        "requests_per_s": float(rate[1]),
        "p50_ms": to_ms(*pct["50"].groups()),
        "p99_ms": to_ms(*pct["99"].groups()),
        "requests": int(total[1]),
        "non_2xx": int(non_2xx[1]) if non_2xx else 0,
        "socket_errors": sum(int(n) for n in sock.groups()) if sock else 0,
    }


def run_wrk(url: str, headers: Sequence[str], seconds: int, connections: int) -> dict[str, Any]:
    # One wrk thread: the machine has 2 cores, and the server (one trio worker) needs the other.
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "5s", "--latency"]
    for header in headers:
        argv += ["-H", header]
    done = subprocess.run([*argv, url], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    return parse_wrk(done.stdout)


def measure(
    name: str, server: Server, path: str, headers: dict[str, str], args: argparse.Namespace
) -> Result:
    """Check the route answers 200, warm it up, then measure it for ``--duration`` seconds."""
    print(f"measuring {name} ({args.warmup}s warm-up + {args.duration}s)", file=sys.stderr)
    status, body = http_get(server.port, path, headers)
    if status != 200:
        print(f"!!! {name} answered {status}: {body[:300]!r}", file=sys.stderr)
    lines = [f"{key}: {value}" for key, value in headers.items()]
    url = server.url(path)
    if args.warmup > 0:
        run_wrk(url, lines, args.warmup, args.connections)
    figures = run_wrk(url, lines, args.duration, args.connections)
    return Result(name=name, url=url, check_status=status, **figures)


def log_problems(path: Path) -> list[str]:
    """ERROR/CRITICAL/traceback lines a server logged: load can break what one call does not."""
    try:
        return [
            ln for ln in path.read_text(errors="replace").splitlines() if _LOG_PROBLEM.search(ln)
        ]
    except OSError:
        return []


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    """Measure the agent's two routes, then the bare app, one server running at a time."""
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="lightd-bench-") as tmp:
        root = Path(tmp)
        node = root / "node"  # the agent's config folder; its storage paths are relative to it
        node.mkdir()
        config, token, port = prepare_agent(node)
        auth = {"Accept": ACCEPT, "Authorization": f"Bearer {token}"}
        agent_argv = [sys.executable, "-m", "lightd", "--config", str(config)]
        agent_log = root / "agent.log"
        with running(
            "agent",
            agent_argv,
            port=port,
            cwd=node,
            log=agent_log,
            ready_path="/api/v1/public/ping",
        ) as agent:
            results.append(measure("agent GET /remote/config", agent, "/remote/config", auth, args))
            results.append(
                measure("agent GET /api/v1/public/ping", agent, "/api/v1/public/ping", {}, args)
            )
            limited, limit_ratios = measure_rate_limits(agent, config, auth, args)
        cost = fast_path_cost()
        problems = log_problems(agent_log)
        bare_port = free_port()
        # Run as a module from the repository root: bench/http.py run as a script would
        # shadow the standard library's http.
        bare_argv = [sys.executable, "-m", "bench.http", "--serve-bare", str(bare_port)]
        bare_log = root / "bare.log"
        repo = HERE.parent.parent
        with running(
            "bare", bare_argv, port=bare_port, cwd=repo, log=bare_log, ready_path="/"
        ) as bare:
            results.append(measure("bare quart-trio GET /", bare, "/", {}, args))
        problems += [f"bare: {line}" for line in log_problems(bare_log)]
    bare_rate = results[-1].requests_per_s
    ratios = {r.name: (r.requests_per_s / bare_rate if bare_rate else 0.0) for r in results[:-1]}
    invalid = [
        f"{r.name}: {r.non_2xx} non-2xx responses, {r.socket_errors} socket errors, "
        f"check request answered {r.check_status}"
        for r in (*results, *limited)
        if r.non_2xx or r.socket_errors or r.check_status != 200
    ]
    return {
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "rounds": args.rounds,
        "connections": args.connections,
        "wrk_threads": 1,
        "results": [asdict(r) for r in results],
        "ratios": ratios,
        "target_ratio": TARGET_RATIO,
        "meets_target": all(v >= TARGET_RATIO for v in ratios.values()),
        "rate_limit_results": [asdict(r) for r in limited],
        "rate_limit_ratios": limit_ratios,
        "rate_limit_target": RATE_LIMIT_TARGET,
        "rate_limit_meets_target": all(v >= RATE_LIMIT_TARGET for v in limit_ratios.values()),
        "fast_path_cpu_us": cost,
        "fast_path_projected_ratio": projected_ratio(limited, cost),
        "valid": not invalid,
        "invalid_reasons": invalid,
        "server_log_problems": problems,
    }


def print_report(report: dict[str, Any]) -> None:
    results = [Result(**r) for r in report["results"]]
    width = max(len(r.name) for r in results)
    print(
        f"lightd HTTP bench: {report['connections']} keep-alive connections, wrk -t1, "
        f"{report['duration_s']}s per target after {report['warmup_s']}s warm-up\n"
    )
    print(
        f"{'target':<{width}}  {'req/s':>9}  {'p50 ms':>8}  {'p99 ms':>8}"
        f"  {'requests':>9}  {'non-2xx':>7}  {'sock err':>8}"
    )
    for r in results:
        print(
            f"{r.name:<{width}}  {r.requests_per_s:>9.1f}  {r.p50_ms:>8.2f}  {r.p99_ms:>8.2f}"
            f"  {r.requests:>9}  {r.non_2xx:>7}  {r.socket_errors:>8}"
        )
    print()
    target = report["target_ratio"]
    label_width = max(len(name) for name in report["ratios"])
    for name, ratio in report["ratios"].items():
        verdict = "ok" if ratio >= target else "BELOW TARGET"
        print(
            f"ratio {name:<{label_width}} / bare: {ratio:6.1%}  (target >= {target:.0%})  {verdict}"
        )
    limited = [Result(**r) for r in report["rate_limit_results"]]
    if limited:
        width = max(len(r.name) for r in limited)
        print(f"\nrate limits on vs off (best of {report['rounds']} alternating rounds each)\n")
        print(f"{'target':<{width}}  {'req/s':>9}  {'p50 ms':>8}  {'p99 ms':>8}  {'requests':>9}")
        for r in limited:
            print(
                f"{r.name:<{width}}  {r.requests_per_s:>9.1f}  {r.p50_ms:>8.2f}"
                f"  {r.p99_ms:>8.2f}  {r.requests:>9}"
            )
        print()
        target = report["rate_limit_target"]
        label_width = max(len(name) for name in report["rate_limit_ratios"])
        for name, ratio in report["rate_limit_ratios"].items():
            verdict = "ok" if ratio >= target else "BELOW TARGET"
            print(
                f"ratio {name:<{label_width}} on / off: {ratio:6.1%}"
                f"  (target >= {target:.0%})  {verdict}"
            )
        cost = report["fast_path_cpu_us"]
        added = cost["on"] - cost["off"]
        ratio = report["fast_path_projected_ratio"]
        verdict = "ok" if ratio >= target else "BELOW TARGET"
        print(
            f"\nfast path in process (ASGI front only, CPU per request, best of 15 rounds):"
            f" off {cost['off']:.2f} us, on {cost['on']:.2f} us: the check adds {added:.2f} us"
            f"\nratio fast path on / off, projected (that cost added to a request at the"
            f" measured off rate): {ratio:6.1%}  (target >= {target:.0%})  {verdict}"
        )
    warn_loudly(report, sys.stdout)


def set_rate_limit(
    server: Server, config: Path, auth: dict[str, str], limit: dict[str, Any]
) -> None:
    """Rewrite ``server.rate_limit`` in config.json and have the agent reload it."""
    raw = json.loads(config.read_text(encoding="utf-8"))
    raw["server"]["rate_limit"] = limit
    config.write_text(json.dumps(raw, indent=2) + "\n", encoding="utf-8")
    status, body, _ = http_request(server.port, "POST", "/remote/config/reload", auth)
    if status != 200:
        raise RuntimeError(f"config reload answered {status}: {body[:300]!r}")


def measure_rate_limits(
    server: Server, config: Path, auth: dict[str, str], args: argparse.Namespace
) -> tuple[list[Result], dict[str, float]]:
    """The read path with the limit off, then on (never reached), alternating; the best
    figure of each kept. Checks that "on" really answers with the headers (and "off"
    without), so the figures are of what they claim."""
    headers = {**auth, "Content-Type": "application/json"}
    status, body, _ = http_request(server.port, "POST", "/auth/tokens", headers, b'{"ttl": "1h"}')
    if status != 200:
        raise RuntimeError(f"minting a temporary token answered {status}: {body[:300]!r}")
    temporary = {"Accept": ACCEPT, "Authorization": f"Bearer {json.loads(body)['token']}"}
    targets = {
        "fast path GET /containers, master token": auth,
        "GET /containers, temporary token (Quart)": temporary,
    }
    best: dict[tuple[str, str], Result] = {}
    for _ in range(args.rounds):
        for mode, limit in (("off", RATE_LIMIT_OFF), ("on", NEVER_REACHED)):
            set_rate_limit(server, config, auth, limit)
            for name, target_headers in targets.items():
                _, _, seen = http_request(server.port, "GET", "/containers", target_headers)
                if ("x-ratelimit-remaining" in seen) != (mode == "on"):
                    raise RuntimeError(f"{name} with the limit {mode}: headers {seen}")
                result = measure(
                    f"{name}, limit {mode}", server, "/containers", target_headers, args
                )
                key = (name, mode)
                if key not in best or result.requests_per_s > best[key].requests_per_s:
                    best[key] = result
    results = [best[(name, mode)] for name in targets for mode in ("off", "on")]
    ratios = {
        name: best[(name, "on")].requests_per_s / best[(name, "off")].requests_per_s
        if best[(name, "off")].requests_per_s
        else 0.0
        for name in targets
    }
    return results, ratios


def projected_ratio(limited: list[Result], cost: dict[str, float]) -> float:
    """On/off requests per second of the fast path if the check's in-process cost is all
    it adds: one worker serves each request in 1/rate seconds of CPU."""
    off = next((r for r in limited if r.name.startswith("fast path") and "off" in r.name), None)
    if off is None or not off.requests_per_s:
        return 0.0
    per_request_us = 1e6 / off.requests_per_s
    return per_request_us / (per_request_us + max(0.0, cost["on"] - cost["off"]))


def fast_path_cost(requests: int = 10_000, rounds: int = 15) -> dict[str, float]:
    """CPU microseconds per request of the fast read path's ASGI front (``GET /containers``,
    master token), limit off vs on (never reached); the least of ``rounds`` each."""
    import types
    from typing import cast

    import attrs
    import trio
    from lightd.api.fastpath import FAST_READS, fast_reads
    from lightd.config import AuthorizationConfig, Config, RateLimitConfig
    from lightd.runtime import Agent, Stash

    token = "lightd_" + "0" * 32
    base = Config(authorization=AuthorizationConfig(token=token))
    configs = {
        mode: attrs.evolve(
            base, server=attrs.evolve(base.server, rate_limit=RateLimitConfig(**limit))
        )
        for mode, limit in (("off", RATE_LIMIT_OFF), ("on", NEVER_REACHED))
    }
    agent = types.SimpleNamespace(stash=Stash(), config=configs["off"], clock=time.time)
    body = b'{"containers":[]}\n'
    agent.stash[FAST_READS] = {"/containers": lambda _: body}

    async def quart(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("the fast path declined the request")

    front = fast_reads(cast("Agent", agent), quart)
    scope = {
        "type": "http",
        "method": "GET",
        "path": "/containers",
        "query_string": b"",
        "headers": [(b"accept", ACCEPT.encode()), (b"authorization", f"Bearer {token}".encode())],
    }
    sent: list[Any] = []

    async def send(message: Any) -> None:
        sent.append(message)

    async def receive() -> Any:
        return {"type": "http.request"}

    async def run() -> dict[str, float]:
        best = {"off": float("inf"), "on": float("inf")}
        for _ in range(rounds):
            for mode in ("off", "on"):
                agent.config = configs[mode]
                started = time.thread_time()
                for _ in range(requests):
                    await front(scope, receive, send)
                best[mode] = min(best[mode], (time.thread_time() - started) / requests * 1e6)
                headers = dict(sent[-2]["headers"])
                if (b"x-ratelimit-remaining" in headers) != (mode == "on"):
                    raise RuntimeError(f"in-process fast path, limit {mode}: headers {headers}")
                sent.clear()
        return best

    return trio.run(run)


def warn_loudly(report: dict[str, Any], stream: Any) -> None:
    """Void figures must not pass unnoticed: a bench of 401s or 500s measures nothing useful."""
    if report["server_log_problems"]:
        print("\nserver logs reported problems:", file=stream)
        for line in report["server_log_problems"][:20]:
            print(f"  {line}", file=stream)
    if not report["valid"]:
        bar = "!" * 78
        print(
            f"\n{bar}\n!!! INVALID RUN: some responses were errors; figures are void", file=stream
        )
        for reason in report["invalid_reasons"]:
            print(f"!!!   {reason}", file=stream)
        print(bar, file=stream)


def agent_like_config(port: int) -> hypercorn.config.Config:
    """Hypercorn set up as agent/runtime.py does: no access log, no Server header."""
    import hypercorn.config

    cfg = hypercorn.config.Config()
    cfg.bind = [f"127.0.0.1:{port}"]
    cfg.graceful_timeout = GRACEFUL_TIMEOUT
    cfg.accesslog = None
    cfg.errorlog = logging.getLogger("hypercorn.error")
    cfg.include_server_header = False
    return cfg


def serve_bare(port: int) -> None:
    """Serve a hello-world QuartTrio app with the agent's hypercorn settings until SIGINT."""
    import hypercorn.trio
    import trio
    from quart_trio import QuartTrio

    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    app = QuartTrio("bare")

    @app.get("/")
    async def hello() -> dict[str, str]:
        return {"status": "ok", "message": "hello"}

    cfg = agent_like_config(port)

    async def until_signal() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                return

    trio.run(partial(hypercorn.trio.serve, app, cfg, shutdown_trigger=until_signal))


def _interrupt(signum: int, frame: FrameType | None) -> NoReturn:
    """SIGTERM acts like Ctrl-C, so the finally blocks stop the servers and remove the temp dir."""
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds measured per target")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of unmeasured load first")
    parser.add_argument("--connections", type=int, default=CONNECTIONS, help=argparse.SUPPRESS)
    parser.add_argument(
        "--rounds", type=int, default=3, help="alternating off/on rounds of the rate-limit part"
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--serve-bare", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_bare is not None:
        serve_bare(args.serve_bare)
        return 0
    if args.duration < 1 or args.warmup < 0 or args.rounds < 1:
        parser.error(
            "--duration must be >= 1, --warmup >= 0 (whole seconds, as wrk takes), --rounds >= 1"
        )
    if shutil.which("wrk") is None:
        print("bench/http.py needs wrk on PATH: apt-get install wrk", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        report = run_bench(args)
    except KeyboardInterrupt:
        print("interrupted: servers stopped", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report, indent=2))
        warn_loudly(report, sys.stderr)
    else:
        print_report(report)
    return 0 if report["valid"] else 1


if __name__ == "__main__":
    sys.exit(main())
