"""``python -m nasopt.cli``: the ``nasopt`` command."""
from nasopt.cli.main import main

raise SystemExit(main())
