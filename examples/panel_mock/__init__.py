"""A mock hosting panel for lightd's remote sync (contract §9 and §11).

Run it from the repository root (``examples/panel_mock`` is a package, so the name has an
underscore; ``examples/panel-mock/`` only points here)::

    python -m examples.panel_mock --port 8080 --token lightd_…

It is what ``scripts/run.sh`` starts next to the agent and what the remote sync tests
report to; ``app.py`` holds the state, the app and ``serve_panel``.
"""

from .app import ContainerStatus, Node, PanelState, create_app, node_name, serve_panel

__all__ = ["ContainerStatus", "Node", "PanelState", "create_app", "node_name", "serve_panel"]
