"""Chapter 4 — data-parallel inference: shard the requests, run one replica per rank, gather in order.

Exercise 4.1 is `gather_in_order`. `shard_indices` is given: it is the contiguous split every data-parallel
server starts from (torch's DistributedSampler uses a strided split instead; both work with the gather).
"""
import torch
import torch.distributed as dist

from helpers.course.partition import shard_indices  # given: the contiguous block of requests each rank serves


def gather_in_order(local_outputs: torch.Tensor, local_indices: torch.Tensor, num_items: int,
                    dst: int = 0, group=None) -> torch.Tensor | None:
    """Exercise 4.1 — collect every rank's results on rank `dst`, each row at its request's original index.

    local_outputs: [n_local, *feature] — this rank's results (n_local may differ between ranks, may be 0)
    local_indices: [n_local] int64 — the request index each row answers (duplicates allowed: a padded
                   DistributedSampler hands some requests to two ranks; any copy may be kept)
    num_items:     the size of the whole request set.
    dst:           the global rank that receives the results (a member of `group`, as in dist.gather).
    group:         the process group to gather over (default: the whole world); every collective runs in it.
    Returns on `dst` a tensor [num_items, *feature] with row i = the result for request i; None elsewhere.
    Raises ValueError on `dst`, naming the missing indices, if some request index was answered by no rank.
    Only `dst` receives other ranks' results: use dist.gather (or send/recv to `dst`), not all_gather, which
    ships every rank's results to every rank for one rank to keep (the grader counts the bytes each rank
    receives; a few bytes of counts or indices are fine).

    dist.gather needs the same shape on every rank: pad each shard to the largest, send the indices
    alongside (padding rows marked -1), and scatter the rows into place on `dst`.
    """
    raise NotImplementedError("Exercise 4.1: gather_in_order is not written yet (labs/data_parallel.py)")
