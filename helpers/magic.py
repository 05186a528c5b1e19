"""`%%distributed` — run a notebook cell's code on every rank of a real job.

    %load_ext helpers.magic

    %%distributed -n 4
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    print(t)

Inside the cell `rank`, `world_size`, `torch` and `dist` are defined, and every name of the notebook is
visible (the ranks are forked from the kernel). Options: -n/--world-size, --timeout, --backend.
Names the cell assigns stay on the ranks; return values come back through `launch`, not the magic.
"""
import argparse
import shlex

import torch
import torch.distributed as dist

from helpers.launch import launch


def run_cell(code: str, world_size: int, namespace: dict, timeout=None, backend=None):
    """Execute `code` on `world_size` ranks, each in a copy of `namespace`."""
    compiled = compile(code, "<%%distributed cell>", "exec")

    def cell(rank, world_size):
        ns = dict(namespace, rank=rank, world_size=world_size, torch=torch, dist=dist)
        exec(compiled, ns)

    launch(cell, world_size, timeout=timeout, backend=backend)


def _parse(line: str):
    parser = argparse.ArgumentParser(prog="%%distributed", add_help=False)
    parser.add_argument("-n", "--world-size", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=None)
    parser.add_argument("--backend", default=None)
    return parser.parse_args(shlex.split(line))


def load_ipython_extension(ipython):
    def distributed(line, cell):
        args = _parse(line)
        run_cell(cell, args.world_size, ipython.user_ns, args.timeout, args.backend)

    ipython.register_magic_function(distributed, magic_kind="cell", magic_name="distributed")
