"""Routing policies: which replica gets the next request, and what each one knows to decide.

    RoundRobin()           nothing: replica 0, 1, 2, ... in turn (chapter 6's balancer default)
    LeastOutstanding()     the requests it sent that have not finished, per replica (chapter 6's other policy)
    KVAware(weight)        the replicas' KV events, applied to the learner's index (exercise 9.1, KVIndex), and the
                           blocks each replica's requests hold: Dynamo's cost (exercise 9.2, choose_replica_kv).
                           weight: Dynamo's --kv-overlap-score-weight (ai-dynamo/dynamo docs/router/README.md);
                           a large weight is pure cache affinity
    ApproxTree()           no events: it PREDICTS each replica's cache from the requests it sent there, as SGLang's
                           cache-aware router does (sgl-project/sglang sgl-router/src/policies/cache_aware.rs: an
                           approximate radix tree per worker; when the load is imbalanced — max - min > abs
                           threshold AND max > rel threshold × min — the shortest queue; otherwise the worker with
                           the longest match if the match rate is above cache_threshold, else the worker with the
                           smallest tree), and as Dynamo's router does with --no-kv-events (ApproxKvIndexer,
                           ai-dynamo/dynamo lib/llm/src/kv_router/approx.rs)

A policy is called by the Router (router.py) with the request and its block hashes; `choose(router, request,
hashes)` returns a replica among router.live; `routed` tells it where the request went; `on_event` hands it one KV
event (only KVAware uses them); `replica_down` / `replica_up` tell it a replica died / came back.
SGLang's tree holds text characters and evicts by size on a timer, Dynamo's approximate indexer expires entries after
a TTL (120 s by default) and prunes by size; ApproxTree holds block hashes (the same chain the engines hash) and keeps
at most `capacity` of them per replica, least recently routed evicted first. None of them sees an eviction or a
restart: what they predict can be gone (the replay counts those blocks as `missed_promises`).
"""
from __future__ import annotations

import itertools
from collections import OrderedDict

from helpers.impl import load_impl

__all__ = ["Policy", "RoundRobin", "LeastOutstanding", "KVAware", "ApproxTree", "matched_prefix"]


def matched_prefix(held, hashes) -> int:
    """How many leading `hashes` are in `held` (stops at the first miss)."""
    n = 0
    for h in hashes:
        if h not in held:
            break
        n += 1
    return n


class Policy:
    """The interface; the default hooks do nothing."""
    name = "policy"
    uses_events = False

    def choose(self, router, request, hashes):
        raise NotImplementedError

    def routed(self, replica, request, hashes) -> None:
        pass

    def on_event(self, replica, event) -> None:
        pass

    def replica_down(self, replica) -> None:
        pass

    def replica_up(self, replica) -> None:
        pass


class RoundRobin(Policy):
    name = "round robin"

    def __init__(self):
        self._turn = itertools.count()

    def choose(self, router, request, hashes):
        return router.live[next(self._turn) % len(router.live)]


class LeastOutstanding(Policy):
    name = "least outstanding"

    def choose(self, router, request, hashes):
        counts = router.outstanding_requests()
        return min(router.live, key=lambda r: counts[r])      # ties: the first in router.live


class KVAware(Policy):
    """KV events → the learner's KVIndex; Dynamo's cost → the learner's choose_replica_kv (COURSE_IMPL's
    kv_router). A replica's load is the blocks of the requests the router sent it that have not finished (Dynamo's
    router tracks these itself: ActiveSequences, lib/llm/src/kv_router/sequence.rs)."""
    uses_events = True

    def __init__(self, overlap_score_weight: float = 1.0, name: str | None = None):
        impl = load_impl("kv_router")
        self.index, self.choose_replica_kv = impl.KVIndex(), impl.choose_replica_kv
        self.overlap_score_weight = overlap_score_weight
        self.name = name or f"KV events (weight {overlap_score_weight:g})"
        self.last_overlap = 0              # blocks the index promised for the last request routed (for figures)

    def choose(self, router, request, hashes):
        overlaps = self.index.longest_prefix(hashes)
        request_blocks = -(-request.num_prompt_tokens // router.block_size)
        replica = self.choose_replica_kv(overlaps, router.outstanding_blocks(), request_blocks,
                                         self.overlap_score_weight)
        self.last_overlap = overlaps.get(replica, 0)
        return replica

    def on_event(self, replica, event) -> None:
        self.index.apply_event(replica, event)

    def replica_down(self, replica) -> None:
        self.index.drop_replica(replica)

    def replica_up(self, replica) -> None:
        self.index.add_replica(replica)


class ApproxTree(Policy):
    """SGLang's cache-aware policy on predicted caches (no events). Loads are outstanding requests, as SGLang's
    worker.load(). cache_threshold, balance_abs_threshold, balance_rel_threshold: SGLang's flags of the same names
    (sgl-router/py_src/sglang_router/launch_router.py); the absolute threshold is scaled down to this chapter's few
    concurrent requests per replica. capacity: blocks remembered per replica (SGLang's max_tree_size)."""
    name = "predicted (no events)"

    def __init__(self, cache_threshold: float = 0.5, balance_abs_threshold: int = 4,
                 balance_rel_threshold: float = 1.5, capacity: int = 4096):
        self.cache_threshold = cache_threshold
        self.balance_abs_threshold, self.balance_rel_threshold = balance_abs_threshold, balance_rel_threshold
        self.capacity = capacity
        self.trees: dict = {}
        self.last_overlap = 0              # blocks it predicted cached for the last request routed (for figures)

    def choose(self, router, request, hashes):
        loads = router.outstanding_requests()
        live = router.live
        most, least = max(loads[r] for r in live), min(loads[r] for r in live)
        matches = {r: matched_prefix(self.trees.get(r, ()), hashes) for r in live}
        if most - least > self.balance_abs_threshold and most > self.balance_rel_threshold * least:
            chosen = min(live, key=lambda r: loads[r])
        else:
            best = max(live, key=lambda r: matches[r])
            if hashes and matches[best] / len(hashes) > self.cache_threshold:
                chosen = best
            else:
                chosen = min(live, key=lambda r: len(self.trees.get(r, ())))   # the most room left, as SGLang does
        self.last_overlap = matches[chosen]
        return chosen

    def routed(self, replica, request, hashes) -> None:
        tree = self.trees.setdefault(replica, OrderedDict())
        for h in hashes:
            tree[h] = None
            tree.move_to_end(h)
        while len(tree) > self.capacity:
            tree.popitem(last=False)

    def replica_down(self, replica) -> None:
        self.trees.pop(replica, None)         # SGLang's remove_worker: remove_tenant
