"""Containers: records, supervisors (state machine, power queue, console), event hubs.

The domain only: it imports nothing from ``lightd.api`` (the HTTP views and the WebSocket
in ``lightd.api.containers`` and ``lightd.api.ws`` depend on it, never the reverse).
``CONTAINERS`` is the ``Containers`` manager on the agent's stash (core only; plugins use
``lightd.interfaces.CONTAINER_SERVICE``). ``InstallJob``, ``InstallRun`` and
``InstallFailed`` are the install-script hook's types (exported by ``lightd``).
"""

from ..runtime import StashKey
from .console import LineSplitter
from .hub import EventHub, Subscription
from .install import InstallFailed, InstallJob, InstallRun
from .manager import Containers
from .settings import ContainersSettings
from .supervisor import ContainerSupervisor, SupervisorHost

CONTAINERS: StashKey[Containers] = StashKey("containers")

__all__ = [
    "CONTAINERS",
    "ContainerSupervisor",
    "Containers",
    "ContainersSettings",
    "EventHub",
    "InstallFailed",
    "InstallJob",
    "InstallRun",
    "LineSplitter",
    "Subscription",
    "SupervisorHost",
]
