"""``python -m lightd`` is the ``lightd`` command."""

from .cli import main

raise SystemExit(main())
