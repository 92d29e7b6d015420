"""The one exception type for mistakes a user can fix.

The CLI prints its message (no traceback) and exits non-zero; the Python API lets it propagate.
Every message says what was wrong *and* how to fix it.
"""


class NasoptError(Exception):
    """A user error: bad input, bad configuration, missing data or package."""
