"""The ``staged`` strategy: architecture moves at the reference compression (int8, dense, full
rank), then architecture and compression moves around the front, no repeats; on the conv1d joint space with a cheap
closed-form evaluator (the strategy only sees metrics, so no supernet is needed)."""
from __future__ import annotations

import itertools

import numpy as np
import optuna

from nasopt.core.arch import Arch
from nasopt.compression.compress import reference_compression
from nasopt.core.metrics import Metrics
from nasopt.core.objectives import get_objectives
from nasopt.search.loop import run_search
from nasopt.spaces.conv1d import Conv1dSpace
from nasopt.strategies import STRATEGIES
from nasopt.strategies import staged, surrogate
from nasopt.strategies.front import front
from nasopt.strategies.staged import INITIAL, TOP_PART, StagedSampler, leading
from nasopt.strategies.surrogate import Surrogate


def space() -> Conv1dSpace:
    return Conv1dSpace((1, 40), 10)


def synthetic(arch: Arch) -> Metrics:
    """Accuracy grows with width and depth and drops with aggressive compression; size follows
    the bits. Deterministic, so the test can reason about fronts."""
    width = sum(int(arch[f"s{s}.width"]) * int(arch[f"s{s}.depth"]) for s in (1, 2, 3))
    bits = [int(v) for g, v in arch.items() if g.endswith(".bits")]
    penalty = sum(0.05 for b in bits if b <= 4) + 0.1 * float(arch["sparsity"])
    acc = min(1.0, width / 300) - penalty
    size = width * 20 * sum(bits) / len(bits) / 8 * (1 - float(arch["sparsity"]) / 2)
    return Metrics(accuracy=acc, params=width * 20, macs=width * 400, float_bytes=width * 80,
                   compressed_bytes=int(size), nonzero_params=width * 20)


def run(seed: int, trials: int, sp=None, study=None) -> optuna.Study:
    sp = sp or space()
    objs = get_objectives(["accuracy", "size"])
    study = study or optuna.create_study(directions=[o.direction for o in objs],
                                         sampler=StagedSampler(sp, seed=seed))
    run_search(study, sp, synthetic, objs, trials, show_progress=False)
    return study


def test_reference_compression_is_int8_dense_full_rank_or_closest():
    genes = space().compression_genes()
    ref = reference_compression(genes)
    assert ref == {**{g: 8 for g in genes if g.endswith(".bits")}, "sparsity": 0.0,
                   **{g: 1.0 for g in genes if g.endswith(".rank")},
                   **{g: "uniform" for g in genes if g.endswith(".quant")}}
    assert reference_compression({"s1.bits": (2, 4), "head.rank": (0.25, 0.5)}) == \
        {"s1.bits": 4, "head.rank": 0.5}


def test_moves_are_architecture_at_int8_or_compression_around_the_front():
    sp = space()
    study = run(0, 120)
    compression = set(sp.compression_genes())
    ref = reference_compression(sp.compression_genes())
    trials = study.trials
    at_ref = [t for t in trials if all(t.params[g] == v for g, v in ref.items())]
    # the initial trials (after Optuna's first, random one) are random archs at int8
    assert all(t in at_ref for t in trials[1:INITIAL])
    kinds = {"arch": 0, "compression": 0}
    for t in trials[INITIAL:]:
        earlier = trials[: t.number]
        if t in at_ref:
            kinds["arch"] += 1
            continue
        # a compression move (some earlier trial has the same architecture genes) or an
        # architecture move at an earlier trial's compression (the same compression genes)
        same_arch = any(all(e.params[g] == t.params[g] for g in t.params if g not in compression)
                        for e in earlier)
        same_compression = any(all(e.params[g] == t.params[g] for g in compression)
                               for e in earlier)
        assert same_arch or same_compression, t.number
        kinds["compression" if same_arch else "arch"] += 1
    assert kinds["arch"] > 20 and kinds["compression"] > 20, kinds
    # no arch is evaluated twice
    assert len({tuple(sorted(t.params.items())) for t in trials}) == len(trials)


def test_same_seed_same_trials_and_resume_continues():
    a = [t.params for t in run(3, 40).trials]
    b = [t.params for t in run(3, 40).trials]
    assert a == b
    study = run(3, 25)
    run(3, 40, study=study)
    assert len(study.trials) == 40


def test_registered_with_a_description():
    assert "staged" in STRATEGIES and "int8" in STRATEGIES["staged"].description


def test_budget_splits_the_search_into_an_architecture_then_a_compression_phase():
    sp = space()
    study = run(1, 80)  # run_search tells the sampler its budget: 40 + 40
    ref = reference_compression(sp.compression_genes())
    at_ref = [all(t.params[g] == v for g, v in ref.items()) for t in study.trials]
    # phase 2 moves compression genes, or architecture genes at a front member's compression
    # (at int8 when that member is: those are the only phase-2 trials at the reference)
    assert all(at_ref[1:40]) and sum(not r for r in at_ref[40:]) >= 20
    sampler = StagedSampler(sp, seed=0)
    assert sampler.budget is None
    sampler.plan(10)
    assert sampler.budget == 10


def test_compression_phase_moves_architecture_or_shifts_every_bit_width_or_steps_genes():
    sp = space()
    study = run(2, 160)  # budget 160: trials 80.. are the compression phase
    genes = sp.genes
    compression = list(sp.compression_genes())
    bits = [g for g in compression if g.endswith(".bits")]
    kinds = {"arch": 0, "shift": 0, "step": 0}
    for t in study.trials[80:]:
        parents = [e for e in study.trials[: t.number]
                   if all(e.params[g] == t.params[g] for g in t.params if g not in compression)]
        if not parents:  # an architecture move: an earlier trial's compression, a new arch
            assert any(all(e.params[g] == t.params[g] for g in compression)
                       for e in study.trials[: t.number]), t.number
            kinds["arch"] += 1
            continue

        def offsets(e):
            return {g: genes[g].index(t.params[g]) - genes[g].index(e.params[g])
                    for g in compression if t.params[g] != e.params[g]}

        moves = [offsets(e) for e in parents]
        if any(m and set(m) <= set(bits) and set(m.values()) == {-1} for m in moves):
            kinds["shift"] += 1  # bit-widths one option lower (those that could go lower)
        elif any(1 <= len(m) <= 2 and all(abs(v) == 1 for v in m.values()) for m in moves):
            kinds["step"] += 1  # one or two genes, each to a neighbouring option
        else:  # an architecture move onto an architecture evaluated before at another compression
            assert any(all(e.params[g] == t.params[g] for g in compression)
                       for e in study.trials[: t.number]), (t.number, moves)
            kinds["arch"] += 1
    assert kinds["arch"] > 20 and kinds["shift"] > 8 and kinds["step"] > 8, kinds


def test_leading_is_the_best_part_of_the_front_by_the_first_objective():
    maximize, minimize = optuna.study.StudyDirection.MAXIMIZE, optuna.study.StudyDirection.MINIMIZE
    members = [optuna.trial.create_trial(values=[acc, size]) for acc, size in
               ((0.5, 100.0), (0.9, 900.0), (0.7, 300.0), (0.8, 500.0), (0.6, 200.0))]
    assert [t.values[0] for t in leading(members, [maximize, minimize], 0.25)] == [0.9, 0.8]
    assert [t.values[0] for t in leading(members, [minimize, minimize], 0.25)] == [0.5, 0.6]
    assert len(leading(members[:1], [maximize, minimize], 0.25)) == 1
    assert leading([], [maximize, minimize], 0.25) == []


def test_compression_phase_draws_half_its_parents_from_the_most_accurate_quarter(monkeypatch):
    sp = space()
    study = run(4, 100)
    done = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    parents = front(done, study.directions)
    top = leading(parents, study.directions, TOP_PART)
    assert 1 < len(top) < len(parents)
    architecture = [g for g in sp.genes if g not in set(sp.compression_genes())]
    archs = lambda members: {tuple(t.params[g] for g in architecture) for t in members}  # noqa
    choices = {g: list(o) for g, o in sp.genes.items()}

    def share() -> float:
        """Share of compression-phase proposals with the architecture of a leading member
        (compression moves keep their parent's architecture; architecture moves change it)."""
        sampler = StagedSampler(sp, seed=0)
        sampler.plan(100)  # the study holds 100 trials: the compression phase
        children = [sampler.propose(done, parents, top, lambda: None, choices)
                    for _ in range(2000)]
        return np.mean([tuple(c[g] for g in architecture) in archs(top) for c in children])

    t = staged.TOP_SHARE
    with_top = share()
    monkeypatch.setattr(staged, "TOP_SHARE", 0.0)
    without = share()
    # compression moves are half the children (ARCH_MOVES); a share TOP_SHARE of their parents
    # come from the leading part, the others from the whole front (whose members have a
    # leading member's architecture with probability q)
    q = np.mean([tuple(p.params[g] for g in architecture) in archs(top) for p in parents])
    assert t > 0 and abs(without - 0.5 * q) < 0.05, (without, q)
    assert abs(with_top - 0.5 * (t + (1 - t) * q)) < 0.05, (with_top, t, q)


def test_sweep_picks_the_unevaluated_int8_arch_the_surrogate_ranks_furthest_beyond_the_front():
    # a smaller architecture grid (2 x 2 x 2 per stage: 512 archs), so the test can rank every
    # one of them itself through the surrogate's public predict()
    sp = space().restrict({f"s{s}.{g}": o for s in (1, 2, 3)
                           for g, o in (("depth", [1, 2]), ("k", [3, 5]), ("width", [8, 16]))})
    study = run(5, 60, sp)
    done = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    parents = front(done, study.directions)
    choices = {g: list(o) for g, o in sorted(sp.genes.items())}
    ref = reference_compression(sp.compression_genes())
    architecture = [g for g in choices if g not in ref]
    evaluated = {tuple(t.params[g] for g in architecture) for t in done
                 if all(t.params[g] == v for g, v in ref.items())}
    unevaluated = [dict(zip(architecture, combo), **ref) for combo in
                   itertools.product(*(choices[g] for g in architecture))
                   if combo not in evaluated]
    assert 0 < len(unevaluated) < 512
    sampler = StagedSampler(sp, seed=5)
    child = sampler._sweep(done, parents, study.directions, choices, ref)
    model = Surrogate(choices, seed=5)
    model.fit(done, study.directions)
    expected = unevaluated[int(np.argmax(surrogate.scores(
        model, *model.predict(unevaluated), parents, study.directions)))]
    assert child == expected
    # a grid over SWEEP_MAX is not swept (the NSGA-II proposals are screened instead)
    staged.SWEEP_MAX, old = 511, staged.SWEEP_MAX
    try:
        assert StagedSampler(sp, seed=5)._sweep(done, parents, study.directions, choices,
                                                ref) is None
    finally:
        staged.SWEEP_MAX = old


def test_architecture_phase_children_are_new_int8_archs_with_or_without_the_sweep(monkeypatch):
    sp = space()
    ref = reference_compression(sp.compression_genes())
    assert staged.SWEEP > 0  # on by default
    swept, sweep = [], StagedSampler._sweep

    def counted(self, *args, **kwargs):
        child = sweep(self, *args, **kwargs)
        swept.append(child is not None)
        return child

    monkeypatch.setattr(StagedSampler, "_sweep", counted)
    runs = []
    for share in (staged.SWEEP, 0.0):
        monkeypatch.setattr(staged, "SWEEP", share)
        swept.clear()
        trials = run(6, 80).trials  # 40 + 40; trial 0 is Optuna's random first one
        assert all(all(t.params[g] == v for g, v in ref.items()) for t in trials[1:40])
        assert len({tuple(sorted(t.params.items())) for t in trials}) == len(trials)
        runs.append(([t.params for t in trials], sum(swept)))
    # with the sweep, most of the 24 architecture-phase children after the 16 random ones are
    # swept; without it, none; and the trials differ
    assert runs[0][1] >= 15 and runs[1][1] == 0 and runs[0][0] != runs[1][0]


def test_sweep_finds_the_one_int8_arch_left_and_skips_those_being_evaluated():
    # unequal option counts (3, 2 and 1 options), so a wrong flat index cannot go unnoticed
    sp = space().restrict({f"s{s}.{g}": o for s in (1, 2, 3)
                           for g, o in (("depth", [1, 2, 3]), ("k", [3, 5]), ("width", [16]))})
    objs = get_objectives(["accuracy", "size"])
    study = optuna.create_study(directions=[o.direction for o in objs])
    choices = {g: list(o) for g, o in sorted(sp.genes.items())}
    ref = reference_compression(sp.compression_genes())
    architecture = [g for g in choices if g not in ref]
    combos = list(itertools.product(*(choices[g] for g in architecture)))
    assert len(combos) == 216
    left = combos[137]
    dists = {g: optuna.distributions.CategoricalDistribution(o) for g, o in choices.items()}
    for combo in combos:
        if combo != left:
            params = {**dict(zip(architecture, combo)), **ref}
            m = synthetic(sp.validate(params))
            study.add_trial(optuna.trial.create_trial(
                params=params, distributions=dists,
                values=[m.accuracy, float(m.compressed_bytes)]))
    done = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    parents = front(done, study.directions)
    sampler = StagedSampler(sp, seed=0)
    child = sampler._sweep(done, parents, study.directions, choices, ref)
    assert child == {**dict(zip(architecture, left)), **ref}
    # the last one being evaluated by another worker: nothing left to sweep
    busy = optuna.trial.create_trial(params=child, distributions=dists,
                                     state=optuna.trial.TrialState.RUNNING)
    assert sampler._sweep(done, parents, study.directions, choices, ref, [busy]) is None
