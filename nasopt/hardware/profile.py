"""Hardware profiles: which device a search targets, which metrics are measured, predicted or
counted for it, and which budgets apply.

A profile is a TOML file (shipped ones in ``nasopt/hardware/profiles/``: ``cpu-ort``, ``cpu-ort-int8``,
``mcu``, ``cortex-m4``; a user's one by path, ``--hardware my.toml``)::

    name = "cpu-ort"
    description = "..."
    [runtime]   engine = "onnxruntime" | "none"; dtype = "fp32" | "int8"; threads; warmup;
                repeats (timed runs per window); windows (fast-mode windows needed: latency =
                their lowest median, see nasopt.hardware.latency); max_wait_s; window_pause_ms;
                noise_threshold (relative IQR above which a timing is flagged; half of it
                bounds repeat spread and drift in LUT validation)
    [metrics]   latency = "predicted" | "measured" | "none"; sram / flash = "counted" |
                "firmware" | "none"; accuracy = "float" (default) | "firmware"
    [limits]    latency = "0.3ms"; sram = "32KB"; flash = "64KB"   (all optional)

``flash`` is the packed file's size (the ``size`` budget); ``sram`` the peak activation memory at
the profile's data type (:mod:`nasopt.hardware.memory`); ``latency`` batch-1 latency in ONNX Runtime,
predicted from the look-up table (:mod:`nasopt.hardware.lut`) or measured per arch (:mod:`nasopt.hardware.latency`).
``firmware`` (int8 only) takes the figures of the C export (:mod:`nasopt.deploy.firmware`) on a
Cortex-M4: ``flash`` is then the firmware's flash bytes (the model's code, weights and records,
predicted exactly from the cost table ``<profile>.costs.json`` beside the profile, see
:mod:`nasopt.deploy.firmware.footprint`), so the size objective and ``--max-size`` are flash;
``sram`` its RAM (arena + row buffer + logits + stack); ``accuracy`` the integer
firmware's validation accuracy (the float packed model's stays beside it as ``float_accuracy``).
Unknown keys, wrong types and budgets that are not positive quantities are one clear error each.
"""
from __future__ import annotations

import difflib
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nasopt.core.errors import NasoptError
from nasopt.hardware.memory import DTYPE_BYTES
from nasopt.core.names import check_plain_name
from nasopt.core.objectives import parse_quantity

PROFILE_DIR = Path(__file__).parent / "profiles"
#: profile limit key -> search budget name (objectives.METRIC_OF)
LIMIT_BUDGET = {"latency": "latency", "sram": "sram", "flash": "size"}
_SCHEMA: dict[str, dict[str, type | tuple[type, ...]]] = {
    "": {"name": str, "description": str},
    "runtime": {"engine": str, "dtype": str, "threads": int, "warmup": int, "repeats": int,
                "windows": int, "max_wait_s": (int, float), "window_pause_ms": (int, float),
                "noise_threshold": (int, float)},
    "metrics": {"latency": str, "sram": str, "flash": str, "accuracy": str},
    "limits": {"latency": (str, int, float), "sram": (str, int, float),
               "flash": (str, int, float)},
}
_CHOICES = {"runtime.engine": ("onnxruntime", "none"), "runtime.dtype": tuple(DTYPE_BYTES),
            "metrics.latency": ("predicted", "measured", "none"),
            "metrics.sram": ("counted", "firmware", "none"),
            "metrics.flash": ("counted", "firmware", "none"),
            "metrics.accuracy": ("float", "firmware")}


@dataclass(frozen=True)
class Profile:
    name: str
    description: str = ""
    engine: str = "onnxruntime"
    dtype: str = "fp32"
    threads: int = 1
    warmup: int = 20
    repeats: int = 40
    windows: int = 5
    max_wait_s: float = 10.0
    window_pause_ms: float = 30.0
    noise_threshold: float = 0.10
    metrics: Mapping[str, str] = field(default_factory=lambda: {
        "latency": "predicted", "sram": "counted", "flash": "counted"})
    #: budgets by search budget name (latency in ms, sram and size in bytes)
    limits: Mapping[str, float] = field(default_factory=dict)
    source: str = ""

    @property
    def firmware(self) -> bool:
        """Whether any metric comes from the C export (nasopt.hardware.evaluate.FirmwareFigures)."""
        return "firmware" in self.metrics.values()

    @property
    def has_latency(self) -> bool:
        return self.metrics.get("latency", "none") != "none"

    def describe(self) -> dict[str, Any]:
        """JSON-able record (a study's setup, a LUT file's header)."""
        return {"name": self.name, "engine": self.engine, "dtype": self.dtype,
                "threads": self.threads, "warmup": self.warmup, "repeats": self.repeats,
                "windows": self.windows, "max_wait_s": self.max_wait_s,
                "window_pause_ms": self.window_pause_ms,
                "metrics": dict(self.metrics), "limits": dict(self.limits)}

    def check_budgets(self, budgets: Mapping[str, Any]) -> None:
        """Budgets the profile cannot evaluate are an error (e.g. latency on ``mcu``)."""
        need = {"latency": "latency", "sram": "sram"}
        for budget, metric in need.items():
            if budget in budgets and self.metrics.get(metric, "none") == "none":
                raise NasoptError(f"the {budget} budget needs a profile that provides {metric}, "
                                  f"but profile {self.name!r} has metrics.{metric} = \"none\"; "
                                  f"choose another --hardware profile or drop --max-{budget}")


def costs_path(source: str | Path) -> Path:
    """The Cortex-M4 cost table of the profile file ``source``: ``<stem>.costs.json`` beside it."""
    source = Path(source)
    return source.with_name(f"{source.stem}.costs.json")


def shipped() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))


def load_profile(spec: str | Path) -> Profile:
    """A shipped profile by name, or a TOML file by path."""
    path = Path(spec)
    if not (path.suffix == ".toml" or path.exists()):
        path = PROFILE_DIR / f"{spec}.toml"
        if not path.exists():
            close = difflib.get_close_matches(str(spec), shipped(), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise NasoptError(f"unknown hardware profile {str(spec)!r}{hint}; shipped: "
                              f"{', '.join(shipped())}, or give a path to a .toml file")
    if not path.exists():
        raise NasoptError(f"hardware profile file {path} does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise NasoptError(f"cannot read hardware profile {path}: {exc}") from None
    return profile_from_dict(data, str(path))


def profile_from_dict(data: Mapping[str, Any], source: str = "<dict>") -> Profile:
    """Validate a profile's TOML data (see the module doc)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            if key not in _SCHEMA or key == "":
                _unknown(source, key, [k for k in _SCHEMA if k], "section")
            for sub, v in value.items():
                if sub not in _SCHEMA[key]:
                    _unknown(source, f"{key}.{sub}", [f"{key}.{k}" for k in _SCHEMA[key]], "key")
                flat[f"{key}.{sub}"] = v
        else:
            if key not in _SCHEMA[""]:
                _unknown(source, key, [*_SCHEMA[""], *[k for k in _SCHEMA if k]], "key")
            flat[key] = value
    for key, value in flat.items():
        section, _, name = key.rpartition(".")
        expected = _SCHEMA[section][name]
        if isinstance(value, bool) or not isinstance(value, expected):
            kind = " or ".join(t.__name__ for t in (expected if isinstance(expected, tuple)
                                                     else (expected,)))
            raise NasoptError(f"hardware profile {source}: {key} must be a {kind}, got "
                              f"{value!r}")
        if key in _CHOICES and value not in _CHOICES[key]:
            raise NasoptError(f"hardware profile {source}: {key} = {value!r} is not one of "
                              f"{', '.join(map(repr, _CHOICES[key]))}")
    if "name" not in flat:
        raise NasoptError(f"hardware profile {source}: the top-level key name is missing")
    try:  # the name is part of the latency table's file name (nasopt.hardware.lut.table_path)
        check_plain_name(flat["name"], "name", 'name = "my-board"')
    except NasoptError as exc:
        raise NasoptError(f"hardware profile {source}: {exc}") from None
    for key in ("runtime.threads", "runtime.repeats", "runtime.windows"):
        if key in flat and flat[key] < 1:
            raise NasoptError(f"hardware profile {source}: {key} must be at least 1, got "
                              f"{flat[key]}")
    if (flat.get("runtime.warmup", 0) < 0 or flat.get("runtime.max_wait_s", 1) <= 0
            or flat.get("runtime.noise_threshold", 1) <= 0
            or flat.get("runtime.window_pause_ms", 0) < 0):
        raise NasoptError(f"hardware profile {source}: runtime.warmup and "
                          f"runtime.window_pause_ms must be >= 0, runtime.noise_threshold and "
                          f"runtime.max_wait_s > 0")
    metrics = {m: flat.get(f"metrics.{m}", default) for m, default in
               (("latency", "predicted"), ("sram", "counted"), ("flash", "counted"))}
    if flat.get("metrics.accuracy", "float") != "float":  # the default stays out of the record
        metrics["accuracy"] = flat["metrics.accuracy"]  # (a study's setup compares it)
    engine = flat.get("runtime.engine", "onnxruntime")
    if metrics["latency"] != "none" and engine == "none":
        raise NasoptError(f"hardware profile {source}: metrics.latency = "
                          f"{metrics['latency']!r} needs runtime.engine = \"onnxruntime\" "
                          f"(engine \"none\" runs nothing); set metrics.latency = \"none\"")
    if "firmware" in metrics.values() and flat.get("runtime.dtype", "fp32") != "int8":
        raise NasoptError(f"hardware profile {source}: metrics = \"firmware\" (the C export's "
                          f"integer model) needs runtime.dtype = \"int8\"")
    if "firmware" in metrics.values() and not costs_path(source).exists():
        raise NasoptError(f"hardware profile {source}: metrics = \"firmware\" needs the cost "
                          f"table {costs_path(source)} (write it with python -c 'import json; "
                          f"from nasopt.deploy.firmware import footprint; print(json.dumps("
                          f"footprint.measure_costs()))' > that file)")
    limits: dict[str, float] = {}
    for name, budget in LIMIT_BUDGET.items():
        if f"limits.{name}" in flat:
            try:
                limits[budget] = parse_quantity(flat[f"limits.{name}"], budget)
            except NasoptError as exc:
                raise NasoptError(f"hardware profile {source}: limits.{name}: {exc}") from None
            if metrics[name] == "none":
                raise NasoptError(f"hardware profile {source}: limits.{name} is set but "
                                  f"metrics.{name} = \"none\"")
    return Profile(name=flat["name"], description=flat.get("description", ""), engine=engine,
                   dtype=flat.get("runtime.dtype", "fp32"),
                   threads=flat.get("runtime.threads", 1), warmup=flat.get("runtime.warmup", 20),
                   repeats=flat.get("runtime.repeats", 40),
                   windows=flat.get("runtime.windows", 5),
                   max_wait_s=float(flat.get("runtime.max_wait_s", 10.0)),
                   window_pause_ms=float(flat.get("runtime.window_pause_ms", 30.0)),
                   noise_threshold=float(flat.get("runtime.noise_threshold", 0.10)),
                   metrics=metrics, limits=limits, source=source)


def _unknown(source: str, key: str, known: list[str], what: str) -> None:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise NasoptError(f"hardware profile {source}: unknown {what} {key!r}{hint}; known: "
                      f"{', '.join(known)}")
