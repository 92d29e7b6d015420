"""Bad input, table-driven, through the real CLI: each case gives exactly one clear message
(`nasopt: error: ...` naming the fix), exit code 2, no traceback, and leaves every existing file
as it was (same bytes, same mtime). Cases already in tests/test_cli_errors.py are not repeated.
"""
from __future__ import annotations

import gc
import hashlib
import json
from pathlib import Path

import numpy as np
import optuna
import pytest

from nasopt.cli import main as cli
from nasopt.search import study as nstudy
from nasopt.compression.compress import Policy, compress
from nasopt.compression.packed import pack
from nasopt.spaces import SPACES

PASSWORD = "Sup3r-s3cret"
QUICK = ["--set", "supernet.epochs=1", "--set", "supernet.warmup_epochs=1", "--quiet"]


def _conv1d():
    space = SPACES["conv1d"]((1, 40), 10)
    return space, space.smallest()


def make_files(root: Path) -> None:
    """The inputs the cases refer to (created once per test, before the snapshot)."""
    (root / "typo.toml").write_text("[supernet]\nepoch = 3\n")
    (root / "broken.toml").write_text("[search\nspace = 'conv1d'\n")
    (root / "ts_only.toml").write_text("[export]\nformats = ['torchscript']\n")
    rng = np.random.default_rng(0)
    np.savez(root / "shapes.npz", x=rng.normal(size=(100, 40)).astype("float32"),
             y=np.arange(90) % 10)
    x = rng.normal(size=(100, 40)).astype("float32")
    x[3, 7] = np.nan
    np.savez(root / "nans.npz", x=x, y=np.arange(100) % 10)
    np.savez(root / "one_class.npz", x=rng.normal(size=(100, 40)).astype("float32"),
             y=np.zeros(100, dtype=int))
    space, arch = _conv1d()
    # an export folder whose packed file is cut short (a real packed file, truncated)
    model, stored = compress(space.build(arch).eval(), Policy.from_arch(arch), space.group_of)
    data = pack(space, arch, stored)
    export = root / "truncated_export"
    export.mkdir()
    (export / "arch.json").write_text(arch.to_json() + "\n")
    (export / "model.json").write_text(json.dumps({"space": space.describe(),
                                                   "files": {"packed": "model.packed"}}))
    (export / "model.packed").write_bytes(data[: len(data) // 2])
    # a student folder whose checkpoint is corrupt
    student = root / "corrupt_student"
    student.mkdir()
    (student / "arch.json").write_text(arch.to_json() + "\n")
    (student / "student.json").write_text(json.dumps({"space": space.describe(),
                                                      "dataset": {"dataset": "mnist1d"}}))
    (student / "student.pt").write_bytes(b"PK\x03\x04 this is not a checkpoint" * 10)
    # a storage with a nasopt study holding a FAILED trial, and a study nasopt did not create
    (root / "runs").mkdir()
    storage = nstudy.open_storage(f"sqlite:///{root}/runs/studies.db")
    s = optuna.create_study(study_name="s", storage=storage, directions=["maximize", "minimize"])
    s.set_user_attr(nstudy.SETUP_ATTR, {"space": space.describe(), "objectives": ["accuracy",
                                                                                  "size"]})
    trial = s.ask()
    s.tell(trial, state=optuna.trial.TrialState.FAIL)
    optuna.create_study(study_name="foreign", storage=storage)
    (root / "out").mkdir()
    (root / "out" / "keep.txt").write_text("do not touch")
    # data files, one fault each
    ok_x = rng.normal(size=(100, 40)).astype("float32")
    ok_y = np.arange(100) % 10
    np.savez(root / "empty.npz", x=np.zeros((0, 40), "float32"), y=np.zeros(0, int))
    np.savez(root / "complex.npz", x=ok_x + 1j, y=ok_y)
    np.savez(root / "huge_label.npz", x=ok_x, y=np.r_[ok_y[:-1], 3_000_000_000])
    np.savez(root / "negative_label.npz", x=ok_x, y=ok_y - 1)
    np.savez(root / "fractional_label.npz", x=ok_x, y=ok_y + 0.5)
    np.savez(root / "huge_x.npz", x=ok_x.astype("float64") * 1e300, y=ok_y)
    np.savez(root / "no_y.npz", x=ok_x)
    np.savez(root / "half_test.npz", x=ok_x, y=ok_y, x_test=ok_x)
    np.savez(root / "test_shape.npz", x=ok_x, y=ok_y, x_test=ok_x[:, :20], y_test=ok_y)
    (root / "not_an.npz").write_bytes(b"plain text, not a zip archive")
    (root / "header_only.csv").write_text("a,b,label\n")
    (root / "text_cells.csv").write_text("a,b,label\n1,x,0\n2,3,1\n")
    (root / "no_label.csv").write_text("a,b,class\n1,2,0\n2,3,1\n")
    # configs
    (root / "section_number.toml").write_text("search = 5\n")
    (root / "no_teachers.toml").write_text("[distill]\nteachers = []\n")
    (root / "qat_kd_alone.toml").write_text("[distill]\nenabled = false\n[finetune]\n"
                                            "distill = true\n")
    (root / "rotate.toml").write_text("[distill]\naugment = [\"rotate=90\"]\n")
    np.savez(root / "signals.npz", x=rng.normal(size=(100, 40)).astype("float32"),
             y=np.arange(100) % 10)
    (root / "big_shift.toml").write_text("[data]\ndataset = \"signals.npz\"\n"
                                         "[finetune]\naugment = [\"shift=20\"]\n")
    (root / "empty_out.toml").write_text("[export]\nout = \"\"\n")
    (root / "weights.toml").write_text("[distill]\nteachers = [\"largest\"]\n"
                                       "teacher_weights = [0.5, 0.5]\n")
    (root / "escape.toml").write_text('name = "x/../../../../tmp/ESCAPED"\n')
    # export folders with a damaged model card or model file
    for name, card in (("card_list", []), ("card_no_space", {"files": {}}),
                       ("card_classes", {"space": {**space.describe(), "num_classes": -3}})):
        folder = root / name
        folder.mkdir()
        (folder / "arch.json").write_text(arch.to_json() + "\n")
        (folder / "model.json").write_text(json.dumps(card))
        (folder / "model.packed").write_bytes(data)
    flipped = root / "flipped_export"
    flipped.mkdir()
    for f in ("arch.json", "model.json"):
        (flipped / f).write_bytes((export / f).read_bytes())
    damaged = bytearray(data)
    damaged[len(data) // 2] ^= 0x10
    (flipped / "model.packed").write_bytes(bytes(damaged))
    not_onnx = root / "not_onnx_export"
    not_onnx.mkdir()
    (not_onnx / "arch.json").write_text(arch.to_json() + "\n")
    (not_onnx / "model.json").write_text(json.dumps({"space": space.describe(),
                                                     "files": {"onnx": "model.onnx"}}))
    (not_onnx / "model.onnx").write_bytes(b"this is not an ONNX graph")
    quoted = root / "quoted_gene_student"
    quoted.mkdir()
    (quoted / "arch.json").write_text(json.dumps({**arch, "s1.width": str(arch["s1.width"])}))
    (quoted / "student.json").write_bytes((student / "student.json").read_bytes())
    (quoted / "student.pt").write_bytes(b"never read: the arch is refused first")
    extra = root / "extra_gene_student"
    extra.mkdir()
    (extra / "arch.json").write_text(json.dumps({**arch, "s9.k": 3}))
    (extra / "student.json").write_bytes((student / "student.json").read_bytes())
    (extra / "student.pt").write_bytes(b"never read: the arch is refused first")
    # finished inspection files that a second command must not overwrite
    (root / "plot.png").write_bytes(b"a finished plot")
    (root / "report.html").write_text("a finished report")
    (root / "trials.csv").write_text("a finished table")
    (root / "a_file").write_text("a file, not a folder")
    # tables: fractions instead of percent, a word among the numbers
    rows = [("|none~0|+|none~0|none~1|+|none~0|none~1|none~2|", "0.1")]
    (root / "fractions.csv").write_text("arch,cifar10_test_acc\n" + "".join(
        f"{a},{v}\n" for a, v in rows))
    (root / "words.csv").write_text("arch,cifar10_test_acc\n" + "".join(
        f"{a},high\n" for a, _ in rows))


CLOSED_PG = f"postgresql://nasopt:{PASSWORD}@127.0.0.1:9/nasopt"
SEARCH_TABLE = ["search", "--space", "nb201", "--table", "--quiet"]

# (case id, argv, text the one message must contain)
CASES = [
    ("typo'd key in a TOML file", ["search", "--config", "typo.toml", *QUICK],
     "unknown config key(s) ['supernet.epoch']"),
    ("TOML syntax error", ["search", "--config", "broken.toml", *QUICK], "is not valid TOML"),
    ("run exporting TorchScript alone", ["run", "ts_only.toml", "--quiet"],
     "needs pytorch or packed too"),
    ("bench distill without QAT epochs", ["bench", "distill", "--qat-epochs", "0", "--out",
                                          "d.md"], "--qat-epochs must be >= 1"),
    ("wrong type", ["search", "--set", "eval.calib_samples=\"many\"", *QUICK],
     "eval.calib_samples takes an integer"),
    ("negative learning rate", ["search", "--set", "supernet.lr=-0.1", *QUICK],
     "supernet.lr must be positive"),
    ("negative size budget", ["search", "--max-size=-4KB", *QUICK], "must be positive"),
    ("negative size budget, value apart", ["search", "--max-size", "-4KB", *QUICK],
     "must be positive"),
    ("negative size budget, option abbreviated", ["search", "--max-si", "-4KB", *QUICK],
     "must be positive"),
    ("unreadable budget", ["search", "--max-macs", "lots", *QUICK], "write e.g."),
    ("negative timeout", [*SEARCH_TABLE, "--timeout", "-5"], "positive seconds"),
    ("unknown objective", [*SEARCH_TABLE, "--objectives", "accuracy,speed"],
     "unknown objective(s)"),
    ("unknown strategy (tabular)", [*SEARCH_TABLE, "--strategy", "annealing"], "known: random"),
    ("restrict to a nonexistent option", [*SEARCH_TABLE, "--restrict", "e1_0=conv_9x9"],
     "conv_9x9"),
    ("missing table", ["search", "--space", "nb201", "--table", "nope.csv", "--quiet"],
     "nope.csv"),
    ("dataset with wrong shapes", ["search", "--dataset", "shapes.npz", *QUICK],
     "x has 100 samples but y has shape (90,)"),
    ("dataset with NaNs", ["search", "--dataset", "nans.npz", *QUICK], "NaN"),
    ("dataset of one class", ["search", "--dataset", "one_class.npz", *QUICK],
     "needs at least two classes"),
    ("corrupt checkpoint", ["finetune", "--from", "corrupt_student", "--out", "out"],
     "is corrupt or not a nasopt checkpoint"),
    ("truncated packed file", ["finetune", "--from", "truncated_export", "--dataset", "mnist1d",
                               "--out", "new_out"], "packed file is damaged"),
    ("export of a FAILED trial", ["export", "s", "--trial", "0", "--out", "out"],
     "is FAIL, not COMPLETE"),
    ("export of a missing trial", ["export", "s", "--trial", "7", "--out", "out"],
     "has no trial 7"),
    ("study not created by nasopt", ["studies", "show", "foreign"], "not created by nasopt"),
    ("unknown study (pareto)", ["studies", "pareto", "nope"], "no study named 'nope'"),
    ("storage down (PostgreSQL, closed port)", ["studies", "list", "--storage", CLOSED_PG],
     "cannot open storage postgresql://nasopt:***@127.0.0.1:9/nasopt"),
    ("storage that is not a URL", ["studies", "list", "--storage", "runs/studies.db"],
     "is not a URL"),
    ("journal storage without a file", [*SEARCH_TABLE, "--storage", "journal:///"],
     "journal storage needs a file path"),
    ("heartbeat of zero seconds", [*SEARCH_TABLE, "--heartbeat", "0"],
     "at least 1 second"),
    # data files
    ("data file without samples", ["search", "--dataset", "empty.npz", *QUICK],
     "holds no samples"),
    ("complex-valued x", ["search", "--dataset", "complex.npz", *QUICK], "complex numbers"),
    ("one huge label (nothing sized by it first)", ["search", "--dataset", "huge_label.npz",
                                                    *QUICK], "labels must be the integers 0..K-1"),
    ("negative labels", ["search", "--dataset", "negative_label.npz", *QUICK],
     "labels must be the integers 0..K-1"),
    ("fractional labels", ["search", "--dataset", "fractional_label.npz", *QUICK],
     "labels must be integers"),
    ("x beyond float32", ["search", "--dataset", "huge_x.npz", *QUICK], "beyond float32"),
    ("npz without y", ["search", "--dataset", "no_y.npz", *QUICK], "arrays named 'x' and 'y'"),
    ("x_test without y_test", ["search", "--dataset", "half_test.npz", *QUICK],
     "give both x_test and y_test"),
    ("x_test of another shape", ["search", "--dataset", "test_shape.npz", *QUICK],
     "x_test samples are shaped"),
    ("npz that is not an npz", ["search", "--dataset", "not_an.npz", *QUICK],
     "not a readable .npz file"),
    ("CSV with a header only", ["search", "--dataset", "header_only.csv", *QUICK],
     "holds no samples"),
    ("CSV with text cells", ["search", "--dataset", "text_cells.csv", *QUICK],
     "must be numeric"),
    ("CSV without the label column", ["search", "--dataset", "no_label.csv", *QUICK],
     "has no label column 'label'"),
    ("missing data file", ["search", "--dataset", "nope.npz", *QUICK], "does not exist"),
    # configs and options
    ("a section given as a number", ["search", "--config", "section_number.toml", *QUICK],
     "config key 'search' must be a section"),
    ("negative search seed", [*SEARCH_TABLE, "--seed", "-1"], "search.seed must be 0 or more"),
    ("negative trials", [*SEARCH_TABLE, "--trials", "-3"], "search.trials must be 0 or more"),
    ("negative data seed", [*SEARCH_TABLE, "--set", "data.seed=-2"], "data.seed must be 0"),
    ("negative supernet seed", ["search", "--set", "supernet.seed=-1", *QUICK],
     "must not be negative"),
    ("zero supernet batch size", ["search", "--set", "supernet.batch_size=0", *QUICK],
     "supernet.batch_size must be positive"),
    ("validation fraction above 1", ["search", "--set", "data.val_fraction=1.5", *QUICK],
     "val_fraction and test_fraction must lie strictly between 0 and 1"),
    ("zero gradient epochs", ["search", "--set", "gradient.epochs=0", *QUICK],
     "gradient.epochs must be positive"),
    ("study name of 300 bytes", [*SEARCH_TABLE, "--study", "n" * 300], "is too long"),
    ("a gene restricted twice", [*SEARCH_TABLE, "--restrict", "e1_0=none", "--restrict",
                                 "e1_0=skip_connect"], "restricted twice"),
    ("unknown space", ["search", "--space", "resnet50", *QUICK], "unknown space"),
    ("missing config file", ["search", "--config", "nope.toml", *QUICK], "does not exist"),
    ("run config without teachers", ["run", "no_teachers.toml", "--quiet"],
     "distill.teachers is empty"),
    ("QAT distillation without distillation", ["run", "qat_kd_alone.toml", "--quiet"],
     "finetune.distill = true takes the teachers of [distill]: set distill.enabled = true"),
    ("unknown augmentation", ["run", "rotate.toml", "--quiet"],
     "distill.augment: unknown augmentation 'rotate=90'"),
    ("unknown augmentation flag", ["distill", "conv1d-mnist1d", "--trial", "1", "--out", "s",
                                   "--augment", "flip,rotate"],
     "--augment: unknown augmentation 'rotate'"),
    ("a shift as long as the signal", ["run", "big_shift.toml", "--quiet"],
     "finetune.augment: shift=20 is too large for inputs (1, 40); give a shift below 20"),
    ("run config writing into the working folder", ["run", "empty_out.toml", "--quiet"],
     "export.out is empty"),
    ("teacher weights that do not match", ["run", "weights.toml", "--quiet"],
     "teacher_weights has 2 values for 1 teachers"),
    ("hardware profile escaping its folder", ["hw", "profile", "--hardware", "escape.toml",
                                              "--space", "conv1d", "--run-dir", "runs"],
     "is not a plain name"),
    ("unknown hardware profile", [*SEARCH_TABLE, "--hardware", "cpu-ortt"],
     "did you mean 'cpu-ort'"),
    ("table in fractions, not percent", ["search", "--space", "nb201", "--table",
                                         "fractions.csv", "--quiet"], "holds fractions"),
    ("table with a word among the numbers", ["search", "--space", "nb201", "--table",
                                             "words.csv", "--quiet"], "holds text ('high'"),
    # storages
    ("in-memory SQLite", [*SEARCH_TABLE, "--storage", "sqlite://"], "in-memory SQLite"),
    ("in-memory SQLite, three slashes", [*SEARCH_TABLE, "--storage", "sqlite:///"],
     "in-memory SQLite"),
    ("in-memory SQLite by name", [*SEARCH_TABLE, "--storage", "sqlite:///:memory:"],
     "in-memory SQLite"),
    ("journal path that is a folder", [*SEARCH_TABLE, "--storage", "journal:///out"],
     "journal storage needs a file path"),
    ("read-only command on a missing database", ["studies", "list", "--storage",
                                                 "sqlite:///nope.db"], "no study database"),
    ("report into a path under a file", ["studies", "report", "s", "--out",
                                         "a_file/report.html"], "a file stands where a folder"),
    ("password-bearing URL with an empty user", ["studies", "list", "--storage",
                                                 f"postgresql://:{PASSWORD}@127.0.0.1:9/x"],
     "postgresql://:***@127.0.0.1:9/x"),
    # artifacts
    ("model card that is a list", ["finetune", "--from", "card_list", "--dataset", "mnist1d",
                                   "--out", "new_out"], "model.json"),
    ("model card without a space", ["finetune", "--from", "card_no_space", "--dataset",
                                    "mnist1d", "--out", "new_out"], "model.json"),
    ("model card with -3 classes", ["finetune", "--from", "card_classes", "--dataset",
                                    "mnist1d", "--out", "new_out"], "num_classes -3"),
    ("packed file with a flipped bit", ["finetune", "--from", "flipped_export", "--dataset",
                                        "mnist1d", "--out", "new_out"],
     "checksum does not match"),
    ("ONNX file that is not ONNX", ["hw", "measure", "--export", "not_onnx_export",
                                    "--hardware", "cpu-ort"], "model.onnx"),
    ("arch file with a gene the space lacks", ["finetune", "--from", "extra_gene_student",
                                               "--out", "new_out"],
     "unknown gene(s) ['s9.k']"),
    ("arch file with a number written as text", ["finetune", "--from", "quoted_gene_student",
                                                  "--out", "new_out"],
     "gene 's1.width' is the text"),
    ("export --trial best of a study without a completed trial", ["export", "s", "--trial",
                                                                    "best", "--out", "new_out"],
     "has no completed trial yet"),
    ("compare with an unknown study", ["studies", "compare", "s", "nope"],
     "no study named 'nope'"),
    ("latency of a folder that is no export", ["hw", "measure", "--export", "out", "--hardware",
                                               "cpu-ort"], "is not a nasopt export"),
    ("fine-tune from a folder that is no model", ["finetune", "--from", "out", "--out",
                                                  "new_out"], "not a student folder"),
    ("dashboard on a missing database", ["dashboard", "--storage", "sqlite:///nope.db"],
     "no study database"),
    ("a timeout of zero seconds", [*SEARCH_TABLE, "--timeout", "0"], "positive seconds"),
    # finished files of the inspection commands
    ("plot over an existing file", ["studies", "plot", "s", "--kind", "pareto", "--out",
                                    "plot.png"], "plot.png exists"),
    ("report over an existing file", ["studies", "report", "s", "--out", "report.html"],
     "report.html exists"),
    ("table over an existing file", ["studies", "export", "s", "--to", "trials.csv"],
     "trials.csv exists"),
    ("plot with the wrong suffix", ["studies", "plot", "s", "--kind", "pareto", "--out",
                                    "plot.jpg"], "ending in .png"),
]


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(),
                                       p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bad")
    make_files(path)
    return path


@pytest.mark.parametrize("argv, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(root, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(root)
    # an earlier case's storage, closed by the garbage collector, checkpoints the study
    # database's write-ahead log: let that happen before the snapshot, not during this case
    gc.collect()
    before = snapshot(root)
    with_run_dir = argv[0] in ("search", "studies", "export")
    code = cli.main([*argv, *(["--run-dir", "runs"] if with_run_dir else [])])
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert err.count("nasopt: error:") == 1 and err.startswith("nasopt: error:"), err
    assert message in err, err
    assert "Traceback" not in err and PASSWORD not in err + out
    after = snapshot(root)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing overwritten
    new = sorted(set(after) - set(before))
    assert all(k.startswith("runs/") for k in new), new  # at most an empty study database


def test_the_table_has_enough_cases():
    assert len(CASES) >= 80


@pytest.mark.parametrize("text, hidden", [
    ("postgresql://u:pw@h/db", "pw"),
    ("(psycopg.OperationalError) postgresql+psycopg://nasopt:p@ss:w0rd@10.0.0.1:5432/x failed",
     "p@ss:w0rd"),
    ("host=db user=u password=hunter2 dbname=x", "hunter2"),
    ("mysql://root:toor@localhost/db and sqlite:///runs/studies.db", "toor"),
])
def test_passwords_are_masked_in_messages(text, hidden):
    masked = nstudy.mask_url(text)
    assert hidden not in masked and "***" in masked
    assert nstudy.mask_url("sqlite:///runs/studies.db") == "sqlite:///runs/studies.db"
