"""Metrics of one evaluated architecture, and the counters that produce them."""
from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

FLOAT32_BYTES = 4


@dataclass(frozen=True)
class Metrics:
    """What an evaluation returns. ``sources`` says how each figure was obtained."""

    accuracy: float | None  # validation accuracy of the compressed model, in [0, 1]; None for
    # regression (its scores: mae, rmse)
    params: int  # stored parameters of the deployed (BN-folded, factorized) model
    macs: int  # multiply-accumulates for one sample, of the deployed model
    float_bytes: int  # the uncompressed model's parameters as float32
    compressed_bytes: int = 0  # size of the packed file (nasopt.compression.packed)
    nonzero_params: int = 0
    sources: dict[str, str] = field(default_factory=dict)
    # with a hardware profile (nasopt.hardware.profile, nasopt.hardware.evaluate): batch-1 latency and peak
    # activation memory at the profile's data type; None without one
    latency_ms: float | None = None
    sram_bytes: int | None = None
    #: further scores of the validation outputs by name (balanced_accuracy, f1, a user's metric)
    scores: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The fields, with the scores beside them (flat: a study's tables show each as a
        column)."""
        out = asdict(self)
        further = out.pop("scores")
        return {**out, **further}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Metrics":
        fields = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in fields},
                   scores={k: v for k, v in data.items() if k not in fields})


def shape_count_key(arch: Mapping[str, Any]) -> str:
    """A count key (``SearchSpace.count_key``) for a space whose compression genes are the
    shipped ones (:func:`nasopt.compression.compress.compression_genes`): bit widths and
    sparsity change stored values, never a layer's shape, so they change neither the deployed
    model's parameter count nor its MACs; low rank does, and stays in the key."""
    return json.dumps({g: v for g, v in sorted(arch.items())
                       if not (g == "sparsity" or g.endswith(".bits"))}, sort_keys=True)


def count_params(model: nn.Module) -> int:
    """Number of learnable parameters."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one forward pass on one sample, counted from the convolutions and
    linear layers the model actually executes (forward hooks see each call's real input and
    output shapes, so skipped blocks, depthwise groups and factorized layers count as run).
    Element-wise work (BatchNorm, activations, pooling, additions) is not counted, as is
    customary for MACs. :func:`count_macs_reference` (PyTorch's FLOP counter) agrees; a test
    checks it for every space."""
    total = 0

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Linear):
            total += output.numel() * inputs[0].shape[-1]
            return
        cin = inputs[0].shape[1]
        per_output = cin // (cin if module.groups > 1 else 1)
        k = getattr(module, "active_k", None)
        taps = math.prod(module.weight.shape[2:]) if k is None else k ** (module.weight.dim() - 2)
        total += output.numel() * per_output * taps

    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]
    handles = [m.register_forward_hook(hook) for m in layers]
    was_training = model.training
    model.eval()
    try:
        model(torch.zeros((1, *input_shape), device=next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return total


@torch.no_grad()
def count_macs_reference(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """MACs by PyTorch's FLOP counter (2 FLOPs per MAC): slower, counts every matmul/conv op."""
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter:
        model(torch.zeros((1, *input_shape), device=next(model.parameters()).device))
    model.train(was_training)
    return counter.get_total_flops() // 2
