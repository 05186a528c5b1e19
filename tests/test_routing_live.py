"""Chapter 9 on real replica processes (helpers/course/serving with --kv-events-config and --routing): a replica's
KV events reach the front end's Router over ZeroMQ with the router's own block hashes, a request goes to the replica
that holds its prefix, a replica's death drops its index entries and its new process is subscribed again, a
malformed frame or event is counted and skipped, a replica that falls silent is routed on load alone and /metrics
says so, and the replicas' own prefix-cache figures are on /metrics."""
import asyncio
import json
import os
import re
import signal
import time

import msgspec
import pytest
import zmq

from helpers.course.routing.wire import encode_batch
from helpers.course.routing.zmq_events import ZmqEventSubscriber
from helpers.course.engine.kv_events import BlockStored
from helpers.course.serving.balancer import Balancer
from helpers.course.serving.config import ServeConfig
from helpers.course.serving.metrics import ServingMetrics, parse, value
from helpers.course.serving.replica import replica_endpoint
from helpers.impl import load_impl

pytestmark = pytest.mark.usefixtures("one_torch_thread")   # tests/conftest.py


@pytest.fixture(scope="module", autouse=True)
def reference_answers():
    """The reference answers of 7.3 (hashes) and 9.1-9.2 (the index, the cost), in the router and the replicas."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("COURSE_IMPL", "solutions")
        yield


EVENTS = json.dumps({"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": "tcp://*:0"})
BLOCK = 16
STALE = 1.0      # seconds of silence, with requests outstanding, after which a replica's entries are not trusted


def _config(**options) -> ServeConfig:
    return ServeConfig(data_parallel_size=2, kv_cache="paged", enable_prefix_caching=True,
                       num_gpu_blocks_override=32, block_size=BLOCK, routing="kv_aware", kv_overlap_score_weight=4.0,
                       kv_events_config=EVENTS, kv_events_stale_after=STALE, stuck_after=0, **options)


def _prompt(seed: int, n: int) -> list:
    return [(seed * 37 + 11 * i) % 251 + 1 for i in range(n)]


async def _run(balancer, prompt, max_tokens=3):
    """(tokens, replica) of one greedy request."""
    tokens, replica = [], None
    async for out in balancer.submit({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}):
        tokens += out["token_ids"]
        replica = out["replica"]
    return tokens, replica


async def _until(condition, what, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def _listen(subscriber, stored):
    for replica, _seq, _ts, events in subscriber.poll(0):
        stored.extend((replica, e) for e in events if isinstance(e, BlockStored))


def test_config_checks_and_endpoints():
    config = _config()
    assert config.kv_events()["endpoint"] == "tcp://*:0" and config.kv_events()["publisher"] == "zmq"
    assert ServeConfig.from_argv(config.to_argv()) == config.replace(port=8000)
    assert ServeConfig(kv_events_config='{"enable_kv_cache_events": false}').kv_events() is None
    for bad, words in ((dict(kv_events_config=None), "routes on the replicas' KV events"),
                       (dict(enable_prefix_caching=False), "--enable-prefix-caching"),
                       (dict(kv_events_config='{"endpoint": "tcp://*:1", "enable_kv_cache_events": true, '
                                              '"replay_endpoint": "tcp://*:2"}'), "replay"),
                       (dict(kv_events_config='{"enable_kv_cache_events": true, "endpoint": "tcp://10.0.0.1:9"}'),
                        "loopback"),
                       (dict(kv_events_config='{"enable_kv_cache_events": true, "endpont": "x"}'), "unknown field"),
                       (dict(routing="fastest"), "choose one of")):
        options = dict(data_parallel_size=2, kv_cache="paged", enable_prefix_caching=True, routing="kv_aware",
                       kv_events_config=EVENTS)
        options.update(bad)
        if bad.get("kv_events_config", "") is None:
            options.pop("kv_events_config")
        with pytest.raises(ValueError, match=re.escape(words)):
            ServeConfig(**options)
    # vLLM's offset_endpoint_port: port + data-parallel rank, port 0 left to the OS; loopback here
    assert [replica_endpoint("tcp://*:5557", i) for i in range(3)] == \
        ["tcp://127.0.0.1:5557", "tcp://127.0.0.1:5558", "tcp://127.0.0.1:5559"]
    assert replica_endpoint("tcp://*:0", 3) == "tcp://127.0.0.1:0"
    assert replica_endpoint("ipc:///tmp/kv", 1) == "ipc:///tmp/kv_dp1"


def test_replicas_events_routing_bad_frames_and_a_death():
    """On 2 real replicas behind --routing kv_aware: a replica's BlockStored, heard by a second subscriber of the
    same PUB socket, carries the hashes the router computes for the same prompt; the router's index gets them; a
    request sharing that prefix goes to that replica (round robin would have sent it to the other); the figures on
    /metrics add up; a malformed frame and an unknown event are counted and skipped; a silent holder (SIGSTOP) is
    taken for stale, on /metrics, and routed around. Then SIGKILL the holder: the
    index forgets it at once (its cache died with it) and /metrics says 0 blocks; its new process is subscribed at
    its new endpoint, and its events fill the index again. (One server for all: each start costs seconds.)"""
    metrics = ServingMetrics()

    async def scenario():
        balancer = Balancer(_config(), metrics)
        await balancer.start(timeout=60)
        listener = ZmqEventSubscriber({r.index: r.kv_events_endpoint for r in balancer.replicas})
        try:
            stored = []
            await asyncio.sleep(0.2)          # the listener's subscription travels (PUB drops what precedes it)
            a = _prompt(1, 3 * BLOCK + 5)
            _, holder = await _run(balancer, a)
            hashes = balancer.router._hash(a, BLOCK, cache_salt=None)
            assert hashes == load_impl("prefix_cache").block_hashes(a, BLOCK) and len(hashes) == 3
            await _until(lambda: _listen(listener, stored) or
                         {h for r, e in stored if r == holder for h in e.block_hashes} >= set(hashes),
                         "the holder's BlockStored events on the wire")
            ours = [e for r, e in stored if r == holder]
            assert ours[0].block_hashes[0] == hashes[0] and ours[0].parent_block_hash is None
            assert ours[0].block_size == BLOCK and list(ours[0].token_ids[:BLOCK]) == a[:BLOCK]
            index = balancer.router.policy.index
            await _until(lambda: index.blocks_of(holder) >= set(hashes), "the router's index to hold them")
            # unrelated prompts, then the shared prefix comes back to its holder
            for seed in (2, 3):
                await _run(balancer, _prompt(seed, 2 * BLOCK + 3))
            _, where = await _run(balancer, a + _prompt(9, 20))
            assert where == holder, (where, holder, balancer.router_state())
            samples = parse(metrics.exposition().decode())
            assert sum(value(samples, "serving_router_routed_total", replica=i) for i in range(2)) == 4
            assert value(samples, "serving_router_events_applied_total") >= 3
            await _until(lambda: sum(r.served for r in balancer.replicas) == 4 and
                         value(parse(metrics.exposition().decode()), "serving_replica_prefix_cache_hits_total",
                               replica=holder) >= 3 * BLOCK, "the replicas' last reports")
            samples = parse(metrics.exposition().decode())
            for i in range(2):   # no preemption here: each prompt token is either found cached or computed
                queries, hits, computed = (value(samples, name, replica=i) for name in (
                    "serving_replica_prefix_cache_queries_total", "serving_replica_prefix_cache_hits_total",
                    "serving_prefill_tokens_computed_total"))
                assert computed == queries - hits, (i, queries, hits, computed)

            # a malformed frame and an unknown event, on a replica's subscription: counted, skipped, still routing
            other = 1 - holder
            fake = zmq.Context.instance().socket(zmq.PUB)
            port = fake.bind_to_random_port("tcp://127.0.0.1")
            balancer.events.remove(other)
            balancer.events.add(other, f"tcp://127.0.0.1:{port}")
            # PUB drops what precedes the subscription: send a first good batch until it is heard (no sleep)
            sync = encode_batch(0.0, [BlockStored((b"\x02" * 32,), None, tuple(range(BLOCK)), BLOCK)])

            def heard():
                fake.send_multipart((b"", (0).to_bytes(8, "big"), sync))
                return b"\x02" * 32 in index.blocks_of(other)
            await _until(heard, "the fake publisher's first batch")
            good = BlockStored((b"\x01" * 32,), None, tuple(range(BLOCK)), BLOCK)
            unknown = msgspec.msgpack.encode([0.0, [{"type": "BlockMoved", "block_hashes": []},
                                                    {"type": "BlockStored"}], None])
            rejected = balancer.router.metrics["events_rejected"]
            for seq, payload in enumerate((b"\xc1 not msgpack", unknown, encode_batch(0.0, [good])), start=1):
                fake.send_multipart((b"", seq.to_bytes(8, "big"), payload))
            await _until(lambda: b"\x01" * 32 in index.blocks_of(other), "the good batch after the bad ones")
            fake.close(linger=0)
            assert balancer.events.malformed == 1
            assert balancer.router.metrics["events_rejected"] == rejected + 2
            samples = parse(metrics.exposition().decode())
            assert value(samples, "serving_router_event_batches_malformed_total") == 1
            assert value(samples, "serving_router_events_rejected_total") == rejected + 2
            balancer.events.remove(other)               # the replica's own publisher again
            balancer.events.add(other, balancer.replicas[other].kv_events_endpoint)

            # the holder stops (SIGSTOP) with a request of that prefix in flight: after kv_events_stale_after
            # seconds of silence its entries are not trusted, /metrics says so, and the next request goes by load
            pid = balancer.replicas[holder].process.pid
            os.kill(pid, signal.SIGSTOP)
            try:
                frozen = asyncio.ensure_future(_run(balancer, a + _prompt(10, 7)))
                await _until(lambda: holder in balancer.router_state()["stale_now"], "the holder to be stale")
                samples = parse(metrics.exposition().decode())
                assert value(samples, "serving_router_stale_replica", replica=holder) == 1
                assert value(samples, "serving_router_stale_replica", replica=other) == 0
                _, where = await _run(balancer, a + _prompt(11, 7))
                assert where == other, balancer.router_state()
                assert value(parse(metrics.exposition().decode()), "serving_router_stale_routings_total") >= 1
            finally:
                os.kill(pid, signal.SIGCONT)
            assert (await frozen)[1] == holder

            # the holder dies: its entries go at once; its new process is heard at its new endpoint
            old, endpoint = balancer.replicas[holder].process.pid, balancer.replicas[holder].kv_events_endpoint
            os.kill(old, signal.SIGKILL)
            await _until(lambda: balancer.replicas[holder].state != "ready", "the death to be seen")
            assert index.blocks_of(holder) == frozenset() and holder not in balancer.router.live
            assert value(parse(metrics.exposition().decode()), "serving_router_index_blocks", replica=holder) == 0
            await balancer.wait_ready(2, timeout=60)
            assert balancer.replicas[holder].process.pid != old and holder in balancer.router.live
            assert balancer.replicas[holder].kv_events_endpoint != endpoint     # port 0: a new one
            # the same prompt: no replica holds it now... two at once, so each replica gets one (the load term)
            results = await asyncio.gather(_run(balancer, a, 6), _run(balancer, _prompt(6, 3 * BLOCK + 1), 6))
            assert sorted(r for _, r in results) == [0, 1], results
            await _until(lambda: len(index.blocks_of(holder)) >= 3, "the new process's events in the index")
        finally:
            listener.close()
            await balancer.stop()

    asyncio.run(scenario())
