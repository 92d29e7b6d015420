"""``nasopt bench distill``: does distillation / QAT / transfer help, and how long does
``nasopt run`` take? Writes results/distill.md.

1. **KD on MNIST-1D** (conv1d, one fixed student arch with a compression policy, several seeds):
   TEST accuracy of the float student trained from scratch on labels, with KD from the
   supernet's largest subnet, with KD from two subnets (soft targets averaged), with KD from
   inherited weights (the pipeline's default), and the compressed (deployed) model of each after
   post-training compression and after QAT fine-tuning. Training uses validation only (early
   stopping); test is measured once per model at the end. The supernet is the default recipe's
   (100 epochs), reused from ``--run-dir`` when cached.
2. **Transfer on Fashion-MNIST**: a mobilenet arch trained on classes 0-4 (a 20 % subset, to keep
   the bench short), exported with its policy; then classes 5-9 with 10 % of their training data:
   re-headed + QAT fine-tuning (stem and s1 frozen, or nothing frozen) vs the same arch trained
   from scratch on the 10 % subset (then QAT).
3. **Pipeline wall time** of ``nasopt run configs/mnist1d.toml`` in a fresh run folder.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from nasopt import api
from nasopt.compression.compress import Policy, compress
from nasopt.core.data import load_dataset
from nasopt.core.errors import NasoptError
from nasopt.deploy.distill import DistillConfig, Teachers, train_student
from nasopt.search.evaluate import Evaluator
from nasopt.deploy.export import export_model
from nasopt.deploy.finetune import FinetuneConfig, finetune, prepare_qat, reheaded
from nasopt.supernet.train import accuracy
from nasopt_bench.report import LoadSampler, machine, table
from nasopt_bench.setup import conv1d_supernet, supernet_epochs

#: the student: ~4 KB packed, a point of the joint search's front region (bits 8/6/4, half the
#: weights pruned)
STUDENT = {"s1.depth": 1, "s1.k": 5, "s1.width": 16, "s2.depth": 2, "s2.k": 5, "s2.width": 16,
           "s3.depth": 1, "s3.k": 3, "s3.width": 16, "s1.bits": 8, "s2.bits": 6, "s3.bits": 6,
           "head.bits": 4, "sparsity": 0.5, "head.rank": 1.0}
#: the second teacher of multi-teacher KD: a large subnet with kernels 5 (the first is the largest)
SECOND_TEACHER = {"s1.depth": 3, "s1.k": 5, "s1.width": 32, "s2.depth": 3, "s2.k": 5,
                  "s2.width": 32, "s3.depth": 3, "s3.k": 5, "s3.width": 32}
#: the transfer arch (mobilenet), int8 except a 4-bit head, no pruning
TRANSFER_ARCH = {"stem.width": 16, "s1.depth": 1, "s1.k": 3, "s1.expand": 2, "s1.width": 16,
                 "s2.depth": 2, "s2.k": 3, "s2.expand": 3, "s2.width": 32, "s3.depth": 1,
                 "s3.k": 3, "s3.expand": 3, "s3.width": 48}


def _mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.2f} ± {100 * sd:.2f}"


def _kd_part(args: argparse.Namespace, log) -> tuple[str, dict]:  # noqa: ANN001
    cfg, data, space, supernet, _ = conv1d_supernet(args.run_dir, args.set, log)
    evaluator = Evaluator(space, supernet, data, cfg.eval.calib_samples)
    arch = space.validate(STUDENT)
    policy = Policy.from_arch(arch)
    largest = evaluator.float_model(space.largest())
    second = evaluator.float_model(space.validate({**space.largest(), **SECOND_TEACHER}))
    teachers_one = Teachers([largest], [1.0], ["largest"])
    teachers_two = Teachers([largest, second], [0.5, 0.5], ["largest", "k5 subnet"])
    dcfg = DistillConfig(epochs=args.epochs, patience=args.patience, alpha=0.5, temperature=4.0)
    fcfg = FinetuneConfig(epochs=args.qat_epochs, patience=5, lr=1e-3)
    conditions = {"scratch, labels only": (None, "scratch"),
                  "scratch, KD from largest subnet": (teachers_one, "scratch"),
                  "scratch, KD from 2 subnets (avg)": (teachers_two, "scratch"),
                  "inherited weights, KD from largest": (teachers_one, "inherit")}
    results: dict[str, dict[str, list[float]]] = {c: {"float": [], "ptq": [], "qat": [],
                                                      "val": []} for c in conditions}
    x, y = data.x_test, data.y_test
    for seed in range(args.seeds):
        for name, (teachers, init) in conditions.items():
            t = time.perf_counter()
            if init == "inherit":
                model = evaluator.float_model(arch).train()
            else:
                torch.manual_seed(seed)
                model = space.build(arch)
            history = train_student(model, data, teachers, dataclasses.replace(dcfg, seed=seed))
            r = results[name]
            r["val"].append(history.best_val_accuracy)
            r["float"].append(accuracy(model, x, y))
            r["ptq"].append(accuracy(compress(model, policy, space.group_of)[0], x, y))
            qat = prepare_qat(model, policy, space.group_of)
            deployed, _, _ = finetune(qat, policy, space.group_of, data,
                                      dataclasses.replace(fcfg, seed=seed))
            r["qat"].append(accuracy(deployed, x, y))
            log(f"seed {seed} {name}: float {r['float'][-1]:.4f} ptq {r['ptq'][-1]:.4f} "
                f"qat {r['qat'][-1]:.4f} ({time.perf_counter() - t:.0f} s)")
    rows = [[name, _mean_sd(r["val"]), _mean_sd(r["float"]), _mean_sd(r["ptq"]),
             _mean_sd(r["qat"])] for name, r in results.items()]
    teacher_rows = [[n, f"{100 * accuracy(m, x, y):.2f}"] for n, m in
                    zip(teachers_two.names, teachers_two.models)]
    m = {n: statistics.mean(r["float"]) for n, r in results.items()}
    base = m["scratch, labels only"]
    verdict = []
    for n in ("scratch, KD from largest subnet", "scratch, KD from 2 subnets (avg)",
              "inherited weights, KD from largest"):
        delta = 100 * (m[n] - base)
        verdict.append(f"- {n}: {'+' if delta >= 0 else ''}{delta:.2f} points of mean float test "
                       f"accuracy vs labels only: KD **{'improved' if delta > 0 else 'did not improve'}"
                       f"** the mean.")
    q = {n: statistics.mean(r["qat"]) - statistics.mean(r["ptq"]) for n, r in results.items()}
    verdict.append("- QAT vs post-training compression of the same student: " + ", ".join(
        f"{n} {'+' if d >= 0 else ''}{100 * d:.2f}" for n, d in q.items()) + " points.")
    text = f"""## 1. Distillation and QAT on MNIST-1D

Data: {data.summary()}. Student (conv1d): `{json.dumps(dict(arch))}` —
{sum(p.numel() for p in space.build(arch).parameters())} float parameters; policy: bits
s1 8 / s2 6 / s3 6 / head 4, global magnitude pruning 50 %.
Teachers: the supernet's largest subnet (inherited weights, BN recalibrated) and, for
multi-teacher KD, also the subnet `{json.dumps(SECOND_TEACHER)}` (soft targets averaged 0.5/0.5).
Supernet: default recipe ({supernet_epochs(cfg, data, space)} epochs, sandwich rule).
Distillation: alpha 0.5, T 4, Adam lr {dcfg.lr}, cosine, <= {dcfg.epochs} epochs, early stopping
on validation (patience {dcfg.patience}); QAT: <= {fcfg.epochs} epochs, lr {fcfg.lr}, patience
{fcfg.patience}. {args.seeds} seeds (0..{args.seeds - 1}); mean ± sd of **test** accuracy (%).

{table(["student training", "val (best epoch)", "test, float", "test, compressed (PTQ)",
        "test, compressed after QAT"], rows)}

{table(["teacher", "test accuracy (%)"], teacher_rows)}

{chr(10).join(verdict)}
"""
    return text, {"results": results}


def _transfer_part(args: argparse.Namespace, log) -> str:  # noqa: ANN001
    source = load_dataset("fashion-mnist", classes=[0, 1, 2, 3, 4], fraction=args.source_fraction)
    target = load_dataset("fashion-mnist", classes=[5, 6, 7, 8, 9], fraction=0.1)
    space = api.make_space("mobilenet", source)
    genes = dict(TRANSFER_ARCH)
    genes.update({g: 8 for g in space.genes if g.endswith(".bits")})
    genes.update({"head.bits": 4, "sparsity": 0.0})
    genes.update({g: 1.0 for g in space.genes if g.endswith(".rank")})
    arch = space.validate(genes)
    policy = Policy.from_arch(arch)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = space.build(arch)
    train_student(model, source, None, DistillConfig(epochs=args.source_epochs, patience=3))
    deployed, stored, _ = finetune(prepare_qat(model, policy, space.group_of), policy,
                                   space.group_of, source, FinetuneConfig(epochs=1))
    source_acc = accuracy(deployed, source.x_test, source.y_test)
    with tempfile.TemporaryDirectory() as tmp:
        export = export_model(deployed, stored, arch, space, Path(tmp) / "src", {}, api.SPACES)
        loaded = api.load(export)
    log(f"source model: test accuracy {source_acc:.4f} on classes 0-4 "
        f"({time.perf_counter() - t0:.0f} s)")
    fcfg = FinetuneConfig(epochs=args.transfer_epochs, patience=5, lr=1e-3)
    rows, accs = [], {}
    tspace = None
    for name in ("transfer, stem+s1 frozen", "transfer, nothing frozen", "from scratch"):
        accs[name] = []
        for seed in range(args.seeds):
            t = time.perf_counter()
            if name.startswith("transfer"):
                net, tspace = reheaded(loaded, space, arch, target.num_classes, seed)
                freeze = ("stem", "s1") if "frozen" in name and "nothing" not in name else ()
                qat = prepare_qat(net, policy, tspace.group_of, deployed=True)
                final, _, _ = finetune(qat, policy, tspace.group_of, target,
                                       dataclasses.replace(fcfg, seed=seed, freeze=freeze))
            else:
                tspace = type(space)(space.input_shape, target.num_classes, space.genes)
                torch.manual_seed(seed)
                net = tspace.build(arch)
                train_student(net, target, None, DistillConfig(
                    epochs=args.transfer_epochs, patience=5, seed=seed))
                final, _, _ = finetune(prepare_qat(net, policy, tspace.group_of), policy,
                                       tspace.group_of, target,
                                       FinetuneConfig(epochs=5, patience=3, seed=seed))
            accs[name].append(accuracy(final, target.x_test, target.y_test))
            log(f"seed {seed} {name}: {accs[name][-1]:.4f} ({time.perf_counter() - t:.0f} s)")
        rows.append([name, _mean_sd(accs[name])])
    return f"""## 2. Transfer learning on Fashion-MNIST (classes 0-4 → classes 5-9, 10 % of the data)

Source: {source.summary()}; arch (mobilenet) `{json.dumps(TRANSFER_ARCH)}`, int8 with a 4-bit
head, trained {args.source_epochs} epochs on labels + 1 epoch QAT, exported (packed file) and
loaded back: test accuracy {100 * source_acc:.2f} % on classes 0-4.
Target: {target.summary()}. Transfer = `nasopt.deploy.finetune.reheaded` (new 5-class head, seeded)
+ QAT fine-tuning (<= {fcfg.epochs} epochs, lr {fcfg.lr}, early stopping on validation);
from scratch = the same arch trained on the 10 % subset (<= {args.transfer_epochs} epochs, early
stopping) + 5 epochs QAT. {args.seeds} seeds; mean ± sd of **test** accuracy (%) of the deployed
(int8/int4) model on the 5000 test images of classes 5-9.

{table(["target model", "test accuracy (%)"], rows)}
"""


def _pipeline_part(args: argparse.Namespace, log, load: LoadSampler) -> str:  # noqa: ANN001
    if args.pipeline_card:  # timings recorded by an earlier `nasopt run` (not run again here)
        card = json.loads(Path(args.pipeline_card).read_text())
        steps = ", ".join(f"{k} {v:.0f} s" for k, v in card["timings_s"].items())
        accs = ", ".join(f"{k} {100 * v:.2f}" for k, v in card["test_accuracy"].items())
        return f"""## 3. Pipeline wall time

Not re-run by this command: the times below are those recorded in the model card
`{args.pipeline_card}` of an earlier `{card['command']}` (fresh run folder: the supernet was
trained, not reused). Steps: {steps}. The machine has 2 cores and **other jobs were using
them heavily at the same time** (load average 7-10), so this is far above the quiet-machine
figure; re-run `nasopt bench distill --parts pipeline` on a quiet machine for the real one.
Picked trial {card['trial']}, packed {card['packed_bytes']} B; test accuracy (%): {accs}.
"""
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "nasopt.cli", "run", args.pipeline_config, "--quiet",
                   "--set", f"run_dir={json.dumps(tmp + '/run')}",
                   "--set", f"export.out={json.dumps(tmp + '/model')}"]
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            return f"## 3. Pipeline wall time\n\n`nasopt run` failed: {done.stderr[-2000:]}\n"
        card = json.loads((Path(tmp) / "model" / "metrics.json").read_text())
    log(f"nasopt run: {wall:.0f} s")
    steps = ", ".join(f"{k} {v:.0f} s" for k, v in card["timings_s"].items())
    accs = ", ".join(f"{k} {100 * v:.2f}" for k, v in card["test_accuracy"].items())
    return f"""## 3. Pipeline wall time

`nasopt run {args.pipeline_config}` in a fresh run folder (supernet trained, not reused):
**{wall:.0f} s** wall time on this machine (steps: {steps}). {
    "Other jobs shared the 2 cores during the bench (see the load above), so this is an upper "
    "bound." if load.shared else "The cores were not shared."} Picked trial {card['trial']}, packed {card['packed_bytes']} B;
test accuracy (%): {accs}.
"""


def run(args: argparse.Namespace) -> Path:
    log = lambda s: print(s, file=sys.stderr)  # noqa: E731
    # before the supernet is trained or loaded, naming this command's options
    for option in ("epochs", "qat_epochs", "transfer_epochs", "source_epochs"):
        if getattr(args, option, 1) < 1:
            raise NasoptError(f"--{option.replace('_', '-')} must be >= 1, got "
                              f"{getattr(args, option)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    parts = []
    with LoadSampler() as load:
        if "kd" in args.parts:
            parts.append(_kd_part(args, log)[0])
        if "transfer" in args.parts:
            parts.append(_transfer_part(args, log))
        if "pipeline" in args.parts:
            parts.append(_pipeline_part(args, log, load))
    command = "nasopt " + " ".join(shlex.quote(a) for a in getattr(args, "argv", sys.argv[1:]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"""# Distillation, QAT fine-tuning, transfer learning, pipeline time

Command: `{command}`
Machine: {machine()}; {load.note()}
Torch runs on {torch.get_num_threads()} thread(s): these models are tiny, and on the busy 2-core
machine one thread trained a conv1d student 10x faster than two (1.7 s vs 17 s for 3 epochs).
Bench wall time: {time.perf_counter() - start:.0f} s.
Accuracies are on the TEST split, measured once per trained model after training; training and
early stopping read the train and validation splits only. Remaining nondeterminism: thread
scheduling in PyTorch's CPU kernels (results are reproducible on one machine with the same
thread count).

""" + "\n".join(parts))
    return out
