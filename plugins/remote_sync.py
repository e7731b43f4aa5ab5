"""Built-in plugin ``remote_sync``: not implemented yet (see the issue that adds it)."""
