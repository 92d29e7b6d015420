"""Objectives: named functions of Metrics with an optimisation direction."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .errors import NasoptError
from .metrics import Metrics


@dataclass(frozen=True)
class Objective:
    name: str
    direction: str  # "maximize" | "minimize"
    value: Callable[[Metrics], float]
    description: str


OBJECTIVES: dict[str, Objective] = {o.name: o for o in (
    Objective("accuracy", "maximize", lambda m: m.accuracy, "validation accuracy"),
    Objective("size", "minimize", lambda m: float(m.compressed_bytes),
              "bytes of the packed compressed model file"),
    Objective("float_size", "minimize", lambda m: float(m.float_bytes),
              "bytes of the uncompressed weights as float32"),
    Objective("params", "minimize", lambda m: float(m.params), "learnable parameters"),
    Objective("macs", "minimize", lambda m: float(m.macs), "multiply-accumulates per sample"),
)}


def get_objectives(names: Sequence[str]) -> list[Objective]:
    unknown = [n for n in names if n not in OBJECTIVES]
    if unknown or not names:
        raise NasoptError(f"unknown objective(s) {unknown}; choose from {', '.join(OBJECTIVES)}")
    if len(set(names)) != len(names):
        raise NasoptError(f"objectives {list(names)} repeat a name; list each once")
    return [OBJECTIVES[n] for n in names]
