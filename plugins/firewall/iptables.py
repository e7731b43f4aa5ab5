"""Running iptables: which variant, and the two calls the firewall makes.

``iptables`` exists in two variants that keep separate tables: ``iptables-nft`` (the
nf_tables kernel API; the default of current Debian, Ubuntu, Fedora, RHEL) and
``iptables-legacy`` (x_tables). Rules written with one are invisible to the other, so the
agent must use the one Docker uses. ``firewall.iptables: "auto"`` asks both variants for
the parent chain (``DOCKER-USER``, which Docker creates in the tables it uses); exactly one
having it decides; both or neither fall back to the variant ``iptables --version`` names
(``(nf_tables)`` or ``(legacy)``), which is the one Docker picks too. ``nft`` and
``legacy`` choose by hand; any other value is a program name or path. The IPv6 program is
the same variant's ``ip6tables``; the restore programs are ``<program>-restore``.

Every call is an argument vector through ``trio.run_process`` (no shell), behind
``firewall.command_prefix`` when set, bounded by ``firewall.timeout``.
"""

from __future__ import annotations

import logging
import os

import attrs
import trio
from lightd import AgentError

from .model import FirewallConfig

__all__ = ["Iptables", "IptablesFailed", "Programs"]

log = logging.getLogger(__name__)

_DETAIL_LIMIT = 400


class IptablesFailed(AgentError):
    """An iptables call failed, could not run, or timed out (the message says which)."""


@attrs.frozen
class Programs:
    """The programs in use: IPv4, and IPv6 (``None`` when off)."""

    v4: str
    v6: str | None
    #: ``nft``, ``legacy`` or ``unknown`` (a program named by hand).
    variant: str

    def restore(self, family: int) -> str:
        program = self.v4 if family == 4 else self.v6
        assert program is not None
        return program + "-restore"

    def program(self, family: int) -> str:
        program = self.v4 if family == 4 else self.v6
        assert program is not None
        return program


def ip6_program(program: str) -> str:
    """``iptables-nft`` → ``ip6tables-nft``, ``/usr/sbin/iptables`` → ``/usr/sbin/ip6tables``."""
    folder, name = os.path.split(program)
    return os.path.join(folder, name.replace("iptables", "ip6tables", 1))


class Iptables:
    """The iptables calls of the firewall, behind the configured prefix."""

    def __init__(self, config: FirewallConfig) -> None:
        self.config = config

    async def run(self, argv: list[str], stdin: bytes = b"") -> tuple[int, str, str]:
        """``(status, stdout, stderr)``; ``IptablesFailed`` when it could not run in time."""
        full = [*self.config.command_prefix, *argv]
        result = None
        with trio.move_on_after(self.config.timeout):
            try:
                result = await trio.run_process(
                    full, stdin=stdin, capture_stdout=True, capture_stderr=True, check=False
                )
            except OSError as exc:
                raise IptablesFailed(f"cannot run {full[0]}: {exc.strerror}") from None
        if result is None:
            raise IptablesFailed(
                f"{argv[0]} took longer than {self.config.timeout:g}s (firewall.timeout)"
            )
        out = result.stdout.decode("utf-8", "replace")
        err = result.stderr.decode("utf-8", "replace")
        return result.returncode, out, err

    async def checked(self, argv: list[str], stdin: bytes = b"") -> str:
        """Run; ``IptablesFailed`` with iptables' own words unless it succeeds."""
        status, out, err = await self.run(argv, stdin)
        if status != 0:
            detail = " ".join(err.split())[:_DETAIL_LIMIT] or f"exit status {status}"
            raise IptablesFailed(f"{os.path.basename(argv[0])}: {detail}")
        return out

    async def _has_chain(self, program: str, chain: str) -> bool | None:
        """Does ``program``'s filter table have ``chain``? ``None``: the program is missing."""
        try:
            status, _out, err = await self.run([program, "-w", "-S", chain])
        except IptablesFailed:
            return None
        if status in (126, 127) or "No such file" in err or "not found" in err:
            return None
        return status == 0

    async def detect(self) -> Programs:
        """The programs to use (see the module docstring)."""
        choice = self.config.iptables
        if choice in ("nft", "legacy"):
            program, variant = f"iptables-{choice}", choice
        elif choice != "auto":
            program, variant = choice, "unknown"
        else:
            parent = self.config.parent
            found = {}
            for variant in ("nft", "legacy"):
                has = await self._has_chain(f"iptables-{variant}", parent)
                if has is not None:
                    found[variant] = has
            holding = [v for v, has in found.items() if has]
            if len(holding) == 1:
                variant = holding[0]
                program = f"iptables-{variant}"
            else:
                # Both or neither: the system's default, which is what Docker runs.
                program, variant = "iptables", await self._default_variant()
            log.info(
                "firewall: using %s (%s; %s found in: %s)",
                program,
                variant,
                parent,
                ", ".join(holding) or "none",
            )
        return Programs(program, ip6_program(program) if self.config.ipv6 else None, variant)

    async def _default_variant(self) -> str:
        try:
            status, out, err = await self.run(["iptables", "--version"])
        except IptablesFailed:
            return "unknown"
        text = out + err
        if status == 0 and "nf_tables" in text:
            return "nft"
        if status == 0 and "legacy" in text:
            return "legacy"
        return "unknown"

    async def chains(self, program: str) -> tuple[set[str], str]:
        """Every chain of the filter table, and the whole listing (``-S``)."""
        listing = await self.checked([program, "-w", "-S"])
        names = {line.split()[1] for line in listing.splitlines() if line.startswith("-N ")}
        return names, listing

    async def restore(self, program: str, text: str) -> None:
        """One atomic ``<program>-restore --noflush``."""
        await self.checked([program + "-restore", "-w", "--noflush"], text.encode())
