"""Read-only inspection commands through the real CLI: a missing storage is one clear error and
creates nothing; trials that did not complete have no feasibility and do not turn integer genes
into floats (table, CSV, JSON); budgets print in the form `nasopt search` prints them; the
`studies` subcommands have descriptions and a documented --format."""
from __future__ import annotations

import argparse
import csv
import io
import json
import re
from pathlib import Path

import optuna
import pytest

from nasopt import api
from nasopt.cli import main as cli
from nasopt.core.errors import NasoptError
from nasopt.core.metrics import Metrics
from nasopt.core.objectives import Constraint, get_objectives
from nasopt.search.loop import run_search
from nasopt.search.study import is_feasible, open_storage, open_study

NO_DB = ("; give the run folder of a search with --run-dir, or its storage with --storage URL")
NO_FILE = "; check the --storage URL, or give the run folder of a search with --run-dir"


def read_only_commands(out: Path) -> list[list[str]]:
    return [["studies", "list"], ["studies", "show", "s"], ["studies", "show", "s", "--pareto"],
            ["studies", "pareto", "s"], ["studies", "compare", "s"],
            ["studies", "plot", "s", "--kind", "pareto", "--out", str(out / "p.png")],
            ["studies", "export", "s", "--to", str(out / "t.csv")],
            ["studies", "report", "s", "--out", str(out / "r.html")],
            ["dashboard", "--port", "0"]]  # a bad port: a regression fails instead of serving


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("index", range(9), ids=[" ".join(a[:2]) for a in
                                                  read_only_commands(Path("."))])
def test_missing_storage_is_one_error_and_creates_nothing(tmp_path, capsys, index):
    argv = read_only_commands(tmp_path)[index]
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [  # (storage options, the file named in the message, what the fix says)
        (["--run-dir", str(tmp_path / "nonexist")], tmp_path / "nonexist" / "studies.db", NO_DB),
        (["--run-dir", str(empty)], empty / "studies.db", NO_DB),
        (["--storage", f"journal:///{tmp_path}/j/studies.log"], tmp_path / "j" / "studies.log",
         NO_FILE),
        (["--storage", f"journal:///{empty}/studies.log"], empty / "studies.log", NO_FILE),
        (["--storage", f"sqlite:///{tmp_path}/q/studies.db"], tmp_path / "q" / "studies.db",
         NO_FILE)]
    for options, missing, fix in cases:
        code = cli.main([*argv, *options])
        out, err = capsys.readouterr()
        assert (code, out) == (2, ""), options
        assert err == f"nasopt: error: no study database at {missing}{fix}\n", options
        assert files_under(tmp_path) == ["empty"], options  # no folder, no file, no lock


def test_postgresql_urls_are_not_checked_locally(tmp_path, capsys):
    code = cli.main(["studies", "list", "--storage", "postgresql://u:pw@127.0.0.1:9/db",
                     "--run-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("nasopt: error: cannot open storage postgresql://u:***@")
    assert files_under(tmp_path) == []


@pytest.fixture(scope="module")
def int_study(tmp_path_factory) -> tuple[str, optuna.Study]:
    """A conv1d study (integer genes such as s1.k, float genes such as sparsity) under a size
    budget: 4 completed trials (2 feasible), then one FAIL and one RUNNING trial without params
    (as a search interrupted before its trial suggested the arch)."""
    space = api.SPACES["conv1d"]((1, 40), 10)
    sizes = iter([100, 300, 500, 700])

    def evaluate(arch):  # noqa: ANN001, ANN202
        size = next(sizes)
        return Metrics(accuracy=size / 1000, params=size // 4, macs=size, float_bytes=size,
                       compressed_bytes=size, nonzero_params=size // 4)

    url = f"sqlite:///{tmp_path_factory.mktemp('ints')}/studies.db"
    study = open_study(open_storage(url), "s",
                       {"space": space.describe(), "objectives": ["accuracy", "size"],
                        "budgets": {"size": 400.0}}, ["maximize", "minimize"],
                       sampler=optuna.samplers.RandomSampler(seed=1))
    run_search(study, space, evaluate, get_objectives(["accuracy", "size"]), trials=4,
               show_progress=False, trial_attrs={"strategy": "random", "seed": 0},
               constraints=[Constraint("size", 400.0)])
    plain = optuna.load_study(study_name="s", storage=url)  # no heartbeat: ask/tell by hand
    plain.tell(plain.ask(), state=optuna.trial.TrialState.FAIL)
    plain.ask()  # left RUNNING
    return url, plain


INT_GENES = ("s1.k", "s1.width", "s2.depth", "head.bits")


def cli_out(capsys, *argv: str) -> str:
    assert cli.main(list(argv)) == 0
    return capsys.readouterr().out


def test_show_table_fail_row_has_no_feasibility_and_integer_genes(int_study, capsys):
    url, study = int_study
    lines = cli_out(capsys, "studies", "show", "s", "--storage", url).splitlines()
    header, rows = lines[0].split(), [dict(zip(lines[0].split(), line.split()))
                                      for line in lines[1:]]
    assert len(rows) == 6 and all(len(line.split()) == len(header) for line in lines)
    assert [r["state"] for r in rows] == ["COMPLETE"] * 4 + ["FAIL", "RUNNING"]
    assert [r["feasible"] for r in rows] == ["True", "True", "False", "False", "-", "-"]
    for row, t in zip(rows, study.trials[:4]):
        assert [row[g] for g in INT_GENES] == [str(t.params[g]) for g in INT_GENES]
        assert row["sparsity"] == f"{t.params['sparsity']:.4f}"  # a float gene stays a float
    assert all(rows[i][g] == "-" for i in (4, 5) for g in INT_GENES)


def test_csv_and_json_fail_row_has_no_feasibility_and_integer_genes(int_study, capsys,
                                                                    tmp_path):
    url, study = int_study
    expected = [str(is_feasible(t)) for t in study.trials[:4]] + ["", ""]
    cli_out(capsys, "studies", "export", "s", "--storage", url, "--to", str(tmp_path / "t.csv"))
    cli_out(capsys, "studies", "export", "s", "--storage", url, "--to", str(tmp_path / "t.json"))
    for text in (cli_out(capsys, "studies", "show", "s", "--storage", url, "--format", "csv"),
                 (tmp_path / "t.csv").read_text()):
        rows = list(csv.DictReader(io.StringIO(text)))
        assert [r["feasible"] for r in rows] == expected == ["True", "True", "False", "False",
                                                             "", ""]
        for row, t in zip(rows, study.trials):
            assert [row[g] for g in INT_GENES] == [str(t.params.get(g, "")) for g in INT_GENES]
    for text in (cli_out(capsys, "studies", "show", "s", "--storage", url, "--format", "json"),
                 (tmp_path / "t.json").read_text()):
        rows = json.loads(text)
        assert [r["feasible"] for r in rows] == [True, True, False, False, None, None]
        for row, t in zip(rows, study.trials):
            values = [row[g] for g in INT_GENES]
            assert values == [t.params.get(g) for g in INT_GENES]
            assert all(type(v) is int for v in values) or t.state.name != "COMPLETE"


def test_pareto_prints_integer_genes(int_study, capsys):
    url, study = int_study
    front = [t for t in study.trials[:2]][::-1]  # feasible: sizes 100, 300; best accuracy first
    lines = cli_out(capsys, "studies", "pareto", "s", "--storage", url).splitlines()
    rows = [dict(zip(lines[0].split(), line.split())) for line in lines[1:]]
    assert [int(r["trial"]) for r in rows] == [t.number for t in front]
    for row, t in zip(rows, front):
        assert [row[g] for g in INT_GENES] == [str(t.params[g]) for g in INT_GENES]
    rows = list(csv.DictReader(io.StringIO(cli_out(capsys, "studies", "pareto", "s",
                                                   "--storage", url, "--format", "csv"))))
    assert [[r[g] for g in INT_GENES] for r in rows] == [[str(t.params[g]) for g in INT_GENES]
                                                         for t in front]
    rows = json.loads(cli_out(capsys, "studies", "pareto", "s", "--storage", url, "--format",
                              "json"))
    assert [[r[g] for g in INT_GENES] for r in rows] == [[t.params[g] for g in INT_GENES]
                                                         for t in front]


def test_pareto_shows_budgets_as_the_search_does(tmp_path, capsys):
    search = cli_out(capsys, "search", "--space", "nb201", "--table", "--trials", "3",
                     "--quiet", "--run-dir", str(tmp_path), "--study", "tiny", "--max-size",
                     "10B", "--max-params", "800k")
    pareto = cli_out(capsys, "studies", "pareto", "tiny", "--run-dir", str(tmp_path))
    shown = [re.search(r"meets the budgets (\{[^}]*\})", text).group(1)
             for text in (search, pareto)]
    assert shown == ["{'size': '10B', 'params': '800k'}"] * 2


def subparser(*names: str) -> argparse.ArgumentParser:
    parser = cli.build_parser()
    for name in names:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser


@pytest.mark.parametrize("command", ["list", "show", "pareto", "compare"])
def test_studies_subcommands_are_described(command):
    parser = subparser("studies", command)
    assert parser.description and len(parser.description) > 30
    fmt = next(a for a in parser._actions if "--format" in a.option_strings)
    assert fmt.help and "csv" in fmt.help.lower() and "json" in fmt.help.lower()


def test_an_existing_sqlite_file_with_url_parameters_is_found(tmp_path):
    from nasopt.search.study import resolve_storage
    db = tmp_path / "s.db"
    url = f"sqlite:///{db}?timeout=30"
    with pytest.raises(NasoptError, match="no study database"):
        resolve_storage(url, tmp_path, must_exist=True)
    db.write_bytes(b"")
    assert resolve_storage(url, tmp_path, must_exist=True) == url


def test_studies_list_names_the_table_of_a_tabular_study(tmp_path, capsys):
    assert cli.main(["search", "--space", "nb201", "--table", "--trials", "3", "--study", "t",
                     "--quiet", "--run-dir", str(tmp_path)]) == 0
    capsys.readouterr()
    assert cli.main(["studies", "list", "--format", "json", "--run-dir", str(tmp_path)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["study"], r["space"], r["dataset"], r["complete"]) for r in rows] == [
        ("t", "nb201", "table nb201_cifar10.csv.gz", 3)]
