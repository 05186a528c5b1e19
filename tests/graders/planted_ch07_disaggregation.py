"""Wrong answers to chapter 7's exercise 7.5, planted in the reference solution, for
tests/graders/test_ch07_disaggregation.py::test_planted_mistakes_are_caught.

Each variant is a realistic mistake; several still deliver correct-looking data (every block of the pool
includes the right ones; a sorted table holds the right blocks; writing into blocks 0..n-1 gives the right
K/V at the right positions of the wrong blocks), so only a grader that checks what was sent to whom and
which blocks each rank holds catches them. `build(name)` returns an implementation object
(`.disaggregation`) that the graders' check functions accept in place of load_impl("disaggregation").
"""
from __future__ import annotations

import types
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Variant:
    check: str          # "send" (3-rank job) or "recv" (2-rank job)
    what: str
    points_at: tuple    # the first failure message must contain one of these


VARIANTS = {
    "send_all_blocks": Variant("send", "every block of the pool sent", ("every block of the pool",)),
    "send_sorted_blocks": Variant("send", "blocks sent sorted by id", ("block-table order",)),
    "send_drops_partial": Variant("send", "the last, partly filled block dropped", ("partly filled block",)),
    "send_no_first_token": Variant("send", "header without the first token", ("first token",)),
    "send_wrong_rank": Variant("send", "every message to rank 1", ("wrong rank", "expected only the decode rank")),
    "send_separate_kv": Variant("send", "K and V of a layer in two messages", ("ONE message per layer",)),
    "recv_prefill_ids": Variant("recv", "writes into blocks 0..n-1, the prefill rank's ids",
                                ("block manager did not",)),
    "recv_no_first_token": Variant("recv", "the first token read but not returned", ("first_token is",)),
}

# Valid answers written differently: the graders must pass them (test_valid_alternatives_pass).
ALTERNATIVES = {
    "isend_then_wait": "every message posted with isend, then all waited for",
    "batch_isend": "the layers' messages in one batch_isend_irecv",
    "irecv_and_indexing": "recv_kv with irecv + wait and pool.k[layer][blocks] = ... instead of index_copy_",
}


def build(name: str | None):
    """The reference implementation with variant `name` planted (None: unmodified)."""
    import solutions.disaggregation as sol
    impl = types.SimpleNamespace(**{k: v for k, v in vars(sol).items() if not k.startswith("__")})
    if name is not None:
        (_PLANT | _ALTERNATIVE)[name](sol, impl)
    return types.SimpleNamespace(disaggregation=impl)


# ------------------------------------------------------------------------------------------- send_kv

def _send(mistake):
    def send_kv(pool, block_table, num_tokens, first_token, dst, group=None):
        needed = -(-num_tokens // pool.block_size)
        if mistake == "drops_partial":
            needed = num_tokens // pool.block_size
        if mistake == "wrong_rank":
            dst = 1
        header = [num_tokens] if mistake == "no_first_token" else [num_tokens, first_token]
        dist.send(torch.tensor(header, dtype=torch.int64), dst=dst, group=group)
        table = list(block_table[:needed])
        if mistake == "all_blocks":
            table = list(range(pool.num_blocks))
        if mistake == "sorted_blocks":
            table = sorted(table)
        blocks = torch.tensor(table, dtype=torch.long)
        for layer in range(pool.num_layers):
            k, v = pool.k[layer][blocks], pool.v[layer][blocks]
            if mistake == "separate_kv":
                dist.send(k.contiguous(), dst=dst, group=group)
                dist.send(v.contiguous(), dst=dst, group=group)
            else:
                dist.send(torch.stack([k, v]), dst=dst, group=group)
    return lambda sol, impl: setattr(impl, "send_kv", send_kv)


# ------------------------------------------------------------------------------------------- recv_kv

def _recv(mistake):
    def plant(sol, impl):
        def recv_kv(pool, block_manager, seq_id, src, group=None):
            header = torch.empty(2, dtype=torch.int64)
            dist.recv(header, src=src, group=group)
            num_tokens, first_token = header.tolist()
            block_manager.allocate(seq_id, num_tokens)
            table = block_manager.block_table(seq_id)
            needed = -(-num_tokens // pool.block_size)
            # a learner who assumed both ranks use the same ids: blocks 0, 1, ... as a fresh prefill rank hands out
            where = list(range(needed)) if mistake == "prefill_ids" else table[:needed]
            blocks = torch.tensor(where, dtype=torch.long)
            for layer in range(pool.num_layers):
                payload = torch.empty(2, needed, pool.block_size, pool.kv_heads, pool.head_dim, dtype=pool.dtype)
                dist.recv(payload, src=src, group=group)
                pool.k[layer][blocks] = payload[0]
                pool.v[layer][blocks] = payload[1]
            if mistake == "no_first_token":      # read, then not handed on: the decode loop has nothing to start from
                first_token = None
            return sol.ReceivedPrefill(seq_id, num_tokens, first_token, list(table))
        impl.recv_kv = recv_kv
    return plant


_PLANT = {
    "send_all_blocks": _send("all_blocks"),
    "send_sorted_blocks": _send("sorted_blocks"),
    "send_drops_partial": _send("drops_partial"),
    "send_no_first_token": _send("no_first_token"),
    "send_wrong_rank": _send("wrong_rank"),
    "send_separate_kv": _send("separate_kv"),
    "recv_prefill_ids": _recv("prefill_ids"),
    "recv_no_first_token": _recv("no_first_token"),
}


# ------------------------------------------------------------------------------------------- valid alternatives

def _isend_then_wait(sol, impl):
    def send_kv(pool, block_table, num_tokens, first_token, dst, group=None):
        needed = -(-num_tokens // pool.block_size)
        blocks = torch.tensor(list(block_table[:needed]))
        messages = [torch.tensor([num_tokens, first_token])] + [
            torch.cat([pool.k[layer][blocks][None], pool.v[layer][blocks][None]]) for layer in range(pool.num_layers)]
        works = [dist.isend(m, dst=dst, group=group) for m in messages]
        for work in works:
            work.wait()
    impl.send_kv = send_kv


def _batch_isend(sol, impl):
    def send_kv(pool, block_table, num_tokens, first_token, dst, group=None):
        needed = -(-num_tokens // pool.block_size)
        dist.send(torch.tensor([num_tokens, first_token], dtype=torch.int64), dst, group)
        blocks = torch.tensor(list(block_table[:needed]))
        ops = [dist.P2POp(dist.isend, torch.stack([pool.k[layer][blocks], pool.v[layer][blocks]]), dst, group)
               for layer in range(pool.num_layers)]
        for work in dist.batch_isend_irecv(ops):
            work.wait()
    impl.send_kv = send_kv


def _irecv_and_indexing(sol, impl):
    def recv_kv(pool, block_manager, seq_id, src, group=None):
        header = torch.zeros(2, dtype=torch.int64)
        dist.irecv(header, src=src, group=group).wait()
        num_tokens, first_token = (int(x) for x in header)
        block_manager.allocate(seq_id, num_tokens)
        table = block_manager.block_table(seq_id)
        blocks = table[:-(-num_tokens // pool.block_size)]
        for layer in range(pool.num_layers):
            payload = torch.zeros(2, len(blocks), pool.block_size, pool.kv_heads, pool.head_dim, dtype=pool.dtype)
            dist.irecv(payload, src=src, group=group).wait()
            for i, block in enumerate(blocks):
                pool.k[layer][block] = payload[0, i]
                pool.v[layer][block] = payload[1, i]
        return sol.ReceivedPrefill(seq_id, num_tokens, first_token, table)
    impl.recv_kv = recv_kv


_ALTERNATIVE = {
    "isend_then_wait": _isend_then_wait,
    "batch_isend": _batch_isend,
    "irecv_and_indexing": _irecv_and_indexing,
}
