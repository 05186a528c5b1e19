"""Wrong answers to chapter 9's router exercises (9.1 KVIndex, 9.2 choose_replica_kv), planted in the reference
solution, for tests/graders/test_ch09_routing.py::test_planted_mistakes_are_caught; and valid answers written
differently, for test_valid_alternatives_pass. Records are tests/graders/planted.py's `Mistake`: `check` names the
grader's check (test_ch09_routing.CHECKS) that must catch it; `points_at` the regexes one of which the line the
learner reads must match.

Several mistakes route well on an easy workload (a removal applied to every replica only costs hits; a clear that
forgets the replica changes no choice while the loads decide): only a grader that checks the index after each
event, per replica, catches them. `build(name)` returns an object with `.KVIndex` and `.choose_replica_kv` that
the graders' check functions accept in place of load_impl("kv_router").
"""
from __future__ import annotations

import types

from helpers.course.engine.kv_events import AllBlocksCleared, BlockRemoved, BlockStored
from tests.graders.planted import Mistake

I, C = "index_events", "choose"

MISTAKES = [
    Mistake("9.1", "removed_everywhere", "BlockRemoved removes the hashes from every replica",
            (r"r1 still holds", r"other replicas keep"), check=I),
    Mistake("9.1", "clear_ignored", "AllBlocksCleared changes nothing", (r"AllBlocksCleared empties",), check=I),
    Mistake("9.1", "clear_forgets_replica", "AllBlocksCleared makes the replica unknown",
            (r"a cleared replica is still known",), check=I),
    Mistake("9.1", "count_anywhere", "longest_prefix counts every held hash, not the leading run",
            (r"LEADING blocks", r"FIRST block"), check=I),
    Mistake("9.1", "stale_remove_raises", "a removal of a hash the replica does not hold raises KeyError",
            (r"removal of a block the replica does not hold is ignored",), check=I),
    Mistake("9.1", "medium_ignored", "CPU-tier events counted as device blocks", (r"only the device tier",), check=I),
    Mistake("9.1", "unknown_event_ignored", "an unknown event silently ignored", (r"must raise TypeError",), check=I),
    Mistake("9.1", "drop_keeps_blocks", "drop_replica leaves the replica in the index",
            (r"dropped replica", r"drop_replica forgets"), check=I),
    Mistake("9.2", "load_only", "overlaps ignored", (r"longest prefix",), check=C),
    Mistake("9.2", "affinity_only", "loads ignored (pure cache affinity)", (r"least loaded", r"load term"), check=C),
    Mistake("9.2", "weight_on_load", "the weight multiplies the load, not the prefill blocks",
            (r"the weight", r"weight 0"), check=C),
    Mistake("9.2", "highest_cost", "the replica of HIGHEST cost", (r"expected 'r1'",), check=C),
    Mistake("9.2", "sign_flipped", "cached blocks added to the cost instead of saved", (r"longest prefix",), check=C),
    Mistake("9.2", "down_replica_chosen", "candidates taken from overlaps: a replica that is down is chosen",
            (r"no candidate", r"loads only"), check=C),
    Mistake("9.2", "ties_to_last", "ties go to the last replica", (r"smaller load", r"first in loads"), check=C),
]

ALTERNATIVES = [
    Mistake("9.1", "per_replica_lists", "one list of hashes per replica, no holders map, each replica walked alone",
            (), check=I),
    Mistake("9.1", "per_replica_lists_random", "the same on the seeded random stream", (), check="index_random"),
    Mistake("9.2", "sorted_costs_in_tokens", "costs in tokens (× block_size, an affine change) and sorted()", (),
            check=C),
]


def build(name: str | None):
    """The reference implementation with `name` planted (None: unmodified)."""
    import solutions.kv_router as sol
    impl = types.SimpleNamespace(KVIndex=sol.KVIndex, choose_replica_kv=sol.choose_replica_kv)
    if name is not None:
        _PLANT[name](sol, impl)
    return impl


def _index(**methods):
    def plant(sol, impl):
        impl.KVIndex = type("KVIndex", (sol.KVIndex,), methods)
    return plant


def _choose(fn):
    def plant(sol, impl):
        impl.choose_replica_kv = fn
    return plant


# ------------------------------------------------------------------------------------------------ 9.1

def _removed_everywhere(self, replica, event):
    if isinstance(event, BlockRemoved) and event.medium in ("GPU", None):
        self.replicas.setdefault(replica, set())
        for held in self.replicas.values():
            held.difference_update(event.block_hashes)
        for h in event.block_hashes:
            self.holders.pop(h, None)
        return
    super(type(self), self).apply_event(replica, event)


def _clear_ignored(self, replica, event):
    if isinstance(event, AllBlocksCleared):
        self.replicas.setdefault(replica, set())
        return
    super(type(self), self).apply_event(replica, event)


def _clear_forgets_replica(self, replica, event):
    if isinstance(event, AllBlocksCleared):
        self.drop_replica(replica)
        return
    super(type(self), self).apply_event(replica, event)


def _count_anywhere(self, block_hashes):
    return {r: sum(1 for h in block_hashes if h in held) for r, held in self.replicas.items()}


def _stale_remove_raises(self, replica, event):
    if isinstance(event, BlockRemoved) and event.medium in ("GPU", None):
        held = self.replicas.setdefault(replica, set())
        for h in event.block_hashes:
            held.remove(h)                         # KeyError on a hash it does not hold
            self.holders[h].discard(replica)
        return
    super(type(self), self).apply_event(replica, event)


def _medium_ignored(self, replica, event):
    if isinstance(event, (BlockStored, BlockRemoved)) and event.medium not in ("GPU", None):
        event = BlockStored(event.block_hashes, None, (), 0) if isinstance(event, BlockStored) \
            else BlockRemoved(event.block_hashes)
    super(type(self), self).apply_event(replica, event)


def _unknown_event_ignored(self, replica, event):
    if not isinstance(event, (BlockStored, BlockRemoved, AllBlocksCleared)):
        return
    super(type(self), self).apply_event(replica, event)


def _drop_keeps_blocks(self, replica):
    pass


# ------------------------------------------------------------------------------------------------ 9.2

def _cost_choice(cost):
    def choose(overlaps, loads, request_blocks, overlap_score_weight=1.0):
        if not loads:
            raise ValueError("no replica")
        if overlap_score_weight < 0:
            raise ValueError("negative weight")
        order = list(loads)
        return min(order, key=lambda r: (cost(overlaps.get(r, 0), loads[r], request_blocks, overlap_score_weight),
                                         loads[r], order.index(r)))
    return choose


def _highest_cost(overlaps, loads, request_blocks, overlap_score_weight=1.0):
    if not loads or overlap_score_weight < 0:
        raise ValueError("no replica or a negative weight")
    return max(loads, key=lambda r: overlap_score_weight * (request_blocks - overlaps.get(r, 0)) + loads[r])


def _down_replica_chosen(overlaps, loads, request_blocks, overlap_score_weight=1.0):
    if not loads or overlap_score_weight < 0:
        raise ValueError("no replica or a negative weight")
    candidates = list(dict.fromkeys([*loads, *overlaps]))
    order = list(candidates)
    return min(candidates, key=lambda r: (overlap_score_weight * (request_blocks - overlaps.get(r, 0))
                                          + loads.get(r, 0), loads.get(r, 0), order.index(r)))


def _ties_to_last(overlaps, loads, request_blocks, overlap_score_weight=1.0):
    if not loads or overlap_score_weight < 0:
        raise ValueError("no replica or a negative weight")
    best, best_cost = None, None
    for r, load in loads.items():
        cost = overlap_score_weight * (request_blocks - overlaps.get(r, 0)) + load
        if best_cost is None or cost <= best_cost:
            best, best_cost = r, cost
    return best


# ------------------------------------------------------------------------------------------------ valid answers

class _PerReplicaLists:
    """A different shape: {replica: list of hashes in arrival order}; each replica's prefix walked alone."""

    def __init__(self):
        self.lists = {}

    def add_replica(self, replica):
        self.lists.setdefault(replica, [])

    def apply_event(self, replica, event):
        if not isinstance(event, (BlockStored, BlockRemoved, AllBlocksCleared)):
            raise TypeError(f"unknown event {event!r}")
        held = self.lists.setdefault(replica, [])
        if isinstance(event, AllBlocksCleared):
            held.clear()
        elif event.medium in ("GPU", None):
            if isinstance(event, BlockStored):
                held.extend(h for h in event.block_hashes if h not in held)
            else:
                held[:] = [h for h in held if h not in set(event.block_hashes)]

    def longest_prefix(self, block_hashes):
        out = {}
        for replica, held in self.lists.items():
            n = 0
            while n < len(block_hashes) and block_hashes[n] in held:
                n += 1
            out[replica] = n
        return out

    def drop_replica(self, replica):
        self.lists.pop(replica, None)

    def blocks_of(self, replica):
        return frozenset(self.lists.get(replica, ()))


def _sorted_costs_in_tokens(overlaps, loads, request_blocks, overlap_score_weight=1.0, block_size=16):
    if not loads:
        raise ValueError("no replica to route to")
    if overlap_score_weight < 0:
        raise ValueError("negative weight")
    ranked = sorted(enumerate(loads), key=lambda item: (
        block_size * (overlap_score_weight * (request_blocks - overlaps.get(item[1], 0)) + loads[item[1]]),
        loads[item[1]], item[0]))
    return ranked[0][1]


def _alternative_index(sol, impl):
    impl.KVIndex = _PerReplicaLists


_PLANT = {
    "removed_everywhere": _index(apply_event=_removed_everywhere),
    "clear_ignored": _index(apply_event=_clear_ignored),
    "clear_forgets_replica": _index(apply_event=_clear_forgets_replica),
    "count_anywhere": _index(longest_prefix=_count_anywhere),
    "stale_remove_raises": _index(apply_event=_stale_remove_raises),
    "medium_ignored": _index(apply_event=_medium_ignored),
    "unknown_event_ignored": _index(apply_event=_unknown_event_ignored),
    "drop_keeps_blocks": _index(drop_replica=_drop_keeps_blocks),
    "load_only": _choose(_cost_choice(lambda overlap, load, blocks, w: load)),
    "affinity_only": _choose(_cost_choice(lambda overlap, load, blocks, w: blocks - overlap)),
    "weight_on_load": _choose(_cost_choice(lambda overlap, load, blocks, w: (blocks - overlap) + w * load)),
    "highest_cost": _choose(_highest_cost),
    "sign_flipped": _choose(_cost_choice(lambda overlap, load, blocks, w: w * overlap + load)),
    "down_replica_chosen": _choose(_down_replica_chosen),
    "ties_to_last": _choose(_ties_to_last),
    "per_replica_lists": _alternative_index,
    "per_replica_lists_random": _alternative_index,
    "sorted_costs_in_tokens": _choose(_sorted_costs_in_tokens),
}
