"""Subnet-parallel supernet training (nasopt.supernet.split): forked processes sharing each
sandwich step's subnets train the supernet one process trains, and a failure anywhere is one
error in the parent."""
from __future__ import annotations

import dataclasses
import os
import random
import sys
import time

import pytest
import torch

from nasopt import api
from nasopt.core.config import SupernetConfig
from nasopt.core.errors import NasoptError
from nasopt.supernet import split
from nasopt.supernet.elastic import (sandwich_loss, supernet_key, train_supernet,
                                     training_compression)

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="forks (Linux)")


@pytest.mark.parametrize("n_random", range(1, 7))
def test_every_rank_has_students_and_rank_0_the_teacher(n_random):
    for world in range(2, n_random + 3):
        owner = split.owners(n_random, world)
        assert len(owner) == n_random + 1
        assert set(owner) >= set(range(1, world))  # every other rank gets a student
    # two ranks, four random subnets: rank 0 takes the teacher and one random subnet
    assert split.owners(4, 2) == [1, 1, 1, 0, 1]


def test_process_count_by_default_one_per_thread_on_a_cpu():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    expected = 2 if sys.platform.startswith("linux") else 1
    assert split.processes_for(None, 4, cpu, 2) == expected
    assert split.processes_for(None, 4, cpu, 16) == (6 if expected == 2 else 1)  # n_random + 2
    assert split.processes_for(1, 4, cpu, 16) == 1
    assert split.processes_for(3, 4, cpu, 1) == (3 if expected == 2 else 1)
    assert split.processes_for(None, 4, cuda, 8) == 1
    assert split.processes_for(None, 0, cpu, 8) == 1  # no random subnets: nothing to share
    with pytest.raises(NasoptError, match="supernet.processes"):
        SupernetConfig(processes=0)


def test_processes_are_not_part_of_the_checkpoint_key(datasets):
    data = datasets["digits"]
    space = api.make_space("mobilenet", data)
    n = len(data.x_train)
    keys = {supernet_key(space, data.fingerprint, SupernetConfig(processes=p), n)
            for p in (None, 1, 2)}
    assert len(keys) == 1


@linux
def test_gradients_and_losses_sum_over_processes_and_weights_stay_equal():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    params = list(model.parameters())
    opt = torch.optim.Adam(params, lr=0.1)
    x = torch.randn(8, 4)
    with split.forked(2, 1) as share:
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            # rank 0 trains both layers, rank 1 only the first: the second's gradient is rank 0's
            out = model(x) if share.rank == 0 else model[0](x)
            loss = out.pow(2).mean() * (share.rank + 1)
            loss.backward()
            mine = torch.cat([loss.detach().reshape(1)] + [
                (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                for p in params])
            rank0 = share.teacher(mine if share.is_main else None, mine)
            total = share.reduce(loss, params)
            summed = torch.cat([total.reshape(1)] + [p.grad.reshape(-1) for p in params])
            if not share.is_main:  # rank 1 knows both parts: the sums are theirs
                torch.testing.assert_close(summed, mine + rank0)
            opt.step()
        state = torch.cat([p.detach().reshape(-1) for p in params])
        theirs = share.teacher(state if share.is_main else None, state)
        if not torch.equal(state, theirs):
            raise AssertionError("the processes' weights differ")
    assert model[1].weight.grad is not None


@linux
def test_a_failing_child_is_one_error_in_the_parent():
    start = time.monotonic()
    with pytest.raises(NasoptError, match="a supernet training process failed: ValueError: "
                                          "bad batch"):
        with split.forked(2, 1) as share:
            if share.rank == 1:
                raise ValueError("bad batch")
            share.group.allreduce([torch.zeros(3)]).wait()  # the peer is gone: this fails
    assert time.monotonic() - start < 60


@linux
def test_a_failing_parent_ends_its_children(tmp_path):
    with pytest.raises(KeyError):
        with split.forked(3, 2) as share:
            if not share.is_main:
                (tmp_path / f"{share.rank}.pid").write_text(str(os.getpid()))
                share.group.allreduce([torch.zeros(3)]).wait()  # never answered: killed
            deadline = time.monotonic() + 30
            while len(list(tmp_path.glob("*.pid"))) < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            raise KeyError("stop")
    pids = [int(f.read_text()) for f in tmp_path.glob("*.pid")]
    assert len(pids) == 2
    for pid in pids:  # killed and reaped: not even a zombie is left
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def _small(datasets, n):
    full = datasets["digits"]
    data = dataclasses.replace(full, x_train=full.x_train[:n], y_train=full.y_train[:n])
    space = api.make_space("mobilenet", data, {"stem.width": [8], "s1.expand": [2],
                                               "s2.expand": [2], "s3.expand": [2]})
    return data, space


@linux
@pytest.mark.parametrize("world", [2, 3])
def test_a_shared_step_computes_the_one_process_loss_and_gradients(datasets, world):
    data, full_space = _small(datasets, 128)
    torch.manual_seed(0)
    # float64, so that rounding (the compressed forward's quantizers compute in float32; a
    # thread count changes summation orders) stays far below a missing or doubled subnet
    supernet = full_space.supernet().double().train()
    params = list(supernet.parameters())
    genes = training_compression(full_space, SupernetConfig())
    x, y = data.x_train.double(), data.y_train

    def step(share):
        for p in params:
            p.grad = None
        loss = sandwich_loss(supernet, random.Random(5), 3, 1.0, None, genes,
                             full_space.group_of, 0.5, share)(x, y)
        loss.backward()
        return loss.detach() if share is None else share.reduce(loss, params)

    expected = step(None)
    expected_grads = [None if p.grad is None else p.grad.clone() for p in params]
    with split.forked(world, 3) as share:
        total = step(share)
        torch.testing.assert_close(total, expected, rtol=1e-8, atol=1e-10)
        for p, g in zip(params, expected_grads):
            assert (p.grad is None) == (g is None)
            if g is not None:
                torch.testing.assert_close(p.grad, g, rtol=1e-6, atol=1e-8)


@linux
def test_two_processes_train_a_supernet_under_the_same_key(datasets, tmp_path):
    data, space = _small(datasets, None)
    cfg = SupernetConfig(epochs=8, warmup_epochs=2, n_random=2, batch_size=64)
    logs: list[str] = []
    untrained = space.supernet().eval()
    alone, path1 = train_supernet(space, data, dataclasses.replace(cfg, processes=1),
                                  tmp_path / "one", show_progress=False)
    shared, path2 = train_supernet(space, data, dataclasses.replace(cfg, processes=2),
                                   tmp_path / "two", show_progress=False, log=logs.append)
    assert path1.name == path2.name
    assert any("on 2 processes" in line for line in logs)
    from nasopt.search.evaluate import Evaluator
    arch_space = space.architecture_space()
    scores = {name: Evaluator(arch_space, net, data) for name, net in
              (("untrained", untrained), ("one", alone), ("two", shared))}
    for arch in (arch_space.largest(), arch_space.smallest()):
        acc = {name: ev(arch).accuracy for name, ev in scores.items()}
        # equal steps (the test above), but not equal weights: rounding differences of a
        # short training grow (Adam's first steps, ties among sorted channels)
        assert min(acc["one"], acc["two"]) > acc["untrained"] + 0.3, acc


@linux
def test_ctrl_c_in_a_child_is_an_interrupt_in_the_parent():
    with pytest.raises(KeyboardInterrupt):
        with split.forked(2, 1) as share:
            if share.rank == 1:
                raise KeyboardInterrupt
            share.group.allreduce([torch.zeros(3)]).wait()
