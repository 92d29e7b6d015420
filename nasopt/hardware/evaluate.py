"""Hardware metrics in a search: an evaluator wrapper that adds latency and peak SRAM to every
arch's :class:`~nasopt.core.metrics.Metrics`, and the check that budgets are possible at all.

Latency follows the profile's ``metrics.latency``: ``predicted`` from the look-up table
(:mod:`nasopt.hardware.lut`; built once per (sub-)space and profile under ``run_dir/hardware/`` and reused),
``measured`` in ONNX Runtime per arch (:mod:`nasopt.hardware.latency`; slow and noisy, but direct).
SRAM is the peak activation memory at the profile's data type (:mod:`nasopt.hardware.memory`). Both depend
only on the arch's structure (not its bit-widths or sparsity) and are cached by it.

A profile with ``firmware`` metrics (``cortex-m4``) builds each arch's integer plan
(:func:`nasopt.deploy.firmware.reference.build_plan`, calibrated on the evaluator's calibration
samples) and takes from it, per arch (bit-widths and sparsity included):

- ``flash = "firmware"``: ``compressed_bytes`` (the size objective and ``--max-size``) becomes
  the firmware's flash bytes (:func:`nasopt.deploy.firmware.footprint.predict`); the packed
  file's size stays in the scores as ``packed_bytes``, the flash also as ``flash_bytes``;
- ``sram = "firmware"``: ``sram_bytes`` becomes the firmware's RAM (static + stack), with
  ``arena_bytes`` and ``stack_bytes`` in the scores;
- ``accuracy = "firmware"``: ``accuracy`` becomes the integer model's validation accuracy (bit
  for bit the C's), the float packed model's stays as ``float_accuracy``. The plan's input
  quantization applies to the evaluator's validation inputs as they are (after the dataset's
  preprocessing), with the quantization range calibrated on them; an export folds the
  preprocessing into that step instead, which can move a rare sample across a rounding
  boundary of the int8 input.
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
        self.firmware = FirmwareFigures(evaluate, space, profile) if profile.firmware else None

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
        metrics = dataclasses.replace(metrics, latency_ms=latency, sram_bytes=sram,
                                      sources=sources)
        return self.firmware(arch, metrics) if self.firmware is not None else metrics


class FirmwareFigures:
    """The C export's figures of an arch (see the module doc), cached by the full arch."""

    def __init__(self, evaluate, space, profile: Profile):  # noqa: ANN001
        from nasopt.deploy.firmware import footprint
        from nasopt.hardware.profile import costs_path
        needs = [a for a in ("compressed", "calibration_samples", "_x_val", "_y_val")
                 if not hasattr(evaluate, a)]
        if needs:
            raise NasoptError(f"profile {profile.name} builds the C export of each arch: it needs "
                              f"a search evaluator with a supernet (nasopt.search.evaluate."
                              f"Evaluator), not {type(evaluate).__name__}")
        self.evaluate, self.space, self.profile = evaluate, space, profile
        self.costs = footprint.load_costs(costs_path(profile.source))
        self._cache: dict[tuple, dict[str, Any]] = {}

    def figures(self, arch: Mapping[str, Value]) -> dict[str, Any]:
        """``footprint.predict``'s figures of ``arch`` plus ``accuracy`` (None for regression)."""
        from nasopt.deploy.firmware import footprint, reference
        key = tuple(sorted((k, str(v)) for k, v in arch.items()))
        if key not in self._cache:
            model, stored = self.evaluate.compressed(arch)
            plan = reference.build_plan(model, stored, self.space, None,
                                        self.evaluate.calibration_samples)
            out = footprint.predict(plan, self.costs)
            out["accuracy"] = None
            y = self.evaluate._y_val
            if self.profile.metrics.get("accuracy") == "firmware" and not y.is_floating_point():
                x = self.evaluate._x_val.detach().cpu().numpy()
                classes = reference.run(plan, x).argmax(1)
                out["accuracy"] = float((classes == y.cpu().numpy()).mean())
            self._cache[key] = out
        return self._cache[key]

    def __call__(self, arch: Mapping[str, Value], metrics: Metrics) -> Metrics:
        fw = self.figures(arch)
        how = self.profile.metrics
        sources, scores = dict(metrics.sources), dict(metrics.scores)
        changes: dict[str, Any] = {}
        where = f"profile {self.profile.name}, nasopt.deploy.firmware.footprint"
        if how.get("flash") == "firmware":
            scores.update(packed_bytes=float(metrics.compressed_bytes),
                          flash_bytes=float(fw["flash_bytes"]))
            changes["compressed_bytes"] = fw["flash_bytes"]
            sources["compressed_bytes"] = (
                f"flash bytes of the C export (kernel code {fw['code_bytes']} B + weights, "
                f"masks, per-channel and layer records), predicted from the cost table, "
                f"{where}; the packed file: packed_bytes")
        if how.get("sram") == "firmware":
            scores.update(arena_bytes=float(fw["arena_bytes"]),
                          stack_bytes=float(fw["stack_bytes"]))
            changes["sram_bytes"] = fw["ram_bytes"]
            sources["sram_bytes"] = (f"RAM of the C export: arena + row buffer + logits "
                                     f"(static, exact) + stack (deepest chain of -fstack-usage frames), "
                                     f"{where}")
        if fw["accuracy"] is not None and metrics.accuracy is not None:
            scores["float_accuracy"] = float(metrics.accuracy)
            changes["accuracy"] = fw["accuracy"]
            sources["accuracy"] = (f"validation accuracy of the integer firmware model (int8 "
                                   f"activations; bit-exact with the C), profile "
                                   f"{self.profile.name}; the float packed model's: "
                                   f"float_accuracy")
        return dataclasses.replace(metrics, sources=sources, scores=scores, **changes)


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
    if "size" in limits and profile.metrics.get("flash") == "firmware":
        from nasopt.deploy.firmware import footprint
        from nasopt.hardware.profile import costs_path
        floor = footprint.flash_floor(footprint.load_costs(costs_path(profile.source)))
        if floor > limits["size"]:
            raise NasoptError(
                f"impossible budget: size {limits['size']:.0f} B, but the C export of any arch "
                f"needs at least {floor} B of flash on profile {profile.name} (entry points, "
                f"input quantization and one layer's code); raise --max-size to at least "
                f"{floor} B")
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
