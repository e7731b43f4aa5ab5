"""The agent's own Docker network (config ``docker.network``) and the API port guard.

Every server and install container joins one bridge network of the agent's, created at
start when missing, with inter-container traffic off (driver option
``com.docker.network.bridge.enable_icc=false``): tenants cannot reach each other.

Containers must not reach the agent's API either (contract §7.6). Traffic from the
bridge to the host is local input, so a DROP rule on ``INPUT`` for the bridge interface
and the API port covers every host address (the gateway's and the others). The rules
live in a chain of the agent's own, ``LIGHTD-API``, jumped to first thing from
``INPUT``, like the port pool's firewall chain: the agent adds the rule of its bridge and
port when it starts listening (and whenever the network is made again), checks before
adding (``-C``: restarts do not pile up copies) and deletes it at shutdown; the first
pass also deletes the chain's rules for bridges that no longer exist (an agent that did
not get to shut down, a network removed). ``iptables``
runs with an argument vector, never a shell, on values the agent made (an interface name
from the engine, a port number). Without ``iptables`` the guard is skipped with a
warning in the log (and ``guard_problem`` says why).
"""

from __future__ import annotations

import logging
import re
import shutil

import trio

from ..docker import DockerConflict, DockerEngine, DockerNotFound

__all__ = ["API_CHAIN", "ICC_OPTION", "AgentNetwork", "bridge_interface"]

log = logging.getLogger(__name__)

ICC_OPTION = "com.docker.network.bridge.enable_icc"
BRIDGE_NAME_OPTION = "com.docker.network.bridge.name"
#: The chain holding the API guard's rules.
API_CHAIN = "LIGHTD-API"
_INTERFACE = re.compile(r"[A-Za-z0-9_.-]{1,15}")


def bridge_interface(network: dict[str, object]) -> str:
    """The host interface of a bridge network (Docker's ``br-<id12>`` unless named)."""
    options = network.get("Options")
    if isinstance(options, dict) and isinstance(options.get(BRIDGE_NAME_OPTION), str):
        return str(options[BRIDGE_NAME_OPTION])
    return f"br-{str(network.get('Id', ''))[:12]}"


class AgentNetwork:
    """Makes ``docker.network`` exist and keeps the API guard rule of its bridge."""

    def __init__(self, docker: DockerEngine, name: str, labels: dict[str, str]) -> None:
        self.docker = docker
        self.name = name
        self._labels = labels
        #: The bridge interface once the network is known.
        self.interface: str | None = None
        #: API ports to guard (set once the API listens).
        self.ports: tuple[int, ...] = ()
        #: ``(interface, port)`` rules this agent added.
        self.guarded: set[tuple[str, int]] = set()
        #: Why the API is not guarded (``None``: it is, or nothing to guard yet).
        self.guard_problem: str | None = None
        self._pruned = False
        self._lock = trio.Lock()

    async def ensure(self) -> None:
        """Create the network when missing (a bridge, inter-container traffic off); a
        network of that name made by someone else with ICC on is used, with a warning."""
        try:
            info = await self.docker.inspect_network(self.name)
        except DockerNotFound:
            try:
                await self.docker.create_network(
                    self.name, options={ICC_OPTION: "false"}, labels=self._labels
                )
                log.info("created Docker network %s (inter-container traffic off)", self.name)
            except DockerConflict:
                pass  # another agent on this engine made it just now
            info = await self.docker.inspect_network(self.name)
        options = info.get("Options") or {}
        if info.get("Driver") != "bridge" or options.get(ICC_OPTION) != "false":
            log.warning(
                "Docker network %s is not a bridge with %s=false: containers on it may "
                "reach each other",
                self.name,
                ICC_OPTION,
            )
        self.interface = bridge_interface(info)
        await self.sync()

    async def listening(self, ports: tuple[int, ...]) -> None:
        """The API listens on ``ports``: guard them."""
        self.ports = ports
        await self.sync()

    async def sync(self) -> None:
        """Add the guard rules the current interface and ports need (idempotent)."""
        async with self._lock:
            interface = self.interface
            if interface is None or not self.ports:
                return
            if not _INTERFACE.fullmatch(interface):
                self.guard_problem = f"unexpected bridge interface name {interface!r}"
                log.warning("API port not guarded: %s", self.guard_problem)
                return
            if not await trio.Path("/sys/class/net", interface).exists():
                # A remote engine: its bridge is not on this host, nor is the rule's place.
                self.guard_problem = f"bridge {interface} is not on this host"
                log.warning("API port not guarded: %s", self.guard_problem)
                return
            program = shutil.which("iptables")
            if program is None:
                self.guard_problem = "iptables not found"
                log.warning(
                    "iptables not found: containers on %s can reach the API port", self.name
                )
                return
            try:
                await _ensure_chain(program)
                if not self._pruned:
                    await _prune(program)
                    self._pruned = True
                for port in self.ports:
                    if (interface, port) in self.guarded:
                        continue
                    rule = _rule(interface, port)
                    if not await _succeeds(program, "-C", API_CHAIN, *rule):
                        await _run(program, "-A", API_CHAIN, *rule)
                    self.guarded.add((interface, port))
                self.guard_problem = None
            except _IptablesFailed as exc:
                self.guard_problem = str(exc)
                log.warning("API port not guarded from containers: %s", exc)

    async def unguard(self) -> None:
        """Delete the rules this agent added (at shutdown; best effort)."""
        async with self._lock:
            program = shutil.which("iptables")
            guarded, self.guarded = self.guarded, set()
            if program is None:
                return
            for interface, port in guarded:
                await _succeeds(program, "-D", API_CHAIN, *_rule(interface, port))


class _IptablesFailed(Exception):
    pass


def _rule(interface: str, port: int) -> list[str]:
    return ["-i", interface, "-p", "tcp", "-m", "tcp", "--dport", str(port), "-j", "DROP"]


async def _succeeds(program: str, *args: str) -> bool:
    result = await trio.run_process(
        [program, "-w", *args], check=False, capture_stdout=True, capture_stderr=True
    )
    return result.returncode == 0


async def _run(program: str, *args: str) -> None:
    result = await trio.run_process(
        [program, "-w", *args], check=False, capture_stdout=True, capture_stderr=True
    )
    if result.returncode != 0:
        detail = result.stderr.decode("utf-8", "replace").strip()[:300]
        raise _IptablesFailed(f"iptables {' '.join(args)}: {detail or result.returncode}")


async def _prune(program: str) -> None:
    """Delete the chain's rules for bridges that are gone (their network was removed;
    the agent that added them did not get to delete them)."""
    listed = await trio.run_process(
        [program, "-w", "-S", API_CHAIN], check=False, capture_stdout=True, capture_stderr=True
    )
    for line in listed.stdout.decode("utf-8", "replace").splitlines():
        args = line.split()
        if len(args) < 4 or args[:2] != ["-A", API_CHAIN] or args[2] != "-i":
            continue
        interface = args[3]
        if (
            _INTERFACE.fullmatch(interface)
            and not await trio.Path("/sys/class/net", interface).exists()
        ):
            await _succeeds(program, "-D", API_CHAIN, *args[2:])


async def _ensure_chain(program: str) -> None:
    """The chain exists and ``INPUT`` jumps to it first."""
    exists = await _succeeds(program, "-S", API_CHAIN)
    # -N may lose a race with another agent on this host: then the chain is there.
    if not exists and not await _succeeds(program, "-N", API_CHAIN):
        exists = await _succeeds(program, "-S", API_CHAIN)
        if not exists:
            raise _IptablesFailed(f"cannot create chain {API_CHAIN}")
    if not await _succeeds(program, "-C", "INPUT", "-j", API_CHAIN):
        await _run(program, "-I", "INPUT", "1", "-j", API_CHAIN)
