"""A self-contained HTML report of one study: setup, budgets, strategies compared, the feasible
Pareto set, the three plots embedded as base64 PNGs, and the commands that show each part.

The page loads nothing from anywhere (no scripts, fonts, stylesheets or links to fetch): it can
be mailed or archived as one file.
"""
from __future__ import annotations

import base64
import datetime as dt
import html
import json
import shlex
from pathlib import Path

import optuna
import pandas as pd

from nasopt.inspection import tables as inspection, plots
from nasopt.search import sanity
from nasopt.search import study as _study
from nasopt.core.checkpoint import atomic_write_bytes
from nasopt.core.errors import NasoptError

STYLE = """
body { font-family: sans-serif; margin: 2em auto; max-width: 75em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 2px 6px; text-align: right; }
th { background: #f0f0f0; }
pre { background: #f6f6f6; padding: 0.6em; overflow-x: auto; font-size: 0.85em; }
img { max-width: 100%; border: 1px solid #ddd; margin: 0.5em 0; }
.note { color: #555; font-size: 0.9em; }
.warning { color: #a00; font-weight: bold; }
"""
STATE_WORDS = {"COMPLETE": "completed", "FAIL": "failed", "RUNNING": "running",
               "PRUNED": "pruned", "WAITING": "waiting"}


def _table(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "<p class='note'>(no rows)</p>"
    return frame.to_html(index=False, na_rep="-", border=0, escape=True,
                         float_format=inspection._number)


def _image(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _p(text: str, cls: str = "") -> str:
    return f"<p{f' class={cls!r}' if cls else ''}>{html.escape(text)}</p>"


def _sanity_html(study: optuna.Study) -> list[str]:
    """The supernet check (nasopt.search.sanity) and its warnings; nothing for tabular studies."""
    lines = sanity.study_lines(study)
    if not lines:
        return []
    return (["<h3>Supernet check</h3>", _p(lines[0])]
            + [_p(line, "warning") for line in lines[1:]])


def render(study: optuna.Study, storage_url: str) -> str:
    """The report's HTML (``storage_url`` is shown masked)."""
    url = _study.mask_url(storage_url)
    name = study.study_name
    setup = _study.setup_of(study)
    budgets = inspection.budgets_of(study)
    trials = study.get_trials(deepcopy=False)
    states = pd.Series([t.state.name for t in trials], dtype="string").value_counts()
    setting = inspection.hv_setting([study])
    parts = [f"<h1>nasopt study {html.escape(name)}</h1>",
             _p(f"storage {url}; report written "
                f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC; "
                + ", ".join(f"{n} {STATE_WORDS.get(s, s.lower())}" for s, n in states.items()),
                "note")]

    parts.append("<h2>Setup</h2>")
    space = setup.get("space", {})
    scored = (f"table {setup['table']} (column {setup.get('table_metric')})" if "table" in setup
              else f"dataset {setup.get('data', {}).get('dataset')} with a weight-sharing supernet")
    rows = [("space", space.get("name")), ("scored by", scored),
            ("objectives", ", ".join(setup.get("objectives", []))),
            ("budgets", ", ".join(inspection.budget_text(study, k, v)
                                  for k, v in budgets.items()) or "none")]
    strategies = {}
    for t in trials:
        key = (t.user_attrs.get("strategy"), t.user_attrs.get("seed"))
        strategies[key] = strategies.get(key, 0) + 1
    rows.append(("strategies (seed: trials)", "; ".join(
        f"{s} (seed {seed}): {n}" for (s, seed), n in strategies.items())))
    parts.append(_table(pd.DataFrame(rows, columns=["", "value"])))
    parts.extend(_sanity_html(study))
    genes = pd.DataFrame([(g, ", ".join(map(str, opts))) for g, opts in
                          space.get("genes", {}).items()], columns=["gene", "options"])
    parts.append("<h3>Genes</h3>" + _table(genes))
    rest = {k: v for k, v in setup.items() if k not in ("space",)}
    parts.append("<h3>Recorded setup (study user attr 'nasopt')</h3><pre>"
                 + html.escape(json.dumps(rest, indent=1, default=str)) + "</pre>")

    parts.append("<h2>Strategies</h2>")
    table, _ = inspection.compare([study], setting.cost, setting.reference)
    parts.append(_table(table) + _p(setting.describe() + f". Best {setting.quality} columns: "
                                    "any completed trial, then under each budget.", "note"))

    parts.append("<h2>Pareto set (feasible trials)</h2>")
    front = inspection.pareto_table(study)
    if front.empty and _study.completed(study):
        closest = inspection.closest_table(study)
        parts.append(_p(f"No completed trial meets the budgets; the closest is trial "
                        f"{int(closest['trial'].iloc[0])} (constraint values: value - limit, "
                        f"feasible when <= 0):"))
        parts.append(_table(closest))
    else:
        parts.append(_table(front))

    parts.append("<h2>Plots</h2>")
    for kind, caption in (("pareto", "Pareto front: dots feasible, crosses infeasible, circles "
                           "the feasible Pareto set, dashed the budget on this axis"),
                          ("hypervolume", setting.describe()),
                          ("importance", f"fANOVA importance of each gene for validation "
                           f"{setting.quality} (Optuna, seeded evaluator; for several "
                           f"objectives the target is the study's quality metric)")):
        try:
            png = plots.render(study, kind, setting)
        except NasoptError as exc:  # e.g. too few trials for importance: say so, go on
            parts.append(_p(f"{kind}: not drawn ({exc})", "note"))
            continue
        parts.append(f"<h3>{kind}</h3>{_image(png, kind)}" + _p(caption, "note"))

    parts.append("<h2>Commands</h2>")
    # shell-quoted: a study or storage name can hold any character (`a;touch x` stays a name)
    store, study = f"--storage {shlex.quote(url)}", shlex.quote(name)
    commands = [f"nasopt studies show {study} {store}",
                f"nasopt studies pareto {study} {store} --format csv",
                f"nasopt studies compare {study} {store}",
                *[f"nasopt studies plot {study} --kind {k} --out {k}.png {store}"
                  for k in plots.KINDS],
                f"nasopt studies export {study} --to trials.csv {store}",
                f"nasopt studies report {study} --out report.html {store}",
                f"nasopt dashboard {store}"]
    parts.append("<pre>" + html.escape("\n".join(commands)) + "</pre>")
    parts.append(_p("The search itself: the resolved config of each `nasopt search` run is in "
                    f"RUN_DIR/configs/{name}.json; re-running the same command continues the "
                    f"study.", "note"))
    return ("<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>nasopt: "
            f"{html.escape(name)}</title><style>{STYLE}</style></head><body>\n"
            + "\n".join(parts) + "\n</body></html>\n")


def write(study: optuna.Study, storage_url: str, out: str | Path, force: bool = False) -> Path:
    """Write the report of ``study`` to ``out`` (an .html file), atomically; an existing file
    only with ``force``."""
    out = inspection.check_out_file(out, (".html", ".htm"), force)
    atomic_write_bytes(out, render(study, storage_url).encode("utf-8"))
    return out
