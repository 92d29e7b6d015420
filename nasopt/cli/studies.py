"""The inspection commands: `nasopt studies pareto | compare | plot | export | report` and
`nasopt dashboard` (parsers and handlers; `nasopt/cli/main.py` wires them in)."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from nasopt.core.errors import NasoptError

AddOptions = Callable[[argparse.ArgumentParser], None]
COMMANDS = ("pareto", "compare", "plot", "export", "report")


def add_parsers(ssub: argparse._SubParsersAction, add_storage: AddOptions,
                add_format: AddOptions) -> None:
    """The `studies` subcommands of this module, on the `studies` subparsers ``ssub``."""
    q = ssub.add_parser("pareto", help="the feasible Pareto set: arch, metrics, constraint values",
                        description="The feasible Pareto-optimal trials (for one objective: the "
                        "best feasible trial), best accuracy first. Constraint columns hold "
                        "value - limit (feasible when <= 0). When no trial is feasible, says so "
                        "and shows the closest trial.")
    q.add_argument("study")
    add_storage(q)
    add_format(q)

    q = ssub.add_parser("compare", help="studies and their strategies side by side",
                        description="One row per study and strategy (and an '(all)' row for a "
                        "study several strategies filled): completed, failed and feasible "
                        "trials, the best value of the studies' quality metric (accuracy unless "
                        "an objective names balanced_accuracy, f1 or a --metric; any trial, and "
                        "under each budget any of the studies has), and hypervolume with one "
                        "reference for all rows.")
    q.add_argument("studies", nargs="+", metavar="STUDY")
    _add_hv(q)
    add_storage(q)
    add_format(q)

    q = ssub.add_parser("plot", help="PNG plot: Pareto front, hypervolume or gene importance")
    q.add_argument("study")
    q.add_argument("--kind", choices=("pareto", "hypervolume", "importance"), required=True,
                   help="pareto: the quality metric (accuracy unless an objective names "
                   "another) vs cost, feasible/infeasible marked, budget lines; hypervolume: "
                   "over trials, per strategy; importance: fANOVA importance of each gene for "
                   "the quality metric")
    q.add_argument("--out", required=True, help="the PNG file to write")
    q.add_argument("--force", action="store_true", help="overwrite the file if it exists")
    _add_hv(q)
    add_storage(q)

    q = ssub.add_parser("export", help="write every trial (params, metrics, constraints) to a "
                        "CSV or JSON file")
    q.add_argument("study")
    q.add_argument("--to", required=True, metavar="FILE", help="FILE.csv or FILE.json")
    q.add_argument("--force", action="store_true", help="overwrite FILE if it exists")
    add_storage(q)

    q = ssub.add_parser("report", help="a self-contained HTML report (tables, setup, budgets, "
                        "embedded plots, commands)")
    q.add_argument("study")
    q.add_argument("--out", required=True, help="the HTML file to write")
    q.add_argument("--force", action="store_true", help="overwrite the file if it exists")
    add_storage(q)


def add_dashboard_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dashboard", help="start optuna-dashboard on 127.0.0.1 for a storage",
                       description="Serve optuna-dashboard for a storage on the loopback "
                       "interface only (it has no authentication). Each trial shows its genes "
                       "as params and its arch, metrics, constraint values and strategy as user "
                       "attrs. Ctrl-C stops it.")
    p.add_argument("--storage", help="Optuna storage URL (default: RUN_DIR/studies.db)")
    p.add_argument("--run-dir", default="runs", help="folder of a search (default: runs)")
    p.add_argument("--port", type=int, default=8080, help="default: 8080")


def _add_hv(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hv-cost", metavar="OBJECTIVE", help="cost axis of the hypervolume, e.g. "
                   "size or params (default: the first study's first cost objective)")
    p.add_argument("--hv-reference", metavar="QUANTITY", help="hypervolume reference on the cost"
                   " axis, e.g. 16KB or 800k (default: the shared budget on that cost, else "
                   "16 KB for size, else the largest cost among the trials)")


def run_dashboard(args: argparse.Namespace) -> int:
    from nasopt.inspection import dashboard
    from nasopt.search import study as _study
    url = _study.resolve_storage(args.storage, args.run_dir, must_exist=True)
    try:
        dashboard.serve(url, args.port, log=lambda s: print(s, flush=True))
    except KeyboardInterrupt:
        print("dashboard stopped", file=sys.stderr)
    return 0


def run(args: argparse.Namespace, storage) -> int:  # noqa: ANN001
    """Handle `nasopt studies COMMAND` for the commands of this module."""
    from nasopt.inspection import tables as inspection
    from nasopt.search import study as _study
    url = _study.resolve_storage(args.storage, args.run_dir, must_exist=True)
    if args.studies_command == "compare":
        studies = [_study.load_study(storage, name) for name in args.studies]
        frame, setting = inspection.compare(studies, args.hv_cost, args.hv_reference)
        _print(inspection.to_text(frame, args.format))
        if args.format == "table":
            print(setting.describe())
        return 0
    study = _study.load_study(storage, args.study)
    if args.studies_command == "pareto":
        front = inspection.pareto_table(study)
        if front.empty and _study.completed(study):
            closest = inspection.closest_table(study)
            budgets = {k: inspection.format_limit(k, v)  # as `nasopt search` shows them
                       for k, v in inspection.budgets_of(study).items()}
            note = (f"no completed trial of {study.study_name!r} meets the budgets "
                    f"{budgets}; the closest is trial "
                    f"{int(closest['trial'].iloc[0])} (constraint values: value - limit)")
            if args.format == "table":
                print(note + ":")
                _print(inspection.to_text(closest, "table"))
            else:  # keep stdout parseable: an empty set there, the note on stderr
                print(f"nasopt: {note}", file=sys.stderr)
                _print(inspection.to_text(front, args.format))
            return 0
        _print(inspection.to_text(front, args.format))
        return 0
    if args.studies_command == "plot":
        from nasopt.inspection import plots
        setting = (inspection.hv_setting([study], args.hv_cost, args.hv_reference)
                   if args.kind != "importance" else None)
        out = plots.save(study, args.kind, args.out, setting, args.force)
        if args.kind == "importance":
            what = (f"fANOVA importance of each gene for "
                    f"{_study.quality_metric(study)[0]}, seed {inspection.IMPORTANCE_SEED}")
        elif args.kind == "pareto":
            what = (f"{setting.quality} vs {setting.cost}: feasible and infeasible trials, the "
                    f"Pareto set, budget lines")
        else:
            what = setting.describe()
        print(f"wrote {out} ({study.study_name}: {what})")
        return 0
    if args.studies_command == "export":
        out = inspection.write_table(study, args.to, args.force)
        print(f"wrote {out}: {len(study.trials)} trials of {study.study_name} (params, metrics, "
              f"constraints)")
        return 0
    if args.studies_command == "report":
        from nasopt.inspection import report_html
        out = report_html.write(study, url, args.out, args.force)
        print(f"wrote {out} (self-contained HTML report of {study.study_name})")
        return 0
    raise NasoptError(f"unknown studies command {args.studies_command!r}")


def _print(text: str) -> None:
    print(text, end="")
