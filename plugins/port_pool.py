"""Built-in plugin ``port_pool``: not implemented yet (see the issue that adds it)."""
