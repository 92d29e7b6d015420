"""Names that become file names (a study's ``RUN_DIR/configs/STUDY.json``, a hardware profile's
latency table ``RUN_DIR/hardware/SPACE-PROFILE-HASH.json``): the one check they all go through,
so that no name leads a write out of its folder or past the file system's length limit."""
from __future__ import annotations

from nasopt.core.errors import NasoptError

#: the longest name in UTF-8 bytes (file systems allow 255 bytes per name; the rest is left for
#: the prefixes and suffixes nasopt adds)
MAX_NAME_BYTES = 200


def check_plain_name(name: str, what: str, example: str) -> str:
    """``name`` if it can be a file name inside a folder: not empty, not ``.``/``..``, no path
    separator or NUL, at most :data:`MAX_NAME_BYTES` bytes. Else one error naming ``what`` (for
    example ``"study name"``) and a valid ``example``."""
    if not name.strip() or name in (".", "..") or any(c in name for c in "/\\\0"):
        raise NasoptError(f"{what} {name!r} is not a plain name (it is also a file name); give "
                          f"one without '/', '\\' or '..', e.g. {example}")
    if len(name.encode()) > MAX_NAME_BYTES:
        raise NasoptError(f"{what} of {len(name.encode())} bytes is too long (it is also a file "
                          f"name); give at most {MAX_NAME_BYTES}, e.g. {example}")
    return name
