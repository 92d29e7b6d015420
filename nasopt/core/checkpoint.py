"""Atomic writes and safe loading of checkpoints (a checkpoint is untrusted input)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, BinaryIO

from nasopt.core.errors import NasoptError

if TYPE_CHECKING:
    import torch


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """``write`` to a temp file in the same folder, fsync, rename: readers never see half a
    file, and a failed write leaves the old file (if any) in place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would make exports private
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.filename is None:  # name the file, not the fd
            raise OSError(exc.errno, exc.strerror, str(path)) from None
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` atomically (temp file, fsync, rename)."""
    _atomic_write(path, lambda f: f.write(data))


def save(obj: Any, path: Path) -> None:
    """``torch.save`` atomically, as :func:`atomic_write_bytes` writes bytes (fsync, rename)."""
    import io

    import torch  # here, not at import: the read-only commands use this module without torch
    # serialized in memory first: torch's own writer reports a full disk as a RuntimeError,
    # a plain write as the OSError (ENOSPC) every command turns into one clear line
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def load(path: Path, map_location: str | torch.device = "cpu") -> Any:
    """Load with ``weights_only=True``: tensors and plain containers only, never code."""
    import torch
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise NasoptError(f"checkpoint {path} does not exist") from None
    except Exception as exc:
        raise NasoptError(f"checkpoint {path} is corrupt or not a nasopt checkpoint ({exc}); "
                          f"delete it and re-run to recreate it") from None
