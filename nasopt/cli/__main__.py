"""``python -m nasopt.cli``: the ``nasopt`` command."""
from nasopt.cli.main import run

run()
