"""`nasopt train-supernet`: train (or resume) a search's supernet alone, on one process or on
several under torchrun (:mod:`nasopt.supernet.distributed`); `nasopt search` with the same settings then
reuses the checkpoint."""
from __future__ import annotations

import argparse
import json
import os
import sys

from nasopt.core.errors import NasoptError


def add_parser(sub) -> None:  # noqa: ANN001
    p = sub.add_parser(
        "train-supernet", help="train a search's supernet (torchrun: data-parallel)",
        description="Train (or resume, or reuse) the supernet that `nasopt search` with the same "
        "--config/--set/--space/--dataset/--restrict would train. Under `torchrun "
        "--nproc_per_node N -m nasopt.cli train-supernet ...` the N processes train "
        "data-parallel (gloo on CPU, nccl on CUDA); rank 0 writes the checkpoint.")
    p.add_argument("--config", help="TOML config file")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--space")
    p.add_argument("--dataset")
    p.add_argument("--restrict", action="append", default=[], metavar="GENE=OPT[,OPT...]")
    p.add_argument("--run-dir")
    p.add_argument("--device", help="auto (default), cpu or cuda")
    p.add_argument("--quiet", action="store_true")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from nasopt import api
    from nasopt.supernet import distributed
    from nasopt.core.space import parse_restrictions
    from nasopt.supernet.elastic import train_supernet
    overrides = list(args.set)
    for flag, key in (("space", "search.space"), ("dataset", "data.dataset"),
                      ("device", "device"), ("run_dir", "run_dir")):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={json.dumps(value, ensure_ascii=False)}")
    from nasopt.pipeline import load_search_config
    cfg, _ = load_search_config(args.config, overrides)  # a `nasopt run` config works too
    restrict = {**cfg.search.restrict,
                **{k: tuple(v) for k, v in parse_restrictions(args.restrict).items()}}
    if cfg.search.table is not None:
        raise NasoptError("tabular mode (search.table) has no supernet to train")
    device = distributed.device_for(api.resolve_device(cfg.device))
    group = distributed.from_environment(device)
    main = group is None or group.is_main
    log = (lambda s: None) if args.quiet or not main else (lambda s: print(s, file=sys.stderr))
    data = api.load_data(cfg)
    space = api.make_space(cfg.search.space, data, restrict)
    if group is not None:
        log(f"data-parallel training on {group.world_size} processes "
            f"({'nccl' if device.type == 'cuda' else 'gloo'}), "
            f"{len(data.x_train) // group.world_size} training samples each")
    try:
        supernet, path = train_supernet(space, data.to(device), cfg.supernet,
                                        Path(cfg.run_dir) / "supernets", device=device,
                                        show_progress=not args.quiet, log=log, group=group)
    except BaseException:
        distributed.leave(group)
        raise
    rank = "" if group is None else f"rank {group.rank}/{group.world_size}: "
    line = f"{rank}supernet {path} weights sha256 {distributed.state_hash(supernet.net.state_dict())}\n"
    # one write of the whole line: under torchrun every rank shares this stdout, and print()'s
    # separate text and newline writes can interleave with another rank's line
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), line.encode())
    if group is not None:
        # Every rank holds its weights and rank 0 has written the checkpoint; once all are
        # here, each ends at once. Tearing the gloo group down in the interpreter's own exit
        # can abort a rank (SIGABRT from the group's native threads, now and then), which
        # torchrun reports as a failed run.
        distributed.barrier(group)
        sys.stderr.flush()
        os._exit(0)
    return 0
