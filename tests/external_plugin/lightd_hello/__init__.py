"""A throwaway third-party plugin, loaded through the ``lightd.plugins`` entry point.

It implements every hook of the agent and records each call, so tests can see that an
external package is discovered, adds routes and receives lifecycle notifications.
"""
