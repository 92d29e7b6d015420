"""Moves over a gene dict (``{gene: option}``), shared by the local searches (``staged``,
``predictor``): each changes ``child`` in place, within ``choices`` (each gene's options, in
order: bits, sparsity and rank are ordinal), drawing from the ``rng`` given (a sampler's seeded
``numpy.random.RandomState``), so a search reproduces from its seed."""
from __future__ import annotations

from typing import Any

import numpy as np


def cross(rng: np.random.RandomState, child: dict[str, Any], other: dict[str, Any],
          genes: list[str], choices: dict[str, list]) -> None:
    """With probability 1/2, uniform crossover of ``genes`` with ``other``; the other genes of
    ``child`` are kept."""
    if rng.rand() < 0.5:
        for g in genes:
            if rng.rand() < 0.5 and other.get(g) in choices[g]:
                child[g] = other[g]


def shift(child: dict[str, Any], bits: list[str], choices: dict[str, list]) -> None:
    """Every gene of ``bits`` one option lower (where there is one): with bit-widths, the whole
    model a step smaller, at the cost of a little accuracy at most."""
    for g in bits:
        i = choices[g].index(child[g])
        if i > 0:
            child[g] = choices[g][i - 1]


def step(rng: np.random.RandomState, child: dict[str, Any], genes: list[str],
         choices: dict[str, list]) -> None:
    """One or two distinct genes moved to a neighbouring option, so a child stays near its
    parent."""
    mutable = [g for g in genes if len(choices[g]) > 1]
    if not mutable:
        return
    count = min(len(mutable), 1 + (rng.rand() < 1 / 3))
    for j in rng.choice(len(mutable), count, replace=False):
        gene = mutable[j]
        i, n = choices[gene].index(child[gene]), len(choices[gene])
        near = [k for k in (i - 1, i + 1) if 0 <= k < n]
        child[gene] = choices[gene][near[rng.randint(len(near))]]


def mutate(rng: np.random.RandomState, child: dict[str, Any], genes: list[str],
           choices: dict[str, list]) -> None:
    """One gene, or two draws with probability 1/3, set to any other of its options."""
    mutable = [g for g in genes if len(choices[g]) > 1]
    if not mutable:
        return
    for _ in range(1 + (rng.rand() < 1 / 3)):
        gene = mutable[rng.randint(len(mutable))]
        others = [c for c in choices[gene] if c != child[gene]]
        child[gene] = others[rng.randint(len(others))]
