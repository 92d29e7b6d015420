"""Hardware metrics in a search: an evaluator wrapper that adds latency and peak SRAM to every
arch's :class:`~nasopt.core.metrics.Metrics`, and the check that budgets are possible at all.

Latency follows the profile's ``metrics.latency``: ``predicted`` from the look-up table
(:mod:`nasopt.hardware.lut`; built once per (sub-)space and profile under ``run_dir/hardware/`` and reused),
``measured`` in ONNX Runtime per arch (:mod:`nasopt.hardware.latency`; slow and noisy, but direct).
SRAM is the peak activation memory at the profile's data type (:mod:`nasopt.hardware.memory`). Both depend
only on the arch's structure (not its bit-widths or sparsity) and are cached by it.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from nasopt.core.arch import Arch, Value
from nasopt.core.errors import NasoptError
from nasopt.hardware.profile import Profile
from nasopt.hardware.lut import LatencyTable, build_table, table_path
from nasopt.supernet.network import depth_position
from nasopt.hardware.memory import arch_peak_bytes, structure_key
from nasopt.core.metrics import Metrics
from nasopt.core.objectives import Constraint

Log = Callable[[str], None]


def latency_table(space, profile: Profile, run_dir: str | Path, log: Log = lambda s: None  # noqa: ANN001
                  ) -> LatencyTable:
    """The LUT of ``space`` under ``profile`` from ``run_dir/hardware/``, built there if missing."""
    path = table_path(run_dir, space, profile)
    if path.exists():
        return LatencyTable.load(path)
    log(f"building the latency table of {space.name} under {profile.name} (once; "
        f"`nasopt hw profile` does the same): {path}")
    table = build_table(space, profile, log=log)
    table.save(path)
    return table


class HardwareEvaluator:
    """Wraps an evaluator (arch -> Metrics): the same metrics plus ``latency_ms`` and
    ``sram_bytes`` as the profile provides them."""

    def __init__(self, evaluate: Callable[[Arch], Metrics], space, profile: Profile,  # noqa: ANN001
                 table: LatencyTable | None = None):
        if profile.metrics.get("latency") == "predicted" and table is None:
            raise ValueError("a profile with predicted latency needs its latency table")
        self.evaluate, self.space, self.profile, self.table = evaluate, space, profile, table
        self._cache: dict[str, tuple[float | None, int | None]] = {}

    def hardware(self, arch: Mapping[str, Value]) -> tuple[float | None, int | None]:
        """(latency ms, peak SRAM bytes) of ``arch``; None where the profile has no such metric."""
        key = structure_key(self.space, arch)
        if key not in self._cache:
            how = self.profile.metrics
            latency = None
            if how.get("latency") == "predicted":
                latency = float(self.table.predict(self.space, arch))  # type: ignore[union-attr]
            elif how.get("latency") == "measured":
                from nasopt.hardware.lut import measure_arch_fn
                latency = measure_arch_fn(self.space, self.profile)(self.space.validate(arch))[0]
            sram = (arch_peak_bytes(self.space, arch, self.profile.dtype)
                    if how.get("sram") == "counted" else None)
            self._cache[key] = (latency, sram)
        return self._cache[key]

    def __call__(self, arch: Arch) -> Metrics:
        metrics = self.evaluate(arch)
        latency, sram = self.hardware(arch)
        how = self.profile.metrics
        sources = dict(metrics.sources)
        if latency is not None:
            sources["latency_ms"] = (
                f"{how['latency']} ({'look-up table' if how['latency'] == 'predicted' else 'ONNX Runtime'}"
                f"), profile {self.profile.name}: {self.profile.dtype}, batch 1, "
                f"{self.profile.threads} thread(s)")
        if sram is not None:
            sources["sram_bytes"] = (f"peak activation memory at {self.profile.dtype} "
                                     f"(nasopt.hardware.memory), profile {self.profile.name}")
        return dataclasses.replace(metrics, latency_ms=latency, sram_bytes=sram, sources=sources)


def check_possible(space, profile: Profile, constraints: Sequence[Constraint],  # noqa: ANN001
                   table: LatencyTable | None) -> None:
    """Raise one clear error when a budget is below what the smallest arch of the space needs."""
    limits = {c.name: c.limit for c in constraints}
    if "sram" in limits:
        need = arch_peak_bytes(space, space.smallest(), profile.dtype)
        if need > limits["sram"]:
            raise NasoptError(
                f"impossible budget: sram {limits['sram']:.0f} B, but the smallest arch of space "
                f"{space.name} needs {need} B of activations at {profile.dtype} (profile "
                f"{profile.name}); raise --max-sram (or the profile's limits.sram) to at least "
                f"{need} B")
    if "latency" in limits and table is not None:
        floor = latency_floor(table)
        if floor > limits["latency"]:
            raise NasoptError(
                f"impossible budget: latency {limits['latency']:g} ms, but no arch of space "
                f"{space.name} is predicted below {floor:.4f} ms on profile {profile.name}; "
                f"raise --max-latency to at least {floor:.4f}ms")


def latency_floor(table: LatencyTable) -> float:
    """A lower bound of the predicted latency over the table's space: the constant plus, for each
    unit every arch has (first blocks, stem, head), its cheapest entry."""
    total = table.constant
    for name, pos in table.positions.items():
        where = depth_position(name)
        optional = where is not None and where[0] in table.space["genes"] and \
            min(int(d) for d in table.space["genes"][where[0]]) <= where[1]
        if not optional:
            total += min(table.entries[k] for k in pos["keys"].values())
    return total


def setup_record(profile: Profile, table: LatencyTable | None, path: Path | None
                 ) -> dict[str, Any]:
    """What a study records about its hardware (reopening with another profile is refused)."""
    record: dict[str, Any] = {"profile": profile.describe()}
    if table is not None and path is not None:
        record["latency_table"] = str(path.resolve())
    return record
