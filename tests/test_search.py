"""End to end through the CLI on digits, plus the search loop's handling of failing trials."""
from __future__ import annotations

import json
import math

import optuna
import pytest

from nasopt import api
from nasopt.cli import main as cli
from nasopt.core.metrics import Metrics
from nasopt.core.objectives import get_objectives
from nasopt.search.loop import run_search
from nasopt.search.study import load_study, open_storage, pareto_numbers
from nasopt.supernet.train import accuracy

FAST = ["--set", "supernet.epochs=2", "--set", "supernet.warmup_epochs=1",
        "--set", "supernet.n_random=1",
        # a small sub-space keeps the suite fast (depthwise-conv backward is slow on CPU)
        *[arg for s in (1, 2, 3) for arg in ("--restrict", f"s{s}.expand=2", "--restrict",
                                             f"s{s}.k=3,5")]]


def search(tmp_path, *extra: str) -> int:
    return cli.main(["search", "--space", "mobilenet", "--dataset", "digits", "--quiet",
                     "--run-dir", str(tmp_path), *FAST, *extra])


def test_search_export_load_end_to_end(tmp_path, capsys):
    assert search(tmp_path, "--trials", "6", "--strategy", "nsga2") == 0
    out = capsys.readouterr().out
    assert "6 completed trials" in out and "Pareto front:" in out

    storage = open_storage(f"sqlite:///{tmp_path}/studies.db")
    study = load_study(storage, "mobilenet-digits")
    listed = api.studies(run_dir=tmp_path)
    assert listed["study"].tolist() == ["mobilenet-digits"] and listed["complete"].tolist() == [6]
    assert len(api.open_study("mobilenet-digits", run_dir=tmp_path).trials) == 6
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 6
    front = pareto_numbers(study)
    assert front and front <= {t.number for t in done}
    for t in done:  # params are the arch; metrics are in user attrs; values are the objectives
        assert t.params["s1.expand"] == 2
        assert t.values == [t.user_attrs["metrics"]["accuracy"],
                            t.user_attrs["metrics"]["compressed_bytes"]]

    assert cli.main(["studies", "show", "mobilenet-digits", "--run-dir", str(tmp_path),
                     "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 6 and sum(r["pareto"] for r in rows) == len(front)

    best = max(done, key=lambda t: t.values[0])
    out_dir = tmp_path / "export"
    assert cli.main(["export", "mobilenet-digits", "--trial", str(best.number),
                     "--out", str(out_dir), "--run-dir", str(tmp_path)]) == 0
    assert {p.name for p in out_dir.iterdir()} == {"arch.json", "weights.pt", "model.json",
                                                   "model.packed"}
    assert (out_dir / "model.packed").stat().st_size == best.user_attrs["metrics"]["compressed_bytes"]
    model = api.load(out_dir)  # takes raw samples: the data's preprocessing (/ 16) inside
    data = api.load_dataset("digits")
    raw_val = data.preprocess.raw(data.x_val)
    assert accuracy(model, raw_val, data.y_val) == pytest.approx(best.values[0], abs=1e-9)
    packed_model = api.load(out_dir / "model.packed")
    assert accuracy(packed_model, raw_val, data.y_val) == pytest.approx(best.values[0],
                                                                        abs=1e-9)
    # re-exporting one format into the folder (--force) leaves no stale file of the other
    assert cli.main(["export", "mobilenet-digits", "--trial", str(best.number), "--format",
                     "pytorch", "--out", str(out_dir), "--run-dir", str(tmp_path),
                     "--force"]) == 0
    assert not (out_dir / "model.packed").exists()
    capsys.readouterr()
    assert cli.main(["export", "mobilenet-digits", "--trial", str(best.number), "--out",
                     str(out_dir / "arch.json"), "--run-dir", str(tmp_path)]) == 2
    assert "is a file" in capsys.readouterr().err

    # the same command with a larger budget continues the study instead of starting over
    assert search(tmp_path, "--trials", "8", "--strategy", "tpe") == 0
    study = load_study(storage, "mobilenet-digits")
    assert len(study.trials) == 8
    assert [t.user_attrs["strategy"] for t in study.trials] == ["nsga2"] * 6 + ["tpe"] * 2


def test_same_seed_reproduces_the_same_trials(tmp_path):
    for run in ("a", "b"):
        assert search(tmp_path / run, "--trials", "4", "--seed", "3") == 0
    params = []
    for run in ("a", "b"):
        study = load_study(open_storage(f"sqlite:///{tmp_path / run}/studies.db"),
                           "mobilenet-digits")
        params.append([(t.params, t.values) for t in study.trials])
    assert params[0] == params[1]


def test_failing_trials_are_recorded_and_the_search_goes_on(tmp_path):
    space = api.SPACES["conv1d"]((1, 40), 10)
    calls = {"n": 0}

    def flaky(arch):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")
        acc = math.nan if calls["n"] == 3 else 0.5
        return Metrics(accuracy=acc, params=10, macs=10, float_bytes=40)

    study = optuna.create_study(directions=["maximize", "minimize"],
                                storage=f"sqlite:///{tmp_path}/s.db",
                                sampler=optuna.samplers.RandomSampler(seed=0))
    run_search(study, space, flaky, get_objectives(["accuracy", "size"]), trials=3,
               show_progress=False)
    # failures do not count: the call runs until 3 trials have completed
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE", "FAIL", "FAIL", "COMPLETE", "COMPLETE"]
    assert study.trials[1].user_attrs["error"] == "RuntimeError: boom"
    assert "non-finite" in study.trials[2].user_attrs["error"]
    # the same budget again runs nothing; a larger one tops the study up
    assert run_search(study, space, flaky, get_objectives(["accuracy", "size"]), trials=3,
                      show_progress=False) == 0
    run_search(study, space, flaky, get_objectives(["accuracy", "size"]), trials=4,
               show_progress=False)
    assert [t.state.name for t in study.trials].count("COMPLETE") == 4


def test_a_search_that_only_fails_stops_with_the_reason(tmp_path):
    from nasopt.core.errors import NasoptError
    space = api.SPACES["conv1d"]((1, 40), 10)

    def broken(arch):
        raise RuntimeError("evaluator is broken")

    study = optuna.create_study(directions=["maximize", "minimize"])
    with pytest.raises(NasoptError, match="in a row; the last one: .*evaluator is broken"):
        run_search(study, space, broken, get_objectives(["accuracy", "size"]), trials=5,
                   show_progress=False)
    assert [t.state.name for t in study.trials] == ["FAIL"] * 20


def test_a_busy_cpu_gets_one_line_naming_one_thread():
    import torch

    from nasopt.search.run import cpu_contention
    cpu = torch.device("cpu")
    line = cpu_contention(cpu, threads=2, cores=2, busy=lambda: 1)  # one other busy process
    assert line is not None and "OMP_NUM_THREADS=1" in line and "\n" not in line
    assert cpu_contention(cpu, threads=2, cores=2, busy=lambda: 0) is None  # idle cores
    assert cpu_contention(cpu, threads=1, cores=2, busy=lambda: 3) is None  # one thread already
    assert cpu_contention(cpu, threads=4, cores=8, busy=lambda: 3) is None  # enough free cores
    assert cpu_contention(cpu, threads=8, cores=8, busy=lambda: 3) is not None
    assert cpu_contention(cpu, threads=2, cores=2, busy=lambda: None) is None  # OS does not say
    assert cpu_contention(torch.device("cuda"), threads=2, cores=2, busy=lambda: 2) is None


def test_a_spinning_process_is_counted_as_busy():
    import subprocess
    import sys
    from pathlib import Path

    from nasopt.search.run import busy_others
    if not Path("/proc/loadavg").exists():
        pytest.skip("the count reads Linux's /proc/loadavg")
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        import time
        time.sleep(0.3)  # started and runnable
        assert busy_others() >= 1
    finally:
        spin.kill()
        spin.wait()
