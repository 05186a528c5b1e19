"""Run a course worker function under torchrun — the same function launch() runs in a notebook.

    torchrun --nproc_per_node 4 -m helpers.run helpers.examples:all_reduce_demo
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \\
        -m helpers.run solutions.ring_collectives:ring_all_reduce_demo --kwargs '{"numel": 1000}'

torchrun starts the processes and sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT; this module joins
the process group (NCCL when this node has a GPU per local rank, else gloo), calls
`fn(rank, world_size, **kwargs)` and prints what it returns. Multi-node is torchrun's job, not ours.
"""
import argparse
import datetime
import importlib
import json
import os
import sys

import torch
import torch.distributed as dist

from helpers.launch import default_timeout, init_rank


def resolve(target: str):
    """'package.module:function' -> the function."""
    module_name, sep, attr = target.partition(":")
    if not sep or not attr:
        raise SystemExit(f"expected MODULE:FUNCTION (e.g. helpers.examples:all_reduce_demo), got {target!r}")
    fn = importlib.import_module(module_name)
    for part in attr.split("."):
        fn = getattr(fn, part)
    return fn


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m helpers.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", help="MODULE:FUNCTION taking (rank, world_size, **kwargs)")
    parser.add_argument("--kwargs", default="{}", help="JSON object of keyword arguments for the function")
    parser.add_argument("--backend", choices=["gloo", "nccl"], default=None)
    parser.add_argument("--timeout", type=float, default=None,
                        help="collective timeout, seconds (default: COURSE_TIMEOUT, else 60)")
    args = parser.parse_args(argv)
    if "RANK" not in os.environ:
        raise SystemExit("helpers.run is started by torchrun, e.g. "
                         "`torchrun --nproc_per_node 4 -m helpers.run MODULE:FUNCTION`; "
                         "in a notebook use helpers.launch(fn, world_size) instead")
    fn = resolve(args.target)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank, local_size = int(os.environ["LOCAL_RANK"]), int(os.environ["LOCAL_WORLD_SIZE"])
    backend = args.backend or ("nccl" if torch.cuda.is_available()
                               and torch.cuda.device_count() >= local_size else "gloo")
    init_rank(backend, local_rank, local_size)
    timeout = default_timeout() if args.timeout is None else args.timeout
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    try:
        result = fn(rank, world_size, **json.loads(args.kwargs))
        if result is not None:
            # One write per line: the ranks share torchrun's stdout pipe, and print() writes the text and
            # its newline separately, so another rank's line could land in between.
            sys.stdout.write(f"[rank {rank}] returned {result!r}\n")
            sys.stdout.flush()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
