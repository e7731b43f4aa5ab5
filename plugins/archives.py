"""Built-in plugin ``archives``: not implemented yet (see the issue that adds it)."""
