"""Predicted against measured flash of the ``cortex-m4`` hardware profile:
``python -m nasopt_bench.cortex_m4 [--archs 20] [--seed 7] [--qemu 5]`` prints a markdown section.

For each space with a supernet (conv1d on MNIST-1D, mobilenet on digits): a supernet trained one
epoch on 512 training samples (sizes do not depend on the training), ``--archs`` random archs of
the joint space; per arch the C export's flash and static RAM predicted by
:func:`nasopt.deploy.firmware.footprint.predict` against those of the linked Cortex-M4 image
(:func:`nasopt.deploy.firmware.toolchain.m4_sizes`), and the time of a float evaluation beside
that of the profile's firmware figures (integer plan + integer reference on the validation split).
For the first ``--qemu`` archs the image also runs in QEMU on 2 validation samples: the stack
high-water mark and RAM painted there against the predicted ones. Needs arm-none-eabi-gcc (and
qemu-system-arm with ``--qemu``).
"""
from __future__ import annotations

import argparse
import dataclasses
import random
import tempfile
import time
from pathlib import Path

import torch

from nasopt_bench.report import LoadSampler, machine, table


def measure(space_name: str, dataset: str, archs: int, seed: int, qemu: int) -> list[object]:
    from nasopt import api
    from nasopt.core.config import SupernetConfig
    from nasopt.core.data import load_dataset
    from nasopt.deploy.firmware import c_export, footprint, reference, toolchain
    from nasopt.hardware import profile as hw
    from nasopt.hardware.evaluate import HardwareEvaluator
    from nasopt.search.evaluate import Evaluator
    from nasopt.supernet.elastic import train_supernet
    prof = hw.load_profile("cortex-m4")
    costs = footprint.load_costs(hw.costs_path(prof.source))
    full = load_dataset(dataset)
    data = dataclasses.replace(full, x_train=full.x_train[:512], y_train=full.y_train[:512])
    space = api.make_space(space_name, data)
    torch.manual_seed(seed)
    supernet, _ = train_supernet(space, data, SupernetConfig(epochs=1, warmup_epochs=0,
                                                             batch_size=128, n_random=1),
                                 Path(tempfile.mkdtemp(prefix="nasopt-cm4-")),
                                 show_progress=False)
    evaluator = Evaluator(space, supernet, data, calib_samples=256)
    figures = HardwareEvaluator(evaluator, space, prof).firmware
    rng = random.Random(seed)
    flash_ok = static_ok = stack_ok = ram_ok = 0
    raw = (data.preprocess.raw(data.x_val[:2]) if data.preprocess else data.x_val[:2]).numpy()
    diffs, flashes = [], []
    t_float = t_firmware = 0.0
    with tempfile.TemporaryDirectory(prefix="nasopt-cm4-") as tmp:
        for i in range(archs):
            arch = space.validate(dict(space.sample(rng)))
            t0 = time.perf_counter()
            evaluator(arch)
            t1 = time.perf_counter()
            figures.figures(arch)
            t_float += t1 - t0
            t_firmware += time.perf_counter() - t1
            model, stored = evaluator.compressed(arch)
            plan = reference.build_plan(model, stored, space, data.preprocess,
                                        evaluator.calibration_samples)
            want = footprint.predict(plan, costs)
            folder = Path(tmp) / f"a{i}"
            folder.mkdir()
            for name, text in c_export.generate(plan).items():
                (folder / name).write_text(text)
            got = toolchain.m4_sizes(folder)
            flash_ok += want["flash_bytes"] == got["flash"]
            static_ok += want["static_ram_bytes"] == got["static_ram"]
            diffs.append(abs(want["flash_bytes"] - got["flash"]))
            if i < qemu:
                run = toolchain.m4_run(folder, raw)
                stack_ok += want["stack_bytes"] == run.stack_bytes
                ram_ok += want["ram_bytes"] == run.ram_bytes
            flashes.append(got["flash"])
    return [f"{space_name} ({dataset}, {len(data.y_val)} val)", archs,
            f"{flash_ok} / {archs} (max difference {max(diffs)} B)", f"{static_ok} / {archs}",
            f"{min(flashes):,}-{max(flashes):,} B", f"{stack_ok} / {ram_ok} / {min(qemu, archs)}",
            f"{t_float / archs:.2f} s / {t_firmware / archs:.2f} s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--archs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--qemu", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with LoadSampler() as load:
        rows = [measure("conv1d", "mnist1d", args.archs, args.seed, args.qemu),
                measure("mobilenet", "digits", args.archs, args.seed, args.qemu)]
    print(f"Command: `python -m nasopt_bench.cortex_m4 --archs {args.archs} --seed {args.seed} "
          f"--qemu {args.qemu}`; "
          f"{machine()}. {load.note()}\n")
    print(table(["space (data)", "archs", "predicted flash = linked image's",
                 "predicted static RAM = .data + .bss", "flash range",
                 "in QEMU: predicted stack = painted / predicted RAM = measured / runs",
                 "per arch: float evaluation / firmware figures (plan + integer reference on "
                 "the validation split)"], rows))


if __name__ == "__main__":
    main()
