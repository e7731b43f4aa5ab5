"""Built-in plugin ``volumes``: not implemented yet (see the issue that adds it)."""
