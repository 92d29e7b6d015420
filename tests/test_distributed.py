"""Data-parallel supernet training under torchrun (2 processes, gloo on CPU): both ranks end
with identical weights, rank 0's checkpoint holds them, and `nasopt search` reuses it."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from nasopt import checkpoint, distributed

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--space", "conv1d", "--dataset", "mnist1d", "--set", "supernet.epochs=2",
        "--set", "supernet.warmup_epochs=1", "--set", "supernet.n_random=1",
        "--set", "supernet.batch_size=256",
        *[f"--restrict=s{i}.{g}" for i in (1, 2, 3) for g in ("depth=1,2", "k=3,5",
                                                              "width=8,16")]]


def test_two_ranks_end_with_identical_weights(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--standalone", "-m", "nasopt.cli", "train-supernet", *TINY,
         "--run-dir", "runs", "--device", "cpu", "--quiet"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = re.findall(r"rank (\d)/2: supernet (\S+) weights sha256 ([0-9a-f]{64})", proc.stdout)
    assert sorted(r for r, _, _ in lines) == ["0", "1"], proc.stdout
    hashes = {h for _, _, h in lines}
    assert len(hashes) == 1, lines  # identical weights on both ranks
    path = tmp_path / lines[0][1]
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no partial left, one file
    state = checkpoint.load(path)
    assert state["world_size"] == 2
    assert distributed.state_hash(state["net"]) == hashes.pop()  # rank 0 wrote what they hold
    # a search with the same settings reuses the data-parallel checkpoint
    proc = subprocess.run([sys.executable, "-m", "nasopt.cli", "search", *TINY, "--trials", "2",
                           "--run-dir", "runs", "--device", "cpu"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"reusing trained supernet {lines[0][1]}" in proc.stderr
