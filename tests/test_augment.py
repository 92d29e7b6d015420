"""Training-time augmentation (nasopt.core.augment) and its use by distillation and fine-tuning."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nasopt import api
from nasopt.core.augment import Augment
from nasopt.core.errors import NasoptError
from nasopt.deploy.distill import DistillConfig, Teachers, train_student
from nasopt.deploy.finetune import FinetuneConfig


def test_parse_names_and_refuse_the_rest():
    assert Augment.parse(["flip", "shift=2"]) == Augment(flip=True, shift=2)
    assert Augment.parse("shift=1") == Augment(shift=1)
    assert not Augment.parse([])
    for bad in (["rotate"], ["shift"], ["shift=0"], ["shift=-1"], ["flip=1"]):
        with pytest.raises(NasoptError, match="unknown augmentation"):
            Augment.parse(bad, "distill.augment")
    with pytest.raises(NasoptError, match="distill.augment: unknown"):
        DistillConfig(augment=("mixup",))
    with pytest.raises(NasoptError, match="finetune.augment: unknown"):
        FinetuneConfig(augment=("mixup",))


def test_check_refuses_tabular_inputs_and_oversized_shifts():
    Augment(flip=True, shift=2).check((1, 28, 28))
    Augment(shift=3).check((1, 40))
    Augment().check((64,))  # nothing to apply: nothing to refuse
    with pytest.raises(NasoptError, match=r"inputs are \(64,\): remove distill.augment"):
        Augment(flip=True).check((64,), "distill.augment")
    with pytest.raises(NasoptError, match="shift below 3"):
        Augment(shift=3).check((1, 6, 6))


def _translated(x: torch.Tensor, dy: int, dx: int, s: int) -> torch.Tensor:
    """``x`` (C, H, W) moved by (dy, dx), edges repeated: the reference, by explicit loops."""
    padded = F.pad(x[None], [s, s, s, s], mode="replicate")[0]
    h, w = x.shape[-2:]
    return padded[:, s - dy:s - dy + h, s - dx:s - dx + w]


def test_shift_translates_each_sample_within_the_range_and_flip_mirrors_about_half():
    torch.manual_seed(0)
    x = torch.randn(64, 2, 7, 9)
    s = 2
    out = Augment(shift=s)(x, torch.Generator().manual_seed(1))
    seen = set()
    for i in range(len(x)):
        moves = [(dy, dx) for dy in range(-s, s + 1) for dx in range(-s, s + 1)
                 if torch.equal(out[i], _translated(x[i], dy, dx, s))]
        assert moves, f"sample {i} is not a translation of its input by at most {s}"
        seen.update(moves)
    assert len(seen) > 10  # the offsets vary from sample to sample
    flipped = Augment(flip=True)(x, torch.Generator().manual_seed(1))
    mirrored = [torch.equal(flipped[i], x[i].flip(-1)) for i in range(len(x))]
    kept = [torch.equal(flipped[i], x[i]) for i in range(len(x))]
    assert all(m or k for m, k in zip(mirrored, kept))
    assert 16 < sum(mirrored) < 48
    signal = torch.arange(10.0).view(1, 1, 10)  # (C, L) inputs shift along L
    moved = Augment(shift=1)(signal.repeat(8, 1, 1), torch.Generator().manual_seed(0))
    assert {float(m[0, 5] - 5) for m in moved} <= {-1.0, 0.0, 1.0}


def test_the_same_seed_draws_the_same_augmentation():
    x = torch.randn(32, 1, 12, 12)
    a = Augment(flip=True, shift=2)
    assert torch.equal(a(x, torch.Generator().manual_seed(3)), a(x, torch.Generator().manual_seed(3)))
    assert not torch.equal(a(x, torch.Generator().manual_seed(3)),
                           a(x, torch.Generator().manual_seed(4)))
    assert Augment()(x, torch.Generator()) is x


class _Recorder(nn.Module):
    """A teacher that remembers the inputs it was shown."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.seen = model, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.clone())
        return self.model(x)


def test_distillation_shows_teacher_and_student_the_same_augmented_inputs(datasets):
    full = datasets["digits"]
    data = dataclasses.replace(full, x_train=full.x_train[:128], y_train=full.y_train[:128])
    space = api.make_space("mobilenet", data)
    torch.manual_seed(0)
    student, teacher = space.build(space.smallest()), _Recorder(space.build(space.smallest()))
    seen_by_student = []
    student.register_forward_pre_hook(lambda m, args: seen_by_student.append(args[0].clone())
                                      if m.training else None)
    cfg = DistillConfig(epochs=1, patience=1, batch_size=64, augment=("shift=1",))
    train_student(student, data, Teachers([teacher.eval()], [1.0], ["t"]), cfg)
    assert len(teacher.seen) == len(seen_by_student) == 2
    for t, s in zip(teacher.seen, seen_by_student):
        assert torch.equal(t, s)
    batches = torch.cat(seen_by_student)
    assert batches.shape == data.x_train.shape
    unchanged = sum(any(torch.equal(b, x) for x in data.x_train) for b in batches)
    assert unchanged < len(batches) / 2  # most samples moved (1 in 9 draws no move)
    with pytest.raises(NasoptError, match="remove distill.augment"):
        tabular = dataclasses.replace(data, x_train=data.x_train.flatten(1),
                                      x_val=data.x_val.flatten(1))
        train_student(nn.Linear(64, 10), tabular, None, cfg)
