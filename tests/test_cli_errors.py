"""Every user error gives one clear message naming the fix, exit code 2, and no traceback."""
from __future__ import annotations

import subprocess
import sys

import pytest

from nasopt.cli import main as cli

QUICK = ["--set", "supernet.epochs=1", "--set", "supernet.warmup_epochs=1", "--quiet"]


def run(tmp_path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nasopt.cli", *args], capture_output=True,
                          text=True, cwd=tmp_path, timeout=300)


CASES = [
    (["search", "--space", "resnet", "--dataset", "digits"], "known: conv1d, mobilenet"),
    (["search", "--space", "conv1d", "--dataset", "mnist1d", "--strategy", "bayes"],
     "known: random, nsga2, tpe"),
    (["search", "--dataset", "cifar10"], "known: digits, mnist1d, fashion-mnist"),
    (["search", "--dataset", "mnist1d", "--restrict", "s7.k=3"], "unknown gene 's7.k'"),
    (["search", "--dataset", "mnist1d", "--restrict", "s1.k=4"], "choose among [3, 5, 7]"),
    (["search", "--dataset", "mnist1d", "--restrict", "s1.k="], "no option"),
    (["search", "--space", "conv1d", "--dataset", "digits"], "choose a space made for this data"),
    (["search", "--dataset", "mnist1d", "--storage",
      "postgresql://nasopt:s3cret@127.0.0.1:1/nasopt"], "cannot open storage"),
    (["search", "--dataset", "mnist1d", "--set", "search.trails=3"], "unknown config key"),
    (["search", "--dataset", "mnist1d", "--trials", "0"], "at least 1"),
    # a run folder without a study database: read-only commands create none
    (["studies", "show", "nope"], "no study database at"),
    (["export", "nope", "--trial", "0", "--out", "x"], "no study database at"),
    # the name is a file name too (RUN_DIR/configs/STUDY.json): nothing outside the run folder
    (["search", "--space", "nb201", "--table", "--study", "../../victim"], "not a plain name"),
    (["search", "--space", "nb201", "--table", "--study", ""], "not a plain name"),
    (["search", "--config", "/"], "is a folder, not a TOML file"),
]


@pytest.mark.parametrize("args, message", CASES, ids=[" ".join(c[0][:3]) for c in CASES])
def test_user_errors(tmp_path, capsys, args, message):
    code = cli.main([*args, *(QUICK if args[0] == "search" else []), "--run-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and err.startswith("nasopt: error:")
    assert "s3cret" not in err  # passwords are masked


def test_a_config_file_that_is_not_text(tmp_path, capsys):
    (tmp_path / "bin.toml").write_bytes(b"\xff\xfe\x00binary")
    assert cli.main(["search", "--config", str(tmp_path / "bin.toml"), *QUICK]) == 2
    assert capsys.readouterr().err.startswith("nasopt: error: config file")


def test_no_traceback_from_the_real_command(tmp_path):
    proc = run(tmp_path, "search", "--space", "nope", "--dataset", "digits")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "unknown space 'nope'" in proc.stderr


def test_existing_study_with_a_different_space_is_refused(tmp_path, capsys):
    base = ["search", "--dataset", "mnist1d", "--run-dir", str(tmp_path), "--study", "s",
            "--trials", "1", *QUICK]
    assert cli.main([*base, "--restrict", "s1.k=3"]) == 0
    capsys.readouterr()
    assert cli.main([*base, "--restrict", "s1.k=5"]) == 2
    err = capsys.readouterr().err
    assert "different setup" in err and "new --study name" in err


def test_help_on_every_command():
    for args in (["--help"], ["search", "--help"], ["studies", "--help"],
                 ["studies", "show", "--help"], ["export", "--help"], ["bench", "--help"],
                 ["bench", "supernet", "--help"]):
        with pytest.raises(SystemExit) as exc:
            cli.main(args)
        assert exc.value.code == 0


def test_ctrl_c_gives_one_line_and_keeps_the_trials(tmp_path):
    """SIGINT mid-search: exit 130 with the CLI's one line (no traceback: Optuna logs the
    interrupted trial's failure with one, which is filtered), every finished trial kept."""
    import signal
    import time

    import optuna

    db = tmp_path / "studies.db"
    # a shell's background job (nohup, &) inherits SIGINT ignored; Python then installs no
    # KeyboardInterrupt handler: give the search the default disposition a terminal gives it
    proc = subprocess.Popen([sys.executable, "-m", "nasopt.cli", "search", "--space", "nb201",
                             "--table", "--trials", "100000", "--study", "s", "--quiet",
                             "--run-dir", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))

    def completed() -> int:
        try:
            study = optuna.load_study(study_name="s", storage=f"sqlite:///{db}")
        except Exception:  # not created yet
            return 0
        return len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)))

    deadline = time.monotonic() + 120
    while completed() < 5 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()  # never left running when the assertion below fails
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert err.strip().splitlines()[-1].startswith("nasopt: interrupted; finished trials are kept")
    assert completed() >= 5


def test_an_error_raised_while_ctrl_c_unwinds_reads_as_the_interrupt(monkeypatch, capsys):
    """A library's clean-up that fails after Ctrl-C (Optuna's trial runner reads a state it never
    set when the interrupt lands early) exits 130 with the interrupt's one line; an error with
    no interrupt behind it still propagates."""
    def cleanup_fails(args):  # noqa: ANN001, ANN202
        try:
            raise KeyboardInterrupt
        finally:
            raise UnboundLocalError("cannot access local variable 'updated_state'")

    monkeypatch.setattr(cli, "_dispatch", cleanup_fails)
    assert cli.main(["search", "--space", "nb201", "--table", "--trials", "1"]) == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        "nasopt: interrupted; finished trials are kept in the study; re-run the same command "
        "to continue"]

    def plain_bug(args):  # noqa: ANN001, ANN202
        raise UnboundLocalError("a bug")

    monkeypatch.setattr(cli, "_dispatch", plain_bug)
    with pytest.raises(UnboundLocalError):
        cli.main(["search", "--space", "nb201", "--table", "--trials", "1"])


def test_a_mistyped_option_names_the_command_and_the_near_miss(capsys):
    for argv, usage, near in ((["search", "--max-sise", "4KB"], "nasopt search", "--max-size"),
                              (["studies", "show", "s", "--pareto-only"], "nasopt studies show",
                               "--pareto")):
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith(f"usage: {usage} ")
        assert err.rstrip().endswith(f"{usage}: error: unrecognized arguments: "
                                     f"{' '.join(argv[-2 if near == '--max-size' else -1:])}; "
                                     f"did you mean {near}?")


def test_a_size_with_a_space_before_its_unit_says_to_write_it_without(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["search", "--max-size", "4", "KB"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.rstrip().endswith("nasopt search: error: unrecognized arguments: KB; write a "
                                 "budget without a space before its unit: 4KB"), err
    with pytest.raises(SystemExit):
        cli.main(["search", "--max-macs", "2", "M", "--max-latency", "300", "us"])
    err = capsys.readouterr().err
    assert "unrecognized arguments: M us; write a budget without a space before its unit: " \
        "2M, 300us" in err, err


def test_an_interrupted_command_is_not_kept_alive_by_a_lingering_thread():
    """Optuna's heartbeat thread of a trial interrupted as it starts is never stopped: the
    command exits with 130 anyway (its finished trials are committed)."""
    probe = ("import threading, nasopt.cli.main as m\n"
             "threading.Thread(target=threading.Event().wait).start()  # never ends\n"
             "m.main = lambda argv=None: 130\n"
             "m.run()\n")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 130, proc.stderr
