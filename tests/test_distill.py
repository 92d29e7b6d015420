"""Distillation, quantization-aware fine-tuning, transfer learning and `nasopt run` (tiny)."""
from __future__ import annotations

import copy
import dataclasses
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nasopt import api
from nasopt.cli.main import main
from nasopt.compression.compress import Policy, compress, quantize, dequantize, weight_layers
from nasopt.core.data import load_dataset
from nasopt.deploy.distill import (
    DistillConfig, Hint, Teachers, annealed_temperature, default_hint_layer, kd_loss,
    train_student,
)
from nasopt.core.errors import NasoptError
from nasopt.deploy.export import export_model
from nasopt.deploy.finetune import (
    FinetuneConfig, fake_quantize, finalize, finetune, prepare_qat, reheaded,
)
from nasopt.compression.packed import predicted_size
from nasopt.supernet.elastic import recalibrate_bn
from nasopt.supernet.train import TrainConfig, fit


# ---- the KD loss ------------------------------------------------------------------------------
def _np_log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def test_kd_loss_matches_hand_computed_value_and_direction():
    s = np.array([[2.0, -1.0, 0.5], [0.1, 0.2, -0.3]])
    t = np.array([[1.0, 0.0, -1.0], [-0.5, 1.5, 0.0]])
    y = np.array([0, 2])
    alpha, temp = 0.3, 2.5
    ce = -np.mean(_np_log_softmax(s)[np.arange(2), y])
    log_p_t, log_q_s = _np_log_softmax(t / temp), _np_log_softmax(s / temp)
    kl_teacher_student = np.mean(np.sum(np.exp(log_p_t) * (log_p_t - log_q_s), axis=1))
    expected = alpha * ce + (1 - alpha) * temp ** 2 * kl_teacher_student

    st, tt = torch.tensor(s, dtype=torch.float64), torch.tensor(t, dtype=torch.float64)
    got = kd_loss(st, F.softmax(tt / temp, dim=1), torch.tensor(y), alpha, temp).item()
    assert got == pytest.approx(expected, abs=1e-10)
    # the classic bug, KL(student || teacher), gives a different value: the test would catch it
    kl_student_teacher = np.mean(np.sum(np.exp(log_q_s) * (log_q_s - log_p_t), axis=1))
    swapped = alpha * ce + (1 - alpha) * temp ** 2 * kl_student_teacher
    assert abs(swapped - expected) > 1e-3
    swapped_torch = (alpha * F.cross_entropy(st, torch.tensor(y)) + (1 - alpha) * temp ** 2
                     * F.kl_div(F.log_softmax(tt / temp, 1), F.softmax(st / temp, 1),
                                reduction="batchmean")).item()
    assert abs(swapped_torch - got) > 1e-3
    assert kd_loss(st, F.softmax(tt / temp, 1), torch.tensor(y), 1.0, temp).item() == \
        pytest.approx(ce, abs=1e-10)


def test_teachers_average_weighted_soft_targets_and_annealing():
    torch.manual_seed(0)
    a, b = nn.Linear(4, 3), nn.Linear(4, 3)
    x = torch.randn(5, 4)
    teachers = Teachers([a, b], [3.0, 1.0], ["a", "b"])
    want = 0.75 * F.softmax(a(x) / 2, 1) + 0.25 * F.softmax(b(x) / 2, 1)
    assert torch.allclose(teachers.probs(x, 2.0), want, atol=1e-7)
    with pytest.raises(NasoptError, match="one weight per teacher"):
        Teachers([a], [1.0, 2.0], ["a"])
    temps = [annealed_temperature(4.0, e, 10) for e in range(10)]
    assert temps[0] == pytest.approx(4.0) and temps[-1] == pytest.approx(1.0)
    assert all(t1 > t2 for t1, t2 in zip(temps, temps[1:]))


def test_hint_loss_adapts_student_channels_to_teacher_feature(datasets):
    data = datasets["mnist1d"]
    space = api.make_space("conv1d", data)
    torch.manual_seed(0)
    student, teacher = space.build(space.smallest()), space.build(space.largest())
    hint = Hint(student, teacher, default_hint_layer(student), data.x_val)
    assert hint.adapter.in_channels == 8 and hint.adapter.out_channels == 32
    student(data.x_val[:4])
    teacher(data.x_val[:4])
    loss = hint.loss()
    loss.backward()
    assert loss.item() > 0 and hint.adapter.weight.grad is not None
    assert any(p.grad is not None for p in student.parameters())
    hint.remove()
    assert not student.get_submodule("stages.2")._forward_hooks
    with pytest.raises(NasoptError, match="hint layer"):
        Hint(student, teacher, "no.such.layer", data.x_val)


# ---- fake quantization ----------------------------------------------------------------------
def test_fake_quantize_matches_packed_quantizer_with_straight_through_gradient():
    w = torch.randn(6, 3, 5, requires_grad=True)
    out = fake_quantize(w, 4)
    assert torch.equal(out, dequantize(*quantize(w.detach(), 4)))
    assert all(len(row.unique()) <= 15 for row in out.detach().reshape(6, -1))
    g = torch.randn_like(w)
    out.backward(g)
    assert torch.equal(w.grad, g)  # STE: identity gradient
    assert fake_quantize(w, 32) is w


# ---- QAT on a real (tiny) supernet's model --------------------------------------------------
def _policy_arch(space, rng):
    arch = dict(space.sample(rng))
    arch.update({g: 4 for g in arch if g.endswith(".bits")})
    arch.update({"sparsity": 0.5, "head.rank": 0.5})
    return space.validate(arch)


def _float_model(supernet, arch, data):
    model = supernet.extract(arch)
    recalibrate_bn(model, data.x_train[:256])
    return model.eval()


def _small(data, n=256):
    return dataclasses.replace(data, x_train=data.x_train[:n], y_train=data.y_train[:n],
                               x_val=data.x_val[:128], y_val=data.y_val[:128])


def test_qat_model_equals_exported_packed_and_loaded_model(trained, tmp_path):
    space, supernet, data = trained
    arch = _policy_arch(space, random.Random(3))
    policy = Policy.from_arch(arch)
    float_model = _float_model(supernet, arch, data)
    x = data.x_val[:64]
    qat = prepare_qat(float_model, policy, space.group_of)
    with torch.no_grad():  # before training, QAT computes exactly what compress() deploys
        assert torch.equal(qat(x), compress(float_model, policy, space.group_of)[0](x))
    masks = [m.parametrizations.weight[0].mask.clone() for _, m in weight_layers(qat)]
    model, stored, history = finetune(qat, policy, space.group_of, _small(data),
                                      FinetuneConfig(epochs=2, lr=3e-3, patience=5))
    assert len(history.val_accuracy) == 2
    # masks held fixed: the stored sparsity pattern is the one global pruning chose
    for mask, layer in zip(masks, stored):
        assert torch.equal(layer.weight.mask, mask.bool())
    total = sum(m.numel() for m in masks)
    assert sum(int((~m.bool()).sum()) for m in masks) == round(0.5 * total)
    # the fine-tuned model exports exactly: packed size by formula, loaded outputs equal
    out = export_model(model, stored, arch, space, tmp_path / "exp", {}, api.SPACES)
    assert (out / "model.packed").stat().st_size == predicted_size(space, arch, stored)
    with torch.no_grad():
        ref = model(x)
        for loaded in (api.load(out), api.load(out / "model.packed")):
            assert (loaded(x) - ref).abs().max().item() < 1e-6


def test_qat_forward_equals_finalized_model_after_training(trained):
    space, supernet, data = trained
    arch = _policy_arch(space, random.Random(5))
    policy = Policy.from_arch(arch)
    qat = prepare_qat(_float_model(supernet, arch, data), policy, space.group_of)
    before = [m.parametrizations.weight.original.detach().clone() for _, m in weight_layers(qat)]
    small = _small(data)
    fit(list(qat.parameters()), lambda xb, yb: F.cross_entropy(qat(xb), yb), small.x_train,
        small.y_train, TrainConfig(1, 64, 1e-2), show_progress=False)
    assert any(not torch.equal(b, m.parametrizations.weight.original)
               for b, (_, m) in zip(before, weight_layers(qat)))
    x = data.x_val[:32]
    with torch.no_grad():
        during = qat.eval()(x)
    model, _ = finalize(qat, policy, space.group_of)  # what finetune() ends with
    with torch.no_grad():
        assert (model(x) - during).abs().max().item() < 1e-6


# ---- early stopping -------------------------------------------------------------------------
def test_early_stopping_reads_validation_never_test(datasets):
    data = _small(datasets["digits"], 300)
    space = api.make_space("mobilenet", data)
    arch = space.smallest()
    cfg = DistillConfig(epochs=3, patience=3, lr=5e-3, batch_size=64)

    def trained_with(d):
        torch.manual_seed(0)
        model = space.build(arch)
        return model, train_student(model, d, None, cfg)

    m1, h1 = trained_with(data)
    garbled = dataclasses.replace(data, y_test=torch.randint(0, 10, data.y_test.shape),
                                  x_test=torch.randn_like(data.x_test))
    m2, h2 = trained_with(garbled)
    assert h1 == h2
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(),
                                                 m2.state_dict().values()))
    best = max([h1.initial_val_accuracy] + h1.val_accuracy)
    assert h1.best_val_accuracy == best
    from nasopt.supernet.train import accuracy
    assert accuracy(m1, data.x_val, data.y_val) == pytest.approx(best)
    # a learning rate too small to change anything: stops after `patience` epochs, weights kept
    torch.manual_seed(0)
    model = space.build(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    h = train_student(model, data, None, dataclasses.replace(cfg, lr=1e-12, epochs=10, patience=2))
    assert h.stopped_early and len(h.val_accuracy) == 2 and h.best_epoch == -1
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()
               if not k.endswith("num_batches_tracked") and "running" not in k)


# ---- transfer: re-heading and frozen stages -------------------------------------------------
def test_rehead_changes_output_size_and_frozen_stages_stay(trained, tmp_path):
    space, supernet, data = trained
    arch = _policy_arch(space, random.Random(7))
    policy = Policy.from_arch(arch)
    deployed, _ = compress(_float_model(supernet, arch, data), policy, space.group_of)
    model, new_space = reheaded(deployed, space, arch, 3)
    x = data.x_val[:8]
    assert model(x).shape == (8, 3) and new_space.num_classes == 3
    old = deployed.state_dict()
    kept = [k for k, t in model.state_dict().items() if old[k].shape == t.shape]
    assert all(torch.equal(model.state_dict()[k], old[k]) for k in kept)
    assert any(not k.startswith("head") for k in kept)
    # fine-tune on three classes with the first two groups frozen
    mask = data.y_train < 3
    vmask = data.y_val < 3
    small = dataclasses.replace(data, x_train=data.x_train[mask][:200],
                                y_train=data.y_train[mask][:200], x_val=data.x_val[vmask],
                                y_val=data.y_val[vmask], num_classes=3)
    frozen = [g for g in ("stem", "s1", "s2") if g in {new_space.group_of(n)
                                                         for n, _ in weight_layers(model)}][:2]
    qat = prepare_qat(model, policy, new_space.group_of, deployed=True)
    _, stored, _ = finetune(qat, policy, new_space.group_of, small,
                            FinetuneConfig(epochs=1, lr=1e-2, patience=2, freeze=tuple(frozen)))
    moved = set()
    for layer in stored:
        diff = (layer.weight.dense() - model.state_dict()[layer.name + ".weight"]).abs().max()
        if new_space.group_of(layer.name) in frozen:
            assert diff < 1e-6, layer.name  # re-quantizing a dequantized tensor: same values
        elif diff > 1e-4:
            moved.add(new_space.group_of(layer.name))
    assert moved and not moved & set(frozen)
    with pytest.raises(NasoptError, match="unknown group"):
        finetune(prepare_qat(model, policy, new_space.group_of, deployed=True), policy,
                 new_space.group_of, small, FinetuneConfig(epochs=1, freeze=("s9",)))


def test_class_subset_and_fraction():
    d = load_dataset("digits", classes=[5, 6, 7], fraction=0.5)
    assert d.num_classes == 3 and set(d.y_train.tolist()) == {0, 1, 2}
    full = load_dataset("digits", classes=[5, 6, 7])
    assert abs(len(d.x_train) - len(full.x_train) / 2) <= 3
    assert len(d.x_test) == len(full.x_test)
    with pytest.raises(NasoptError, match="at least two distinct labels"):
        load_dataset("digits", classes=[5, 42])


# ---- the whole pipeline, tiny ---------------------------------------------------------------
TINY = """
run_dir = "{run}"
[data]
dataset = "mnist1d"
[supernet]
epochs = 2
warmup_epochs = 1
n_random = 1
[search]
space = "conv1d"
strategy = "random"
trials = 4
restrict = {{ "s1.depth" = [1], "s2.depth" = [1], "s3.depth" = [1], "s1.width" = [8, 16], "s2.width" = [8, 16], "s3.width" = [8, 16] }}
[gradient]
epochs = 3
[distill]
epochs = 2
[finetune]
epochs = 2
[export]
out = "{out}"
formats = ["pytorch", "packed", "torchscript"]
"""


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    config = root / "tiny.toml"
    config.write_text(TINY.format(run=root / "run", out=root / "model"))
    assert main(["run", str(config), "--quiet"]) == 0
    return root


def test_nasopt_run_writes_every_artifact_and_the_model_card(pipeline_run):
    out = pipeline_run / "model"
    for name in ("arch.json", "model.json", "weights.pt", "model.packed", "model.ts",
                 "metrics.json", "REPORT.md"):
        assert (out / name).exists(), name
    card = json.loads((out / "metrics.json").read_text())
    assert card["command"].startswith("nasopt run ")
    assert card["packed_bytes"] == (out / "model.packed").stat().st_size
    acc = card["test_accuracy"]
    mem = acc["fine-tuned model (in memory)"]
    for key in ("weights.pt via nasopt.load", "model.packed via nasopt.load",
                "model.ts via torch.jit.load"):
        assert acc[key] == mem  # every artifact is the fine-tuned model
    assert card["macs"] > 0 and card["params"] > 0 and "largest" in card["teacher_test_accuracy"]
    assert "Test accuracy" in (out / "REPORT.md").read_text()
    # the supernet check of the search (nasopt.search.sanity), in the card and the report
    assert 0 < card["sanity"]["majority"] < 1 and "warnings" in card["sanity"]
    assert "Supernet check (validation accuracy)" in (out / "REPORT.md").read_text()
    assert set(card["timings_s"]) == {"supernet", "search", "distill", "fine-tune", "export",
                                      "total"}
    assert card["timings_s"]["supernet"] > 0 and card["timings_s"]["search"] > 0
    # the search ran in the configured run folder, with the config's sections
    run = pipeline_run / "run"
    assert (run / "studies.db").exists() and list((run / "supernets").glob("conv1d-*.pt"))
    saved = json.loads(next((run / "configs").glob("*.json")).read_text())
    assert saved["run_dir"] == str(run) and saved["device"] == "auto"
    assert saved["gradient"]["epochs"] == 3  # the [gradient] section of the run config


def test_run_config_base_carries_every_search_section():
    from nasopt.core.config import Config
    from nasopt.pipeline import load_run_config
    cfg = load_run_config(Path(__file__).parents[1] / "configs" / "mnist1d.toml",
                          ["gradient.epochs=5", "run_dir=\"elsewhere\""])
    base = cfg.base()
    assert ({f.name for f in dataclasses.fields(Config)}
            <= {f.name for f in dataclasses.fields(type(cfg))})
    assert base.run_dir == "elsewhere" and base.gradient.epochs == 5
    assert base.search == cfg.search and base.device == cfg.device


def test_finetune_cli_transfers_to_new_classes(pipeline_run, capsys):
    out = pipeline_run / "transfer"
    assert main(["finetune", "--from", str(pipeline_run / "model"), "--dataset", "mnist1d",
                 "--classes", "5,6,7,8,9", "--fraction", "0.2", "--freeze", "s1",
                 "--epochs", "1", "--out", str(out)]) == 0
    model = api.load(out / "model.packed")
    assert model(torch.zeros(2, 1, 40)).shape == (2, 5)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["dataset"].startswith("mnist1d[5,6,7,8,9]@0.2")
    assert main(["finetune", "--from", str(pipeline_run / "model"), "--freeze", "s7",
                 "--epochs", "1", "--out", str(pipeline_run / "frozen")]) == 2
    assert "unknown group" in capsys.readouterr().err


def test_knee_of_a_front():
    from nasopt.pipeline import knee_index
    size = np.array([100.0, 200.0, 300.0, 400.0, 500.0])
    acc = np.array([0.10, 0.80, 0.85, 0.88, 0.90])
    assert knee_index(size, acc) == 1
    assert knee_index(size, np.array([0.1, 0.2, 0.3, 0.4, 0.9])) == 4  # convex: no knee


def test_load_sampler_says_whether_the_cores_were_shared():
    from nasopt_bench.report import LoadSampler
    with LoadSampler(every=0.01, busy=-1.0) as busy:
        pass
    assert busy.shared and "other jobs shared the cores" in busy.note()
    with LoadSampler(every=0.01, busy=1e9) as quiet:
        pass
    assert not quiet.shared and "were not shared" in quiet.note() and len(quiet.samples) >= 2


def test_a_run_config_drives_nasopt_search(pipeline_run, capsys):
    """`nasopt search --config` takes the pipeline's own config: the same study continues on the
    same supernet (no new training), and the run-only sections are named as left to `nasopt run`."""
    config = str(pipeline_run / "tiny.toml")
    capsys.readouterr()
    assert main(["search", "--config", config, "--trials", "6"]) == 0
    out, err = capsys.readouterr()
    assert "leaves distill, export, finetune to `nasopt run`" in err
    assert "reusing trained supernet" in err and "training the supernet" not in err.lower()
    assert "6 completed trials (2 run now" in out
    # a typo in a section the search does not use is still refused, before any work
    assert main(["search", "--config", config, "--set", "distill.epoch=3", "--quiet"]) != 0
    assert "unknown config key(s) ['distill.epoch']" in capsys.readouterr().err


def test_a_rerank_fine_tunes_the_leading_trials_and_picks_the_best_of_them(pipeline_run):
    config = str(pipeline_run / "tiny.toml")
    out = pipeline_run / "reranked"
    assert main(["run", config, "--quiet", "--set", "pick.rerank=3", "--set",
                 "pick.rerank_epochs=1", "--set", f"export.out={out}"]) == 0
    card = json.loads((out / "metrics.json").read_text())
    records = card["pick"]["reranked"]
    assert len(records) == 3 and card["pick"]["rerank"] == 3
    inherited = [r["inherited_val_accuracy"] for r in records]
    assert inherited == sorted(inherited, reverse=True)  # the rule's order: best first
    tuned = [r["short_finetune_val_accuracy"] for r in records]
    assert card["trial"] == records[tuned.index(max(tuned))]["trial"]
    assert "pick" in card["timings_s"]
    assert "re-ranked" in (out / "REPORT.md").read_text()
    from nasopt.pipeline import PickConfig
    with pytest.raises(NasoptError, match="pick.rerank"):
        PickConfig(rerank=-1)


def test_recorded_teacher_outputs_equal_the_live_ones_and_the_same_student_trains(datasets):
    """Without augmentation or a hint, the teachers' outputs on the training split are computed
    once; the student trains as with the teachers run at every step (up to rounding)."""
    from nasopt.supernet.early_stopping import train_early_stopping
    data = _small(datasets["digits"], 256)
    space = api.make_space("mobilenet", data)
    torch.manual_seed(0)
    a, b = space.build(space.largest()).eval(), space.build(space.smallest()).eval()
    teachers = Teachers([a, b], [0.7, 0.3], ["a", "b"])
    idx = torch.tensor([5, 0, 17, 3])
    rows = teachers.recorded(data.x_train)[:, idx]
    assert torch.allclose(teachers.probs(data.x_train[idx], 2.0),
                          teachers.probs(data.x_train[idx], 2.0, rows), atol=1e-6)
    assert torch.allclose(teachers.outputs(data.x_train[idx]),
                          teachers.outputs(data.x_train[idx], rows), atol=1e-5)

    calls = []
    a.register_forward_pre_hook(lambda m, args: calls.append(len(args[0])))
    cfg = DistillConfig(epochs=2, patience=2, batch_size=64, alpha=0.5, temperature=3.0)
    torch.manual_seed(1)
    student = space.build(space.smallest())
    reference = copy.deepcopy(student)
    history = train_student(student, data, teachers, cfg)
    assert sum(calls) == len(data.x_train)  # one pass over the training split, not one per step

    torch.manual_seed(cfg.seed)  # the same training with the teachers run at every step
    reference.train()
    live = train_early_stopping(
        reference, list(reference.parameters()),
        lambda x, y: kd_loss(reference(x), teachers.probs(x, 3.0), y, 0.5, 3.0),
        data, cfg.train_config(), cfg.patience)
    assert history.val_accuracy == pytest.approx(live.val_accuracy, abs=2 / len(data.y_val))
    for (name, p), q in zip(student.state_dict().items(), reference.state_dict().values()):
        if p.is_floating_point():
            assert torch.allclose(p, q, atol=1e-4), name


def test_qat_with_a_teacher_trains_on_its_soft_targets(trained):
    """finetune(teachers=...) (run config finetune.distill): alpha = 1 is the labels' loss, so
    the same weights as without a teacher; alpha = 0 learns from the teacher alone."""
    space, supernet, data = trained
    arch = _policy_arch(space, random.Random(11))
    policy = Policy.from_arch(arch)
    small = _small(data)
    teacher = _float_model(supernet, space.largest(), data)
    cfg = FinetuneConfig(epochs=1, lr=3e-3, patience=5, batch_size=64)

    def tuned(teachers, alpha):
        qat = prepare_qat(_float_model(supernet, arch, data), policy, space.group_of)
        model, _, _ = finetune(qat, policy, space.group_of, small, cfg, teachers=teachers,
                               alpha=alpha, temperature=2.0)
        return model.state_dict()

    plain = tuned(None, 0.5)
    teachers = Teachers([teacher], [1.0], ["largest"])
    labels_only = tuned(teachers, 1.0)
    assert all(torch.allclose(plain[k], labels_only[k], atol=1e-6) for k in plain)
    taught = tuned(teachers, 0.0)
    assert any(not torch.allclose(plain[k], taught[k], atol=1e-4) for k in plain
               if plain[k].is_floating_point())
