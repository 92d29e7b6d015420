"""Multi-channel 1-D sensor signals, the typical microcontroller task: writes a synthetic 3-axis
accelerometer data file that nasopt's `conv1d` space searches as it is.

    python examples/accelerometer_signals.py accel.npz
    nasopt search --space conv1d --dataset accel.npz --max-size 4KB --trials 50

Each sample is (3 axes, 64 time steps); the four classes are gestures: a shake along x, along y,
along z, or a circle (x and y out of phase). The file holds ``layout="signals"``, which tells
nasopt that x is shaped (N, channels, length) rather than (N, height, width) images.
"""
from __future__ import annotations

import sys

import numpy as np


def make(n: int = 1200, length: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    t = np.linspace(0, 1, length)
    y = np.arange(n) % 4
    x = rng.normal(scale=0.3, size=(n, 3, length))
    freq = rng.uniform(2, 5, size=n)
    phase = rng.uniform(0, 2 * np.pi, size=n)
    wave = np.sin(2 * np.pi * freq[:, None] * t + phase[:, None])
    for axis in range(3):
        x[y == axis, axis] += wave[y == axis]
    circle = y == 3
    x[circle, 0] += wave[circle]
    x[circle, 1] += np.cos(2 * np.pi * freq[circle, None] * t + phase[circle, None])
    x[:, 2] += 1.0  # gravity
    return x.astype(np.float32), y


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "accel.npz"
    x, y = make()
    np.savez(out, x=x, y=y, layout="signals")
    print(f"wrote {out}: x {x.shape} (samples, axes, time steps), {len(set(y.tolist()))} classes")
