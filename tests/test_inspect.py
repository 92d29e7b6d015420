"""Study inspection: `nasopt studies pareto | compare | plot | export | report`, the typed data
frames of the API, and `nasopt dashboard` (a real optuna-dashboard server, queried over HTTP).

The studies are real NAS-Bench-201 searches in tabular mode (seconds): one filled by two
strategies under a params budget, one with an impossible budget, one without budgets."""
from __future__ import annotations

import base64
import io
import json
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pandas as pd
import pytest
from PIL import Image

from nasopt import api
from nasopt.cli import main as cli
from nasopt.core.objectives import hypervolume
from nasopt.search.study import load_study, open_storage

A, NONE, C = "two-strategies", "impossible", "no-budget"
BUDGET = 800_000  # params
HALF = 7  # trials of each strategy in study A


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("inspect")
    base = ["search", "--space", "nb201", "--table", "--quiet", "--run-dir", str(root),
            "--objectives", "accuracy,params"]
    for args in ([*base, "--study", A, "--max-params", "800k", "--strategy", "random",
                  "--trials", str(HALF)],
                 [*base, "--study", A, "--max-params", "800k", "--strategy", "tpe",
                  "--trials", str(2 * HALF)],
                 [*base, "--study", NONE, "--max-params", "1k", "--strategy", "random",
                  "--trials", "3"],
                 [*base, "--study", C, "--strategy", "evolution", "--trials", "6"]):
        assert cli.main(args) == 0
    return root


@pytest.fixture(scope="module")
def studies(run_dir) -> dict[str, optuna.Study]:
    storage = open_storage(f"sqlite:///{run_dir}/studies.db")
    return {name: load_study(storage, name) for name in (A, NONE, C)}


def nasopt(run_dir: Path, capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main([*args, "--run-dir", str(run_dir)])
    out, err = capsys.readouterr()
    return code, out, err


def feasible_front(study: optuna.Study) -> set[frozenset]:
    """The non-dominated feasible archs, computed here from the raw trials."""
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE
            and all(v <= 0 for v in t.constraints.values())]
    points = [(t.user_attrs["metrics"]["accuracy"], t.user_attrs["metrics"]["params"], t)
              for t in done]
    front = {frozenset(t.params.items()) for a, p, t in points
             if not any(a2 >= a and p2 <= p and (a2, p2) != (a, p) for a2, p2, _ in points)}
    return front


def genes_of(frame: pd.DataFrame) -> set[frozenset]:
    genes = ["e1_0", "e2_0", "e2_1", "e3_0", "e3_1", "e3_2"]
    return {frozenset(zip(genes, row)) for row in frame[genes].itertuples(index=False)}


def test_api_frames_are_flat_and_typed(studies):
    frame = api.trials(studies[A])
    assert len(frame) == 2 * HALF and frame["trial"].tolist() == list(range(2 * HALF))
    types = frame.dtypes.astype(str).to_dict()
    assert types["trial"] == "int64" and types["accuracy"] == "float64"
    assert types["params"] == types["macs"] == types["compressed_bytes"] == "Int64"
    assert types["pareto"] == "bool" and types["feasible"] == "boolean"  # empty: not complete
    assert types["constraint.params"] == "float64" and types["e1_0"] == "string"
    assert types["strategy"] == "string"
    assert not any(isinstance(v, (dict, list)) for v in frame.to_numpy().ravel())
    assert frame["strategy"].tolist() == ["random"] * HALF + ["tpe"] * HALF
    for t in studies[A].trials:
        row = frame.loc[t.number]
        assert row["params"] == t.user_attrs["metrics"]["params"]
        assert row["constraint.params"] == pytest.approx(row["params"] - BUDGET)
        assert row["accuracy"] == t.values[0]
    assert (frame["feasible"] == (frame["params"] <= BUDGET)).all()


def test_pareto_is_the_feasible_non_dominated_set(studies, run_dir, capsys):
    front = api.pareto(studies[A])
    assert genes_of(front) == feasible_front(studies[A]) and len(front) == len(genes_of(front))
    assert (front["params"] <= BUDGET).all()
    assert front["accuracy"].is_monotonic_decreasing
    assert {"state", "pareto", "feasible"}.isdisjoint(front.columns)
    numbers = front["trial"].tolist()

    code, out, _ = nasopt(run_dir, capsys, "studies", "pareto", A, "--format", "json")
    rows = json.loads(out)
    assert code == 0 and [r["trial"] for r in rows] == numbers
    assert all(r["constraint.params"] <= 0 and "e3_2" in r and "macs" in r for r in rows)
    code, out, _ = nasopt(run_dir, capsys, "studies", "pareto", A, "--format", "csv")
    csv = pd.read_csv(io.StringIO(out))
    assert code == 0 and csv["trial"].tolist() == numbers
    assert csv["accuracy"].tolist() == pytest.approx(front["accuracy"].tolist())
    code, out, _ = nasopt(run_dir, capsys, "studies", "pareto", A)
    lines = out.strip().splitlines()
    assert code == 0 and lines[0].split()[:3] == ["trial", "strategy", "accuracy"]
    assert [int(line.split()[0]) for line in lines[1:]] == numbers


def test_pareto_without_a_feasible_trial_names_the_closest(studies, run_dir, capsys):
    closest = min(studies[NONE].trials, key=lambda t: t.constraints["params"]).number
    code, out, _ = nasopt(run_dir, capsys, "studies", "pareto", NONE)
    assert code == 0 and "no completed trial" in out and f"the closest is trial {closest}" in out
    assert int(out.strip().splitlines()[-1].split()[0]) == closest
    code, out, err = nasopt(run_dir, capsys, "studies", "pareto", NONE, "--format", "json")
    assert code == 0 and json.loads(out) == [] and f"closest is trial {closest}" in err


def test_compare_studies_and_strategies(studies, run_dir, capsys):
    code, out, _ = nasopt(run_dir, capsys, "studies", "compare", A, C, "--format", "json")
    rows = json.loads(out)
    assert code == 0
    assert [(r["study"], r["strategy"]) for r in rows] == [
        (A, "random"), (A, "tpe"), (A, "(all)"), (C, "evolution")]
    # no budget shared by both studies: the reference is the largest params among their trials
    reference = max(t.user_attrs["metrics"]["params"] for s in (A, C) for t in studies[s].trials)
    groups = {(A, "random"): studies[A].trials[:HALF], (A, "tpe"): studies[A].trials[HALF:],
              (A, "(all)"): studies[A].trials, (C, "evolution"): studies[C].trials}
    for r in rows:
        trials = groups[(r["study"], r["strategy"])]
        feasible = [t for t in trials if all(v <= 0 for v in t.constraints.values())]
        accs = [t.user_attrs["metrics"]["accuracy"] for t in trials]
        assert r["trials"] == len(trials) and r["failed"] == 0
        assert r["feasible"] == len(feasible)
        assert r["best_accuracy"] == pytest.approx(max(accs))
        assert r["best_accuracy[params<=800k]"] == pytest.approx(max(
            t.user_attrs["metrics"]["accuracy"] for t in trials
            if t.user_attrs["metrics"]["params"] <= BUDGET))
        points = [(t.user_attrs["metrics"]["accuracy"], t.user_attrs["metrics"]["params"])
                  for t in feasible]
        assert r["hypervolume"] == pytest.approx(hypervolume(points, reference))
        assert 0 < r["hypervolume"] < 1
    # one study alone: its budget is the reference; a given reference wins
    frame = api.compare([studies[A]])
    assert "800k (the studies' budget)" in frame.attrs["hypervolume"]
    points = [(t.user_attrs["metrics"]["accuracy"], t.user_attrs["metrics"]["params"])
              for t in studies[A].trials if t.constraints["params"] <= 0]
    assert frame["hypervolume"].iloc[-1] == pytest.approx(hypervolume(points, BUDGET))
    code, out, _ = nasopt(run_dir, capsys, "studies", "compare", A, "--hv-reference", "1M",
                          "--format", "csv")
    csv = pd.read_csv(io.StringIO(out))
    assert code == 0 and csv["hypervolume"].iloc[-1] == pytest.approx(hypervolume(points, 1e6))
    code, out, _ = nasopt(run_dir, capsys, "studies", "compare", A, C)
    assert code == 0 and out.count("\n") == 6 and "reference point accuracy 0 at params" in out


def test_export_all_trials(studies, run_dir, tmp_path, capsys):
    path = tmp_path / "trials.csv"
    code, out, _ = nasopt(run_dir, capsys, "studies", "export", A, "--to", str(path))
    assert code == 0 and f"{2 * HALF} trials" in out
    csv = pd.read_csv(path)
    assert len(csv) == 2 * HALF and {"trial", "strategy", "accuracy", "params", "macs",
                               "constraint.params", "e1_0", "arch", "seed",
                               "duration_s"} <= set(csv.columns)
    assert json.loads(csv["arch"][3]) == studies[A].trials[3].params
    assert csv["constraint.params"].tolist() == pytest.approx((csv["params"] - BUDGET).tolist())
    before = path.read_bytes()
    code, _, err = nasopt(run_dir, capsys, "studies", "export", C, "--to", str(path))
    assert code == 2 and "--force" in err and path.read_bytes() == before  # nothing overwritten
    as_json = tmp_path / "trials.json"
    as_json.write_text("keep")
    code, _, _ = nasopt(run_dir, capsys, "studies", "export", A, "--to", str(as_json), "--force")
    records = json.loads(as_json.read_text())
    assert code == 0 and len(records) == 2 * HALF
    assert records[5]["e3_2"] == studies[A].trials[5].params["e3_2"]
    assert records[5]["params"] == studies[A].trials[5].user_attrs["metrics"]["params"]
    code, _, err = nasopt(run_dir, capsys, "studies", "export", A, "--to", str(tmp_path / "x.xlsx"))
    assert code == 2 and ".csv or .json" in err


def assert_png(data: bytes, min_colors: int = 50) -> None:
    image = Image.open(io.BytesIO(data))
    image.verify()
    image = Image.open(io.BytesIO(data)).convert("RGB")
    assert image.format is None or image.format == "PNG"
    assert image.width > 300 and image.height > 150
    assert len(image.getcolors(maxcolors=1 << 20)) >= min_colors  # drawn, not blank


@pytest.mark.parametrize("kind", ["pareto", "hypervolume", "importance"])
def test_plots_are_png(run_dir, tmp_path, capsys, kind):
    out = tmp_path / f"{kind}.png"
    code, text, _ = nasopt(run_dir, capsys, "studies", "plot", A, "--kind", kind, "--out",
                           str(out))
    assert code == 0 and f"wrote {out}" in text and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert_png(out.read_bytes())


def test_importance_is_seeded_and_sums_to_one(studies):
    first, again = api.importance(studies[A]), api.importance(studies[A])
    assert first.sum() == pytest.approx(1.0) and set(first.index) == set(studies[A].trials[0].params)
    assert first.equals(again)


def test_html_report_is_self_contained(studies, run_dir, tmp_path, capsys):
    out = tmp_path / "report.html"
    code, _, _ = nasopt(run_dir, capsys, "studies", "report", A, "--out", str(out))
    html = out.read_text()
    assert code == 0 and html.startswith("<!DOCTYPE html>")
    assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", html, re.I)
    sources = re.findall(r'(?:src|href)="([^"]*)"', html)
    assert len(sources) == 3 and all(s.startswith("data:image/png;base64,") for s in sources)
    for s in sources:
        assert_png(base64.b64decode(s.split(",", 1)[1]))
    assert "<script" not in html and "@import" not in html and "url(" not in html
    assert "params &lt;= 800k" in html and f"random (seed 0): {HALF}; tpe (seed 0): {HALF}" in html
    for number in api.pareto(studies[A])["trial"]:
        assert f"<td>{number}</td>" in html
    assert f"nasopt studies pareto {A}" in html
    from nasopt.inspection import report_html
    shown = report_html.render(studies[A], "postgresql://nasopt:s3cret@db.example/nasopt")
    assert "s3cret" not in shown and "postgresql://nasopt:***@" in shown


def test_unknown_study_is_one_clear_error(run_dir, capsys, tmp_path):
    for args in (["studies", "pareto", "nope"], ["studies", "compare", A, "nope"],
                 ["studies", "plot", "nope", "--kind", "pareto", "--out", "x.png"],
                 ["studies", "export", "nope", "--to", "x.csv"],
                 ["studies", "report", "nope", "--out", "x.html"]):
        code, out, err = nasopt(run_dir, capsys, *args)
        assert code == 2 and err.startswith("nasopt: error: no study named 'nope'"), args
        assert A in err  # the known studies are named
    proc = subprocess.run([sys.executable, "-m", "nasopt.cli", "studies", "compare", "nope",
                           "--run-dir", str(run_dir)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    code, _, err = nasopt(run_dir, capsys, "studies", "plot", A, "--kind", "pareto", "--out",
                          str(tmp_path / "p.jpg"))
    assert code == 2 and "ending in .png" in err


def test_dashboard_errors_mask_passwords(tmp_path, capsys):
    code = cli.main(["dashboard", "--storage", "postgresql://nasopt:s3cret@127.0.0.1:1/db"])
    err = capsys.readouterr().err
    assert code == 2 and "cannot open storage" in err and "s3cret" not in err and "***" in err
    code = cli.main(["dashboard", "--run-dir", str(tmp_path / "empty")])
    assert code == 2 and "no study database" in capsys.readouterr().err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str) -> dict:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback, no proxy
    with opener.open(url, timeout=10) as response:
        return json.loads(response.read())


def listening_addresses(port: int) -> set[str]:
    """Local addresses of the sockets listening on ``port`` (from /proc/net/tcp)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if int(hex_port, 16) == port and state == "0A":
            found.add(".".join(str(int(address[i:i + 2], 16)) for i in (6, 4, 2, 0)))
    return found


def test_dashboard_serves_user_attrs_on_loopback(studies, run_dir):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "nasopt.cli", "dashboard", "--run-dir",
                             str(run_dir), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, summaries = time.monotonic() + 90, None
        while summaries is None:
            assert proc.poll() is None, proc.stdout.read()
            try:
                summaries = get_json(f"http://127.0.0.1:{port}/api/studies")["study_summaries"]
            except OSError:
                assert time.monotonic() < deadline, "the dashboard did not start in 90 s"
                time.sleep(0.5)
        ids = {s["study_name"]: s["study_id"] for s in summaries}
        assert set(ids) == {A, NONE, C}
        detail = get_json(f"http://127.0.0.1:{port}/api/studies/{ids[A]}?after=0")
        trials = sorted(detail["trials"], key=lambda t: t["number"])
        assert len(trials) == 2 * HALF
        for served, t in zip(trials, studies[A].trials):
            attrs = {a["key"]: a["value"] for a in served["user_attrs"]}
            assert json.loads(attrs["arch"]) == t.params
            assert json.loads(attrs["metrics"])["params"] == t.user_attrs["metrics"]["params"]
            assert json.loads(attrs["constraints"]) == {
                "params": pytest.approx(t.user_attrs["metrics"]["params"] - BUDGET)}
            assert attrs["strategy"] == t.user_attrs["strategy"]
        if Path("/proc/net/tcp").exists():
            assert listening_addresses(port) == {"127.0.0.1"}
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert f"http://127.0.0.1:{port}/dashboard" in out


def test_failed_trials_keep_the_frames_typed(tmp_path, capsys):
    """Trials that failed before measuring have empty metric cells; they count as failed."""
    from nasopt.core.metrics import Metrics
    from nasopt.core.objectives import Constraint, get_objectives
    from nasopt.search.loop import run_search
    from nasopt.search.study import open_study

    space = api.SPACES["conv1d"]((1, 40), 10)
    calls = {"n": 0}

    def flaky(arch):  # noqa: ANN001, ANN202
        calls["n"] += 1
        if calls["n"] in (2, 5):
            raise RuntimeError("boom")
        size = 100 * calls["n"]
        return Metrics(accuracy=0.1 * calls["n"], params=size // 4, macs=size,
                       float_bytes=size, compressed_bytes=size, nonzero_params=size // 4)

    url = f"sqlite:///{tmp_path}/s.db"
    study = open_study(open_storage(url), "flaky",
                       {"space": space.describe(), "objectives": ["accuracy", "size"],
                        "budgets": {"size": 450.0}}, ["maximize", "minimize"],
                       sampler=optuna.samplers.RandomSampler(seed=0))
    run_search(study, space, flaky, get_objectives(["accuracy", "size"]), trials=5,
               show_progress=False, trial_attrs={"strategy": "random", "seed": 0},
               constraints=[Constraint("size", 450.0)])
    frame = api.trials(study)
    assert frame["state"].tolist() == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE", "FAIL",
                                       "COMPLETE", "COMPLETE"]
    assert str(frame["compressed_bytes"].dtype) == "Int64"
    assert frame["compressed_bytes"].isna().tolist() == [s == "FAIL" for s in frame["state"]]
    assert frame["error"].tolist()[1] == "RuntimeError: boom"
    # feasible: size <= 450 -> calls 1, 3, 4 (sizes 100, 300, 400; accuracy grows with size)
    assert api.pareto(study)["compressed_bytes"].tolist() == [400, 300, 100]
    row = api.compare([study]).iloc[0]
    assert (row["trials"], row["failed"], row["feasible"]) == (5, 2, 3)
    assert row["best_accuracy"] == pytest.approx(0.7)
    assert row["best_accuracy[size<=450B]"] == pytest.approx(0.4)
    # reference: the study's size budget, 450 B
    assert row["hypervolume"] == pytest.approx(hypervolume([(0.1, 100), (0.3, 300),
                                                            (0.4, 400)], 450))
    code = cli.main(["studies", "report", "flaky", "--storage", url, "--out",
                     str(tmp_path / "r.html")])
    assert code == 0 and "2 failed" in (tmp_path / "r.html").read_text()
