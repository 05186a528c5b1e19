"""The router in front of the replicas: it hashes each request's prompt, asks its policy for a replica, and keeps
what every policy may need — which requests are outstanding where, which replicas are up — and feeds the KV
events the replicas publish to the policy.

    router = Router(replicas=[0, 1, 2, 3], policy=KVAware(), block_size=16)
    replica = router.route(request)                  # hashes the prompt (exercise 7.3's block_hashes), chooses
    router.finished(replica, request.rid)            # the request left the replica
    router.deliver(replica, events)                  # KV events from the replica, in order
    router.replica_down(replica); router.replica_up(replica)

The hashes are the engines' own (load_impl("prefix_cache").block_hashes, the chain vLLM computes in
vllm/v1/core/kv_cache_utils.py), so the router's hash of a prompt's block i equals the hash the replica publishes
when it caches that block. An event the policy cannot apply (an unknown type, a malformed one) is logged, counted
in `metrics["events_rejected"]` and skipped: one bad event must not take the router down (llm-d's event pool logs
and skips an undecodable message: llm-d/llm-d-kv-cache pkg/kvevents/pool.go).

A stream that stops: with `stale_after` seconds set, a KV-aware router whose replica has published nothing for that
long while it had requests outstanding there (a replica computing requests publishes BlockStored every few steps)
treats that replica's index entries as unknown: it routes on load alone for it, and says so
(`metrics["stale_replicas"]`), until an event arrives again.
"""
from __future__ import annotations

import logging

from helpers.impl import load_impl

__all__ = ["Router", "VLLM_NONE_HASH", "vllm_block_hashes"]

log = logging.getLogger(__name__)

# vLLM 0.32's parent of a sequence's first block with its default sha256 hashing and PYTHONHASHSEED unset:
# sha256(pickle("vllm-none-hash")) (vllm/v1/core/kv_cache_utils.py init_none_hash, resolve_none_hash_seed;
# vllm/utils/hashing.py sha256). The course's engines use 32 zero bytes (labs/prefix_cache.py NONE_HASH).
VLLM_NONE_HASH = bytes.fromhex("066b1e8987e027138e98701c46128929378935f9b6cd1549105ae6b4f0d71198")


def vllm_block_hashes(token_ids, block_size: int, cache_salt: str | None = None) -> list:
    """The block hashes a vLLM 0.32 replica publishes for these tokens (unsalted requests): the course's chain
    (exercise 7.3) continued from vLLM's NONE_HASH, which is what vLLM's hash_block_tokens computes when a block
    has no parent. A salted request's first block carries the salt in vLLM; this helper does not model that."""
    if cache_salt:
        raise ValueError("vllm_block_hashes models unsalted requests only")
    return load_impl("prefix_cache").block_hashes(token_ids, block_size, parent=VLLM_NONE_HASH)


class Router:
    """replicas: ids in the router's order; policy: policies.py; block_size: the replicas' KV block size;
    hasher: block_hashes(token_ids, block_size, cache_salt=...) of the replicas' engine (default the course's,
    exercise 7.3; vllm_block_hashes for vLLM replicas)."""

    def __init__(self, replicas, policy, block_size: int = 16, stale_after: float | None = None, hasher=None):
        self.replicas, self.policy, self.block_size = list(replicas), policy, block_size
        self.live = list(self.replicas)
        self.stale_after = stale_after
        self.outstanding: dict = {r: {} for r in self.replicas}      # replica -> {rid: blocks}
        self.last_event: dict = {r: None for r in self.replicas}     # replica -> time of its last event
        self.since: dict = {r: None for r in self.replicas}          # replica -> when it last went from 0 requests
        self.metrics = {"routed": {r: 0 for r in self.replicas}, "events_applied": 0, "events_rejected": 0,
                        "stale_replicas": [], "stale_routings": 0}
        self.promised: dict = {}       # rid -> blocks the policy expected cached where it sent it (None: no idea)
        self._hash = hasher or load_impl("prefix_cache").block_hashes
        for r in self.live:
            self.policy.replica_up(r)

    # ------------------------------------------------------------------ what policies read
    def outstanding_requests(self) -> dict:
        return {r: len(self.outstanding[r]) for r in self.live}

    def outstanding_blocks(self) -> dict:
        """{replica: KV blocks of the requests outstanding there} (Dynamo's active blocks), live replicas only."""
        return {r: sum(self.outstanding[r].values()) for r in self.live}

    # ------------------------------------------------------------------ requests
    def route(self, request, now: float = 0.0):
        if not self.live:
            raise RuntimeError("no replica is up: nothing to route to")
        hashes = self._hash(request.prompt, self.block_size, cache_salt=request.cache_salt)
        stale = self._stale(now)
        if stale and self.policy.uses_events:
            # entries of a silent replica are unknown: hide them from the policy for this decision
            hidden = {r: self.policy.index.blocks_of(r) for r in stale}
            for r in stale:
                self.policy.index.drop_replica(r)
                self.policy.index.add_replica(r)
            try:
                replica = self.policy.choose(self, request, hashes)
            finally:
                for r, blocks in hidden.items():
                    for event in _restore(blocks):
                        self.policy.index.apply_event(r, event)
            self.metrics["stale_routings"] += 1
        else:
            replica = self.policy.choose(self, request, hashes)
        if replica not in self.live:
            raise RuntimeError(f"policy {self.policy.name!r} chose replica {replica!r}, which is not up "
                               f"(up: {self.live})")
        if not self.outstanding[replica]:
            self.since[replica] = now
        self.outstanding[replica][request.rid] = -(-request.num_prompt_tokens // self.block_size)
        self.metrics["routed"][replica] += 1
        promised = getattr(self.policy, "last_overlap", None)      # the last token's block never hits: not counted
        self.promised[request.rid] = None if promised is None else \
            min(promised, (request.num_prompt_tokens - 1) // self.block_size)
        self.policy.routed(replica, request, hashes)
        return replica

    def finished(self, replica, rid) -> None:
        self.outstanding[replica].pop(rid, None)

    # ------------------------------------------------------------------ events
    def deliver(self, replica, events, now: float = 0.0) -> None:
        """Apply a batch of KV events from `replica`, in order; a bad one is logged and skipped."""
        if replica not in self.live:
            return                                       # a dead replica's late events: its entries are gone
        self.last_event[replica] = now
        for event in events:
            try:
                self.policy.on_event(replica, event)
                self.metrics["events_applied"] += 1
            except (TypeError, ValueError, AttributeError) as exc:
                self.metrics["events_rejected"] += 1
                log.warning("replica %r: KV event skipped (%s: %s)", replica, type(exc).__name__, exc)

    def _stale(self, now: float) -> list:
        if self.stale_after is None:
            return []
        stale = []
        for r in self.live:
            heard = self.last_event[r] if self.last_event[r] is not None else self.since[r]
            if self.outstanding[r] and heard is not None and now - max(heard, self.since[r] or heard) \
                    > self.stale_after:
                stale.append(r)
        for r in stale:
            if r not in self.metrics["stale_replicas"]:
                self.metrics["stale_replicas"].append(r)
        return stale

    # ------------------------------------------------------------------ replicas
    def replica_down(self, replica) -> list:
        """The replica died: it leaves the pool, the policy forgets it. Returns the rids that were outstanding
        there (the caller retries them)."""
        if replica in self.live:
            self.live.remove(replica)
        self.policy.replica_down(replica)
        lost = list(self.outstanding[replica])
        self.outstanding[replica].clear()
        return lost

    def replica_up(self, replica) -> None:
        if replica not in self.live:
            self.live.append(replica)
            self.live.sort(key=self.replicas.index)
        self.last_event[replica] = None
        self.policy.replica_up(replica)


def _restore(blocks):
    from helpers.course.engine.kv_events import BlockStored
    if blocks:
        yield BlockStored(tuple(blocks), None, (), 0)
