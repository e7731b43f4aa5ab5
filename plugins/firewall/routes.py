"""The routes of contract §21.

Each view first refuses while ``firewall.enabled`` is false (``409 Firewall management
is disabled``), then reads and checks its body (400 naming the first bad field), then
looks the container or rule up (404), then changes and applies. Writes need the
``manage`` permission, the listing ``read``. A token restricted to some containers
reaches the rules of those containers only (a rule's container decides for the routes
that name a rule).
"""

from __future__ import annotations

from typing import Any, Literal, TypedDict

import attrs
from lightd import Agent, Conflict, StashKey, Unauthorized
from lightd.api import Message, container_scoped, current_auth, describe, read_json, requires
from quart import Blueprint

from .model import parse_ddos, parse_rule_fields
from .state import Firewall, new_rule_id

__all__ = ["FIREWALL", "make_blueprint"]

#: The firewall, present only while ``firewall.enabled`` is true.
FIREWALL: StashKey[Firewall] = StashKey("firewall")

_DISABLED = "Firewall management is disabled"


@attrs.frozen
class RuleBody:
    """A new rule. Values are checked by the view (messages name the field)."""

    container_id: Any = None
    protocol: Any = None
    action: Any = None
    source_ip: Any = None
    source_port: Any = None
    dest_port: Any = None
    rate_limit: Any = None
    description: Any = None


@attrs.frozen
class ToggleBody:
    enabled: bool


@attrs.frozen
class DdosBody:
    enabled: Any = None
    syn_flood_protection: Any = None
    connection_limit: Any = None
    rate_limit: Any = None


class RateLimitJson(TypedDict):
    requests: int
    per_seconds: int


class RuleJson(TypedDict):
    """A rule; ``created_at`` [ext] is unix seconds."""

    id: str
    container_id: str
    source_ip: str | None
    source_port: int | None
    dest_port: int | None
    protocol: Literal["tcp", "udp", "icmp", "all"]
    action: Literal["accept", "drop", "reject"]
    rate_limit: RateLimitJson | None
    description: str | None
    enabled: bool
    created_at: int


class RuleAnswer(TypedDict):
    rule: RuleJson


class RuleList(TypedDict):
    """The server's rules in the order they apply (creation order)."""

    rules: list[RuleJson]


def _unauthorized() -> Unauthorized:
    return Unauthorized("Missing or invalid authorization token")


def make_blueprint(agent: Agent) -> Blueprint:
    bp = Blueprint("firewall", __name__)

    def firewall() -> Firewall:
        found = agent.stash.get(FIREWALL)
        if found is None:
            raise Conflict(_DISABLED, code="firewall_disabled")
        return found

    def in_scope(internal_id: str) -> None:
        if not current_auth().allows(internal_id):
            raise _unauthorized()

    @bp.post("/firewall/rules")
    @describe(
        "Add a firewall rule to a server",
        description="Acts on traffic to the server's published ports (its pool ports), "
        "matched in Docker's `DOCKER-USER` chain. `source_ip`: address or CIDR; "
        "`source_port`/`dest_port` 1-65535 (`dest_port` is the published host port); "
        "`protocol` `tcp|udp|icmp|all`; `action` `accept|drop|reject`; `rate_limit` "
        "`{requests, per_seconds}` per source address (over it: dropped). Answers once "
        "the rule is in the kernel. 409 while `firewall.enabled` is false.",
        body=RuleBody,
        responses={201: RuleAnswer},
        errors=(404, 409),
        examples={
            "body": {
                "container_id": "server-1",
                "source_ip": "203.0.113.7",
                "protocol": "tcp",
                "action": "drop",
                "description": "abusive address",
            }
        },
        tags=("firewall",),
    )
    @requires("manage")
    @container_scoped
    async def add_rule() -> tuple[RuleAnswer, int]:
        fw = firewall()
        body = await read_json(RuleBody)
        rule = parse_rule_fields(body, rule_id=new_rule_id(), created_at=int(agent.clock()))
        in_scope(rule.container_id)
        rule = await fw.add_rule(rule)
        return {"rule": rule.to_json()}, 201  # type: ignore[typeddict-item]

    @bp.get("/firewall/rules/container/<internal_id>")
    @describe(
        "List a server's firewall rules",
        description="In the order they apply. 404 for an unknown container.",
        errors=(404, 409),
        tags=("firewall",),
    )
    @requires("read")
    async def list_rules(internal_id: str) -> RuleList:
        fw = firewall()
        if not fw.rules.get(internal_id):
            fw.container_ports(internal_id)  # 404 for an unknown container
        return {"rules": [r.to_json() for r in fw.rules_of(internal_id)]}  # type: ignore[misc]

    @bp.put("/firewall/rules/<rule_id>/toggle")
    @describe(
        "Enable or disable a firewall rule",
        body=ToggleBody,
        errors=(404, 409),
        examples={"body": {"enabled": False}, 200: {"message": "Rule disabled successfully"}},
        tags=("firewall",),
    )
    @requires("manage")
    @container_scoped
    async def toggle(rule_id: str) -> Message:
        fw = firewall()
        body = await read_json(ToggleBody)
        in_scope(fw.rule(rule_id).container_id)
        await fw.toggle(rule_id, body.enabled)
        state = "enabled" if body.enabled else "disabled"
        return {"message": f"Rule {state} successfully"}

    @bp.delete("/firewall/rules/<rule_id>")
    @describe("Delete a firewall rule", errors=(404, 409), tags=("firewall",))
    @requires("manage")
    @container_scoped
    async def delete_rule(rule_id: str) -> Message:
        fw = firewall()
        in_scope(fw.rule(rule_id).container_id)
        await fw.delete_rule(rule_id)
        return {"message": "Rule deleted successfully"}

    @bp.post("/firewall/ddos/<internal_id>")
    @describe(
        "Configure a server's DDoS protection",
        description="`enabled` (required); `syn_flood_protection` (default true: drops "
        "invalid TCP packets and new connections over `firewall.syn_rate` per second for "
        "the server); `connection_limit`: concurrent TCP connections per source address; "
        "`rate_limit`: new connections per source address, `{requests, per_seconds}` or "
        "[alias] a number per second. `enabled: false` removes the protection.",
        body=DdosBody,
        errors=(404, 409),
        examples={
            "body": {"enabled": True, "syn_flood_protection": True, "connection_limit": 20},
            200: {"message": "DDoS protection configured successfully"},
        },
        tags=("firewall",),
    )
    @requires("manage")
    async def ddos(internal_id: str) -> Message:
        fw = firewall()
        settings = parse_ddos(await read_json(DdosBody))
        await fw.set_ddos(internal_id, settings)
        return {"message": "DDoS protection configured successfully"}

    @bp.delete("/firewall/cleanup/<internal_id>")
    @describe(
        "Remove every firewall rule of a server",
        description="Rules and DDoS settings, from the store and the kernel. Also works "
        "for what a container that no longer exists left; 404 when there is neither.",
        errors=(404, 409),
        tags=("firewall",),
    )
    @requires("manage")
    async def cleanup(internal_id: str) -> Message:
        fw = firewall()
        if not await fw.cleanup(internal_id):
            fw.container_ports(internal_id)  # 404 for an unknown container
        return {"message": "Container firewall rules cleaned up successfully"}

    return bp
