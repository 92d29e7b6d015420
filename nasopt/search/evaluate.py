"""Evaluator: arch -> Metrics of the *compressed* model, from inherited supernet weights; cached."""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Mapping

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from nasopt.core.arch import Arch, Value
from nasopt.compression.compress import (
    PRUNING, PRUNINGS, Policy, StoredLayer, compress, compresses, nonzero_params,
)
from nasopt.core.data import Dataset
from nasopt.core.errors import NasoptError
from nasopt.core.metrics import FLOAT32_BYTES, Metrics, count_macs, count_params
from nasopt.compression.packed import predicted_size
from nasopt.supernet.compressed import compressed_forward
from nasopt.supernet.elastic import Supernet, recalibrate_bn
from nasopt.supernet.network import ElasticNetwork
from nasopt.core.scores import Metric, scores
from nasopt.core.task import task_of
from nasopt.supernet.train import correct, outputs


#: how trials are scored, recorded in a study's setup. 1: BatchNorm recalibrated on the float
#: model, folded before low rank and pruning; 2: recalibrated under the arch's compression, folded
#: after low rank and pruning (:mod:`nasopt.compression.compress`), as a compression-aware
#: supernet trains; 3: as 2, pruning by LAMP scores in place of magnitudes (in training and in
#: scoring). A study keeps the scoring its trials were made with.
SCORING = 3
SCORINGS = (1, 2, 3)
#: the global pruning criterion of each scoring
PRUNING_OF_SCORING = {1: "magnitude", 2: "magnitude", 3: PRUNING}


class Evaluator:
    """Scores archs of ``space`` on the validation split of ``data`` (never on test).

    Each arch's architecture genes are extracted from the supernet and its BatchNorm statistics
    recalibrated on ``calib_samples`` training samples (a fixed, seeded random subset, so
    evaluation is deterministic); then its compression genes are applied (BN folding, low rank, pruning,
    quantization: :mod:`nasopt.compression.compress`) and the compressed model is measured. Results are
    cached by the arch's canonical key.

    When the space's network splits its forward pass into parts
    (:meth:`~nasopt.supernet.network.ElasticNetwork.parts`: the stem, each stage), BatchNorm is
    recalibrated part by part, and a part's statistics and outputs on the calibration samples
    are kept (up to ``RECAL_CACHE_BYTES``, least recently used dropped first) for the next arch
    that shares it and every part before it: the same arithmetic on the same inputs, so the
    statistics are the very ones :func:`recalibrate_bn` computes (a test compares them).
    Parameter and MAC counts are kept by the space's ``count_key``. The supernet's weights are
    taken as fixed, as for the results cache.
    """

    #: the calibration outputs of shared parts kept for reuse (bytes)
    RECAL_CACHE_BYTES = 256 * 2 ** 20

    def __init__(self, space, supernet: Supernet, data: Dataset, calib_samples: int = 1024,
                 pruning: str | None = None, metric: Metric | None = None,
                 scoring: int = SCORING):
        self.space = space
        self.task = task_of(data)
        #: the scores of every evaluation: the task's built-in metrics, and a user's own one
        self.metrics = {**self.task.metrics,
                        **({metric.name: metric} if metric is not None else {})}
        self.supernet = supernet
        if scoring not in SCORINGS:
            raise NasoptError(f"this nasopt scores trials in the ways {SCORINGS}, not {scoring}; "
                              f"use a newer nasopt for this study")
        #: the global pruning criterion: the scoring's, or ``random`` (the baseline)
        self.pruning = pruning or PRUNING_OF_SCORING[scoring]
        if self.pruning not in PRUNINGS:
            raise NasoptError(f"unknown pruning criterion {self.pruning!r}; use one of "
                              f"{', '.join(PRUNINGS)}")
        self.scoring = scoring
        if calib_samples < 1:
            raise NasoptError(f"eval.calib_samples must be at least 1, got {calib_samples}")
        # a fixed, seeded random subset: training data may be sorted by class
        order = torch.randperm(len(data.x_train), generator=torch.Generator().manual_seed(0))
        self._x_calib = data.x_train[order[:calib_samples].to(data.x_train.device)]
        self._x_val, self._y_val = data.x_val, data.y_val
        #: the trivial predictor's outputs on the validation split (nasopt.core.task)
        self.trivial_outputs = self.task.trivial_outputs(data.y_train, len(data.y_val),
                                                         data.num_classes)
        self._input_shape = data.input_shape
        self._cache: dict[str, Metrics] = {}
        #: part key -> (its outputs per calibration batch, its BN statistics)
        self._parts: OrderedDict[Hashable, tuple[list[torch.Tensor], list[tuple[torch.Tensor, ...]]]] = OrderedDict()
        self._parts_bytes = 0
        self._counts: dict[str, tuple[int, int]] = {}  # count key -> (params, MACs) deployed
        self._compression_genes = set(space.compression_genes()) if space.compression else set()

    @property
    def calibration_samples(self) -> torch.Tensor:
        """The fixed training subset used for BN recalibration (also int8 ONNX calibration)."""
        return self._x_calib

    def float_model(self, arch: Mapping[str, Value]) -> nn.Module:
        """The uncompressed standalone model (inherited weights, BatchNorm recalibrated)."""
        model = self.supernet.extract(arch)
        self._recalibrate(model, ())
        return model.eval()

    def calibrated_model(self, arch: Mapping[str, Value]) -> nn.Module:
        """The standalone model (inherited weights) whose BatchNorm is recalibrated under the
        arch's compression genes: the statistics of the compressed forward
        (:func:`nasopt.supernet.compressed.compressed_forward`), which the deployed model
        folds. What :func:`~nasopt.compression.compress.compress` turns into the scored model,
        and where quantization-aware fine-tuning of a trial starts. An arch without compression
        (or the random-pruning baseline) is the float model."""
        arch = self.space.validate(arch)
        policy = Policy.from_arch(arch, self.pruning) if self.space.compression else Policy()
        if not compresses(policy) or self.pruning == "random" or self.scoring < 2:
            return self.float_model(arch)
        model = self.supernet.extract(arch)
        compression = tuple((g, v) for g, v in arch.items() if g in self._compression_genes)
        if policy.sparsity > 0:  # every layer's weights choose the masks
            compression = (arch.key,)
        with compressed_forward(model, policy, self.space.group_of, self._x_calib):
            self._recalibrate(model, compression)
        return model.eval()

    @torch.no_grad()
    def _recalibrate(self, model: nn.Module, compression: tuple, batch_size: int = 1024) -> None:
        """:func:`recalibrate_bn` on the calibration samples, part by part where the network
        names its parts, reusing the parts already computed for another arch with the same
        ``compression`` (its key: the compression genes, or the whole arch)."""
        parts = model.parts() if isinstance(model, ElasticNetwork) else None
        every = {id(m) for m in model.modules() if isinstance(m, _BatchNorm)}
        covered = [] if parts is None else [
            [m for m in module.modules() if isinstance(m, _BatchNorm)] for _, _, module in parts]
        if parts is None or {id(m) for bns in covered for m in bns} != every:
            recalibrate_bn(model, self._x_calib, batch_size)
            return
        if compression:
            parts = [((key, compression), forward, module) for key, forward, module in parts]
        was_training = model.training
        model.train()
        xs = [self._x_calib[start:start + batch_size]
              for start in range(0, len(self._x_calib), batch_size)]
        for (key, forward, _), bns in zip(parts, covered):
            hit = self._parts.get(key)
            if hit is not None:
                self._parts.move_to_end(key)
                xs, stats = hit
                for bn, values in zip(bns, stats):
                    for buffer, value in zip(_bn_state(bn), values):
                        buffer.copy_(value)
                continue
            saved = [bn.momentum for bn in bns]
            for bn in bns:
                bn.reset_running_stats()
                bn.momentum = None  # a cumulative average over the batches, as recalibrate_bn
            xs = [forward(x) for x in xs]
            for bn, momentum in zip(bns, saved):
                bn.momentum = momentum
            self._keep(key, xs, [tuple(t.clone() for t in _bn_state(bn)) for bn in bns])
        model.train(was_training)

    def _keep(self, key: Hashable, xs: list[torch.Tensor],
              stats: list[tuple[torch.Tensor, ...]]) -> None:
        size = sum(x.numel() * x.element_size() for x in xs)
        if size > self.RECAL_CACHE_BYTES:
            return
        while self._parts and self._parts_bytes + size > self.RECAL_CACHE_BYTES:
            _, (old, _) = self._parts.popitem(last=False)
            self._parts_bytes -= sum(x.numel() * x.element_size() for x in old)
        self._parts[key] = (xs, stats)
        self._parts_bytes += size

    def compressed(self, arch: Mapping[str, Value]) -> tuple[nn.Module, list[StoredLayer]]:
        """The deployed model of ``arch`` exactly as it is scored, and its stored layers."""
        arch = self.space.validate(arch)
        return self._compress(arch, self.calibrated_model(arch))

    def _compress(self, arch: Arch, float_model: nn.Module
                  ) -> tuple[nn.Module, list[StoredLayer]]:
        return compress(float_model, Policy.from_arch(arch, self.pruning), self.space.group_of,
                        inplace=True, fold_first=self.scoring < 2)

    def correct(self, arch: Mapping[str, Value]) -> torch.Tensor:
        """Which validation samples the compressed model of ``arch`` classifies right (a bool
        per sample; its mean is the arch's accuracy), for paired comparisons of two archs."""
        return correct(self.compressed(arch)[0], self._x_val, self._y_val)

    @torch.no_grad()
    def __call__(self, arch: Mapping[str, Value]) -> Metrics:
        arch = self.space.validate(arch)
        if arch.key not in self._cache:
            self._cache[arch.key] = self._measure(arch)
        return self._cache[arch.key]

    def _measure(self, arch: Arch) -> Metrics:
        calibrated = self.calibrated_model(arch)
        float_params = count_params(calibrated)  # before compress() changes it in place
        model, stored = self._compress(arch, calibrated)
        found = scores(outputs(model, self._x_val).cpu().numpy(), self._y_val.cpu().numpy(),
                       self.metrics)
        count_key = self.space.count_key(arch)
        if count_key not in self._counts:
            self._counts[count_key] = (count_params(model), count_macs(model, self._input_shape))
        params, macs = self._counts[count_key]
        return Metrics(
            accuracy=found.pop("accuracy", None),  # None for regression
            scores=found,
            params=params,
            macs=macs,
            float_bytes=float_params * FLOAT32_BYTES,
            compressed_bytes=predicted_size(self.space, arch, stored),
            nonzero_params=nonzero_params(stored),
            sources={"scores": "compressed model from inherited supernet weights + BN "
                               "recalibration, validation split",
                     "params": "counted (deployed model)",
                     "macs": "counted from executed ops (deployed model)",
                     "float_bytes": "uncompressed params x 4",
                     "compressed_bytes": "packed file size (formula, nasopt.compression.packed)"},
        )


def _bn_state(bn: _BatchNorm) -> tuple[torch.Tensor, ...]:
    """The buffers recalibration sets."""
    return bn.running_mean, bn.running_var, bn.num_batches_tracked
