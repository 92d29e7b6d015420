"""The ``nasopt`` command: one module per command group; :mod:`nasopt.cli.main` builds the parser
and dispatches."""
