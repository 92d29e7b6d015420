"""The ``nasopt`` command."""
from __future__ import annotations

import argparse
import difflib
import json
import sys
from collections.abc import Sequence

from nasopt.core.config import DEFAULT_METRIC, DEFAULT_TABLE
from nasopt.core.errors import NasoptError

EPILOG = "Docs: README.md. Every command takes --help."


def _add_storage(p: argparse.ArgumentParser) -> None:
    p.add_argument("--storage", help="Optuna storage URL (default: sqlite file in --run-dir)")
    p.add_argument("--run-dir", default="runs", help="folder for studies.db, supernets, configs "
                   "(default: runs)")


def _add_format(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", choices=("table", "csv", "json"), default="table",
                   help="how rows are printed: an aligned table (default), CSV or JSON")


def build_parser(with_bench: bool = True) -> argparse.ArgumentParser:
    """The ``nasopt`` parser; ``with_bench=False`` leaves out the benchmarks' options (their
    modules import torch), so that ``--help`` and the other commands start quickly."""
    from nasopt import __version__
    from nasopt.cli.deploy import add_out, trial_arg  # --out/--force, --trial of the output commands
    parser = argparse.ArgumentParser(
        prog="nasopt", epilog=EPILOG,
        description="Neural architecture search with compression objectives.")
    parser.add_argument("--version", action="version", version=f"nasopt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("search", help="train (or reuse) a supernet and search it",
                       description="Train the supernet of a space on a dataset (cached by a hash "
                       "of space, data and recipe), then run a search recorded in an Optuna "
                       "study. Re-running the same command continues the study.")
    p.add_argument("--config", help="TOML config file (sections data, supernet, eval, search, "
                   "gradient; top-level run_dir, device); a `nasopt run` config works too (its "
                   "search sections are used: the same study and supernet)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value, e.g. --set supernet.epochs=20")
    p.add_argument("--space", help="search space: a name (see `nasopt spaces`), or your own "
                   "class as path/to/file.py:Class or package.module:Class")
    p.add_argument("--dataset", help="digits, mnist1d, fashion-mnist, or a .npz / .csv path")
    p.add_argument("--strategy", help="search strategy (see `nasopt strategies`)")
    p.add_argument("--trials", type=int, help="total completed trials the study should hold")
    p.add_argument("--timeout", type=float, help="stop this run after SECONDS")
    p.add_argument("--seed", type=int, help="seed of the strategy")
    p.add_argument("--study", help="study name (default: SPACE-DATASET)")
    p.add_argument("--objectives", help="comma-separated, e.g. accuracy,size; f1,size (macro-F1) "
                   "or balanced_accuracy,size for imbalanced classes")
    p.add_argument("--task", choices=("classification", "regression"), help="regression: the "
                   "data file's y holds float targets (a .npz may say so itself: task="
                   "'regression'); objectives mae or rmse (default: mae,size)")
    p.add_argument("--metric", metavar="FILE.py:FUNC|MODULE:FUNC", help="your own metric "
                   "function (outputs, targets) -> float with higher_is_better set on it; scored "
                   "on every trial under the function's name, which --objectives may name")
    p.add_argument("--restrict", action="append", default=[], metavar="GENE=OPT[,OPT...]",
                   help="keep only these options of a gene, e.g. --restrict s1.k=3,5")
    p.add_argument("--max-size", metavar="BYTES", help="budget on the packed model size, e.g. "
                   "4KB (KB = 1024 B)")
    p.add_argument("--max-params", metavar="N", help="budget on stored parameters, e.g. 5k")
    p.add_argument("--max-macs", metavar="N", help="budget on MACs per sample, e.g. 2M")
    p.add_argument("--max-latency", metavar="TIME", help="budget on batch-1 latency on the "
                   "--hardware profile, e.g. 0.3ms or 300us (predicted from its look-up table)")
    p.add_argument("--max-sram", metavar="BYTES", help="budget on peak activation memory at the "
                   "profile's data type, e.g. 32KB")
    p.add_argument("--budget", action="append", default=[], metavar="SCORE=VALUE",
                   help="a budget on a score of the outputs: at least VALUE where higher is "
                   "better (--budget f1=0.8, accuracy=90%%), at most where lower is (--budget "
                   "mae=0.5); your --metric by its name; repeatable")
    p.add_argument("--hardware", metavar="PROFILE", help="hardware profile: cpu-ort, "
                   "cpu-ort-int8, mcu, cortex-m4 (size = the C firmware's flash), or a .toml "
                   "file (see `nasopt hw profiles`); default cpu-ort when "
                   "--max-latency/--max-sram is given")
    p.add_argument("--device", help="auto (default), cpu or cuda")
    p.add_argument("--table", nargs="?", const=DEFAULT_TABLE, metavar="PATH",
                   help="tabular mode: read accuracy from this CSV (an 'arch' column and an "
                   "accuracy column in percent) instead of training a supernet; without PATH: "
                   f"the shipped NAS-Bench-201 CIFAR-10 table, {DEFAULT_TABLE}")
    p.add_argument("--table-metric", metavar="COLUMN",
                   help=f"the table's accuracy column (default: {DEFAULT_METRIC})")
    p.add_argument("--storage", help="Optuna storage URL (default: sqlite file in --run-dir)")
    p.add_argument("--run-dir", help="folder for studies.db, supernets, configs (default: runs)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or log lines")
    p.add_argument("--heartbeat", type=int, metavar="SECONDS", help="seconds between heartbeats "
                   "of a running trial on sqlite/postgresql storages (default 10); a killed "
                   "worker's trial is retried after 3 missed ones")

    p = sub.add_parser("studies", help="inspect studies")
    ssub = p.add_subparsers(dest="studies_command", required=True, metavar="SUBCOMMAND")
    q = ssub.add_parser("list", help="studies in a storage",
                        description="The studies in a storage (default: RUN_DIR/studies.db of "
                        "a search): space, dataset, objectives, completed, failed and running "
                        "trials, creation time.")
    _add_storage(q)
    _add_format(q)
    q = ssub.add_parser("show", help="trials of a study with arch, metrics and a Pareto mark",
                        description="Every trial of a study: state, Pareto and feasible marks "
                        "(feasible is empty for trials that did not complete), strategy, "
                        "metrics, constraint values (value - limit) and the arch's genes; "
                        "then the supernet check (validation accuracy of its largest and "
                        "smallest subnets against the majority class) and a warning when the "
                        "supernet or the best trial is near chance.")
    q.add_argument("study")
    q.add_argument("--pareto", action="store_true", help="only the Pareto-optimal trials")
    _add_storage(q)
    _add_format(q)
    from nasopt.cli import studies as studies_cli  # pareto, compare, plot, export, report
    studies_cli.add_parsers(ssub, _add_storage, _add_format)
    studies_cli.add_dashboard_parser(sub)

    p = sub.add_parser("export", help="export a trial's deployed (compressed) model")
    p.add_argument("study")
    p.add_argument("--trial", type=trial_arg, required=True, metavar="N|best",
                   help="trial number, or best: the best feasible completed trial (all budgets "
                   "met) by the study's quality metric (accuracy, unless an objective names "
                   "balanced_accuracy, f1 or your --metric)")
    add_out(p, "output folder")
    p.add_argument("--format", action="append",
                   choices=("pytorch", "packed", "onnx", "onnx-int8", "c"),
                   help="pytorch (weights.pt), packed (model.packed), onnx (model.onnx, float32),"
                   " onnx-int8 (model.int8.onnx, QDQ), c (model.h / model.c: integer C99 for a "
                   "microcontroller, verified on the host with gcc); repeat for several; "
                   "default: pytorch and packed")
    _add_storage(p)

    sub.add_parser("spaces", help="list search spaces and their genes",
                   description="Every search space: its genes and their options (restrict them "
                   "with nasopt search --restrict GENE=OPT[,OPT...]).")
    p = sub.add_parser("check-space", help="check a search space against the space contract",
                       description="Run the space contract (nasopt.testing: sampling and "
                       "restriction, build, extract equals the activated supernet, BN "
                       "recalibration, packed size and round trip, export and load) on a space "
                       "and print each rule's result; exit status 1 when a rule fails.")
    p.add_argument("space", help="a space name, or your class: path/to/file.py:Class or "
                   "package.module:Class")
    p.add_argument("--input-shape", metavar="C,L|C,H,W", help="the input of one sample, e.g. "
                   "1,40 or 1,28,28 (default: by the space's input rank)")
    p.add_argument("--classes", type=int, default=10, help="number of classes (default 10)")
    sub.add_parser("strategies", help="list search strategies",
                   description="Every search strategy nasopt search --strategy takes, with what "
                   "it does (nni-* need the optional extra nasopt[nni]).")

    p = sub.add_parser("bench", help="benchmarks that write reports under results/",
                       description="Benchmarks that write reports under results/ (see "
                       "results/README.md); `nasopt bench BENCHMARK --help` for each.")
    if with_bench:  # their options come from the benchmark harness, which imports torch
        _benchmarks().add_parsers(p)
    from nasopt.cli.deploy import add_parsers as add_deploy_parsers  # distill, finetune, run
    add_deploy_parsers(sub)
    from nasopt.cli.hw import add_parsers as add_hw_parsers  # nasopt hw
    add_hw_parsers(sub)
    from nasopt.cli import distributed as cli_distributed  # train-supernet (torchrun: data-parallel)
    cli_distributed.add_parser(sub)
    return parser


def _loadable(registry, broken: list[str]):  # noqa: ANN001, ANN202
    """(name, entry) of a registry; an installed entry that fails to load is left out, its one
    line kept in ``broken``."""
    for name in registry:
        try:
            yield name, registry[name]
        except NasoptError as exc:
            broken.append(str(exc))


def _report_broken(broken: list[str]) -> int:
    for line in broken:
        print(f"nasopt: error: {line}", file=sys.stderr)
    return 2 if broken else 0


def _benchmarks():  # noqa: ANN202 - the harness, a package of its own (benchmarks/)
    try:
        import nasopt_bench
    except ModuleNotFoundError as exc:
        if exc.name != "nasopt_bench":
            raise
        raise NasoptError("`nasopt bench` needs the benchmark harness, which is not part of the "
                          "nasopt package: from a source checkout, pip install -e ./benchmarks"
                          ) from None
    return nasopt_bench


def _command_parser(parser: argparse.ArgumentParser, argv: Sequence[str]
                    ) -> argparse.ArgumentParser:
    """The (sub-)command's parser that ``argv`` names: ``search``, ``studies show``, ..."""
    for token in argv:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if subs and token in subs[0].choices:
            parser = subs[0].choices[token]
    return parser


def _attach_negative_values(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """``--max-size -4KB`` as ``--max-size=-4KB``: argparse takes a value that starts with a
    dash and is not a plain number for an option, and would answer with its usage; attached,
    the value reaches the option's own check and its one-line error."""
    command = _command_parser(parser, argv)
    takes_value = {s for a in command._actions if a.nargs != 0 for s in a.option_strings}
    options = {s for a in command._actions for s in a.option_strings}

    def value_option(token: str) -> bool:  # an option taking a value, or its unique prefix
        if token in takes_value:
            return True
        named = [s for s in options if token.startswith("--") and s.startswith(token)]
        return len(named) == 1 and named[0] in takes_value

    out: list[str] = []
    for token in argv:
        if (out and value_option(out[-1]) and len(token) > 1 and token[0] == "-"
                and token[1].isdigit()):
            out[-1] = f"{out[-1]}={token}"
        else:
            out.append(token)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser(with_bench="bench" in argv)
    except NasoptError as exc:
        print(f"nasopt: error: {exc}", file=sys.stderr)
        return 2
    argv = _attach_negative_values(parser, argv)
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # argparse would name the top-level usage: name the command's, and a near miss
        command = _command_parser(parser, argv)
        options = [s for a in command._actions for s in a.option_strings]
        near = [m for u in unknown if u.startswith("-")
                for m in difflib.get_close_matches(u.split("=")[0], options, 1)]
        from nasopt.core.objectives import BUDGET_UNITS
        apart = [f"{argv[i - 1]}{u}" for i, u in enumerate(argv)
                 if i and u in unknown and u.lower() in BUDGET_UNITS]
        hint = ((f"; write a budget without a space before its unit: {', '.join(apart)}"
                 if apart else "") + (f"; did you mean {', '.join(near)}?" if near else ""))
        command.error(f"unrecognized arguments: {' '.join(unknown)}{hint}")
    args.argv = argv  # for model cards: the command
    try:
        return _dispatch(args)
    except NasoptError as exc:
        from nasopt.search.study import mask_url
        print(f"nasopt: error: {mask_url(str(exc))}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0
    except OSError as exc:  # a full disk, a folder that is a file, no permission
        from nasopt.core.errors import os_error_line
        print(f"nasopt: error: {os_error_line(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:  # the storage went away mid-run: no traceback with its URL
        if _raised_by_an_interrupt(exc):
            return _interrupted()
        drivers = ("sqlalchemy", "psycopg", "psycopg2")
        if (type(exc).__module__.split(".")[0] not in drivers
                and type(exc).__name__ != "StorageInternalError"):  # Optuna's, around a driver's
            raise
        from nasopt.search.study import mask_url
        cause = exc.__cause__ if exc.__cause__ is not None else exc
        detail = mask_url(str(cause).strip().splitlines()[0] if str(cause).strip() else "")
        if "disk is full" in detail or "No space left" in detail:
            from nasopt.core.errors import os_error_line
            print(f"nasopt: error: the storage could not write ({detail}); "
                  f"{os_error_line(OSError(28, 'No space left on device')).split('; ', 1)[1]}",
                  file=sys.stderr)
            return 2
        print(f"nasopt: error: lost the connection to the storage ({type(exc).__name__}: "
              f"{detail}); finished trials are kept: check the database and re-run the same "
              f"command to continue", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return _interrupted()


def _interrupted() -> int:
    print("nasopt: interrupted; finished trials are kept in the study; re-run the same "
          "command to continue", file=sys.stderr)
    return 130


def _raised_by_an_interrupt(exc: BaseException) -> bool:
    """Whether ``exc`` was raised while a Ctrl-C unwound the stack: a library's clean-up that
    fails on the way out (Optuna's trial runner, when the interrupt lands before it records the
    trial's state) must read as the interrupt it is, not as a crash."""
    seen: set[int] = set()
    context = exc.__context__
    while context is not None and id(context) not in seen:
        if isinstance(context, KeyboardInterrupt):
            return True
        seen.add(id(context))
        context = context.__context__
    return False


def _dispatch(args: argparse.Namespace) -> int:
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if args.command in ("studies", "dashboard"):  # read-only: neither torch nor the strategies
        return _inspect(args)
    from nasopt import api
    if args.command == "search":
        return _search(args, api)
    if args.command in ("distill", "finetune", "run"):
        from nasopt.cli.deploy import dispatch
        return dispatch(args)
    if args.command == "train-supernet":
        from nasopt.cli import distributed as cli_distributed
        return cli_distributed.run(args)
    if args.command == "hw":
        from nasopt.cli.hw import dispatch as hw_dispatch
        return hw_dispatch(args)
    if args.command == "export":
        from nasopt.cli.deploy import export_summary
        from nasopt.search.study import load_study, open_existing_storage
        study = load_study(open_existing_storage(args.storage, args.run_dir), args.study)
        formats = tuple(args.format or ("pytorch", "packed"))
        # the trial first, then the output folder (api.export checks it before any work)
        out = api.export(study, args.trial, args.out, formats, force=args.force)
        print(export_summary(out, args))
        return 0
    if args.command == "spaces":
        broken: list[str] = []
        for name, cls in _loadable(api.SPACES, broken):  # shipped, then installed (entry points)
            doc = (sys.modules[cls.__module__].__doc__ or "").strip()
            line = doc.splitlines()[0].replace("``", "") if doc else ""
            print(line if line.startswith(f"{name}:") else f"{name}: {line}".rstrip(": "))
            shape = (1, 40) if cls.input_rank == 2 else (1, 28, 28)
            space = cls(shape, 10)
            small = (1, 8) if cls.input_rank == 2 else (1, 8, 8)  # genes may depend on the size
            try:
                on_small = set(cls(small, 10).full_genes())
            except Exception:  # noqa: BLE001 - a space that cannot take small inputs
                on_small = set(space.full_genes())
            opt_in = space.opt_in_genes()
            for gene, opts in space.full_genes().items():
                note = (f"  (opt-in: {opt_in[gene]!r} unless --restrict {gene}=...)"
                        if gene in opt_in and len(opts) > 1 else "")
                if gene not in on_small:
                    note += f"  (inputs of {'x'.join(map(str, shape[1:]))}; not on " \
                            f"{'x'.join(map(str, small[1:]))})"
                print(f"  {gene:<12} {list(opts)}{note}")
        return _report_broken(broken)
    if args.command == "check-space":
        return _check_space(args, api)
    if args.command == "strategies":
        broken = []
        for registry in (api.STRATEGIES, api.GRADIENT_STRATEGIES, api.NNI_STRATEGIES):
            for name, strategy in _loadable(registry, broken):
                print(f"{name:<13} {strategy.description}")
        return _report_broken(broken)
    if args.command == "bench":
        print(f"wrote {_benchmarks().run(args)}")
        return 0
    raise AssertionError(args.command)


def _inspect(args: argparse.Namespace) -> int:
    """``nasopt studies ...`` and ``nasopt dashboard``: they read a storage and import neither
    torch nor the strategies, so they start quickly."""
    if args.command == "studies":
        from nasopt.search.study import open_existing_storage  # read-only: creates nothing
        storage = open_existing_storage(args.storage, args.run_dir)
        if args.studies_command == "list":
            _print_frame(__import__("nasopt.search.study", fromlist=["x"]).list_studies(storage),
                         args.format)
        elif args.studies_command != "show":
            from nasopt.cli import studies as studies_cli
            return studies_cli.run(args, storage)
        else:
            from nasopt.inspection import tables as inspection
            from nasopt.search.study import load_study
            study = load_study(storage, args.study)
            frame = inspection.trials_table(study, args.pareto)
            _print_frame(frame, args.format)
            from nasopt.search.sanity import study_lines  # the supernet check: after the table, on stderr
            for line in study_lines(study):  # when stdout must stay parseable (csv, json)
                print(line if args.format == "table" else f"nasopt: {line}",
                      file=sys.stdout if args.format == "table" else sys.stderr)
        return 0
    if args.command == "dashboard":
        from nasopt.cli import studies as studies_cli
        return studies_cli.run_dashboard(args)
    raise AssertionError(args.command)


def _check_space(args: argparse.Namespace, api) -> int:  # noqa: ANN001
    from nasopt.testing import RULES, check_space
    if args.space not in api.SPACES:
        raise NasoptError(f"unknown space {args.space!r}; known: {', '.join(api.SPACES)}, or "
                          f"path/to/file.py:Class")
    cls = api.SPACES[args.space]
    shape = None
    if args.input_shape:
        try:
            shape = tuple(int(d) for d in args.input_shape.split(","))
        except ValueError:
            raise NasoptError(f"--input-shape {args.input_shape!r}: give whole numbers, e.g. "
                              f"1,40") from None
    failures = check_space(cls, shape, args.classes)
    failed = {f.rule: f.message for f in failures}
    for rule in ("construct", *RULES) if "construct" in failed else RULES:
        print(f"{rule:<12} {'FAIL: ' + failed[rule] if rule in failed else 'ok'}")
    print(f"{cls.__name__}: {len(failed)} of the contract's rules failed" if failed else
          f"{cls.__name__}: every rule of the space contract holds")
    return 1 if failed else 0


def _search(args: argparse.Namespace, api) -> int:  # noqa: ANN001
    from nasopt.core.space import parse_restrictions
    overrides = list(args.set)
    for flag, key in (("space", "search.space"), ("dataset", "data.dataset"),
                      ("strategy", "search.strategy"), ("trials", "search.trials"),
                      ("timeout", "search.timeout"), ("seed", "search.seed"),
                      ("study", "search.study"), ("storage", "search.storage"),
                      ("objectives", "search.objectives"), ("device", "device"),
                      ("run_dir", "run_dir"), ("table", "search.table"),
                      ("hardware", "search.hardware"), ("metric", "search.metric"),
                      ("task", "data.task"),
                      ("table_metric", "search.table_metric")):
        value = getattr(args, flag)
        if value is not None:
            text = json.dumps(value, ensure_ascii=False) if isinstance(value, str) else value
            overrides.append(f"{key}={text}")  # non-ASCII names stay as they are
    from nasopt.pipeline import load_search_config
    cfg, unused = load_search_config(args.config, overrides)
    if unused and not args.quiet:
        print(f"nasopt: note: the search uses the config's search sections; it leaves "
              f"{', '.join(unused)} to `nasopt run`", file=sys.stderr)
    budgets = {name: value for name, value in (("size", args.max_size), ("params", args.max_params),
                                               ("macs", args.max_macs),
                                               ("latency", args.max_latency),
                                               ("sram", args.max_sram)) if value is not None}
    for item in args.budget:
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise NasoptError(f"--budget {item!r}: write SCORE=VALUE, e.g. --budget f1=0.8")
        budgets[name.strip()] = value.strip()
    if budgets:
        import dataclasses
        cfg = dataclasses.replace(cfg, search=dataclasses.replace(
            cfg.search, budgets={**cfg.search.budgets, **budgets}))
    if args.restrict:
        import dataclasses
        restrict = {**cfg.search.restrict,
                    **{k: tuple(v) for k, v in parse_restrictions(args.restrict).items()}}
        cfg = dataclasses.replace(cfg, search=dataclasses.replace(cfg.search, restrict=restrict))
    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr))
    outcome = api.search(cfg, show_progress=not args.quiet, log=log, heartbeat=args.heartbeat)
    study = outcome.study
    from nasopt.search.study import completed, mask_url
    failed = sum(t.state.name == "FAIL" for t in study.trials)
    print(f"study {study.study_name!r}: {len(completed(study))} completed trials "
          f"({outcome.new_trials} run now, {failed} failed in all); storage "
          f"{mask_url(cfg.search.storage or 'sqlite:///' + cfg.run_dir + '/studies.db')}")
    if outcome.new_trials == 0 and len(completed(study)) > cfg.search.trials:
        print(f"nasopt: note: the study already holds {len(completed(study))} completed trials, "
              f"more than --trials {cfg.search.trials}: nothing to run; --trials is the total "
              f"the study should hold, so raise it to search more", file=sys.stderr)
    front = api.pareto(study)
    if front.empty and len(completed(study)):
        from nasopt.search.study import closest_trial
        t = closest_trial(study)
        print(f"no completed trial meets the budgets {dict(cfg.search.budgets)}; the closest is "
              f"trial {t.number} (constraint excess {t.user_attrs.get('constraints')})")
    else:
        print("Pareto front" + (f" (budgets {dict(cfg.search.budgets)})" if cfg.search.budgets
                                else "") + ":")
        _print_frame(front, "table")
    for line in outcome.warnings:  # supernet or best trial near chance (nasopt.search.sanity), last
        print(f"nasopt: warning: {line}", file=sys.stderr)
    return 0


def _print_frame(frame, fmt: str) -> None:  # noqa: ANN001
    from nasopt.inspection.tables import to_text  # the one table format of every command
    print(to_text(frame, fmt), end="")


def run() -> None:
    """The ``nasopt`` command's entry point: :func:`main`, then exit with its status. After
    Ctrl-C a thread a library left running (Optuna's heartbeat of the interrupted trial, when the
    interrupt lands as it starts) must not keep the process alive: every finished trial is
    already committed, so the process then ends without waiting for it."""
    import threading
    code = main()
    if code == 130 and any(t.is_alive() and not t.daemon for t in threading.enumerate()
                           if t is not threading.main_thread()):
        import os
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
