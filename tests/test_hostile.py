"""Faults and hostile input: a torn journal loses no complete record, an in-memory storage is
refused, passwords are masked however the URL is written, names that become file names stay
inside their folder, bad numbers are one clear line."""
from __future__ import annotations

import json

import optuna
import pytest

from nasopt.cli import main as cli
from nasopt_bench.reliability_faults import fill_disk
from nasopt.search.study import mask_url, open_existing_storage

TABLE = ["--space", "nb201", "--table", "--quiet"]


def nasopt(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def completed(storage: str, study: str) -> int:
    s = optuna.load_study(study_name=study, storage=open_existing_storage(storage, "."))
    return sum(t.state.name == "COMPLETE" for t in s.trials)


def test_a_torn_journal_record_is_cut_off_and_the_study_continues(tmp_path, capsys):
    journal = tmp_path / "j.log"
    url = f"journal:///{journal}"
    run = ["--run-dir", str(tmp_path), "--storage", url, "--study", "s"]
    assert nasopt(capsys, "search", *TABLE, *run, "--trials", "12")[0] == 0
    whole = journal.read_bytes()
    with open(journal, "ab") as f:  # a full disk tears the last record
        f.write(b'{"op_code":5,"x"')
    # a command that only reads reads the records before the torn one and changes nothing
    code, out, err = nasopt(capsys, "studies", "list", "--storage", url)
    assert code == 0 and "12" in out and "ends in a torn record" in err
    assert journal.read_bytes() == whole + b'{"op_code":5,"x"'
    assert not any(p.name.endswith((".lock", ".torn-1")) for p in tmp_path.iterdir())
    code, out, err = nasopt(capsys, "search", *TABLE, *run, "--trials", "15")
    assert code == 0, err
    assert "torn record" in err and "j.log.torn-1" in err
    assert (tmp_path / "j.log.torn-1").read_bytes() == whole + b'{"op_code":5,"x"'
    assert "15 completed trials (3 run now" in out
    assert completed(url, "s") == 15
    for line in journal.read_bytes().splitlines():  # every record whole again
        json.loads(line)
    # a journal ending in a whole record is left alone (no backup, no warning)
    assert nasopt(capsys, "search", *TABLE, *run, "--trials", "16")[2] == ""
    assert not (tmp_path / "j.log.torn-2").exists()


def test_a_torn_line_with_its_newline_is_cut_too(tmp_path, capsys):
    journal = tmp_path / "j.log"
    run = ["--run-dir", str(tmp_path), "--storage", f"journal:///{journal}", "--study", "s"]
    assert nasopt(capsys, "search", *TABLE, *run, "--trials", "4")[0] == 0
    with open(journal, "ab") as f:
        f.write(b'{"op_code":5,\n')
    code, out, err = nasopt(capsys, "search", *TABLE, *run, "--trials", "6")
    assert code == 0 and "torn record" in err and "6 completed trials" in out


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///", "sqlite:///:memory:",
                                 "sqlite:///file::memory:?cache=shared",
                                 "sqlite:///file:x?mode=memory&uri=true"])
def test_an_in_memory_sqlite_storage_is_refused(tmp_path, capsys, url):
    code, out, err = nasopt(capsys, "search", *TABLE, "--run-dir", str(tmp_path), "--storage",
                            url, "--trials", "3")
    assert code == 2 and "in-memory SQLite database" in err and "sqlite:///runs/studies.db" in err
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("url,masked", [
    ("postgresql://:PW@127.0.0.1:1/db", "postgresql://:***@127.0.0.1:1/db"),
    ("postgresql://u:PW@h/db", "postgresql://u:***@h/db"),
    ("postgresql+psycopg://u:p@ss@h:5432/db", "postgresql+psycopg://u:***@h:5432/db"),
    ("host=h password=PW dbname=x", "host=h password=*** dbname=x"),
])
def test_every_form_of_storage_password_is_masked(url, masked):
    assert mask_url(f"cannot open {url} now") == f"cannot open {masked} now"


def test_study_names_that_are_not_file_names_are_one_line(tmp_path, capsys):
    run = ["--run-dir", str(tmp_path), "--trials", "2"]
    code, _, err = nasopt(capsys, "search", *TABLE, *run, "--study", "n" * 300)
    assert code == 2 and "too long" in err and err.count("\n") == 1
    code, _, err = nasopt(capsys, "search", *TABLE, *run, "--study", "../x")
    assert code == 2 and "not a plain name" in err
    assert not (tmp_path / "studies.db").exists()  # refused before any storage was made


def test_non_ascii_names_pass_through(tmp_path, capsys):
    code, out, err = nasopt(capsys, "search", *TABLE, "--run-dir", str(tmp_path), "--trials",
                            "2", "--study", "rocket🚀")
    assert code == 0, err
    assert "study 'rocket🚀': 2 completed trials" in out
    assert (tmp_path / "configs" / "rocket🚀.json").exists()


@pytest.mark.parametrize("args,message", [
    (["--seed", "-1"], "search.seed must be 0 or more"),
    (["--trials", "-3"], "search.trials must be 0 or more"),
    (["--set", "data.seed=-2"], "data.seed must be 0 or more"),
])
def test_negative_numbers_are_one_line(tmp_path, capsys, args, message):
    code, _, err = nasopt(capsys, "search", *TABLE, "--run-dir", str(tmp_path), *args)
    assert code == 2 and message in err and err.count("\n") == 1


def test_a_study_sized_in_the_older_packed_format_is_not_continued(tmp_path):
    from nasopt.core.errors import NasoptError
    from nasopt.compression.packed import SIZE_FORMAT as VERSION
    from nasopt.search.study import open_storage, open_study
    storage = open_storage(f"sqlite:///{tmp_path / 's.db'}")
    old = {"space": {"name": "conv1d"}, "objectives": ["accuracy", "size"]}  # no packed_format
    open_study(storage, "s", old, ["maximize", "minimize"])
    with pytest.raises(NasoptError, match="measured sizes in packed format 1, this nasopt "
                                          f"writes format {VERSION}"):
        open_study(storage, "s", {**old, "packed_format": VERSION}, ["maximize", "minimize"])


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MB tmpfs (root only: skipped where mounting is not allowed)."""
    import subprocess

    from nasopt_bench.reliability_faults import mount_tmpfs
    mount = tmp_path / "disk"
    if not mount_tmpfs(mount, "3M"):
        pytest.skip("mounting a small tmpfs needs root")
    yield mount
    # lazily: this process may still hold the study database open
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_during_a_search_is_one_line_and_loses_no_trial(small_disk, capsys):
    run = ["--run-dir", str(small_disk / "R"), "--study", "s"]
    assert nasopt(capsys, "search", *TABLE, *run, "--trials", "6")[0] == 0
    fill_disk(small_disk)
    code, out, err = nasopt(capsys, "search", *TABLE, *run, "--trials", "500")
    assert code == 2 and "Traceback" not in err and err.count("\n") == 1, err
    assert "the disk is full" in err and "re-run the same command" in err
    (small_disk / "fill").unlink()
    done = completed(f"sqlite:///{small_disk / 'R' / 'studies.db'}", "s")
    assert done >= 6
    code, out, _ = nasopt(capsys, "search", *TABLE, *run, "--trials", str(done + 3))
    assert code == 0 and f"{done + 3} completed trials" in out


def test_a_file_system_fault_in_a_trial_stops_the_search_at_once(tmp_path, capsys, monkeypatch):
    import errno

    from nasopt.search import tabular
    real = tabular.TabularEvaluator.accuracy
    calls = []

    def accuracy(self, arch):  # noqa: ANN001, ANN202 - the fourth evaluation hits a full disk
        calls.append(1)
        if len(calls) == 4:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x"))
        return real(self, arch)

    monkeypatch.setattr(tabular.TabularEvaluator, "accuracy", accuracy)
    code, _, err = nasopt(capsys, "search", *TABLE, "--run-dir", str(tmp_path), "--trials", "50",
                          "--study", "s")
    assert code == 2 and "the disk is full" in err and len(calls) == 4  # no 20 failures first
    assert completed(f"sqlite:///{tmp_path / 'studies.db'}", "s") == 3


def test_a_run_dir_that_is_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    code, _, err = nasopt(capsys, "search", *TABLE, "--run-dir", str(tmp_path / "f"),
                          "--trials", "2")
    assert code == 2 and "a file stands where a folder is needed" in err
    assert err.count("\n") == 1


POSTGRES = __import__("os").environ.get("NASOPT_TEST_POSTGRES")



@pytest.mark.skipif(not POSTGRES and not __import__("os").environ.get("NASOPT_REQUIRE_POSTGRES"),
                    reason="needs a PostgreSQL server: set NASOPT_TEST_POSTGRES to its URL "
                    "(.ci/postgres.sh starts one)")
def test_no_storage_password_in_anything_a_run_or_a_finetune_writes_or_prints(tmp_path, capsys):
    import uuid
    from urllib.parse import urlsplit
    assert POSTGRES, "NASOPT_REQUIRE_POSTGRES is set but NASOPT_TEST_POSTGRES is not"
    password = urlsplit(POSTGRES).password
    assert password
    study = f"secret-{uuid.uuid4().hex[:8]}"
    config = tmp_path / "run.toml"
    from test_output_folders import RUN_CONFIG  # a tiny pipeline
    config.write_text(RUN_CONFIG.format(run=tmp_path / "run", out=tmp_path / "model"))
    code, out, err = nasopt(capsys, "run", str(config), "--set",
                            f'search.storage="{POSTGRES}"', "--set", f'search.study="{study}"')
    assert code == 0, err
    code, out2, err2 = nasopt(capsys, "finetune", "--study", study, "--trial", "0", "--storage",
                              POSTGRES, "--out", str(tmp_path / "tuned"), "--epochs", "1",
                              "--run-dir", str(tmp_path / "run"))
    assert code == 0, err2
    code, out3, err3 = nasopt(capsys, "studies", "report", study, "--storage", POSTGRES,
                              "--out", str(tmp_path / "report.html"))
    assert code == 0, err3
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "metrics.json" for p in written) and len(written) > 8
    leaks = [str(p) for p in written if password.encode() in p.read_bytes()]
    assert not leaks
    for text in (out, err, out2, err2, out3, err3):
        assert password not in text
    card = json.loads((tmp_path / "model" / "metrics.json").read_text())
    assert ":***@" in card["config"]["search"]["storage"] and ":***@" in card["command"]


def test_the_html_report_quotes_a_study_name_for_the_shell(tmp_path, capsys):
    import shlex
    name = "a;touch PWNED;b"
    assert nasopt(capsys, "search", *TABLE, "--run-dir", str(tmp_path), "--trials", "3",
                  "--study", name)[0] == 0
    out = tmp_path / "r.html"
    assert nasopt(capsys, "studies", "report", name, "--run-dir", str(tmp_path), "--out",
                  str(out))[0] == 0
    import html
    text = html.unescape(out.read_text())
    show = next(line for line in text.splitlines() if "nasopt studies show" in line)
    show = show[show.index("nasopt studies show"):]
    assert shlex.split(show)[3] == name  # one argument, no command separator


# ---- output folders: only a whole new export replaces the old one ------------------------------
def old_export(folder):
    folder.mkdir()
    for name in ("model.json", "arch.json", "weights.pt", "model.packed"):
        (folder / name).write_bytes(b"old " + name.encode())
    (folder / "notes.txt").write_text("the user's")
    return {p.name: p.read_bytes() for p in folder.iterdir()}


NEW = {"model.json": b"new card", "arch.json": b"new arch", "weights.pt": b"new weights"}


def test_replacing_an_export_swaps_whole_and_keeps_the_users_files(tmp_path):
    from nasopt.deploy.export import replace_artifacts
    out = tmp_path / "m"
    before = old_export(out)
    assert replace_artifacts(out, NEW, "model.json") == sorted(NEW)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {
        **NEW, "notes.txt": before["notes.txt"]}  # the old model.packed is gone: one model
    # (no working folder left in it: the comparison above lists every entry)


def test_a_full_disk_while_writing_the_new_export_keeps_the_old_one(tmp_path, monkeypatch):
    import errno

    from nasopt.core import checkpoint
    from nasopt.deploy.export import replace_artifacts
    out = tmp_path / "m"
    before = old_export(out)
    real, calls = checkpoint.atomic_write_bytes, []

    def write(path, data):  # noqa: ANN001, ANN202 - the second file hits a full disk
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, data)

    monkeypatch.setattr(checkpoint, "atomic_write_bytes", write)
    with pytest.raises(OSError):
        replace_artifacts(out, NEW, "model.json")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_a_failed_swap_puts_the_old_export_back(tmp_path, monkeypatch):
    from pathlib import Path

    from nasopt.deploy.export import replace_artifacts
    out = tmp_path / "m"
    before = old_export(out)
    real, moved = Path.replace, []

    def replace(self, target):  # noqa: ANN001, ANN202 - the sixth rename fails
        moved.append(self)
        if len(moved) == 6:
            raise OSError(5, "Input/output error", str(self))
        return real(self, target)

    monkeypatch.setattr(Path, "replace", replace)
    with pytest.raises(OSError):
        replace_artifacts(out, NEW, "model.json")
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_a_swap_killed_midway_is_undone_by_the_next_command(tmp_path):
    from nasopt.deploy.export import TAKEN, recover, stranded
    from nasopt.deploy.export import read_card
    from nasopt.core.errors import NasoptError
    out = tmp_path / "m"
    before = old_export(out)
    user = out / ".nasopt-old-keep"  # hidden folders not of nasopt's exact form are never touched
    user.mkdir()
    (user / "model.json").write_text("the user's")
    # killed while taking the old files out (model.json first): they are in .nasopt-old-*, the
    # rest still in m, nothing new has come in yet
    old = out / ".nasopt-old-abcd1234"
    old.mkdir()
    (out / "model.json").replace(old / "model.json")
    (out / "weights.pt").replace(old / "weights.pt")
    with pytest.raises(NasoptError, match="previous export is kept whole in"):
        read_card(out)  # a command that only reads says where the export is
    assert stranded(out) == old
    recover(out)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    # killed while the new files came in: every old file taken out (TAKEN written), half the
    # new ones in, the new record not yet
    old = out / ".nasopt-old-efgh5678"
    old.mkdir()
    for name in ("model.json", "arch.json", "weights.pt", "model.packed"):
        (out / name).replace(old / name)
    (old / TAKEN).write_bytes(b"")
    (out / "arch.json").write_bytes(b"new arch")
    new = out / ".nasopt-new-ijkl9012"
    new.mkdir()
    (new / "weights.pt").write_bytes(b"new weights")
    recover(out)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    # killed after the new record came in (only the deletion of the old files was left): the
    # new export stays
    old = out / ".nasopt-old-mnop3456"
    old.mkdir()
    (old / "model.json").write_bytes(b"older")
    (old / TAKEN).write_bytes(b"")
    recover(out)
    assert (out / "model.json").read_bytes() == before["model.json"]
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [".nasopt-old-keep"]
    assert (user / "model.json").read_text() == "the user's"


def test_a_supernet_checkpoint_that_does_not_fit_is_one_line(tmp_path, capsys):
    """A valid torch file of the wrong shape where the supernet is cached, or a partial
    checkpoint without its optimizer state: one line that says to delete it."""
    import torch
    run = ["search", "--space", "conv1d", "--dataset", "mnist1d", "--trials", "1", "--quiet",
           "--set", "supernet.epochs=1", "--set", "supernet.warmup_epochs=1", "--run-dir",
           str(tmp_path)]
    assert nasopt(capsys, *run)[0] == 0
    final = next((tmp_path / "supernets").glob("conv1d-*.pt"))
    torch.save({"net": {"stem.weight": torch.zeros(3, 3)}}, final)
    code, _, err = nasopt(capsys, *run)
    assert code == 2 and "does not fit the supernet of conv1d" in err and str(final) in err
    assert err.count("\n") == 1
    final.unlink()
    partial = final.with_name(final.name.replace(".pt", ".partial.pt"))
    torch.save({"net": {}, "epoch": 0}, partial)
    code, _, err = nasopt(capsys, *run)
    assert code == 2 and "not a whole nasopt supernet checkpoint (no optimizer, scheduler)" in err


def test_a_batch_size_below_one_is_refused_by_the_option(capsys):
    for command in (["finetune", "--from", "x"], ["distill", "s", "--trial", "0"]):
        with pytest.raises(SystemExit) as exc:
            cli.main([*command, "--out", "y", "--batch-size", "-4"])
        assert exc.value.code == 2
        assert "--batch-size: must be at least 1, got -4" in capsys.readouterr().err


def test_a_data_file_with_a_non_ascii_name(tmp_path, capsys):
    import numpy as np
    rng = np.random.default_rng(0)
    path = tmp_path / "dätä🚀.npz"
    np.savez(path, x=rng.normal(size=(120, 40)).astype("float32"), y=np.arange(120) % 2)
    code, out, err = nasopt(capsys, "search", "--space", "conv1d", "--dataset", str(path),
                            "--trials", "1", "--quiet", "--set", "supernet.epochs=1",
                            "--set", "supernet.warmup_epochs=1", "--run-dir",
                            str(tmp_path / "runs"))
    assert code == 0, err
    assert "study 'conv1d-dätä🚀.npz': 1 completed trials" in out
