"""The supernet check of every supernet search (nasopt.search.sanity): measured after training, stored
in the study's setup, shown by `nasopt search`, `studies show` and the HTML report, and a
warning when the supernet or the search's best trial is near chance."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nasopt.cli import main as cli
from nasopt.search import sanity
from nasopt.search.study import SETUP_ATTR, load_study, open_storage

#: a narrow MobileNet space on digits: its subnets are all close to the largest one, so a
#: supernet trained for 2 epochs scores well above chance on every trial of MILD
NARROW = ["--space", "mobilenet", "--dataset", "digits", "--quiet",
          "--set", "supernet.warmup_epochs=1", "--set", "supernet.n_random=1",
          "--restrict", "stem.width=16", "--restrict", "s1.width=16", "--restrict", "s2.width=32",
          "--restrict", "s3.width=48",
          *[arg for s in (1, 2, 3) for arg in ("--restrict", f"s{s}.expand=2", "--restrict",
                                               f"s{s}.k=3", "--restrict", f"s{s}.depth=1,2")]]
GROUPS = ("stem", "s1", "s2", "s3", "head")
MILD = ["--restrict", "sparsity=0.0",
        *[a for g in GROUPS for a in ("--restrict", f"{g}.bits=8,32")],
        *[a for g in GROUPS[1:] for a in ("--restrict", f"{g}.rank=1.0")]]
#: the harshest options of every compression gene: every trial near chance, with a margin
HARSH = ["--restrict", "sparsity=0.9", *[a for g in GROUPS for a in ("--restrict", f"{g}.bits=2")],
         *[a for g in GROUPS[1:] for a in ("--restrict", f"{g}.rank=0.25")]]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """Three searches: an untrained supernet (0 epochs), a trained one with mild compression,
    and one trained by the same recipe for the harshest compression (a compression-aware
    supernet trains for its space's compression options: another checkpoint)."""
    root = tmp_path_factory.mktemp("sanity")
    base = [*NARROW, "--run-dir", str(root), "--trials", "3"]
    for study, extra in (("untrained", ["--set", "supernet.epochs=0",
                                        "--set", "supernet.warmup_epochs=0", *MILD]),
                         ("trained", ["--set", "supernet.epochs=2", *MILD]),
                         ("harsh", ["--set", "supernet.epochs=2", *HARSH])):
        assert cli.main(["search", *base, "--study", study, *extra]) == 0
    return root


def search_output(run_dir: Path, capsys, study: str, epochs: int, *extra: str) -> str:
    """What a second run of a finished search prints on stderr (the study holds its trials:
    the supernet is reused and the check measured again)."""
    capsys.readouterr()
    assert cli.main(["search", *NARROW, "--run-dir", str(run_dir), "--trials", "3", "--study",
                     study, "--set", f"supernet.epochs={epochs}", *extra]) == 0
    return capsys.readouterr().err


def record(run_dir: Path, study: str) -> dict:
    storage = open_storage(f"sqlite:///{run_dir}/studies.db")
    return load_study(storage, study).user_attrs[SETUP_ATTR]["sanity"]


def test_the_check_is_stored_with_the_study(run_dir):
    for study in ("untrained", "trained", "harsh"):
        r = record(run_dir, study)
        assert set(r) >= {"majority", "largest", "smallest", "smallest_compressed",
                          "val_samples", "supernet_epochs", "compression_genes"}
        assert 0.09 < r["majority"] < 0.12  # digits: ten nearly balanced classes
        assert all(0 <= r[k] <= 1 for k in ("largest", "smallest", "smallest_compressed"))
    trained, harsh = record(run_dir, "trained"), record(run_dir, "harsh")
    # the same recipe for another compression sub-space: float subnets far from chance on both
    for r in (trained, harsh):
        assert r["largest"] > sanity.chance_threshold(r["majority"]) + 0.2
    assert harsh["compression_genes"]["sparsity"] == [0.9]
    assert trained["compression_genes"]["sparsity"] == [0.0]


def test_an_untrained_supernet_is_near_chance_and_says_what_to_try(run_dir, capsys):
    r = record(run_dir, "untrained")
    assert r["supernet_epochs"] == 0 and sanity.supernet_near_chance(r)
    err = search_output(run_dir, capsys, "untrained", 0, "--set", "supernet.warmup_epochs=0",
                        *MILD)
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert any("the supernet is near chance" in w and "--set supernet.epochs=N" in w
               for w in warnings)
    assert any("best trial" in w and "near chance" in w for w in warnings)


def test_a_trained_supernet_gives_no_warning(run_dir, capsys):
    r = record(run_dir, "trained")
    assert r["largest"] > sanity.chance_threshold(r["majority"]) + 0.2
    assert not sanity.supernet_near_chance(r)
    err = search_output(run_dir, capsys, "trained", 2, *MILD)
    assert "warning" not in err


def test_a_front_at_chance_on_a_trained_supernet_advises_restricting_compression(run_dir,
                                                                                  capsys):
    r = record(run_dir, "harsh")
    assert not sanity.supernet_near_chance(r)
    err = search_output(run_dir, capsys, "harsh", 2, *HARSH)
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "best trial" in warnings[0]
    assert "--restrict sparsity=0.0,0.5" in warnings[0] and "stem.bits=8,32" in warnings[0]


def test_the_line_is_printed_unless_quiet(run_dir, capsys):
    capsys.readouterr()
    args = [a for a in NARROW if a != "--quiet"]
    assert cli.main(["search", *args, "--run-dir", str(run_dir), "--trials", "3", "--study",
                     "trained", "--set", "supernet.epochs=2", *MILD]) == 0
    err = capsys.readouterr().err
    assert "supernet check (validation accuracy): largest subnet" in err
    assert "majority class" in err


def test_studies_show_prints_the_check(run_dir, capsys):
    capsys.readouterr()
    assert cli.main(["studies", "show", "untrained", "--run-dir", str(run_dir)]) == 0
    out, err = capsys.readouterr()
    assert "supernet check (validation accuracy)" in out
    assert "warning: the supernet is near chance" in out
    assert cli.main(["studies", "show", "trained", "--run-dir", str(run_dir)]) == 0
    out, _ = capsys.readouterr()
    assert "supernet check" in out and "warning" not in out
    # CSV and JSON stay parseable: the check goes to stderr
    assert cli.main(["studies", "show", "harsh", "--run-dir", str(run_dir), "--format",
                     "csv"]) == 0
    out, err = capsys.readouterr()
    assert "supernet check" not in out and "nasopt: supernet check" in err
    assert "nasopt: warning: the search's best trial" in err


def test_html_report_shows_the_check(run_dir, tmp_path, capsys):
    for study, warned in (("untrained", True), ("trained", False)):
        out = tmp_path / f"{study}.html"
        assert cli.main(["studies", "report", study, "--run-dir", str(run_dir), "--out",
                         str(out)]) == 0
        page = out.read_text()
        assert "Supernet check" in page and "largest subnet" in page
        assert ("near chance" in page) == warned


def test_tabular_studies_have_no_check(tmp_path, capsys):
    assert cli.main(["search", "--space", "nb201", "--table", "--quiet", "--run-dir",
                     str(tmp_path), "--study", "t", "--trials", "2"]) == 0
    capsys.readouterr()
    assert cli.main(["studies", "show", "t", "--run-dir", str(tmp_path)]) == 0
    assert "supernet check" not in capsys.readouterr().out


def test_thresholds_and_advice():
    assert sanity.chance_threshold(0.1) == pytest.approx(0.19)
    assert sanity.chance_threshold(0.5) == pytest.approx(0.55)
    assert sanity.near_chance(0.185, 0.1) and not sanity.near_chance(0.2, 0.1)
    assert sanity.majority_rate(torch.tensor([0, 1, 1, 1]), 3) == 0.75
    rec = {"majority": 0.1, "largest": 0.9, "smallest": 0.5, "smallest_compressed": 0.1,
           "val_samples": 100, "supernet_epochs": 5,
           "compression_genes": {"s1.bits": [2, 4, 8, 32], "s2.bits": [8, 32],
                                 "sparsity": [0.0, 0.5], "head.rank": [0.25, 1.0]}}
    # only genes that still hold options harsher than the advice are named
    assert sanity.restrict_advice(rec) == "--restrict s1.bits=8,32 --restrict head.rank=1.0"
    assert sanity.warnings(rec, (3, 0.8)) == []
    (line,) = sanity.warnings(rec, (3, 0.12))
    assert "best trial (trial 3) scores 12.0 %" in line and "--restrict s1.bits=8,32" in line
    assert sanity.warnings(None, (3, 0.1)) == []
