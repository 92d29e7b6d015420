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
            f"{args.fashion_finetune_epochs} --emulator-samples {args.emulator_samples} "
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


def measure(folder: Path, emulator_samples: int, log) -> dict:  # noqa: ANN001
    """Every number of the report for one export folder."""
    from nasopt import api
    from nasopt.core.data import load_dataset
    from nasopt.deploy import onnx as onnx_export
    from nasopt.deploy.export import read_card
    from nasopt.deploy.firmware import c_export, reference, toolchain
    from nasopt.hardware.memory import peak_bytes
    card = read_card(folder)
    d = card["dataset"]
    data = load_dataset(d["dataset"], seed=d.get("seed", 0),
                        val_fraction=d.get("val_fraction", 0.15),
                        test_fraction=d.get("test_fraction", 0.2))
    pre = data.preprocess
    raw = (lambda x: pre.raw(x) if pre else x)  # noqa: E731
    x_test, y_test = raw(data.x_test).numpy(), data.y_test.numpy()
    x_val, y_val = raw(data.x_val).numpy(), data.y_val.numpy()
    model = api.load(folder)  # raw samples in
    with torch.no_grad():
        float_test = model(torch.as_tensor(x_test)).argmax(1).numpy()
        float_val = model(torch.as_tensor(x_val)).argmax(1).numpy()
    sess = onnx_export.session(folder / onnx_export.INT8_FILE)
    int8_test = onnx_export.run(sess, x_test).argmax(1)
    plan = reference.load(folder / c_export.PLAN)
    ref_val = reference.predict(plan, x_val)
    log(f"{folder}: host and emulator runs")
    start = time.perf_counter()
    checked = toolchain.verify(folder, x_test, y_test, emulator=True,
                               emulator_samples=emulator_samples or None, timeout=3600)
    verify_s = time.perf_counter() - start
    ref_test = reference.predict(plan, x_test)
    space, _, net, _ = reference.read_packed(folder / "model.packed", api.SPACES)
    n = checked["m4_samples"]
    summary = c_export.summary(plan)
    return {
        "card": card, "arch": json.loads((folder / "arch.json").read_text()),
        "space": space.name, "dataset": data.name, "test_n": len(y_test), "val_n": len(y_val),
        "float_test": float((float_test == y_test).mean()),
        "float_val": float((float_val == y_val).mean()),
        "int8_test": float((int8_test == y_test).mean()),
        "ref_test": float((ref_test == y_test).mean()),
        "ref_val": float((ref_val == y_val).mean()),
        "ref_val_agree": float((ref_val == float_val).mean()),
        "m4_test": checked["m4_accuracy"], "m4_n": n,
        "float_first_n": float((float_test[:n] == y_test[:n]).mean()),
        "int8_first_n": float((int8_test[:n] == y_test[:n]).mean()),
        "ref_first_n": float((ref_test[:n] == y_test[:n]).mean()),
        "packed_bytes": (folder / "model.packed").stat().st_size,
        "onnx_bytes": (folder / onnx_export.INT8_FILE).stat().st_size,
        "peak_bytes": peak_bytes(net, space.input_shape, "int8"),
        "checked": checked, "summary": summary, "verify_s": verify_s,
    }


def _section(name: str, how: str, m: dict) -> str:
    c, s = m["checked"], m["summary"]
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
    res = [
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
    start = time.perf_counter()
    try:
        with LoadSampler() as load:
            if "mnist1d" in parts:
                folder, how = _mnist1d_model(args, root, log)
                found["MNIST-1D (conv1d)"] = (how, measure(folder, args.emulator_samples, log))
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
    for name, (_, m) in found.items():
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
        *[_section(name, how, m) for name, (how, m) in found.items()],
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
        "- No `cortex-m4` hardware profile: the search's size objective is still the packed "
        "file's bytes, not the C's flash.",
    ]) + "\n"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return out
