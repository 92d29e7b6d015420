"""Subnet-parallel supernet training on one machine: the subnets of each sandwich step spread
over forked processes.

On a CPU, the tensors of a small supernet are too small for intra-op threads to pay (two threads
train a digits step about 1.2x faster than one); separate processes, each on one core with its
own share of the step's subnets, do better. Every process holds the same weights and draws the
same subnets (the draws depend on the seed and the epoch only); rank 0 computes the largest
subnet (the teacher: label loss) and sends its outputs to the others, each rank computes the
distillation losses of its students (:func:`owners`), and one ``all_reduce`` per step sums the
gradients and the losses of all ranks before every rank takes the same optimizer step. The
step's arithmetic is that of one process (the same batches, the same BatchNorm batches, the
same subnets); only the order in which the subnets' gradients are summed differs, so a step
equals one process's up to float rounding (which, as after any change of summation order, grows
over a training: the weights of a long run are not one process's). BatchNorm running statistics are rank 0's
(those of its own subnets): evaluation recalibrates them per arch anyway.

Unlike data-parallel training under torchrun (:mod:`nasopt.supernet.distributed`), no batch is
split, so the recipe and its checkpoint key stay those of one process. The processes are forked
(Linux), so nothing is pickled or re-imported: the children start with the parent's data, weights
and optimizer state, train, and exit without touching the parent's files; rank 0 alone writes
checkpoints. A child that fails reports its error to the parent, which raises it; children die
with their parent.
"""
from __future__ import annotations

import datetime
import os
import signal
import sys
import tempfile
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from nasopt.core.errors import NasoptError

#: the cost of a step's subnets in units of a random subnet, to balance the ranks: the largest
#: (the teacher, on rank 0) and the smallest
TEACHER_COST, SMALLEST_COST = 2.0, 0.5
#: a collective waits this long for the other ranks (a step far longer than this is a hang)
TIMEOUT = datetime.timedelta(minutes=10)
#: what a child reports when Ctrl-C interrupted it: the parent raises KeyboardInterrupt
INTERRUPTED = "interrupted"


def owners(n_random: int, world_size: int) -> list[int]:
    """The rank that computes each student of a sandwich step: the smallest subnet first, then
    the ``n_random`` random ones. Rank 0 computes the teacher too; each student goes to the rank
    with the least work so far (ties: the lowest rank), so on two ranks with four random subnets
    rank 0 takes the teacher and one random subnet, rank 1 the smallest and three."""
    load = [TEACHER_COST] + [0.0] * (world_size - 1)
    found = []
    for cost in [SMALLEST_COST] + [1.0] * n_random:
        rank = min(range(world_size), key=lambda r: (load[r], r))
        found.append(rank)
        load[rank] += cost
    return found


def processes_for(requested: int | None, n_random: int, device: torch.device, threads: int
                  ) -> int:
    """How many processes train a supernet: ``requested`` (``supernet.processes``), or by
    default one per intra-op thread on a CPU (at most one per subnet of a step); one on a GPU,
    off Linux (no fork) or without random subnets."""
    if device.type != "cpu" or not sys.platform.startswith("linux") or n_random < 1:
        return 1
    most = n_random + 2  # the teacher's rank and one student each beyond it
    wanted = threads if requested is None else requested
    return max(1, min(wanted, most))


@dataclass
class Split:
    """This process's place among the processes of a subnet-parallel training."""
    rank: int
    world_size: int
    group: torch.distributed.ProcessGroup
    owner: Sequence[int]  # of each student (:func:`owners`)
    #: torch's threads before the fork: rank 0 may use them while the others wait (warmup)
    threads: int = 1
    _sending: list = field(default_factory=list)  # rank 0's broadcasts under way

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owns(self, student: int) -> bool:
        """Whether this rank computes student ``student`` (0: the smallest, then the random)."""
        return self.owner[student] == self.rank

    def teacher(self, outputs: Tensor | None, like: Tensor) -> Tensor:
        """Rank 0's teacher ``outputs`` (detached) on every rank; ``like`` gives the shape and
        type on the others (one of their students' outputs). Rank 0 does not wait for the
        others to receive them (they still compute their students): :meth:`reduce` does."""
        if self.is_main:
            box = outputs.detach().clone()
            self._sending.append(self.group.broadcast(box, 0))
            return box
        box = torch.empty_like(like.detach())
        self.group.broadcast(box, 0).wait()
        return box

    def reduce(self, loss: Tensor, params: Sequence[nn.Parameter]) -> Tensor:
        """After each rank's backward pass: every parameter's gradient becomes the sum of all
        ranks' (None where no rank computed one), and the sum of the losses is returned."""
        while self._sending:
            self._sending.pop().wait()
        dtype = params[0].dtype if params else loss.dtype
        have = [p.grad is not None for p in params]
        parts = [loss.detach().reshape(1).to(dtype), torch.tensor(have, dtype=dtype)]
        parts += [p.grad.reshape(-1).to(dtype) if p.grad is not None
                  else torch.zeros(p.numel(), dtype=dtype) for p in params]
        flat = torch.cat(parts)
        self.group.allreduce([flat]).wait()
        at = 1 + len(params)
        for p, anyone in zip(params, flat[1:at].tolist()):
            n = p.numel()
            if anyone > 0:
                grad = flat[at:at + n].view_as(p).to(p.dtype)
                if p.grad is None:
                    p.grad = grad.clone()
                else:
                    p.grad.copy_(grad)
            at += n
        return flat[0]


def _die_with_parent() -> None:
    """Ask Linux to kill this process when its parent dies (``PR_SET_PDEATHSIG``)."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _error_line(exc: BaseException) -> str:
    if isinstance(exc, NasoptError):
        return str(exc)
    last = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
    where = f" (at {os.path.basename(last[0].filename)}:{last[0].lineno})" if last else ""
    return f"{type(exc).__name__}: {exc}{where}"


@contextmanager
def forked(world_size: int, n_random: int) -> Iterator[Split | None]:
    """Run the block in ``world_size`` processes: this one (rank 0) and ``world_size - 1``
    forked children, each given its :class:`Split` (None for one process: the block runs here
    alone). Each process computes with one intra-op thread. A child leaves when the block ends:
    it never runs the code after the ``with``, nor exit handlers or finalizers of the parent's
    objects. An error in any process ends them all; a child's is raised here."""
    if world_size <= 1:
        yield None
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    folder = tempfile.mkdtemp(prefix="nasopt-split-")
    store = os.path.join(folder, "store")
    children: dict[int, int] = {}  # pid -> read end of its error pipe
    rank, report = 0, -1
    for r in range(1, world_size):
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read)
            for other in children.values():
                os.close(other)
            rank, report = r, write
            children = {}
            break
        os.close(write)
        children[pid] = read
    owner = owners(n_random, world_size)
    if rank:  # a child: the block, then leave
        _die_with_parent()
        code = 0
        try:
            group = torch.distributed.ProcessGroupGloo(
                torch.distributed.FileStore(store, world_size), rank, world_size, TIMEOUT)
            yield Split(rank, world_size, group, owner, threads)
        except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises it
            code = 1
            line = INTERRUPTED if isinstance(exc, KeyboardInterrupt) else _error_line(exc)
            os.write(report, line.encode()[:4000])
        finally:
            os._exit(code)
    try:
        group = torch.distributed.ProcessGroupGloo(
            torch.distributed.FileStore(store, world_size), 0, world_size, TIMEOUT)
        try:
            yield Split(0, world_size, group, owner, threads)
        except BaseException as exc:
            failure = _end(children, kill=True)
            if failure == INTERRUPTED and not isinstance(exc, KeyboardInterrupt):
                raise KeyboardInterrupt from None  # Ctrl-C reached a child first
            if failure and not isinstance(exc, KeyboardInterrupt):
                raise NasoptError(f"a supernet training process failed: {failure}") from None
            raise
        failure = _end(children, kill=False)
        if failure == INTERRUPTED:
            raise KeyboardInterrupt
        if failure:
            raise NasoptError(f"a supernet training process failed: {failure}")
    finally:
        _end(children, kill=True)
        torch.set_num_threads(threads)
        for path in (store, folder):
            try:
                os.unlink(path) if path == store else os.rmdir(path)
            except OSError:
                pass


def _end(children: dict[int, int], kill: bool) -> str | None:
    """Wait for the children (killing them first with ``kill``) and forget them; the first
    failure a child reported (one line, or :data:`INTERRUPTED`), or None when all ended well."""
    failure = None
    for pid, read in list(children.items()):
        if kill:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _, status = os.waitpid(pid, 0)
        with os.fdopen(read, "rb") as pipe:
            message = pipe.read().decode(errors="replace").strip()
        del children[pid]
        code = os.waitstatus_to_exitcode(status)
        if failure is None and (message or (code != 0 and not kill)):
            failure = message or f"it ended with code {code}"
    return failure
