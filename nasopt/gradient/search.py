"""Gradient-based architecture search (DARTS / GDAS / FBNet style) on a continuous relaxation.

A *relaxation* (:class:`Relaxation`) is a network whose forward takes, for every gene, a weight
vector over that gene's options: soft (a softmax mixture, DARTS) or hard one-hot with
straight-through gradients (Gumbel-softmax sampling, GDAS / FBNet). :func:`gradient_search` holds
one vector of architecture logits per gene and alternates, first order (no unrolled step):

* a **weight step** on a training minibatch: cross-entropy of ``forward(x, probs)`` with the
  logits held fixed (DARTS: ``softmax(logits)``; GDAS: a fresh hard Gumbel sample);
* a **logits step** on a validation minibatch: cross-entropy plus the cost term, gradients to the
  logits only. The search never sees the test split.

**Cost term** (``cost`` names a key of ``relaxation.expected_cost(probs)``, e.g. ``"size"``, the
expected packed bytes). ``E`` is that expectation under ``softmax(logits)`` (also for GDAS: the
exact expectation has less variance than the sampled arch's cost):

* ``lam`` alone: ``lam * log(E)``. The log makes ``lam`` scale-free: a relative size change of
  1% is worth ``0.01 * lam`` nats of validation loss, whatever the unit of the cost.
* ``target`` (same unit as the cost, e.g. bytes): a Lagrangian ``mu * log(E / target)`` with a
  multiplier ``mu >= 0`` updated by dual ascent after every logits step,
  ``mu <- max(0, mu + dual_lr * log(E / target))``, starting at ``lam`` (0 when not given). ``mu``
  grows while the expected cost is over the target and decays to 0 once under it, so ``E``
  settles near the target (not below it for nothing). The log ratio makes the rule symmetric:
  twice the target pushes as hard as half of it pulls back (with ``E / target - 1`` the
  multiplier grew fast far above the target and decayed slowly below it, so short runs
  overshot far below it). This bounds the *expected* cost: the derived
  (argmax) arch can still be over the target, which is why derived archs are scored and their
  budgets checked by the evaluator like any other trial.
* neither: plain DARTS on accuracy.

``targets`` adds further budgets as Lagrangian terms of their own (e.g. ``{"latency": 0.02}``
for a latency budget in ms beside the size target), each with its multiplier starting at 0 and
the same dual-ascent rule; the trajectory records every multiplier (``mus``).

**GDAS temperature** anneals exponentially from ``tau[0]`` to ``tau[1]`` over the epochs
(GDAS uses 10 -> 0.1; FBNet 5 * 0.956^epoch).

The run records a **trajectory**: per epoch (epoch 0 = before any step) the softmax probabilities
of every gene's options, the expected costs, losses and the multiplier; :func:`save_trajectory`
writes it as JSON and long-format CSV, :func:`plot_trajectory` as a PNG. :func:`derive` gives the
top-k archs of the final (independent) gene distributions by joint probability.

Reproducibility: ``seed`` fixes the logits' init (uniform), minibatch orders and Gumbel noise;
on CPU the run is deterministic.
"""
from __future__ import annotations

import csv
import heapq
import io
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nasopt.core.checkpoint import atomic_write_bytes
from nasopt.core.errors import NasoptError

VARIANTS = ("darts", "gdas")


@runtime_checkable
class Relaxation(Protocol):
    """A network relaxed over the options of its genes (the contract of gradient search).

    ``genes`` maps each gene to the options that get architecture logits (a restricted gene has
    only its allowed options; a gene with one option gets a constant weight 1). ``forward(x,
    probs)``: ``probs[g]`` has shape ``(len(genes[g]),)``; soft weights, or a hard one-hot whose
    gradient flows straight through to the logits. ``expected_cost(probs)``: differentiable
    expected costs under independent gene distributions (e.g. ``{"size": bytes, "params": ..}``),
    may be ``{}``. If the object is an ``nn.Module``, the search puts it in train mode while
    searching and eval mode for validation accuracy."""

    genes: dict[str, tuple]

    def weight_parameters(self) -> list[nn.Parameter]: ...

    def forward(self, x: Tensor, probs: dict[str, Tensor]) -> Tensor: ...

    def expected_cost(self, probs: dict[str, Tensor]) -> dict[str, Tensor]: ...


@dataclass
class GradientResult:
    """The outcome of :func:`gradient_search`. ``probs``/``logits``: final softmax probabilities
    and logits per gene (lists in the order of ``genes[g]``); ``trajectory``: one record per
    epoch (see module docstring); ``wall_s``: seconds spent searching."""

    variant: str
    genes: dict[str, tuple]
    logits: dict[str, list[float]]
    probs: dict[str, list[float]]
    trajectory: list[dict[str, Any]] = field(default_factory=list)
    wall_s: float = 0.0

    def prob_tensors(self) -> dict[str, Tensor]:
        return {g: torch.tensor(p, dtype=torch.float32) for g, p in self.probs.items()}

    def derive(self, k: int = 1) -> list[tuple[dict[str, Any], float]]:
        """The top-``k`` archs of the final distributions (see :func:`derive`)."""
        return derive(self.probs, k, self.genes)


# ---- deriving archs ----------------------------------------------------------------------------

def derive(probs: Mapping[str, Sequence[float] | Tensor], k: int = 1,
           genes: Mapping[str, Sequence[Any]] | None = None) -> list[tuple[dict[str, Any], float]]:
    """The ``k`` most probable distinct archs under independent per-gene distributions ``probs``,
    as ``(arch, joint probability)``, most probable first: the argmax arch, then the next ones by
    joint probability (exact k-best enumeration of the product distribution, best-first over
    per-gene rankings). ``genes`` maps gene -> options (values in the archs); without it the archs
    hold option indices. Ties break by gene order and option order, deterministically."""
    if k < 1:
        raise NasoptError(f"derive needs k >= 1, got {k}")
    names = list(probs)
    ranked: list[list[tuple[float, int]]] = []
    for g in names:
        p = [float(v) for v in (probs[g].tolist() if isinstance(probs[g], Tensor) else probs[g])]
        if not p:
            raise NasoptError(f"gene {g!r} has no options")
        # log-probabilities, descending; ties keep option order (stable sort)
        order = sorted(range(len(p)), key=lambda i: -p[i])
        ranked.append([(math.log(p[i]) if p[i] > 0 else -math.inf, i) for i in order])
    start = (0,) * len(names)
    score = lambda idx: sum(ranked[j][i][0] for j, i in enumerate(idx))  # noqa: E731
    heap = [(-score(start), start)]
    seen = {start}
    out: list[tuple[dict[str, Any], float]] = []
    while heap and len(out) < k:
        neg, idx = heapq.heappop(heap)
        arch = {}
        for j, g in enumerate(names):
            opt = ranked[j][idx[j]][1]
            arch[g] = genes[g][opt] if genes is not None else opt
        out.append((arch, math.exp(-neg)))
        for j in range(len(names)):
            if idx[j] + 1 < len(ranked[j]):
                nxt = idx[:j] + (idx[j] + 1,) + idx[j + 1:]
                if nxt not in seen:
                    seen.add(nxt)
                    heapq.heappush(heap, (-score(nxt), nxt))
    return out


# ---- the search loop ---------------------------------------------------------------------------

def _minibatches(n: int, batch_size: int, gen: torch.Generator):
    order = torch.randperm(n, generator=gen)
    for s in range(0, n, batch_size):
        yield order[s:s + batch_size]


def _temperature(tau: tuple[float, float], epoch: int, epochs: int) -> float:
    hi, lo = tau
    if epochs <= 1:
        return lo
    return hi * (lo / hi) ** (epoch / (epochs - 1))


def gradient_search(relaxation: Relaxation, data: Any, *, variant: str = "darts",
                    epochs: int = 10, lr_w: float = 1e-3, lr_alpha: float = 3e-2,
                    cost: str | None = "size", lam: float | None = None,
                    target: float | None = None, seed: int = 0,
                    on_epoch: Callable[[dict[str, Any]], None] | None = None,
                    batch_size: int = 128, tau: tuple[float, float] = (5.0, 0.2),
                    dual_lr: float = 0.05, alpha_weight_decay: float = 0.0,
                    init_logits: Mapping[str, Sequence[float]] | None = None,
                    train_weights: bool = True, max_batches: int | None = None,
                    targets: Mapping[str, float] | None = None,
                    ) -> GradientResult:
    """Search ``relaxation`` on ``data`` (anything with ``x_train, y_train, x_val, y_val``, e.g.
    :class:`nasopt.core.data.Dataset`; the test split is never read). See the module docstring for
    the alternation, the cost rule and the temperature schedule.

    ``lr_w``/``lr_alpha``: Adam learning rates of weights and logits (logits: betas (0.5, 0.999)
    as in DARTS); ``train_weights=False`` freezes the weights (logits only); ``max_batches``
    caps the steps per epoch; ``on_epoch(record)`` is called after each epoch's record;
    ``targets`` maps further cost names to budgets (Lagrangian terms, see the module doc)."""
    if variant not in VARIANTS:
        raise NasoptError(f"unknown gradient variant {variant!r}; use one of {', '.join(VARIANTS)}")
    if epochs < 1:
        raise NasoptError(f"gradient search needs epochs >= 1, got {epochs}")
    if lam is not None and lam < 0:
        raise NasoptError(f"the cost weight lam must be >= 0, got {lam}")
    if target is not None and not target > 0:
        raise NasoptError(f"the cost target must be > 0, got {target}")
    if (lam is not None or target is not None) and cost is None:
        raise NasoptError("a cost weight or target needs a cost name (e.g. cost='size')")
    # the Lagrangian terms: cost name -> budget (the main cost's target, then the others)
    budgets = {**({cost: float(target)} if target is not None and cost is not None else {}),
               **{k: float(v) for k, v in (targets or {}).items()}}
    for name, limit in budgets.items():
        if not limit > 0:
            raise NasoptError(f"the {name} target must be > 0, got {limit}")
    if tau[0] <= 0 or tau[1] <= 0:
        raise NasoptError(f"Gumbel temperatures must be > 0, got {tau}")
    for split in ("x_train", "y_train", "x_val", "y_val"):
        if not hasattr(data, split):
            raise NasoptError(f"gradient search needs data with {split}")
    if len(data.x_train) == 0 or len(data.x_val) == 0:
        raise NasoptError("gradient search needs non-empty train and validation splits")

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    genes = {g: tuple(opts) for g, opts in relaxation.genes.items()}
    device = data.x_train.device
    logits: dict[str, Tensor] = {}
    for g, opts in genes.items():
        if not opts:
            raise NasoptError(f"gene {g!r} of the relaxation has no options")
        init = torch.zeros(len(opts))
        if init_logits is not None and g in init_logits:
            init = torch.tensor([float(v) for v in init_logits[g]])
            if init.shape != (len(opts),):
                raise NasoptError(f"init_logits[{g!r}] needs {len(opts)} values")
        logits[g] = init.to(device).requires_grad_(len(opts) > 1)
    learnable = [t for t in logits.values() if t.requires_grad]
    weights = list(relaxation.weight_parameters())
    opt_w = torch.optim.Adam(weights, lr=lr_w) if train_weights and weights else None
    opt_a = (torch.optim.Adam(learnable, lr=lr_alpha, betas=(0.5, 0.999),
                              weight_decay=alpha_weight_decay) if learnable else None)
    if not train_weights:
        for p in weights:
            p.requires_grad_(False)

    def soft() -> dict[str, Tensor]:
        return {g: t.softmax(0) for g, t in logits.items()}

    def hard(temp: float) -> dict[str, Tensor]:
        out = {}
        for g, t in logits.items():
            if len(genes[g]) == 1:
                out[g] = t.softmax(0)
                continue
            u = torch.rand(t.shape, generator=gen).clamp_(1e-10, 1 - 1e-10).to(t.device)
            y = ((t - torch.log(-torch.log(u))) / temp).softmax(0)
            one = F.one_hot(y.argmax(), len(y)).to(y.dtype)
            out[g] = one - y.detach() + y  # straight-through: forward one-hot, backward soft
        return out

    def costs(probs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        c = relaxation.expected_cost(dict(probs))
        needed = [*budgets, *([cost] if cost is not None and lam is not None else [])]
        for name in needed:
            if name not in c:
                raise NasoptError(f"the relaxation has no expected cost {name!r} "
                                  f"(it has: {', '.join(c) or 'none'})")
        return c

    # one multiplier per budget; the main target's starts at lam
    mus = {name: (float(lam) if name == cost and lam is not None else 0.0) for name in budgets}
    module = relaxation if isinstance(relaxation, nn.Module) else None

    def record(epoch: int, temp: float | None, train_loss: float | None,
               val_loss: float | None) -> dict[str, Any]:
        with torch.no_grad():
            p = soft()
            exp = {m: float(v) for m, v in costs(p).items()}
        rec = {"epoch": epoch, "probs": {g: [float(v) for v in p[g].cpu()] for g in genes},
               "expected": exp, "train_loss": train_loss, "val_loss": val_loss,
               "tau": temp, "mu": mus.get(cost) if target is not None else None,
               "mus": dict(mus)}
        return rec

    trajectory = [record(0, None, None, None)]
    if on_epoch is not None:
        on_epoch(trajectory[0])
    t0 = time.perf_counter()
    n_val = len(data.x_val)
    val_iter = iter(())
    for epoch in range(epochs):
        temp = _temperature(tau, epoch, epochs) if variant == "gdas" else None
        if module is not None:
            module.train()
        tl = vl = 0.0
        steps = 0
        for idx in _minibatches(len(data.x_train), batch_size, gen):
            if max_batches is not None and steps >= max_batches:
                break
            idx = idx.to(device)
            # -- weight step (train split), logits fixed
            if opt_w is not None:
                with torch.no_grad():
                    pw = hard(temp) if variant == "gdas" else soft()
                pw = {g: v.detach() for g, v in pw.items()}
                opt_w.zero_grad(set_to_none=True)
                loss = F.cross_entropy(relaxation.forward(data.x_train[idx], pw),
                                       data.y_train[idx])
                if not torch.isfinite(loss):
                    raise NasoptError(f"the weight loss became {loss.item()} in epoch {epoch + 1}; "
                                      f"lower lr_w (currently {lr_w})")
                loss.backward()
                opt_w.step()
                tl += float(loss.detach())
            # -- logits step (validation split), weights fixed
            if opt_a is not None:
                vidx = next(val_iter, None)
                if vidx is None:
                    val_iter = _minibatches(n_val, batch_size, gen)
                    vidx = next(val_iter)
                vidx = vidx.to(device)
                pa = hard(temp) if variant == "gdas" else soft()
                opt_a.zero_grad(set_to_none=True)
                for p in weights:
                    p.grad = None
                vloss = F.cross_entropy(relaxation.forward(data.x_val[vidx], pa),
                                        data.y_val[vidx])
                total = vloss
                ratios: dict[str, float] = {}
                if budgets or (cost is not None and lam is not None):
                    c = costs(soft())
                    for name, limit in budgets.items():
                        ratio = torch.log(c[name] / limit)
                        total = total + mus[name] * ratio
                        ratios[name] = float(ratio.detach())
                    if cost is not None and lam is not None and target is None:
                        total = total + lam * torch.log(c[cost])
                if not torch.isfinite(total):
                    raise NasoptError(f"the architecture loss became {total.item()} in epoch "
                                      f"{epoch + 1}; lower lr_alpha (currently {lr_alpha})")
                total.backward()
                for p in weights:  # the logits step leaves the weights alone
                    p.grad = None
                opt_a.step()
                for name, ratio in ratios.items():
                    mus[name] = max(0.0, mus[name] + dual_lr * ratio)
                vl += float(vloss.detach())
            steps += 1
        rec = record(epoch + 1, temp, tl / max(steps, 1) if opt_w is not None else None,
                     vl / max(steps, 1) if opt_a is not None else None)
        trajectory.append(rec)
        if on_epoch is not None:
            on_epoch(rec)
    wall = time.perf_counter() - t0
    if module is not None:
        module.eval()
    with torch.no_grad():
        final = soft()
    return GradientResult(
        variant=variant, genes=genes,
        logits={g: [float(v) for v in t.detach().cpu()] for g, t in logits.items()},
        probs={g: [float(v) for v in final[g].cpu()] for g in genes},
        trajectory=trajectory, wall_s=wall)


# ---- trajectory I/O and plot -------------------------------------------------------------------

def save_trajectory(result: GradientResult, folder: str | Path, stem: str = "trajectory"
                    ) -> tuple[Path, Path]:
    """Write ``<stem>.json`` (the whole result: genes, final logits/probs, per-epoch records) and
    ``<stem>.csv`` (long format: epoch, gene, option, prob) into ``folder``; atomic writes."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    doc = {"variant": result.variant, "wall_s": result.wall_s,
           "genes": {g: list(o) for g, o in result.genes.items()},
           "logits": result.logits, "probs": result.probs, "trajectory": result.trajectory}
    jpath, cpath = folder / f"{stem}.json", folder / f"{stem}.csv"
    atomic_write_bytes(jpath, json.dumps(doc, indent=1, default=str).encode())
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["epoch", "gene", "option", "prob"])
    for rec in result.trajectory:
        for g, ps in rec["probs"].items():
            for o, p in zip(result.genes[g], ps):
                w.writerow([rec["epoch"], g, o, f"{p:.6g}"])
    atomic_write_bytes(cpath, buf.getvalue().encode())
    return jpath, cpath


def load_trajectory(path: str | Path) -> GradientResult:
    """A :class:`GradientResult` back from the JSON written by :func:`save_trajectory`."""
    try:
        doc = json.loads(Path(path).read_text())
        return GradientResult(variant=doc["variant"],
                              genes={g: tuple(o) for g, o in doc["genes"].items()},
                              logits=doc["logits"], probs=doc["probs"],
                              trajectory=doc["trajectory"], wall_s=doc.get("wall_s", 0.0))
    except (OSError, ValueError, KeyError) as e:
        raise NasoptError(f"cannot read the gradient trajectory {path}: {e}; delete it to "
                          f"search again") from e


def render_trajectory(result: GradientResult, title: str | None = None,
                      max_genes: int | None = None) -> bytes:
    """PNG bytes: one panel per gene (with more than one option), the softmax probability of
    each option over epochs."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = [g for g, o in result.genes.items() if len(o) > 1][:max_genes]
    if not names:
        raise NasoptError("nothing to plot: no gene has more than one option")
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    fig = Figure(figsize=(3.2 * cols, 2.4 * rows))
    FigureCanvasAgg(fig)
    epochs = [r["epoch"] for r in result.trajectory]
    for i, g in enumerate(names):
        ax = fig.add_subplot(rows, cols, i + 1)
        for j, o in enumerate(result.genes[g]):
            ax.plot(epochs, [r["probs"][g][j] for r in result.trajectory], marker=".", label=str(o))
        ax.set_title(g, fontsize=9)
        ax.set_ylim(0, 1)
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6, loc="best")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def plot_trajectory(result: GradientResult, path: str | Path, title: str | None = None) -> Path:
    """Write :func:`render_trajectory`'s PNG to ``path`` (atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, render_trajectory(result, title))
    return path
