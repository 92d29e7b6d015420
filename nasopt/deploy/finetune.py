"""Fine-tuning with the arch's compression policy applied (quantization-aware training), and
re-heading an exported model for transfer learning.

The model is put in its deployed structure exactly as :func:`nasopt.compression.compress.compress` does
(low-rank layers split into their SVD factors, global pruning, BatchNorm folded into the
convs), then every weight layer gets a parametrization (``torch.nn.utils.parametrize``)::

    weight = fake_quantize(latent * mask, bits)

- ``mask`` is the pruning mask, a fixed buffer: pruned weights stay zero (their latent values
  get no gradient), so the sparsity pattern chosen by global pruning is held fixed;
- ``fake_quantize`` is :func:`nasopt.compression.compress.quantize` followed by ``dequantize`` (symmetric,
  per output channel, scale = max|w| / (2^(b-1) - 1)), the very quantizer of the packed file,
  with a straight-through estimator: its gradient is the identity (nothing clips, because the
  scale comes from the maximum). 32-bit groups are not quantized;
- low-rank factors are trained as two layers (each quantized at its group's bit-width);
- a ``codebook`` group's layers (:func:`nasopt.compression.compress.codebook_quantize`) train
  their shared levels instead (Deep Compression's centroid fine-tuning): each weight's level
  index and its row's scale are fixed, ``weight = scale[row] * levels[index] * mask``, so a
  level's gradient is the sum of the gradients of the weights that share it.

:func:`finalize` removes the parametrizations, writes ``latent * mask`` into the layers and
quantizes them with :func:`nasopt.compression.compress.store_layers`, so the deployed weights equal what the
last fine-tuning forward computed and the packed file (``nasopt.compression.packed``) reproduces the
fine-tuned model (checked by ``nasopt.deploy.export`` after writing, max abs diff < 1e-6).

Training: Adam with the cosine learning-rate schedule of :func:`nasopt.supernet.train.fit`, early stopping
on the validation split (:mod:`nasopt.supernet.early_stopping`). BatchNorm is folded before fine-tuning,
so there are no batch statistics to drift (the deployed model has none either).
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from nasopt.core.augment import Augment
from nasopt.deploy.distill import StudentLoss, Teachers
from nasopt.compression.compress import (
    FLOAT_BITS, GroupOf, Policy, StoredLayer, codebook_quantize, compressed_structure, decode,
    deployed_float, dequantize, quantize, store_layers, weight_layers,
)
from nasopt.core.data import Dataset
from nasopt.supernet.early_stopping import History, train_early_stopping
from nasopt.core.errors import NasoptError
from nasopt.supernet.train import TrainConfig


class _FakeQuantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight: Tensor, bits: int) -> Tensor:  # noqa: ANN001
        return dequantize(*quantize(weight, bits))

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # noqa: ANN001
        return grad, None  # straight-through estimator


def fake_quantize(weight: Tensor, bits: int) -> Tensor:
    """Quantize-dequantize as the packed file stores weights; identity gradient (STE)."""
    if bits >= FLOAT_BITS:
        return weight
    return _FakeQuantize.apply(weight, bits)


class CompressedWeight(nn.Module):
    """Parametrization ``latent -> fake_quantize(latent * mask, bits)``."""

    def __init__(self, bits: int, mask: Tensor | None):
        super().__init__()
        self.bits = bits
        self.register_buffer("mask", mask)

    def forward(self, latent: Tensor) -> Tensor:
        w = latent if self.mask is None else latent * self.mask
        return fake_quantize(w, self.bits)


class CodebookWeight(nn.Module):
    """Parametrization of a codebook layer: ``scale[row] * levels[index]`` (times the mask),
    the shared ``levels`` trained, the indices and scales fixed (the latent weight is unused)."""

    def __init__(self, weight: Tensor, bits: int, mask: Tensor | None):
        super().__init__()
        keep = None if mask is None else mask.bool()
        index, levels, scale = codebook_quantize(weight.detach(), bits, keep)
        self.bits = bits
        self.register_buffer("mask", mask)
        self.register_buffer("index", index)
        self.register_buffer("scale", scale)
        self.levels = nn.Parameter(levels)

    def forward(self, latent: Tensor) -> Tensor:
        return decode(self.index, self.levels, self.scale,
                      None if self.mask is None else self.mask.bool())

    def codebook(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.index, self.levels.detach().clone(), self.scale


def prepare_qat(model: nn.Module, policy: Policy, group_of: GroupOf, *, deployed: bool = False,
                seed: int = 0) -> nn.Module:
    """A copy of ``model`` ready for quantization-aware training.

    ``model`` is a standalone float model (BatchNorm, no factorization), or with ``deployed`` an
    already compressed model (an export; its zero weights are the pruning mask)."""
    model = copy.deepcopy(model).eval()
    if not deployed:
        deployed_float(model, policy, group_of, seed)
    for name, module in weight_layers(model):
        mask = (module.weight.detach() != 0).float() if policy.sparsity > 0 else None
        group = group_of(name)
        weight = (CodebookWeight(module.weight, policy.bits_of(group), mask)
                  if policy.codebook_of(group) else
                  CompressedWeight(policy.bits_of(group), mask))
        parametrize.register_parametrization(module, "weight", weight)
    return model


def finalize(model: nn.Module, policy: Policy, group_of: GroupOf
             ) -> tuple[nn.Module, list[StoredLayer]]:
    """Remove the parametrizations in place and quantize: the deployed model and its stored
    layers (what ``nasopt.deploy.export`` writes)."""
    codebooks = {}
    with torch.no_grad():
        for name, module in weight_layers(model):
            if not parametrize.is_parametrized(module, "weight"):
                raise NasoptError("finalize() takes a model from prepare_qat()")
            p = module.parametrizations.weight[0]
            if isinstance(p, CodebookWeight):
                codebooks[name] = p.codebook()
                latent = module.weight.detach().clone()  # the decoded codebook weight
            else:
                latent = module.parametrizations.weight.original.detach().clone()
                if p.mask is not None:
                    latent = latent * p.mask
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
            module.weight.copy_(latent)
    model.eval()
    for param in model.parameters():
        param.requires_grad_(True)
    return model, store_layers(model, policy, group_of, codebooks)


# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FinetuneConfig:
    epochs: int = 20
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    patience: int = 5  # early stopping on validation accuracy
    freeze: tuple[str, ...] = ()  # gene groups kept fixed, e.g. ("s1", "s2")
    seed: int = 0
    #: training-time augmentation of the inputs, e.g. ("flip", "shift=2") (:mod:`nasopt.core.augment`)
    augment: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        Augment.parse(self.augment, "finetune.augment")
        if self.epochs < 1:  # no training: no validation accuracy, nothing to report
            raise NasoptError(f"finetune epochs must be >= 1, got {self.epochs}; give --epochs "
                              f"1 or more (finetune.epochs in a run config)")
        if self.patience < 1 or self.lr <= 0:
            raise NasoptError(f"finetune patience must be >= 1 and lr > 0, got patience "
                              f"{self.patience}, lr {self.lr}")


def freeze_groups(model: nn.Module, groups: Sequence[str], group_of: GroupOf,
                  known: Sequence[str]) -> list[nn.Parameter]:
    """Turn off gradients of the parameters of ``groups``; return the trainable parameters."""
    bad = [g for g in groups if g not in known]
    if bad:
        raise NasoptError(f"unknown group(s) {bad} to freeze; the model's groups are "
                          f"{', '.join(known)}")
    trainable = []
    for name, param in model.named_parameters():
        frozen = group_of(name) in groups
        param.requires_grad_(not frozen)
        if not frozen:
            trainable.append(param)
    if not trainable:
        raise NasoptError("every group is frozen: nothing left to fine-tune")
    return trainable


def model_groups(model: nn.Module, group_of: GroupOf) -> list[str]:
    return list(dict.fromkeys(group_of(name) for name, _ in weight_layers(model)))


def finetune(qat_model: nn.Module, policy: Policy, group_of: GroupOf, data: Dataset,
             cfg: FinetuneConfig, *, teachers: Teachers | None = None, alpha: float = 0.5,
             temperature: float = 4.0, show_progress: bool = False, desc: str = "finetune"
             ) -> tuple[nn.Module, list[StoredLayer], History]:
    """Quantization-aware training of a :func:`prepare_qat` model on ``data`` (in place), then
    :func:`finalize`: (deployed model, stored layers, history). The loss is the task's
    (cross-entropy, or MSE for regression), or with ``teachers`` the KD loss of
    :class:`nasopt.deploy.distill.StudentLoss` (``alpha`` on the labels, ``temperature``)."""
    torch.manual_seed(cfg.seed)
    params = freeze_groups(qat_model, cfg.freeze, group_of, model_groups(qat_model, group_of))
    train_cfg = TrainConfig(cfg.epochs, cfg.batch_size, cfg.lr, cfg.weight_decay, cfg.seed)
    loss = StudentLoss(qat_model, data, teachers, alpha, temperature,
                       Augment.parse(cfg.augment, "finetune.augment"), cfg.seed,
                       where="finetune.augment")
    history = train_early_stopping(qat_model, params, loss, data, train_cfg, cfg.patience,
                                   desc=desc, show_progress=show_progress,
                                   train_targets=loss.targets)
    model, stored = finalize(qat_model, policy, group_of)
    return model, stored, history


# ---------------------------------------------------------------------------------------------
def reheaded(deployed: nn.Module, space, arch, num_classes: int, seed: int = 0):  # noqa: ANN001, ANN201
    """Transfer learning: ``deployed`` (an exported model of ``arch`` in ``space``) with a new
    classifier for ``num_classes`` labels. Returns (model, new space).

    Every tensor whose shape does not depend on the label count is copied; the layers that
    produce the logits get a fresh initialisation (seeded). When the arch prunes, each new layer
    is pruned by magnitude to the zero fraction its predecessor had, so the packed size is kept.
    """
    new_space = type(space)(space.input_shape, num_classes, space.genes, space.compression)
    policy = Policy.from_arch(arch)
    torch.manual_seed(seed)
    model = compressed_structure(new_space.build(arch), policy, new_space.group_of)
    old = deployed.state_dict()
    new = model.state_dict()
    fresh = [k for k, t in new.items() if k not in old or old[k].shape != t.shape]
    model.load_state_dict({k: (t if k in fresh else old[k]) for k, t in new.items()})
    if policy.sparsity > 0:
        with torch.no_grad():
            for key in fresh:
                if not key.endswith("weight"):
                    continue
                zero_fraction = float((old[key] == 0).float().mean()) if key in old else 0.0
                w = model.get_parameter(key)
                k = round(zero_fraction * w.numel())
                if k > 0:
                    w.view(-1)[w.abs().view(-1).argsort()[:k]] = 0.0
    return model.eval(), new_space
