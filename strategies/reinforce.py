"""``reinforce``: a REINFORCE policy (Williams 1992) over the genes, as an Optuna sampler.

The policy is one categorical distribution per gene, ``softmax(logits[gene])`` (as NAS-Bench-201's
own REINFORCE baseline). For each finished trial the logits take one Adam ascent step on

    (reward - baseline) * log pi(arch) + entropy_weight * H(pi)

where ``baseline`` is an exponential moving average of the previous rewards (it starts at the
first reward) and H the summed entropy of the per-gene distributions, which keeps the policy from
collapsing early.

Reward: for one objective, its value (negated when minimized). For several objectives the
MnasNet reward ``ACC * prod_j (cost_j / target_j) ** w`` with ``w = -0.07`` (the soft constraint
of Tan et al. 2019): ACC is the first objective (it must be maximized, e.g. accuracy), cost_j every
other objective (for one that is maximized the ratio is inverted) and target_j the **median of
cost_j over the study's completed trials**, so the policy trades accuracy for size around the
sizes it has seen instead of needing a user budget.

Budgets (constraints from ``--max-*``, recorded with ``trial.set_constraint``): a trial that
misses one gets the lowest reward of the replayed trials, so it never beats a feasible arch and
the policy learns to leave infeasible regions (a hard penalty bounded by the rewards seen, which
keeps the advantage on the scale of the objectives). Without budgets the reward is unchanged.

State: the policy is defined by replaying the study's completed trials in trial-number order
from zero logits, so a resumed study (or another process sharing the storage) continues exactly
where the ledger stands. Trials proposed by other strategies in the same study are replayed as if
the policy had drawn them (REINFORCE without importance weights): they steer it, but are not a
correct on-policy gradient. The controller state (logits, Adam moments, baseline, number of
updates, the consumed trial numbers and their rewards, and the sampler's random state) is kept
in memory and, when the search has a run folder (``nasopt search``), written atomically after
every proposal to ``<run dir>/controllers/<study>.reinforce.json``. A state is resumed from
(only the newer trials are replayed) when its consumed trials are the first completed trials of
the study with the same rewards and settings; otherwise it is stale and the policy is replayed
from zero, which gives the same logits. Resuming from the file also restores the random state,
so a stopped and restarted search proposes what an uninterrupted one would have. With several
objectives or budgets the rewards of old trials move with the median cost and the infeasible
floor, so the state is mostly stale there and replay (O(trials) per call) does the work.

Defaults, fixed before any benchmark ran: Adam with learning rate 0.05 (NATS-Bench's REINFORCE
uses 0.01 over thousands of steps; a 100-trial budget needs larger steps), baseline decay 0.9 (as
NATS-Bench), entropy weight 1e-3.
"""
from __future__ import annotations

import json
import math
import re
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution
from optuna.study import Study, StudyDirection
from optuna.trial import FrozenTrial

from nasopt.core.checkpoint import atomic_write_bytes
from nasopt.core.errors import NasoptError
from nasopt.core.space import SearchSpace
from nasopt.core.objectives import MNASNET_W
from nasopt.search.study import constraint_excess
from nasopt.core.strategy import GeneSampler, Strategy
from nasopt.core.trials import completed_trials

LR = 0.05
BASELINE_DECAY = 0.9
ENTROPY_WEIGHT = 1e-3
MNAS_W = MNASNET_W
_ADAM = (0.9, 0.999, 1e-8)
STATE_VERSION = 1


def mnasnet_rewards(values: Sequence[Sequence[float]],
                    directions: Sequence[StudyDirection], w: float = MNAS_W) -> list[float]:
    """Rewards of trials with objective ``values``: the first objective times
    ``(cost / median cost) ** w`` for every other objective (see the module doc)."""
    if directions[0] != StudyDirection.MAXIMIZE:
        raise NasoptError("reinforce's reward is ACC * (cost / target) ** w: it needs a first "
                          "objective where higher is better (accuracy, f1, balanced_accuracy); "
                          "with mae or rmse use evolution, nsga2, tpe, staged or random")
    table = np.asarray(values, dtype=float)
    if (table[:, 0] < 0).any():
        raise NasoptError("reinforce's reward is ACC * (cost / target) ** w, which needs the first "
                          f"objective at 0 or more, but a trial scored {table[:, 0].min():g}; "
                          "use evolution, nsga2, tpe, staged or random for this metric")
    rewards = table[:, 0].copy()
    for j in range(1, table.shape[1]):
        cost = np.maximum(table[:, j], 1e-12)  # a zero cost would make the factor infinite
        target = float(np.median(cost))
        ratio = cost / target if directions[j] == StudyDirection.MINIMIZE else target / cost
        rewards *= ratio ** w
    return rewards.tolist()


def rewards_of(trials: Sequence[FrozenTrial], directions: Sequence[StudyDirection],
               w: float = MNAS_W) -> list[float]:
    """One reward per trial: the objective value for one objective, else the MnasNet reward;
    a trial that misses a budget gets the lowest reward of ``trials`` (see the module doc)."""
    if len(directions) == 1:
        sign = 1.0 if directions[0] == StudyDirection.MAXIMIZE else -1.0
        rewards = [sign * t.values[0] for t in trials]
    else:
        rewards = mnasnet_rewards([t.values for t in trials], directions, w)
    finite = [r for r in rewards if math.isfinite(r)]
    if not finite:
        return rewards
    floor = min(finite)
    return [floor if constraint_excess(t) > 0 else r for t, r in zip(trials, rewards)]


class ReinforceSampler(GeneSampler):
    """REINFORCE over categorical parameters; everything else is sampled at random."""

    def __init__(self, lr: float = LR, baseline_decay: float = BASELINE_DECAY,
                 entropy_weight: float = ENTROPY_WEIGHT, w: float = MNAS_W,
                 seed: int | None = None, state_path: Path | None = None):
        self.lr, self.baseline_decay, self.entropy_weight, self.w = (
            lr, baseline_decay, entropy_weight, w)
        super().__init__(seed)
        self.state_path = state_path  # where the controller state is saved (None: memory only)
        self._state: dict | None = None  # the controller after the trials it consumed
        self._file_read = False

    def use_run_folder(self, run_dir: Path, study_name: str) -> None:
        """Save the controller state in the run folder (see :func:`state_path`)."""
        self.state_path = state_path(run_dir, study_name)

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        # checked here, outside the objective, so a wrong setup stops the search with this
        # message instead of failing every trial
        if len(study.directions) > 1 and study.directions[0] != StudyDirection.MAXIMIZE:
            mnasnet_rewards([[1.0] * len(study.directions)], study.directions, self.w)

    def policy(self, study: Study,
               search_space: dict[str, BaseDistribution]) -> dict[str, np.ndarray]:
        """Per-gene option probabilities after replaying the study's completed trials."""
        return self.controller(study, search_space, resume=True)[1]

    def controller(self, study: Study, search_space: dict[str, BaseDistribution],
                   resume: bool = True) -> tuple[dict, dict[str, np.ndarray]]:
        """(controller state, per-gene probabilities) after the study's completed trials;
        continued from a matching saved state when ``resume``, else replayed from zero."""
        names = list(search_space)
        choices = [list(search_space[n].choices) for n in names]  # type: ignore[attr-defined]
        width = max(len(c) for c in choices)
        valid = np.zeros((len(names), width), dtype=bool)
        for g, c in enumerate(choices):
            valid[g, : len(c)] = True
        done = sorted(completed_trials(study),
                      key=lambda t: t.number)
        rewards = rewards_of(done, study.directions, self.w)
        key = json.loads(json.dumps({"version": STATE_VERSION, "genes": names,
                                     "choices": choices, "settings": [
                                         self.lr, self.baseline_decay, self.entropy_weight,
                                         self.w]}))
        start = self._resume_point(key, done, rewards) if resume else None
        if start is None:
            logits = np.zeros(valid.shape)
            m, v = np.zeros(valid.shape), np.zeros(valid.shape)
            baseline: float | None = None
            step = consumed = 0
        else:
            logits, m, v = (np.array(start[k], dtype=float) for k in ("logits", "m", "v"))
            baseline, step, consumed = start["baseline"], start["step"], len(start["consumed"])
        for trial, reward in zip(done[consumed:], rewards[consumed:]):
            if not math.isfinite(reward):
                continue
            step += 1
            baseline = reward if baseline is None else baseline
            advantage = reward - baseline
            baseline = self.baseline_decay * baseline + (1 - self.baseline_decay) * reward
            taken = np.zeros(valid.shape)
            for g, (name, c) in enumerate(zip(names, choices)):
                if trial.params.get(name) in c:  # a gene this trial lacks gets no update
                    taken[g, c.index(trial.params[name])] = 1.0
            probs = _softmax(logits, valid)
            known = taken.sum(axis=1, keepdims=True)  # 1 where the trial chose an option
            log_p = np.where(valid, np.log(np.where(valid, probs, 1.0)), 0.0)
            entropy = -(probs * log_p).sum(axis=1, keepdims=True)
            grad = (advantage * (taken - probs * known)
                    - self.entropy_weight * probs * (log_p + entropy)) * valid
            logits, m, v = _adam_ascent(logits, grad, m, v, step, self.lr)
        self._state = {"key": key, "consumed": [t.number for t in done], "rewards": rewards,
                       "logits": logits.tolist(), "m": m.tolist(), "v": v.tolist(),
                       "baseline": baseline, "step": step}
        probs = _softmax(logits, valid)
        return self._state, {n: probs[g, : len(c)] for g, (n, c) in enumerate(zip(names, choices))}

    def _resume_point(self, key: dict, done: Sequence[FrozenTrial],
                      rewards: Sequence[float]) -> dict | None:
        """The state in memory, or on the first call the saved one (whose random state is then
        adopted), if it consumed ``done``'s first trials with the same rewards; else None."""
        state = self._state
        if state is None and not self._file_read and self.state_path is not None:
            self._file_read = True
            state = read_state(self.state_path)
            numbers = [t.number for t in done]
            if (state is not None and state.get("key") == key and "rng" in state
                    and numbers[: len(state["consumed"])] == state["consumed"]):
                name, keys, pos, has_gauss, gauss = state["rng"]
                self._rng.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss,
                                     gauss))
        if state is None or state.get("key") != key:
            return None
        k = len(state["consumed"])
        if ([t.number for t in done[:k]] != state["consumed"]
                or not np.array_equal(np.asarray(rewards[:k], dtype=float),
                                      np.asarray(state["rewards"], dtype=float), equal_nan=True)):
            return None  # stale: other trials, or their rewards moved (median, budget floor)
        return state

    def _save(self) -> None:
        if self.state_path is None or self._state is None:
            return
        name, keys, pos, has_gauss, gauss = self._rng.get_state()
        state = {**self._state, "rng": [name, keys.tolist(), pos, has_gauss, gauss]}
        atomic_write_bytes(self.state_path, json.dumps(state).encode())

    def sample_relative(self, study: Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        if not search_space:
            return {}  # before the first completed trial: uniform, like a fresh policy
        probs = self.policy(study, search_space)
        out = {}
        for name, p in probs.items():
            choices = search_space[name].choices  # type: ignore[attr-defined]
            out[name] = choices[self._rng.choice(len(choices), p=p / p.sum())]
        self._save()
        return out


def state_path(run_dir: Path, study_name: str) -> Path:
    """Where a study's REINFORCE controller state lives in a run folder."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", study_name)[:80]
    return Path(run_dir) / "controllers" / f"{safe}-{zlib.crc32(study_name.encode()):08x}.reinforce.json"


def read_state(path: Path) -> dict | None:
    """A saved controller state, or None when the file is missing or unreadable (then the
    policy is replayed from the study)."""
    try:
        state = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None



def _softmax(logits: np.ndarray, valid: np.ndarray) -> np.ndarray:
    z = np.where(valid, logits, -np.inf)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _adam_ascent(x: np.ndarray, grad: np.ndarray, m: np.ndarray, v: np.ndarray, step: int,
                 lr: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    beta1, beta2, eps = _ADAM
    m = beta1 * m + (1 - beta1) * grad
    v = beta2 * v + (1 - beta2) * grad ** 2
    m_hat, v_hat = m / (1 - beta1 ** step), v / (1 - beta2 ** step)
    return x + lr * m_hat / (np.sqrt(v_hat) + eps), m, v


def _make(space: SearchSpace, seed: int) -> optuna.samplers.BaseSampler:
    return ReinforceSampler(seed=seed)


STRATEGY = Strategy("reinforce", f"REINFORCE, categorical policy per gene (Adam lr {LR}, "
                    f"moving-average baseline, entropy bonus; MnasNet reward for several "
                    f"objectives)", _make)
