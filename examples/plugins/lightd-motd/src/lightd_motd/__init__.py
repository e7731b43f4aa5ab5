"""lightd-motd: a lightd plugin that keeps a message of the day per server.

The hooks live in ``lightd_motd.plugin`` (the entry point of group ``lightd.plugins``).
"""

__version__ = "1.0.0"
