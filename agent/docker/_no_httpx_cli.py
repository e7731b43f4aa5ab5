"""Imported before httpx (by ``lightd.docker``, the first of the agent's modules to use it).

httpx imports its command-line client (``httpx._main``: rich, pygments, click) whenever
those are installed, as they are in a development environment; the agent never runs it.
Marked missing here, it is left out as where rich is not installed (httpx then keeps a
stub ``main``): 4.5 MB less resident and 30 ms less start-up (``bench/footprint.py``).
Nothing changes once httpx has been imported already.
"""

import sys

sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]
