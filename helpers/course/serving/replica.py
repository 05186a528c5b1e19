"""A replica: one worker process that owns a copy of the model and an engine, and talks to the front end
over a pipe. Data parallelism for serving is exactly this: N independent copies, each with its own batch.

Messages (tuples, pickled by multiprocessing.Connection):
    front end -> replica   ("submit", rid, {prompt, max_tokens, temperature, top_p, seed, logprobs})
                           ("cancel", rid)           the client went away (or a stop string was found): stop
                                                     computing it and free its KV blocks
    replica -> front end   ("ready", pid, rank_pids)   model loaded, accepting work (rank_pids: every rank's
                                                     process, rank 0 first; [pid] without tensor parallelism)
                           ("tokens", rid, token_ids, logprobs)   after each step, for each request that produced
                                                     tokens: the new ones (logprobs: None, or one
                                                     {"logprob", "top"} per token; engine/sampling.py)
                           ("done", rid, tokens, timings, logprobs)   all its tokens (whole); the step's new
                                                     tokens of a finished request come only here, so a
                                                     streaming client gets its last token with the finish
                                                     (logprobs: of the tokens not sent before, or None)
                           ("failed", rid, status, message)   this request failed here (400: it was
                                                     invalid, 500: it hit a bug); the replica carries on
                           ("cancelled", rid)        the cancel was handled: the replica holds rid no more
                           ("stats", {busy_seconds, waiting, running, steps, tokens})   also the heartbeat;
                                                     a paged replica adds its KV figures (kv_stats: prefix_queries,
                                                     prefix_hits, ...) and prefill_tokens (prompt tokens computed);
                                                     a speculating one its spec_* counters (spec_stats)
                           ("kv_events", endpoint)   before "ready", with --kv-events-config: where its ZeroMQ
                                                     publisher is bound (the front end subscribes there)

KV events (chapter 9). With `kv_events_config` the replica's KV cache manager logs its BlockStored / BlockRemoved /
AllBlocksCleared events (engine/kv_events.py) and the loop publishes them after every step as one batch on a
ZeroMQ PUB socket (routing/zmq_events.py: vLLM's (topic, seq, payload) frames, routing/wire.py: vLLM's msgpack
bytes), as vLLM's scheduler publishes what its KV cache manager took at the end of each update_from_output
(vllm/v1/core/sched/scheduler.py: kv_cache_manager.take_events(), kv_event_publisher.publish(KVEventBatch(...))).
Replica i binds the configured endpoint with its port + i, as vLLM offsets a data-parallel rank's endpoint
(vllm/distributed/kv_events.py ZmqEventPublisher.offset_endpoint_port); `tcp://*:P` binds loopback only here.
The socket is bound before the model loads, and its address sent at once, so the front end's subscription is
connected by the time the first events go out (PUB/SUB drops what is sent before a subscriber joined).

The loop waits on the pipe while idle and polls it between decode steps while busy, so new requests join
the batch at the next step (continuous batching) without a thread. It reports its load at least every
HEARTBEAT seconds, idle or busy: the front end takes a replica that falls silent for longer than its
`stuck_after` as stuck (stopped, hung), kills it and retries its requests elsewhere. It exits when the pipe
closes (the front end stopped or died) and, on Linux, when its parent process dies.
"""
from __future__ import annotations

import importlib
import os
import random
import re
import signal
import stat
import sys
import time
import traceback

from helpers.course.serving.config import HEARTBEAT, ServeConfig  # noqa: F401 (HEARTBEAT: config.py's, named here)
from helpers.proctree import die_with_parent

STATS_EVERY = 0.05  # seconds between load reports while busy; idle, every HEARTBEAT (config.py)


def load_model_module(spec: str):
    """`spec` names a module with load_model(), encode(), decode() and CONFIG, e.g. helpers.course.tiny_llama."""
    return importlib.import_module(spec)


def close_inherited_sockets(keep: int) -> None:
    """A forked child inherits every socket of the front end: the listening socket, the other replicas'
    pipes and every client connection open at that moment. A client reads its response until the server
    closes the connection, which does not happen while a copy of the socket lives on in a replica, so
    close them all (on Linux, /proc/self/fd lists them); keep only our own pipe."""
    try:
        fds = [int(fd) for fd in os.listdir("/proc/self/fd")]
    except OSError:
        return
    for fd in fds:
        if fd > 2 and fd != keep:
            try:
                if stat.S_ISSOCK(os.fstat(fd).st_mode):
                    os.close(fd)
            except OSError:
                pass


class GroupBroken(RuntimeError):
    """A collective of a tensor-parallel replica failed: a peer rank is gone. The rank that sees it ends, the
    launcher stops the others, and the replica's process exits, so the front end sees end-of-file and retries its
    requests on another replica (as a rank's death ends a vLLM engine: vllm/v1/executor/multiproc_executor.py
    monitors its workers and shuts the executor down when one dies)."""


# What a collective says when a peer rank is gone (gloo and NCCL's words; helpers/launch.py's _PEER_GONE), or names
# the process group's transport: never a fault of the request being computed.
_GROUP_ERRORS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "communicator was aborted",
                 "/gloo/", "gloo/transport", "ProcessGroupGloo", "ProcessGroupNCCL", "DistBackendError",
                 "DistNetworkError", "DistStoreError")


def group_broken(error: str) -> bool:
    """Whether a step's error (`"Type: message"`) is the failure of the replica's process group."""
    return any(words in error for words in _GROUP_ERRORS)


def public(message: str) -> str:
    """An error as a client may read it: without a C++ source location ("[/__w/pytorch/.../pair.cc:537]") or an
    address and port ("[127.0.0.1]:39329") of the machine's internals."""
    message = re.sub(r"\[[^\]]*\.(?:cc|cpp|cu|c|h|hpp):\d+\]\s*", "", message)
    return re.sub(r"\[?\b\d{1,3}(?:\.\d{1,3}){3}\]?:\d+", "<address>", message)


def replica_main(conn, index: int, config: ServeConfig, env: dict | None = None) -> None:
    """Body of replica process `index`: load the model, then serve the pipe until it closes. `config` is the
    server's ServeConfig, whole; env: variables to set in this process first (the balancer's replica_exercises:
    the fallback to the reference answers of exercises not written yet).

    tensor_parallel_size > 1: the replica is itself a distributed job. This process launches that many ranks
    (helpers.launch); each shards the model with chapter 2's `shard_llama` and runs an identical engine in
    lockstep. Rank 0 reads the pipe and broadcasts what arrived to the other ranks before every step, so all
    ranks make the same scheduling decisions and call the model with the same batch; the all-reduces inside
    the sharded model then pair up. Only rank 0 answers the front end.

    pipeline_parallel_size > 1: the replica is a pipeline of stages of tp ranks each
    (helpers/course/serving/pipeline_replica.py: chapter 3's `LlamaStage`s, chapter 5's `build_hybrid_stage` when
    tp > 1, driven by the engine's PipelineEngine with up to pp batches in flight, as vLLM's step_with_batch_queue).

    kv_cache "contiguous" keeps chapter 6's cache; "paged" serves from chapter 7's paged KV cache (`build_engine`;
    with pp > 1 each stage holds a pool for its own layers). With tp > 1 each rank's pool holds its own KV heads
    and every rank runs the same scheduler decisions and block tables in lockstep: SGLang's design (a scheduler
    per TP rank, kept in step by determinism); vLLM instead runs one scheduler and broadcasts its output to the
    workers.

    speculative_config (chapter 10): the paged engine gets a proposer (speculative_proposer: n-gram lookup or the
    draft model) and verifies its drafts in its step; a step may then append several tokens to a request, which
    send_tokens streams as one chunk. With tp > 1 every rank runs its own proposer on the same tokens, so all ranks
    propose, verify and roll back alike (the draft model is not sharded: each rank runs it whole)."""
    die_with_parent()
    os.environ.update(env or {})
    close_inherited_sockets(keep=conn.fileno())
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C goes to the front end, which stops us
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    from helpers.launch import launch
    tp, pp = config.tensor_parallel_size, config.pipeline_parallel_size
    if pp > 1:
        from helpers.course.serving.pipeline_replica import pipeline_rank
        launch(pipeline_rank, pp * tp, conn, config, timeout=10**7, threads=config.threads, show_output=False,
               backend="gloo")
        return
    if tp == 1:
        publisher = kv_event_publisher(config, index)
        if publisher is not None:
            conn.send(("kv_events", publisher.endpoint))
        _serve(conn, _build_engine(config, config.threads), group_size=1, publisher=publisher)
        return
    # The replica lives as long as the server: no job timeout worth speaking of. When one rank fails or dies, launch
    # stops the others and raises; the replica then exits, and its pipe's end-of-file tells the front end.
    from helpers.launch import LaunchError
    try:
        launch(_tp_rank, tp, conn, config, timeout=10**7, threads=config.threads, show_output=False,
               backend="gloo")
    except LaunchError as e:
        print(f"replica {index} (pid {os.getpid()}) exits: {str(e).splitlines()[0]}", file=sys.stderr, flush=True)
        os._exit(1)


def build_engine(model, config: ServeConfig):
    """The replica's engine (helpers/course/engine) for `model`: chapter 6's contiguous cache, or chapter 7's
    paged cache (config.kv_cache "paged": num_gpu_blocks_override blocks of block_size tokens, prefix caching);
    its SchedulerConfig is config.scheduler_config (max_num_seqs; max_num_batched_tokens, None: whole prompts;
    long_prefill_token_threshold)."""
    from helpers.course.engine import KVEventLog, LLMEngine, WallClock
    scheduler = config.scheduler_config(model.config)
    clock = PrefillCounter(WallClock())
    if config.kv_cache == "contiguous":
        return LLMEngine.contiguous(model, config=scheduler, batching=config.batching, record_steps=False,
                                    clock=clock)
    events = KVEventLog() if config.kv_events() is not None else None   # the KV events the loop publishes
    proposer, k = speculative_proposer(model, config)
    return LLMEngine.paged(model, num_blocks=config.num_gpu_blocks_override, block_size=config.block_size,
                           enable_prefix_caching=config.enable_prefix_caching, events=events, config=scheduler,
                           batching=config.batching, record_steps=False, clock=clock, proposer=proposer,
                           num_speculative_tokens=k)


def speculative_proposer(model, config: ServeConfig) -> tuple:
    """(proposer, num_speculative_tokens) from --speculative-config (config.speculative(): vLLM's SpeculativeConfig
    fields), or (None, 0). ngram: chapter 10's NgramProposer with prompt_lookup_min/_max and the model's positions
    as max_model_len (vLLM's NgramProposer reads the same three: vllm/v1/spec_decode/ngram_proposer.py); draft_model:
    DraftModelProposer on the draft checkpoint, its own paged cache as large as the target's (vLLM gives a draft
    model blocks of the one KV pool instead)."""
    spec = config.speculative()
    if spec is None:
        return None, 0
    from helpers.course.speculative import DraftModelProposer, NgramProposer
    if spec["method"] == "ngram":
        proposer = NgramProposer(spec["prompt_lookup_min"], spec["prompt_lookup_max"],
                                 max_model_len=model.config.max_position_embeddings)
    else:
        from pathlib import Path

        from transformers import LlamaForCausalLM

        from helpers.course.train_draft import DRAFT_CONFIG, DRAFT_DIR, load_draft
        if Path(spec["model"]).resolve() == DRAFT_DIR.resolve():
            draft = load_draft()
        else:
            draft = LlamaForCausalLM.from_pretrained(spec["model"], local_files_only=True,
                                                     attn_implementation=DRAFT_CONFIG._attn_implementation).eval()
        proposer = DraftModelProposer(draft, num_blocks=config.num_gpu_blocks_override, block_size=config.block_size)
    return proposer, spec["num_speculative_tokens"]


class PrefillCounter:
    """The engine's clock, counting the prompt tokens every step computed (chunks, and a preempted request's
    recomputation): what a prefix-cache hit saves. The engine hands each step's counts to its clock
    (engine.py LLMEngine.step); a server keeps no step records (record_steps=False), so they are summed here.
    vLLM exports the like as vllm:prompt_tokens_by_source{source="local_compute"} (vllm/v1/metrics/loggers.py),
    counted once per request at admission; this counts every step's, as chapter 9's replay does."""

    def __init__(self, clock):
        self.clock, self.prefill_tokens = clock, 0

    def step(self, decodes: int, prefill_tokens: int, measured: float) -> float:
        self.prefill_tokens += prefill_tokens
        return self.clock.step(decodes, prefill_tokens, measured)

    def __getattr__(self, name):
        return getattr(self.clock, name)


def replica_endpoint(endpoint: str, index: int) -> str:
    """Where replica `index` binds its KV event publisher: vLLM's offset_endpoint_port (tcp: the port + index,
    port 0 left to the OS; vllm/distributed/kv_events.py), with a wildcard host bound on loopback (the course's
    server is loopback only) and an ipc:// path suffixed _dp<index> (vLLM suffixes inproc:// so, and refuses ipc://
    for ranks > 0)."""
    scheme, _, rest = endpoint.partition("://")
    if scheme == "ipc":
        return endpoint if index == 0 else f"{endpoint}_dp{index}"
    host, _, port = rest.rpartition(":")
    host = "127.0.0.1" if host in ("*", "localhost", "") else host
    port = int(port)
    return f"tcp://{host}:{port + index if port else 0}"


def kv_event_publisher(config: ServeConfig, index: int):
    """Replica `index`'s ZmqEventPublisher (routing/zmq_events.py), bound; None without --kv-events-config."""
    events = config.kv_events()
    if events is None:
        return None
    from helpers.course.routing.zmq_events import ZmqEventPublisher
    return ZmqEventPublisher(replica_endpoint(events["endpoint"], index), topic=events["topic"], hwm=events["hwm"])


def _build_engine(config: ServeConfig, threads: int, shard=None):
    import torch
    torch.set_num_threads(threads)
    model = load_model_module(config.model).load_model().eval()
    if shard is not None:
        shard(model)
    return build_engine(model, config)


def _tp_rank(rank, world_size, conn, config: ServeConfig):
    from helpers import load_impl
    engine = _build_engine(config, threads=1, shard=load_impl("tp_llama").shard_llama)
    _serve(conn if rank == 0 else None, engine, group_size=world_size)


def _serve(conn, engine, group_size: int, publisher=None) -> None:
    """The replica loop. conn is None on the ranks > 0 of a tensor-parallel replica; publisher: the KV events'
    ZmqEventPublisher, or None."""
    import torch.distributed as dist

    from helpers.course.engine import Request
    ranks = [os.getpid()]
    if group_size > 1:
        ranks = [None] * group_size
        dist.all_gather_object(ranks, os.getpid())
    if conn is not None:
        conn.send(("ready", os.getpid(), ranks))
    last_stats = 0.0
    live = {}   # rid -> [Request, how many of its tokens were sent]: what streams after each step
    try:
        while True:
            messages = []
            if conn is not None:
                # Idle: sleep on the pipe, waking every HEARTBEAT to report (and so that the other ranks'
                # broadcast never times out). Busy: take whatever arrived, then run the next step.
                timeout = 0 if engine.has_unfinished else HEARTBEAT
                try:
                    while conn.poll(timeout):
                        msg = conn.recv()
                        if msg[0] == "submit" and msg[2].get("temperature", 0) > 0 and msg[2].get("seed") is None:
                            # the balancer draws it (once per request: a retry samples the same tokens); this
                            # is for other senders, drawn on rank 0 only, so every rank samples alike
                            msg[2]["seed"] = random.getrandbits(63)
                        messages.append(msg)
                        timeout = 0
                except (EOFError, OSError):
                    messages.append(("stop",))
            if group_size > 1:
                box = [messages]
                dist.broadcast_object_list(box, src=0)
                messages = box[0]
            failed = []   # (rid, HTTP status, message): requests that fail here, and only them
            for msg in messages:
                if msg[0] == "submit":
                    _, rid, p = msg
                    refused = refuse_with_speculation(engine, p)
                    if refused is not None:
                        failed.append((rid, 400, f"invalid request: {refused}"))
                        continue
                    try:
                        request = Request(rid, p["prompt"], p["max_tokens"], p.get("temperature", 0.0),
                                          p.get("top_p", 1.0), p.get("seed"), logprobs=p.get("logprobs"))
                        live[rid] = [request, 0]
                        engine.add_request(request)
                    except (ValueError, TypeError, KeyError) as e:
                        live.pop(rid, None)
                        failed.append((rid, 400, f"invalid request: {type(e).__name__}: {e}"))
                elif msg[0] == "cancel":
                    live.pop(msg[1], None)
                    engine.abort(msg[1])
                    if conn is not None:
                        conn.send(("cancelled", msg[1]))
                elif msg[0] == "stop":
                    return  # the front end is gone
            try:
                finished = engine.step() if engine.has_unfinished else []
            except Exception as e:  # a bug outside any one request: fail the batch, keep the replica
                if group_size > 1 and group_broken(f"{type(e).__name__}: {e}"):
                    raise GroupBroken(f"a collective failed: {e}") from e
                finished = []
                traceback.print_exc()
                for request in [*engine.running, *engine.waiting]:
                    engine.fail(request, e)
            failures = engine.take_failed()
            broken = [seq.error for seq in failures if group_size > 1 and group_broken(seq.error)]
            if broken:   # not these requests' failure: a rank is gone. Answer nothing; the replica ends.
                raise GroupBroken(f"a collective failed: {broken[0]}")
            for seq in failures:
                live.pop(seq.rid, None)
                if conn is not None:
                    print(f"replica {os.getpid()}: request {seq.rid} failed:\n{seq.traceback}",
                          file=sys.stderr, flush=True)
                failed.append((seq.rid, 500, f"the engine failed on this request: {public(seq.error)}"))
            if conn is None:
                for seq in finished:
                    live.pop(seq.rid, None)
                continue
            if publisher is not None:
                publisher.publish(engine.kv.events.take())   # this step's (and any abort's) events, one batch
            for rid, status, message in failed:
                conn.send(("failed", rid, status, message))
            send_tokens(conn, live, finished)
            now = time.monotonic()
            if finished or failed or now - last_stats > (STATS_EVERY if engine.has_unfinished else HEARTBEAT * 0.8):
                conn.send(("stats", {"busy_seconds": engine.busy_seconds, "waiting": len(engine.waiting),
                                     "running": len(engine.running), "steps": engine.num_steps,
                                     "tokens": engine.tokens_generated, **engine.kv_stats(),
                                     "prefill_tokens": getattr(engine.clock, "prefill_tokens", 0),
                                     **spec_stats(engine)}))
                last_stats = now
    except (BrokenPipeError, ConnectionResetError):
        return  # the front end is gone


def spec_stats(engine) -> dict:
    """A speculating engine's counters for the "stats" report (totals since the replica started; metrics.py
    exports them under vLLM's names), {} without a proposer."""
    stats = getattr(engine, "spec_stats", None)
    if stats is None:
        return {}
    return {"spec_num_drafts": stats.num_drafts, "spec_num_draft_tokens": stats.num_draft_tokens,
            "spec_num_accepted_tokens": stats.num_accepted_tokens,
            "spec_accepted_per_pos": list(stats.accepted_per_pos)}


def refuse_with_speculation(engine, p: dict) -> str | None:
    """Why a request cannot be served by a speculating engine, or None: the course's verification
    (verify_and_rollback) records no logprobs and samples from softmax(logits / temperature) without top_p's cut, so
    such requests get a 400 rather than a silently different answer (vLLM serves both with speculation)."""
    if getattr(engine, "proposer", None) is None:
        return None
    if p.get("logprobs") is not None:
        return "logprobs are not available with --speculative-config on this server"
    from helpers.course.serving.protocol import SAMPLING_EPS
    if p.get("temperature", 0.0) >= SAMPLING_EPS and p.get("top_p", 1.0) < 1.0:
        return "top_p < 1 with temperature > 0 is not available with --speculative-config on this server"
    return None


def send_tokens(conn, live: dict, finished: list) -> None:
    """("tokens", rid, new token ids, their logprobs or None) for every unfinished request that produced tokens
    since the last call: what a streaming client receives as they come (vLLM's engine core likewise returns each
    step's new tokens per request, EngineCoreOutput.new_token_ids in vllm/v1/engine/__init__.py); then ("done", ...)
    for each finished request, carrying its last new tokens with the finish, as vLLM's last EngineCoreOutput carries
    both (vllm/v1/core/sched/scheduler.py, update_from_output), so a client sees no extra empty chunk (`vllm bench
    serve` would count it as a token). `live`: rid -> [request, tokens sent]; the pipeline replica uses this too."""
    done = {seq.rid for seq in finished}
    for rid, entry in live.items():
        request, sent = entry
        if rid not in done and len(request.tokens) > sent:
            conn.send(("tokens", rid, request.tokens[sent:], _logprobs(request, sent)))
            entry[1] = len(request.tokens)
    for seq in finished:
        sent = live.pop(seq.rid, [seq, 0])[1]
        conn.send(("done", seq.rid, seq.tokens, seq.timings(), _logprobs(seq, sent)))


def _logprobs(request, sent: int):
    return request.output_logprobs[sent:] if getattr(request, "logprobs", None) is not None else None
