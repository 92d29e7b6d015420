"""``nasopt run CONFIG.toml``: the whole path from data to a verified deployable model, and the
building blocks the ``distill`` / ``finetune`` commands share with it.

train supernet → search → pick → distill → fine-tune (QAT) → export → report

- **pick**: ``rule = "best"``: the feasible trial (all budgets met) with the best validation
  accuracy (ties: the smaller packed size); ``rule = "knee"``: the knee of the feasible
  accuracy/size Pareto front, the point farthest above the straight line between the front's two
  ends after scaling both axes to [0, 1] (the "Kneedle" idea, Satopää et al., ICDCS-W 2011);
  ``trial = N`` picks a trial by number.
- **distill**: the picked arch's float model, from inherited supernet weights (``init =
  "inherit"``) or a fresh seeded initialisation (``"scratch"``), trained with the KD loss from
  the teacher(s) (:mod:`nasopt.deploy.distill`); early stopping on validation.
- **fine-tune**: quantization-aware training with the arch's compression policy
  (:mod:`nasopt.deploy.finetune`).
- **export**: arch.json, model.json, weights.pt, model.packed (:mod:`nasopt.deploy.export`, verified),
  model.ts (:mod:`nasopt.deploy.torchscript`, verified), ONNX fp32 / int8 when :mod:`nasopt.deploy.onnx`
  is available.
- **report**: ``metrics.json`` (the model card: the test accuracy of every artifact (MAE for
  regression: :func:`scorer`), measured once at the end, size, MACs, latency, the command) and
  ``REPORT.md`` in the export folder.

The search and every training step read only the train and validation splits.
"""
from __future__ import annotations

import dataclasses
import json
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import torch
from torch import Tensor, nn

from nasopt.core.arch import Arch
from nasopt.compression.compress import Policy, compress
from nasopt.core.config import Config, _build, load_raw
from nasopt.core.data import Dataset
from nasopt.deploy.distill import DistillConfig, Teachers, make_teachers, train_student
from nasopt.core.errors import NasoptError
from nasopt.deploy.finetune import FinetuneConfig, finetune, prepare_qat
from nasopt.core.metrics import FLOAT32_BYTES, count_macs, count_params
from nasopt.search.study import mask_secrets
from nasopt.core.task import task_of
from nasopt.supernet.train import quality

Log = Callable[[str], None]
PICK_RULES = ("best", "knee")
EXPORT_FORMATS = ("pytorch", "packed", "torchscript", "onnx", "onnx-int8", "c")
#: written unless export.formats says otherwise (c on request: it needs a C compiler)
DEFAULT_EXPORT_FORMATS = EXPORT_FORMATS[:-1]


@dataclass(frozen=True)
class PickConfig:
    rule: str = "best"  # best | knee
    trial: int | None = None  # pick this trial number instead of applying the rule

    def __post_init__(self) -> None:
        if self.rule not in PICK_RULES:
            raise NasoptError(f"pick.rule must be one of {', '.join(PICK_RULES)}, got "
                              f"{self.rule!r}")


@dataclass(frozen=True)
class DistillStep(DistillConfig):
    init: str = "inherit"  # inherit (supernet weights) | scratch
    teachers: tuple[str, ...] = ("largest",)  # "largest", TorchScript files, nasopt exports
    teacher_weights: tuple[float, ...] = ()  # default: equal
    enabled: bool = True  # false: no distillation (the inherited weights go to fine-tuning)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init not in ("inherit", "scratch"):
            raise NasoptError(f"distill.init must be inherit or scratch, got {self.init!r}")
        if not self.enabled and self.init == "scratch":
            raise NasoptError("distill.init = 'scratch' needs distill.enabled = true")
        if self.enabled and not self.teachers:  # checked before the search, not after it
            raise NasoptError("distill.teachers is empty; name at least one (\"largest\", a "
                              "TorchScript file or a nasopt export), or set distill.enabled = "
                              "false")
        if self.teacher_weights and len(self.teacher_weights) != len(self.teachers):
            raise NasoptError(f"distill.teacher_weights has {len(self.teacher_weights)} values "
                              f"for {len(self.teachers)} teachers; give one per teacher")


@dataclass(frozen=True)
class ExportStep:
    out: str = "results/model"
    formats: tuple[str, ...] = DEFAULT_EXPORT_FORMATS

    def __post_init__(self) -> None:
        if not self.out.strip():  # "" would be the working directory itself
            raise NasoptError("export.out is empty; name the folder to write, e.g. "
                              "out = \"results/model\"")
        bad = [f for f in self.formats if f not in EXPORT_FORMATS]
        if bad or not self.formats:
            raise NasoptError(f"export.formats: unknown {bad}; choose from "
                              f"{', '.join(EXPORT_FORMATS)}")
        if not {"pytorch", "packed"} & set(self.formats):  # checked before any work
            raise NasoptError(f"export.formats {list(self.formats)} needs pytorch or packed too: "
                              f"the export folder's model, which the other formats join")
        if "c" in self.formats:  # the C export is verified with a host compiler: found first
            from nasopt.deploy.firmware.toolchain import host_compiler
            host_compiler()


@dataclass(frozen=True)
class RunConfig(Config):
    """A :class:`nasopt.core.config.Config` (sections data, supernet, eval, search, gradient) plus the
    steps after the search (sections pick, distill, finetune, export)."""

    #: torch CPU threads for this run; 0 keeps torch's default. Small models on a shared machine
    #: run far faster on one thread (measured: 10x for a conv1d student on 2 busy cores)
    threads: int = 0
    pick: PickConfig = field(default_factory=PickConfig)
    distill: DistillStep = field(default_factory=DistillStep)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    export: ExportStep = field(default_factory=ExportStep)

    def base(self) -> Config:
        """The search's config: the :class:`Config` fields of this one."""
        return Config(**{f.name: getattr(self, f.name) for f in dataclasses.fields(Config)})


def load_run_config(path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """A TOML file updated by ``section.key=value`` overrides (as ``nasopt search --set``)."""
    return _build(RunConfig, load_raw(path, overrides), "")


def load_search_config(path: str | Path | None, overrides: Sequence[str] = ()
                       ) -> tuple[Config, list[str]]:
    """The search's config from a search config or a whole `nasopt run` config, and the names of
    the run-only keys it holds (sections pick, distill, finetune, export; ``threads``), which the
    search does not use. Those are still checked, so a typo in them fails here too; the search
    part equals :meth:`RunConfig.base`, so a search run this way continues the pipeline's study
    on the same supernet."""
    raw = load_raw(path, overrides)
    search_keys = {f.name for f in dataclasses.fields(Config)}
    unused = sorted(k for k in raw if k not in search_keys
                    and k in {f.name for f in dataclasses.fields(RunConfig)})
    return _build(RunConfig, raw, "").base(), unused


# ---------------------------------------------------------------------------------------------
def pick_trial(study: optuna.Study, cfg: PickConfig) -> int:
    """The number of the trial to deploy (see the module doc)."""
    from nasopt.search.study import quality_metric, trials_frame
    frame = trials_frame(study)
    if cfg.trial is not None:
        if cfg.trial not in set(frame["trial"]):
            raise NasoptError(f"pick.trial {cfg.trial} is not a trial of {study.study_name!r}")
        return int(cfg.trial)
    ok = frame[(frame["state"] == "COMPLETE") & frame["feasible"]]
    if ok.empty:
        raise NasoptError(f"no completed trial of {study.study_name!r} meets the budgets; "
                          f"loosen them or run more trials")
    metric, higher = quality_metric(study)  # accuracy unless the objectives name another
    recorded = {t.number: t.user_attrs.get("metrics", {}).get(metric)
                for t in study.get_trials(deepcopy=False)}
    ok = ok.assign(quality=[recorded[n] if higher else -recorded[n] for n in ok["trial"]])
    if cfg.rule == "knee":
        front = ok[ok["pareto"]].sort_values("compressed_bytes")
        if len(front) >= 3:
            return int(front.iloc[knee_index(front["compressed_bytes"].to_numpy(float),
                                             front["quality"].to_numpy(float))]["trial"])
    best = ok.sort_values(["quality", "compressed_bytes"], ascending=[False, True])
    return int(best.iloc[0]["trial"])


def knee_index(size, acc) -> int:  # noqa: ANN001
    """Index of the knee of a front sorted by size (accuracy rising with size): both axes scaled
    to [0, 1], the point farthest above the straight line between the two ends (Kneedle's
    difference curve); a front with no point above that line has no knee: the most accurate."""
    import numpy as np
    s = (size - size.min()) / max(np.ptp(size), 1e-12)
    a = (acc - acc.min()) / max(np.ptp(acc), 1e-12)
    chord = a[0] + (a[-1] - a[0]) * (s - s[0]) / max(s[-1] - s[0], 1e-12)
    gain = a - chord
    return int(np.argmax(gain)) if gain.max() > 1e-12 else len(size) - 1


def student_model(evaluator, arch: Arch, init: str, seed: int) -> nn.Module:  # noqa: ANN001
    """The float model of ``arch``: inherited supernet weights (BN recalibrated) or fresh."""
    if init == "inherit":
        return evaluator.float_model(arch).train()
    torch.manual_seed(seed)
    return evaluator.space.build(arch).to(next(evaluator.supernet.parameters()).device)


def teachers_for(evaluator, specs: Sequence[str], weights: Sequence[float], data: Dataset,  # noqa: ANN001
                 spaces) -> Teachers:  # noqa: ANN001
    largest = lambda: evaluator.float_model(evaluator.space.largest())  # noqa: E731
    return make_teachers(specs, weights, largest, spaces, data, data.x_val.device)


# ---------------------------------------------------------------------------------------------
def scorer(data: Dataset) -> tuple[str, Callable[[nn.Module, Tensor, Tensor], float]]:
    """The task's quality metric (accuracy, or MAE for regression) and a function that scores a
    model with it on samples and their labels."""
    task = task_of(data)
    return task.default_quality, lambda model, x, y: quality(model, x, y, task)


def artifact_accuracies(out: Path, model: nn.Module, data: Dataset, spaces,  # noqa: ANN001
                        formats: Sequence[str]) -> dict[str, float]:
    """The test score (accuracy, or MAE for regression: :func:`scorer`) of every written
    artifact, loaded back from its file and fed raw samples (the files apply the data's
    preprocessing inside)."""
    from nasopt.deploy.export import load
    from nasopt.deploy.torchscript import FILE as TS_FILE
    _, score = scorer(data)
    x, y = data.x_test.cpu(), data.y_test.cpu()
    raw = data.preprocess.raw(x)
    acc = {"fine-tuned model (in memory)": score(model.cpu(), x, y)}
    if "pytorch" in formats:
        acc["weights.pt via nasopt.load"] = score(load(out, spaces), raw, y)
    if "packed" in formats:
        acc["model.packed via nasopt.load"] = score(load(out / "model.packed", spaces), raw, y)
    if "torchscript" in formats:
        acc["model.ts via torch.jit.load"] = score(torch.jit.load(str(out / TS_FILE)), raw, y)
    return acc


@torch.no_grad()
def latency_ms(model: nn.Module, input_shape: Sequence[int], repeats: int = 50) -> float:
    """Median CPU time of one forward pass at batch size 1 (PyTorch eager, one thread), in ms."""
    model = model.eval().cpu()
    x = torch.zeros((1, *input_shape))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # batch 1 of a small model: one thread, as on a microcontroller
    try:
        for _ in range(5):
            model(x)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t)
    finally:
        torch.set_num_threads(threads)
    return 1000 * sorted(times)[len(times) // 2]


@dataclass
class RunResult:
    out: Path
    trial: int
    card: dict[str, Any]


def run(cfg: RunConfig, command: str, *, show_progress: bool = True,
        log: Log = lambda s: None, force: bool = False) -> RunResult:
    """The whole pipeline (see the module doc). Returns the export folder and the model card.

    ``export.out`` must be new or empty unless ``force`` (checked before any work): then the
    nasopt files an earlier run left there are replaced, other files kept."""
    from nasopt import api
    from nasopt.deploy.export import ARTIFACTS, check_out, export_model, with_preprocess
    from nasopt.deploy.torchscript import FILE as TS_FILE
    from nasopt.deploy.torchscript import write as write_torchscript
    timings: dict[str, float] = {}
    start = t = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        timings[name] = round(now - t, 2)
        t = now

    # a run of this same config that was interrupted while exporting may go on over its files
    out = check_out(cfg.export.out, force or _unfinished_by(cfg), "export.out")
    if cfg.threads < 0:
        raise NasoptError(f"threads must be >= 0 (0: torch's default), got {cfg.threads}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    outcome = api.search(cfg.base(), show_progress=show_progress, log=log)
    lap("supernet + search")
    search_s = timings.pop("supernet + search")
    timings["supernet"] = round(outcome.supernet_s, 2)  # trained, resumed or loaded
    timings["search"] = round(search_s - outcome.supernet_s, 2)  # data, study, trials
    study = outcome.study
    for line in outcome.warnings:  # supernet or best trial near chance (nasopt.search.sanity)
        log(f"warning: {line}")
    number = pick_trial(study, cfg.pick)
    trial = next(tr for tr in study.trials if tr.number == number)
    evaluator, data = api.rebuild(study, str(api.resolve_device(cfg.device)))
    space = evaluator.space
    arch = space.validate(trial.params)
    searched = evaluator(arch)
    metric, score = scorer(data)  # accuracy, or mae for regression
    searched_value = searched.accuracy if metric == "accuracy" else searched.scores[metric]
    log(f"picked trial {number} ({cfg.pick.rule if cfg.pick.trial is None else 'by number'}): "
        f"val {metric} {searched_value:.4f} (inherited weights), "
        f"{searched.compressed_bytes} B")
    policy = Policy.from_arch(arch)
    d = cfg.distill
    student = student_model(evaluator, arch, d.init if d.enabled else "inherit", d.seed)
    teachers = None
    distill_history = None
    if d.enabled:
        teachers = teachers_for(evaluator, d.teachers, d.teacher_weights, data, api.SPACES)
        distill_history = train_student(student, data, teachers, d, show_progress=show_progress,
                                        desc="distill")
        log(f"distilled from {', '.join(d.teachers)}: val {metric} "
            f"{distill_history.best_val_accuracy:.4f} (best epoch {distill_history.best_epoch + 1}"
            f" of {len(distill_history.val_accuracy)})")
    lap("distill")
    student.eval()
    qat = prepare_qat(student, policy, space.group_of)
    model, stored, ft_history = finetune(qat, policy, space.group_of, data, cfg.finetune,
                                         show_progress=show_progress)
    log(f"fine-tuned with the compression policy (QAT): val {metric} "
        f"{ft_history.best_val_accuracy:.4f}")
    lap("fine-tune")
    formats = cfg.export.formats
    info = {"study": study.study_name, "trial": number, "dataset": dataclasses.asdict(cfg.data),
            "origin": "nasopt run: distilled and fine-tuned (QAT)" if d.enabled else
                      "nasopt run: fine-tuned (QAT) from the inherited weights",
            "weights": "distilled, fine-tuned" if d.enabled else "fine-tuned"}
    model = model.cpu()
    out.mkdir(parents=True, exist_ok=True)
    (out / UNFINISHED).write_text(_config_digest(cfg) + "\n")  # until the card is written
    export_model(model, stored, arch, space, out,
                 info, api.SPACES, [f for f in formats if f in ("pytorch", "packed", "c")],
                 # the C format calibrates on training samples, is verified on validation ones
                 samples=((evaluator.calibration_samples.cpu(), data.x_val.cpu(),
                           data.y_val.cpu()) if "c" in formats else None),
                 preprocess=data.preprocess)
    if "torchscript" in formats:  # takes raw samples, as every model file of the folder
        write_torchscript(with_preprocess(model, data.preprocess), out / TS_FILE,
                          space.input_shape)
    onnx_note = _export_onnx(model, out, space, data, formats, log)
    lap("export")

    # ---- report: the test split is read here, once ----------------------------------------
    teacher_acc = ({name: score(m, data.x_test, data.y_test)
                    for name, m in zip(teachers.names, teachers.models)} if teachers else {})
    searched_model, _ = evaluator.compressed(arch)
    test = {"searched (inherited weights, compressed)": score(searched_model, data.x_test,
                                                              data.y_test),
            "distilled (float)": score(student, data.x_test, data.y_test),
            "distilled + post-training compression": score(
                compress(student, policy, space.group_of)[0], data.x_test, data.y_test)}
    test.update(artifact_accuracies(out, model, data.to("cpu"), api.SPACES, formats))
    test.update(onnx_note.pop("test", {}))
    size = (out / "model.packed").stat().st_size if "packed" in formats else None
    card = {
        "command": command,
        "study": study.study_name, "trial": number, "arch": dict(arch),
        "pick": dataclasses.asdict(cfg.pick),
        "dataset": data.summary(),
        # validation accuracy of the supernet's largest / smallest subnets vs the majority class
        "sanity": {**(outcome.sanity or {}), "warnings": outcome.warnings},
        "metric": metric,  # of the scores below: accuracy, or mae for regression
        f"test_{metric}": test,
        f"teacher_test_{metric}": teacher_acc,
        f"val_{metric}": {"searched": searched_value,
                         "distilled": distill_history.best_val_accuracy if distill_history
                         else None,
                         "fine-tuned": ft_history.best_val_accuracy},
        "packed_bytes": size, "predicted_bytes": searched.compressed_bytes,
        "float_bytes": count_params(student) * FLOAT32_BYTES,
        "params": count_params(model), "macs": count_macs(model, space.input_shape),
        "latency_ms_cpu_batch1": round(latency_ms(model, space.input_shape), 4),
        "files": sorted(p.name for p in out.iterdir() if p.name in ARTIFACTS),
        "formats": {"packed": "weights at the arch's bit-widths (2-8 bit or float32) exactly",
                    "weights.pt / model.ts": "float32 tensors holding the dequantized weights",
                    **onnx_note},
        "timings_s": {**timings, "total": round(time.perf_counter() - start, 2)},
        "config": cfg.to_dict(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s), "
                   f"torch {torch.__version__}, Python {platform.python_version()}",
    }
    card = mask_secrets(card)  # no storage password in a file (the config, the command)
    (out / "metrics.json").write_text(json.dumps(card, indent=2) + "\n")
    (out / "REPORT.md").write_text(report_markdown(card))
    card["files"] = sorted(p.name for p in out.iterdir() if p.name in ARTIFACTS)
    (out / "metrics.json").write_text(json.dumps(card, indent=2) + "\n")
    (out / UNFINISHED).unlink(missing_ok=True)
    return RunResult(out, number, card)


#: a hidden file in ``export.out`` while `nasopt run` writes it: the digest of the run's config,
#: so that the same command re-run after an interruption goes on over its own files
UNFINISHED = ".nasopt-run-unfinished"


def _config_digest(cfg: RunConfig) -> str:
    import hashlib
    return hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()


def _unfinished_by(cfg: RunConfig) -> bool:
    """Whether ``export.out`` holds the unfinished export of a run of this same config."""
    marker = Path(cfg.export.out) / UNFINISHED
    try:
        return marker.read_text().strip() == _config_digest(cfg)
    except OSError:
        return False


def _export_onnx(model: nn.Module, out: Path, space, data: Dataset, formats: Sequence[str],  # noqa: ANN001
                 log: Log) -> dict[str, Any]:
    """ONNX fp32 / int8 through :mod:`nasopt.deploy.onnx` (another module's job); skipped with a
    note in the card when that module is not available."""
    wanted = [f for f in formats if f.startswith("onnx")]
    if not wanted:
        return {}
    try:
        from nasopt.deploy import onnx as onnx_export  # noqa: F401
    except ImportError:
        log("ONNX export skipped: nasopt.deploy.onnx is not available in this version")
        return {"onnx": "not written: nasopt.deploy.onnx is not available in this version"}
    return onnx_export.pipeline_export(model, out, space, data, wanted, log)  # type: ignore[attr-defined]


def int8_not_written(card: Mapping[str, Any]) -> str | None:
    """Why the card's run wrote no model.int8.onnx though asked to (it failed its check)."""
    onnx = card["formats"].get("onnx")
    return onnx.get("onnx-int8", {}).get("not_written") if isinstance(onnx, dict) else None


def _sanity_markdown(record: Mapping[str, Any] | None) -> str:
    """REPORT.md's supernet check (:mod:`nasopt.search.sanity`) and its warnings, or nothing."""
    if not record or "largest" not in record:
        return ""
    from nasopt.search.sanity import summary
    warnings = "".join(f"\n**Warning**: {w}\n" for w in record.get("warnings", []))
    return f"{summary(record).replace('supernet check', 'Supernet check', 1)}.\n{warnings}\n"


def report_markdown(card: Mapping[str, Any]) -> str:
    metric = card.get("metric", "accuracy")
    named = "MAE (lower is better)" if metric == "mae" else metric
    val = card[f"val_{metric}"]
    rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in card[f"test_{metric}"].items())
    teachers = "\n".join(f"| teacher {k} | {v:.4f} |"
                         for k, v in card[f"teacher_test_{metric}"].items())
    timings = ", ".join(f"{k} {v:.0f} s" for k, v in card["timings_s"].items())
    genes = ", ".join(f"{k}={v}" for k, v in card["arch"].items())
    reason = int8_not_written(card)
    not_written = f"\n**model.int8.onnx not written**: {reason}" if reason else ""
    check = _sanity_markdown(card.get("sanity"))
    return f"""# nasopt run: {card['study']}, trial {card['trial']}

Command: `{card['command']}`
Machine: {card['machine']}
Data: {card['dataset']}

Picked trial {card['trial']} (rule: {card['pick']['rule'] if card['pick']['trial'] is None
                                     else 'by number'}): {genes}

{check}Validation {named}: searched {val['searched']:.4f} (inherited supernet
weights), distilled {val['distilled'] or float('nan'):.4f}, fine-tuned
{val['fine-tuned']:.4f}.

## Test {named} (measured once, after every step)

| model / artifact | test {metric} |
|---|---|
{rows}
{teachers}

Packed file: {card['packed_bytes']} B (predicted by the search: {card['predicted_bytes']} B);
float32 model: {card['float_bytes']} B; params {card['params']}, MACs {card['macs']};
CPU latency (batch 1, PyTorch, 1 thread; noisy on a shared machine): {card['latency_ms_cpu_batch1']:.3f} ms.
Files: {', '.join(card['files'])}.{not_written}

Time: {timings}.
"""
