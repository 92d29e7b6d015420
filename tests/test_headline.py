"""`nasopt bench headline` end to end on a tiny recipe: a real `nasopt run` per seed, the
report's rows are the model cards' figures, and the verdicts follow the targets."""
from __future__ import annotations

import importlib.util
import json
import os
import re

from nasopt.cli import main as cli

TINY = ["--set", "supernet.epochs=2", "--set", "supernet.warmup_epochs=1", "--set",
        "search.trials=30", "--set", "distill.epochs=1", "--set", "finetune.epochs=1"]


def test_headline_report_rows_come_from_the_model_cards(tmp_path, capsys):
    out = tmp_path / "README.md"
    jobs = min(2, len(os.sched_getaffinity(0)))  # seeds in parallel, each on its own core
    assert cli.main(["bench", "headline", "--datasets", "mnist1d", "--seeds", "2",
                     "--jobs", str(jobs),
                     "--evaluations", "0", "--run-root", str(tmp_path / "runs"),
                     "--out", str(out), *TINY]) == 0
    text = out.read_text()
    cards = [json.loads((tmp_path / "runs" / "mnist1d" / f"seed{s}" / "model" /
                         "metrics.json").read_text()) for s in (0, 1)]
    for seed, card in enumerate(cards):
        acc = 100 * card["test_accuracy"]["model.packed via nasopt.load"]
        row = next(line for line in text.splitlines() if line.startswith(f"| {seed} | "))
        assert f"| {card['trial']} | {card['packed_bytes']} |" in row and f"{acc:.2f}" in row
        assert card["config"]["supernet"]["seed"] == seed  # every step's seed is the run's
    if jobs > 1:
        assert "`--jobs 2`" in text
    # the section names the pipelines' torch threads (the config's `threads = 1`), not the
    # bench process's
    assert "each with 1 torch thread(s)." in text
    assert "**median [min, max]**" in text and "fashion-mnist" in text  # named as not run
    # two epochs of supernet training cannot reach 94 %: the verdict says by how much
    assert "**missed** by" in text and "Published baselines" in text
    capsys.readouterr()


def test_headline_refuses_bad_arguments_before_any_pipeline(tmp_path, capsys):
    base = ["bench", "headline", "--datasets", "mnist1d", "--seeds", "1",
            "--run-root", str(tmp_path / "runs"), "--out", str(tmp_path / "README.md")]
    (tmp_path / "runs" / "mnist1d" / "seed0").mkdir(parents=True)
    assert cli.main(base) == 2
    assert "seed0 exists" in capsys.readouterr().err
    (tmp_path / "runs" / "mnist1d" / "seed0").rmdir()
    assert cli.main([*base, "--set", "search.seed=3"]) == 2
    assert "sets every step's seed" in capsys.readouterr().err
    assert cli.main([*base, "--nni", "nni-evo"]) == 2
    assert "--nni takes" in capsys.readouterr().err
    assert cli.main([*base, "--jobs", "0"]) == 2
    assert "--jobs must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "mnist1d").exists() or not any(
        (tmp_path / "runs" / "mnist1d").iterdir())  # nothing ran


def test_a_failed_pipeline_keeps_the_finished_ones_in_the_report(tmp_path, capsys):
    import argparse
    import time

    import pytest

    from nasopt_bench import headline
    from nasopt.core.errors import NasoptError

    broken = tmp_path / "broken.toml"
    broken.write_text('[data]\ndataset = "no-such-dataset"\n')
    parser = argparse.ArgumentParser()
    headline.add_arguments(parser)
    out = tmp_path / "README.md"
    # with NNI installed (CI requires it), a tiny NNI comparison runs too
    nni = importlib.util.find_spec("nni") is not None or bool(os.environ.get("NASOPT_REQUIRE_NNI"))
    compare = ["--evaluations", "3", "--ours", "staged", "--nni", "nni-random"] if nni else \
        ["--evaluations", "0"]
    args = parser.parse_args(["--seeds", "1", *compare, "--run-root", str(tmp_path / "runs"),
                              "--out", str(out), *TINY])
    targets = [headline.TARGETS["mnist1d"],
               headline.Target("broken", str(broken), 1, 0.0, 1, (), "none")]
    with pytest.raises(NasoptError, match=r"1 pipeline\(s\) failed \(broken seed 0;.*"
                                          "has the finished ones"):
        headline._report(targets, args, lambda s: None, time.perf_counter())
    text = out.read_text()
    card = json.loads((tmp_path / "runs" / "mnist1d" / "seed0" / "model" /
                       "metrics.json").read_text())
    row = next(line for line in text.splitlines() if line.startswith("| 0 | "))
    assert f"| {card['trial']} | {card['packed_bytes']} |" in row  # the finished run is there
    failures = text[text.index("## Failed pipelines"):]
    assert "broken seed 0" in failures and "no-such-dataset" in failures
    if nni:
        assert "## Our strategy against NNI's" in text
        assert re.search(r"\| nni-random \| 3 \| 1 \| 0\.\d{4} \|", text), text
    capsys.readouterr()
