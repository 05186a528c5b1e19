"""The course's router as a real server: an OpenAI-compatible HTTP proxy in front of N `vllm serve` replicas (or the
course's own servers), routing on the KV events the replicas publish over ZeroMQ.

    python -m helpers.course.routing.proxy --port 8000 --policy kv --block-size 32 \\
        --replica http://127.0.0.1:8001=tcp://127.0.0.1:5557 --replica http://127.0.0.1:8002=tcp://127.0.0.1:5558

For each POST /v1/completions or /v1/chat/completions the proxy tokenizes the prompt with the model's tokenizer
(helpers/course/tokenizer.py; a chat through its chat template, as vLLM's renderers/hf.py does), hashes its full
blocks, asks the course's Router (router.py, with a policy of policies.py) for a replica, forwards the request
unchanged and passes the answer back byte for byte (a streamed answer chunk by chunk). The request is outstanding
on that replica until its answer ends. A thread SUBscribes to every replica's `--kv-events-config` publisher
(zmq_events.py) and hands each batch to the Router, which applies vLLM's own BlockStored / BlockRemoved /
AllBlocksCleared to the policy's index. This is the shape of llm-d's precise prefix-cache scorer and Dynamo's
KV router (ai-dynamo/dynamo lib/llm/src/kv_router/: a subscriber per worker feeding one radix index).

Which hashes. vLLM's block hash is not something a router gets to choose: the events carry vLLM's. Two designs:
(a) compute exactly what vLLM computes, or (b) keep the router's own hash and map vLLM's to it from each event's
token_ids and parent (Dynamo's "local block hash": lib/llm/src/kv_router/protocols.rs computes its own hash of
every block's tokens and keeps vLLM's hash only as the key of the block in its events). This proxy does (a),
because vLLM 0.32's hash is fully determined by the tokens: hash_block_tokens in vllm/v1/core/kv_cache_utils.py
is sha256(pickle((parent, token_ids, extra_keys))) (--prefix-caching-hash-algo sha256, the default; utils/hashing.py),
chained from NONE_HASH = sha256(pickle("vllm-none-hash")) (init_none_hash, resolve_none_hash_seed: the fixed seed
unless PYTHONHASHSEED is set, which then seeds it instead), and the event carries
maybe_convert_block_hash(hash): the low 64 bits as an int, since VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES defaults to 1
(vllm/envs.py). So VllmHasher = router.vllm_block_hashes, cut to 64 bits. What (a) costs: it breaks if
the replicas hash differently (PYTHONHASHSEED set, another hash algorithm, salted or LoRA requests). So the proxy
checks every BlockStored it receives: it recomputes the block chain from the event's token_ids and parent (the
parent's full hash must be one it computed or checked) and counts `hash_checked` / `hash_mismatch` on /metrics, with
a warning in the log at the first mismatch: a router whose hashes never match routes on load alone, silently,
otherwise. tests/test_routing_proxy.py checks both.

What the proxy survives.
* A replica that dies: a request that cannot connect (or gets no answer) is retried on another replica; the replica
  leaves the pool (so does one whose answer breaks mid-stream — the client gets an SSE error event, as vLLM streams
  errors — and one that fails two health probes in a row), its index entries are dropped (Router.replica_down), its
  subscriber is closed; a health probe (GET /health every `health_interval` s) that answers brings it back
  (Router.replica_up, a new subscriber: a restarted vLLM numbers its batches from 0 and starts with an empty cache).
* A malformed or unknown event: decode_batch / the policy reject it, the Router logs and counts it
  (`events_rejected`, `batches_malformed`), the rest applies.
* A stream that stops: with `stale_after` set, a replica that has published nothing for that long while requests
  were outstanding there is routed on load alone (Router's stale handling) and /metrics says so
  (`router_kv_events_stale{replica}` 1, `router_stale_routings_total`).

Endpoints: /v1/completions, /v1/chat/completions (routed), /v1/models, /health (the first live replica's),
/metrics (Prometheus text: routed requests, outstanding requests and blocks, events applied / rejected, gaps,
hash checks, live and stale replicas), /router/stats (the same as JSON).
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import json
import logging
import threading
import time
from dataclasses import dataclass

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from helpers.course.engine.kv_events import BlockStored
from helpers.course.routing.router import VLLM_NONE_HASH, Router
from helpers.course.routing.zmq_events import ZmqEventSubscriber
from helpers.impl import load_impl

__all__ = ["RouterProxy", "VllmHasher", "make_policy", "main"]

log = logging.getLogger(__name__)

MASK64 = (1 << 64) - 1


def make_policy(name: str, weight: float = 1.0):
    """round_robin | least_outstanding | kv (KVAware, Dynamo's cost with `weight`) | approx (ApproxTree)."""
    from helpers.course.routing.policies import ApproxTree, KVAware, LeastOutstanding, RoundRobin
    policies = {"round_robin": RoundRobin, "least_outstanding": LeastOutstanding,
                "kv": lambda: KVAware(weight), "approx": ApproxTree}
    if name not in policies:
        raise ValueError(f"unknown policy {name!r}: one of {sorted(policies)}")
    return policies[name]()


class VllmHasher:
    """The block hashes a vLLM replica publishes: `external=True` (vLLM's default) the low 64 bits as ints, else
    the 32-byte sha256. Remembers the full hash behind each external one it computed or checked (bounded), so an
    event's chain can be checked from its parent."""

    def __init__(self, none_hash: bytes = VLLM_NONE_HASH, external: bool = True, remember: int = 200_000):
        self.none_hash, self.external, self.remember = none_hash, external, remember
        # vLLM 0.32's hash_block_tokens with sha256 (vllm/v1/core/kv_cache_utils.py, vllm/utils/hashing.py): the
        # course's copy of it, given code in prefix_cache.py (chapter 7)
        self._hash_block = load_impl("prefix_cache").hash_block_tokens
        self.full: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    def _ext(self, h: bytes):
        return int.from_bytes(h, "big") & MASK64 if self.external else h

    def _keep(self, ext, full: bytes) -> None:
        with self._lock:
            self.full[ext] = full
            self.full.move_to_end(ext)
            while len(self.full) > self.remember:
                self.full.popitem(last=False)

    def __call__(self, token_ids, block_size: int, cache_salt: str | None = None) -> list:
        if cache_salt:
            raise ValueError("the proxy hashes unsalted requests only (vLLM mixes the salt into block 0)")
        out, parent = [], self.none_hash
        ids = [int(t) for t in token_ids]
        for start in range(0, len(ids) - block_size + 1, block_size):
            parent = self._hash_block(parent, ids[start:start + block_size])
            ext = self._ext(parent)
            self._keep(ext, parent)
            out.append(ext)
        return out

    def check(self, event) -> bool | None:
        """Does a BlockStored's chain equal what this hasher computes from its token_ids? None: cannot tell (its
        parent's full hash is unknown here, or it is not a BlockStored)."""
        if not isinstance(event, BlockStored) or not event.block_size:
            return None
        if event.parent_block_hash is None:
            parent = self.none_hash
        else:
            with self._lock:
                parent = self.full.get(event.parent_block_hash)
            if parent is None:
                return None
        size, tokens = event.block_size, list(event.token_ids)
        if len(tokens) != size * len(event.block_hashes):
            return False
        for i, published in enumerate(event.block_hashes):
            parent = self._hash_block(parent, tokens[i * size:(i + 1) * size])
            if self._ext(parent) != published:
                return False
            self._keep(published, parent)
        return True


@dataclass
class _Request:
    """What the Router reads of a request."""
    rid: str
    prompt: list
    cache_salt: str | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt)


class RouterProxy:
    """replicas: {name: (base_url, events_endpoint or None)}, in the router's order. policy: a Policy.
    hasher: block_hashes(token_ids, block_size, cache_salt=...) of the replicas' engine (VllmHasher() for vLLM).
    tokenizer: a transformers tokenizer (default the course's, helpers/course/tokenizer.py)."""

    def __init__(self, replicas: dict, policy, block_size: int = 32, hasher=None, stale_after: float | None = 5.0,
                 health_interval: float = 1.0, tokenizer=None, timeout: float = 600.0):
        self.urls = {name: url.rstrip("/") for name, (url, _) in replicas.items()}
        self.endpoints = {name: ep for name, (_, ep) in replicas.items() if ep}
        self.hasher = hasher if hasher is not None else VllmHasher()
        self.router = Router(list(replicas), policy, block_size=block_size,
                             stale_after=stale_after if policy.uses_events else None, hasher=self.hasher)
        self.lock = threading.RLock()
        self.health_interval, self.timeout = health_interval, timeout
        # a bound for the figures: the prompt tokens one replica with an unlimited cache would find cached (leading
        # blocks seen before in a routed prompt or a BlockStored of any replica; the last token never hits, as vLLM)
        self.seen: set = set()
        self.counters = {"hash_checked": 0, "hash_mismatch": 0, "hash_unchecked": 0, "retried": 0,
                         "bound_queries": 0, "bound_hits": 0, "index_behind": 0,
                         "replica_failures": {r: 0 for r in replicas}, "event_batches": {r: 0 for r in replicas}}
        self._tokenizer = tokenizer
        self._rids = itertools.count()
        self._stop = threading.Event()
        self.subscriber = ZmqEventSubscriber(self.endpoints)
        self._threads = [threading.Thread(target=self._event_loop, name="kv-events", daemon=True)]
        self.app = self._build_app()

    # -------------------------------------------------------------------------------------------- lifecycle
    def start(self) -> "RouterProxy":
        for t in self._threads:
            t.start()
        return self

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5)
        with self.lock:
            self.subscriber.close()

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from helpers.course.tokenizer import load_tokenizer
            self._tokenizer = load_tokenizer()
        return self._tokenizer

    # -------------------------------------------------------------------------------------------- events
    def _event_loop(self) -> None:
        while not self._stop.is_set():
            with self.lock:
                batches = self.subscriber.poll(0)
            if not batches:
                time.sleep(0.01)
                continue
            for replica, _seq, _ts, events in batches:
                self.apply_events(replica, events)

    def apply_events(self, replica, events) -> None:
        """Check each BlockStored's hashes against the proxy's, then hand the batch to the Router."""
        for event in events:
            ok = self.hasher.check(event) if hasattr(self.hasher, "check") else None
            key = {True: "hash_checked", False: "hash_mismatch", None: "hash_unchecked"}[ok]
            if isinstance(event, BlockStored):
                self.counters[key] += 1
            if ok is False and self.counters["hash_mismatch"] == 1:
                log.warning("replica %r published block hashes this proxy does not compute from the same tokens "
                            "(PYTHONHASHSEED set there? another --prefix-caching-hash-algo?): its prefixes will "
                            "never match", replica)
        with self.lock:
            for event in events:
                if isinstance(event, BlockStored):
                    self.seen.update(event.block_hashes)
            self.counters["event_batches"][replica] += 1
            self.router.deliver(replica, events, time.monotonic())

    # -------------------------------------------------------------------------------------------- replicas
    def replica_down(self, replica, why: str) -> None:
        with self.lock:
            if replica not in self.router.live:
                return
            log.warning("replica %r is down (%s): its index entries are dropped", replica, why)
            self.counters["replica_failures"][replica] += 1
            self.router.replica_down(replica)
            if replica in self.endpoints:
                self.subscriber.remove(replica)

    def replica_up(self, replica) -> None:
        with self.lock:
            if replica in self.router.live:
                return
            log.warning("replica %r is up again", replica)
            if replica in self.endpoints:
                self.subscriber.add(replica, self.endpoints[replica])
            self.router.replica_up(replica)

    async def _health_loop(self, client: httpx.AsyncClient) -> None:
        misses: dict = {}
        while not self._stop.is_set():
            for replica, url in self.urls.items():
                try:
                    r = await client.get(f"{url}/health", timeout=max(self.health_interval * 3, 2.0))
                    healthy = r.status_code == 200
                except httpx.HTTPError:
                    healthy = False
                misses[replica] = 0 if healthy else misses.get(replica, 0) + 1
                if healthy:
                    self.replica_up(replica)
                elif misses[replica] >= 2:           # one slow answer on a busy machine is not a death
                    self.replica_down(replica, "health probe failed twice")
            await asyncio.sleep(self.health_interval)

    # -------------------------------------------------------------------------------------------- requests
    def prompt_ids(self, path: str, body: dict) -> list:
        """The token ids the replica will see: a chat through the chat template, a text prompt tokenized, a
        list of ids as is (the first prompt of a batch)."""
        if path.endswith("chat/completions"):
            text = self.tokenizer.apply_chat_template(body.get("messages", []), tokenize=False,
                                                      add_generation_prompt=True)
            return list(self.tokenizer.encode(text, add_special_tokens=False))
        prompt = body.get("prompt", "")
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (list, str)):
            prompt = prompt[0]
        if isinstance(prompt, list):
            return [int(t) for t in prompt]
        return list(self.tokenizer.encode(str(prompt)))

    def route(self, ids: list, cache_salt=None) -> tuple:
        request = _Request(f"proxy-{next(self._rids)}", ids, cache_salt)
        size = self.router.block_size
        hashes = self.hasher(ids, size, cache_salt=cache_salt) if not cache_salt else []
        with self.lock:
            cached = 0
            for h in hashes[:max(len(ids) - 1, 0) // size]:
                if h not in self.seen:
                    break
                cached += 1
            index = getattr(self.router.policy, "index", None)
            if index is not None and hashes and hashes[0] in self.seen and \
                    not any(index.longest_prefix(hashes[:1]).values()):
                self.counters["index_behind"] += 1     # its first block was sent before, no replica announced it
            self.counters["bound_queries"] += len(ids)
            self.counters["bound_hits"] += cached * size
            self.seen.update(hashes)
            replica = self.router.route(request, time.monotonic())
        return replica, request.rid

    def finished(self, replica, rid) -> None:
        with self.lock:
            self.router.finished(replica, rid)

    def _build_app(self):
        proxy = self
        state = {}

        async def lifespan(app):
            state["client"] = httpx.AsyncClient(timeout=httpx.Timeout(proxy.timeout, connect=5.0),
                                                limits=httpx.Limits(max_connections=256))
            proxy.start()
            health = asyncio.create_task(proxy._health_loop(state["client"]))
            try:
                yield
            finally:
                health.cancel()
                proxy.close()
                await state["client"].aclose()

        app = FastAPI(title="course router", lifespan=lifespan)

        async def forward(path: str, raw: Request):
            body_bytes = await raw.body()
            try:
                body = json.loads(body_bytes)
            except ValueError:
                return JSONResponse({"error": {"message": "body is not JSON", "type": "BadRequest"}}, 400)
            try:
                ids = proxy.prompt_ids(path, body)
            except Exception as exc:       # noqa: BLE001 - a prompt the tokenizer rejects is the client's error
                return JSONResponse({"error": {"message": f"cannot tokenize the prompt: {exc}",
                                               "type": "BadRequest"}}, 400)
            headers = {k: v for k, v in raw.headers.items() if k.lower() in ("content-type", "authorization")}
            client: httpx.AsyncClient = state["client"]
            tried = set()
            while True:
                try:
                    replica, rid = proxy.route(ids, body.get("cache_salt"))
                except RuntimeError as exc:
                    return JSONResponse({"error": {"message": str(exc), "type": "ServiceUnavailable"}}, 503)
                if replica in tried:       # every live replica refused this request already
                    proxy.finished(replica, rid)
                    return JSONResponse({"error": {"message": "no replica answered", "type": "BadGateway"}}, 502)
                upstream = client.build_request("POST", f"{proxy.urls[replica]}{path}", content=body_bytes,
                                                headers=headers)
                try:
                    response = await client.send(upstream, stream=True)
                    break
                except (httpx.ConnectError, httpx.ConnectTimeout, httpx.ReadError, httpx.RemoteProtocolError) as exc:
                    # nothing reached the client yet: take the replica out and try another one
                    proxy.finished(replica, rid)
                    proxy.replica_down(replica, f"{type(exc).__name__}")
                    proxy.counters["retried"] += 1
                    tried.add(replica)
            passthrough = {k: v for k, v in response.headers.items()
                           if k.lower() in ("content-type", "x-request-id")}
            passthrough["x-routed-to"] = str(replica)

            async def chunks():
                try:
                    async for chunk in response.aiter_raw():
                        yield chunk
                except httpx.HTTPError as exc:        # the replica died mid-answer: say so, as vLLM streams errors
                    proxy.replica_down(replica, f"its answer broke: {type(exc).__name__}")
                    error = {"message": f"replica {replica} stopped answering: {type(exc).__name__}",
                             "type": "BadGateway", "code": 502}
                    yield f"data: {json.dumps({'error': error})}\n\n".encode()
                finally:
                    await response.aclose()
                    proxy.finished(replica, rid)

            if body.get("stream"):
                return StreamingResponse(chunks(), status_code=response.status_code, headers=passthrough)
            try:
                content = await response.aread()
            except httpx.HTTPError as exc:
                proxy.replica_down(replica, f"its answer broke: {type(exc).__name__}")
                return JSONResponse({"error": {"message": f"replica {replica} stopped answering: "
                                               f"{type(exc).__name__}", "type": "BadGateway", "code": 502}}, 502)
            finally:
                await response.aclose()
                proxy.finished(replica, rid)
            return Response(content, status_code=response.status_code, headers=passthrough)

        @app.post("/v1/completions")
        async def completions(raw: Request):
            return await forward("/v1/completions", raw)

        @app.post("/v1/chat/completions")
        async def chat(raw: Request):
            return await forward("/v1/chat/completions", raw)

        @app.get("/v1/models")
        async def models():
            for replica in list(proxy.router.live):
                try:
                    r = await state["client"].get(f"{proxy.urls[replica]}/v1/models")
                    return Response(r.content, status_code=r.status_code, media_type="application/json")
                except httpx.HTTPError:
                    continue
            return JSONResponse({"error": {"message": "no replica is up"}}, 503)

        @app.get("/health")
        async def health():
            return Response(status_code=200 if proxy.router.live else 503)

        @app.get("/router/stats")
        async def stats():
            return JSONResponse(proxy.stats())

        @app.get("/metrics")
        async def metrics():
            return PlainTextResponse(proxy.prometheus())

        return app

    # -------------------------------------------------------------------------------------------- metrics
    def stats(self) -> dict:
        with self.lock:
            r = self.router
            stale = r._stale(time.monotonic()) if r.stale_after is not None else []
            return {"policy": r.policy.name, "replicas": list(r.replicas), "live": list(r.live),
                    "routed": dict(r.metrics["routed"]), "outstanding_requests": r.outstanding_requests(),
                    "outstanding_blocks": r.outstanding_blocks(), "events_applied": r.metrics["events_applied"],
                    "events_rejected": r.metrics["events_rejected"], "stale_now": stale,
                    "stale_ever": list(r.metrics["stale_replicas"]), "stale_routings": r.metrics["stale_routings"],
                    "batches_malformed": self.subscriber.malformed, "batch_gaps": dict(self.subscriber.gaps),
                    "indexed_blocks": {x: len(r.policy.index.blocks_of(x)) for x in r.replicas}
                    if hasattr(r.policy, "index") else None,
                    **{k: (dict(v) if isinstance(v, dict) else v) for k, v in self.counters.items()}}

    def prometheus(self) -> str:
        """stats() as Prometheus text (prometheus_client's families, as serving/metrics.py's RouterCollector)."""
        from prometheus_client import CollectorRegistry, generate_latest
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
        s = self.stats()
        families = [InfoMetricFamily("router", "the routing policy", value={"policy": s["policy"]})]

        def per_replica(name, values, help_text, kind=GaugeMetricFamily):
            family = kind(name, help_text, labels=["replica"])
            for replica, value in values.items():
                family.add_metric([str(replica)], value)
            families.append(family)

        def scalar(name, value, help_text):
            families.append(CounterMetricFamily(name, help_text, value=value))

        per_replica("router_replica_up", {x: int(x in s["live"]) for x in s["replicas"]}, "1 while the replica is live")
        per_replica("router_requests_routed", s["routed"], "requests sent to the replica", CounterMetricFamily)
        per_replica("router_outstanding_requests", s["outstanding_requests"], "requests not yet answered")
        per_replica("router_outstanding_blocks", s["outstanding_blocks"], "KV blocks of outstanding requests")
        per_replica("router_kv_events_stale", {x: int(x in s["stale_now"]) for x in s["replicas"]},
                    "1: no KV events for stale_after s while busy: routed on load alone (load-only fallback)")
        per_replica("router_kv_event_batches", s["event_batches"], "event batches received", CounterMetricFamily)
        per_replica("router_kv_event_batch_gaps", s["batch_gaps"], "batches missed (sequence gaps)",
                    CounterMetricFamily)
        per_replica("router_replica_failures", s["replica_failures"], "times the replica was taken out",
                    CounterMetricFamily)
        if s["indexed_blocks"] is not None:
            per_replica("router_indexed_blocks", s["indexed_blocks"], "blocks the index says the replica holds")
        scalar("router_kv_events_applied", s["events_applied"], "KV events applied to the index")
        scalar("router_kv_events_rejected", s["events_rejected"], "KV events logged and skipped")
        scalar("router_kv_event_batches_malformed", s["batches_malformed"], "undecodable batches skipped")
        scalar("router_stale_routings", s["stale_routings"], "routings made with a stale replica hidden")
        scalar("router_block_hash_checked", s["hash_checked"], "BlockStored whose hashes the proxy reproduced")
        scalar("router_block_hash_mismatch", s["hash_mismatch"], "BlockStored whose hashes it did not")
        scalar("router_retried", s["retried"], "requests retried on another replica")
        scalar("router_index_behind", s["index_behind"], "requests whose first block had been routed before "
               "but no replica's events held it (not yet announced, or evicted)")
        scalar("router_bound_prompt_tokens", s["bound_queries"], "prompt tokens routed")
        scalar("router_bound_cached_tokens", s["bound_hits"],
               "prompt tokens one unlimited cache would have held (blocks seen before: an upper bound)")

        class _Families:
            def collect(self):
                return families

        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Families())
        return generate_latest(registry).decode()


def parse_replica(spec: str, i: int) -> tuple:
    """'URL=EVENTS_ENDPOINT' or 'URL' -> (name, (url, endpoint)); the name is the replica's index."""
    url, _, endpoint = spec.partition("=")
    return i, (url, endpoint or None)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m helpers.course.routing.proxy", description=__doc__.split("\n")[0])
    parser.add_argument("--replica", action="append", required=True, help="URL[=tcp://host:port of its KV events]")
    parser.add_argument("--policy", default="kv", help="round_robin | least_outstanding | kv | approx")
    parser.add_argument("--overlap-score-weight", type=float, default=1.0)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--hash", default="vllm", choices=["vllm", "vllm-bytes", "course"],
                        help="vllm: 64-bit ints (vLLM's default events); vllm-bytes: "
                             "VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0; course: the course's engines")
    parser.add_argument("--stale-after", type=float, default=5.0)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if args.hash == "course":
        hasher = load_impl("prefix_cache").block_hashes
    else:
        hasher = VllmHasher(external=args.hash == "vllm")
    replicas = dict(parse_replica(spec, i) for i, spec in enumerate(args.replica))
    proxy = RouterProxy(replicas, make_policy(args.policy, args.overlap_score_weight), args.block_size, hasher,
                        args.stale_after)
    import uvicorn
    print(f"router ({proxy.router.policy.name}) serving on http://{args.host}:{args.port} in front of "
          f"{len(replicas)} replicas", flush=True)
    uvicorn.run(proxy.app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
