"""Metrics of one evaluated architecture, and the counters that produce them."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

FLOAT32_BYTES = 4


@dataclass(frozen=True)
class Metrics:
    """What an evaluation returns. ``sources`` says how each figure was obtained."""

    accuracy: float  # validation accuracy of the compressed model, in [0, 1]
    params: int  # stored parameters of the deployed (BN-folded, factorized) model
    macs: int  # multiply-accumulates for one sample, of the deployed model
    float_bytes: int  # the uncompressed model's parameters as float32
    compressed_bytes: int = 0  # size of the packed file (nasopt.packed)
    nonzero_params: int = 0
    sources: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Metrics":
        return cls(**data)

    def is_finite(self) -> bool:
        return all(math.isfinite(v) for v in (self.accuracy, self.params, self.macs,
                                               self.float_bytes, self.compressed_bytes))


def count_params(model: nn.Module) -> int:
    """Number of learnable parameters."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one forward pass on one sample, counted from the operations the
    model actually executes (convolutions and matrix products; PyTorch's FLOP counter reports
    2 FLOPs per MAC). Element-wise work (BatchNorm, activations, additions) is not counted, as
    is customary for MACs."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    counter = FlopCounterMode(display=False)
    with counter:
        model(torch.zeros((1, *input_shape), device=device))
    model.train(was_training)
    return counter.get_total_flops() // 2
