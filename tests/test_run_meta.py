"""`nasopt run` with a [meta] section: few-shot transfer from a meta-learned initialisation as a
step of the pipeline (nasopt.pipeline.meta_step), on MNIST-1D with a tiny search: the adapted
export, its card, its reproducibility, one-line errors before any training, and a config without
[meta] left as it was."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from nasopt import api
from nasopt.cli.main import build_parser, main
from nasopt.core.data import load_dataset
from nasopt.core.task import task_of
from nasopt.deploy.finetune import FinetuneConfig
from nasopt.deploy.meta import MetaConfig
from nasopt.pipeline import MetaStep, load_run_config
from nasopt.supernet.train import quality
from test_distill import TINY

SOURCE, TARGET = [0, 1, 2, 3, 4], [5, 6, 7, 8, 9]

pytestmark = pytest.mark.usefixtures("one_torch_thread")
RUN = TINY  # the tiny pipeline of tests/test_distill.py
#: the few-shot target: MNIST-1D classes 5-9, 5 training samples each; Reptile on classes 0-4
META = """
[meta]
classes = [5, 6, 7, 8, 9]
shots = 5
meta_iterations = 20
meta_shots = 4
epochs = 3
"""


def _config(folder: Path, meta: str = META) -> Path:
    config = folder / "run.toml"
    config.write_text(RUN.format(run=folder / "run", out=folder / "model") + meta)
    return config


@pytest.fixture(scope="module")
def meta_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("meta_run")
    config = _config(root)
    assert main(["run", str(config), "--quiet"]) == 0
    return root


def test_run_with_meta_exports_the_adapted_model_and_its_card(meta_run):
    out, adapted = meta_run / "model", meta_run / "model_meta"  # default: <export.out>_meta
    for name in ("arch.json", "model.json", "weights.pt", "model.packed", "model.ts",
                 "metrics.json", "REPORT.md"):
        assert (adapted / name).exists(), name
    assert not list(adapted.glob(".nasopt-*"))  # finished: no unfinished marker left
    metrics = json.loads((adapted / "metrics.json").read_text())
    assert metrics["command"].startswith("nasopt run ")
    reptile = metrics["reptile"]
    assert reptile["classes"] == SOURCE and reptile["ways"] == 5
    assert reptile["dataset"] == "mnist1d"
    assert reptile["iterations"] == 20 and reptile["shots"] == 4 and reptile["seed"] == 0
    assert reptile["train_samples"] == int(sum((load_dataset("mnist1d").y_train == c).sum()
                                               for c in SOURCE))
    assert metrics["settings"]["shots"] == 5 and metrics["finetune"]["epochs"] == 3
    assert "5 classes, 25 train" in metrics["target"]  # 5 shots of 5 classes
    assert metrics["from"] == str(out) and metrics["packed_bytes"] == (
        adapted / "model.packed").stat().st_size
    # every artifact holds the adapted model: the same target test accuracy
    test = metrics["test_accuracy"]
    assert set(test) == {"fine-tuned model (in memory)", "weights.pt via nasopt.load",
                         "model.packed via nasopt.load", "model.ts via torch.jit.load"}
    assert len(set(test.values())) == 1
    # measured again here: the loaded folder, raw samples of the target's test split
    target = load_dataset("mnist1d", classes=TARGET)  # shots leave the test split as it is
    model = api.load(adapted)
    raw = target.preprocess.raw(target.x_test)
    with torch.no_grad():
        assert model(raw[:4]).shape == (4, 5)
    assert quality(model, raw, target.y_test, task_of(target)) == pytest.approx(
        test["weights.pt via nasopt.load"])
    card = json.loads((adapted / "model.json").read_text())
    assert card["weights"] == "meta-trained, fine-tuned" and card["dataset"]["shots"] == 5
    assert card["dataset"]["classes"] == TARGET and card["space"]["num_classes"] == 5
    # the run's own card and report carry the step too
    main_card = json.loads((out / "metrics.json").read_text())
    assert main_card["meta"]["test_accuracy"] == test
    assert main_card["meta"]["out"] == str(adapted) and main_card["meta"]["reptile"] == reptile
    assert main_card["config"]["meta"]["enabled"] is True
    assert "meta" in main_card["timings_s"]
    report = (out / "REPORT.md").read_text()
    assert "## Few-shot transfer from a meta-learned initialisation ([meta])" in report
    assert f"| model.packed via nasopt.load | {test['model.packed via nasopt.load']:.4f} |" \
        in report
    assert "target test accuracy" in (adapted / "REPORT.md").read_text()


def test_the_same_config_gives_the_same_adapted_model(meta_run):
    """Re-run into other folders: the study and supernet are reused, every step is seeded."""
    again = meta_run / "again"
    assert main(["run", str(meta_run / "run.toml"), "--quiet", "--set",
                 f"export.out={json.dumps(str(again))}", "--set",
                 f"meta.out={json.dumps(str(meta_run / 'again_adapted'))}"]) == 0
    assert ((meta_run / "again_adapted" / "model.packed").read_bytes()
            == (meta_run / "model_meta" / "model.packed").read_bytes())
    assert not (meta_run / "again_meta").exists()  # meta.out names the folder
    # another seed: another meta-training and adaptation
    other = meta_run / "other"
    assert main(["run", str(meta_run / "run.toml"), "--quiet", "--set",
                 f"export.out={json.dumps(str(other))}", "--set", "meta.seed=1"]) == 0
    first = json.loads((meta_run / "model_meta" / "metrics.json").read_text())
    second = json.loads((meta_run / "other_meta" / "metrics.json").read_text())
    assert second["reptile"]["seed"] == 1
    assert second["reptile"]["loss_before_adaptation"] != first["reptile"][
        "loss_before_adaptation"]


def test_a_run_cut_off_after_the_meta_export_goes_on_without_force(meta_run, capsys,
                                                                   monkeypatch):
    """Killed after writing the adapted model, before the cards: the same command goes on over
    both of its folders; a finished meta folder is refused to another config."""
    from nasopt import pipeline
    args = ["run", str(meta_run / "run.toml"), "--quiet", "--set",
            f"export.out={json.dumps(str(meta_run / 'cut'))}"]

    def killed(*a, **k):  # noqa: ANN002, ANN003, ANN202
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(pipeline, "meta_report", killed)
        assert main(args) == 130  # as Ctrl-C
    assert (meta_run / "cut_meta" / pipeline.UNFINISHED).exists()
    assert main(args) == 0
    assert not (meta_run / "cut_meta" / pipeline.UNFINISHED).exists()
    assert json.loads((meta_run / "cut_meta" / "metrics.json").read_text())["reptile"]
    capsys.readouterr()
    assert main([*args, "--set", "meta.seed=2", "--set",
                 f"export.out={json.dumps(str(meta_run / 'cut2'))}",
                 "--set", f"meta.out={json.dumps(str(meta_run / 'cut_meta'))}"]) == 2
    assert "meta.out " in capsys.readouterr().err and not (meta_run / "cut2").exists()


@pytest.mark.parametrize("override, message", [
    ("meta.iteration=5", "unknown config key(s) ['meta.iteration']; known in meta.: enabled, "
                         "dataset, classes"),
    ("meta.meta_lr=2", "meta.meta_lr must lie in (0, 1]"),
    ("meta.epochs=0", "meta.epochs must be a whole number >= 1, got 0"),
    ('meta.epochs="x"', "config key meta.epochs takes an integer, got 'x'"),
    ("meta.classes=[5,5]", "meta.classes [5, 5] names a label twice"),
    ("meta.classes=[]", "[meta] needs meta.classes: the target classes of mnist1d"),
    ("meta.meta_classes=[3,4,5]", "meta classes [5] are also target classes"),
    ("meta.meta_shots=5000", "source class 0 of mnist1d has"),
    ('meta.dataset="digits"', "meta.dataset digits: samples shaped (1, 8, 8), the searched "
                              "models take (1, 40)"),
    ("meta.shots=1000", "[meta] target task: mnist1d: class 5 has"),
    ("meta=3", "config key 'meta' must be a section"),
])
def test_a_bad_meta_section_is_one_line_before_any_training(tmp_path, capsys, override,
                                                             message):
    config = _config(tmp_path)
    assert main(["run", str(config), "--quiet", "--set", override]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists() and not (tmp_path / "model").exists()


def test_meta_out_must_be_a_folder_of_its_own(tmp_path, capsys):
    config = _config(tmp_path)
    for out, said in ((tmp_path / "model", "is export.out"),
                      (tmp_path / "model" / "few", "nests with export.out")):
        assert main(["run", str(config), "--quiet", "--set",
                     f"meta.out={json.dumps(str(out))}"]) == 2
        err = capsys.readouterr().err
        assert f"meta.out {out} {said}" in err and err.count("\n") == 1
    (tmp_path / "model_meta").mkdir()
    (tmp_path / "model_meta" / "notes.txt").write_text("mine\n")
    assert main(["run", str(config), "--quiet"]) == 2
    assert "meta.out " in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_without_meta_nothing_changes(meta_run, tmp_path):
    """The same pipeline without [meta]: no meta folder, a card and a config record without
    meta, and the same main model as the run with [meta] (the step leaves it alone)."""
    config = _config(tmp_path, meta="")
    text = config.read_text().replace(str(tmp_path / "run"), str(meta_run / "run"))
    config.write_text(text)  # the meta run's study and supernet: the same picked trial
    cfg = load_run_config(config)
    assert not cfg.meta.enabled and "meta" not in cfg.to_dict()
    assert main(["run", str(config), "--quiet"]) == 0
    out = tmp_path / "model"
    assert not (tmp_path / "model_meta").exists()
    card = json.loads((out / "metrics.json").read_text())
    assert "meta" not in card and "meta" not in card["config"]
    assert set(card["timings_s"]) == {"supernet", "search", "distill", "fine-tune", "export",
                                      "total"}
    assert "[meta]" not in (out / "REPORT.md").read_text()
    assert (out / "model.packed").read_bytes() == (meta_run / "model" / "model.packed"
                                                   ).read_bytes()
    # enabled = false turns a [meta] table off again
    off = load_run_config(_config(tmp_path, META + "enabled = false\n"))
    assert not off.meta.enabled and "meta" not in off.to_dict()


def test_meta_keys_are_the_finetune_meta_options_with_their_defaults():
    """[meta]'s keys and defaults are those of `nasopt finetune --meta` (dashes as
    underscores), and they make the same Reptile and fine-tuning settings."""
    options = vars(build_parser().parse_args(["finetune", "--from", "DIR", "--out", "OUT"]))
    step = MetaStep()
    for key in ("classes", "fraction", "shots", "shots_seed", "meta_classes", "meta_iterations",
                "meta_shots", "meta_inner_steps", "meta_inner_lr", "meta_lr", "epochs", "lr",
                "batch_size", "patience", "freeze", "seed"):
        assert key in options, key
    for key in ("fraction", "shots", "shots_seed", "epochs", "lr", "batch_size", "patience",
                "seed"):
        assert getattr(step, key) == options[key], key
    assert step.reptile() == MetaConfig(seed=0)  # the --meta-* defaults, as the help says
    assert step.finetune() == FinetuneConfig()
    assert dataclasses.replace(step, seed=3).reptile().seed == 3
    assert MetaStep(classes=("5", "6")).classes == (5, 6)  # --set meta.classes=5,6
