"""TorchScript export of a deployed model: ``torch.jit.trace`` (the networks have no
data-dependent control flow once built for one arch), saved with ``torch.jit.save`` and verified
after writing: loaded back, it must reproduce the PyTorch model's outputs (max abs diff <
``nasopt.deploy.export.TOLERANCE``) on a batch of a different size than the one traced.

The exports pass their model behind the dataset's preprocessing
(:class:`nasopt.deploy.export.RawInput`, see :func:`nasopt.deploy.export.with_preprocess`), so ``model.ts``
takes raw samples, as the other model files of the folder."""
from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from nasopt.deploy.export import TOLERANCE

FILE = "model.ts"


@torch.no_grad()
def write(model: nn.Module, path: str | Path, input_shape: Sequence[int]) -> Path:
    """Trace ``model`` (eval mode, CPU) for inputs shaped ``(N, *input_shape)``, save, verify."""
    path = Path(path)
    model = model.eval().cpu()
    g = torch.Generator().manual_seed(0)
    with warnings.catch_warnings():  # shape checks of the elastic layers become constants: fine
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(model, torch.randn((4, *input_shape), generator=g))
    tmp = path.with_name(path.name + ".tmp")
    buf = io.BytesIO()  # a plain write reports a full disk as OSError (torch's writer does not)
    torch.jit.save(traced, buf)
    tmp.write_bytes(buf.getvalue())
    loaded = torch.jit.load(str(tmp))
    x = torch.randn((7, *input_shape), generator=g)
    diff = (model(x) - loaded(x)).abs().max().item()
    if diff > TOLERANCE:
        tmp.unlink()
        raise RuntimeError(f"TorchScript verification failed: outputs differ by {diff}")
    tmp.replace(path)
    return path
