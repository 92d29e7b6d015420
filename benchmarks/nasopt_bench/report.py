"""Shared pieces of benchmark reports: the machine they ran on, markdown tables."""
from __future__ import annotations

import os
import platform
import sys
from collections.abc import Sequence
from datetime import datetime, timezone

import torch


def machine() -> str:
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"Python {sys.version.split()[0]}, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def fmt(v: object) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def cell(text: object) -> str:
    """Text safe inside a markdown table cell (pipes escaped, one line)."""
    return str(text).replace("|", "\\|").replace("\n", " ")


class LoadSampler:
    """The machine's 1-minute load average every ``every`` seconds while a benchmark runs (a
    context manager), and the sentence a report says about it: timings taken while other jobs
    shared the cores are upper bounds."""

    def __init__(self, every: float = 5.0, busy: float | None = None):
        import threading
        self.every = every
        #: above this 1-minute load the cores were shared (the benchmark itself counts ~1)
        self.busy = (os.cpu_count() or 1) + 0.5 if busy is None else busy
        self.samples: list[float] = [os.getloadavg()[0]]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.samples.append(os.getloadavg()[0])

    def start(self) -> "LoadSampler":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(os.getloadavg()[0])

    def __enter__(self) -> "LoadSampler":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def shared(self) -> bool:
        return max(self.samples) > self.busy

    def note(self) -> str:
        share = sum(x > self.busy for x in self.samples) / len(self.samples)
        head = (f"1-minute load average sampled every {self.every:.0f} s: mean "
                f"{sum(self.samples) / len(self.samples):.1f}, max {max(self.samples):.1f} on "
                f"{os.cpu_count()} cores")
        if self.shared:
            return (f"{head}; above {self.busy:.1f} in {share:.0%} of the samples: **other jobs "
                    f"shared the cores**, so wall times are upper bounds.")
        return f"{head}: the cores were not shared (wall times are this machine's)."
