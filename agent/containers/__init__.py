"""Containers: records, supervisors (state machine, power queue, console), event hubs.

Public for plugins: ``CONTAINERS`` (the ``Containers`` manager on the agent's stash),
``InstallJob`` and ``InstallFailed`` (the install-script hook), ``EventHub``.
"""

from ..runtime import StashKey
from .console import LineSplitter
from .hub import EventHub, Subscription
from .install import InstallFailed, InstallJob
from .manager import Containers, ContainersSettings
from .supervisor import ContainerSupervisor

CONTAINERS: StashKey[Containers] = StashKey("containers")

__all__ = [
    "CONTAINERS",
    "ContainerSupervisor",
    "Containers",
    "ContainersSettings",
    "EventHub",
    "InstallFailed",
    "InstallJob",
    "LineSplitter",
    "Subscription",
]
