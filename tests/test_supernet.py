from __future__ import annotations

import dataclasses

import pytest
import torch

from nasopt import api
from nasopt.core.config import SupernetConfig
from nasopt.supernet.elastic import recalibrate_bn, supernet_key, train_supernet


@pytest.fixture
def small_digits(datasets):
    d = datasets["digits"]
    return dataclasses.replace(d, x_train=d.x_train[:256], y_train=d.y_train[:256])


def _space(data):
    # a small sub-space keeps these tests quick
    return api.make_space("mobilenet", data, {"stem.width": [8], **{
        f"s{s}.{gene}": [value] for s in (1, 2, 3) for gene, value in (("expand", 2), ("k", 3))}})


def test_recalibration_sets_bn_stats_to_the_data_statistics():
    model = torch.nn.Sequential(torch.nn.Conv1d(1, 4, 3, padding=1), torch.nn.BatchNorm1d(4))
    x = torch.randn(512, 1, 20) * 3 + 1
    recalibrate_bn(model, x, batch_size=128)
    feats = model[0](x).detach().transpose(0, 1).reshape(4, -1)
    assert torch.allclose(model[1].running_mean, feats.mean(1), atol=1e-4)
    # the cumulative average of per-batch (unbiased) variances is close to the full variance
    assert torch.allclose(model[1].running_var, feats.var(1), rtol=0.05)


def test_checkpoint_is_reused_for_the_same_key_and_not_for_another(small_digits, tmp_path):
    space = _space(small_digits)
    cfg = SupernetConfig(epochs=2, warmup_epochs=1, n_random=1)
    first, path = train_supernet(space, small_digits, cfg, tmp_path, show_progress=False)
    assert path.exists() and supernet_key(space, small_digits.fingerprint, cfg) in path.name
    logs: list[str] = []
    second, path2 = train_supernet(space, small_digits, cfg, tmp_path, show_progress=False,
                                   log=logs.append)
    assert path2 == path and any("reusing" in line for line in logs)
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)
    other = dataclasses.replace(cfg, lr=0.01)
    assert supernet_key(space, small_digits.fingerprint, other) != \
        supernet_key(space, small_digits.fingerprint, cfg)
    assert supernet_key(space.restrict({"s1.depth": [1]}), small_digits.fingerprint, cfg) != \
        supernet_key(space, small_digits.fingerprint, cfg)


def test_killed_training_resumes_from_its_epoch_checkpoint(small_digits, tmp_path):
    space = _space(small_digits)
    cfg = SupernetConfig(epochs=3, warmup_epochs=1, n_random=1)
    straight, _ = train_supernet(space, small_digits, cfg, tmp_path / "a", show_progress=False)

    key = supernet_key(space, small_digits.fingerprint, cfg)
    partial_run = tmp_path / "c"
    logs: list[str] = []

    class Stop(Exception):
        pass

    import nasopt.supernet.elastic as sn
    original = sn.checkpoint.save
    calls = {"n": 0}

    def save_then_die(obj, path):
        original(obj, path)
        calls["n"] += 1
        if calls["n"] == 2:  # after the second epoch's checkpoint: the process "dies"
            raise Stop

    sn.checkpoint.save = save_then_die
    try:
        with pytest.raises(Stop):
            train_supernet(space, small_digits, cfg, partial_run, show_progress=False)
    finally:
        sn.checkpoint.save = original
    assert (partial_run / f"{space.name}-{key}.partial.pt").exists()
    resumed, _ = train_supernet(space, small_digits, cfg, partial_run, show_progress=False,
                                log=logs.append)
    assert any("resuming supernet training at epoch 3" in line for line in logs)
    assert not (partial_run / f"{space.name}-{key}.partial.pt").exists()
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), name


def test_sandwich_training_learns(datasets, tmp_path):
    digits = datasets["digits"]
    space = _space(digits)
    untrained = space.supernet()
    trained, _ = train_supernet(space, digits, SupernetConfig(epochs=8, warmup_epochs=2,
                                                              batch_size=64, n_random=2),
                                tmp_path, show_progress=False)
    from nasopt.search.evaluate import Evaluator
    arch_space = space.architecture_space()
    ev_trained = Evaluator(arch_space, trained, digits)
    ev_untrained = Evaluator(arch_space, untrained.eval(), digits)
    for arch in (arch_space.largest(), arch_space.smallest()):
        assert ev_trained(arch).accuracy > ev_untrained(arch).accuracy + 0.3
