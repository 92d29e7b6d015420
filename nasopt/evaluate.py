"""Evaluator: arch -> Metrics, with inherited supernet weights and BN recalibration; cached."""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .arch import Arch, Value
from .data import Dataset
from .metrics import FLOAT32_BYTES, Metrics, count_macs, count_params
from .supernet import Supernet, recalibrate_bn
from .train import accuracy


class Evaluator:
    """Scores archs of ``supernet.space`` on the validation split of ``data`` (never on test).

    Each arch is extracted from the supernet, its BatchNorm statistics recalibrated on the first
    ``calib_samples`` training samples (a fixed set, so evaluation is deterministic), and measured.
    Results are cached by the arch's canonical key.
    """

    def __init__(self, supernet: Supernet, data: Dataset, calib_samples: int = 1024):
        self.supernet = supernet
        self.space = supernet.space
        self._x_calib = data.x_train[:calib_samples]
        self._x_val, self._y_val = data.x_val, data.y_val
        self._input_shape = data.input_shape
        self._cache: dict[str, Metrics] = {}

    def model(self, arch: Mapping[str, Value]) -> nn.Module:
        """The standalone model of ``arch`` exactly as it is scored (inherited, recalibrated)."""
        model = self.supernet.extract(arch)
        recalibrate_bn(model, self._x_calib)
        return model.eval()

    @torch.no_grad()
    def __call__(self, arch: Mapping[str, Value]) -> Metrics:
        arch = self.space.validate(arch)
        if arch.key not in self._cache:
            self._cache[arch.key] = self._measure(arch)
        return self._cache[arch.key]

    def _measure(self, arch: Arch) -> Metrics:
        model = self.model(arch)
        params = count_params(model)
        return Metrics(
            accuracy=accuracy(model, self._x_val, self._y_val),
            params=params,
            macs=count_macs(model, self._input_shape),
            float_bytes=params * FLOAT32_BYTES,
            sources={"accuracy": "inherited supernet weights + BN recalibration, validation split",
                     "params": "counted", "macs": "counted from executed ops",
                     "float_bytes": "params x 4"},
        )
