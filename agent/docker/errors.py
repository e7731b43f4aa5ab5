"""The engine's refusals, as the agent's errors (shared by the client and its streams)."""

from __future__ import annotations

from ..errors import AgentError

__all__ = ["DockerConflict", "DockerError", "DockerNotFound"]


class DockerError(AgentError):
    """The engine answered, and refused (the message is the engine's explanation), or
    answered something that is not an Engine API answer (not JSON, not 2xx)."""


class DockerNotFound(DockerError):
    """The engine has no such object (container, image)."""


class DockerConflict(DockerError):
    """The engine refused because of a conflict (a container name already taken)."""
