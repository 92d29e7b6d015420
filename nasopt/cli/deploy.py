"""The ``nasopt distill``, ``nasopt finetune`` and ``nasopt run`` commands (parsers + handlers;
wired into :mod:`nasopt.cli`).

``distill`` writes a *student folder*: ``arch.json``, ``student.json`` (space, data setup,
history) and ``student.pt`` (the float model's state dict, BatchNorm not folded). ``finetune``
takes a student folder, a nasopt export (``--from``) or a study trial (inherited weights), applies
the arch's compression policy with quantization-aware training and writes an export folder
(``nasopt.load`` works on it), plus ``metrics.json`` with validation and test accuracy.

Each command's output folder (``--out``, ``export.out``) must be new or empty unless ``--force``
(:func:`nasopt.deploy.export.check_out`, after the inputs are read and before any training).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
from pathlib import Path

from nasopt.core.errors import NasoptError

STUDENT_CARD = "student.json"


def add_parsers(sub) -> None:  # noqa: ANN001
    p = sub.add_parser("distill", help="train a chosen arch with knowledge distillation",
                       description="Train the arch of a study trial (or an arch.json) from "
                       "inherited supernet weights or from scratch, with KD from the supernet's "
                       "largest subnet and/or teacher files. Writes a student folder for "
                       "`nasopt finetune --from`.")
    p.add_argument("study", help="the study (its data split and supernet are used)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--trial", type=trial_arg, metavar="N|best",
                     help="trial number whose arch to train, or best: the best feasible trial "
                     "by the study's quality metric (as nasopt export --trial best)")
    src.add_argument("--arch", help="an arch.json of the study's space")
    p.add_argument("--init", choices=("inherit", "scratch"), default="inherit")
    p.add_argument("--teacher", action="append", metavar="SPEC",
                   help="largest (default), a TorchScript file, or a nasopt export; repeat for "
                   "several teachers (soft targets averaged)")
    p.add_argument("--teacher-weights", metavar="W1,W2", help="weights of the teachers' soft "
                   "targets (default: equal)")
    p.add_argument("--no-teacher", action="store_true", help="plain cross-entropy (baseline)")
    p.add_argument("--alpha", type=float, default=0.5, help="weight of the label loss (0.5)")
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--adaptive-temperature", action="store_true",
                   help="anneal the temperature to 1 (Annealing-KD schedule)")
    p.add_argument("--hint-weight", type=float, default=0.0,
                   help="> 0: feature distillation (FitNets hint through a 1x1 adapter)")
    p.add_argument("--hint-layer", default="", help="module name (default: the last stage)")
    _add_training(p, epochs=40, lr=3e-3, patience=10)
    add_out(p, "student folder to write")
    _add_storage(p)

    p = sub.add_parser("finetune", help="quantization-aware fine-tuning with the arch's "
                       "compression policy (and transfer learning)",
                       description="Fine-tune with the compression policy applied (fake "
                       "quantization at the arch's bit-widths, fixed sparsity masks, low-rank "
                       "factors), early stopping on validation, then export (verified). With "
                       "--dataset / --classes the classifier is re-headed for the new labels.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from", dest="source", metavar="DIR",
                     help="a student folder (nasopt distill) or an export folder")
    src.add_argument("--study", help="start from a study trial's inherited weights")
    p.add_argument("--trial", type=trial_arg, metavar="N|best",
                   help="with --study: the trial number, or best: the best feasible trial by the "
                   "study's quality metric")
    p.add_argument("--dataset", help="train on this dataset instead of the source's")
    p.add_argument("--classes", help="keep only these labels, e.g. 5,6,7,8,9 (renumbered 0..k-1)")
    p.add_argument("--fraction", type=float, default=1.0,
                   help="keep this stratified fraction of train and validation (e.g. 0.1)")
    p.add_argument("--freeze", default="", help="groups to keep fixed, e.g. s1,s2")
    p.add_argument("--shots", type=_positive_int, metavar="K", help="few-shot target: keep K "
                   "training samples of every class (validation and test unchanged)")
    p.add_argument("--shots-seed", type=int, default=0, metavar="N",
                   help="with --shots: which K samples (another N, another draw; default 0)")
    _add_training(p, epochs=20, lr=1e-3, patience=5)
    meta = p.add_argument_group(
        "meta-learned initialisation", "With --meta the re-headed model is meta-trained by "
        "Reptile (first-order meta-learning) on few-shot tasks drawn from the training split of "
        "source classes other than the target's, then fine-tuned on the target as usual "
        "(nasopt/deploy/meta.py). Its seed is --seed.")
    meta.add_argument("--meta", action="store_true",
                      help="meta-train the initialisation before fine-tuning")
    meta.add_argument("--meta-classes", metavar="C1,C2,...", help="source classes of the source "
                      "model's dataset (default: every class of it not in --classes)")
    meta.add_argument("--meta-iterations", type=_positive_int, metavar="N",
                      help="tasks, one outer update each (default 1000)")
    meta.add_argument("--meta-shots", type=_positive_int, metavar="K",
                      help="support samples per class and task (default 10)")
    meta.add_argument("--meta-inner-steps", type=_positive_int, metavar="N",
                      help="Adam steps per task (default 5)")
    meta.add_argument("--meta-inner-lr", type=float, metavar="LR",
                      help="the inner steps' learning rate (default 0.001)")
    meta.add_argument("--meta-lr", type=float, metavar="EPS", help="outer step size, decaying "
                      "linearly to 0 (default 0.1)")
    add_out(p, "export folder to write")
    _add_storage(p)

    p = sub.add_parser("run", help="the whole pipeline from a TOML config",
                       description="train supernet -> search -> pick -> distill -> fine-tune "
                       "(QAT) -> export -> report (metrics.json and REPORT.md in the export "
                       "folder); with a [meta] section also few-shot transfer from a "
                       "meta-learned initialisation to a target task, exported to a folder of "
                       "its own. Sections: data, supernet, eval, search, gradient, pick, "
                       f"distill, finetune, export, meta; top-level {', '.join(RUN_TOP_LEVEL)} "
                       "(see nasopt/pipeline.py and configs/mnist1d.toml). Re-running the same "
                       "config reuses the trained supernet and the finished trials.")
    p.add_argument("config", help="TOML file, e.g. configs/mnist1d.toml")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value, e.g. --set search.trials=50")
    p.add_argument("--force", action="store_true",
                   help=FORCE_HELP.format("export.out (and meta.out)"))
    p.add_argument("--quiet", action="store_true", help="no progress bars or log lines")


def trial_arg(text: str) -> int | str:
    """``--trial`` of `nasopt export`, `distill` and `finetune`: a trial number or ``best``."""
    if text == "best":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a trial number or 'best'") from None


def _positive_int(text: str) -> int:
    """An option that must be a whole number of at least 1 (argparse names the option)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _add_training(p: argparse.ArgumentParser, epochs: int, lr: float, patience: int) -> None:
    p.add_argument("--epochs", type=int, default=epochs, help=f"maximum epochs ({epochs})")
    p.add_argument("--lr", type=float, default=lr, help=f"Adam learning rate, cosine ({lr})")
    p.add_argument("--batch-size", type=_positive_int, default=128)
    p.add_argument("--patience", type=int, default=patience,
                   help=f"early stopping on validation accuracy ({patience})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--augment", default="", metavar="LIST",
                   help="augment the training inputs: flip (mirror the last axis; not for digits "
                   "or text), shift=N (translate by up to N positions), e.g. flip,shift=2")


def _names(text: str) -> tuple[str, ...]:
    """``"a, b"`` -> ("a", "b")."""
    return tuple(g.strip() for g in text.split(",") if g.strip())


def _augment(args: argparse.Namespace) -> tuple[str, ...]:
    """``--augment``'s names, checked here so that an error names the flag."""
    from nasopt.core.augment import Augment
    names = _names(args.augment)
    Augment.parse(names, "--augment")
    return names


#: the config keys of `nasopt run` outside any section, for its help without importing the
#: pipeline (and torch); tests/test_cli_start.py checks them against RunConfig's fields
RUN_TOP_LEVEL = ("run_dir", "device", "threads")


#: what --force does, for every command that writes an output folder (nasopt.deploy.export.check_out)
FORCE_HELP = ("{} may hold files: replace or remove those with nasopt's file names (arch.json, "
              "model.json, weights.pt, model.*, metrics.json, REPORT.md, student.*), keep the "
              "others")


def add_out(p: argparse.ArgumentParser, what: str) -> None:
    """``--out`` and ``--force`` of a command that writes an output folder."""
    p.add_argument("--out", required=True, help=f"{what}; a new or empty folder unless --force")
    p.add_argument("--force", action="store_true", help=FORCE_HELP.format("--out"))


def _add_storage(p: argparse.ArgumentParser) -> None:
    p.add_argument("--storage", help="Optuna storage URL (default: sqlite file in --run-dir)")
    p.add_argument("--run-dir", default="runs")


def dispatch(args: argparse.Namespace) -> int:
    from nasopt.search.study import mask_url
    # model cards record the command: without the password of a storage URL in it
    command = mask_url("nasopt " + " ".join(shlex.quote(a) for a in args.argv))
    if args.command == "distill":
        return _distill(args)
    if args.command == "finetune":
        return _finetune(args, command)
    return _run(args, command)


def _log(quiet: bool):  # noqa: ANN202
    return (lambda s: None) if quiet else (lambda s: print(s, file=sys.stderr))


def _run(args: argparse.Namespace, command: str) -> int:
    from nasopt.pipeline import load_run_config, run
    cfg = load_run_config(args.config, args.set)
    result = run(cfg, command, show_progress=not args.quiet, log=_log(args.quiet),
                 force=args.force)
    print((result.out / "REPORT.md").read_text(), end="")
    meta = result.card.get("meta")
    if meta:  # the [meta] step's adapted model
        print(f"wrote {meta['out']}/ ({', '.join(meta['files'])})")
    print(f"wrote {result.out}/ ({', '.join(result.card['files'])})")
    return 0


def export_summary(out: Path, args: argparse.Namespace) -> str:
    """What `nasopt export` prints: the files written (verified), the trial picked, how to load
    each model file and the inputs it takes; last, that the weights are inherited from the
    supernet, not retrained, and the commands that train them."""
    from nasopt.deploy.export import files_of, loaders
    from nasopt.search.study import mask_url
    from nasopt.deploy.export import read_card
    card = read_card(out)
    trial, study = card["trial"], card["study"]
    quality = card.get("quality", "accuracy")
    value = (card.get("metrics") or {}).get(quality)
    lines = []
    if "picked" in card:
        lines.append(f"picked trial {trial} of {study}: {card['picked'].removeprefix('best: ')}"
                     f" (validation {quality} {value:.4f})")
    shape = ", ".join(str(d) for d in card["space"]["input_shape"])
    pre = (card.get("input") or {}).get("preprocess")
    formula = "" if not pre else (f"x / {pre['std']:g}" if pre["mean"] == 0 else
                                  f"(x - {pre['mean']:g}) / {pre['std']:g}")
    inside = ("" if not pre or (pre["mean"] == 0 and pre["std"] == 1) else
              f"; the preprocessing {formula} is applied inside")
    lines.append(f"exported trial {trial} of {study} to {out}/ ({', '.join(files_of(out))}), "
                 f"verified; load it with {' or '.join(loaders(out))}; inputs: raw samples as "
                 f"the dataset gives them, float32, reshaped to (N, {shape}){inside} "
                 f"(model.json: input)")
    where = "".join(f" {flag} {shlex.quote(mask_url(str(value)))}" for flag, value in
                    (("--run-dir", args.run_dir), ("--storage", args.storage))
                    if value is not None and not (flag == "--run-dir" and value == "runs"))
    acc = f" (validation {quality} {value:.4f} as searched)" if value is not None else ""
    if (card.get("dataset") or {}).get("task") == "regression":
        lines.append(f"weights: inherited from the supernet, not retrained{acc}")
        return "\n".join(lines)
    lines.append(f"weights: inherited from the supernet, not retrained{acc}; next, train them: "
                 f"`nasopt finetune --study {shlex.quote(study)} --trial {trial}{where} --out "
                 f"DIR` (quantization-aware fine-tuning), or `nasopt distill "
                 f"{shlex.quote(study)} --trial {trial}{where} --out STUDENT` then `nasopt "
                 f"finetune --from STUDENT --out DIR`, or the whole pipeline with `nasopt run "
                 f"CONFIG.toml`")
    return "\n".join(lines)


def _numbers(text: str | None, kind: type, option: str, example: str) -> list:
    """A comma-separated option value as a list of ``kind`` (none given: [])."""
    try:
        return [kind(v) for v in text.split(",")] if text else []
    except ValueError:
        raise NasoptError(f"{option} {text!r}: give comma-separated numbers, e.g. {option} "
                          f"{example}") from None


def _study_evaluator(study_name: str, storage: str | None, run_dir: str):  # noqa: ANN202
    from nasopt import api
    study = api.open_study(study_name, storage, run_dir)
    evaluator, data = api.rebuild(study)
    return study, evaluator, data


def _trial_arch(study, evaluator, trial: int | str):  # noqa: ANN001, ANN202
    if trial == "best":  # as `nasopt export --trial best`
        from nasopt import api
        from nasopt.search.study import quality_metric
        trial = api.best_trial(study)
        print(f"picked trial {trial} of {study.study_name}: the best feasible completed trial "
              f"by {quality_metric(study)[0]}", file=sys.stderr)
    found = [t for t in study.trials if t.number == trial]
    if not found or found[0].state.name != "COMPLETE":
        raise NasoptError(f"study {study.study_name!r} has no completed trial {trial}; see "
                          f"`nasopt studies show {study.study_name}`")
    return evaluator.space.validate(found[0].params)


def _distill(args: argparse.Namespace) -> int:
    import io

    from nasopt import api
    from nasopt.core.arch import Arch
    from nasopt.deploy.distill import train_student
    from nasopt.deploy.export import check_out, replace_artifacts
    from nasopt.pipeline import DistillStep, student_model, teachers_for
    from nasopt.search.study import setup_of
    weights = _numbers(args.teacher_weights, float, "--teacher-weights", "0.7,0.3")
    cfg = DistillStep(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                      alpha=args.alpha, temperature=args.temperature,
                      adaptive_temperature=args.adaptive_temperature,
                      hint_weight=args.hint_weight, hint_layer=args.hint_layer,
                      patience=args.patience, seed=args.seed, init=args.init,
                      augment=_augment(args),
                      teachers=tuple(args.teacher or ["largest"]), teacher_weights=tuple(weights))
    study, evaluator, data = _study_evaluator(args.study, args.storage, args.run_dir)
    if args.trial is not None:
        arch = _trial_arch(study, evaluator, args.trial)
    else:
        try:
            arch = evaluator.space.validate(Arch.load(args.arch), strict=True)
        except (OSError, ValueError) as exc:
            raise NasoptError(f"cannot read arch file {args.arch}: {exc}") from None
    out = check_out(args.out, args.force)
    student = student_model(evaluator, arch, cfg.init, cfg.seed)
    teachers = None if args.no_teacher else teachers_for(evaluator, cfg.teachers,
                                                         cfg.teacher_weights, data, api.SPACES)
    history = train_student(student, data, teachers, cfg, show_progress=True)
    import torch
    weights_file = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in student.state_dict().items()}, weights_file)
    card = {"space": evaluator.space.describe(), "study": study.study_name,
            "dataset": setup_of(study)["data"], "distill": dataclasses.asdict(cfg)
            | {"teachers": None if args.no_teacher else list(cfg.teachers)},
            f"val_{history.metric}": history.best_val_accuracy,
            "history": dataclasses.asdict(history)}
    written = replace_artifacts(out, {"student.pt": weights_file.getvalue(),
                                      "arch.json": (arch.to_json() + "\n").encode(),
                                      STUDENT_CARD: (json.dumps(card, indent=2) + "\n").encode()},
                                STUDENT_CARD)
    print(f"distilled {'(no teacher) ' if args.no_teacher else ''}the arch into {out}/ "
          f"({', '.join(written)}): val {history.metric} "
          f"{history.best_val_accuracy:.4f}; next: nasopt finetune --from {out} --out DIR")
    return 0


def _finetune(args: argparse.Namespace, command: str) -> int:
    from nasopt import api
    from nasopt.core.arch import Arch
    from nasopt.core.data import load_dataset
    from nasopt.deploy.export import check_out, export_model, read_card, with_preprocess
    from nasopt.deploy.finetune import FinetuneConfig
    from nasopt.pipeline import transfer
    from nasopt.core.space import space_from_description
    from nasopt.deploy.torchscript import FILE as TS_FILE
    from nasopt.deploy.torchscript import write as write_torchscript
    from nasopt.core.task import task_of
    from nasopt.supernet.train import quality
    cfg = FinetuneConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                         patience=args.patience, seed=args.seed, augment=_augment(args),
                         freeze=_names(args.freeze))
    meta_cfg = _meta_config(args)  # checked before any model or data is read
    data = None
    deployed = False
    if args.study:
        if args.trial is None:
            raise NasoptError("--study needs --trial N")
        study, evaluator, data = _study_evaluator(args.study, args.storage, args.run_dir)
        arch = _trial_arch(study, evaluator, args.trial)
        space, model = evaluator.space, evaluator.calibrated_model(arch)
        from nasopt.search.study import setup_of
        data_setup = setup_of(study)["data"]
    else:
        src = Path(args.source)
        if (src / STUDENT_CARD).exists():
            card = read_card(src, STUDENT_CARD)
            space = space_from_description(card["space"], api.SPACES)
            arch = space.validate(Arch.load(src / "arch.json"), strict=True)
            model = space.build(arch)
            from nasopt.core import checkpoint
            model.load_state_dict(checkpoint.load(src / "student.pt"))
        elif (src / "model.json").exists():
            card = read_card(src)
            space = space_from_description(card["space"], api.SPACES)
            arch = space.validate(Arch.load(src / "arch.json"), strict=True)
            # the network itself: it is trained on preprocessed inputs, as the data gives them
            model, deployed = api.load(src, raw_input=False), True
        else:
            raise NasoptError(f"--from {src}: not a student folder (student.json) or an export "
                              f"folder (model.json)")
        data_setup = card.get("dataset") or {}
    spec = args.dataset or data_setup.get("dataset")
    if spec is None:
        raise NasoptError("the source does not name its dataset; give --dataset")
    classes = _numbers(args.classes, int, "--classes", "5,6,7,8,9") or None
    # the dataset meta-training draws from: the source model's (its other classes)
    meta_spec = data_setup.get("dataset") or spec
    if meta_cfg is not None and meta_spec == spec and not classes:
        raise NasoptError(f"--meta needs --classes: the target classes (e.g. --classes "
                          f"5,6,7,8,9); meta-training draws its tasks from the other classes of "
                          f"{spec} (--meta-classes)")
    if data is None or args.dataset or classes or args.fraction != 1 or args.shots:
        if args.dataset or classes or args.fraction != 1 or args.shots:
            # load_dataset checks the fraction and the shots
            data = load_dataset(spec, classes=classes, fraction=args.fraction, shots=args.shots,
                                shots_seed=args.shots_seed)
        else:  # the source's own split
            keys = ("seed", "val_fraction", "test_fraction", "label_column", "classes",
                    "fraction", "task")
            data = load_dataset(spec, **{k: data_setup[k] for k in keys
                                         if data_setup.get(k) is not None})
    if data.input_shape != tuple(space.input_shape):
        raise NasoptError(f"{data.name} samples are shaped {data.input_shape}, the model takes "
                          f"{tuple(space.input_shape)}; transfer needs the same input shape")
    source = None
    if meta_cfg is not None:  # the source classes' training split, checked before any training
        source = _meta_source(meta_spec, spec, classes, args.meta_classes, data, space,
                              meta_cfg)
    out = check_out(args.out, args.force)  # the inputs above are read, no training yet
    result = transfer(model, space, arch, data, cfg, deployed=deployed,
                      rehead=bool(data.num_classes != space.num_classes or args.dataset
                                  or classes),
                      meta=meta_cfg, source=source, show_progress=True)
    final, stored, history, space = result.model, result.stored, result.history, result.space
    meta_record = result.meta
    distilled = args.source is not None and (Path(args.source) / STUDENT_CARD).exists()
    weights = "distilled, fine-tuned" if distilled else "fine-tuned"
    info = {"origin": f"nasopt finetune (QAT{', Reptile first' if source else ''}) from "
                      f"{args.source or args.study}",
            "weights": ("meta-trained, " + weights) if source else weights,
            "dataset": {"dataset": spec, "classes": classes, "fraction": args.fraction,
                        "shots": args.shots, "shots_seed": args.shots_seed if args.shots else None,
                        "task": data.task}}
    export_model(final, stored, arch, space, out, info, api.SPACES, preprocess=data.preprocess)
    # model.ts takes raw samples too (the preprocessing inside), as every model file there
    write_torchscript(with_preprocess(final, data.preprocess), out / TS_FILE, space.input_shape)
    name = history.metric  # accuracy, or mae for regression
    test = quality(api.load(out / "model.packed"), data.preprocess.raw(data.x_test.cpu()),
                   data.y_test.cpu(), task_of(data))
    metrics = {"command": command, "dataset": data.summary(),
               f"val_{name}": history.best_val_accuracy, f"test_{name}_packed": test,
               "packed_bytes": (out / "model.packed").stat().st_size,
               "finetune": dataclasses.asdict(cfg), "history": dataclasses.asdict(history)}
    if meta_record is not None:
        metrics["meta"] = meta_record
    from nasopt.search.study import mask_secrets
    (out / "metrics.json").write_text(json.dumps(mask_secrets(metrics), indent=2) + "\n")
    if meta_record is not None:
        print(f"meta-trained (Reptile) on {meta_record['iterations']} tasks of "
              f"{meta_record['ways']} classes drawn from {meta_spec} classes "
              f"{','.join(map(str, meta_record['classes']))} ({meta_record['seconds']:.0f} s)")
    print(f"fine-tuned (QAT) on {data.summary()}: val {name} {history.best_val_accuracy:.4f}; "
          f"test {name} of model.packed {test:.4f} ({metrics['packed_bytes']} B); wrote {out}/ "
          f"(arch.json, model.json, weights.pt, model.packed, model.ts, metrics.json)")
    return 0


#: the options of ``finetune --meta`` and the MetaConfig fields they set
META_OPTIONS = {"meta_iterations": "iterations", "meta_shots": "shots",
                "meta_inner_steps": "inner_steps", "meta_inner_lr": "inner_lr",
                "meta_lr": "meta_lr"}


def _meta_config(args: argparse.Namespace):  # noqa: ANN202 - a MetaConfig or None
    """``finetune``'s meta-learning settings (None without --meta); a meta option without
    --meta is one line."""
    given = {field: getattr(args, option) for option, field in META_OPTIONS.items()
             if getattr(args, option) is not None}
    if not args.meta:
        stray = [f"--{o.replace('_', '-')}" for o in (*META_OPTIONS, "meta_classes")
                 if getattr(args, o) is not None]
        if stray:
            raise NasoptError(f"{', '.join(stray)} only apply with --meta; add --meta or drop "
                              f"them")
        return None
    from nasopt.deploy.meta import MetaConfig
    return MetaConfig(seed=args.seed, **given)


def _meta_source(meta_spec: str, spec: str, target: list[int] | None, given: str | None,
                 data, space, cfg):  # noqa: ANN001, ANN202
    """The source task (:class:`nasopt.deploy.meta.SourceTask`) of ``finetune --meta``: the
    classes of ``meta_spec`` (the source model's dataset) that ``--meta-classes`` names, or
    else every one not among the ``target`` classes of the same dataset."""
    from nasopt.core.data import load_dataset
    from nasopt.deploy.meta import source_task
    if data.task != "classification":
        raise NasoptError(f"--meta draws classes; {data.name} is a regression dataset")
    full = load_dataset(meta_spec)  # its training split is all meta-training reads
    return source_task(full, data, target if meta_spec == spec else None,
                       _numbers(given, int, "--meta-classes", "0,1,2,3,4") or None, cfg,
                       space.input_shape, dataset=meta_spec)
