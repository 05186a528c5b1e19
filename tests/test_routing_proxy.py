"""Chapter 9's router as an HTTP proxy (helpers/course/routing/proxy.py), in front of stub replicas that publish KV
events through the course's ZMQ publisher (zmq_events.py), as `vllm serve --kv-events-config` does: vLLM's block
hashes reproduced (numbers recorded from a vLLM 0.32 replica), routing on the events with the answer streamed back
unchanged, and what the proxy survives — a malformed batch or event, a replica's death and return, a stream of
events that stops (load-only routing, said on /metrics). No vLLM needed; every server runs in this process."""
import asyncio
import threading
import time

import httpx
import msgspec
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from helpers.course.engine.kv_events import AllBlocksCleared, BlockStored
from helpers.course.routing.proxy import RouterProxy, VllmHasher, make_policy
from helpers.course.routing.zmq_events import ZmqEventPublisher
from helpers.course.serving.metrics import parse, value

BLOCK = 32
# What a vLLM 0.32 replica (vllm serve, block size 32, sha256, PYTHONHASHSEED unset) published in BlockStored for a
# prompt of the first 150 bytes of helpers/course/data/corpus.txt: 4 full blocks, hashes as ints (the low 64 bits,
# VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1, its default), recorded from its ZMQ stream on 2026-12-06.
VLLM_RECORDED = [14482337866132914170, 12561950981517486825, 2682165216526615709, 12822423365992061039]


@pytest.fixture(scope="module", autouse=True)
def reference_answers():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("COURSE_IMPL", "solutions")
        yield


def wait_for(condition, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


class Served:
    """An ASGI app served by uvicorn in a thread of this process, on `port` (0: any free one)."""

    def __init__(self, app, port=0):
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_for(lambda: self.server.started, 30, "the server to start")
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


class StubReplica:
    """An OpenAI-shaped replica: /health, /v1/completions answering three SSE chunks that name it; `hold` (an Event)
    keeps its answers open until set. Its KV events go out through a ZmqEventPublisher, as vLLM's do."""

    def __init__(self, name, port=0, events_endpoint="tcp://127.0.0.1:0"):
        self.name, self.bodies, self.hold = name, [], threading.Event()
        self.hold.set()
        app = FastAPI()

        @app.get("/health")
        async def health():
            return JSONResponse({})

        @app.post("/v1/completions")
        async def completions(request: Request):
            body = await request.json()
            self.bodies.append(body)
            await asyncio.to_thread(self.hold.wait, 30)
            if not body.get("stream"):
                return JSONResponse({"replica": name})

            async def chunks():
                for i in range(3):
                    if i == body.get("die_after"):        # the replica dies mid-answer: the connection breaks
                        raise ConnectionAbortedError("replica died")
                    yield f'data: {{"replica": "{name}", "i": {i}}}\n\n'.encode()
                yield b"data: [DONE]\n\n"
            return StreamingResponse(chunks(), media_type="text/event-stream")

        self.http = Served(app, port)
        self.publisher = ZmqEventPublisher(events_endpoint)

    def stop(self):
        self.hold.set()
        self.http.stop()
        self.publisher.close()


class Cluster:
    def __init__(self, policy="kv", n=2, stale_after=None, weight=1.0):
        self.replicas = [StubReplica(str(i)) for i in range(n)]
        self.proxy = RouterProxy({i: (r.http.url, r.publisher.endpoint) for i, r in enumerate(self.replicas)},
                                 make_policy(policy, weight), block_size=BLOCK, stale_after=stale_after,
                                 health_interval=0.1)
        self.http = Served(self.proxy.app)
        self.client = httpx.Client(base_url=self.http.url, timeout=30)
        wait_for(lambda: self.stats()["live"] == list(range(n)), what="every replica live")

    def stats(self):
        return self.client.get("/router/stats").json()

    def metric(self, line_start):
        for line in self.client.get("/metrics").text.splitlines():
            if line.startswith(line_start + " "):
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError(f"{line_start} not on /metrics")

    def publish(self, replica, events):
        """Publish until the proxy has applied the batch (PUB/SUB drops what is sent before the SUB connected)."""
        before = self.stats()["event_batches"][str(replica)]
        deadline = time.monotonic() + 10
        while self.stats()["event_batches"][str(replica)] == before:
            assert time.monotonic() < deadline, "the proxy never received the batch"
            self.replicas[replica].publisher.publish(events)
            time.sleep(0.05)

    def complete(self, prompt, stream=True):
        response = self.client.post("/v1/completions", json={"model": "m", "prompt": prompt, "max_tokens": 2,
                                                              "stream": stream})
        return response

    def close(self):
        self.client.close()
        self.http.stop()
        for r in self.replicas:
            r.stop()


@pytest.fixture
def cluster():
    made = []

    def make(**kw):
        made.append(Cluster(**kw))
        return made[-1]
    yield make
    for c in made:
        c.close()


def prompt_ids(n_blocks, seed):
    return [(seed * 31 + 7 * i) % 256 for i in range(n_blocks * BLOCK + 5)]


def stored(ids, hasher=None):
    hashes = (hasher or VllmHasher())(ids, BLOCK)
    return BlockStored(tuple(hashes), None, tuple(ids[:len(hashes) * BLOCK]), BLOCK, "GPU")


# ----------------------------------------------------------------------------------------------- vLLM's hashes
def test_hasher_reproduces_the_hashes_a_vllm_replica_published():
    from pathlib import Path
    text = (Path(__file__).resolve().parent.parent / "helpers/course/data/corpus.txt").read_bytes()[:150]
    assert VllmHasher()(list(text), BLOCK) == VLLM_RECORDED
    # the 32-byte form (VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0) ends in the same 64 bits
    assert [int.from_bytes(h[-8:], "big") for h in VllmHasher(external=False)(list(text), BLOCK)] == VLLM_RECORDED


def test_hasher_checks_an_events_chain_from_its_tokens():
    ids = prompt_ids(3, 1)
    hasher = VllmHasher()
    first = stored(ids[:2 * BLOCK], VllmHasher())
    assert hasher.check(first) is True                          # parent None: chained from vLLM's NONE_HASH
    full = VllmHasher()(ids, BLOCK)
    later = BlockStored((full[2],), full[1], tuple(ids[2 * BLOCK:3 * BLOCK]), BLOCK, "GPU")
    assert hasher.check(later) is True                          # parent known from the first event
    assert VllmHasher().check(later) is None                    # parent unknown: cannot tell
    wrong = BlockStored((full[0] ^ 1, full[1]), None, tuple(ids[:2 * BLOCK]), BLOCK, "GPU")
    assert hasher.check(wrong) is False
    reseeded = VllmHasher(none_hash=b"\x00" * 32)               # a replica with PYTHONHASHSEED set hashes otherwise
    assert reseeded.check(first) is False


# ----------------------------------------------------------------------------------------------- routing on events
def test_kv_policy_routes_to_the_replica_whose_events_hold_the_prefix_and_streams_its_answer(cluster):
    c = cluster(policy="kv")
    ids = prompt_ids(4, 2)
    c.publish(1, [stored(ids)])
    assert c.stats()["indexed_blocks"] == {"0": 0, "1": 4}
    response = c.complete(ids)
    assert response.headers["x-routed-to"] == "1"
    assert response.text == "".join(f'data: {{"replica": "1", "i": {i}}}\n\n' for i in range(3)) + "data: [DONE]\n\n"
    assert c.replicas[1].bodies[-1]["prompt"] == ids                     # forwarded unchanged
    assert c.metric("router_block_hash_checked_total") == 1 and c.metric("router_block_hash_mismatch_total") == 0
    assert c.metric('router_outstanding_requests{replica="1"}') == 0      # finished when the stream ended
    samples = parse(c.client.get("/metrics").text)                       # well-formed Prometheus text
    assert value(samples, "router_requests_routed_total", replica=1) == 1
    # a text prompt is tokenized with the model's tokenizer (a byte each): routed by the blocks of its bytes
    text = ("It was the best of times, it was the worst of times. " * 4)[:3 * BLOCK + 7]
    c.publish(1, [stored(list(text.encode()))])
    assert c.complete(text).headers["x-routed-to"] == "1"
    # another prefix goes by load: replica 0 (nothing outstanding anywhere, the first in order)
    assert c.complete(prompt_ids(4, 3), stream=False).json() == {"replica": "0"}
    # the same new prefix again before any replica announced it: the index is behind (counted)
    assert c.stats()["index_behind"] == 0
    c.complete(prompt_ids(4, 3), stream=False)
    assert c.stats()["index_behind"] == 1
    # the replica clears its cache (a restart, /reset_prefix_cache): its entries go
    c.publish(1, [AllBlocksCleared()])
    assert c.stats()["indexed_blocks"]["1"] == 0


def test_round_robin_through_the_proxy_alternates(cluster):
    c = cluster(policy="round_robin")
    ids = prompt_ids(2, 4)
    assert [c.complete(ids, stream=False).json()["replica"] for _ in range(4)] == ["0", "1", "0", "1"]
    # the bound one unlimited cache gives: the 2 full blocks of the 3 later requests (the last token never hits)
    stats = c.stats()
    assert (stats["bound_queries"], stats["bound_hits"]) == (4 * len(ids), 3 * 2 * BLOCK)


# ----------------------------------------------------------------------------------------------- what it survives
def test_malformed_batches_and_events_are_counted_and_skipped(cluster):
    c = cluster(policy="kv")
    socket = c.replicas[1].publisher.socket
    ids = prompt_ids(3, 5)
    bogus_event = msgspec.msgpack.encode([1.0, [{"type": "BlockTeleported", "block_hashes": [1]}], None])
    deadline = time.monotonic() + 10
    while c.stats()["batches_malformed"] == 0 or c.stats()["events_rejected"] == 0:
        assert time.monotonic() < deadline
        socket.send_multipart((b"", (0).to_bytes(8, "big"), b"\xc1 not msgpack"))
        socket.send_multipart((b"", (1).to_bytes(8, "big"), bogus_event))
        time.sleep(0.05)
    c.publish(1, [stored(ids)])                                # the stream goes on after them
    assert c.stats()["indexed_blocks"]["1"] == 3
    assert c.metric("router_kv_event_batches_malformed_total") >= 1
    assert c.metric("router_kv_events_rejected_total") >= 1
    assert c.complete(ids).headers["x-routed-to"] == "1"


def test_a_dead_replica_is_dropped_its_requests_retried_and_it_comes_back(cluster):
    c = cluster(policy="kv")
    ids = prompt_ids(4, 6)
    c.publish(1, [stored(ids)])
    dead = c.replicas[1]
    port, endpoint = dead.http.port, dead.publisher.endpoint
    dead.stop()
    response = c.complete(ids)                      # the index says replica 1; it is gone: answered by 0
    assert response.status_code == 200 and response.headers["x-routed-to"] == "0"
    stats = wait_for(lambda: (s := c.stats())["live"] == [0] and s, what="replica 1 out of the pool")
    assert stats["indexed_blocks"]["1"] == 0 and stats["replica_failures"]["1"] == 1
    assert c.metric('router_replica_up{replica="1"}') == 0
    # a replica that dies in the middle of an answer: the client gets what was streamed, then an error event
    broken = c.client.post("/v1/completions", json={"model": "m", "prompt": ids, "stream": True, "die_after": 1})
    assert broken.text.startswith('data: {"replica": "0", "i": 0}\n\ndata: {"error": ')
    assert '"code": 502' in broken.text and "[DONE]" not in broken.text
    assert c.stats()["replica_failures"]["0"] == 1      # taken out at once; its health probe brings it back
    wait_for(lambda: c.stats()["live"] == [0], what="replica 0 back")
    assert c.metric('router_outstanding_requests{replica="0"}') == 0
    # it restarts on the same port (a new process, an empty cache): the health probe brings it back
    c.replicas[1] = StubReplica("1", port=port, events_endpoint=endpoint)
    wait_for(lambda: c.stats()["live"] == [0, 1], what="replica 1 back")
    c.publish(1, [stored(ids)])                      # its new events are heard
    assert c.complete(ids).headers["x-routed-to"] == "1"


def test_a_stream_that_stops_falls_back_to_load_only_routing_and_says_so(cluster):
    # weight 4: the cached prefix (7 of 8 blocks) outweighs the held request's 8 blocks of load on replica 0
    c = cluster(policy="kv", stale_after=0.3, weight=4.0)
    ids = prompt_ids(7, 8)
    c.publish(0, [stored(ids)])
    c.replicas[0].hold.clear()                                   # replica 0's answers hang, no events come
    held = threading.Thread(target=c.complete, args=(ids,), daemon=True)
    held.start()
    wait_for(lambda: c.stats()["outstanding_requests"]["0"] == 1, what="a request outstanding on replica 0")
    wait_for(lambda: c.metric('router_kv_events_stale{replica="0"}') == 1, what="replica 0 reported stale")
    # its cached prefix is hidden while stale: the same prompt goes by load, to idle replica 1
    assert c.complete(ids).headers["x-routed-to"] == "1"
    assert c.metric("router_stale_routings_total") >= 1
    c.replicas[0].hold.set()
    held.join(10)
    c.publish(0, [stored(prompt_ids(1, 9))])                     # events again: no longer stale
    assert c.metric('router_kv_events_stale{replica="0"}') == 0


# ----------------------------------------------------------------------------------------------- the stored run
def test_the_stored_vllm_cluster_run_is_complete_and_its_hashes_matched():
    """make vllm-cluster's stored run (helpers/course/data/vllm_cluster.json, shown by notebook 09): every request
    of every policy answered, every BlockStored hash vLLM published reproduced by the router, vLLM's prompt ids equal
    to the router's for a chat and a text request, and the figures consistent with the replicas' counters."""
    import json

    from helpers.vllm_cluster import POLICIES, RESULT_PATH
    run = json.loads(RESULT_PATH.read_text())
    assert run["failures"] == [] and set(run["policies"]) == {key for key, *_ in POLICIES}
    assert all(case["same_prompt_ids"] for case in run["tokenization"].values())
    for policy in run["policies"].values():
        chat, bench = policy["chat"], policy["bench"]
        assert chat["answered"] == chat["requests"] and not chat["failed"]
        assert bench["completed"] == bench["num_prompts"] and bench["failed"] == 0
        for part in (chat, bench):
            assert part["router"]["hash_checked"] > 0 and part["router"]["hash_mismatch"] == 0
            total = part["total"]
            assert total["prefix_cache_hits"] == sum(r["prefix_cache_hits"] for r in part["replicas"])
            assert total["hit_rate"] <= part["bound"]["hit_rate"] + 0.02     # the bound, up to late events
    fault = run["fault"]                               # a replica killed under load, then started again
    assert fault["after_kill"]["live"] == [0] and fault["after_kill"]["indexed_blocks"]["1"] == 0
    assert fault["chat"]["answered"] == fault["chat"]["requests"] and not fault["chat"]["failed"]
    assert fault["after_restart"]["routed_to_1"] > 0 and fault["after_restart"]["event_batches_from_1"] > 0
    assert fault["after_restart"]["hash_mismatch"] == 0
