"""The one exception type for mistakes a user can fix, and the one line the CLI prints for a
fault of the file system (a full disk, a folder that is a file, no permission).

The CLI prints its message (no traceback) and exits non-zero; the Python API lets it propagate.
Every message says what was wrong *and* how to fix it.
"""
import errno


class NasoptError(Exception):
    """A user error: bad input, bad configuration, missing data or package."""


#: what the user can do about each file-system fault (the rest: the system's own words)
_OS_FIXES = {
    errno.ENOSPC: "the disk is full: free some space (or choose another --run-dir / --out) and "
                  "re-run the same command; finished trials and files are kept",
    errno.EDQUOT: "the disk quota is used up: free some space and re-run the same command; "
                  "finished trials and files are kept",
    errno.EACCES: "choose a folder you may write to (--run-dir / --out)",
    errno.EPERM: "choose a folder you may write to (--run-dir / --out)",
    errno.EROFS: "the file system is read-only: choose another folder (--run-dir / --out)",
    errno.EEXIST: "a file stands where a folder is needed: give a folder (--run-dir / --out)",
    errno.ENOTDIR: "a file stands where a folder is needed: give a folder (--run-dir / --out)",
    errno.EISDIR: "a folder stands where a file is needed: give a file's path",
    errno.ENAMETOOLONG: "the name is too long for the file system: choose a shorter one",
}


def os_error_line(exc: OSError) -> str:
    """One line for a file-system fault: what happened, to which file, and what to do."""
    where = f" ({exc.filename})" if exc.filename else ""
    fix = _OS_FIXES.get(exc.errno or 0)
    return f"{exc.strerror or exc}{where}" + (f"; {fix}" if fix else "")
