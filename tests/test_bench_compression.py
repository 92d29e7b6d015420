"""`nasopt bench compression`: the front arithmetic (Pareto fronts, the share of a baseline's
front that the joint front weakly dominates, the points it misses with the joint front's best
accuracy at that size) and baseline (b), an architecture-only search then uniform int8."""
from __future__ import annotations

import json

import random
from math import comb

import pytest
import torch
from scipy.stats import binomtest

from nasopt_bench.compression import (
    _points, _study, best_under, discordant, dominated_share, misses, paired_p, pareto, then_int8,
)
from nasopt import api
from nasopt_bench.setup import bench_config
from nasopt.cli.main import main
from nasopt.compression.compress import FLOAT_BITS, reference_compression, uniform_compression
from nasopt.search.evaluate import Evaluator
from nasopt.supernet.elastic import supernet_key


def test_pareto_dominated_share_and_misses():
    joint = pareto([(0.90, 1000, "a"), (0.95, 3000, "b"), (0.85, 2000, "dominated"),
                    (0.97, 6000, "c")])
    assert [label for *_, label in joint] == ["a", "b", "c"]
    int8 = [(0.80, 900, "too small"), (0.90, 1200, "tie"), (0.96, 4000, "better"),
            (0.97, 7000, "same acc, larger")]
    # (0.90, 1200) is weakly dominated by (0.90, 1000); (0.97, 7000) by (0.97, 6000)
    assert dominated_share(joint, int8) == 0.5
    assert misses(joint, int8) == [((0.80, 900, "too small"), None),
                                   ((0.96, 4000, "better"), (0.95, 3000, "b"))]
    assert best_under(joint, 2) == 0.90 and best_under(joint, 0.5) is None
    assert dominated_share(joint, []) == 0.0


def test_paired_test_counts_discordant_samples_and_is_mcnemars_exact_one_sided_p():
    baseline = torch.tensor([1, 1, 1, 1, 0, 0, 1, 0], dtype=torch.bool)
    joint = torch.tensor([1, 0, 0, 0, 1, 0, 1, 0], dtype=torch.bool)
    assert discordant(baseline, joint) == (3, 1)  # samples 1-3 vs sample 4
    # 3 or 4 of 4 discordant samples to the baseline, were both equally accurate: 5/16
    assert paired_p(3, 1) == (comb(4, 3) + comb(4, 4)) / 16 == 0.3125
    assert paired_p(0, 0) == 1.0 and paired_p(0, 5) == 1.0
    assert paired_p(5, 0) == 1 / 32
    # a 4-sample lead among 40 discordant samples is noise; 20 of 20 is not
    for b, c in ((22, 18), (12, 2), (20, 0), (7, 9)):
        assert paired_p(b, c) == pytest.approx(binomtest(b, b + c, 0.5, "greater").pvalue)
    assert paired_p(22, 18) > 0.3 and paired_p(20, 0) < 1e-5


def test_evaluator_correct_is_the_per_sample_accuracy(trained):
    space, supernet, data = trained
    evaluator = Evaluator(space, supernet, data, calib_samples=64)
    arch = space.sample(random.Random(3))
    right = evaluator.correct(arch)
    assert right.dtype == torch.bool and right.shape == (len(data.y_val),)
    assert right.sum().item() / len(right) == evaluator(arch).accuracy


def test_baseline_b_is_the_float_search_front_then_uniform_int8(trained):
    """Baseline (b): an architecture-only search on float32 weights, then each arch of its front
    quantized to int8 and evaluated again; the points are exactly the int8 evaluator's."""
    space, supernet, data = trained
    genes = space.compression_genes()
    float_genes = uniform_compression(genes, FLOAT_BITS)
    assert float_genes == {**{g: 32 for g in genes if g.endswith(".bits")}, "sparsity": 0.0,
                           **{g: 1.0 for g in genes if g.endswith(".rank")},
                           **{g: "uniform" for g in genes if g.endswith(".quant")}}
    int8_genes = reference_compression(genes)
    float_space = space.restrict({g: [v] for g, v in float_genes.items()})
    int8_space = space.restrict({g: [v] for g, v in int8_genes.items()})
    float_eval = Evaluator(float_space, supernet, data, calib_samples=64)
    int8_eval = Evaluator(int8_space, supernet, data, calib_samples=64)
    study = _study(float_space, float_eval, 12, 0, "nsga2")
    float_front = pareto(_points(study))
    points = then_int8(study, int8_genes, int8_eval)
    assert [label for *_, label in points] == [f"{label}, int8" for *_, label in float_front]
    trials = {f"trial {t.number}": t for t in study.trials}
    for (acc, size, label), (_, float_size, float_label) in zip(points, float_front):
        arch = trials[float_label].params
        assert all(arch[g] == 32 for g in arch if g.endswith(".bits"))
        m = int8_eval({**arch, **int8_genes})
        assert (acc, size) == (m.accuracy, float(m.compressed_bytes))
        # the paired test's per-sample view of the same int8 model (EVALUATED_ON: "float" -> int8)
        assert int8_eval.correct({**arch, **int8_genes}).sum().item() / len(data.y_val) == acc
        # the same architecture at 8 instead of 32 bits: well under half the float file
        assert size < 0.5 * float_size


def test_bench_compression_end_to_end_writes_report_plot_and_fronts(tmp_path):
    """A tiny `nasopt bench compression`: the report states the verdicts, and its JSON holds
    every search's front on every seed, from which the report's dominance figures follow."""
    out = tmp_path / "c.md"
    main(["bench", "compression", "--seeds", "2", "--evaluations", "24",
          "--reference-epochs", "1", "--run-dir", str(tmp_path / "runs"), "--out", str(out),
          "--set", "supernet.epochs=1", "--set", "supernet.warmup_epochs=1",
          "--set", "supernet.n_random=0"])
    text = out.read_text()
    assert out.with_suffix(".png").stat().st_size > 0
    saved = json.loads(out.with_suffix(".json").read_text())
    names = ["joint, staged", "joint, nsga2", "arch-only then int8, staged",
             "arch-only then int8, nsga2", "int8-aware arch-only, staged",
             "int8-aware arch-only, nsga2"]
    assert list(saved["fronts"]) == names
    fronts = {n: {int(k): [tuple(p) for p in v] for k, v in f.items()}
              for n, f in saved["fronts"].items()}
    assert all(list(f) == [0, 1] for f in fronts.values())
    for f in fronts.values():
        for front in f.values():
            assert front == pareto(front)  # saved fronts are non-dominated, by size
    # baseline (b)'s members are int8 models of the float search's trials
    assert all(label.endswith(", int8") for *_, label in fronts["arch-only then int8, nsga2"][0])
    reference = [tuple(p) for p in saved["reference_cnn"]]
    joint = fronts["joint, staged"]
    seeds_ok = [s for s in (0, 1)
                if dominated_share(joint[s], fronts["arch-only then int8, nsga2"][s]) == 1.0
                and dominated_share(joint[s], pareto(reference)) == 1.0]
    verdict = "met" if len(seeds_ok) == 2 else "**missed**"
    assert (f"| joint front dominates both baselines (a: reference CNN; b: architecture-only "
            f"NSGA-II search, then int8), every seed | on {len(seeds_ok)} of 2 seeds") in text
    assert text.split("every seed | on", 1)[1].split("\n", 1)[0].endswith(f"| {verdict} |")
    assert "same* space at the same budget" in text
    # "Every seed": one table of hypervolumes (a column per search), one of dominated shares
    hv_header = "| seed | " + " | ".join(names) + " |"
    assert hv_header in text
    share_header = next(line for line in text.splitlines()
                        if line.startswith("| seed | joint, staged / "))
    column = [c.strip() for c in share_header.strip("|").split("|")].index(
        "joint, staged / arch-only then int8, nsga2")
    share_lines = text.split(share_header, 1)[1].split("\n\n", 1)[0].splitlines()[2:]
    for seed, line in zip((0, 1), share_lines, strict=True):
        cells = [c.strip() for c in line.strip("|").split("|")]
        b = fronts["arch-only then int8, nsga2"][seed]
        assert cells[0] == str(seed)
        assert cells[column] == f"{dominated_share(joint[seed], b):.0%} of {len(b)}"
    # the arch of every front member is saved: (b)'s at int8, the float search's genes otherwise
    for name, per_seed in saved["archs"].items():
        for seed, archs in per_seed.items():
            assert set(archs) == {label for *_, label in fronts[name][int(seed)]}
    int8_genes = {"bits": 8, "sparsity": 0.0, "rank": 1.0}  # reference_compression's options
    for per_seed in saved["archs"]["arch-only then int8, nsga2"].values():
        for arch in per_seed.values():
            genes = [(g.rsplit(".", 1)[-1], v) for g, v in arch.items()]
            assert [v == int8_genes[k] for k, v in genes if k in int8_genes].count(True) >= 5
            assert all(v == int8_genes[k] for k, v in genes if k in int8_genes)
    # every missed point comes with its paired test: the discordant counts differ by the gap, the
    # p-value is theirs, and the row counting seeds without a significant miss follows from them
    header = ("| seed | baseline val acc | baseline bytes | joint best acc at <= bytes | gap "
              "(samples) | only baseline / only joint right | p (paired) |")
    sections = text.split("Points of baseline (b)'s front", 1)[1].split("For scale:", 1)[0]
    b_cnn, int8_aware = sections.split("The same for the int8-aware", 1)
    b_cnn_rows, rows = [], 0
    for part, of_b_or_cnn in ((b_cnn, True), (int8_aware, False)):
        for table in part.split(header + "\n|---")[1:]:
            for line in table.split("\n\n", 1)[0].splitlines()[1:]:
                seed, _, _, best, gap, counts, p = [c.strip() for c in line.strip("|").split("|")]
                rows += 1
                if of_b_or_cnn:
                    b_cnn_rows.append((int(seed), -1.0 if best == "none" else
                                       0.0 if p == "< 0.001" else float(p)))
                if best == "none":
                    continue
                only_b, only_j = map(int, counts.split(" / "))
                assert only_b - only_j == int(gap) > 0
                assert p == (f"{paired_p(only_b, only_j):.3f}"
                             if paired_p(only_b, only_j) >= 0.001 else "< 0.001")
    assert rows + sections.count("\n\nnone\n") >= 3
    clean = [s for s in (0, 1) if all(p >= 0.05 for seed, p in b_cnn_rows if seed == s)
             and s in {int(k) for k in saved["fronts"]["arch-only then int8, nsga2"]}]
    assert (f"nor smaller than every joint point, every seed | on {len(clean)} of 2 seeds |"
            in text)


def test_bench_compression_extra_validation_scores_on_more_samples_same_supernet(tmp_path):
    """`--extra-val N` scores every search on the split's validation samples plus N generated
    ones, with the supernet trained without them (one checkpoint, keyed by the plain data)."""
    out, runs = tmp_path / "c.md", tmp_path / "runs"
    sets = ["supernet.epochs=1", "supernet.warmup_epochs=1", "supernet.n_random=0"]
    main(["bench", "compression", "--seeds", "1", "--evaluations", "12", "--extra-val", "40",
          "--reference-epochs", "1", "--run-dir", str(runs), "--out", str(out),
          *sum((["--set", s] for s in sets), [])])
    text = out.read_text()
    assert "3400 train / 640 val / 1000 test" in text
    assert "the split's 600 samples plus 40 freshly generated" in text
    assert "the gap in validation samples (of 640)" in text
    saved = json.loads(out.with_suffix(".json").read_text())
    assert (saved["validation_samples"], saved["extra_validation_samples"]) == (640, 40)
    # every accuracy is a count of 640 samples
    for per_seed in saved["fronts"].values():
        for front in per_seed.values():
            assert all(abs(a * 640 - round(a * 640)) < 1e-6 for a, *_ in front)
    cfg = bench_config(sets)  # the bench's own config, without the extra samples
    plain = api.load_data(cfg)
    key = supernet_key(api.make_space("conv1d", plain), plain.fingerprint, cfg.supernet)
    assert [p.name for p in (runs / "supernets").glob("*.pt")] == [f"conv1d-{key}.pt"]
    # another dataset (by --dataset or by --set): one clear error before any supernet is trained
    for args in (["--dataset", "digits"], ["--set", "data.dataset=digits"]):
        assert main(["bench", "compression", *args, "--extra-val", "10", "--run-dir",
                     str(tmp_path / "other"), "--out", str(tmp_path / "d.md")]) == 2
        assert not (tmp_path / "other").exists() and not (tmp_path / "d.md").exists()
