"""Training-time data augmentation of image and signal inputs: random flips of the last axis and
random translations, drawn per sample from a seeded generator and applied to a minibatch where
it lies (CPU or GPU).

An augmentation is given as a list of names, as in a run config's ``distill.augment``::

    augment = ["flip", "shift=2"]

- ``flip``: reverse the last axis (a horizontal flip of an image) for half of the samples. Only
  for data whose classes keep their meaning mirrored (clothes, objects; not digits or text);
- ``shift=N``: translate every sample by a whole number of positions in [-N, N] along each
  spatial axis (the last two of (C, H, W), the last of (C, L)), edges repeated.

Validation and test inputs are never augmented. With a teacher, the teacher sees the same
augmented inputs as the student (distillation's "consistent teaching").
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from nasopt.core.errors import NasoptError

NAMES = ("flip", "shift=N")


@dataclass(frozen=True)
class Augment:
    flip: bool = False
    shift: int = 0

    @classmethod
    def parse(cls, spec: Sequence[str], where: str = "augment") -> Augment:
        """``["flip", "shift=2"]`` -> Augment(flip=True, shift=2); one clear error otherwise."""
        if isinstance(spec, str):
            spec = [s for s in spec.split(",") if s.strip()]
        flip, shift = False, 0
        for item in spec:
            name, _, value = str(item).strip().partition("=")
            if name == "flip" and not value:
                flip = True
            elif name == "shift" and value.strip().isdigit() and int(value) >= 1:
                shift = int(value)
            else:
                raise NasoptError(f"{where}: unknown augmentation {item!r}; give a list of "
                                  f"{' and '.join(NAMES)} (N >= 1), e.g. [\"flip\", \"shift=2\"]")
        return cls(flip, shift)

    def __bool__(self) -> bool:
        return self.flip or self.shift > 0

    def check(self, input_shape: Sequence[int], where: str = "augment") -> None:
        """Raise where the inputs have no spatial axis to flip or shift (tabular features)."""
        if self and len(input_shape) < 2:
            raise NasoptError(f"{where} needs image (C, H, W) or signal (C, L) inputs; these "
                              f"inputs are {tuple(input_shape)}: remove {where}")
        if self.shift and min(input_shape[1:]) <= 2 * self.shift:
            raise NasoptError(f"{where}: shift={self.shift} is too large for inputs "
                              f"{tuple(input_shape)}; give a shift below "
                              f"{(min(input_shape[1:]) + 1) // 2}")

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """``x`` (batch, C, *spatial) augmented; ``generator`` (CPU) draws every choice."""
        if not self:
            return x
        n, spatial = len(x), x.dim() - 2
        if self.flip:
            mirrored = torch.rand(n, generator=generator) < 0.5
            x = torch.where(mirrored.to(x.device).view(-1, *[1] * (x.dim() - 1)),
                            x.flip(-1), x)
        if self.shift:
            s = self.shift
            axes = list(range(x.dim() - min(spatial, 2), x.dim()))
            padded = F.pad(x, [s] * (2 * len(axes)), mode="replicate")
            for axis in axes:
                size = x.shape[axis]
                start = torch.randint(0, 2 * s + 1, (n,), generator=generator).to(x.device)
                index = start[:, None] + torch.arange(size, device=x.device)  # (n, size)
                shape = [n] + [1] * (x.dim() - 1)
                shape[axis] = size
                index = index.view(shape).expand(
                    *[size if d == axis else padded.shape[d] for d in range(x.dim())])
                padded = padded.gather(axis, index)
            x = padded
        return x
