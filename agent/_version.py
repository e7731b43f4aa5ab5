"""The installed distribution's version, in a module of its own so that every layer can
import it without importing the package's public surface (which would be a cycle)."""

from importlib import metadata

__all__ = ["__version__"]

try:
    __version__ = metadata.version("lightd")
except metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+source"
