"""Feature plugins shipped with lightd; each module is listed in agent.plugins.BUILTIN_PLUGINS."""
