"""Output folders of `nasopt export`, `finetune`, `distill` and `run`, through the real CLI: a
folder that already holds files is refused before any work (one error naming the fix, every
file unchanged) unless --force; with --force the folder holds one model (the nasopt files an
earlier command left there replaced or removed), the user's other files kept, and the command
lists only what it wrote. Also: --epochs 0 and --fraction out of range refused up front,
nasopt.load's messages for a missing path or a file of an export folder, `nasopt run --help`'s
top-level config keys."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import tomllib
from pathlib import Path

import pytest

from nasopt import api
from nasopt.cli import main as cli
from nasopt.core.errors import NasoptError

STUDY = "conv1d-mnist1d"
ROOT = Path(__file__).resolve().parents[1]
SUPERNET = ["--set", "supernet.epochs=1", "--set", "supernet.warmup_epochs=1",
            "--set", "supernet.n_random=1"]
EXPORT = ["arch.json", "model.json", "model.packed", "weights.pt"]
FINETUNED = sorted([*EXPORT, "metrics.json", "model.ts"])
STUDENT = ["arch.json", "student.json", "student.pt"]
FIX = "pass --force to replace the files with nasopt's names there (others are kept)"
# the same data, space, supernet recipe and trials as the fixture's search: `nasopt run` reuses
# its supernet and trials, only distills, fine-tunes and exports
RUN_CONFIG = """
run_dir = "{run}"
[data]
dataset = "mnist1d"
[supernet]
epochs = 1
warmup_epochs = 1
n_random = 1
[search]
space = "conv1d"
strategy = "random"
trials = 2
[distill]
epochs = 1
[finetune]
epochs = 1
[export]
out = "{out}"
formats = ["pytorch", "packed", "torchscript"]
"""


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A tiny conv1d study (2 trials), a finetune export folder `ft` of trial 0 and a distill
    student folder `student` of trial 0."""
    path = tmp_path_factory.mktemp("folders")
    run = str(path / "runs")
    assert cli.main(["search", "--space", "conv1d", "--dataset", "mnist1d", "--strategy",
                     "random", "--trials", "2", *SUPERNET, "--run-dir", run, "--quiet"]) == 0
    assert cli.main(["finetune", "--study", STUDY, "--trial", "0", "--epochs", "1",
                     "--run-dir", run, "--out", str(path / "ft")]) == 0
    assert cli.main(["distill", STUDY, "--trial", "0", "--no-teacher", "--epochs", "1",
                     "--run-dir", run, "--out", str(path / "student")]) == 0
    return path


def nasopt(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_error(err: str, text: str) -> None:
    assert err.startswith("nasopt: error:") and err.count("nasopt: error:") == 1, err
    assert "Traceback" not in err and text in err, err


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    return {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.iterdir())}


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def user_folder(root: Path, tmp_path: Path, source: str) -> Path:
    """A copy of the fixture folder ``source`` plus a user's notes.txt."""
    folder = tmp_path / f"{source}_copy"
    shutil.copytree(root / source, folder)
    (folder / "notes.txt").write_text("my notes\n")
    return folder


def no_work(*args, **kwargs):  # noqa: ANN002, ANN003, ANN201
    raise AssertionError("work started before the output folder was checked")


# ---- nasopt export --------------------------------------------------------------------------
def test_export_into_a_folder_with_files_is_refused_before_any_work(root, tmp_path, capsys,
                                                                     monkeypatch):
    ft = user_folder(root, tmp_path, "ft")
    before = snapshot(ft)
    monkeypatch.setattr(api, "rebuild", no_work)
    code, out, err = nasopt(capsys, "export", STUDY, "--trial", "1", "--out", ft,
                            "--run-dir", root / "runs")
    assert code == 2 and out == ""
    one_error(err, f"--out {ft} already holds files (arch.json, metrics.json, model.json, "
                   f"model.packed, model.ts, notes.txt, ... (7 in all)); choose a new --out, "
                   f"or {FIX}")
    assert snapshot(ft) == before


@pytest.mark.parametrize("source", ["ft", "student"])
def test_export_force_leaves_one_model_and_the_users_files(root, tmp_path, capsys, source):
    folder = user_folder(root, tmp_path, source)
    code, out, err = nasopt(capsys, "export", STUDY, "--trial", "1", "--out", folder,
                            "--run-dir", root / "runs", "--force")
    assert code == 0, err
    assert names(folder) == sorted([*EXPORT, "notes.txt"])  # no model.ts, metrics.json, student
    assert (folder / "notes.txt").read_text() == "my notes\n"
    assert f"to {folder}/ (arch.json, model.json, model.packed, weights.pt), verified" in out
    card = json.loads((folder / "model.json").read_text())
    trial = api.open_study(STUDY, None, root / "runs").trials[1]
    assert card["trial"] == 1 and json.loads((folder / "arch.json").read_text()) == trial.params
    api.load(folder)


def test_export_into_a_new_folder_needs_no_force(root, tmp_path, capsys):
    out = tmp_path / "new" / "model"
    code, printed, err = nasopt(capsys, "export", STUDY, "--trial", "0", "--out", out,
                                "--run-dir", root / "runs", "--format", "packed")
    assert code == 0, err
    assert names(out) == ["arch.json", "model.json", "model.packed"]
    assert f"to {out}/ (arch.json, model.json, model.packed), verified" in printed


def test_hidden_files_do_not_count_and_a_killed_writes_temp_files_go(root, tmp_path, capsys):
    """A folder holding only hidden files (.gitkeep, the .NAME.*.tmp a SIGKILLed write left)
    takes an export without --force; the stale temp file is removed, .gitkeep kept."""
    out = tmp_path / "hidden"
    out.mkdir()
    (out / ".gitkeep").write_text("")
    (out / ".weights.pt.k1ll3d.tmp").write_bytes(b"half a file")
    code, _, err = nasopt(capsys, "export", STUDY, "--trial", "0", "--out", out,
                          "--run-dir", root / "runs")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == sorted([".gitkeep", *EXPORT])


# ---- nasopt finetune ------------------------------------------------------------------------
def test_finetune_into_a_folder_with_files_is_refused_then_forced(root, tmp_path, capsys,
                                                                  monkeypatch):
    folder = user_folder(root, tmp_path, "student")
    before = snapshot(folder)
    with monkeypatch.context() as m:
        m.setattr("nasopt.deploy.finetune.finetune", no_work)
        code, _, err = nasopt(capsys, "finetune", "--from", root / "ft", "--epochs", "1",
                              "--out", folder)
    assert code == 2
    one_error(err, f"--out {folder} already holds files (arch.json, notes.txt, student.json, "
                   f"student.pt); choose a new --out, or {FIX}")
    assert snapshot(folder) == before
    code, out, err = nasopt(capsys, "finetune", "--from", root / "ft", "--epochs", "1",
                            "--out", folder, "--force")
    assert code == 0, err
    assert names(folder) == sorted([*FINETUNED, "notes.txt"])  # the student files are gone
    assert (folder / "notes.txt").read_text() == "my notes\n"
    assert out.rstrip().endswith(f"wrote {folder}/ (arch.json, model.json, weights.pt, "
                                 f"model.packed, model.ts, metrics.json)")
    api.load(folder)


@pytest.mark.parametrize("extra", [[], ["--dataset", "mnist1d"]], ids=["source data", "dataset"])
@pytest.mark.parametrize("fraction", ["1.5", "0", "-0.2"])
def test_finetune_fraction_out_of_range_is_refused(root, tmp_path, capsys, monkeypatch, extra,
                                                  fraction):
    monkeypatch.setattr("nasopt.deploy.finetune.finetune", no_work)
    out = tmp_path / "ft3"
    code, _, err = nasopt(capsys, "finetune", "--from", root / "ft", *extra, "--fraction",
                          fraction, "--epochs", "1", "--out", out)
    assert code == 2
    one_error(err, f"fraction must lie in (0, 1], got {float(fraction)}")
    assert not out.exists()


def test_finetune_epochs_zero_is_refused_up_front(root, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("nasopt.api.load", no_work)  # not even the source is read
    out = tmp_path / "ft3"
    code, _, err = nasopt(capsys, "finetune", "--from", root / "ft", "--out", out,
                          "--epochs", "0")
    assert code == 2
    one_error(err, "finetune epochs must be >= 1, got 0; give --epochs 1 or more")
    assert not out.exists()


@pytest.mark.parametrize("argv, message", [
    (["finetune", "--from", "ft", "--classes", "5,six"],
     "--classes '5,six': give comma-separated numbers, e.g. --classes 5,6,7,8,9"),
    (["distill", STUDY, "--trial", "0", "--teacher-weights", "0.7;0.3"],
     "--teacher-weights '0.7;0.3': give comma-separated numbers, e.g. --teacher-weights 0.7,0.3"),
], ids=["classes", "teacher weights"])
def test_unreadable_number_lists_are_one_error(root, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(root)
    monkeypatch.setattr(api, "rebuild", no_work)
    code, _, err = nasopt(capsys, *argv, "--run-dir", "runs", "--out", "new")
    assert code == 2
    one_error(err, message)
    assert not (root / "new").exists()


# ---- nasopt distill -------------------------------------------------------------------------
def test_distill_into_a_folder_with_files_is_refused_then_forced(root, tmp_path, capsys,
                                                                 monkeypatch):
    folder = user_folder(root, tmp_path, "ft")
    before = snapshot(folder)
    argv = ["distill", STUDY, "--trial", "1", "--no-teacher", "--epochs", "1",
            "--run-dir", root / "runs", "--out", folder]
    with monkeypatch.context() as m:
        m.setattr("nasopt.deploy.distill.train_student", no_work)
        code, _, err = nasopt(capsys, *argv)
    assert code == 2
    one_error(err, f"--out {folder} already holds files (arch.json, metrics.json, ")
    assert f"choose a new --out, or {FIX}" in err
    assert snapshot(folder) == before
    code, out, err = nasopt(capsys, *argv, "--force")
    assert code == 0, err
    assert names(folder) == sorted([*STUDENT, "notes.txt"])  # no export files of another model
    assert (folder / "notes.txt").read_text() == "my notes\n"
    assert f"into {folder}/ (arch.json, student.json, student.pt)" in out
    trial = api.open_study(STUDY, None, root / "runs").trials[1]
    assert json.loads((folder / "arch.json").read_text()) == trial.params


def test_distill_into_an_empty_folder_and_epochs_zero(root, tmp_path, capsys, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = nasopt(capsys, "distill", STUDY, "--trial", "0", "--no-teacher", "--epochs",
                          "1", "--run-dir", root / "runs", "--out", empty)
    assert code == 0, err
    assert names(empty) == STUDENT
    monkeypatch.setattr(api, "rebuild", no_work)
    out = tmp_path / "st"
    code, _, err = nasopt(capsys, "distill", STUDY, "--trial", "0", "--epochs", "0",
                          "--run-dir", root / "runs", "--out", out)
    assert code == 2
    one_error(err, "distill epochs must be >= 1, got 0; give --epochs 1 or more")
    assert not out.exists()


# ---- nasopt run -----------------------------------------------------------------------------
def test_run_refuses_an_export_folder_with_files_then_forces(root, tmp_path, capsys,
                                                             monkeypatch):
    folder = user_folder(root, tmp_path, "student")
    config = tmp_path / "tiny.toml"
    config.write_text(RUN_CONFIG.format(run=root / "runs", out=folder))
    before = snapshot(folder)
    with monkeypatch.context() as m:
        m.setattr(api, "search", no_work)
        code, _, err = nasopt(capsys, "run", config, "--quiet")
        assert code == 2
        one_error(err, f"export.out {folder} already holds files (arch.json, notes.txt, "
                       f"student.json, student.pt); choose a new export.out, or {FIX}")
        code, _, err = nasopt(capsys, "run", config, "--quiet", "--set", "finetune.epochs=0")
        assert code == 2
        one_error(err, "finetune epochs must be >= 1, got 0")
    assert snapshot(folder) == before
    code, out, err = nasopt(capsys, "run", config, "--quiet", "--force")
    assert code == 0, err
    written = sorted([*FINETUNED, "REPORT.md"])
    assert names(folder) == sorted([*written, "notes.txt"])
    assert (folder / "notes.txt").read_text() == "my notes\n"
    card = json.loads((folder / "metrics.json").read_text())
    assert card["files"] == written
    assert out.rstrip().endswith(f"wrote {folder}/ ({', '.join(written)})")


def test_run_help_lists_the_top_level_config_keys(capsys):
    from nasopt.pipeline import RunConfig
    top = [f.name for f in dataclasses.fields(RunConfig)
           if not dataclasses.is_dataclass(getattr(RunConfig(), f.name))]
    assert top == ["run_dir", "device", "threads"]
    demo = tomllib.loads((ROOT / "configs" / "mnist1d.toml").read_text())
    assert {k for k, v in demo.items() if not isinstance(v, dict)} <= set(top)
    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "top-level run_dir, device, threads (see" in text


# ---- nasopt.load ----------------------------------------------------------------------------
def test_load_says_a_missing_path_does_not_exist(tmp_path):
    with pytest.raises(NasoptError, match=r"nope does not exist; give an export folder"):
        api.load(tmp_path / "nope")


def test_load_of_a_file_in_an_export_folder_suggests_the_folder(root):
    ft = root / "ft"
    for name in ("weights.pt", "model.ts", "model.json"):
        with pytest.raises(NasoptError) as info:
            api.load(ft / name)
        assert str(info.value) == (f"{ft / name} is a file of the export folder {ft}; load the "
                                   f"folder: nasopt.load({str(ft)!r})")
    api.load(ft / "model.packed")  # the packed file itself loads


def test_a_full_disk_during_export_force_keeps_the_previous_export(root, tmp_path, capsys,
                                                                   monkeypatch):
    import errno

    from nasopt.compression import packed
    folder = user_folder(root, tmp_path, "ft")
    before = snapshot(folder)

    def full(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(packed, "pack", full)  # the new export's packed file cannot be written
    code, _, err = nasopt(capsys, "export", STUDY, "--trial", "1", "--out", folder, "--force",
                          "--run-dir", root / "runs")
    assert code == 2
    one_error(err, "the disk is full")
    assert snapshot(folder) == before  # the fine-tuned export, whole, and the user's notes
    assert names(tmp_path) == ["ft_copy"]  # no hidden working folder left beside it


def test_run_goes_on_over_the_export_it_left_unfinished(root, tmp_path, capsys, monkeypatch):
    """The same `nasopt run` command, re-run after an interruption in its export step, goes on
    without --force; another config (or a finished run's folder) is still refused."""
    from nasopt import pipeline
    folder = tmp_path / "model"
    config = tmp_path / "tiny.toml"
    config.write_text(RUN_CONFIG.format(run=root / "runs", out=folder))
    real = pipeline._export_onnx

    def killed(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - after the model files
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "_export_onnx", killed)
    code, _, err = nasopt(capsys, "run", config, "--quiet")
    assert code == 130 and (folder / "model.json").exists()
    assert not (folder / "metrics.json").exists()
    monkeypatch.setattr(pipeline, "_export_onnx", real)
    code, _, err = nasopt(capsys, "run", config, "--quiet", "--set", "finetune.epochs=2")
    assert code == 2 and "already holds files" in err  # not the interrupted run's config
    code, out, err = nasopt(capsys, "run", config, "--quiet")
    assert code == 0, err
    assert (folder / "metrics.json").exists() and not (folder / pipeline.UNFINISHED).exists()
    code, _, err = nasopt(capsys, "run", config, "--quiet")
    assert code == 2 and "already holds files" in err  # finished: never replaced silently


def test_finetune_and_distill_take_trial_best(root, tmp_path, capsys):
    for command, extra in (("finetune", ["--study", STUDY]), ("distill", [STUDY, "--no-teacher"])):
        code, _, err = nasopt(capsys, command, *extra, "--trial", "best", "--epochs", "1",
                              "--run-dir", root / "runs", "--out", tmp_path / command)
        assert code == 0, err
        assert "picked trial" in err and "the best feasible completed trial by accuracy" in err
