"""Chapter 9: routing on KV events — send each request to the replica that already holds its prefix.

Exercise 9.1  `KVIndex`: the router's global index of which KV blocks each replica holds, kept up to date by the
              replicas' KV events (BlockStored / BlockRemoved / AllBlocksCleared, helpers/course/engine/kv_events.py,
              the three events vLLM publishes with `--kv-events-config`: vllm/distributed/kv_events.py), and for a
              new request's block hashes, the longest cached prefix on each replica.
Exercise 9.2  `choose_replica_kv`: NVIDIA Dynamo's KV router cost — for each replica, the blocks the request
              would still have to prefill there (weighted) plus the blocks its running requests already hold —
              and the cheapest replica.

Block hashes are the engine's (exercise 7.3's `block_hashes`, vLLM's SHA-256 chain,
vllm/v1/core/kv_cache_utils.py `hash_block_tokens`): every replica hashes the same tokens to the same bytes, and a
block's hash covers every token before it, so "replica r holds the first k blocks of this request" is "r holds
hashes h_0 .. h_{k-1}". The index keeps a set of holders per hash, as llm-d's KV-cache indexer does
(llm-d/llm-d-kv-cache-manager pkg/kvcache/kvblock_scorer.go: LongestPrefixScorer intersects the pods that hold
key 0, key 1, ... and scores each pod by how long it stays in; llm-d/llm-d-kv-cache pkg/kvevents/pool.go applies
BlockStored / BlockRemoved per pod and clears a pod's entries on AllBlocksCleared), and as Dynamo's KvIndexer does
with a radix tree of block hashes (ai-dynamo/dynamo lib/llm/src/kv_router/indexer.rs).

The cost is Dynamo's default worker selector (ai-dynamo/dynamo lib/kv-router/src/scheduling/selector.rs,
DefaultWorkerSelector; lib/llm/src/kv_router/scheduler.rs in earlier releases):

    logit(r) = overlap_score_weight × prefill_blocks(r) + decode_blocks(r)        lowest wins (temperature 0)

A weight of 0 is pure load balancing; a large weight is pure cache affinity (the load term only breaks ties).
The helpers around these exercises (the workload, the policies, the replay of several engines behind a router)
are given in helpers/course/routing/.
"""
from __future__ import annotations

from helpers.course.engine.kv_events import AllBlocksCleared, BlockRemoved, BlockStored

DEVICE_MEDIA = ("GPU", None)      # vLLM's name for the device tier (None: not said); "CPU" is an offload tier


class KVIndex:
    """Exercise 9.1 — which block hashes each replica holds, from the events the replicas publish.

    State (set up in __init__; a learner may keep other state, the graders read only the methods):
      holders   {block hash: set of replicas whose device cache holds it}
      replicas  {replica: set of the block hashes it holds}, for every replica known to the index (one that
                sent an event, or was added with add_replica, and was not dropped)

    apply_event(replica, event): apply ONE event from `replica` (replica: any hashable id, e.g. 0 or "r0"):
        BlockStored   its block_hashes are now held by the replica (parent_block_hash and token_ids are not
                      needed: the hashes already chain the prefix)
        BlockRemoved  its block_hashes are no longer held by the replica; a hash the replica does not hold (a
                      late event, a removal after a clear) is ignored; other replicas holding it keep it
        AllBlocksCleared   the replica holds nothing (its prefix cache was reset, or it restarted); it stays known
      An event whose `medium` is not the device tier ("GPU", or None) is about another tier (vLLM's offloading
      connector publishes medium "CPU"): ignored, but the replica becomes known. Any event makes its replica known.
      Anything else raises TypeError naming the type, with the index unchanged (the router logs it and goes on).
    add_replica(replica): the replica is known, holding nothing (a replica that is up but has published nothing).
    longest_prefix(block_hashes) -> {replica: k} for EVERY known replica: k = how many LEADING hashes of
        block_hashes (h_0, h_1, ... in order) the replica holds, stopping at its first miss (a replica holding h_1
        but not h_0 has k = 0: a prefix cache hit starts at the first block). Changes nothing.
    drop_replica(replica): forget the replica (it died, or left the pool): none of its entries remain and it is
        no longer in longest_prefix's answer. Unknown replica: nothing happens.
    blocks_of(replica) -> frozenset of the hashes the index says the replica holds (empty if unknown).
    """

    def __init__(self):
        self.holders: dict = {}
        self.replicas: dict = {}

    def add_replica(self, replica) -> None:
        self.replicas.setdefault(replica, set())

    def apply_event(self, replica, event) -> None:
        if not isinstance(event, (BlockStored, BlockRemoved, AllBlocksCleared)):
            raise TypeError(f"replica {replica!r} sent an unknown KV event {type(event).__name__}: "
                            f"expected BlockStored, BlockRemoved or AllBlocksCleared")
        held = self.replicas.setdefault(replica, set())
        if isinstance(event, AllBlocksCleared):
            _forget_all(self, replica, held)
            return
        if event.medium not in DEVICE_MEDIA:
            return
        if isinstance(event, BlockStored):
            for h in event.block_hashes:
                held.add(h)
                self.holders.setdefault(h, set()).add(replica)
        else:
            for h in event.block_hashes:
                if h in held:
                    held.discard(h)
                    _unhold(self, h, replica)

    def longest_prefix(self, block_hashes) -> dict:
        matched = dict.fromkeys(self.replicas, 0)
        active = set(self.replicas)
        for h in block_hashes:
            active &= self.holders.get(h, set())
            if not active:
                break
            for replica in active:
                matched[replica] += 1
        return matched

    def drop_replica(self, replica) -> None:
        held = self.replicas.pop(replica, None)
        if held is not None:
            _forget_all(self, replica, held)

    def blocks_of(self, replica) -> frozenset:
        return frozenset(self.replicas.get(replica, ()))


def choose_replica_kv(overlaps: dict, loads: dict, request_blocks: int, overlap_score_weight: float = 1.0):
    """Exercise 9.2 — the replica with the lowest Dynamo cost for a request of `request_blocks` blocks.

    overlaps: {replica: blocks of the request's prefix cached there} (KVIndex.longest_prefix; a replica missing
        here has 0; a replica here but not in `loads` is not a candidate: it is down, or not ours).
    loads: {replica: decode blocks, the KV blocks its running and queued requests already hold} — the candidates,
        in the router's order.
    request_blocks: the request's blocks (its prompt's, >= every overlap).

        cost(r) = overlap_score_weight × (request_blocks - overlaps.get(r, 0)) + loads[r]

    Returns the replica of lowest cost; among equal costs the one with the smallest load, then the first in
    `loads` order (deterministic, so a replay is reproducible: Dynamo samples among them at temperature 0).
    overlap_score_weight >= 0: 0 routes on load alone; a large weight routes on the cache alone (load breaks
    ties). Raises ValueError when `loads` is empty (no replica to route to) or the weight is negative.
    """
    if not loads:
        raise ValueError("no replica to route to: loads is empty")
    if overlap_score_weight < 0:
        raise ValueError(f"overlap_score_weight={overlap_score_weight} must be >= 0")
    best, best_key = None, None
    for replica, load in loads.items():
        cost = overlap_score_weight * (request_blocks - overlaps.get(replica, 0)) + load
        key = (cost, load)
        if best_key is None or key < best_key:
            best, best_key = replica, key
    return best


def _unhold(index: KVIndex, h, replica) -> None:
    owners = index.holders.get(h)
    if owners is not None:
        owners.discard(replica)
        if not owners:
            del index.holders[h]


def _forget_all(index: KVIndex, replica, held: set) -> None:
    for h in held:
        _unhold(index, h, replica)
    held.clear()
