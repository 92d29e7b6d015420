"""Gradient search (DARTS / GDAS) on the relaxed conv1d supernet: the exact expected packed size,
the relaxed network at one-hot probabilities, the loop, derived archs, and the strategies
recorded as trials through `nasopt search`."""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import random

import numpy as np
import optuna
import pytest
import torch
import torch.nn.functional as F

from nasopt import api
from nasopt.cli import main as cli
from nasopt.core.config import SupernetConfig
from nasopt.compression.compress import Policy, compress
from nasopt.core.errors import NasoptError
from nasopt.search.evaluate import Evaluator
from nasopt.gradient.search import (
    Relaxation, derive, gradient_search, load_trajectory, plot_trajectory, save_trajectory,
)
from nasopt.compression.packed import predicted_size
from nasopt.gradient.relaxation import ExpectedSize, relax
from nasopt.search.study import load_study, open_storage
from nasopt.supernet.elastic import train_supernet

QUICK = SupernetConfig(epochs=2, warmup_epochs=1, batch_size=128, lr=3e-3, n_random=1)


@pytest.fixture(scope="module")
def tiny(datasets, tmp_path_factory):
    """(space, supernet, data): conv1d on a few hundred MNIST-1D samples, quickly trained."""
    torch.manual_seed(0)
    full = datasets["mnist1d"]
    data = dataclasses.replace(full, x_train=full.x_train[:384], y_train=full.y_train[:384],
                               x_val=full.x_val[:192], y_val=full.y_val[:192])
    space = api.make_space("conv1d", data)
    supernet, _ = train_supernet(space, data, QUICK, tmp_path_factory.mktemp("sn"),
                                 show_progress=False)
    return space, supernet, data


def one_hot(arch, genes) -> dict[str, torch.Tensor]:
    return {g: F.one_hot(torch.tensor(list(o).index(arch[g])), len(o)).float()
            for g, o in genes.items()}


def test_gradient_search_refuses_a_space_without_uniform_quantization(tiny):
    space, supernet, _ = tiny
    with pytest.raises(NasoptError, match=r"restrict s2.quant=uniform"):
        relax(space.restrict({"s2.quant": ["codebook"]}), supernet)


def test_expected_size_is_the_packed_size_at_one_hot(tiny):
    space, supernet, data = tiny
    relaxation = relax(space, supernet)
    assert isinstance(relaxation, Relaxation)
    assert "sparsity" not in relaxation.genes
    assert relaxation.fixed == {"sparsity": 0.0, **{f"s{i}.rank": 1.0 for i in (1, 2, 3)},
                                **{f"{g}.quant": "uniform" for g in ("s1", "s2", "s3", "head")}}
    assert "head.rank" in relaxation.genes
    evaluator = Evaluator(space, supernet, data, calib_samples=64)
    rng = random.Random(1)
    archs = [relaxation.full_arch(space.sample(rng)) for _ in range(12)]
    archs += [relaxation.full_arch(space.largest()), relaxation.full_arch(space.smallest())]
    for arch in archs:
        _, stored = evaluator.compressed(arch)
        expected = relaxation.expected_cost(one_hot(arch, relaxation.genes))["size"]
        assert expected.dtype == torch.float64
        assert float(expected) == predicted_size(space, arch, stored)


def test_expected_size_equals_the_brute_force_average(datasets):
    data = datasets["mnist1d"]
    small = {"s1.width": [8, 16], "s2.k": [3, 7], "s3.depth": [1, 3], "s2.bits": [2, 32],
             "head.bits": [4, 8], "head.rank": [0.25, 1.0]}
    full = api.make_space("conv1d", data)
    space = full.restrict({g: (small[g] if g in small else [o[0]])
                           for g, o in full.genes.items()})
    size = ExpectedSize(space, {"sparsity": 0.0})
    gen = torch.Generator().manual_seed(0)
    probs = {g: torch.randn(len(o), generator=gen, dtype=torch.float64).softmax(0)
             for g, o in size.genes.items()}
    brute = 0.0
    names = list(size.genes)
    for values in itertools.product(*(size.genes[g] for g in names)):
        arch = space.validate(dict(zip(names, values)) | {"sparsity": 0.0})
        _, stored = compress(space.build(arch), Policy.from_arch(arch), space.group_of)
        p = math.prod(float(probs[g][size.genes[g].index(v)]) for g, v in zip(names, values))
        brute += p * predicted_size(space, arch, stored)
    assert float(size(probs)) == pytest.approx(brute, rel=1e-12)
    # differentiable: the gradient of the expectation reaches every relaxed gene
    logits = {g: torch.zeros(len(o), requires_grad=True) for g, o in size.genes.items()
              if len(o) > 1}
    size({g: (logits[g].softmax(0) if g in logits else torch.ones(1))
          for g in size.genes}).backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in logits.values())


def test_one_hot_mixture_computes_the_compressed_subnet(tiny):
    space, supernet, data = tiny
    relaxation = relax(space, supernet).eval()
    x = data.x_val[:32]
    rng = random.Random(2)
    for _ in range(6):
        arch = relaxation.full_arch(space.sample(rng))
        model, _ = compress(supernet.extract(arch).eval(), Policy.from_arch(arch),
                            space.group_of)
        with torch.no_grad():
            assert torch.allclose(relaxation(x, one_hot(arch, relaxation.genes)), model(x),
                                  atol=1e-4)
    uniform = {g: torch.full((len(o),), 1 / len(o)) for g, o in relaxation.genes.items()}
    with torch.no_grad():
        assert not torch.allclose(relaxation(x, uniform), model(x), atol=1e-2)
    # the relaxation works on a copy: the supernet's weights are not its parameters
    ids = {id(p) for p in supernet.parameters()}
    assert not any(id(p) in ids for p in relaxation.weight_parameters())


def test_a_large_cost_weight_drives_the_expected_size_down(tiny, tmp_path):
    space, supernet, data = tiny
    before = {n: p.clone() for n, p in supernet.named_parameters()}
    result = gradient_search(relax(space, supernet), data, variant="darts", epochs=2,
                             lam=20.0, seed=0, batch_size=32, max_batches=3)
    sizes = [r["expected"]["size"] for r in result.trajectory]
    assert len(sizes) == 3 and sizes[-1] < 0.7 * sizes[0]
    assert all(torch.equal(before[n], p) for n, p in supernet.named_parameters())
    # the trajectory round-trips and plots
    json_path, csv_path = save_trajectory(result, tmp_path)
    again = load_trajectory(json_path)
    assert again.probs == result.probs and again.trajectory == result.trajectory
    assert csv_path.read_text().startswith("epoch,gene,option,prob")
    assert plot_trajectory(result, tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"


def test_a_size_target_is_approached_with_a_lagrange_multiplier(tiny):
    space, supernet, data = tiny
    result = gradient_search(relax(space, supernet), data, epochs=2, target=3000.0, seed=0,
                             batch_size=32, max_batches=2, dual_lr=0.5)
    first, last = result.trajectory[0], result.trajectory[-1]
    assert last["mu"] > 0 and last["expected"]["size"] < first["expected"]["size"]


@pytest.fixture(scope="module")
def synthetic_table(tiny):
    """A latency table of the tiny space whose unit entries are a synthetic cost per unit."""
    import zlib

    from nasopt.hardware import profile as hardware, lut
    space = tiny[0]
    return lut.build_table(space, hardware.load_profile("cpu-ort"),
                           time_unit=lambda u: (zlib.crc32(u.key.encode()) % 997 + 3) / 1e4,
                           measure_arch=lambda a: (1.0, 0.0), fit_archs=0)


def test_expected_latency_is_the_predicted_latency_at_one_hot(tiny, synthetic_table):
    space, supernet, _ = tiny
    relaxation = relax(space, supernet, latency=synthetic_table)
    rng = random.Random(3)
    for _ in range(10):
        arch = relaxation.full_arch(space.sample(rng))
        cost = relaxation.expected_cost(one_hot(arch, relaxation.genes))
        assert float(cost["latency"]) == pytest.approx(synthetic_table.predict(space, arch),
                                                       rel=1e-5)
    assert "latency" not in relax(space, supernet).expected_cost(
        one_hot(arch, relaxation.genes))


def test_a_latency_budget_is_a_second_lagrangian_term(tiny, synthetic_table):
    space, supernet, data = tiny
    relaxation = relax(space, supernet, latency=synthetic_table)
    uniform = gradient_search(relaxation, data, epochs=1, seed=0, batch_size=32, max_batches=1,
                              lr_alpha=0.0).trajectory[0]["expected"]["latency"]
    result = gradient_search(relax(space, supernet, latency=synthetic_table), data, epochs=3,
                             target=1e9, targets={"latency": 0.5 * uniform}, seed=0,
                             batch_size=32, max_batches=4, dual_lr=0.5, lr_alpha=0.1)
    first, last = result.trajectory[0], result.trajectory[-1]
    assert last["mus"]["latency"] > 0 and last["mus"]["size"] == 0  # size far under 1e9 B
    assert last["expected"]["latency"] < 0.9 * first["expected"]["latency"]
    with pytest.raises(NasoptError, match="no expected cost 'latency'"):
        gradient_search(relax(space, supernet), data, epochs=1, targets={"latency": 1.0},
                        max_batches=1)
    from nasopt.gradient.run import further_targets
    from nasopt.core.objectives import get_constraints
    with pytest.raises(NasoptError, match="needs predicted latency"):
        further_targets(get_constraints({"latency": "0.1ms"}), None)
    assert further_targets(get_constraints({"latency": "0.1ms", "size": "4KB"}),
                           synthetic_table) == {"latency": pytest.approx(0.1)}


def test_expected_peak_memory_is_the_peak_at_one_hot_and_a_budget_pulls_it_down(tiny):
    from nasopt.hardware.memory import arch_peak_bytes
    space, supernet, data = tiny
    relaxation = relax(space, supernet, sram_dtype="int8")
    rng = random.Random(4)
    for _ in range(15):
        arch = relaxation.full_arch(space.sample(rng))
        cost = relaxation.expected_cost(one_hot(arch, relaxation.genes))
        assert float(cost["sram"]) == arch_peak_bytes(space, arch, "int8")
    first = float(relaxation.expected_cost(
        {g: torch.full((len(o),), 1 / len(o)) for g, o in relaxation.genes.items()})["sram"])
    # the cost lives on the logits' device (CUDA in a search with --device auto; meta here)
    on_meta = relaxation.expected_cost(
        {g: torch.full((len(o),), 1 / len(o), device="meta") for g, o in relaxation.genes.items()})
    assert on_meta["sram"].device.type == "meta"
    result = gradient_search(relaxation, data, epochs=3, targets={"sram": 0.5 * first}, seed=0,
                             batch_size=32, max_batches=4, dual_lr=0.5, lr_alpha=0.1)
    last = result.trajectory[-1]
    assert result.trajectory[0]["expected"]["sram"] == pytest.approx(first)
    assert last["mus"]["sram"] > 0 and last["expected"]["sram"] < 0.9 * first
    from nasopt.gradient.run import further_targets
    from nasopt.core.objectives import get_constraints
    with pytest.raises(NasoptError, match="counts SRAM"):
        further_targets(get_constraints({"sram": "2KB"}))
    assert further_targets(get_constraints({"sram": "2KB"}), sram_dtype="int8") == {
        "sram": 2048.0}


def test_gdas_samples_hard_archs_and_anneals(tiny):
    space, supernet, data = tiny
    result = gradient_search(relax(space, supernet), data, variant="gdas", epochs=2, lam=1.0,
                             seed=0, batch_size=32, max_batches=2, tau=(4.0, 1.0))
    assert [r["tau"] for r in result.trajectory] == [None, 4.0, 1.0]
    assert all(abs(sum(p) - 1) < 1e-6 for p in result.probs.values())
    assert result.probs != result.trajectory[0]["probs"]  # the logits moved
    with pytest.raises(NasoptError, match="unknown gradient variant"):
        gradient_search(relax(space, supernet), data, variant="enas", epochs=1)


def test_derive_gives_the_k_most_probable_archs():
    genes = {"a": ("x", "y", "z"), "b": (1, 2), "c": (True, False)}
    probs = {"a": [0.5, 0.3, 0.2], "b": [0.35, 0.65], "c": [0.9, 0.1]}
    top = derive(probs, 5, genes)
    brute = sorted(((dict(zip(genes, v)),
                     math.prod(probs[g][genes[g].index(x)] for g, x in zip(genes, v)))
                    for v in itertools.product(*genes.values())), key=lambda t: -t[1])
    assert top[0][0] == {"a": "x", "b": 2, "c": True}  # the argmax arch first
    assert [p for _, p in top] == pytest.approx([p for _, p in brute[:5]])
    assert len({tuple(a.values()) for a, _ in top}) == 5
    assert len(derive(probs, 100, genes)) == 12  # no more than the space holds


def fast(data_path) -> list[str]:
    """A quick conv1d search: a 600-sample MNIST-1D file, narrow stages, one short epoch."""
    return ["--space", "conv1d", "--dataset", str(data_path), "--quiet",
            "--set", "supernet.epochs=2", "--set", "supernet.warmup_epochs=1",
            "--set", "supernet.n_random=1", "--set", "gradient.epochs=1",
            "--set", "gradient.max_batches=2", "--set", "eval.calib_samples=128",
            *[a for s in (1, 2, 3) for a in ("--restrict", f"s{s}.width=8,16")],
            "--restrict", "head.bits=8", "--restrict", "sparsity=0,0.5"]


def test_darts_trials_are_recorded_reproducible_restricted_and_resumed(datasets, tmp_path,
                                                                    capsys):
    full = datasets["mnist1d"]
    data_path = tmp_path / "mnist1d_small.npz"
    np.savez(data_path, x=full.x_train[:600, 0].numpy(), y=full.y_train[:600].numpy())

    def run(study: str, trials: int, *extra: str) -> list[optuna.trial.FrozenTrial]:
        assert cli.main(["search", *fast(data_path), "--strategy", "darts", "--study", study, "--trials",
                         str(trials), "--run-dir", str(tmp_path), "--max-size", "6KB",
                         *extra]) == 0
        return load_study(open_storage(f"sqlite:///{tmp_path}/studies.db"), study).trials

    first = run("a", 3)
    assert len(first) == 3 and all(t.state == optuna.trial.TrialState.COMPLETE for t in first)
    for t in first:
        assert t.user_attrs["strategy"] == "darts"
        assert t.params["s3.width"] in (8, 16) and t.params["head.bits"] == 8
        assert t.params["sparsity"] == 0.0  # not relaxed: its smallest allowed option
        assert t.user_attrs["metrics"]["compressed_bytes"] == t.values[1]
    assert len({t.user_attrs["arch"] for t in first}) == 3  # distinct derived archs
    saved = list((tmp_path / "gradient" / "a").glob("darts-*"))
    assert {p.suffix for p in saved} == {".json", ".csv", ".png"}
    # the same command again: nothing lost, nothing duplicated; a larger budget adds new archs
    assert [t.params for t in run("a", 3)] == [t.params for t in first]
    more = run("a", 5)
    assert len(more) == 5 and len({t.user_attrs["arch"] for t in more}) == 5
    assert [t.params for t in more[:3]] == [t.params for t in first]
    # the same seed in another study derives the same archs (the supernet is reused)
    assert [t.params for t in run("b", 3)] == [t.params for t in first]
    # an SRAM budget (mcu profile) is a Lagrangian term of the search, and checked per trial
    hw = run("c", 2, "--hardware", "mcu", "--max-sram", "400B")
    assert all("sram_bytes" in t.user_attrs["metrics"] for t in hw)
    saved = json.loads(next((tmp_path / "gradient" / "c").glob("darts-*.json")).read_text())
    assert "sram" in saved["trajectory"][-1]["mus"] and "sram" in saved["trajectory"][-1]["expected"]
    capsys.readouterr()


def test_gradient_strategies_are_listed_and_refused_where_they_cannot_run(tmp_path, capsys):
    assert cli.main(["strategies"]) == 0
    out = capsys.readouterr().out
    assert "darts" in out and "gdas" in out
    assert cli.main(["search", "--space", "mobilenet", "--dataset", "digits", "--strategy",
                     "gdas", "--trials", "2", "--quiet", "--run-dir", str(tmp_path)]) != 0
    assert "no relaxation" in capsys.readouterr().err
    assert not (tmp_path / "supernets").exists()  # refused before any training


def test_relaxation_is_a_capability_of_the_space_class_not_of_its_name():
    """A user's subclass of the conv1d space inherits its relaxation; a space that defines none
    is refused by class."""
    from nasopt.core.errors import NasoptError
    from nasopt.gradient.relaxation import check_space
    from nasopt.spaces.conv1d import Conv1dSpace
    from nasopt.spaces.mobilenet import MobileNetSpace

    narrow = type("NarrowConv1d", (Conv1dSpace,), {"name": "narrow-conv1d"})
    check_space(narrow)
    assert narrow.relaxable() and not MobileNetSpace.relaxable()
    with pytest.raises(NasoptError, match="'mobilenet' has no relaxation"):
        check_space(MobileNetSpace)


def test_derived_sampler_skips_archs_another_worker_holds():
    """Workers on one study derive the same list: each takes the archs no trial holds yet."""
    import optuna
    from nasopt.core.arch import Arch
    from nasopt.gradient.run import DerivedSampler
    dist = optuna.distributions.CategoricalDistribution([1, 2, 3])
    archs = [Arch({"a": v}) for v in (1, 2, 3)]
    study = optuna.create_study()
    study.add_trial(optuna.trial.create_trial(params={"a": 1}, distributions={"a": dist},
                                              value=0.5))  # a finished trial of another worker
    study.enqueue_trial({"a": 2})
    assert study.ask({"a": dist}).params == {"a": 2}  # RUNNING, also another worker's
    study.sampler = DerivedSampler(archs)
    assert study.ask().suggest_categorical("a", [1, 2, 3]) == 3
