"""Wrong answers to chapter 4's exercises, planted to prove that the graders catch them, and valid
alternatives that the graders must accept. Not graded themselves: tests/graders/test_ch04_data_parallel.py runs its
grading checks on each of them (test_planted_mistakes_are_caught, test_valid_alternatives_pass).

Each wrong variant computes plausible numbers the wrong way; its docstring says what is wrong.
"""
import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d

from helpers.course.partition import shard_indices


# ----------------------------------------------------------------------------------- 4.1 gather_in_order

def _pad(local_outputs, local_indices, longest):
    feature = tuple(local_outputs.shape[1:])
    rows = local_outputs.new_zeros((longest, *feature))
    rows[: local_outputs.shape[0]] = local_outputs
    idx = torch.full((longest,), -1, dtype=torch.int64)
    idx[: local_indices.shape[0]] = local_indices.to(torch.int64)
    return rows, idx


def _longest(local_outputs, group):
    count = torch.tensor([local_outputs.shape[0]], dtype=torch.int64)
    dist.all_reduce(count, op=dist.ReduceOp.MAX, group=group)
    return max(int(count.item()), 1)


def _place(rows_per_rank, idx_per_rank, num_items, like, check_missing=True):
    out = like.new_zeros((num_items, *like.shape[1:]))
    seen = torch.zeros(num_items, dtype=torch.bool)
    for r, i in zip(rows_per_rank, idx_per_rank):
        keep = i >= 0
        out[i[keep]] = r[keep]
        seen[i[keep]] = True
    if check_missing and not bool(seen.all()):
        raise ValueError(f"requests {(~seen).nonzero().flatten().tolist()} were answered by no rank")
    return out


def _gather_to(dst, local_outputs, local_indices, group):
    longest = _longest(local_outputs, group)
    rows, idx = _pad(local_outputs, local_indices, longest)
    world = dist.get_world_size(group)
    is_dst = dist.get_rank() == dst
    all_rows = [torch.empty_like(rows) for _ in range(world)] if is_dst else None
    all_idx = [torch.empty_like(idx) for _ in range(world)] if is_dst else None
    dist.gather(rows, all_rows, dst=dst, group=group)
    dist.gather(idx, all_idx, dst=dst, group=group)
    return is_dst, all_rows, all_idx


def gather_concat_in_rank_order(local_outputs, local_indices, num_items, dst=0, group=None):
    """WRONG: gathers the rows but ignores the indices: rank 0's rows, then rank 1's, ... (right only for a
    contiguous split; a strided DistributedSampler split comes back out of order)."""
    is_dst, rows, idx = _gather_to(dst, local_outputs, local_indices, group)
    if not is_dst:
        return None
    return torch.cat([r[i >= 0] for r, i in zip(rows, idx)])[:num_items]


def gather_keeps_duplicates(local_outputs, local_indices, num_items, dst=0, group=None):
    """WRONG: keeps every row it receives, so the sampler's padded duplicates come back as extra rows."""
    is_dst, rows, idx = _gather_to(dst, local_outputs, local_indices, group)
    if not is_dst:
        return None
    keep = torch.cat(idx)
    order = torch.argsort(keep[keep >= 0], stable=True)
    return torch.cat([r[i >= 0] for r, i in zip(rows, idx)])[order]


def gather_everything_everywhere(local_outputs, local_indices, num_items, dst=0, group=None):
    """WRONG mechanism, right numbers: all_gather ships every rank's results to every rank; only dst keeps
    them. The other ranks receive (world-1)/world of all the results for nothing."""
    longest = _longest(local_outputs, group)
    rows, idx = _pad(local_outputs, local_indices, longest)
    world = dist.get_world_size(group)
    all_rows = [torch.empty_like(rows) for _ in range(world)]
    all_idx = [torch.empty_like(idx) for _ in range(world)]
    dist.all_gather(all_rows, rows, group=group)
    dist.all_gather(all_idx, idx, group=group)
    out = _place(all_rows, all_idx, num_items, local_outputs)
    return out if dist.get_rank() == dst else None


def gather_result_on_every_rank(local_outputs, local_indices, num_items, dst=0, group=None):
    """WRONG: every rank returns the full result (the contract: dst returns it, the others None)."""
    longest = _longest(local_outputs, group)
    rows, idx = _pad(local_outputs, local_indices, longest)
    world = dist.get_world_size(group)
    all_rows = [torch.empty_like(rows) for _ in range(world)]
    all_idx = [torch.empty_like(idx) for _ in range(world)]
    dist.all_gather(all_rows, rows, group=group)
    dist.all_gather(all_idx, idx, group=group)
    return _place(all_rows, all_idx, num_items, local_outputs)


def gather_ignores_dst(local_outputs, local_indices, num_items, dst=0, group=None):
    """WRONG: always gathers on rank 0, whatever `dst` says."""
    is_dst, rows, idx = _gather_to(0, local_outputs, local_indices, group)
    return _place(rows, idx, num_items, local_outputs) if is_dst else None


def gather_without_missing_check(local_outputs, local_indices, num_items, dst=0, group=None):
    """WRONG: a request answered by no rank silently comes back as a row of zeros (the docstring promises a
    ValueError naming it)."""
    is_dst, rows, idx = _gather_to(dst, local_outputs, local_indices, group)
    return _place(rows, idx, num_items, local_outputs, check_missing=False) if is_dst else None


def gather_sized_by_world(local_outputs, local_indices, num_items, dst=0, group=None):
    """WRONG: pads and counts over the whole world (dist.get_world_size() without `group`): inside a group
    smaller than the world the gather gets the wrong number of buffers."""
    count = torch.tensor([local_outputs.shape[0]], dtype=torch.int64)
    dist.all_reduce(count, op=dist.ReduceOp.MAX, group=group)
    rows, idx = _pad(local_outputs, local_indices, max(int(count.item()), 1))
    world = dist.get_world_size()
    is_dst = dist.get_rank() == dst
    all_rows = [torch.empty_like(rows) for _ in range(world)] if is_dst else None
    all_idx = [torch.empty_like(idx) for _ in range(world)] if is_dst else None
    dist.gather(rows, all_rows, dst=dst, group=group)
    dist.gather(idx, all_idx, dst=dst, group=group)
    return _place(all_rows, all_idx, num_items, local_outputs) if is_dst else None


def gather_counts_over_world(local_outputs, local_indices, num_items, dst=0, group=None):
    """WRONG: the padding length is agreed over the whole world (all_reduce without `group`): it happens to
    work here, but it is a collective outside the group (and it would hang if the other groups did not
    make the same call)."""
    count = torch.tensor([local_outputs.shape[0]], dtype=torch.int64)
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    rows, idx = _pad(local_outputs, local_indices, max(int(count.item()), 1))
    world = dist.get_world_size(group)
    is_dst = dist.get_rank() == dst
    all_rows = [torch.empty_like(rows) for _ in range(world)] if is_dst else None
    all_idx = [torch.empty_like(idx) for _ in range(world)] if is_dst else None
    dist.gather(rows, all_rows, dst=dst, group=group)
    dist.gather(idx, all_idx, dst=dst, group=group)
    return _place(all_rows, all_idx, num_items, local_outputs) if is_dst else None


# valid alternatives: the grader must accept them

def gather_with_send_recv(local_outputs, local_indices, num_items, dst=0, group=None):
    """VALID: point-to-point instead of dist.gather: every rank sends its count, indices and rows to dst."""
    me = dist.get_rank()
    ranks = dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
    feature = tuple(local_outputs.shape[1:])
    if me != dst:
        dist.send(torch.tensor([local_outputs.shape[0]], dtype=torch.int64), dst=dst, group=group)
        if local_outputs.shape[0]:
            dist.send(local_indices.to(torch.int64).contiguous(), dst=dst, group=group)
            dist.send(local_outputs.contiguous(), dst=dst, group=group)
        return None
    rows, idx = [local_outputs], [local_indices.to(torch.int64)]
    for src in ranks:
        if src == dst:
            continue
        n = torch.zeros(1, dtype=torch.int64)
        dist.recv(n, src=src, group=group)
        if int(n):
            i = torch.empty(int(n), dtype=torch.int64)
            r = local_outputs.new_empty((int(n), *feature))
            dist.recv(i, src=src, group=group)
            dist.recv(r, src=src, group=group)
            rows.append(r)
            idx.append(i)
    return _place(rows, idx, num_items, local_outputs)


def gather_packed_rows(local_outputs, local_indices, num_items, dst=0, group=None):
    """VALID: all_gather the counts (a few bytes), then one dist.gather of [index | row] packed in float64."""
    world = dist.get_world_size(group)
    counts = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([local_outputs.shape[0]], dtype=torch.int64), group=group)
    longest = max(max(int(c) for c in counts), 1)
    flat = local_outputs.reshape(local_outputs.shape[0], -1).double()
    packed = torch.full((longest, 1 + flat.shape[1]), -1.0, dtype=torch.float64)
    packed[: flat.shape[0], 0] = local_indices.double()
    packed[: flat.shape[0], 1:] = flat
    is_dst = dist.get_rank() == dst
    parts = [torch.empty_like(packed) for _ in range(world)] if is_dst else None
    dist.gather(packed, parts, dst=dst, group=group)
    if not is_dst:
        return None
    rows = [p[:, 1:].to(local_outputs.dtype).reshape(longest, *local_outputs.shape[1:]) for p in parts]
    return _place(rows, [p[:, 0].long() for p in parts], num_items, local_outputs)


# -------------------------------------------------------------------------------- 4.2 dynamic_work_queue

def queue_round_robin_in_disguise(num_tasks, run_task, key="work_queue"):
    """WRONG: touches the store (so it looks dynamic) but serves the round-robin share decided up front."""
    distributed_c10d._get_default_store().add(key, 1)
    rank, world = dist.get_rank(), dist.get_world_size()
    done = [(t, run_task(t)) for t in range(rank, num_tasks, world)]
    dist.barrier()
    return done


def queue_contiguous_blocks(num_tasks, run_task, key="work_queue"):
    """WRONG: a static contiguous split (balanced on average, but decided before anyone is busy)."""
    done = [(t, run_task(t)) for t in shard_indices(num_tasks, dist.get_rank(), dist.get_world_size())]
    dist.barrier()
    return done


def queue_counts_but_runs_own_share(num_tasks, run_task, key="work_queue"):
    """WRONG: one store.add per task, but the task it runs is computed from the rank (rank + i·world), not
    taken from the counter: a round-robin split decided in advance."""
    store, done = distributed_c10d._get_default_store(), []
    rank, world = dist.get_rank(), dist.get_world_size()
    for task in range(rank, num_tasks, world):
        store.add(key, 1)
        done.append((task, run_task(task)))
    dist.barrier()
    return done


def queue_claims_two_at_a_time(num_tasks, run_task, key="work_queue"):
    """WRONG: claims two tasks per store round trip; the second waits behind the first on a busy rank while
    another rank sits idle."""
    store, done = distributed_c10d._get_default_store(), []
    while True:
        first = store.add(key, 2) - 2
        if first >= num_tasks:
            break
        for t in (first, first + 1):
            if t < num_tasks:
                done.append((t, run_task(t)))
    dist.barrier()
    return done


def queue_get_then_set(num_tasks, run_task, key="work_queue"):
    """WRONG: reads the counter, then writes counter + 1: not atomic, two ranks can read the same value and
    run the same task (it works only when the timing happens to be kind)."""
    store, done = distributed_c10d._get_default_store(), []
    while True:
        task = store.add(key, 0)            # read (creates the key at 0)
        store.set(key, str(task + 1))
        if task >= num_tasks:
            break
        done.append((task, run_task(task)))
    dist.barrier()
    return done


def queue_without_barrier(num_tasks, run_task, key="work_queue"):
    """WRONG: returns as soon as the queue is empty; a rank that hosts the store can leave while others still
    ask it for work."""
    store, done = distributed_c10d._get_default_store(), []
    while (task := store.add(key, 1) - 1) < num_tasks:
        done.append((task, run_task(task)))
    return done


def queue_skips_last_task(num_tasks, run_task, key="work_queue"):
    """WRONG: off by one: stops at num_tasks - 1, so the last request is never served."""
    store, done = distributed_c10d._get_default_store(), []
    while (task := store.add(key, 1) - 1) < num_tasks - 1:
        done.append((task, run_task(task)))
    dist.barrier()
    return done


def queue_returns_sorted(num_tasks, run_task, key="work_queue"):
    """WRONG: returns the pairs sorted by task id, not in the order this rank ran them."""
    store, done = distributed_c10d._get_default_store(), []
    while (task := store.add(key, 1) - 1) < num_tasks:
        done.append((task, run_task(task)))
    dist.barrier()
    return sorted(done, key=lambda pair: -pair[0])


# valid alternative

def queue_counting_from_one(num_tasks, run_task, key="work_queue"):
    """VALID: starts together (a barrier), its own key under `key`, counts 1..num_tasks, ends with an
    all_reduce instead of a barrier."""
    store, done = distributed_c10d._get_default_store(), []
    dist.barrier()
    while True:
        ticket = store.add(f"{key}/next", 1)         # 1, 2, 3, ... across all ranks
        if ticket > num_tasks:
            break
        done.append((ticket - 1, run_task(ticket - 1)))
    dist.all_reduce(torch.zeros(1))                  # any collective on every rank keeps the store up
    return done


# name -> (function, a fragment the grader's failure message must contain)
WRONG_GATHERS = {
    "concat_in_rank_order": (gather_concat_in_rank_order, "out of order"),
    "keeps_duplicates": (gather_keeps_duplicates, "duplicates"),
    "everything_everywhere": (gather_everything_everywhere, "received"),
    "result_on_every_rank": (gather_result_on_every_rank, "should return None"),
    "ignores_dst": (gather_ignores_dst, "dst=2"),
    "no_missing_check": (gather_without_missing_check, "ValueError"),
    "sized_by_world": (gather_sized_by_world, "group"),
    "counts_over_world": (gather_counts_over_world, "outside its group"),
}
VALID_GATHERS = {"send_recv": gather_with_send_recv, "packed_rows": gather_packed_rows}

WRONG_QUEUES = {
    "round_robin_in_disguise": (queue_round_robin_in_disguise, "claimed"),
    "contiguous_blocks": (queue_contiguous_blocks, "claimed"),
    "counts_but_runs_own_share": (queue_counts_but_runs_own_share, "decided in advance"),
    "claims_two_at_a_time": (queue_claims_two_at_a_time, "claimed"),
    "get_then_set": (queue_get_then_set, "atomic"),
    "without_barrier": (queue_without_barrier, "barrier"),
    "skips_last_task": (queue_skips_last_task, "exactly once"),
    "returns_sorted": (queue_returns_sorted, "order"),
}
VALID_QUEUES = {"counting_from_one": queue_counting_from_one}
