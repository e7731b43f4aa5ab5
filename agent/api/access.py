"""``TokenService``: API tokens checked for another protocol (SFTP passwords, §19).

The essential built-in ``token_access`` (a module of its own: it needs both ``auth`` and
``tokens``, and ``auth`` imports ``tokens``) puts it on ``agent.stash[TOKEN_SERVICE]``.

The same rules as a request's (``lightd.api.auth``): the master token compared in constant
time, a temporary token looked up by hash, live, minted under the current master token,
holding the permission, and with the volume in its scope (named, or used by one of its
containers). A single-use token is spent by the check that accepts it. Nothing is accepted
while ``authorization.enabled`` is false: a file server on an open port is no place for
"no auth".
"""

from __future__ import annotations

from collections.abc import Callable

from ..hookspecs import hookimpl
from ..interfaces import TOKEN_SERVICE, TokenGrant
from ..runtime import Agent
from .auth import _volume_in_scope, is_master
from .tokens import TOKENS

__all__ = ["TokenAccess"]


class TokenAccess:
    """``agent.stash[TOKEN_SERVICE]`` (``lightd.TokenService``)."""

    def __init__(self, agent: Agent) -> None:
        self._agent = agent

    async def authorize(self, token: str, permission: str, volume_id: str) -> TokenGrant | None:
        agent = self._agent
        auth = agent.config.authorization
        if not auth.enabled or not token.startswith("lightd_") or len(token) < 20:
            return None
        if is_master(auth, token):
            return TokenGrant("master")
        registry = agent.stash[TOKENS]
        record = registry.lookup(token)
        if record is None:
            return None
        if record.permissions is not None and permission not in record.permissions:
            return None
        if (record.containers is not None or record.volumes is not None) and (
            not _volume_in_scope(agent, record, volume_id)
        ):
            return None
        if record.remove_on_use:
            if not registry.take(record):
                return None
            await registry.forget(record)
        return TokenGrant("temporary", record.id, float(record.expires_at))

    def on_revoked(self, listener: Callable[[str], None]) -> Callable[[], None]:
        return self._agent.stash[TOKENS].on_revoked(listener)


@hookimpl
def lightd_configure(agent: Agent) -> None:
    agent.stash[TOKEN_SERVICE] = TokenAccess(agent)
