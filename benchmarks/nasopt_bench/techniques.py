"""``nasopt bench techniques``: codebook (non-uniform) quantization and the decomposition of k-tap
convolutions, each searched with and without, at equal evaluations.

Both techniques are opt-in genes (``SearchSpace.opt_in_genes``). One supernet per dataset,
trained on the full space (every technique's options drawn during training); then the same
strategy and seeds search each sub-space on it:

- ``uniform``: every ``<group>.quant`` at ``uniform`` and the stage convolutions at full rank
  (``sN.rank = 1``; the linear head's and 1x1 layers' ranks stay searched): the default space;
- ``+codebook``: the quantizer searched too;
- ``+decomposition``: the stage convolutions' rank searched too (conv1d only: mobilenet's
  non-depthwise k x k convolution is its stem alone, which has no rank gene);
- ``+both``: the full space.

Per search: the hypervolume of (validation accuracy, packed bytes), the best validation accuracy
at or under each size budget, and the share of the front's archs that use the technique. Each
variant's best arch under each budget (over all its seeds, by validation accuracy) is then
measured once on the test split, inherited weights, compressed as scored (no fine-tuning). The
search reads only the train and validation splits.

What drawing the techniques in training costs the supernet: a second supernet, trained on the
default space (the recipe a search without them uses), beside the first; the mean inherited
validation accuracy of the same random archs on each, and the ``uniform`` search run on it too.
"""
from __future__ import annotations

import argparse
import copy
import json
import random
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import torch

from nasopt import api
from nasopt.core.objectives import get_objectives, hypervolume
from nasopt.search.evaluate import Evaluator
from nasopt.search.loop import run_search
from nasopt.supernet.elastic import train_supernet
from nasopt.supernet.train import correct
from nasopt_bench.compression import pareto
from nasopt_bench.report import LoadSampler, machine, table

#: the default space searched on the supernet trained on it (not on the full space)
DEFAULT_SUPERNET = "uniform, default-space supernet"
#: dataset -> (space, budgets in KB, hypervolume reference in KB)
PARTS = {"mnist1d": ("conv1d", (2, 4), 16), "fashion-mnist": ("mobilenet", (2, 4, 16), 64)}
#: a part of its own: channel SVD beside Tucker-2 (``--parts decompositions``)
DECOMPOSITION_PART = "decompositions"
VARIANTS = ("uniform", "+codebook", "+decomposition", "+both")


def add_arguments(q: argparse.ArgumentParser) -> None:
    q.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated among "
                   f"{', '.join(PARTS)} (default) and {DECOMPOSITION_PART} (channel SVD beside "
                   f"Tucker-2 at equal parameters on the conv1d supernet)")
    q.add_argument("--evaluations", type=int, default=300, help="per search (default 300)")
    q.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per variant (default 3)")
    q.add_argument("--strategy", default="nsga2", help="the search strategy (default nsga2)")
    q.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="config override for every part, e.g. --set supernet.epochs=20")
    q.add_argument("--fashion-set", action="append", default=["supernet.epochs=4",
                   "supernet.warmup_epochs=1", "supernet.n_random=1"],
                   metavar="SECTION.KEY=VALUE", help="overrides for the Fashion-MNIST part "
                   "(default: a 4-epoch supernet, a shorter recipe than the headline's 14)")
    q.add_argument("--probe-archs", type=int, default=100, help="random archs of each space "
                   "scored on both supernets (default 100)")
    q.add_argument("--run-dir", default="runs", help="where supernet checkpoints are cached")
    q.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    q.add_argument("--out", default="results/techniques.md", help="report path")


def restrictions(space, variant: str) -> dict[str, list]:
    """The sub-space of ``variant``: the techniques it leaves out restricted away."""
    codebook = "codebook" in TECHNIQUES[variant]
    decomposition = "decomposition" in TECHNIQUES[variant]
    conv_ranks = conv_rank_genes(space)
    full = space.full_genes()
    out: dict[str, list] = {}
    for gene in space.genes:
        if gene.endswith(".quant"):
            out[gene] = list(full[gene]) if codebook else ["uniform"]
        elif gene in conv_ranks:
            out[gene] = list(full[gene]) if decomposition else [1.0]
    return out


def conv_rank_genes(space) -> list[str]:
    """The rank genes of groups holding a non-depthwise convolution of more than one tap: what
    the decomposition adds to the space."""
    from nasopt.compression.compress import weight_layers
    space = space.full_space()
    model = space.build(space.largest())
    out = set()
    for name, module in weight_layers(model):
        kernel = getattr(module, "kernel_size", (1,))
        if getattr(module, "groups", 1) == 1 and any(k > 1 for k in kernel):
            gene = f"{space.group_of(name)}.rank"
            if gene in space.genes:
                out.add(gene)
    return sorted(out)


#: the techniques each variant searches
TECHNIQUES = {"uniform": (), "+codebook": ("codebook",), "+decomposition": ("decomposition",),
              "+both": ("codebook", "decomposition")}


def uses(arch: dict, variant: str, conv_ranks: list[str]) -> bool:
    """Whether ``arch`` uses one of ``variant``'s techniques (a codebook below 32 bits, a stage
    convolution below full rank)."""
    for technique in TECHNIQUES[variant]:
        if technique == "codebook" and any(
                v == "codebook" and int(arch[g[:-6] + ".bits"]) < 32
                for g, v in arch.items() if g.endswith(".quant")):
            return True
        if technique == "decomposition" and any(float(arch[g]) < 1.0 for g in conv_ranks):
            return True
    return False


def run(args: argparse.Namespace) -> Path:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    if args.threads:
        torch.set_num_threads(args.threads)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    bad = [p for p in parts if p not in PARTS and p != DECOMPOSITION_PART]
    if bad:
        raise SystemExit(f"unknown part(s) {bad}; choose among "
                         f"{', '.join([*PARTS, DECOMPOSITION_PART])}")
    sections, raw = [], {}
    with LoadSampler() as load:
        t_all = time.perf_counter()
        for part in parts:
            text, record = (decompositions(args, log) if part == DECOMPOSITION_PART
                            else _part(part, args, log))
            sections.append(text)
            raw[part] = record
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "nasopt bench techniques " + " ".join(shlex.quote(a) for a in sys.argv[3:])
    head = [
        "# Codebook quantization and convolution decomposition, with and without",
        "",
        f"Machine: {machine()}; {load.note()} Total wall time {time.perf_counter() - t_all:.0f} s.",
        "",
        f"Command: `{command}`.",
        "",
        __doc__.split("\n\n", 1)[1].strip(),
        "",
    ]
    out.write_text("\n".join(head + sections) + "\n")
    out.with_suffix(".json").write_text(json.dumps(raw, indent=1, default=str) + "\n")
    return out


def _part(part: str, args: argparse.Namespace, log) -> tuple[str, dict]:  # noqa: ANN001
    space_name, budgets, ref_kb = PARTS[part]
    overrides = [f"data.dataset={part}", f"search.space={space_name}", *args.set]
    if part == "fashion-mnist":
        overrides += args.fashion_set
    cfg = api.load_config(None, overrides)
    data = api.load_data(cfg)
    default = api.make_space(space_name, data)
    space = default.full_space()
    t0 = time.perf_counter()
    supernet, _ = train_supernet(space, data, cfg.supernet, Path(args.run_dir) / "supernets",
                                 log=log)
    supernet_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    default_supernet, _ = train_supernet(default, data, cfg.supernet,
                                         Path(args.run_dir) / "supernets", log=log)
    default_s = time.perf_counter() - t0
    evaluator = Evaluator(space, supernet, data, cfg.eval.calib_samples)
    default_evaluator = Evaluator(space, default_supernet, data, cfg.eval.calib_samples)
    conv_ranks = conv_rank_genes(space)
    variants = [v for v in VARIANTS if conv_ranks or "decomposition" not in TECHNIQUES[v]]
    variants.append(DEFAULT_SUPERNET)
    objectives = get_objectives(["accuracy", "size"])
    ref = ref_kb * 1024
    scorers = {v: default_evaluator if v == DEFAULT_SUPERNET else evaluator for v in variants}
    # per variant, one value per seed: the hypervolume, the best validation accuracy per budget
    hv: dict[str, list[float]] = {v: [] for v in variants}
    best_val: dict[str, dict[int, list[float]]] = {v: {kb: [] for kb in budgets}
                                                   for v in variants}
    rows, best = [], {}
    for variant in variants:
        sub = space.restrict(restrictions(space, variant if variant != DEFAULT_SUPERNET
                                          else "uniform"))
        for seed in range(args.seeds):
            t0 = time.perf_counter()
            study = optuna.create_study(
                directions=["maximize", "minimize"],
                sampler=api.STRATEGIES[args.strategy].make_sampler(sub, seed))
            run_search(study, sub, scorers[variant], objectives, args.evaluations,
                       show_progress=False)
            done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
            points = [(t.values[0], t.values[1], json.dumps(t.params)) for t in done]
            front = pareto(points)
            hv[variant].append(hypervolume([(a, s) for a, s, _ in points], ref))
            for kb in budgets:
                fit = [p for p in points if p[1] <= kb * 1024]
                if fit:
                    top = max(fit, key=lambda p: (p[0], -p[1]))
                    best_val[variant][kb].append(top[0])
                    if (variant, kb) not in best or top[0] > best[(variant, kb)][0]:
                        best[(variant, kb)] = top
            share = ("-" if variant in ("uniform", DEFAULT_SUPERNET) else
                     f"{np.mean([uses(json.loads(p[2]), variant, conv_ranks) for p in front]):.0%}")
            rows.append([variant, seed, f"{hv[variant][-1]:.4f}",
                         *[_pct(max((a for a, s, _ in points if s <= kb * 1024), default=None))
                           for kb in budgets],
                         len(front), share, f"{time.perf_counter() - t0:.0f}"])
            log(f"{part} {variant} seed {seed}: hv {rows[-1][2]}")
    # the medians over seeds, then the test accuracy of each variant's best arch per budget
    summary = []
    for variant in variants:
        tests = []
        for kb in budgets:
            top = best.get((variant, kb))
            if top is None:
                tests.append("-")
                continue
            model, _ = scorers[variant].compressed(json.loads(top[2]))
            right = correct(model, data.x_test, data.y_test)
            tests.append(f"{right.float().mean().item():.2%} ({top[1]:.0f} B)")
        h = hv[variant]
        summary.append([variant, f"{np.median(h):.4f} [{min(h):.4f}, {max(h):.4f}]",
                        *[f"{100 * np.median(a):.2f} %" if a else "-"
                          for a in best_val[variant].values()], *tests])
    verdicts = []
    for variant in variants[1:-1]:
        gain = float(np.median(hv[variant]) - np.median(hv["uniform"]))
        wins = sum(a > b for a, b in zip(hv[variant], hv["uniform"]))
        verdicts.append(f"- **{variant}** against uniform: median hypervolume "
                        f"{'+' if gain >= 0 else ''}{gain:.4f}; higher in {wins} of {args.seeds} "
                        f"seeds. {'Helps' if gain > 0 and wins > args.seeds / 2 else 'Does not help'}"
                        f" on this dataset at {args.evaluations} evaluations.")
    own = float(np.median(hv[DEFAULT_SUPERNET]) - np.median(hv["uniform"]))
    verdicts.append(f"- **The default space on its own supernet** (trained without the techniques' "
                    f"draws) against the same space on the full-space supernet: median "
                    f"hypervolume {'+' if own >= 0 else ''}{own:.4f}.")
    # the same random archs on both supernets
    rng = random.Random(0)
    probes = {"default space": [default.sample(rng) for _ in range(args.probe_archs)],
              "full space": [space.sample(rng) for _ in range(args.probe_archs)]}
    probe_rows = []
    for label, scorer in (("full space (the searches above)", evaluator),
                          ("default space", default_evaluator)):
        means = {k: float(np.mean([scorer(a).accuracy for a in archs]))
                 for k, archs in probes.items()}
        probe_rows.append([label, *[f"{means[k]:.2%}" for k in probes]])
    kb_heads = [f"best val <= {kb} KB" for kb in budgets]
    text = [
        f"## {part} ({space_name})",
        "",
        f"Data: {data.summary()}. Supernet: "
        f"{cfg.supernet.resolve(len(data.y_train)).epochs} epochs "
        f"(trained or reused in {supernet_s:.0f} s), the full space's compression drawn in "
        f"training. Strategy {args.strategy}, {args.evaluations} evaluations per search, seeds "
        f"0-{args.seeds - 1}. Hypervolume: accuracy 0 at {ref_kb} KB as the reference point. "
        f"Validation accuracy is the search's score (inherited weights, compressed, BatchNorm "
        f"recalibrated).",
        "",
        table(["variant", "hypervolume, median [min, max]", *[f"median {h}" for h in kb_heads],
               *[f"test of best <= {kb} KB" for kb in budgets]], summary),
        "",
        *verdicts,
        "",
        f"Supernets: trained with the full space's compression drawn ({supernet_s:.0f} s, "
        f"trained or reused), or the default space's ({default_s:.0f} s). Mean inherited "
        f"validation accuracy of {args.probe_archs} random archs of each space (the same archs "
        f"on both):",
        "",
        table(["supernet trained on", *[f"{k} archs" for k in probes]], probe_rows),
        "",
        "Per search (front share: the front's archs that use the variant's technique):",
        "",
        table(["variant", "seed", "hypervolume", *kb_heads, "front", "front share", "s"], rows),
        "",
    ]
    record = {"rows": rows, "summary": summary,
              "best": {f"{v} <= {kb} KB": json.loads(p[2]) for (v, kb), p in best.items()},
              "config": overrides}
    return "\n".join(text), record


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.2%}"


# ---- which decomposition: the channel SVD beside Tucker-2 at equal parameters ------------------
#: the share of a convolution's weights each decomposition may keep
DECOMPOSITION_SHARES = (0.25, 0.5)


def channel_svd(w: torch.Tensor, share: float) -> tuple[torch.Tensor, int]:
    """The rank-r reconstruction of ``w`` (out, in, *taps) through its out x (in x taps)
    unfolding, r the largest whose factors keep at most ``share`` of the weights: what
    ``<group>.rank`` does. (reconstruction, parameters)."""
    from nasopt.compression.compress import svd_factors
    rows = w.reshape(w.shape[0], -1)
    per_rank = rows.shape[0] + rows.shape[1]
    r = max(1, int(share * rows.numel() // per_rank))
    a, b = svd_factors(rows, r)
    return (a @ b).reshape(w.shape), r * per_rank


def tucker2(w: torch.Tensor, share: float) -> tuple[torch.Tensor, int]:
    """Tucker-2 (HOSVD of the output and input channel modes, Kim et al., ICLR 2016) of ``w``,
    equal ranks r on both modes, the largest that keeps at most ``share`` of the weights:
    a 1x1 conv in -> r, a k-tap conv r -> r, a 1x1 conv r -> out. (reconstruction, parameters)."""
    out, cin, taps = w.shape[0], w.shape[1], int(np.prod(w.shape[2:]))
    budget = share * w.numel()
    r = 1
    while r < min(out, cin) and (r + 1) * (cin + out) + (r + 1) ** 2 * taps <= budget:
        r += 1
    u0 = torch.linalg.svd(w.reshape(out, -1).double(), full_matrices=False)[0][:, :r]
    u1 = torch.linalg.svd(w.transpose(0, 1).reshape(cin, -1).double(),
                          full_matrices=False)[0][:, :r]
    core = torch.einsum("oi...,or,is->rs...", w.double(), u0, u1)
    back = torch.einsum("rs...,or,is->oi...", core, u0, u1)
    return back.float(), r * (cin + out) + r * r * taps


def decompositions(args: argparse.Namespace, log) -> tuple[str, dict]:  # noqa: ANN001
    """The conv1d space's stage convolutions replaced by each decomposition's reconstruction at
    equal parameter shares: relative weight error and inherited validation accuracy of random
    archs (BatchNorm recalibrated after the replacement)."""
    from nasopt.compression.compress import weight_layers
    from nasopt.supernet.elastic import recalibrate_bn
    cfg = api.load_config(None, ["data.dataset=mnist1d", "search.space=conv1d", *args.set])
    data = api.load_data(cfg)
    space = api.make_space("conv1d", data)
    supernet, _ = train_supernet(space, data, cfg.supernet, Path(args.run_dir) / "supernets",
                                 log=log)
    evaluator = Evaluator(space, supernet, data, cfg.eval.calib_samples)
    rng = random.Random(0)
    archs = [space.largest()] + [space.sample(rng) for _ in range(args.probe_archs - 1)]
    calib = evaluator.calibration_samples
    results: dict[str, list] = {}
    for arch in archs:
        base = evaluator.float_model(arch)
        results.setdefault("float", []).append(
            (0.0, correct(base, data.x_val, data.y_val).float().mean().item(), 1.0))
        for share in DECOMPOSITION_SHARES:
            for name, method in (("channel SVD", channel_svd), ("Tucker-2", tucker2)):
                model = copy.deepcopy(base)
                err, kept, total = 0.0, 0, 0
                with torch.no_grad():
                    for layer, m in weight_layers(model):
                        if not layer.startswith("stages.") or m.weight.shape[-1] == 1:
                            continue
                        w = m.weight.detach()
                        back, params = method(w, share)
                        err += float((back - w).pow(2).sum() / w.pow(2).sum().clamp_min(1e-12))
                        kept, total = kept + params, total + w.numel()
                        m.weight.copy_(back)
                recalibrate_bn(model, calib)
                acc = correct(model.eval(), data.x_val, data.y_val).float().mean().item()
                results.setdefault(f"{name} at {share:.0%}", []).append(
                    (err, acc, kept / max(1, total)))
    rows = [[label, f"{np.mean([p for *_, p in v]):.0%}",
             f"{np.mean([e for e, *_ in v]):.4f}", f"{np.mean([a for _, a, _ in v]):.2%}",
             f"{v[0][1]:.2%}"] for label, v in results.items()]
    best = {share: max(("channel SVD", "Tucker-2"),
                       key=lambda n: np.mean([a for _, a, _ in results[f"{n} at {share:.0%}"]]))
            for share in DECOMPOSITION_SHARES}
    text = [
        "## Which decomposition (MNIST-1D, conv1d)",
        "",
        f"Every stage convolution of {len(archs)} archs (the largest, then random ones; the "
        f"supernet trained on the default space, {data.summary()}) replaced by its "
        f"reconstruction from each decomposition at the same share of its weights, BatchNorm "
        f"recalibrated, no fine-tuning. Channel SVD (what `sN.rank` searches: a k-tap conv into r "
        f"channels, then 1x1) against Tucker-2 (1x1 into r, k-tap r to r, 1x1 out; equal ranks "
        f"on both channel modes). Weight error: the sum over layers of "
        f"||W - W_r||^2 / ||W||^2, mean over archs.",
        "",
        table(["decomposition", "weights kept", "weight error", "mean val acc",
               "val acc, largest arch"], rows),
        "",
        *[f"- At {share:.0%} of the weights the better one is **{name}**." for share, name
          in best.items()],
        "",
    ]
    return "\n".join(text), {"rows": rows}

