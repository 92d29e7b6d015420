"""What an export says it is and what deployment needs, through the real CLI on digits: every
model file takes raw samples (``load_digits().images``, 0..16, reshaped as model.json says) and
predicts as nasopt's own evaluation of the trial; model.json records the preprocessing and that
the weights are inherited; ``--trial best`` picks the best feasible trial (by accuracy); the closing
lines name only loaders that work and the commands that train the weights; ``api.export``
refuses a folder holding files unless ``force``; finetune's files take raw samples too."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from nasopt import api
from nasopt.cli import main as cli
from nasopt.core.errors import NasoptError
from nasopt.search.study import completed, is_feasible
from nasopt.supernet.train import accuracy

# a small, lightly compressed sub-space: accurate enough that predictions mean something
FAST = ["--set", "supernet.epochs=3", "--set", "supernet.warmup_epochs=1",
        "--set", "supernet.n_random=1", "--restrict", "sparsity=0.0",
        "--restrict", "stem.bits=8,32", "--restrict", "head.bits=8,32",
        "--restrict", "head.rank=1.0",
        *[arg for s in (1, 2, 3) for arg in ("--restrict", f"s{s}.expand=2", "--restrict",
                                             f"s{s}.k=3", "--restrict", f"s{s}.rank=1.0",
                                             "--restrict", f"s{s}.bits=8,32")]]
STUDY, BUDGETED = "mobilenet-digits", "budgeted"


def nasopt(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def raw_digits() -> tuple[np.ndarray, np.ndarray]:
    """The samples exactly as scikit-learn gives them: (N, 8, 8) float, values 0..16."""
    from sklearn.datasets import load_digits
    d = load_digits()
    return d.images.astype(np.float32), d.target


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Two studies of the same 4 trials (same seed and supernet): one without budgets, one whose
    size budget leaves some trials infeasible."""
    path = tmp_path_factory.mktemp("deploy") / "runs"
    search = ["search", "--space", "mobilenet", "--dataset", "digits", "--quiet", "--trials",
              "4", "--run-dir", str(path), *FAST]
    assert cli.main(search) == 0
    sizes = sorted(t.user_attrs["metrics"]["compressed_bytes"]
                   for t in completed(api.open_study(STUDY, run_dir=path)))
    budget = sizes[1]  # the two larger are infeasible
    assert cli.main([*search, "--study", BUDGETED, "--max-size", str(budget)]) == 0
    return path


def trial_of(runs: Path, study: str, number: int):
    return next(t for t in api.open_study(study, run_dir=runs).trials if t.number == number)


def test_onnx_and_nasopt_load_take_raw_samples(runs, tmp_path, capsys):
    out = tmp_path / "e"
    study = api.open_study(STUDY, run_dir=runs)
    number = max(completed(study), key=lambda t: t.values[0]).number
    code, printed, err = nasopt(capsys, "export", STUDY, "--trial", number, "--out", out,
                                "--run-dir", runs, "--format", "onnx", "--format", "pytorch",
                                "--format", "packed", "--format", "onnx-int8")
    assert code == 0, err
    card = json.loads((out / "model.json").read_text())
    assert card["weights"] == "inherited"
    assert card["input"]["preprocess"] == {"mean": 0.0, "std": 16.0, "integers": True,
                                           "formula": "(x - mean) / std"}
    assert card["input"]["shape"] == ["N", 1, 8, 8]

    # nasopt's own evaluation of the trial: the compressed model on the loader's inputs
    evaluator, data = api.rebuild(study)
    arch = evaluator.space.validate(trial_of(runs, STUDY, number).params)
    model, _ = evaluator.compressed(arch)
    images, labels = raw_digits()
    with torch.no_grad():
        own = model.eval()(torch.from_numpy(images / 16.0).float()[:, None]).argmax(1).numpy()
    import onnxruntime
    sess = onnxruntime.InferenceSession(str(out / "model.onnx"))
    got = sess.run(None, {"x": images.reshape(-1, 1, 8, 8)})[0].argmax(1)
    assert (got == own).all()
    assert len(np.unique(own)) >= 3 and (own == labels).mean() > 0.15  # not a constant guess
    # the int8 graph too takes the raw samples (its stated tolerance: 90 % agreement)
    int8 = onnxruntime.InferenceSession(str(out / "model.int8.onnx"))
    got8 = int8.run(None, {"x": images.reshape(-1, 1, 8, 8)})[0].argmax(1)
    assert (got8 == own).mean() >= 0.9

    # nasopt.load of the folder and of its model.packed take the raw samples too, and score the
    # validation split (raw) exactly as the search recorded it
    raw_val = data.x_val * 16
    assert torch.equal(raw_val, raw_val.round())  # whole numbers 0..16: the raw samples
    recorded = trial_of(runs, STUDY, number).values[0]
    for loaded in (api.load(out), api.load(out / "model.packed")):
        assert accuracy(loaded, raw_val, data.y_val) == pytest.approx(recorded, abs=1e-9)
        with torch.no_grad():
            assert (loaded(torch.from_numpy(images.reshape(-1, 1, 8, 8))).argmax(1).numpy()
                    == own).all()
    # the bare network (training code) still takes the preprocessed inputs
    bare = api.load(out, raw_input=False)
    assert accuracy(bare, data.x_val, data.y_val) == pytest.approx(recorded, abs=1e-9)


def test_trial_best_and_the_closing_lines(runs, tmp_path, capsys):
    study = api.open_study(BUDGETED, run_dir=runs)
    done = completed(study)
    feasible = [t for t in done if is_feasible(t)]
    assert feasible and len(feasible) < len(done)  # the budget leaves some out
    best = max(feasible, key=lambda t: (t.values[0], -t.values[1]))
    out = tmp_path / "best"
    code, printed, err = nasopt(capsys, "export", BUDGETED, "--trial", "best", "--out", out,
                                "--run-dir", runs, "--format", "onnx")
    assert code == 0, err
    lines = printed.strip().splitlines()
    assert lines[0].startswith(f"picked trial {best.number} of {BUDGETED}: the best feasible "
                               f"trial by accuracy")
    assert json.loads((out / "model.json").read_text())["trial"] == best.number
    # after --format onnx alone: only the ONNX loader (nasopt.load cannot load this folder)
    assert f"onnxruntime.InferenceSession({str(out / 'model.onnx')!r})" in lines[1]
    assert "nasopt.load" not in printed
    with pytest.raises(NasoptError):
        api.load(out)
    # the closing line: inherited weights, not retrained, and the commands that train them
    assert lines[-1].startswith("weights: inherited from the supernet, not retrained")
    assert (f"nasopt finetune --study {BUDGETED} --trial {best.number} --run-dir {runs} "
            f"--out DIR") in lines[-1]
    assert f"nasopt distill {BUDGETED} --trial {best.number}" in lines[-1]
    assert "nasopt run" in lines[-1]

    # pytorch/packed: nasopt.load, named with the folder
    out2 = tmp_path / "packed"
    code, printed, err = nasopt(capsys, "export", BUDGETED, "--trial", best.number, "--out",
                                out2, "--run-dir", runs, "--format", "packed")
    assert code == 0, err
    assert f"load it with nasopt.load({str(out2)!r});" in printed
    assert "onnxruntime" not in printed
    with pytest.raises(SystemExit):  # argparse's usage error
        cli.main(["export", BUDGETED, "--trial", "worst", "--out", str(out2)])
    assert "'worst' is not a trial number or 'best'" in capsys.readouterr().err


def test_api_export_follows_the_output_folder_rule(runs, tmp_path, monkeypatch):
    study = api.open_study(STUDY, run_dir=runs)
    out = tmp_path / "held"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    with monkeypatch.context() as m:
        m.setattr(api, "rebuild", lambda *a, **k: pytest.fail("work before the folder check"))
        with pytest.raises(NasoptError, match="already holds files"):
            api.export(study, 0, out)
    assert api.export(study, "best", out, ("packed",), force=True) == out
    assert (out / "notes.txt").read_text() == "mine\n" and (out / "model.packed").exists()


def test_finetune_files_take_raw_samples(runs, tmp_path, capsys):
    out = tmp_path / "ft"
    code, _, err = nasopt(capsys, "finetune", "--study", STUDY, "--trial", "0", "--epochs", "1",
                          "--run-dir", runs, "--out", out)
    assert code == 0, err
    card = json.loads((out / "model.json").read_text())
    assert card["weights"] == "fine-tuned" and card["input"]["preprocess"]["std"] == 16.0
    images, _ = raw_digits()
    x = torch.from_numpy(images.reshape(-1, 1, 8, 8))
    with torch.no_grad():
        ref = api.load(out, raw_input=False)(x / 16).argmax(1)
        assert torch.equal(api.load(out)(x).argmax(1), ref)
        assert torch.equal(torch.jit.load(str(out / "model.ts"))(x).argmax(1), ref)
    # as a teacher (fed the preprocessed inputs training uses), model.ts predicts the same
    from nasopt.deploy.distill import load_teacher
    teacher = load_teacher(str(out / "model.ts"), None, api.SPACES)
    with torch.no_grad():
        assert torch.equal(teacher(x / 16).argmax(1), ref)


def test_trial_best_of_a_study_without_completed_trials_says_so(tmp_path):
    import optuna
    study = optuna.create_study(storage=f"sqlite:///{tmp_path}/s.db", study_name="empty")
    study.set_user_attr("nasopt", {})
    with pytest.raises(NasoptError, match="'empty' has no completed trial yet"):
        api.export(study, "best", tmp_path / "out")
    assert not (tmp_path / "out").exists()
