"""The elastic network: what a space's network provides, and the one rule that names its parts.

A space's :meth:`~nasopt.core.space.SearchSpace.network` returns an :class:`ElasticNetwork`
built from the elastic layers (:mod:`nasopt.supernet.elastic`). Built at the largest dimensions
it is the supernet; built at an arch's dimensions it is that arch's standalone model.

**Module names are the interface.** Everything that reasons about a network's parts (compression
genes, latency tables, peak memory, distillation hints, the gradient relaxation) reads them
through the functions below, and nowhere else:

- ``stages`` (an ``nn.ModuleList``): the modules of stage ``i`` (``stages.<i>.…``) form gene
  group ``s<i+1>`` (its ``s<i+1>.bits``, ``s<i+1>.rank`` genes). A stage may hold ``blocks`` (an
  ``nn.ModuleList``): its gene ``s<i+1>.depth`` keeps the first ``depth`` blocks. A stage
  without blocks is one unit, and a network-wide gene ``depth`` keeps the first ``depth`` stages.
- any other top-level child (``stem``, ``head``…) is the group of its name; a ``_bn`` suffix
  joins the layer it normalises (``stem_bn`` is in group ``stem``).
"""
from __future__ import annotations

from abc import ABCMeta, abstractmethod
from collections.abc import Callable, Hashable, Mapping, Sequence

import torch
from torch import nn

from nasopt.core.arch import Value

STAGES = "stages"  # the ModuleList of stages
BLOCKS = "blocks"  # a stage's ModuleList of blocks


def stage_group(index: int) -> str:
    """The gene group of stage ``index`` (0-based): ``s<index+1>``."""
    return f"s{index + 1}"


def group_of(module_name: str) -> str:
    """The gene group of a module, by its name: ``stages.<i>.…`` -> ``s<i+1>``, otherwise its
    first name component without a ``_bn`` suffix (``head``, ``stem``…)."""
    parts = module_name.split(".")
    if parts[0] == STAGES and len(parts) > 1:
        return stage_group(int(parts[1]))
    return parts[0].removesuffix("_bn")


def depth_position(module_name: str) -> tuple[str, int] | None:
    """``(depth gene, position)`` of a module that a depth gene can switch off: the module exists
    while the gene's value exceeds ``position``. Blocks: ``stages.<i>.blocks.<j>.…`` ->
    (``s<i+1>.depth``, j); stages without blocks: ``stages.<i>.…`` -> (``depth``, i); others:
    None."""
    parts = module_name.split(".")
    if parts[0] != STAGES or len(parts) < 2:
        return None
    if len(parts) > 3 and parts[2] == BLOCKS:
        return f"{stage_group(int(parts[1]))}.depth", int(parts[3])
    return "depth", int(parts[1])


def is_depth_gene(gene: str) -> bool:
    """Whether ``gene`` is a depth gene (``<group>.depth``, or the network-wide ``depth``)."""
    return gene == "depth" or gene.endswith(".depth")


def units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The network's units, in definition order: every block of a stage
    (``stages.<i>.blocks.<j>``), a stage without blocks (``stages.<i>``), and every other
    top-level child that holds parameters (``stem``, ``head``…)."""
    out: list[tuple[str, nn.Module]] = []
    for name, child in model.named_children():
        if name == STAGES:
            for i, stage in enumerate(child):
                blocks = getattr(stage, BLOCKS, None)
                if isinstance(blocks, nn.ModuleList):
                    out += [(f"{STAGES}.{i}.{BLOCKS}.{j}", b) for j, b in enumerate(blocks)]
                else:
                    out.append((f"{STAGES}.{i}", stage))
        elif any(True for _ in child.parameters()):
            out.append((name, child))
    return out


def last_stage(model: nn.Module) -> str | None:
    """The name of the network's last stage (``stages.<n-1>``); None without stages."""
    stages = getattr(model, STAGES, None)
    if not isinstance(stages, nn.ModuleList) or len(stages) == 0:
        return None
    return f"{STAGES}.{len(stages) - 1}"


class ElasticNetwork(nn.Module, metaclass=ABCMeta):
    """Base class of a space's network.

    A subclass builds its layers from the elastic layers for the dimensions it is given, names
    its parts as the module doc says, and provides:

    - :meth:`configure` (required): set the active dimensions of its elastic layers for an arch
      (the active depth of its stages, ``active_out`` of its convolutions and linear layers,
      ``active_k`` of its kernels), or restore the full network for ``None``. Afterwards the
      network computes exactly the standalone model of that arch.
    - :meth:`sort_channels` (optional): reorder channels so that every prefix keeps the most
      important ones (:func:`nasopt.supernet.elastic.importance`, ``permute_``, ``permute_bn_``),
      keeping the function of the network unchanged. By default nothing is reordered: subnets
      then inherit the first channels as they are, which is correct but usually less accurate.

    ``nasopt check-space`` checks both against the standalone models.
    """

    @abstractmethod
    def configure(self, arch: Mapping[str, Value] | None) -> None:
        """Activate the subnet ``arch`` (its architecture genes); ``None``: the full network."""

    def sort_channels(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Reorder channels by importance (with the optimizer's state); default: no reordering."""

    def parts(self) -> "Sequence[tuple[Hashable, Callable[[torch.Tensor], torch.Tensor], nn.Module]] | None":
        """Optional, for a standalone model: the first steps of its forward pass as consecutive
        parts ``(key, function, module)``, holding all its BatchNorm layers (in ``module``). A
        key is equal for two standalone models of the space exactly when that part and every
        part before it compute the same function (the genes they depend on). The evaluator then
        recalibrates BatchNorm part by part and reuses a part's statistics and outputs for archs
        that share its key (:mod:`nasopt.search.evaluate`). Default None: the whole model."""
        return None
