"""The engine's bookkeeping that no schedule, token or event may notice: Scheduler.schedule(skip=...) (a
pipeline's requests in flight), KV events computed from what changed, and request.block_hashes computed once per
block. Each is compared with the plain way of doing it (a copy of the cache map before and after; hashing the
prompt again), which the engine used before. Runs with the reference answers (COURSE_IMPL=solutions)."""
import random

import pytest

from helpers.course.engine import (BlockRemoved, KVCacheManager, KVEventLog, LLMEngine, Request, SchedulerConfig,
                                   run_requests)
from helpers.course.engine.scheduler import Scheduler, ScheduleError, StepPlan
from helpers.impl import load_impl
from tests.test_engine import random_workload


# ---------------------------------------------------------------------------------------------- skip
def _running(scheduler, n, prompt_len=4):
    for i in range(n):
        scheduler.add_request(Request(i, list(range(1, prompt_len + 1)), 8))
    scheduler.schedule()
    for request in scheduler.running:
        request.num_computed_tokens = request.num_tokens
        request.tokens.append(7)


def test_a_skipped_request_keeps_its_place_and_its_seat():
    """vLLM's scheduler passes over a request whose previous step has not come back (0 new tokens); it stays in
    the running queue, in its place, and still counts toward max_num_seqs."""
    scheduler = Scheduler(KVCacheManager(32, 4), SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=3))
    _running(scheduler, 3)
    scheduler.add_request(Request(9, [5, 6, 7], 4))
    output = scheduler.schedule(skip={1})
    assert list(output.num_scheduled_tokens) == [0, 2] and not output.admitted
    assert [r.rid for r in scheduler.running] == [0, 1, 2] and [r.rid for r in scheduler.waiting] == [9]
    for request in output.scheduled:
        request.num_computed_tokens += 1
    scheduler.finish(scheduler.running[2])              # a seat frees: the waiting request joins, last
    output = scheduler.schedule(skip={0, 1})
    assert list(output.num_scheduled_tokens) == [9] and [r.rid for r in scheduler.running] == [0, 1, 9]
    assert not scheduler.schedule(skip={0, 1, 9}).num_scheduled_tokens


def test_a_step_that_schedules_a_skipped_request_is_refused():
    def greedy(running, waiting, kv, config):                # ignores what it was shown
        return StepPlan({r.rid: 1 for r in everyone})
    scheduler = Scheduler(KVCacheManager(32, 4), SchedulerConfig(max_num_batched_tokens=64))
    _running(scheduler, 2)
    everyone = list(scheduler.running)
    scheduler.schedule_step = greedy
    with pytest.raises(ScheduleError, match="previous step has not come back"):
        scheduler.schedule(skip={1})


# ---------------------------------------------------------------------------------------------- KV events
class _Snapshot:
    """The plain way: the cache map's hashes before, compared with the map after."""

    def __init__(self, cached):
        self.cached, self.before = cached, set(cached)

    def take(self):
        return ([h for h in self.before if h not in self.cached], [h for h in self.cached if h not in self.before])


class SnapshotKV(KVCacheManager):
    def _changes(self):
        return _Snapshot(self.block_manager.cached) if self.enable_caching and self.events is not None else None


def _events(kv_class, seed):
    block_size, num_blocks, _, config, specs = random_workload(seed)
    log = KVEventLog()
    engine = LLMEngine.modelled(kv=kv_class(num_blocks, block_size, True, events=log), config=config)
    run_requests(engine, [Request(i, p, m, arrival=float(t), cache_salt="b" if i % 3 == 2 else None)
                          for i, p, m, t in specs])
    # a BlockRemoved's hashes came in set order before (PYTHONHASHSEED's); now in eviction order
    return [(type(e).__name__, tuple(sorted(e.block_hashes)) if isinstance(e, BlockRemoved) else e)
            for e in log.events]


def test_kv_events_from_the_changes_are_the_snapshot_difference():
    removed = 0
    for seed in range(40):
        events = _events(KVCacheManager, seed)
        assert events == _events(SnapshotKV, seed), f"seed {seed}"
        removed += sum(1 for kind, _ in events if kind == "BlockRemoved")
    assert removed >= 10, "the workloads should evict"


# ---------------------------------------------------------------------------------------------- block hashes
def test_request_block_hashes_follow_its_tokens():
    hasher = load_impl("prefix_cache").block_hashes
    request = Request(0, list(range(1, 11)), 8, cache_salt="s")
    assert request.block_hashes_upto(99, 4, hasher) == hasher(request.all_token_ids, 4, cache_salt="s")
    assert len(request.block_hashes) == 2
    request.tokens.extend([3, 4, 5])                         # tokens arrive: the chain goes on
    assert request.block_hashes_upto(99, 4, hasher) == hasher(request.all_token_ids, 4, cache_salt="s")
    assert request.block_hashes_upto(99, 8, hasher) == hasher(request.all_token_ids, 8, cache_salt="s")
    request.tokens = [9, 9]                                  # a new list: computed again
    assert request.block_hashes_upto(99, 4, hasher) == hasher(request.all_token_ids, 4, cache_salt="s")
    request.cache_salt = None
    assert request.block_hashes_upto(5, 4, hasher) == hasher(request.all_token_ids[:4], 4)


def test_a_waiting_prompt_is_hashed_once_not_every_step(monkeypatch):
    """The head of the waiting queue is looked up at every step it cannot be admitted; its prompt's blocks are
    hashed once (request.block_hashes), not at every lookup."""
    module = load_impl("prefix_cache")
    hashed = []
    original = module.hash_block_tokens
    monkeypatch.setattr(module, "hash_block_tokens", lambda p, ids, extra=None: hashed.append(tuple(ids)) or
                        original(p, ids, extra))
    rng = random.Random(3)
    kv = KVCacheManager(8, 4, True, events=KVEventLog())
    engine = LLMEngine.modelled(kv=kv, config=SchedulerConfig(max_num_batched_tokens=4))
    engine.add_request(Request(0, [rng.randrange(256) for _ in range(28)], 4))      # 7, then all 8 blocks
    waiting = Request(1, [rng.randrange(256) for _ in range(12)], 4)
    engine.add_request(waiting)
    lookups, lookup = [], kv.get_computed_blocks
    kv.get_computed_blocks = lambda request: lookups.append(request.rid) or lookup(request)
    first = tuple(waiting.prompt[:4])
    while True:
        engine.step()
        if waiting not in engine.waiting:
            break
        assert hashed.count(first) <= 1, f"the waiting prompt's first block hashed {hashed.count(first)} times"
        before = len(lookups)
    assert lookups[:before].count(1) >= 3, "it should have been looked up at several steps"
    while engine.has_unfinished:
        engine.step()
    assert waiting.tokens and len(waiting.tokens) == 4


def test_a_block_removed_event_lists_the_blocks_in_eviction_order():
    """Least recently used first, and a freed request's tail before its head (what chapter 9's notebook shows)."""
    rng = random.Random(0)
    system = [rng.randrange(256) for _ in range(40)]
    log = KVEventLog()
    engine = LLMEngine.modelled(kv=KVCacheManager(8, 16, True, events=log))
    hashes = {}
    for rid, prompt in (("a", system + [1] * 10), ("b", system + [2] * 10), ("c", list(range(100)))):
        run_requests(engine, [Request(rid, prompt, 4, arrival=0.0)])
        hashes[rid] = load_impl("prefix_cache").block_hashes(prompt, 16)
    removed = [e.block_hashes for e in log.events if isinstance(e, BlockRemoved)]
    assert removed == [(hashes["a"][2], hashes["b"][2], hashes["a"][1])]
