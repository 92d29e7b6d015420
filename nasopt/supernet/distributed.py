"""Data-parallel supernet training across processes started by ``torchrun``.

``torchrun --nproc_per_node N -m nasopt.cli train-supernet ...`` starts N processes; each one
trains on its shard of the training split (every N-th sample), gradients are averaged over all
processes after each backward pass (``all_reduce``, as DistributedDataParallel does; backend
gloo on CPU, nccl on CUDA) and BatchNorm statistics at the end of each epoch, so every rank holds
the same weights. Rank 0 alone reads and writes checkpoints (what it read, a finished supernet
or a partial one to resume, reaches the others through the process group, so the ranks need not
share a file system). All ranks draw the same subnets in each
sandwich step: the draws depend on (seed, epoch) only.

Why not the ``DistributedDataParallel`` wrapper: one sandwich step runs several forward passes
(largest, smallest and random subnets of the same weights) before one backward pass, which the
wrapper's reducer does not support without ``no_sync`` tricks; averaging each parameter's
accumulated gradient once per backward (``register_post_accumulate_grad_hook``) is the same
arithmetic.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from nasopt.core.errors import NasoptError


@dataclass(frozen=True)
class Group:
    """This process's place among the training processes."""
    rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_environment(device: torch.device) -> Group | None:
    """The process group torchrun describes in the environment (``WORLD_SIZE`` > 1), joined on
    first call; None for a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
        try:
            dist.init_process_group(backend=backend)
        except (RuntimeError, ValueError) as exc:
            raise NasoptError(f"cannot join the torchrun process group ({exc}); start with "
                              f"`torchrun --nproc_per_node N -m nasopt.cli train-supernet ...`"
                              ) from None
    return Group(dist.get_rank(), dist.get_world_size())


def device_for(name: torch.device) -> torch.device:
    """One GPU per process: the LOCAL_RANK-th CUDA device under torchrun."""
    if name.type == "cuda" and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return name


def shard(x: Tensor, y: Tensor, group: Group | None) -> tuple[Tensor, Tensor]:
    """Every ``world_size``-th sample from ``rank`` on, cut to equal length on all ranks (the
    ranks must take the same number of steps)."""
    if group is None:
        return x, y
    n = len(x) // group.world_size * group.world_size
    return x[group.rank:n:group.world_size], y[group.rank:n:group.world_size]


def broadcast_(module: nn.Module, group: Group | None) -> None:
    """Rank 0's parameters and buffers on every rank."""
    if group is None:
        return
    for t in [*module.parameters(), *module.buffers()]:
        dist.broadcast(t.data, src=0)


def average_buffers_(module: nn.Module, group: Group | None) -> None:
    """Average floating-point buffers (BatchNorm running statistics) over the ranks."""
    if group is None:
        return
    for b in module.buffers():
        if b.is_floating_point():
            dist.all_reduce(b.data)
            b.data /= group.world_size


@contextmanager
def averaged_gradients(params: list[nn.Parameter], group: Group | None) -> Iterator[None]:
    """While active, the gradients of each backward pass are averaged over the ranks when the
    pass ends: one ``all_reduce`` of all of them, flattened (one call per parameter costs a
    round trip each: on gloo that made a small supernet's training twice as long as on one
    process)."""
    if group is None:
        yield
        return
    index = {id(p): i for i, p in enumerate(params)}
    pending: list[Tensor] = []

    def flush() -> None:
        grads = [p.grad for p in sorted(pending, key=lambda p: index[id(p)])]
        pending.clear()
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= group.world_size
        at = 0
        for g in grads:
            g.copy_(flat[at:at + g.numel()].view_as(g))
            at += g.numel()

    def hook(p: Tensor) -> None:
        if not pending:  # the pass's first gradient: average all of them when it ends
            torch.autograd.Variable._execution_engine.queue_callback(flush)
        pending.append(p)

    handles = [p.register_post_accumulate_grad_hook(hook) for p in params if p.requires_grad]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def from_main(value: Any, group: Group | None) -> Any:
    """Rank 0's ``value`` on every rank (pickled: small objects such as a checkpoint's state,
    with tensors on the CPU). Ranks need not share a file system: what rank 0 read is what all
    of them use."""
    if group is None:
        return value
    box = [value if group.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def leave(group: Group | None) -> None:
    """Leave the process group (at the end of a command that joined it)."""
    if group is not None and dist.is_initialized():
        dist.destroy_process_group()


def barrier(group: Group | None) -> None:
    if group is not None:
        dist.barrier()


def state_hash(state: Mapping[str, Tensor]) -> str:
    """SHA-256 of a state dict (names, dtypes, shapes and bytes), to compare ranks."""
    h = hashlib.sha256()
    for name, t in sorted(state.items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()
