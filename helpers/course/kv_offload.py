"""A KV offload tier behind the engine's connector: blocks the device pool evicts are loaded back, not recomputed.

    from helpers.course.kv_offload import HostTierClient, serve_host_tier, TierConnector, offload_run

    # rank 1 (the host tier's process):  serve_host_tier(peer=0, ...)
    # rank 0 (the engine's process):
    tier = HostTierClient(layers=4, block_size=16, kv_heads=4, head_dim=32, capacity_blocks=256, peer=1)
    connector = load_impl("kv_offload").OffloadingConnector(tier, block_size=16, num_layers=4)
    engine = LLMEngine.paged(model, num_blocks=24, enable_prefix_caching=True, connector=connector)

A device's KV pool is small next to the working set of a chat service (every tenant's system prompt, every live
conversation); once a block is evicted, the next turn that needs it computes it again. A host tier keeps a
second copy of every computed block in a larger, slower memory (host DRAM, another machine, a disk), found by the
same chained block hash the prefix cache uses (exercise 7.3): a request whose prefix is in the tier loads those
blocks into the blocks the scheduler allocated for it, and computes only the rest.

What vLLM does, read in vLLM 0.32 (`vllm/distributed/kv_transfer/kv_connector/v1/offloading_connector.py`, the
`OffloadingConnector`, with `offloading/scheduler.py` and `vllm/v1/kv_offload/`):
  * Two halves, as `KVConnectorBase_V1` has them. The scheduler half (`OffloadingConnectorScheduler`) owns an
    `OffloadingManager` (`vllm/v1/kv_offload/base.py`; the CPU one is `cpu/manager.py`'s CPUOffloadingManager,
    with an LRU or ARC policy in `cpu/policies/`): which block hashes the tier holds and where, and what to evict.
    The worker half (`offloading/worker.py`, `kv_offload/cpu/gpu_worker.py`) only moves bytes between device
    blocks and host blocks it is told about. The course splits the same way: `HostTierClient` is the manager
    (the index of hashes → host slots, LRU, in the engine's process), the tier's process holds the bytes.
  * Lookup (`get_num_new_matched_tokens` → `_lookup_complete_chunks` → `_maximal_prefix_lookup`): starting at
    the first block after the local prefix-cache hits, count consecutive hashes the manager holds and stop at the
    first MISS. Whole blocks (chunks) only.
  * Store (`_build_store_jobs`, every step): for each scheduled request, the full blocks of its tokens computed so
    far (`num_computed_tokens + num_scheduled_tokens`, rounded down to whole chunks) that it has not stored yet
    (`next_stored_chunk_idx`), filtered by `manager.prepare_store`, which returns only the keys the tier does not
    hold yet. So vLLM saves a block WHEN IT IS COMPUTED, not when the device evicts it: the copy is already in
    the tier when the eviction comes, and eviction stays a free-list operation. The course does the same, after
    each step (the engine's `save` hook); vLLM defers the copy to the next step's start and overlaps it.
  * Loads are synchronous in the course (the step that admits the request waits for them). vLLM's are not:
    `get_num_new_matched_tokens` returns (tokens, True), the request waits in WAITING_FOR_REMOTE_KVS while the
    worker copies on its own CUDA streams (`kv_offload/cpu/gpu_worker.py`), and the scheduler schedules it once
    the load has finished (`vllm/v1/core/sched/scheduler.py`), so other requests' steps go on meanwhile.

What moves, and where: the engine's process and the tier's process are two ranks of a torch.distributed group on
gloo (`helpers.launch`), and every block crosses as tensors through `dist.send` / `dist.recv`. One block is
block_size × the KV bytes per token of helpers/course/memory.py (`kv_bytes_per_token`: 2 × layers × kv_heads ×
head_dim × bytes per value; KVPool.bytes_per_block), 65,536 B for the tiny Llama's 16-token blocks in float32.
The client counts the KV bytes it sends and receives (`kv_bytes_sent`, `kv_bytes_received`) apart from the
control messages (headers, hashes, slot ids: `control_bytes`), and the tier's process counts what it received on
its side (`close()` returns its figures).

Given here (the plumbing): the wire protocol, the tier's process (`serve_host_tier`), the manager
(`HostTierClient`), and `TierConnector`, a KVConnector whose `load` and `save` move the blocks. What a connector
DECIDES — how many tokens a new request can load, which blocks to save — is exercise 9.3 (labs/kv_offload.py:
`OffloadingConnector`). `serve_chat` runs chapter 9's multi-turn workload (helpers/course/routing/workload.py) on
one engine; `offload_run` runs it with and without the tier on the tiny Llama (the chapter's figures);
`recompute_vs_load` is the arithmetic of prefill FLOPs against bytes over a link.
"""
from __future__ import annotations

import heapq
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.distributed as dist

from helpers.course.engine.kv_connector import KVConnector
from helpers.course.memory import kv_bytes_per_token

__all__ = ["HostTierClient", "serve_host_tier", "TierConnector", "block_bytes", "serve_chat", "LINKS",
           "recompute_vs_load", "chapter_workload", "whole_working_set", "offload_run", "OffloadRun", "plot_offload"]

STORE, LOAD, STOP = 1, 2, 3
TIER_COUNTS = ("stores", "loads", "kv_bytes_received", "kv_bytes_sent", "blocks_held")
HASH_BYTES = 32


def block_bytes(block_size: int, layers: int, kv_heads: int, head_dim: int, dtype=torch.float32) -> int:
    """K and V of one block in every layer: block_size × kv_bytes_per_token (helpers/course/memory.py)."""
    return int(block_size * kv_bytes_per_token(layers, kv_heads, head_dim, torch.finfo(dtype).bits // 8))


def _hash_tensor(hashes) -> torch.Tensor:
    for h in hashes:
        if not isinstance(h, bytes) or len(h) != HASH_BYTES:
            raise ValueError(f"a block hash is {HASH_BYTES} bytes, got {h!r:.40}")
    return torch.frombuffer(bytearray(b"".join(hashes)), dtype=torch.uint8).view(len(hashes), HASH_BYTES)


# ------------------------------------------------------------------------------------------ the tier's process

def serve_host_tier(peer: int, layers: int, block_size: int, kv_heads: int, head_dim: int, capacity_blocks: int,
                    dtype=torch.float32) -> dict:
    """The host tier's process: `capacity_blocks` slots of K/V blocks in its memory, each labelled with the block
    hash stored in it. Serves the client at rank `peer` until it says STOP; returns what it counted on its side
    of the wire: {"stores", "loads", "kv_bytes_received", "kv_bytes_sent", "blocks_held"}.

    Protocol (every message a tensor through dist.send/recv): a header int64 [op, n], then
      STORE  hashes uint8 [n, 32], slots int64 [n], blocks [n, layers, 2, block_size, kv_heads, head_dim]
      LOAD   hashes, slots → status int64 [1] (0, or 1 + the first slot that does not hold its hash), blocks
      STOP   → its counts int64 [5] (TIER_COUNTS); the loop ends."""
    slots = torch.zeros(capacity_blocks, layers, 2, block_size, kv_heads, head_dim, dtype=dtype)
    labels: list = [None] * capacity_blocks
    counts = {"stores": 0, "loads": 0, "kv_bytes_received": 0, "kv_bytes_sent": 0}
    header = torch.zeros(2, dtype=torch.int64)
    while True:
        dist.recv(header, src=peer)
        op, n = int(header[0]), int(header[1])
        if op == STOP:
            counts["blocks_held"] = sum(label is not None for label in labels)
            dist.send(torch.tensor([counts[k] for k in TIER_COUNTS], dtype=torch.int64), dst=peer)
            return counts
        hashes = torch.empty(n, HASH_BYTES, dtype=torch.uint8)
        where = torch.empty(n, dtype=torch.int64)
        dist.recv(hashes, src=peer)
        dist.recv(where, src=peer)
        keys = [bytes(row.tolist()) for row in hashes]
        if op == STORE:
            blocks = torch.empty(n, *slots.shape[1:], dtype=dtype)
            dist.recv(blocks, src=peer)
            slots[where] = blocks
            for key, slot in zip(keys, where.tolist()):
                labels[slot] = key
            counts["stores"] += n
            counts["kv_bytes_received"] += blocks.numel() * blocks.element_size()
        elif op == LOAD:
            wrong = next((i for i, (key, slot) in enumerate(zip(keys, where.tolist())) if labels[slot] != key), None)
            dist.send(torch.tensor([0 if wrong is None else 1 + wrong], dtype=torch.int64), dst=peer)
            if wrong is None:
                blocks = slots[where].contiguous()
                dist.send(blocks, dst=peer)
                counts["loads"] += n
                counts["kv_bytes_sent"] += blocks.numel() * blocks.element_size()
        else:
            raise ValueError(f"host tier: unknown op {op} from rank {peer}")


# ------------------------------------------------------------------------------------------ the engine's side

class HostTierClient:
    """The tier as the engine's process sees it: vLLM's OffloadingManager (which hashes the tier holds, in which
    slot, LRU eviction) and the wire to the tier's process at rank `peer` (None: the slots live in this process,
    for tests of the connector's decisions; the bytes are counted the same way).

    lookup(h) -> bool         the tier holds block hash h (a local question: nothing crosses the wire)
    store(hashes, blocks)     blocks [n, layers, 2, block_size, kv_heads, head_dim] under those hashes; a hash not
                              held takes a free slot or evicts the least recently used one; a hash already held
                              is written again (and counted again: not storing it twice is the caller's job)
    load(hashes) -> blocks    [n, layers, 2, block_size, kv_heads, head_dim]; KeyError if one is not held
    close() -> dict           STOP to the tier's process; what IT counted on its side of the wire (TIER_COUNTS;
                              None in-process)"""

    def __init__(self, layers: int, block_size: int, kv_heads: int, head_dim: int, capacity_blocks: int,
                 peer: int | None = None, dtype=torch.float32):
        if capacity_blocks < 1:
            raise ValueError(f"capacity_blocks={capacity_blocks} must be at least 1")
        self.layers, self.block_size, self.kv_heads, self.head_dim = layers, block_size, kv_heads, head_dim
        self.capacity_blocks, self.peer, self.dtype = capacity_blocks, peer, dtype
        self.block_shape = (layers, 2, block_size, kv_heads, head_dim)
        self.block_bytes = block_bytes(block_size, layers, kv_heads, head_dim, dtype)
        self.index: OrderedDict = OrderedDict()          # hash -> slot, least recently used first
        self.free = list(range(capacity_blocks))
        heapq.heapify(self.free)
        self._local = torch.zeros(capacity_blocks, *self.block_shape, dtype=dtype) if peer is None else None
        self.kv_bytes_sent = self.kv_bytes_received = self.control_bytes = 0
        self.blocks_stored = self.blocks_loaded = self.blocks_evicted = self.duplicate_stores = 0
        self.stored_hashes: list = []                    # every hash sent, in order (duplicates included)

    def __len__(self) -> int:
        return len(self.index)

    def lookup(self, block_hash: bytes) -> bool:
        return block_hash in self.index

    def _slot_for(self, block_hash: bytes, keep: set) -> int:
        if block_hash in self.index:
            self.duplicate_stores += 1
            self.index.move_to_end(block_hash)
            return self.index[block_hash]
        if self.free:
            slot = heapq.heappop(self.free)
        else:
            victim = next((h for h in self.index if h not in keep), None)
            if victim is None:
                raise RuntimeError(f"the host tier ({self.capacity_blocks} blocks) cannot hold one store of "
                                   f"{len(keep)} blocks")
            slot = self.index.pop(victim)
            self.blocks_evicted += 1
        self.index[block_hash] = slot
        return slot

    def store(self, hashes, blocks: torch.Tensor) -> None:
        hashes = list(hashes)
        if not hashes:
            return
        if tuple(blocks.shape) != (len(hashes), *self.block_shape):
            shape = ", ".join(map(str, self.block_shape))
            raise ValueError(f"blocks {tuple(blocks.shape)} must be [{len(hashes)}, {shape}] (n, layers, K and V, "
                             f"block_size, kv_heads, head_dim)")
        keep = set(hashes)
        where = torch.tensor([self._slot_for(h, keep) for h in hashes], dtype=torch.int64)
        blocks = blocks.to(self.dtype).contiguous()
        self._send(STORE, hashes, where, blocks)
        self.kv_bytes_sent += blocks.numel() * blocks.element_size()
        self.blocks_stored += len(hashes)
        self.stored_hashes.extend(hashes)

    def load(self, hashes) -> torch.Tensor:
        hashes = list(hashes)
        missing = [i for i, h in enumerate(hashes) if h not in self.index]
        if missing:
            raise KeyError(f"the host tier does not hold block {missing[0]} of the {len(hashes)} asked for")
        for h in hashes:
            self.index.move_to_end(h)
        where = torch.tensor([self.index[h] for h in hashes], dtype=torch.int64)
        if self.peer is None:
            blocks = self._local[where].clone()
        else:
            self._send(LOAD, hashes, where)
            status = torch.zeros(1, dtype=torch.int64)
            dist.recv(status, src=self.peer)
            self.control_bytes += 8
            if int(status):
                raise RuntimeError(f"the tier's process does not hold block {int(status) - 1} where the index says")
            blocks = torch.empty(len(hashes), *self.block_shape, dtype=self.dtype)
            dist.recv(blocks, src=self.peer)
        self.kv_bytes_received += blocks.numel() * blocks.element_size()
        self.blocks_loaded += len(hashes)
        return blocks

    def _send(self, op: int, hashes, where, blocks=None) -> None:
        header, keys = torch.tensor([op, len(hashes)], dtype=torch.int64), _hash_tensor(hashes)
        self.control_bytes += header.numel() * 8 + keys.numel() + where.numel() * 8
        if self.peer is None:
            if blocks is not None:
                self._local[where] = blocks
            return
        dist.send(header, dst=self.peer)
        dist.send(keys, dst=self.peer)
        dist.send(where, dst=self.peer)
        if blocks is not None:
            dist.send(blocks, dst=self.peer)

    def close(self) -> dict | None:
        if self.peer is None:
            return None
        dist.send(torch.tensor([STOP, 0], dtype=torch.int64), dst=self.peer)
        counts = torch.zeros(len(TIER_COUNTS), dtype=torch.int64)
        dist.recv(counts, src=self.peer)
        self.control_bytes += 16 + counts.numel() * 8
        return dict(zip(TIER_COUNTS, counts.tolist()))

    def figures(self) -> dict:
        return {"kv_bytes_sent": self.kv_bytes_sent, "kv_bytes_received": self.kv_bytes_received,
                "control_bytes": self.control_bytes, "blocks_stored": self.blocks_stored,
                "blocks_loaded": self.blocks_loaded, "blocks_evicted": self.blocks_evicted,
                "duplicate_stores": self.duplicate_stores, "blocks_held": len(self.index)}


class TierConnector(KVConnector):
    """A KVConnector over a HostTierClient: the plumbing of an offloading connector. It knows each request's block
    hashes (`block_hashes`, the prefix cache's chain), loads the blocks the scheduler allocated for the tokens the
    connector said it can supply (`load`), and after every step saves the blocks `blocks_to_save` names (`save`).
    The decisions — `get_num_new_matched_tokens` and `blocks_to_save` — are exercise 9.3's (labs/kv_offload.py).

    tier: a HostTierClient. hasher: block_hashes(token_ids, block_size, parent=None, cache_salt=None) (default
    exercise 7.3's; the graders pass their own). clock, link: a ModelledClock and a helpers.course.disaggregated
    Link: each load then holds the engine's modelled clock for link.seconds(bytes) (a blocking load, as the course's
    synchronous transfer is; stores are overlapped with compute, as vLLM's are, and cost no modelled time).
    loads: (rid, start, count, hashes) of every load; saves: (rid, [block indices]) of every non-empty save."""

    def __init__(self, tier: HostTierClient, block_size: int, num_layers: int, hasher=None, clock=None, link=None):
        if tier.block_size != block_size or tier.layers != num_layers:
            raise ValueError(f"the tier holds blocks of {tier.block_size} tokens × {tier.layers} layers; the engine's "
                             f"are {block_size} × {num_layers}")
        if hasher is None:
            from helpers.impl import load_impl
            hasher = load_impl("prefix_cache").block_hashes
        self.tier, self.block_size, self.num_layers, self.hasher = tier, block_size, num_layers, hasher
        self.clock, self.link = clock, link
        self.loads: list = []
        self.saves: list = []
        self.load_seconds = 0.0

    def block_hashes(self, request) -> list:
        """The chained hash of every FULL block of request.all_token_ids (a trailing partial block has none),
        hashed once per block and kept on the request (Request.block_hashes_upto, the list the engine's
        KVCacheManager extends with the same hasher)."""
        full = request.num_tokens // self.block_size
        return request.block_hashes_upto(request.num_tokens, self.block_size, self.hasher)[:full]

    # ---------------------------------------------------------------- exercise 9.3 (labs/kv_offload.py)
    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> int:
        raise NotImplementedError("a TierConnector decides nothing: use OffloadingConnector (labs/kv_offload.py)")

    def blocks_to_save(self, request, num_computed_tokens: int) -> list:
        raise NotImplementedError("a TierConnector decides nothing: use OffloadingConnector (labs/kv_offload.py)")

    # ---------------------------------------------------------------- the plumbing
    def load(self, request, start: int, count: int, write) -> None:
        """Positions start .. start+count-1 from the tier, through write(layer, k, v), in the blocks the
        scheduler allocated. The blocks covering them are fetched whole."""
        size = self.block_size
        first, end = start // size, -(-(start + count) // size)
        hashes = self.block_hashes(request)[first:end]
        if len(hashes) != end - first:
            raise ValueError(f"request {request.rid!r}: positions {start}..{start + count - 1} reach past its full "
                             f"blocks: only whole blocks are in the tier")
        blocks = self.tier.load(hashes)
        self.loads.append((request.rid, start, count, list(hashes)))
        if self.clock is not None and self.link is not None:
            seconds = self.link.seconds(blocks.numel() * blocks.element_size())
            self.load_seconds += seconds
            self.clock.wait_until(self.clock.now() + seconds)
        if write is None:
            return
        offset = start - first * size
        for layer in range(self.num_layers):
            kv = blocks[:, layer]                                    # [n, 2, block_size, kv_heads, head_dim]
            k = kv[:, 0].reshape(-1, *kv.shape[-2:])[offset:offset + count]
            v = kv[:, 1].reshape(-1, *kv.shape[-2:])[offset:offset + count]
            write(layer, k, v)

    def save(self, request, num_computed_tokens: int, read) -> None:
        """After a step: send the blocks blocks_to_save names to the tier (each read from the pool whole)."""
        chosen = [int(i) for i in self.blocks_to_save(request, num_computed_tokens)]
        if chosen:
            size, hashes = self.block_size, self.block_hashes(request)
            if max(chosen) >= len(hashes) or min(chosen) < 0:
                raise ValueError(f"request {request.rid!r}: block {max(chosen)} is not a full block of its "
                                 f"{request.num_tokens} tokens")
            end = (max(chosen) + 1) * size
            # read None: a modelled run (no pool): zeros cross the wire in the blocks' place, counted the same
            blocks = torch.zeros(len(chosen), *self.tier.block_shape, dtype=self.tier.dtype)
            for layer in range(self.num_layers if read is not None else 0):
                k, v = read(layer, 0, end)
                for j, i in enumerate(chosen):
                    blocks[j, layer, 0] = k[i * size:(i + 1) * size]
                    blocks[j, layer, 1] = v[i * size:(i + 1) * size]
            self.tier.store([hashes[i] for i in chosen], blocks)
            self.saves.append((request.rid, chosen))


# ------------------------------------------------------------------------------------------ a chat on one engine

def serve_chat(engine, workload, max_steps: int = 200_000, logprobs: int | None = None) -> list:
    """Serve a ChatWorkload (helpers/course/routing/workload.py) on one engine, on the engine's clock: each
    session's first turn arrives at its start, each later turn `think` seconds after the previous answer (its
    prompt: the whole conversation so far). logprobs: record that many top logprobs per generated token (the
    evidence that two runs' logits agree). Returns the requests in the order they finished."""
    from helpers.course.routing.workload import first_turn, next_turn
    pending, session_of, finished, order = [], {}, [], 0

    def push(request, session):
        nonlocal order
        if logprobs is not None:
            request.logprobs = logprobs
        session_of[request.rid] = session
        heapq.heappush(pending, (request.arrival, order, request))
        order += 1

    for session in workload.sessions:
        push(first_turn(workload, session), session)
    for _ in range(max_steps):
        while pending and pending[0][0] <= engine.clock.now():
            engine.add_request(heapq.heappop(pending)[2])
        if not engine.has_unfinished:
            if not pending:
                return finished
            engine.clock.wait_until(pending[0][0])
            continue
        for request in engine.step():
            finished.append(request)
            follow = next_turn(session_of[request.rid], request, engine.clock.now())
            if follow is not None:
                push(follow, session_of[request.rid])
        failed = engine.take_failed()
        if failed:
            raise RuntimeError(f"request {failed[0].rid!r} failed: {failed[0].error}")
    raise RuntimeError(f"the engine did not finish the workload in {max_steps} steps")


# ------------------------------------------------------------------------------------------ recompute vs load

# Nominal bandwidths, one direction, GB/s (10^9 B/s): PCIe 4.0 / 5.0 x16 (16 and 32 GT/s per lane, 128b/130b:
# 31.5 and 63 GB/s), a 100 Gb/s and a 400 Gb/s NIC (12.5 and 50 GB/s). Real transfers reach 70-90 % of these.
LINKS = {"PCIe 4.0 x16": 31.5, "PCIe 5.0 x16": 63.0, "100 Gb/s network": 12.5, "400 Gb/s network": 50.0}


def recompute_vs_load(model: str = "Llama-3-8B", context_tokens: int = 4096, peak_tflops: float = 989.0,
                      efficiency: float = 0.5, bytes_per_value: int = 2, links: dict | None = None) -> list:
    """Seconds to RECOMPUTE a cached prefix of `context_tokens` tokens (its prefill: 2 × parameters FLOPs per
    token + attention, 4 × heads × head_dim × layers per (token, earlier position) pair, at `efficiency` ×
    peak_tflops; H100 SXM dense bf16: 989) against seconds to LOAD its KV (context_tokens × kv_bytes_per_token,
    helpers/course/memory.py, over each link of `links`, GB/s). model: a name of helpers.course.memory.MODELS.
    Returns one row per link: {"link", "gbytes_per_s", "kv_bytes", "flops", "recompute_s", "load_s", "ratio"}
    (ratio = recompute / load: above 1, loading wins). Modelled: nominal bandwidths and a stated efficiency."""
    from helpers.course.memory import MODELS
    shape = MODELS[model]
    n = context_tokens
    flops = 2 * shape.parameters * n + 4 * shape.heads * shape.head_dim * shape.layers * n * (n + 1) / 2
    kv = n * kv_bytes_per_token(shape.layers, shape.kv_heads, shape.head_dim, bytes_per_value)
    recompute = flops / (peak_tflops * 1e12 * efficiency)
    rows = []
    for name, gbps in (links or LINKS).items():
        load = kv / (gbps * 1e9)
        rows.append({"link": name, "gbytes_per_s": gbps, "kv_bytes": kv, "flops": flops, "recompute_s": recompute,
                     "load_s": load, "ratio": recompute / load})
    return rows


# ------------------------------------------------------------------------------------------ the chapter's figures

@dataclass
class OffloadRun:
    """One run of the chat workload on the tiny Llama's paged engine (modelled device time).
    requests: {rid: (tokens, logprob rows)}; prompt_tokens: prompt tokens of every request; computed: prompt
    tokens computed (every step's chunks, recomputations after preemption included); local_hits: tokens found in
    the device prefix cache at admission; loaded: tokens loaded from the tier; ttfts: seconds, modelled;
    tier: the client's figures (bytes, blocks) or None; tier_side: what the tier's process counted on its side
    of the wire;     loads: the connector's (rid, start, count, hashes); preemptions: the engine's count."""
    label: str
    requests: dict
    prompt_tokens: int
    computed: int
    local_hits: int
    loaded: int
    ttfts: list
    tier: dict | None = None
    tier_side: dict | None = None
    loads: list | None = None
    preemptions: int = 0
    block_bytes: int = 0
    load_seconds: float = 0.0


def chapter_workload(seed: int = 0):
    """A small chat that fits the tiny Llama's 256 positions: 4 tenants with system prompts of 96-128 tokens,
    8 sessions of 3 turns (user messages of 8-16 tokens, answers of 6-8): 24 requests whose prompts grow to
    ~200 tokens. Its working set (the 4 system prompts and the live conversations) is ~40 blocks of 16."""
    from helpers.course.routing.workload import chat_workload
    return chat_workload(num_tenants=4, sessions=8, turns=(3, 3), system_tokens=(96, 128), user_tokens=(8, 16),
                         answer_tokens=(6, 8), session_rate=4.0, think=1.0, seed=seed)


def whole_working_set(workload, block_size: int = 16, max_num_batched_tokens: int = 256, max_num_seqs: int = 4):
    """Prompt tokens computed when the device pool holds everything (1,024 blocks): the same schedule on
    modelled time (LLMEngine.modelled), no model. What no cache of any size can save: the independent
    expectation for offload_run's run with the tier."""
    from helpers.course.engine import KVCacheManager, LLMEngine, SchedulerConfig
    engine = LLMEngine.modelled(kv=KVCacheManager(1024, block_size, True),
                                config=SchedulerConfig(max_num_batched_tokens=max_num_batched_tokens,
                                                       max_num_seqs=max_num_seqs))
    serve_chat(engine, workload)
    return sum(step.prefill_tokens for step in engine.steps)


def _engine(model, num_blocks, block_size, connector, config):
    from helpers.course.engine import LLMEngine, ModelledClock
    return LLMEngine.paged(model, num_blocks=num_blocks, block_size=block_size, enable_prefix_caching=True,
                           connector=connector, clock=ModelledClock(), config=config)


def _figures(label, engine, finished, connector=None) -> OffloadRun:
    requests = {r.rid: (list(r.tokens), [row["top"] for row in r.output_logprobs]) for r in finished}
    loaded = sum(count for _, _, count, _ in connector.loads) if connector is not None else 0
    return OffloadRun(label, requests, sum(r.num_prompt_tokens for r in finished),
                      sum(step.prefill_tokens for step in engine.steps), engine.kv.stats.hits, loaded,
                      sorted(r.token_times[0] - r.arrival for r in finished),
                      preemptions=engine.scheduler.num_preemptions,
                      loads=None if connector is None else list(connector.loads),
                      load_seconds=0.0 if connector is None else connector.load_seconds)


def _offload_ranks(rank, world_size, workload, num_blocks, block_size, tier_blocks, link_gbps, config):
    from helpers.course.disaggregated import Link
    from helpers.course.tiny_llama import CONFIG, load_model
    from helpers.impl import load_impl
    layers, kv_heads = CONFIG.num_hidden_layers, CONFIG.num_key_value_heads
    head_dim = getattr(CONFIG, "head_dim", None) or CONFIG.hidden_size // CONFIG.num_attention_heads
    if rank == 1:
        return serve_host_tier(0, layers, block_size, kv_heads, head_dim, tier_blocks)
    model = load_model()
    tier = HostTierClient(layers, block_size, kv_heads, head_dim, tier_blocks, peer=1)
    connector = load_impl("kv_offload").OffloadingConnector(tier, block_size, layers)
    engine = _engine(model, num_blocks, block_size, connector, config)
    connector.clock, connector.link = engine.clock, Link(gbytes_per_s=link_gbps, latency_ms=0.01)
    finished = serve_chat(engine, workload, logprobs=3)
    tier_side = tier.close()
    with_tier = _figures("with the host tier", engine, finished, connector)
    with_tier.tier, with_tier.tier_side, with_tier.block_bytes = tier.figures(), tier_side, tier.block_bytes
    engine = _engine(model, num_blocks, block_size, None, config)
    without = _figures("device pool only", engine, serve_chat(engine, workload, logprobs=3))
    return without, with_tier


def offload_run(workload=None, num_blocks: int = 16, block_size: int = 16, tier_blocks: int = 512,
                link_gbps: float = LINKS["PCIe 4.0 x16"], max_num_batched_tokens: int = 256, max_num_seqs: int = 4,
                timeout: float = 120.0) -> tuple:
    """The chapter's figures: `workload` (default chapter_workload()) on the tiny Llama's paged engine with
    prefix caching and a device pool of num_blocks blocks (too small for the working set), on modelled device
    time, once with the host tier (another process: rank 1 of a gloo job, tier_blocks blocks; loads priced over
    a link of link_gbps GB/s) and once without. Returns (without, with_tier): two OffloadRun."""
    from helpers import launch
    from helpers.course import tiny_llama  # noqa: F401  imported here once: the forked ranks inherit it
    from helpers.course.engine import SchedulerConfig
    config = SchedulerConfig(max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs)
    results = launch(_offload_ranks, 2, workload or chapter_workload(), num_blocks, block_size, tier_blocks,
                     link_gbps, config, show_output=False, timeout=timeout)
    return results[0]


def plot_offload(without: OffloadRun, with_tier: OffloadRun):
    """Two panels: prompt tokens by where their KV came from (computed, device prefix cache, host tier) and the
    TTFT distribution of the two runs (modelled)."""
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(10.5, 3.8))
    labels = [without.label, with_tier.label]
    computed = [without.computed, with_tier.computed]
    hits = [without.local_hits, with_tier.local_hits]
    loaded = [without.loaded, with_tier.loaded]
    left.barh(labels, computed, color="tab:red", label="computed (prefill)")
    left.barh(labels, hits, left=computed, color="tab:green", label="device prefix cache")
    left.barh(labels, loaded, left=[c + h for c, h in zip(computed, hits)], color="tab:blue",
              label="loaded from the host tier")
    left.set_xlabel("prompt tokens")
    left.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=3)
    left.set_title("where each prompt token's KV came from")
    for run, colour in ((without, "tab:red"), (with_tier, "tab:blue")):
        t = [1e3 * x for x in run.ttfts]
        right.plot(t, [(i + 1) / len(t) for i in range(len(t))], drawstyle="steps-post", color=colour,
                   label=run.label)
    right.set_xlabel("TTFT, ms (modelled device time)")
    right.set_ylabel("fraction of requests")
    right.legend(fontsize=8)
    right.set_title("time to first token")
    fig.tight_layout()
    return fig
