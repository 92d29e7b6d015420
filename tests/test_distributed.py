"""Data-parallel supernet training under torchrun (2 processes, gloo on CPU): both ranks end
with identical weights, rank 0's checkpoint holds them, and `nasopt search` reuses it."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from nasopt.core import checkpoint
from nasopt.supernet import distributed

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


def test_ranks_without_a_shared_file_system_resume_from_rank_0s_checkpoint(tmp_path):
    """Each rank has its own run folder (as on machines without a shared disk): only rank 0's
    holds the partial checkpoint of a killed training. Both ranks resume from it (rank 0 sends
    it), end with identical weights, and only rank 0 writes."""
    import socket

    from nasopt_bench.crash import kill_when

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "nasopt.cli", "train-supernet", *TINY,
           "--set", "supernet.epochs=4", "--device", "cpu", "--quiet"]
    first = subprocess.Popen([*cmd, "--run-dir", "rank0"], cwd=tmp_path, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    folder = tmp_path / "rank0" / "supernets"
    kill_when(first, lambda: any(folder.glob("*.partial.pt")))
    partial = next(folder.glob("*.partial.pt"))
    assert checkpoint.load(partial)["epoch"] < 3  # killed before the end

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ranks = [subprocess.Popen(
        [*cmd, "--run-dir", f"rank{r}"], cwd=tmp_path, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
        env={**env, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}) for r in (0, 1)]
    outs = []
    for proc in ranks:
        try:
            outs.append(proc.communicate(timeout=180))
        except subprocess.TimeoutExpired:  # the ranks disagreed on where to start: they hang
            for p in ranks:
                p.kill()
            raise AssertionError("the ranks hung") from None
        assert proc.returncode == 0, outs[-1][1][-3000:]
    hashes = [re.search(r"weights sha256 ([0-9a-f]{64})", out).group(1) for out, _ in outs]
    assert hashes[0] == hashes[1]
    final = [p for p in folder.iterdir() if not p.name.endswith(".partial.pt")]
    assert len(final) == 1 and not partial.exists()
    assert distributed.state_hash(checkpoint.load(final[0])["net"]) == hashes[0]
    assert not (tmp_path / "rank1").exists() or not any((tmp_path / "rank1").rglob("*.pt"))
