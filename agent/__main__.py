"""``python -m agent`` is the ``lightd`` command."""

from .cli import main

raise SystemExit(main())
