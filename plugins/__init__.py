"""Feature plugins shipped with lightd (``lightd.plugins``); listed in ``BUILTIN_PLUGINS``."""
