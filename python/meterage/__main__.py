"""``python -m meterage``: see ``meterage.cli``."""

from meterage.cli import main

raise SystemExit(main())
