"""``python -m nasopt``: the ``nasopt`` command."""
from nasopt.cli.main import run

run()
