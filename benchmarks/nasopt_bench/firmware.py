"""``nasopt bench firmware``: found models as integer C on an emulated Cortex-M4
(writes results/firmware.md).

Two models:

- **MNIST-1D**: the whole pipeline, ``nasopt run`` of ``--mnist1d-config`` (default
  configs/mnist1d.toml: conv1d supernet, TPE search under 4 KB, distillation, QAT), exporting
  packed, ONNX int8 and C;
- **Fashion-MNIST**: a short pipeline, ``nasopt run configs/headline_fashion-mnist.toml`` with
  ``--fashion-epochs`` supernet epochs, ``--fashion-trials`` TPE trials of the joint space (its
  compression genes restricted to 4-8 bits, sparsity 0-0.5, ranks 0.5-1) under
  ``--fashion-budget``, ``--fashion-distill-epochs`` of distillation and
  ``--fashion-finetune-epochs`` of QAT, exporting packed, ONNX int8 and C.

Beside the MNIST-1D model, with the ``mnist1d`` part: **the published MNIST-1D CNN**
(:class:`nasopt_bench.compression.ReferenceCNN`, 3 conv1d layers of 25 channels + linear, 5,210
parameters) trained on the same training split with its reference recipe (``train_model``, batch
100, lr 1e-2, ``--reference-epochs``), quantized to int8 by ``compress(reference,
Policy(bits={"all": 8}))`` and compiled by the same generator (its plan from a
:class:`~nasopt.deploy.firmware.reference.PlanInput`: a fixed model has no search space), with
its int8 ONNX file made from the float model as the pipeline makes the found models'.

For each: the test accuracy of the packed float model (``nasopt.load``), of the int8 ONNX file
(ONNX Runtime) and of the C model (NumPy reference, host gcc build on every test sample, QEMU
Cortex-M4 build on the first ``--emulator-samples``); flash, RAM and instructions per inference of
the Cortex-M4 image; the validation accuracy of the integer reference against the packed float
model's (activation ranges are calibrated on training samples only).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from nasopt.core.errors import NasoptError
from nasopt_bench.report import LoadSampler, machine, table

FLASH_TARGET = 8 * 1024
RAM_TARGET = 2 * 1024
ACC_TARGET = 0.95
FASHION_CONFIG = "configs/headline_fashion-mnist.toml"
#: the Fashion-MNIST search's compression genes: 4-8-bit weights, sparsity up to 0.5, ranks 0.5-1
#: (a few trials over the full options mostly land on chance-level models)
RESTRICT = ('{ "stem.bits" = [4, 6, 8], "s1.bits" = [4, 6, 8], "s2.bits" = [4, 6, 8], '
            '"s3.bits" = [4, 6, 8], "head.bits" = [4, 6, 8], "sparsity" = [0.0, 0.5], '
            '"s1.rank" = [0.5, 1.0], "s2.rank" = [0.5, 1.0], "s3.rank" = [0.5, 1.0], '
            '"head.rank" = [0.5, 1.0] }')


def add_arguments(q: argparse.ArgumentParser) -> None:
    q.add_argument("--parts", default="mnist1d,fashion", help="comma-separated: mnist1d, fashion")
    q.add_argument("--mnist1d-config", default="configs/mnist1d.toml",
                   help="the nasopt run config of the MNIST-1D model")
    q.add_argument("--mnist1d-set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a value of that config, e.g. --mnist1d-set search.trials=50")
    q.add_argument("--fashion-epochs", type=int, default=3, help="supernet epochs (3)")
    q.add_argument("--fashion-trials", type=int, default=12, help="search trials (12)")
    q.add_argument("--fashion-distill-epochs", type=int, default=3,
                   help="distillation epochs (3)")
    q.add_argument("--fashion-finetune-epochs", type=int, default=2, help="QAT epochs (2)")
    q.add_argument("--fashion-budget", default="32KB", help="size budget of the search (32KB)")
    q.add_argument("--reference-epochs", type=int, default=235,
                   help="training epochs of the published MNIST-1D CNN (235: its recipe's, as "
                        "in nasopt bench compression); part of the mnist1d part")
    q.add_argument("--emulator-samples", type=int, default=0,
                   help="test samples run in the emulator: the first N (default 0: all)")
    q.add_argument("--threads", type=int, default=1, help="torch threads (1)")
    q.add_argument("--run-dir", default="runs/firmware",
                   help="studies, supernets and export folders")
    q.add_argument("--out", default="results/firmware.md", help="report path")


def command(args: argparse.Namespace) -> str:
    return (f"nasopt bench firmware --parts {args.parts} --mnist1d-config {args.mnist1d_config} "
            f"--fashion-epochs {args.fashion_epochs} --fashion-trials {args.fashion_trials} "
            f"--fashion-budget {args.fashion_budget} --fashion-distill-epochs "
            f"{args.fashion_distill_epochs} --fashion-finetune-epochs "
            f"{args.fashion_finetune_epochs} --reference-epochs {args.reference_epochs} "
            f"--emulator-samples {args.emulator_samples} "
            f"--threads {args.threads} --run-dir {args.run_dir} --out {args.out}"
            + "".join(f" --mnist1d-set {v}" for v in args.mnist1d_set))


def _mnist1d_model(args: argparse.Namespace, root: Path, log) -> tuple[Path, str]:  # noqa: ANN001
    from nasopt.pipeline import load_run_config, run
    out = root / "mnist1d" / "model"
    cfg = load_run_config(args.mnist1d_config, [
        f"run_dir={json.dumps(str(root / 'mnist1d'))}", f"export.out={json.dumps(str(out))}",
        'export.formats=["pytorch", "packed", "onnx-int8", "c"]', *args.mnist1d_set])
    reused = _reused(root / "mnist1d")
    start = time.perf_counter()
    run(cfg, f"nasopt run {args.mnist1d_config}", show_progress=False, log=log, force=True)
    sets = "".join(f" --set {v}" for v in args.mnist1d_set)
    how = (f"`nasopt run {args.mnist1d_config}{sets}` (run_dir and export.out under "
           f"{root}/mnist1d, export.formats pytorch, packed, onnx-int8, c): the whole pipeline, "
           f"{time.perf_counter() - start:.0f} s{reused}")
    return out, how


def _fashion_model(args: argparse.Namespace, root: Path, log) -> tuple[Path, str]:  # noqa: ANN001
    from nasopt.pipeline import load_run_config, run
    folder = root / "fashion"
    sets = ["search.strategy=\"tpe\"", f"search.trials={args.fashion_trials}", "search.seed=0",
            f"search.restrict={RESTRICT}",
            f"search.budgets={{ size = {json.dumps(args.fashion_budget)} }}",
            f"supernet.epochs={args.fashion_epochs}",
            f"supernet.warmup_epochs={max(1, args.fashion_epochs // 3)}", "supernet.n_random=1",
            f"distill.epochs={args.fashion_distill_epochs}",
            f"distill.patience={args.fashion_distill_epochs}",
            f"finetune.epochs={args.fashion_finetune_epochs}",
            f"finetune.patience={args.fashion_finetune_epochs}"]
    cfg = load_run_config(FASHION_CONFIG, [
        f"run_dir={json.dumps(str(folder))}", f"export.out={json.dumps(str(folder / 'model'))}",
        'export.formats=["pytorch", "packed", "onnx-int8", "c"]', *sets])
    reused = _reused(folder)
    start = time.perf_counter()
    run(cfg, f"nasopt run {FASHION_CONFIG}", show_progress=False, log=log, force=True)
    how = (f"`nasopt run {FASHION_CONFIG}` with "
           + ", ".join(f"`{v}`" for v in sets)
           + f" (run_dir and export.out under {folder}, export.formats pytorch, packed, "
             f"onnx-int8, c): a short pipeline (supernet, a few TPE trials of the joint "
             f"architecture + compression space, the compression genes restricted as shown "
             f"(a few trials over the full options mostly land on chance-level models), pick, "
             f"distillation, QAT); {time.perf_counter() - start:.0f} s{reused}")
    return folder / "model", how


def _reused(run_dir: Path) -> str:
    """What a wall time leaves out: a supernet and trials an earlier run of the command left."""
    supernets = run_dir / "supernets"
    if supernets.is_dir() and any(supernets.glob("*.pt")):
        return (" (the supernet and the finished trials of an earlier run of this command in "
                f"{run_dir} were reused: distillation, QAT and export ran again)")
    return ""


REFERENCE_NAME = "mnist1d-cnn"


def _load_data(card: dict):  # noqa: ANN202
    from nasopt.core.data import load_dataset
    d = card["dataset"]
    return load_dataset(d["dataset"], seed=d.get("seed", 0),
                        val_fraction=d.get("val_fraction", 0.15),
                        test_fraction=d.get("test_fraction", 0.2))


def _reference_model(args: argparse.Namespace, root: Path, card: dict, log  # noqa: ANN001
                     ) -> tuple[Path, str, dict]:
    """The published MNIST-1D CNN trained with its recipe on the MNIST-1D model's training split
    (the weights are kept in its folder and reused for the same epochs), int8 by ``compress``,
    exported as C (plan, model.c/.h, verified on the host on the validation split) and as int8
    ONNX. Returns (folder, how it was made, the models)."""
    from nasopt.compression.compress import Policy, compress
    from nasopt.compression.packed import layer_size
    from nasopt.deploy import onnx as onnx_export
    from nasopt.deploy.firmware import c_export, reference
    from nasopt.supernet.train import TrainConfig, train_model
    from nasopt_bench.compression import ReferenceCNN
    data = _load_data(card)
    folder = root / REFERENCE_NAME
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / f"weights-{args.reference_epochs}ep.pt"
    torch.manual_seed(0)
    cnn = ReferenceCNN(data.input_shape[-1], data.num_classes)
    start = time.perf_counter()
    if weights.exists():
        cnn.load_state_dict(torch.load(weights, weights_only=True))
        trained = (f"the weights of an earlier run of this command ({weights}, "
                   f"{args.reference_epochs} epochs) were reused")
    else:
        log(f"training the published MNIST-1D CNN, {args.reference_epochs} epochs")
        recipe = TrainConfig(epochs=args.reference_epochs, batch_size=100, lr=1e-2, seed=0)
        train_model(cnn, data.x_train, data.y_train, recipe)
        torch.save(cnn.state_dict(), weights)
        trained = f"trained in {time.perf_counter() - start:.0f} s"
    cnn.eval()
    model, stored = compress(cnn, Policy(bits={"all": 8}), lambda name: "all")
    model.eval()
    spec = reference.PlanInput(REFERENCE_NAME, tuple(data.input_shape), data.num_classes)
    order = torch.randperm(len(data.x_train), generator=torch.Generator().manual_seed(0))
    calib = data.x_train[order[:reference.CALIB_SAMPLES]].cpu()
    pre = data.preprocess
    x_val = (pre.raw(data.x_val) if pre else data.x_val).cpu().numpy()
    c_export.write(folder, model, stored, spec, pre, calib, x_val)
    onnx_export.pipeline_export(cnn, folder, spec, data, ["onnx-int8"], log)
    params = sum(p.numel() for p in cnn.parameters())
    how = (f"`ReferenceCNN` of benchmarks/nasopt_bench/compression.py (the MNIST-1D "
           f"repository's ConvBase: conv1d 1->25 k5 s2, 25->25 k3 s2, 25->25 k3 s2, ReLU after "
           f"each, linear 125->10; {params:,} parameters), trained on the same {len(data.y_train)} "
           f"training samples with its reference recipe (`train_model`, batch 100, lr 1e-2, "
           f"cosine decay, {args.reference_epochs} epochs, seed 0; {trained}), then "
           f"`compress(reference, Policy(bits={{\"all\": 8}}))`: int8 weights per output "
           f"channel, float32 biases; the C export calibrates its activations on "
           f"{len(calib)} training samples; the int8 ONNX file is ONNX Runtime's static "
           f"quantization of the float model, as for the found models")
    return folder, how, {"float": cnn, "int8": model, "params": params,
                         "stored_bytes": sum(layer_size(layer) for layer in stored),
                         "data": data}


def measure_reference(folder: Path, made: dict, emulator_samples: int, log  # noqa: ANN001
                      ) -> dict:
    """The report's numbers for the published CNN's export folder."""
    from nasopt.deploy.export import with_preprocess
    from nasopt.deploy.firmware import reference
    data = made["data"]
    m = _measure_c(folder, with_preprocess(made["float"], data.preprocess), data,
                   made["float"], emulator_samples, log)
    pre = data.preprocess
    x_test = (pre.raw(data.x_test) if pre else data.x_test).numpy()
    int8 = with_preprocess(made["int8"], pre)
    with torch.no_grad():
        pt8 = int8(torch.as_tensor(x_test)).argmax(1).numpy()
    y = data.y_test.numpy()
    n = m["m4_n"]
    plan = reference.load(folder / "model.plan.json")
    m.update(space=plan["space"], dataset=data.name, params=made["params"],
             stored_bytes=made["stored_bytes"], float_bytes=4 * made["params"],
             pt8_test=float((pt8 == y).mean()), pt8_first_n=float((pt8[:n] == y[:n]).mean()))
    return m


def _measure_c(folder: Path, model, data, net, emulator_samples: int,  # noqa: ANN001
               log) -> dict:  # noqa: ANN001
    """Accuracies of the float ``model`` (raw samples in), of the int8 ONNX file and of the C
    model (NumPy reference, host, QEMU) of ``folder`` on ``data``'s test split; the footprint."""
    from nasopt.deploy import onnx as onnx_export
    from nasopt.deploy.firmware import c_export, reference, toolchain
    from nasopt.hardware.memory import peak_bytes
    pre = data.preprocess
    raw = (lambda x: pre.raw(x) if pre else x)  # noqa: E731
    x_test, y_test = raw(data.x_test).numpy(), data.y_test.numpy()
    x_val, y_val = raw(data.x_val).numpy(), data.y_val.numpy()
    model.eval()
    with torch.no_grad():
        float_test = model(torch.as_tensor(x_test)).argmax(1).numpy()
        float_val = model(torch.as_tensor(x_val)).argmax(1).numpy()
    onnx_file = folder / onnx_export.INT8_FILE
    int8_test = None
    if onnx_file.exists():
        int8_test = onnx_export.run(onnx_export.session(onnx_file), x_test).argmax(1)
    plan = reference.load(folder / c_export.PLAN)
    ref_val = reference.predict(plan, x_val)
    log(f"{folder}: host and emulator runs")
    start = time.perf_counter()
    checked = toolchain.verify(folder, x_test, y_test, emulator=True,
                               emulator_samples=emulator_samples or None, timeout=3600)
    verify_s = time.perf_counter() - start
    ref_test = reference.predict(plan, x_test)
    n = checked["m4_samples"]
    acc = (lambda p, k=None: None if p is None  # noqa: E731
           else float((p[:k] == y_test[:k]).mean()))
    return {
        "test_n": len(y_test), "val_n": len(y_val),
        "float_test": acc(float_test), "float_val": float((float_val == y_val).mean()),
        "int8_test": acc(int8_test),
        "ref_test": acc(ref_test),
        "ref_val": float((ref_val == y_val).mean()),
        "ref_val_agree": float((ref_val == float_val).mean()),
        "m4_test": checked["m4_accuracy"], "m4_n": n,
        "float_first_n": acc(float_test, n), "int8_first_n": acc(int8_test, n),
        "ref_first_n": acc(ref_test, n),
        "onnx_bytes": onnx_file.stat().st_size if onnx_file.exists() else None,
        "peak_bytes": peak_bytes(net, plan["input_shape"], "int8"),
        "checked": checked, "summary": c_export.summary(plan), "verify_s": verify_s,
    }


def measure(folder: Path, emulator_samples: int, log) -> dict:  # noqa: ANN001
    """Every number of the report for one export folder."""
    from nasopt import api
    from nasopt.deploy.export import read_card
    from nasopt.deploy.firmware import reference
    card = read_card(folder)
    data = _load_data(card)
    space, _, net, _ = reference.read_packed(folder / "model.packed", api.SPACES)
    m = _measure_c(folder, api.load(folder), data, net, emulator_samples, log)  # raw samples in
    m.update(card=card, arch=json.loads((folder / "arch.json").read_text()), space=space.name,
             dataset=data.name, packed_bytes=(folder / "model.packed").stat().st_size,
             params=sum(p.numel() for p in net.parameters()))
    return m


def _resources(m: dict) -> list[list[str]]:
    c, s = m["checked"], m["summary"]
    return [
        ["flash: model + kernels (code / constants)",
         f"{c['flash_bytes']:,} B ({c['flash_code_bytes']:,} / {c['flash_const_bytes']:,})"],
        ["of which weights at their bit-widths / per-channel bias, multiplier, shift",
         f"{s['weight_bytes']:,} B / {s['per_channel_bytes']:,} B"],
        ["RAM: data + bss (the activation arena) + stack high-water mark",
         f"{c['ram_bytes']:,} B ({c['ram_static_bytes']:,} + {c['stack_bytes']:,})"],
        ["activation arena (own placement) / nasopt's peak-SRAM analysis (int8, lower bound)",
         f"{s['arena_bytes']:,} B / {m['peak_bytes']:,} B"],
        ["instructions per inference (QEMU -icount, SysTick; relative cost)",
         f"{c['instructions']:,.0f}"],
        ["whole test image .text (harness, newlib and semihosting included)",
         f"{c['image_text_bytes']:,} B"],
        ["layers (ops) / bit-widths / sparse layers",
         f"{len(s['ops'])} ({', '.join(sorted(set(s['ops'])))}) / {s['bits']} / "
         f"{s['sparse_layers']}"],
    ]


def _section(name: str, how: str, m: dict) -> str:
    c = m["checked"]
    arch = ", ".join(f"{k}={v}" for k, v in m["arch"].items())
    rows = [
        ["packed float (`nasopt.load`, PyTorch)", f"{m['float_test']:.4f}",
         f"{m['float_first_n']:.4f}", f"{m['packed_bytes']:,} B (model.packed)"],
        ["ONNX int8 (`model.int8.onnx`, ONNX Runtime)", f"{m['int8_test']:.4f}",
         f"{m['int8_first_n']:.4f}", f"{m['onnx_bytes']:,} B (model.int8.onnx)"],
        ["C, NumPy reference = host gcc build", f"{m['ref_test']:.4f}",
         f"{m['ref_first_n']:.4f}", ""],
        ["C, Cortex-M4 build in QEMU", "", f"{m['m4_test']:.4f}",
         f"{c['flash_bytes']:,} B flash (model + kernels)"],
    ]
    res = _resources(m)
    return "\n\n".join([
        f"## {name}",
        f"Model: {m['space']} on {m['dataset']}; arch {arch}. Made by {how}.",
        table(["model file", f"test accuracy (all {m['test_n']})",
               f"test accuracy (first {m['m4_n']}: the emulator's)", "size"], rows),
        table(["Cortex-M4 image (arm-none-eabi-gcc -Os, hard float)", "measured"], res),
        f"Agreement: the host build's int32 logits equal the NumPy reference's bit for bit on "
        f"all {c['samples']} test samples; the emulator printed the same class as both on all "
        f"{m['m4_n']} samples it ran. Validation split ({m['val_n']} samples): the integer "
        f"reference {m['ref_val']:.4f} against the packed float model's {m['float_val']:.4f} "
        f"(same class on {m['ref_val_agree']:.1%} of them).",
    ])


def _reference_section(how: str, m: dict) -> str:
    c = m["checked"]
    n = m["m4_n"]
    onnx = ("n/a", "n/a", "not written") if m["onnx_bytes"] is None else (
        f"{m['int8_test']:.4f}", f"{m['int8_first_n']:.4f}",
        f"{m['onnx_bytes']:,} B (model.int8.onnx)")
    rows = [
        ["float (PyTorch)", f"{m['float_test']:.4f}", f"{m['float_first_n']:.4f}",
         f"{m['float_bytes']:,} B ({m['params']:,} float32 parameters)"],
        ["int8 by `compress` (dequantized, PyTorch)", f"{m['pt8_test']:.4f}",
         f"{m['pt8_first_n']:.4f}", f"{m['stored_bytes']:,} B (stored layers: int8 weights, "
         f"float32 scales and biases)"],
        ["ONNX int8 (`model.int8.onnx`, ONNX Runtime)", *onnx],
        ["C, NumPy reference = host gcc build", f"{m['ref_test']:.4f}",
         f"{m['ref_first_n']:.4f}", ""],
        ["C, Cortex-M4 build in QEMU", "", f"{m['m4_test']:.4f}",
         f"{c['flash_bytes']:,} B flash (model + kernels)"],
    ]
    return "\n\n".join([
        "## The published MNIST-1D CNN, int8, by the same generator",
        f"Model: {how}.",
        table(["model file", f"test accuracy (all {m['test_n']})",
               f"test accuracy (first {n}: the emulator's)", "size"], rows),
        table(["Cortex-M4 image (arm-none-eabi-gcc -Os, hard float)", "measured"],
              _resources(m)),
        f"Agreement: the host build's int32 logits equal the NumPy reference's bit for bit on "
        f"all {c['samples']} test samples; the emulator printed the same class as both on all "
        f"{n} samples it ran. Validation split ({m['val_n']} samples): the integer reference "
        f"{m['ref_val']:.4f} against the float model's {m['float_val']:.4f} (same class on "
        f"{m['ref_val_agree']:.1%} of them).",
    ])


def _beside(found: dict, ref: dict) -> str:
    """The found MNIST-1D model and the published CNN, side by side."""
    cols = {"found MNIST-1D model (conv1d, searched under 4 KB)": found,
            "published MNIST-1D CNN (int8)": ref}

    def row(label, f):  # noqa: ANN001, ANN202
        return [label, *[f(m) for m in cols.values()]]

    return "\n\n".join([
        "## The found MNIST-1D model beside the published CNN",
        "Both compiled by the same generator and measured the same way (same data split, same "
        "harness); the sections below give the details.",
        table(["", *cols], [
            row("test accuracy in the emulator (samples run)",
                lambda m: f"{m['m4_test']:.2%} ({m['m4_n']})"),
            row("test accuracy of the float model", lambda m: f"{m['float_test']:.2%}"),
            row("parameters", lambda m: f"{m['params']:,}"),
            row("flash: model + kernels (weights)",
                lambda m: f"{m['checked']['flash_bytes']:,} B "
                          f"({m['summary']['weight_bytes']:,} B)"),
            row("RAM: data + bss + stack", lambda m: f"{m['checked']['ram_bytes']:,} B"),
            row("activation arena", lambda m: f"{m['summary']['arena_bytes']:,} B"),
            row("instructions per inference (QEMU)",
                lambda m: f"{m['checked']['instructions']:,.0f}"),
            row("int8 ONNX file", lambda m: "n/a" if m["onnx_bytes"] is None
                else f"{m['onnx_bytes']:,} B"),
        ]),
    ])


def run(args: argparse.Namespace) -> Path:
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    from nasopt.deploy.firmware import toolchain
    parts = [p for p in args.parts.split(",") if p]
    if not parts or set(parts) - {"mnist1d", "fashion"}:
        raise NasoptError(f"--parts takes mnist1d and/or fashion, got {args.parts!r}")
    if not toolchain.arm_available():
        raise NasoptError(f"the Cortex-M4 toolchain or QEMU is missing: {toolchain.APT}")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    root = Path(args.run_dir)
    found = {}
    reference_cnn = None
    start = time.perf_counter()
    try:
        with LoadSampler() as load:
            if "mnist1d" in parts:
                folder, how = _mnist1d_model(args, root, log)
                found["MNIST-1D (conv1d)"] = (how, measure(folder, args.emulator_samples, log))
                card = found["MNIST-1D (conv1d)"][1]["card"]
                r_folder, r_how, made = _reference_model(args, root, card, log)
                reference_cnn = (r_how, measure_reference(r_folder, made,
                                                          args.emulator_samples, log))
            if "fashion" in parts:
                folder, how = _fashion_model(args, root, log)
                found["Fashion-MNIST (mobilenet)"] = (how, measure(folder, args.emulator_samples,
                                                                   log))
    finally:
        torch.set_num_threads(threads)
    wall = time.perf_counter() - start
    targets = []
    if "MNIST-1D (conv1d)" in found:
        m = found["MNIST-1D (conv1d)"][1]
        c = m["checked"]
        targets += [
            ["MNIST-1D test accuracy in the emulator >= 95 %", f"{m['m4_test']:.2%} "
             f"({m['m4_n']} samples)", "met" if m["m4_test"] >= ACC_TARGET else "not met"],
            ["MNIST-1D flash (model + kernels) <= 8 KB", f"{c['flash_bytes']:,} B",
             "met" if c["flash_bytes"] <= FLASH_TARGET else "not met"],
            ["MNIST-1D RAM (data + bss + stack) <= 2 KB", f"{c['ram_bytes']:,} B",
             "met" if c["ram_bytes"] <= RAM_TARGET else "not met"],
        ]
    checked = dict(found)
    if reference_cnn is not None:
        checked["Published MNIST-1D CNN (int8)"] = reference_cnn
    for name, (_, m) in checked.items():
        all_test = m["m4_n"] == m["test_n"]
        targets.append([f"{name}: emulator, host and NumPy agree on every test sample",
                        f"host = NumPy on {m['test_n']}, emulator = both on {m['m4_n']}",
                        "met" if all_test else f"met on the {m['m4_n']} samples run in the "
                        f"emulator (host = NumPy on all {m['test_n']})"])
    text = "\n\n".join([
        "# Found models as integer C on an emulated Cortex-M4",
        f"Command: `{command(args)}`  \nMachine: {machine()}  \nWall time: {wall:.0f} s.  \n"
        f"{load.note()}",
        "What was measured: each model's export folder holds model.packed (the size objective), "
        "model.int8.onnx (int8 re-quantized by ONNX Runtime) and model.c / model.h (`nasopt "
        "export --format c`: weights at the arch's bit-widths with per-channel fixed-point "
        "requantization, int8 activations calibrated on training samples, the data's "
        "preprocessing folded into the input quantization; float32 layers as 8-bit). The C is "
        "built on the host with gcc and compared with the NumPy reference "
        "(nasopt/deploy/firmware/reference.py) on every test sample, then built with "
        "`arm-none-eabi-gcc -mcpu=cortex-m4 -mthumb -mfloat-abi=hard -Os` and run in "
        "`qemu-system-arm -M mps2-an386 -icount shift=0` with semihosting: the firmware reads "
        "the samples from a file and prints one class per line. Flash and RAM come from the "
        "linked image (the link map's model.o sections) and the painted stack; the instruction "
        "count is SysTick ticks inside nasopt_predict times the instructions per tick of a "
        "loop of known length, an emulator count and not a board's latency. The test split is "
        "read only here, after the models were made.",
        table(["target", "measured", "verdict"], targets),
        *([] if reference_cnn is None else [_beside(found["MNIST-1D (conv1d)"][1],
                                                    reference_cnn[1])]),
        *[_section(name, how, m) for name, (how, m) in found.items()],
        *([] if reference_cnn is None else [_reference_section(*reference_cnn)]),
        "## Limits",
        "- Flash is larger than model.packed: the C stores per output channel an int32 bias, "
        "an int32 multiplier and a shift (9 bytes, against the packed file's float32 scale and "
        "bias, 8 bytes), and the kernels' code. A float32 layer of an arch is stored as 8-bit in "
        "C; a sparse layer always stores a one-bit-per-weight mask (the packed file picks the "
        "smaller of a mask and an index list).\n"
        "- The instruction count is QEMU's (`-icount`): no caches, flash wait states or "
        "pipeline stalls, so it ranks models and kernels but is not a board's cycle count.\n"
        "- Wall times are of the runs written here; where a supernet and trials were reused "
        "from an earlier run of the same command, the section says so.\n"
        "- The searches that made these models scored size by the packed file's bytes (their "
        "configs' size budgets), not by the C's flash; `--hardware cortex-m4` scores the C's "
        "flash and RAM predicted from the integer plan (next section).\n"
        "- The published CNN is not searched: it is the fixed reference network, trained once "
        "with its recipe and quantized uniformly to int8 (no distillation, no QAT).",
    ]) + "\n"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return out
