"""Chapter 9's router (helpers/course/routing, with the reference answers of exercises 9.1 and 9.2 and of 7.3/7.4 the
engine calls): the index fed by a real engine's KV events equals the engine's prefix cache after every step, stale
and unknown events, a restart's clear, the score's two terms, the transport's loss and delay, and the chapter's
goals — computed from the replays, against round robin's replay of the same workload."""
import pytest

from helpers.course.engine import (AllBlocksCleared, BlockRemoved, BlockStored, KVCacheManager, KVEventLog,
                                   LLMEngine, Request, SchedulerConfig)
from helpers.course.routing import (ApproxTree, EventChannel, KVAware, LeastOutstanding, RoundRobin, Router,
                                    chat_workload, replay)
from helpers.course.routing.__main__ import AFFINITY_ONLY, CHAPTER_WEIGHT, GOALS, goals
from helpers.course.routing.workload import first_turn, next_turn
from helpers.impl import load_impl


@pytest.fixture(scope="module", autouse=True)
def reference_answers():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("COURSE_IMPL", "solutions")
        yield


def _kv_router():
    return load_impl("kv_router")


def _hashes(tokens, block_size=4):
    return load_impl("prefix_cache").block_hashes(tokens, block_size)


# ------------------------------------------------------------------------------------------ the index and events

def test_index_mirrors_the_engines_prefix_cache_after_every_step():
    """A modelled engine with a pool too small for its prompts (so blocks are evicted) publishes its events; the
    index that applies them holds exactly the engine's cached hashes after every step, and nothing after a reset."""
    log = KVEventLog()
    kv = KVCacheManager(24, 4, enable_caching=True, events=log)
    engine = LLMEngine.modelled(kv, config=SchedulerConfig(max_num_batched_tokens=32, max_num_seqs=4))
    index = _kv_router().KVIndex()
    system = list(range(1, 33))
    for i in range(8):
        engine.add_request(Request(i, system[: 8 + 4 * (i % 4)] + [100 + i] * (3 + i), max_tokens=6, arrival=0.0))
    kinds = set()
    while engine.has_unfinished:
        engine.step()
        for event in log.take():
            kinds.add(type(event).__name__)
            index.apply_event("r0", event)
        assert index.blocks_of("r0") == frozenset(kv.block_manager.cached)
    assert kinds == {"BlockStored", "BlockRemoved"}, f"the run should store and evict blocks, got {kinds}"
    assert kv.reset_prefix_cache()
    for event in log.take():
        index.apply_event("r0", event)
    assert index.blocks_of("r0") == frozenset() and index.longest_prefix(_hashes(system)) == {"r0": 0}


def test_longest_prefix_is_per_replica_and_stops_at_the_first_miss():
    kvr = _kv_router()
    index = kvr.KVIndex()
    a = _hashes(list(range(16)))                  # 4 blocks
    index.apply_event(0, BlockStored(tuple(a), None, tuple(range(16)), 4))
    index.apply_event(1, BlockStored(tuple(a[:2]), None, tuple(range(8)), 4))
    index.apply_event(2, BlockStored(tuple(a[1:]), a[0], tuple(range(4, 16)), 4))
    assert index.longest_prefix(a) == {0: 4, 1: 2, 2: 0}
    index.apply_event(0, BlockRemoved((a[1],)))
    assert index.longest_prefix(a) == {0: 1, 1: 2, 2: 0}
    index.apply_event(1, BlockRemoved((a[3],)))         # stale: replica 1 never held a3
    index.apply_event(0, AllBlocksCleared())
    index.apply_event(0, BlockRemoved((a[0],)))         # late: after the clear
    assert index.longest_prefix(a) == {0: 0, 1: 2, 2: 0}
    with pytest.raises(TypeError):
        index.apply_event(1, {"type": "BlockStored"})
    index.drop_replica(1)
    assert index.longest_prefix(a) == {0: 0, 2: 0} and index.blocks_of(1) == frozenset()


def test_the_costs_two_terms():
    choose = _kv_router().choose_replica_kv
    # equal loads: the longest prefix; equal prefixes: the least loaded
    assert choose({"a": 30, "b": 0}, {"a": 10, "b": 10}, 40) == "a"
    assert choose({"a": 30, "b": 30}, {"a": 50, "b": 10}, 40) == "b"
    # the trade-off moves with the weight: 30 blocks saved vs 50 blocks more load
    assert choose({"a": 30}, {"a": 50, "b": 0}, 40, 1.0) == "b"
    assert choose({"a": 30}, {"a": 50, "b": 0}, 40, CHAPTER_WEIGHT) == "a"
    assert choose({"a": 40}, {"a": 1, "b": 0}, 40, 0.0) == "b"
    assert choose({"down": 40}, {"a": 5, "b": 3}, 40) == "b"
    with pytest.raises(ValueError):
        choose({}, {}, 4)


# ---------------------------------------------------------------------------------------------- router, transport

def test_router_skips_a_bad_event_and_ignores_a_dead_replicas_late_events():
    router = Router([0, 1], KVAware(), block_size=4)
    tokens = list(range(12))
    h = _hashes(tokens)
    router.deliver(0, [BlockStored(tuple(h), None, tuple(tokens), 4), "garbage", BlockRemoved((h[2],))])
    assert router.metrics["events_applied"] == 2 and router.metrics["events_rejected"] == 1
    assert router.policy.index.longest_prefix(h) == {0: 2, 1: 0}
    assert router.route(Request("x", tokens + [99], 4)) == 0          # its prefix is there
    assert router.replica_down(0) == ["x"]                              # outstanding there: the caller retries
    router.deliver(0, [BlockStored(tuple(h), None, tuple(tokens), 4)])  # late, from the dead replica
    assert router.policy.index.longest_prefix(h) == {1: 0}
    assert router.route(Request("y", tokens + [99], 4)) == 1
    router.replica_down(1)
    with pytest.raises(RuntimeError, match="no replica is up"):
        router.route(Request("z", tokens, 4))


def test_event_channel_delays_and_loses_batches():
    channel = EventChannel(delay=0.5, loss=0.25, seed=3)
    for i in range(400):
        channel.publish(i % 2, [AllBlocksCleared()], now=i * 0.01)
    assert 70 <= channel.lost <= 130                  # 25% of 400 batches, seeded
    arrived = list(channel.due(3.0))
    assert all(sent <= 3.0 - 0.5 for _, _, sent in arrived)
    assert [sent for _, _, sent in arrived] == sorted(sent for _, _, sent in arrived)
    channel.drop_replica(1)
    assert all(replica == 0 for replica, _, _ in channel.due(10.0))


def test_workload_is_seeded_and_a_turn_carries_the_conversation():
    w = chat_workload(seed=4)
    assert w == chat_workload(seed=4) and w != chat_workload(seed=5)
    session = w.sessions[0]
    first = first_turn(w, session)
    assert first.prompt[:len(w.system_prompts[session.tenant])] == list(w.system_prompts[session.tenant])
    first.tokens = [7] * first.max_tokens
    second = next_turn(session, first, now=1.0)
    assert second.prompt[:first.num_tokens] == first.all_token_ids and second.arrival >= 1.0
    skewed = chat_workload(seed=4, hot_tenant_share=0.5)
    assert sum(s.tenant == 0 for s in skewed.sessions) > len(skewed.sessions) / 3


# ---------------------------------------------------------------------------------------------- the chapter's goals

@pytest.fixture(scope="module")
def chapter_runs():
    workload = chat_workload(seed=0)
    return {"rr": replay(workload, RoundRobin()), "kv": replay(workload, KVAware(CHAPTER_WEIGHT))}


def test_kv_events_meet_the_goals_against_round_robin(chapter_runs):
    rr, kv = chapter_runs["rr"], chapter_runs["kv"]
    verdicts = goals(kv, rr)
    assert all(met for _, met in verdicts.values()), verdicts
    # the figures are the replicas' own counters: every request served once, and the run is not trivial
    assert sum(f.requests for f in kv.replicas.values()) == chat_workload(seed=0).num_requests
    assert rr.hit_rate > 0.05 and kv.summary()["ttft_p50"] < rr.summary()["ttft_p50"]


def test_cache_affinity_alone_overloads_a_replica_and_the_load_term_spreads_it():
    skewed = chat_workload(seed=0, hot_tenant_share=0.5)
    affinity = replay(skewed, KVAware(AFFINITY_ONLY))
    balanced = replay(skewed, KVAware(CHAPTER_WEIGHT))
    assert affinity.load_imbalance > GOALS["load"] >= balanced.load_imbalance
    assert balanced.summary()["ttft_p99"] < affinity.summary()["ttft_p99"]


def test_a_restart_clears_the_index_and_its_requests_are_retried():
    """A small run: replica 0 restarts mid-run; its outstanding requests are served elsewhere or again, every
    session ends, and the restarted replica's cleared cache reached the index (it promised nothing stale)."""
    workload = chat_workload(num_tenants=4, sessions=8, turns=(2, 3), seed=1)
    policy = KVAware(CHAPTER_WEIGHT)
    result = replay(workload, policy, num_replicas=2, restart=(0, 1.0))
    assert result.retried > 0
    served = {str(r.rid).split("+")[0] for r in result.requests}
    assert len(served) == workload.num_requests
    assert result.router_metrics["events_rejected"] == 0
    for policy_cls in (LeastOutstanding, ApproxTree):
        assert len(replay(workload, policy_cls(), num_replicas=2, restart=(0, 1.0)).requests) >= len(served)


def test_a_silent_event_stream_falls_back_to_load_only_routing():
    """stale_after: a replica with requests outstanding that has published nothing for that long is routed to on
    load alone (its index entries are not trusted), and the router says so in its metrics; an event restores it."""
    router = Router([0, 1], KVAware(CHAPTER_WEIGHT), block_size=4, stale_after=1.0)
    tokens = list(range(16))
    h = _hashes(tokens)
    router.deliver(0, [BlockStored(tuple(h), None, tuple(tokens), 4)], now=0.0)
    assert router.route(Request("a", tokens + [1], 4), now=0.0) == 0           # the prefix is on replica 0
    assert router.route(Request("b", tokens + [2], 4), now=0.5) == 0           # still fresh: 0.5 s of silence
    assert router.route(Request("c", tokens + [3], 4), now=2.0) == 1           # silent for 2 s: load alone
    assert router.metrics["stale_replicas"] == [0] and router.metrics["stale_routings"] == 1
    assert router.policy.index.longest_prefix(h)[0] == 4                       # its entries were kept
    router.deliver(0, [BlockRemoved((h[3],))], now=2.5)
    assert router.route(Request("d", tokens + [4], 4), now=2.6) == 0           # heard again: the cache counts


# ---------------------------------------------------------------------------------------------- on the wire

# KVEventBatch(ts=1.5, events=[BlockStored([b"\x01" * 32], None, [1, 2], 2, lora_id=None, medium="GPU",
# lora_name=None), BlockRemoved([b"\x02" * 32], "GPU"), AllBlocksCleared()]) as vLLM 0.32 encodes it
# (msgspec.msgpack.Encoder().encode(batch) with vllm.distributed.kv_events' classes, in .venv-vllm).
VLLM_BATCH = bytes.fromhex(
    "93cb3ff80000000000009388a474797065ab426c6f636b53746f726564ac626c6f636b5f68617368657391c420" + "01" * 32
    + "b1706172656e745f626c6f636b5f68617368c0a9746f6b656e5f696473920102aa626c6f636b5f73697a6502a76c6f72615f6964c0"
    "a66d656469756da3475055a96c6f72615f6e616d65c083a474797065ac426c6f636b52656d6f766564ac626c6f636b5f68617368657391"
    "c420" + "02" * 32 + "a66d656469756da347505581a474797065b0416c6c426c6f636b73436c6561726564c0")


def test_vllms_event_bytes_decode_to_the_courses_events_and_back():
    from helpers.course.routing.wire import decode_batch, encode_batch
    ts, events = decode_batch(VLLM_BATCH)
    assert ts == 1.5 and events == [BlockStored((b"\x01" * 32,), None, (1, 2), 2, "GPU"),
                                    BlockRemoved((b"\x02" * 32,), "GPU"), AllBlocksCleared()]
    assert encode_batch(ts, events) == VLLM_BATCH                  # the same bytes vLLM sends
    for bad in (VLLM_BATCH[:-5], b"\xc1", b"\x93\x01\x02"):
        with pytest.raises(ValueError):
            decode_batch(bad)
    unknown = VLLM_BATCH.replace(b"\xb0AllBlocksCleared", b"\xb0AllBlocksClearex")
    assert decode_batch(unknown)[1][2] is None                     # an unknown event: skipped, the rest applies


def test_events_over_zeromq_reach_the_router_and_gaps_are_counted():
    import time

    from helpers.course.routing.zmq_events import ZmqEventPublisher, ZmqEventSubscriber
    publisher = ZmqEventPublisher("tcp://127.0.0.1:*")
    subscriber = ZmqEventSubscriber({0: publisher.endpoint})
    router = Router([0, 1], KVAware(CHAPTER_WEIGHT), block_size=4)
    tokens = list(range(16))
    h = _hashes(tokens)
    try:
        deadline, got = time.monotonic() + 20, []
        while not got and time.monotonic() < deadline:       # PUB drops what it sends before SUB has joined
            publisher.publish([AllBlocksCleared()], ts=0.0)
            got = subscriber.poll(timeout=0.05)
        assert got, "no batch arrived over ZeroMQ in 20 s"
        publisher.seq += 3                                     # three batches lost on the way
        publisher.publish([BlockStored(tuple(h), None, tuple(tokens), 4)], ts=1.0)
        stored = False
        while not stored and time.monotonic() < deadline:      # late probes first, then the BlockStored
            for replica, _, ts, events in subscriber.poll(timeout=0.05):
                router.deliver(replica, events, ts)
                stored |= any(isinstance(e, BlockStored) for e in events)
        assert router.policy.index.longest_prefix(h) == {0: 4, 1: 0}
        assert subscriber.gaps[0] == 3 and subscriber.malformed == 0
    finally:
        subscriber.close()
        publisher.close()


def test_the_router_computes_the_hashes_a_vllm_replica_publishes():
    """Digests of tokens 0..39 in blocks of 16 from vLLM 0.32 itself (vllm.v1.core.kv_cache_utils.hash_block_tokens
    with vllm.utils.hashing.sha256 after init_none_hash, run in .venv-vllm): the course's chain from vLLM's
    NONE_HASH gives the same bytes, so a router can match vLLM's BlockStored events."""
    import hashlib
    import pickle

    from helpers.course.routing.router import VLLM_NONE_HASH, vllm_block_hashes
    assert VLLM_NONE_HASH == hashlib.sha256(pickle.dumps("vllm-none-hash", protocol=pickle.HIGHEST_PROTOCOL)).digest()
    assert [h.hex()[:16] for h in vllm_block_hashes(list(range(40)), 16)] == ["fe8fa5dda3210d0c", "8be7aaa33831156d"]
