"""Graders for chapter 7, exercise 7.5 (labs/disaggregation.py): send_kv / recv_kv, a finished prefill's KV blocks
and first token handed from a prefill rank to a decode rank.

Each check runs inside the ranks of a real job; tests/graders/planted_ch07_disaggregation.py runs the same
checks on wrong answers planted in the reference (`test_planted_mistakes_are_caught`, no exercise marker).
Every rank builds the same pools from fixed seeds, so each rank knows what it must send or find.

What the graders check:
  send_kv  (3 ranks: rank 0 sends, the decode rank is dst, the third rank stands by) WHAT WAS SENT TO WHOM:
           rank 0's CommTracer sees only point-to-point sends, all to dst, 1 + layers messages, bytes = the
           header + exactly the sequence's ceil(n / block_size) blocks per layer (never the pool, never a block
           of the table beyond them); the grader's receivers (each learner message is announced to its
           receiver on a separate tag, so a message to the wrong rank is received there and reported, not
           left hanging) compare every byte: header [num_tokens, first_token], then per layer
           stack(K, V) of the blocks in block-table order; the bystander receives nothing.
  recv_kv  (2 ranks: the grader's reference sender, the learner's receiver) WHICH BLOCKS ARE HELD BY WHOM: one
           allocate(seq_id, num_tokens) on the decode rank's own block manager (whose free list is not in id
           order and whose low ids are held by other sequences), the returned table is that manager's, the
           K/V of every position < num_tokens are in those blocks, no other block of the pool changed, the
           first token returned, only receives from src.
  end to end (3 ranks, the real tiny Llama) the learner's send_kv and recv_kv together: the prefill rank's
           prefill (transformers) written into its pool, sent; the decode ranks continue greedy decoding from
           their own pools: the same tokens as helpers.course.tiny_llama.generate; bytes per prompt = the formula.

Mistakes each grader catches (each one planted in tests/graders/planted_ch07_disaggregation.py and asserted caught):
  send_all_blocks      every block of the pool sent (the decode rank gets other sequences' KV)
  send_sorted_blocks   the blocks sent sorted by id, not in block-table order
  send_drops_partial   floor(n / block_size) blocks: the last, partly filled block dropped
  send_no_first_token  header [num_tokens] only: the first token forgotten
  send_wrong_rank      every message to rank 1, whatever dst says
  send_separate_kv     K and V of a layer in two messages (a protocol break: the receiver would mis-read them)
  recv_prefill_ids     the decode rank writes into blocks 0 .. n-1, the ids a fresh prefill rank hands out,
                       not the blocks its own block manager allocated
  recv_no_first_token  recv_kv returns the prompt's last token instead of the first generated token
"""
from __future__ import annotations

import contextlib
import functools
import inspect

import pytest
import torch
import torch.distributed as dist

from helpers import launch, load_impl
from helpers.comm_trace import CommTracer
from helpers.course.disaggregated import transfer_bytes
from helpers.course.kv_cache import KVPool
# imported here, once, so that the forked ranks do not each import transformers
from helpers.course.tiny_llama import encode, generate, load_model
from helpers.launch import LaunchError, RankFailed
from tests.graders.planted import planted_tests

WHERE_SEND = "labs/disaggregation.py: send_kv"
WHERE_RECV = "labs/disaggregation.py: recv_kv"
SENDS = {"send", "isend"}
RECVS = {"recv", "irecv"}
ANNOUNCE_TAG = 7_500        # the grader's own messages; the learner's use their own tags (default 0)
ANNOUNCE_SLOTS = 64

# (layers, kv_heads, head_dim, block_size, pool blocks, num_tokens, prefill block table, first token)
CASES = [
    (4, 4, 32, 16, 12, 37, [6, 2, 9], 101),   # a partly filled last block; a table not in id order
    (4, 4, 32, 16, 12, 32, [3, 0, 7], 7),     # exactly 2 full blocks; the table already holds a third
    (3, 2, 8, 4, 10, 5, [1, 4], 255),         # other shapes
    (2, 1, 4, 8, 6, 3, [5], 0),               # one partly filled block
]
DTYPES = [torch.float32, torch.int64, torch.float16, torch.bfloat16, torch.int32, torch.float64, torch.uint8,
          torch.int16, torch.int8, torch.bool]


def _impl(impl):
    return impl.disaggregation if impl is not None else load_impl("disaggregation")


def _call(where, what, fn, *args, **kwargs):
    """Run learner code; an error other than the stub's NotImplementedError says where it happened."""
    try:
        return fn(*args, **kwargs)
    except NotImplementedError:
        raise
    except Exception as exc:
        raise AssertionError(f"{where}: {what} raised {type(exc).__name__}: {exc}") from exc


def blocks_for(num_tokens, block_size):
    return -(-num_tokens // block_size)


def prefill_pool(case, index):
    """The prefill rank's pool of case `index`: random K/V everywhere (other sequences' blocks included)."""
    layers, kv_heads, head_dim, block_size, num_blocks = case[:5]
    pool = KVPool(layers, num_blocks, block_size, kv_heads, head_dim)
    generator = torch.Generator().manual_seed(7500 + index)
    for layer in range(layers):
        pool.k[layer].copy_(torch.randn(pool.k[layer].shape, generator=generator))
        pool.v[layer].copy_(torch.randn(pool.v[layer].shape, generator=generator))
    return pool


def expected_messages(pool, table, num_tokens, first_token):
    """The protocol's messages for one prefill: header, then stack(K, V) of the sequence's blocks per layer."""
    blocks = torch.tensor(table[:blocks_for(num_tokens, pool.block_size)])
    return [torch.tensor([num_tokens, first_token], dtype=torch.int64)] + [
        torch.stack([pool.k[layer][blocks], pool.v[layer][blocks]]) for layer in range(pool.num_layers)]


def reference_send(pool, table, num_tokens, first_token, dst):
    """The grader's own sender (the protocol of labs/disaggregation.py), for the recv_kv check."""
    for message in expected_messages(pool, table, num_tokens, first_token):
        dist.send(message.contiguous(), dst=dst)


class GraderBlockManager:
    """A block manager with a free list in a given order, recording every allocate (exercise 7.1's interface)."""

    def __init__(self, num_blocks, block_size, order):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free_blocks = list(order)
        self.tables, self.num_tokens, self.calls = {}, {}, []

    @property
    def num_free_blocks(self):
        return len(self.free_blocks)

    def blocks_needed(self, num_tokens):
        return blocks_for(num_tokens, self.block_size)

    def allocate(self, seq_id, num_tokens):
        self.calls.append(("allocate", seq_id, num_tokens))
        if seq_id in self.tables:
            raise ValueError(f"sequence {seq_id!r} already holds blocks")
        needed = blocks_for(num_tokens, self.block_size)
        if needed > len(self.free_blocks):
            raise RuntimeError(f"needed {needed} blocks, {len(self.free_blocks)} free")
        self.tables[seq_id] = [self.free_blocks.pop(0) for _ in range(needed)]
        self.num_tokens[seq_id] = num_tokens
        return list(self.tables[seq_id])

    def block_table(self, seq_id):
        return list(self.tables[seq_id])

    def seq_len(self, seq_id):
        return self.num_tokens[seq_id]

    def append_slot(self, seq_id):
        position = self.num_tokens[seq_id]
        if position == len(self.tables[seq_id]) * self.block_size:
            self.tables[seq_id].append(self.free_blocks.pop(0))
        self.num_tokens[seq_id] = position + 1
        return self.tables[seq_id][-1], position % self.block_size

    def free(self, seq_id):
        self.free_blocks.extend(self.tables.pop(seq_id))
        del self.num_tokens[seq_id]


# ------------------------------------------------------------- the grader's view of what is sent to whom

def _peer(bound_dst, group, group_dst):
    if bound_dst is not None:
        return int(bound_dst)
    return dist.get_global_rank(group, int(group_dst)) if group is not None else int(group_dst)


def _announce(raw_send, messages):
    """Tell each receiver, on the grader's tag, the dtype, size and tag of the learner messages about to come."""
    by_peer = {}
    for peer, tensor, tag in messages:
        by_peer.setdefault(peer, []).append((DTYPES.index(tensor.dtype), tensor.numel(), tag))
    for peer, items in by_peer.items():
        control = torch.zeros(ANNOUNCE_SLOTS, dtype=torch.int64)
        control[0] = len(items)
        for i, item in enumerate(items[:(ANNOUNCE_SLOTS - 1) // 3]):
            control[1 + 3 * i:4 + 3 * i] = torch.tensor(item)
        raw_send(control, dst=peer, tag=ANNOUNCE_TAG)


@contextlib.contextmanager
def announced_sends():
    """Inside: every dist.send / isend / batch_isend_irecv is announced to its receiver first (see _announce)."""
    raw_send, saved = dist.send, (dist.send, dist.isend, dist.batch_isend_irecv, dist.P2POp)

    def wrap(fn):
        @functools.wraps(fn)
        def announced(tensor, dst=None, group=None, tag=0, group_dst=None):
            _announce(raw_send, [(_peer(dst, group, group_dst), tensor, tag)])
            return fn(tensor, dst=dst, group=group, tag=tag, group_dst=group_dst)
        return announced

    def batch(p2p_op_list):
        sends = [p for p in p2p_op_list if getattr(p.op, "__name__", "") in SENDS]
        _announce(raw_send, [(p.peer, p.tensor, p.tag) for p in sends])
        return saved[2](p2p_op_list)

    class P2POp(saved[3]):
        """dist.P2POp accepts only the real isend / irecv: hand it those."""
        def __new__(cls, op, *args, **kwargs):
            return saved[3].__new__(cls, inspect.unwrap(op), *args, **kwargs)

        def __init__(self, op, *args, **kwargs):
            super().__init__(inspect.unwrap(op), *args, **kwargs)

    dist.send, dist.isend, dist.batch_isend_irecv, dist.P2POp = wrap(saved[0]), wrap(saved[1]), batch, P2POp
    try:
        yield
    finally:
        dist.send, dist.isend, dist.batch_isend_irecv, dist.P2POp = saved


def receive_announced(src=0):
    """Receive what rank `src` announces until it says done (an announcement of -1 messages)."""
    received = []
    while True:
        control = torch.zeros(ANNOUNCE_SLOTS, dtype=torch.int64)
        dist.recv(control, src=src, tag=ANNOUNCE_TAG)
        count = int(control[0])
        if count < 0:
            return received
        works, tensors = [], []
        for i in range(count):
            dtype, numel, tag = (int(x) for x in control[1 + 3 * i:4 + 3 * i])
            tensors.append(torch.empty(numel, dtype=DTYPES[dtype]))
            works.append(dist.irecv(tensors[-1], src=src, tag=tag))
        for work in works:
            work.wait()
        received.extend(tensors)


def _done(receivers):
    for peer in receivers:
        dist.send(torch.full((ANNOUNCE_SLOTS,), -1, dtype=torch.int64), dst=peer, tag=ANNOUNCE_TAG)


# ------------------------------------------------------------------------------------------- send_kv

def _send_cases():
    """(case index, case, dst): each case once to rank 2 and once to rank 1."""
    return [(i, case, 2 - (i + k) % 2) for k in range(2) for i, case in enumerate(CASES)]


def _sender_failures(trace, case, dst, messages_expected):
    layers, kv_heads, head_dim, block_size, num_blocks, n, table, first = case
    where = f"[7.5] send_kv(num_tokens={n}, block_table={table}, block_size={block_size}, dst={dst})"
    records = trace.records
    ops = [r.op for r in records]
    if not records:
        return [f"{where}: sent nothing — send the header and the blocks with dist.send ({WHERE_SEND})"]
    wrong = [op for op in ops if op not in SENDS]
    if wrong:
        return [f"{where}: called {wrong}: a prefill rank only sends point-to-point messages to its decode rank "
                f"({WHERE_SEND})"]
    peers = sorted({r.peer for r in records})
    if peers != [dst]:
        return [f"{where}: sent to rank(s) {peers}, expected only the decode rank dst={dst} — pass dst=dst to every "
                f"send, whatever rank that is ({WHERE_SEND})"]
    failures = []
    want_sizes = [m.numel() * m.element_size() for m in messages_expected]
    got_sizes = [r.payload for r in records]
    block = 2 * block_size * kv_heads * head_dim * 4
    needed = blocks_for(n, block_size)
    if sum(got_sizes) != sum(want_sizes):
        sent_blocks = (sum(got_sizes) - got_sizes[0]) / (layers * block) if len(got_sizes) > 1 else 0
        if sent_blocks == num_blocks:
            hint = (f"that is every block of the pool ({num_blocks}): send only the sequence's blocks, the first "
                    f"ceil({n}/{block_size}) = {needed} of its block table")
        elif sent_blocks == n // block_size and n % block_size:
            hint = (f"that is {n // block_size} blocks: the last, partly filled block is missing — a prompt of {n} "
                    f"tokens needs ceil({n}/{block_size}) = {needed} blocks")
        elif sent_blocks == len(table) and len(table) > needed:
            hint = (f"that is the whole block table ({len(table)} blocks); only the first ceil({n}/{block_size}) = "
                    f"{needed} hold the prompt")
        elif got_sizes[0] != want_sizes[0]:
            hint = (f"the first message was {got_sizes[0]} B: the header is int64 [num_tokens, first_token], "
                    f"16 B — the decode rank needs the first token too")
        else:
            hint = f"expected the header + {layers} layers × {needed} blocks × {block} B"
        failures.append(f"{where}: sent {sum(got_sizes):,d} B in {len(got_sizes)} messages, expected "
                        f"{sum(want_sizes):,d} B — {hint} ({WHERE_SEND})")
    elif got_sizes != want_sizes:
        failures.append(f"{where}: sent messages of {got_sizes} B, expected {want_sizes} B: the header (16 B), then "
                        f"ONE message per layer holding K and V stacked ({WHERE_SEND}: see the protocol)")
    return failures


def _receiver_failures(rank, received, case, dst, messages_expected):
    layers, kv_heads, head_dim, block_size, num_blocks, n, table, first = case
    where = f"[7.5] send_kv(num_tokens={n}, block_table={table}, block_size={block_size}, dst={dst})"
    if rank != dst:
        if received:
            return [f"{where}: rank {rank} received {len(received)} message(s) from rank 0 although dst={dst} — the "
                    f"blocks went to the wrong rank ({WHERE_SEND})"]
        return []
    if not received:
        return [f"{where}: the decode rank {dst} received nothing ({WHERE_SEND})"]
    header = received[0]
    if header.dtype != torch.int64 or header.numel() != 2:
        return [f"{where}: the header is {header.dtype} of {header.numel()} values {header.tolist()}: expected int64 "
                f"[num_tokens, first_token] = [{n}, {first}] — the decode rank needs the first token ({WHERE_SEND})"]
    if header.tolist() != [n, first]:
        return [f"{where}: the header says {header.tolist()}, expected [num_tokens, first_token] = [{n}, {first}] — "
                f"the first token goes in the header ({WHERE_SEND})"]
    if len(received) != len(messages_expected):
        return [f"{where}: the decode rank received {len(received)} messages, expected {len(messages_expected)}: "
                f"the header, then one per layer with K and V stacked ({WHERE_SEND}: see the protocol)"]
    for layer, (got, want) in enumerate(zip(received[1:], messages_expected[1:])):
        if got.dtype != want.dtype or got.numel() != want.numel():
            return [f"{where}: layer {layer}'s message is {got.dtype} of {got.numel()} values, expected "
                    f"{want.dtype} {tuple(want.shape)} = [2 (K, V), blocks, block_size, kv_heads, head_dim] "
                    f"({WHERE_SEND})"]
        got = got.reshape(want.shape)
        if not torch.equal(got, want):
            pool = prefill_pool(case, CASES.index(case))
            used = table[:blocks_for(n, block_size)]
            if torch.equal(got[0], pool.k[layer][torch.tensor(sorted(used))]):
                hint = (f"the blocks came sorted by id {sorted(used)}: send them in block-table order {used} (block i "
                        f"of the message holds positions i·block_size ..)")
            elif torch.equal(got[0], want[1]) or torch.equal(got[1], want[0]):
                hint = "K and V swapped: K first, then V"
            else:
                hint = f"block i of the message must be pool.k/v[layer][block_table[i]] for i < {len(used)}"
            return [f"{where}: layer {layer}: the K/V received differ from the sequence's blocks — {hint} "
                    f"({WHERE_SEND})"]
    return []


def check_send(rank, world_size, impl=None):
    """3 ranks: rank 0 calls send_kv for every case; ranks 1 and 2 receive what is announced to them."""
    disaggregation, failures = _impl(impl), []
    for index, case, dst in _send_cases():
        pool = prefill_pool(case, index)
        n, table, first = case[5:]
        messages = expected_messages(pool, table, n, first)
        if rank == 0:
            with announced_sends(), CommTracer() as trace:
                try:
                    _call(f"[7.5] rank 0", "send_kv", disaggregation.send_kv, pool, list(table), n, first, dst)
                except AssertionError as exc:
                    failures.append(f"{exc} ({WHERE_SEND})")
            _done([1, 2])
            failures += _sender_failures(trace, case, dst, messages)
        else:
            failures += _receiver_failures(rank, receive_announced(0), case, dst, messages)
    return failures


# ------------------------------------------------------------------------------------------- recv_kv

def _decode_rank_state(case, index):
    """The decode rank's pool (other sequences' data everywhere) and block manager: its free list runs from
    the top id down and two other sequences already hold blocks, so its ids differ from the prefill rank's."""
    layers, kv_heads, head_dim, block_size, num_blocks = case[:5]
    pool = KVPool(layers, num_blocks + 4, block_size, kv_heads, head_dim)
    generator = torch.Generator().manual_seed(7600 + index)
    for layer in range(layers):
        pool.k[layer].copy_(torch.randn(pool.k[layer].shape, generator=generator))
        pool.v[layer].copy_(torch.randn(pool.v[layer].shape, generator=generator))
    manager = GraderBlockManager(num_blocks + 4, block_size, reversed(range(num_blocks + 4)))
    manager.allocate("other-a", block_size)
    manager.allocate("other-b", 1)
    manager.calls.clear()
    return pool, manager


def check_recv(rank, world_size, impl=None):
    """Rank 0 sends every case with the grader's reference sender; rank 1 receives with recv_kv (others idle)."""
    disaggregation, failures = _impl(impl), []
    if rank > 1:
        return failures
    for index, case in enumerate(CASES):
        layers, kv_heads, head_dim, block_size, num_blocks, n, table, first = case
        pool = prefill_pool(case, index)
        if rank == 0:
            reference_send(pool, table, n, first, dst=1)
            continue
        where = f"[7.5] recv_kv of a prefill of {n} tokens (block_size {block_size}) from rank 0"
        mine, manager = _decode_rank_state(case, index)
        before = [(k.clone(), v.clone()) for k, v in zip(mine.k, mine.v)]
        seq_id = f"seq-{index}"
        with CommTracer() as trace:
            got = _call(where, "recv_kv", disaggregation.recv_kv, mine, manager, seq_id, 0)
        wrong_ops = [(r.op, r.peer) for r in trace.records if r.op not in RECVS or r.peer not in (0, None)]
        if wrong_ops:
            failures.append(f"{where}: called {wrong_ops}: a decode rank only receives, from src=0 ({WHERE_RECV})")
        if manager.calls != [("allocate", seq_id, n)]:
            failures.append(f"{where}: the block manager saw {manager.calls or 'no call'}, expected one "
                            f"allocate({seq_id!r}, {n}) — the decode rank takes blocks of its own pool from its own "
                            f"block manager ({WHERE_RECV})")
            continue
        own = manager.block_table(seq_id)
        fields = {name: getattr(got, name, None) for name in ("seq_id", "num_tokens", "first_token", "block_table")}
        if fields["num_tokens"] != n or fields["first_token"] != first:
            hint = ("first_token is the token the prefill produced, the header's second value"
                    if fields["num_tokens"] == n else "num_tokens is the header's first value")
            failures.append(f"{where}: returned num_tokens={fields['num_tokens']}, first_token="
                            f"{fields['first_token']}, expected {n} and {first} — {hint} ({WHERE_RECV})")
        if fields["block_table"] is None or list(fields["block_table"]) != own:
            failures.append(f"{where}: returned block_table {fields['block_table']}, expected this rank's table {own} "
                            f"(block_manager.block_table(seq_id)) ({WHERE_RECV})")
        held = set(own)
        touched = sorted({b for layer in range(layers) for b in range(mine.num_blocks) if b not in held and not (
            torch.equal(mine.k[layer][b], before[layer][0][b]) and torch.equal(mine.v[layer][b], before[layer][1][b]))})
        if touched:
            failures.append(f"{where}: wrote into blocks {touched}, which this rank's block manager did not give the "
                            f"sequence (its blocks are {own}; others belong to other sequences) — write into "
                            f"block_manager.block_table(seq_id), not the ids the prefill rank used ({WHERE_RECV})")
            continue
        for layer in range(layers):
            want_k, want_v = pool.gather(layer, table, n)
            got_k, got_v = mine.gather(layer, own, n)
            if not (torch.equal(got_k, want_k) and torch.equal(got_v, want_v)):
                bad = next(p for p in range(n) if not (torch.equal(got_k[p], want_k[p]) and
                                                       torch.equal(got_v[p], want_v[p])))
                failures.append(f"{where}: layer {layer}: position {bad}'s K/V in this rank's block "
                                f"{own[bad // block_size]} differ from what was sent — message block i goes into "
                                f"block_table[i], K from [0], V from [1] ({WHERE_RECV})")
                break
    return failures


# ---------------------------------------------------------------------------------------- end to end

E2E_PROMPTS = ["Four score and seven years ago", "We hold these truths to be self-evident, that all men",
               "A Fox one day spied a beautiful bunch of ripe grapes hanging from a vine trained along the branches"]
E2E_NEW_TOKENS = 5


@torch.no_grad()
def _decode_from_pool(model, pool, manager, seq_id, first_token, steps):
    """Greedy decoding whose only state is this rank's pool: each step reads K/V through the block table."""
    from transformers import DynamicCache
    tokens = [first_token]
    for _ in range(steps):
        length = manager.seq_len(seq_id)
        cache = DynamicCache(config=model.config)
        table = manager.block_table(seq_id)
        for layer in range(pool.num_layers):
            k, v = pool.gather(layer, table, length)
            cache.update(k.transpose(0, 1)[None], v.transpose(0, 1)[None], layer)
        out = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=cache, use_cache=True)
        manager.append_slot(seq_id)
        for layer in range(pool.num_layers):
            pool.write(layer, manager.block_table(seq_id), length, out.past_key_values.layers[layer].keys[0, :, -1:]
                       .transpose(0, 1), out.past_key_values.layers[layer].values[0, :, -1:].transpose(0, 1))
        tokens.append(int(out.logits[0, -1].argmax()))
    return tokens


def check_end_to_end(rank, world_size, impl=None):
    """Rank 0 prefills with transformers and sends; ranks 1, 2 receive and decode; tokens = generate()."""
    disaggregation, failures = _impl(impl), []
    model = load_model()
    config = model.config
    pool = KVPool.for_model(config, num_blocks=16, block_size=16)
    manager = GraderBlockManager(16, 16, range(16) if rank == 0 else [9, 3, 14, 0, 7, 12, 1, 5, 10, 2, 15, 4])
    head_dim = pool.head_dim
    with torch.no_grad():
        for i, text in enumerate(E2E_PROMPTS):
            ids = encode(text)
            dst = 1 + i % 2
            where = f"[7.5] end to end, prompt {i} ({len(ids)} tokens) from rank 0 to rank {dst}"
            if rank == 0:
                out = model(input_ids=torch.tensor([ids]), use_cache=True)
                table = manager.allocate(i, len(ids))
                for layer in range(pool.num_layers):
                    pool.write(layer, table, 0, out.past_key_values.layers[layer].keys[0].transpose(0, 1),
                               out.past_key_values.layers[layer].values[0].transpose(0, 1))
                first = int(out.logits[0, -1].argmax())
                with CommTracer() as trace:
                    _call(where, "send_kv", disaggregation.send_kv, pool, table, len(ids), first, dst)
                manager.free(i)
                want = transfer_bytes(len(ids), pool.num_layers, pool.kv_heads, head_dim, pool.block_size)
                if trace.total_bytes() != want or {r.peer for r in trace.records} != {dst}:
                    failures.append(f"{where}: rank 0 sent {trace.total_bytes():,d} B to ranks "
                                    f"{sorted({r.peer for r in trace.records})}, expected {want:,d} B (16 B header + "
                                    f"{pool.num_layers} layers × 2 × {blocks_for(len(ids), 16)} blocks × 16 × "
                                    f"{pool.kv_heads} × {head_dim} × 4 B) to rank {dst} ({WHERE_SEND})")
            elif rank == dst:
                got = _call(where, "recv_kv", disaggregation.recv_kv, pool, manager, i, 0)
                tokens = _decode_from_pool(model, pool, manager, i, got.first_token, E2E_NEW_TOKENS - 1)
                want = generate(model, ids, E2E_NEW_TOKENS)
                if tokens != want:
                    failures.append(f"{where}: the decode rank generated {tokens}, the colocated model {want} — "
                                    f"the received K/V or first token is not the prefill's ({WHERE_RECV})")
                manager.free(i)
    return failures


# ------------------------------------------------------------------------------------------- tests

def _check_all(results):
    bad = [msg for rank_msgs in results for msg in rank_msgs]
    assert not bad, "\n".join(bad[:6]) + (f"\n... and {len(bad) - 6} more" if len(bad) > 6 else "")


def _launch(fn, world_size, *args, timeout=30):
    """Run a check; a job that dies or hangs (a protocol mismatch: a receive posted for a message never sent,
    or a buffer smaller than the message) fails with what happened and the protocol to follow."""
    try:
        return launch(fn, world_size, *args, show_output=False, timeout=timeout)
    except RankFailed as exc:
        if exc.exc_type == "NotImplementedError":
            raise                                   # a stub: reported "not started"
        raise _protocol_error(exc) from None
    except LaunchError as exc:
        raise _protocol_error(exc) from None


def _protocol_error(exc):
    return AssertionError(f"[7.5] the job failed: {str(exc)[:1500]}\n— follow the protocol of "
                          f"labs/disaggregation.py: a 16 B int64 header [num_tokens, first_token], then one "
                          f"message per layer: stack(K, V) of the ceil(num_tokens / block_size) blocks; and call "
                          f"dist.send / dist.recv (or isend / irecv) as torch.distributed's functions (dist.send(...), "
                          f"not a name imported from it), so the grader sees every message")


@pytest.mark.exercise("7.5", "Disaggregation: a prefill's KV blocks to a decode rank")
def test_send_kv():
    _check_all(_launch(check_send, 3))


@pytest.mark.exercise("7.5", "Disaggregation: a prefill's KV blocks to a decode rank")
def test_recv_kv():
    _check_all(_launch(check_recv, 2))


@pytest.mark.exercise("7.5", "Disaggregation: a prefill's KV blocks to a decode rank")
def test_end_to_end_same_tokens():
    _check_all(_launch(check_end_to_end, 3, timeout=90))


# ------------------------------------------------------------- planted wrong answers (not an exercise)

# send on 3 ranks (a prefill rank, the decode rank, a bystander), recv on 2; a valid alternative through both, on 3.
PLANTED_CHECKS = {"send": lambda impl, rank, world_size, *_: check_send(rank, world_size, impl),
                  "recv": lambda impl, rank, world_size, *_: check_recv(rank, world_size, impl)}
planted_results, test_planted_mistakes_are_caught, test_valid_alternatives_pass, \
    test_reference_passes_the_checks_the_planted_tests_use = \
    planted_tests("planted_ch07_disaggregation", PLANTED_CHECKS, "solutions.disaggregation", ranked=True,
                  world_size={"send": 3, "recv": 2}, alternatives="one", exercise="7.5", check="send+recv")
