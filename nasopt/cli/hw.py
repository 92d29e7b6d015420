"""The ``nasopt hw`` commands (parsers + handlers; wired into :mod:`nasopt.cli`):

- ``hw profiles``: the shipped hardware profiles;
- ``hw measure``: measured latency (ONNX Runtime) and peak SRAM of a study trial or an export;
- ``hw profile``: build (or rebuild) the latency look-up table of a space under a profile;
- ``hw validate``: predicted vs measured latency over random archs (±10 % share, Kendall tau,
  and whether the machine was quiet enough to trust them).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from nasopt.core.errors import NasoptError

FIT_ARCHS = 80  # nasopt.hardware.lut.FIT_ARCHS (not imported here: the parser stays light)

#: the dataset whose input shape a space is profiled for, unless --dataset says otherwise
DEFAULT_DATASET = {"conv1d": "mnist1d", "mobilenet": "digits"}


def add_parsers(sub) -> None:  # noqa: ANN001
    p = sub.add_parser("hw", help="hardware profiles, measured latency, latency look-up tables",
                       description="Hardware-aware search support: profiles (nasopt/hardware/profiles/*.toml"
                       " or your own .toml), latency measured in ONNX Runtime, latency look-up "
                       "tables and their validation.")
    hsub = p.add_subparsers(dest="hw_command", required=True, metavar="SUBCOMMAND")
    hsub.add_parser("profiles", help="list the shipped hardware profiles")

    q = hsub.add_parser("measure", help="latency (ONNX Runtime) and peak SRAM of a trial or an "
                        "export")
    src = q.add_mutually_exclusive_group(required=True)
    src.add_argument("--study", help="a study; with --trial")
    src.add_argument("--export", metavar="DIR", help="an export folder (nasopt export / run)")
    q.add_argument("--trial", type=int, help="trial number (with --study)")
    _add_common(q)

    for name, text in (("profile", "time every block configuration of a space once and store "
                        "its latency look-up table in RUN_DIR/hardware/"),
                       ("validate", "predicted vs measured latency over random archs")):
        q = hsub.add_parser(name, help=text)
        q.add_argument("--space", required=True)
        q.add_argument("--dataset", help="dataset whose input shape and classes to use "
                       "(default: mnist1d for conv1d, digits for mobilenet)")
        q.add_argument("--restrict", action="append", default=[], metavar="GENE=OPT[,OPT...]",
                       help="profile a sub-space, e.g. --restrict head.rank=1.0")
        q.add_argument("--fit-archs", type=int, default=FIT_ARCHS,
                       help="random archs measured to fit the feature coefficients and the "
                       f"constant (default {FIT_ARCHS})")
        if name == "profile":
            q.add_argument("--force", action="store_true", help="rebuild an existing table")
        else:
            q.add_argument("--n", type=int, default=100, help="random archs (default 100)")
            q.add_argument("--seed", type=int, default=1)
        _add_common(q)


def _add_common(q: argparse.ArgumentParser) -> None:
    q.add_argument("--hardware", default="cpu-ort", metavar="PROFILE",
                   help="cpu-ort (default), cpu-ort-int8, mcu, cortex-m4 or a .toml file")
    q.add_argument("--storage", help="Optuna storage URL (default: sqlite file in --run-dir)")
    q.add_argument("--run-dir", default="runs")


def dispatch(args: argparse.Namespace) -> int:
    from nasopt.hardware.profile import load_profile, shipped
    if args.hw_command == "profiles":
        for name in shipped():
            p = load_profile(name)
            limits = ", ".join(f"{k} {v:g}" for k, v in p.limits.items()) or "none"
            metrics = ", ".join(f"{k} {v}" for k, v in p.metrics.items())
            print(f"{name:<13} {p.description}\n{'':<13} {p.dtype}; {metrics}; limits: {limits}")
        return 0
    profile = load_profile(args.hardware)
    if args.hw_command == "measure":
        return _measure(args, profile)
    return _table(args, profile)


def _space(args: argparse.Namespace):  # noqa: ANN202
    from nasopt import api
    from nasopt.core.space import parse_restrictions
    if args.space not in api.SPACES:
        raise NasoptError(f"unknown space {args.space!r}; known: {', '.join(api.SPACES)}")
    if not api.SPACES[args.space].weight_sharing:
        raise NasoptError(f"space {args.space!r} is searched from a table; it has no networks "
                          f"to time")
    dataset = args.dataset or DEFAULT_DATASET.get(args.space, "mnist1d")
    data = api.load_dataset(dataset)
    restrict = {k: tuple(v) for k, v in parse_restrictions(args.restrict).items()}
    return api.make_space(args.space, data, restrict or None)


def _table(args: argparse.Namespace, profile) -> int:  # noqa: ANN001
    from nasopt.hardware import lut
    space = _space(args)
    path = lut.table_path(args.run_dir, space, profile)
    log = lambda s: print(s, file=sys.stderr)  # noqa: E731
    start = time.perf_counter()
    if path.exists() and not getattr(args, "force", False):
        table = lut.LatencyTable.load(path)
        log(f"using the latency table {path}")
    else:
        table = lut.build_table(space, profile, fit_archs=args.fit_archs, log=log)
        table.save(path)
    if args.hw_command == "profile":
        print(f"latency table of {space.name} under {profile.name}: {len(table.entries)} units, "
              f"latency = sum of unit entries + {table.constant:.4f} ms; "
              f"{table.fit.get('model', '?')}, fit on {table.fit.get('used')} of "
              f"{table.fit.get('archs')} archs, residual RMS "
              f"{table.fit.get('residual_rms_ms', 0):.4f} ms; {time.perf_counter() - start:.0f} s"
              f"\nwrote {path}")
        return 0
    result = lut.validate(table, space, profile, args.n, args.seed, log=log)
    print(f"{space.name} under {profile.name} ({profile.dtype}, {profile.threads} thread(s)): "
          f"{result.summary()}")
    print(f"table {path}; {time.perf_counter() - start:.0f} s")
    return 0


def _measure(args: argparse.Namespace, profile) -> int:  # noqa: ANN001
    from nasopt import api
    from nasopt.hardware import latency, memory
    if args.export:
        timing, what = latency.measure_export(args.export, profile, api.SPACES)
        card = json.loads((Path(args.export) / "model.json").read_text())
        space = api.space_from_description(card["space"], api.SPACES)
        model = api.load(args.export, raw_input=False)  # the network's own activations
        sram = memory.peak_bytes(model, space.input_shape, profile.dtype)
        source = f"export {args.export} ({what})"
    else:
        if args.trial is None:
            raise NasoptError("--study needs --trial N (see `nasopt studies show STUDY`)")
        study = api.open_study(args.study, args.storage, args.run_dir)
        found = [t for t in study.get_trials(deepcopy=False) if t.number == args.trial]
        if not found or "metrics" not in found[0].user_attrs:
            raise NasoptError(f"study {args.study!r} has no completed trial {args.trial}")
        evaluator, _ = api.rebuild(study)
        arch = evaluator.space.validate(found[0].params)
        model, _ = evaluator.compressed(arch)
        timing = latency.measure_model(model, evaluator.space.input_shape, profile,
                                       evaluator.calibration_samples[:256])
        sram = memory.peak_bytes(model, evaluator.space.input_shape, profile.dtype)
        recorded = found[0].user_attrs["metrics"].get("latency_ms")
        source = f"trial {args.trial} of {args.study}" + (
            f" (the search recorded {recorded:.4f} ms)" if recorded is not None else "")
    flag = ""
    if not timing.confirmed:
        flag = (f" NOT CONFIRMED: fewer than {profile.windows} windows in the CPU's fast mode "
                f"(the machine was loaded); the figure is likely too high")
    elif timing.noisy(profile.noise_threshold):
        flag = " NOISY (other processes competed for the CPU)"
    print(f"{source} on {profile.name} ({profile.dtype}, batch 1, {profile.threads} thread(s)): "
          f"{timing.median_ms:.4f} ms (lowest median of {timing.fast_windows} fast-mode windows "
          f"of {timing.repeats} runs, of {timing.windows} windows; IQR {timing.iqr_ms:.4f} ms, "
          f"{timing.relative_iqr:.1%}){flag}; peak SRAM {sram} B at {profile.dtype}")
    return 0
