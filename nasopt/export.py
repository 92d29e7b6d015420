"""Export a found architecture and load it back.

An export folder holds ``arch.json`` (the arch), ``weights.pt`` (the standalone model's state
dict), and ``model.json`` (the space description needed to rebuild the model, the metrics, and
where it came from). Every export is verified after writing: the loaded model must reproduce the
in-memory model's outputs.
"""
from __future__ import annotations

import io
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import checkpoint
from .arch import Arch
from .errors import NasoptError
from .space import SearchSpace, space_from_description

FORMAT_VERSION = 1


def export_model(model: nn.Module, arch: Arch, space: SearchSpace, out: Path,
                 info: Mapping[str, Any], spaces: Mapping[str, type[SearchSpace]]) -> Path:
    """Write ``model`` (a standalone model of ``arch``) to the folder ``out`` and verify it."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buffer)
    checkpoint.atomic_write_bytes(out / "weights.pt", buffer.getvalue())
    checkpoint.atomic_write_bytes(out / "arch.json", (arch.to_json() + "\n").encode())
    card = {"format_version": FORMAT_VERSION, "space": space.describe(), **info}
    checkpoint.atomic_write_bytes(out / "model.json", (json.dumps(card, indent=2) + "\n").encode())
    _verify(model, load(out, spaces), space)
    return out


def load(path: str | Path, spaces: Mapping[str, type[SearchSpace]]) -> nn.Module:
    """Rebuild the standalone model stored in an export folder, in eval mode."""
    path = Path(path)
    card_file = path / "model.json"
    if not card_file.exists():
        raise NasoptError(f"{path} is not a nasopt export (no model.json); export one with "
                          f"`nasopt export STUDY --trial N --out {path}`")
    try:
        card = json.loads(card_file.read_text())
        arch = Arch.load(path / "arch.json")
    except (OSError, ValueError) as exc:
        raise NasoptError(f"{path}: unreadable export files ({exc}); export it again") from None
    space = space_from_description(card["space"], spaces)
    model = space.build(arch)
    state = checkpoint.load(path / "weights.pt")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise NasoptError(f"{path}/weights.pt does not match arch.json ({str(exc)[:200]}); "
                          f"export it again") from None
    return model.eval()


@torch.no_grad()
def _verify(model: nn.Module, loaded: nn.Module, space: SearchSpace) -> None:
    device = next(model.parameters()).device
    x = torch.randn((8, *space.input_shape), generator=torch.Generator().manual_seed(0))
    model.eval()
    diff = (model(x.to(device)).cpu() - loaded(x)).abs().max().item()
    if diff > 1e-5:
        raise RuntimeError(f"export verification failed: outputs differ by {diff}")
