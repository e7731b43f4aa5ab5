"""The container fixtures (a node on the real engine, its API client, the engine) for
the attack suite, from tests/containers/conftest.py."""

from ..containers.conftest import (  # noqa: F401 - re-exported fixtures
    api,
    containers_config,
    engine,
    node,
    prefix,
    start_node,
)
