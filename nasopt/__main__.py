"""``python -m nasopt``: the ``nasopt`` command."""
from nasopt.cli.main import main

raise SystemExit(main())
