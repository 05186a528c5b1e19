"""The course's scheduler beside vLLM's real `Scheduler`, step by step, on the same random workloads.

    make vllm-env               # once: vLLM's own environment, .venv-vllm (see helpers/vllm_check.py)
    make vllm-scheduler-check   # about a minute: this file, run by the course's python

vLLM's V1 scheduler runs on CPU without a model, as vLLM's own tests drive it (`tests/v1/core/utils.py`,
`create_scheduler`): a `Scheduler` over a `KVCacheConfig` of N blocks (one full-attention group; no tensors),
requests given as prompt token ids, `schedule()`, then `update_from_output` with a `ModelRunnerOutput` that
samples token 0 for every request whose prompt (or recomputation) is complete. The course's side is
`LLMEngine.modelled` on a `KVCacheManager` of the same blocks (its ModelledRunner samples token 0 too), driven the
same way. This file is run by the course's python (`python -m helpers.vllm_scheduler_check`): it draws the
workloads, runs the course's engine, then starts `.venv-vllm/bin/python helpers/vllm_scheduler_check.py
--vllm-worker` once; the worker imports only vLLM and the standard library (never `helpers`), reads the workloads
as JSON on stdin and prints one JSON line of traces.

What is compared, every step: the scheduled requests in scheduling order with their token counts, the requests
preempted, the requests admitted with their prefix-cache hits, and the free blocks after the step; at the end the
prefix-cache metric (queries / hits, preempted re-admissions apart). Each workload runs twice: prefix caching off
(where the two must agree exactly: same rules, no cache), then on. With prefix caching on, the KV events too
(vLLM's with `--kv-events-config`-style KVEventsConfig(enable_kv_cache_events=True), kept in the process): the
blocks stored and removed each step, each named by its tokens from the start of its sequence, since the two sides'
hashes are not the same bytes (below).

Both sides configured alike (vLLM 0.32 option names; the course's SchedulerConfig takes the same names):
  max_num_batched_tokens, max_num_seqs, long_prefill_token_threshold: drawn per workload
  enable_chunked_prefill=True; scheduler_reserve_full_isl=True (vLLM's default; the course's
  full_sequence_must_fit=True); watermark=0.0 (vLLM's default); policy="fcfs"; block_size drawn (4, 8 or 16);
  num_gpu_blocks = the course's num_blocks + 1 (vLLM's block pool keeps block 0 as its null block);
  max_model_len=256 (the tiny Llama's), every request's prompt + max_tokens below it; ignore_eos.

Where the course deliberately differs from vLLM 0.32 (it can only show with prefix caching on): exercise 7.3's
rule "one block per hash". When two requests compute the same prefix at the same time (one admitted while the
other is still prefilling it), both blocks end up full with the same hash: vLLM caches both (its block pool maps a
hash to several blocks, and each request's blocks are cached once, when they fill); the course caches the first,
leaves the second uncached (freed to the front of the free list, not to the LRU end), and registers it when its
request fills a later block if the first copy was evicted meanwhile (cache_blocks rescans the request's table).
Same hits at the time; a later eviction can take other blocks, and then the hits differ. The check proves this is
the only difference: it runs vLLM a third time with `BlockPool._insert_block_hash` and `cache_full_blocks`
patched to follow the course's rule, and expects every workload identical. Eviction order is otherwise the same:
vLLM 0.32 puts freed blocks that hold no hash at the front of its free queue and cached ones at the back (least
recently freed first, a request's tail before its head), which is the course's "never-cached free blocks first,
then the least recently used cached block".

KV events: the same blocks stored and removed every step, except around the duplicate blocks above (vLLM stores
the second copy and later removes it: the hash stays cached); against vLLM patched as above, their net change to
the cache every step is identical in every workload, and the event lists themselves in all but a few: where a
hash moves from an evicted block to a duplicate within one allocation, vLLM sends BlockRemoved then BlockStored,
the course (which diffs the cache around each allocation) sends nothing. The events' hashes differ in form:
vLLM 0.32 publishes the low 64 bits of the hash as an int (VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1, its default),
the course the 32 bytes; and the hashes themselves differ in two inputs only (the scheme, SHA-256 of the pickled
(parent, tokens, extra keys), is the same): vLLM's first parent is sha256(pickle("vllm-none-hash")) unless
PYTHONHASHSEED is set (the course: 32 zero bytes), and vLLM tags a salt, (("cache_salt", salt),) (the course:
(salt,)).

What it found (vLLM 0.32.0): seed 19, 80 workloads: prefix caching off 80/80 identical step by step (4,966
steps, 118 preemptions), on 80/80 (4,796 steps, 105 preemptions), KV events identical in 73/80 (80/80 against
the patched vLLM). Seeds 7, 23 and 19 with 200 workloads each:
off 200/200 every time; on 198, 197 and 198 of 200, every other one after vLLM had cached one hash in two
blocks, and 200/200 every time against vLLM patched to keep one block per hash. Two rules of the course's engine
were not vLLM's and were fixed when this check first ran: the long_prefill_token_threshold applies only when more
than one request is running or waiting (without that, 4 workloads of 80 differed with prefix caching off, 2 more
with it on), and the full-sequence admission gate counts cached hit blocks that no request holds as taken (they
are counted free until then; without that, 4 more workloads differed with prefix caching on). `--show INDEX`
prints one workload's two traces in full.

`--json PATH` also writes the figures (the make target writes helpers/course/data/vllm_scheduler_check.json).
The vLLM side's ModelConfig reads the tiny Llama's config.json (helpers/course/data/tiny_llama) for
max_model_len and the architecture; no weights are loaded and nothing is computed.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

if __name__ == "__main__" and sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)     # run as a script: helpers/ must not shadow modules (plots, run, magic...) in vLLM's env

ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = ROOT / "helpers" / "course" / "data" / "tiny_llama"
RESULT_PATH = ROOT / "helpers" / "course" / "data" / "vllm_scheduler_check.json"
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
NUM_WORKLOADS = 80
SEED = 19
MAX_MODEL_LEN = 256
MAX_STEPS = 5000
ONE_BLOCK = "True, vLLM keeping one block per hash"
SHOWN_DIFFERENCES = 3          # differing steps printed per workload


# ---------------------------------------------------------------------------------------------- the workloads
def make_workloads(n: int = NUM_WORKLOADS, seed: int = SEED) -> list[dict]:
    """n random workloads: requests (prompt ids, max_tokens, arrival step) and scheduler/pool settings. Prompts
    often share a prefix (2 shared prefixes per workload), some carry a cache salt (only requests with the same
    salt share blocks); pools are small enough to preempt; every request fits the pool alone (its prompt +
    max_tokens), so both schedulers always finish."""
    rng = random.Random(seed)
    workloads = []
    for index in range(n):
        salts = random.Random(seed * 1000 + index)       # its own stream: the other draws stay as they were
        block_size = rng.choice([4, 8, 16])
        prefixes = [[rng.randrange(1, 256) for _ in range(rng.randint(4, 48))] for _ in range(2)]
        requests = []
        for i in range(rng.randint(2, 10)):
            own = [rng.randrange(1, 256) for _ in range(rng.randint(1, 40))]
            prompt = (rng.choice(prefixes) + own) if rng.random() < 0.6 else own
            requests.append({"rid": str(i), "prompt": prompt, "max_tokens": rng.randint(1, 32),
                             "arrival": rng.choice([0, 0, 0, rng.randint(0, 12)]),
                             "cache_salt": salts.choice([None, None, None, "tenant a", "tenant b"])})
        largest = max(-(-(len(r["prompt"]) + r["max_tokens"]) // block_size) for r in requests)
        max_num_seqs = rng.randint(1, 8)
        workloads.append({
            "index": index, "block_size": block_size,
            "num_blocks": largest + rng.randint(0, 2 * largest),
            "max_num_batched_tokens": rng.randint(max(max_num_seqs, 4), 96),
            "max_num_seqs": max_num_seqs,
            "long_prefill_token_threshold": rng.choice([0, 0, rng.randint(2, 32)]),
            "requests": requests,
        })
    return workloads


class _Stored:
    """A BlockStored event (the fields _EventPrefixes reads)."""

    def __init__(self, block_hashes, parent_block_hash, token_ids, block_size):
        self.block_hashes, self.parent_block_hash = block_hashes, parent_block_hash
        self.token_ids, self.block_size = token_ids, block_size


_Stored.__name__ = "BlockStored"


class _EventPrefixes:
    """KV events (BlockStored / BlockRemoved, the course's or vLLM's: same fields) turned into what they mean,
    independent of how each side hashes: every block named by the tokens from the start of its sequence to its
    end (a short digest of them). Hashes are mapped through the parent chain the events carry."""

    def __init__(self):
        self.prefix_of = {}

    @staticmethod
    def key(prefix) -> str:
        return hashlib.sha1(repr(tuple(prefix)).encode()).hexdigest()[:10]

    def step(self, events) -> tuple[list, list]:
        stored, removed = [], []
        for event in events:
            kind = type(event).__name__
            if kind == "BlockStored":
                size = event.block_size
                prefix = self.prefix_of.get(event.parent_block_hash, ()) if event.parent_block_hash else ()
                for i, h in enumerate(event.block_hashes):
                    prefix = tuple(prefix) + tuple(event.token_ids[i * size:(i + 1) * size])
                    self.prefix_of[h] = prefix
                    stored.append(self.key(prefix))
            elif kind == "BlockRemoved":
                removed.extend(self.key(self.prefix_of.get(h, ("?",))) for h in event.block_hashes)
        return sorted(stored), sorted(removed)


def _arrivals(workload) -> dict:
    by_step: dict = {}
    for r in workload["requests"]:
        by_step.setdefault(r["arrival"], []).append(r)
    return by_step


# ---------------------------------------------------------------------------------------------- the course's side
def run_course(workload: dict, enable_caching: bool) -> dict:
    """The course's engine (LLMEngine.modelled on a KVCacheManager) on one workload: a trace of every step."""
    from helpers.course.engine import KVCacheManager, KVEventLog, LLMEngine, Request, SchedulerConfig
    config = SchedulerConfig(max_num_batched_tokens=workload["max_num_batched_tokens"],
                             max_num_seqs=workload["max_num_seqs"],
                             long_prefill_token_threshold=workload["long_prefill_token_threshold"],
                             enable_chunked_prefill=True, full_sequence_must_fit=True, policy="fcfs")
    log, events = KVEventLog(), _EventPrefixes()
    kv = KVCacheManager(workload["num_blocks"], workload["block_size"], enable_caching, events=log)
    engine = LLMEngine.modelled(kv=kv, config=config)
    outputs = []
    schedule = engine.scheduler.schedule

    def recording(*args, **kwargs):
        output = schedule(*args, **kwargs)
        outputs.append(output)
        return output
    engine.scheduler.schedule = recording
    arrivals, pending, steps = _arrivals(workload), len(workload["requests"]), []
    for t in range(MAX_STEPS):
        for r in arrivals.get(t, []):
            engine.add_request(Request(r["rid"], r["prompt"], r["max_tokens"], arrival=t, cache_salt=r["cache_salt"]))
            pending -= 1
        if not engine.has_unfinished:
            if not pending:
                break
            continue
        engine.step()
        failed = engine.take_failed()
        if failed:
            raise RuntimeError(f"workload {workload['index']}: request {failed[0].rid} failed: {failed[0].error}")
        output = outputs[-1]
        stored, removed = events.step(log.take())
        steps.append({"t": t, "stored": stored, "removed": removed,
                      "scheduled": [[str(rid), n] for rid, n in output.num_scheduled_tokens.items()],
                      "preempted": sorted(str(r.rid) for r in output.preempted),
                      "admitted": [[str(r.rid), r.num_computed_tokens - output.num_scheduled_tokens[r.rid]]
                                   for r in output.admitted],
                      "free": kv.num_free_blocks,
                      "cached": len(kv.block_manager.cached) if enable_caching else 0})
    else:
        raise RuntimeError(f"workload {workload['index']}: the course's engine did not finish in {MAX_STEPS} steps")
    stats = kv.stats
    return {"steps": steps, "stats": [stats.queries, stats.hits, stats.preempted_queries, stats.preempted_hits]}


# ---------------------------------------------------------------------------------------------- vLLM's side
def vllm_worker() -> None:
    """In .venv-vllm: read {"workloads": [...]} on stdin, print {"version", "runs": {caching: [trace, ...]}}."""
    import io
    import logging
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
    logging.disable(logging.WARNING)
    workloads = json.load(sys.stdin)["workloads"]
    stdout, sys.stdout = sys.stdout, io.StringIO()         # vLLM prints while importing; keep stdout JSON only
    try:
        import torch
        import vllm
        from vllm.config import CacheConfig, KVEventsConfig, ModelConfig, SchedulerConfig, VllmConfig
        from vllm.sampling_params import SamplingParams
        from vllm.utils.hashing import sha256
        from vllm.v1.core.kv_cache_utils import (get_block_hash, get_request_block_hasher, init_none_hash,
                                                 make_block_hash_with_group_id, maybe_convert_block_hash)
        from vllm.v1.core.sched.scheduler import Scheduler
        from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
        from vllm.v1.outputs import ModelRunnerOutput
        from vllm.v1.request import Request
        from vllm.v1.structured_output import StructuredOutputManager

        init_none_hash(sha256)
        model_config = ModelConfig(model=str(MODEL_DIR), dtype="float32", seed=0, skip_tokenizer_init=True,
                                   max_model_len=MAX_MODEL_LEN)

        def make_scheduler(w, enable_caching):
            scheduler_config = SchedulerConfig(
                max_num_batched_tokens=w["max_num_batched_tokens"], max_num_seqs=w["max_num_seqs"],
                long_prefill_token_threshold=w["long_prefill_token_threshold"], enable_chunked_prefill=True,
                scheduler_reserve_full_isl=True, watermark=0.0, policy="fcfs",
                max_model_len=MAX_MODEL_LEN, is_encoder_decoder=False)
            cache_config = CacheConfig(block_size=w["block_size"], enable_prefix_caching=enable_caching)
            vllm_config = VllmConfig(scheduler_config=scheduler_config, model_config=model_config,
                                     cache_config=cache_config,     # KV events, kept here (no publisher)
                                     kv_events_config=KVEventsConfig(enable_kv_cache_events=True, publisher="null"))
            num_blocks = w["num_blocks"] + 1                 # + vLLM's null block
            cache_config.num_gpu_blocks = num_blocks
            kv_cache_config = KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[], kv_cache_groups=[
                KVCacheGroupSpec(["layer"], FullAttentionSpec(block_size=w["block_size"], num_kv_heads=1,
                                                              head_size=1, dtype=torch.float32))])
            scheduler = Scheduler(vllm_config=vllm_config, kv_cache_config=kv_cache_config,
                                  structured_output_manager=StructuredOutputManager(vllm_config),
                                  block_size=w["block_size"], log_stats=True)
            assert vllm_config.scheduler_config.scheduler_reserve_full_isl
            assert vllm_config.scheduler_config.watermark == 0.0
            return scheduler

        def run(w, enable_caching, one_block_per_hash=False):
            scheduler = make_scheduler(w, enable_caching)
            pool = scheduler.kv_cache_manager.block_pool
            hashes = pool.cached_block_hash_to_block
            captured, skipped, late, events = [], [], [], _EventPrefixes()
            scheduler.kv_event_publisher.publish = lambda batch: captured.extend(batch.events)
            if one_block_per_hash:           # the course's rule (exercise 7.3), to show it is the only difference
                insert, cache_full = pool._insert_block_hash, pool.cache_full_blocks

                def insert_once(key, block, num_tokens):
                    if hashes.get_one_block(key) is None or hashes.contain(key, block.block_id):
                        insert(key, block, num_tokens)
                    else:
                        skipped.append(maybe_convert_block_hash(get_block_hash(key)))   # still in its BlockStored

                def cache_like_the_course(request, blocks, num_cached_blocks, num_full_blocks, block_size,
                                          kv_cache_group_id, block_mask=None):
                    if num_cached_blocks >= num_full_blocks:
                        return
                    cache_full(request, blocks, num_cached_blocks, num_full_blocks, block_size, kv_cache_group_id,
                               block_mask)
                    for i in range(num_cached_blocks):      # the course's cache_blocks rescans the whole table:
                        key = make_block_hash_with_group_id(request.block_hashes[i], kv_cache_group_id)
                        if blocks[i].block_hash is None and hashes.get_one_block(key) is None:
                            insert(key, blocks[i], (i + 1) * block_size)   # a skipped duplicate, its hash now free
                            late.append(_Stored([maybe_convert_block_hash(request.block_hashes[i])],
                                                maybe_convert_block_hash(request.block_hashes[i - 1]) if i else None,
                                                request.all_token_ids[i * block_size:(i + 1) * block_size],
                                                block_size))
                pool._insert_block_hash, pool.cache_full_blocks = insert_once, cache_like_the_course
            hasher = get_request_block_hasher(w["block_size"], sha256)
            arrivals, pending, steps = _arrivals(w), len(w["requests"]), []
            stats = [0, 0, 0, 0]
            for t in range(MAX_STEPS):
                for r in arrivals.get(t, []):
                    scheduler.add_request(Request(
                        request_id=r["rid"], prompt_token_ids=list(r["prompt"]),
                        sampling_params=SamplingParams(max_tokens=r["max_tokens"], ignore_eos=True, temperature=0),
                        pooling_params=None, block_hasher=hasher, arrival_time=float(t), cache_salt=r["cache_salt"]))
                    pending -= 1
                if not scheduler.get_num_unfinished_requests():
                    if not pending:
                        break
                    continue
                waiting_before = {r.request_id for r in scheduler.waiting}
                output = scheduler.schedule()
                ids = list(output.num_scheduled_tokens)
                admitted = [[r.request_id, r.num_computed_tokens - output.num_scheduled_tokens[r.request_id]]
                            for r in scheduler.running if r.request_id in waiting_before]
                sampled = [[0] if scheduler.requests[rid].num_computed_tokens >= scheduler.requests[rid].num_tokens
                           else [] for rid in ids]
                result = scheduler.update_from_output(output, ModelRunnerOutput(
                    req_ids=ids, req_id_to_index={rid: i for i, rid in enumerate(ids)}, sampled_token_ids=sampled))
                for outputs in result.values():
                    s = outputs.scheduler_stats.prefix_cache_stats if outputs.scheduler_stats else None
                    if s is not None:
                        stats = [stats[0] + s.queries, stats[1] + s.hits, stats[2] + s.preempted_queries,
                                 stats[3] + s.preempted_hits]
                stored, removed = events.step(captured + late)
                for h in skipped:
                    stored.remove(events.key(events.prefix_of[h]))
                captured.clear(), skipped.clear(), late.clear()
                steps.append({"t": t, "stored": stored, "removed": removed,
                              "scheduled": [[rid, n] for rid, n in output.num_scheduled_tokens.items()],
                              "preempted": sorted(output.preempted_req_ids or ()),
                              "admitted": admitted, "free": pool.get_num_free_blocks(),
                              "cached": len(hashes),
                              "duplicates": sum(isinstance(b, dict) for b in hashes._cache.values())})
            else:
                raise RuntimeError(f"workload {w['index']}: vLLM did not finish in {MAX_STEPS} steps")
            return {"steps": steps, "stats": stats}

        runs = {str(caching): [run(w, caching) for w in workloads] for caching in (False, True)}
        runs[ONE_BLOCK] = [run(w, True, one_block_per_hash=True) for w in workloads]
        version = vllm.__version__
    finally:
        sys.stdout = stdout
    print(json.dumps({"version": version, "runs": runs}))


def run_vllm(workloads: list[dict]) -> dict:
    if not VLLM_PYTHON.exists():
        raise SystemExit(f"{VLLM_PYTHON} not found: run `make vllm-env` first (about 10 minutes)")
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "ERROR", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([str(VLLM_PYTHON), str(Path(__file__).resolve()), "--vllm-worker"],
                          input=json.dumps({"workloads": workloads}), capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=1200)
    if proc.returncode != 0:
        raise SystemExit(f"the vLLM worker failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------- the comparison
DECISIONS = ("scheduled", "preempted", "admitted", "free")      # compared; "cached", "duplicates": shown only


def _net(step) -> tuple:
    """A step's KV events as the change they make to the cache: a block stored and removed in the same step (or
    removed then stored: a hash moving to another block) cancels out."""
    stored, removed = Counter(step["stored"]), Counter(step["removed"])
    return sorted((stored - removed).elements()), sorted((removed - stored).elements())


def events_differ(course: dict, vllm: dict, net: bool = False) -> int | None:
    """The first step whose KV events (blocks stored and removed, by token prefix) differ; None: none.
    net: compare what they change in the cache (what a router replaying them ends up with) instead."""
    a, b = course["steps"], vllm["steps"]
    view = _net if net else (lambda step: (step["stored"], step["removed"]))
    for i in range(max(len(a), len(b))):
        x, y = (a[i] if i < len(a) else None), (b[i] if i < len(b) else None)
        if x is None or y is None or view(x) != view(y):
            return i
    return None


def _same(x, y) -> bool:
    return x is not None and y is not None and all(x[k] == y[k] for k in DECISIONS)


def _describe(step) -> str:
    if step is None:
        return "(finished)"
    out = " ".join(f"{rid}:{n}" for rid, n in step["scheduled"])
    if step["preempted"]:
        out += f" | preempted {','.join(step['preempted'])}"
    if step["admitted"]:
        out += " | admitted " + " ".join(f"{rid}(hits {h})" for rid, h in step["admitted"])
    out += f" | free {step['free']} | cached hashes {step['cached']}"
    return out + (f" ({step['duplicates']} in two blocks)" if step.get("duplicates") else "")


def compare(course: dict, vllm: dict) -> list[str]:
    """Lines describing where the two traces differ (empty: the same decisions every step, the same metric)."""
    lines, more = [], 0
    a, b = course["steps"], vllm["steps"]
    for i in range(max(len(a), len(b))):
        x, y = (a[i] if i < len(a) else None), (b[i] if i < len(b) else None)
        if not _same(x, y):
            if len(lines) < SHOWN_DIFFERENCES:
                lines.append(f"  step {i}:\n    course {_describe(x)}\n    vLLM   {_describe(y)}")
            else:
                more += 1
    if more:
        lines.append(f"  ... and {more} more differing steps")
    if course["stats"] != vllm["stats"]:
        lines.append(f"  prefix-cache metric (queries, hits, preempted queries, preempted hits): course "
                     f"{course['stats']}, vLLM {vllm['stats']}")
    return lines


def first_difference(course: dict, vllm: dict) -> int | None:
    a, b = course["steps"], vllm["steps"]
    for i in range(max(len(a), len(b))):
        if not _same(a[i] if i < len(a) else None, b[i] if i < len(b) else None):
            return i
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vllm-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workloads", type=int, default=NUM_WORKLOADS)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--json", default=None, help=f"write the figures here (the make target: {RESULT_PATH})")
    parser.add_argument("--show", type=int, default=None, metavar="INDEX",
                        help="print one workload's two traces in full, step by step (prefix caching on)")
    args = parser.parse_args(argv)
    if args.vllm_worker:
        vllm_worker()
        return 0
    os.environ.setdefault("COURSE_IMPL", "solutions")     # the reference answers of 7.1, 7.3, 7.4 (as vllm_check)
    workloads = make_workloads(args.workloads, args.seed)
    if args.show is not None:
        workloads = [workloads[args.show]]
    started = time.perf_counter()
    course = {str(caching): [run_course(w, caching) for w in workloads] for caching in (False, True)}
    theirs = run_vllm(workloads)
    n = len(workloads)
    if args.show is not None:
        show(workloads[0], course["True"][0], theirs["runs"]["True"][0])
        return 0
    print(f"vLLM {theirs['version']}'s Scheduler beside the course's engine (helpers/course/engine), {n} random "
          f"workloads (seed {args.seed}), each with prefix caching off, then on. Both configured alike: "
          "enable_chunked_prefill=True, scheduler_reserve_full_isl=True (the course's full_sequence_must_fit), "
          "watermark=0.0, policy=fcfs, num_gpu_blocks = the course's num_blocks + 1 (vLLM's null block); drawn "
          "per workload: block_size, num_blocks, max_num_batched_tokens, max_num_seqs, long_prefill_token_threshold")
    summary, same_in = {}, {w["index"]: 0 for w in workloads}
    for caching in ("False", "True"):
        label = "prefix caching " + ("on" if caching == "True" else "off")
        same = duplicated = steps = preemptions = same_events = same_net = 0
        print(f"\n== {label}")
        for w, c, v in zip(workloads, course[caching], theirs["runs"][caching]):
            same_events += events_differ(c, v) is None
            same_net += events_differ(c, v, net=True) is None
            steps += len(v["steps"])
            preemptions += sum(len(s["preempted"]) for s in v["steps"])
            lines = compare(c, v)
            if not lines:
                same += 1
                same_in[w["index"]] += 1
                continue
            first = first_difference(c, v)
            twice = first is not None and any(s.get("duplicates") for s in v["steps"][:first + 1])
            duplicated += twice
            settings = {k: w[k] for k in ("block_size", "num_blocks", "max_num_batched_tokens", "max_num_seqs",
                                          "long_prefill_token_threshold")}
            print(f"workload {w['index']} ({len(w['requests'])} requests, {settings})" + (
                ": vLLM held a hash in two blocks before the first difference (the course keeps one)"
                if twice else "") + ":")
            print("\n".join(lines))
        print(f"{label}: {same}/{n} workloads identical step by step ({steps} steps, {preemptions} preemptions in "
              f"all)" + (f"; {duplicated} of the {n - same} others differ after vLLM cached a hash in two blocks"
                         if duplicated else ""))
        if caching == "True":
            print(f"{label}: KV events (blocks stored and removed each step, by their tokens) identical in "
                  f"{same_events}/{n} workloads, their net change to the cache each step in {same_net}/{n}")
        summary[label] = {"identical": same, "workloads": n, "steps": steps, "preemptions": preemptions,
                          "differ_after_duplicate_hash": duplicated, "kv_events_identical": same_events,
                          "kv_events_net_identical": same_net}
    # The check that the deliberate difference is the only one: vLLM patched to keep one block per hash (its
    # BlockPool._insert_block_hash skips a hash another block holds, the course's rule) against the course.
    pairs = list(zip(workloads, course["True"], theirs["runs"][ONE_BLOCK]))
    differing = [w["index"] for w, c, v in pairs if compare(c, v)]
    events = [w["index"] for w, c, v in pairs if events_differ(c, v, net=True) is not None]
    exact = sum(1 for w, c, v in pairs if events_differ(c, v) is None)
    print(f"\nprefix caching on, vLLM patched to keep one block per hash as the course does: {n - len(differing)}/{n} "
          f"workloads identical step by step" + (f" (still differing: {differing})" if differing else "")
          + f"; KV events identical in {exact}/{n}, their net change each step in {n - len(events)}/{n}"
          + (f" (differing: {events})" if events else ""))
    summary["prefix caching on, vLLM keeping one block per hash"] = {
        "identical": n - len(differing), "workloads": n, "kv_events_identical": exact,
        "kv_events_net_identical": n - len(events)}
    unexplained = n - summary["prefix caching off"]["identical"] + len(set(differing) | set(events))
    identical_both = sum(1 for k in same_in.values() if k == 2)
    print(f"\n{identical_both}/{n} workloads identical step by step (prefix caching off and on; "
          f"{time.perf_counter() - started:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "vllm_version": theirs["version"], "seed": args.seed, "workloads": n,
            "config": {"enable_chunked_prefill": True, "scheduler_reserve_full_isl": True, "watermark": 0.0,
                       "policy": "fcfs", "num_gpu_blocks": "course num_blocks + 1 (null block)"},
            "identical_both": identical_both, "by_mode": summary,
            "deliberate_difference": "exercise 7.3's one block per hash: vLLM caches a block whose hash another "
                                     "block holds (two blocks per hash); the course keeps the first and registers "
                                     "the second later only if the first was evicted, so a later eviction can "
                                     "take other blocks",
            "max_model_len": MAX_MODEL_LEN, "drawn": ["block_size (4, 8, 16)", "num_blocks", "max_num_batched_tokens",
                                                      "max_num_seqs", "long_prefill_token_threshold", "cache_salt"]},
            indent=1) + "\n")
    if unexplained:
        print(f"{unexplained} workloads differ for another reason than the course's one deliberate difference")
    return 1 if unexplained else 0


def show(w: dict, c: dict, v: dict) -> None:
    """One workload's traces, every step (≠ marks the steps whose decisions differ)."""
    print(json.dumps({k: w[k] for k in w if k != "requests"}))
    for r in w["requests"]:
        print(f"request {r['rid']}: {len(r['prompt'])} prompt tokens, max_tokens {r['max_tokens']}, arrival step "
              f"{r['arrival']}")
    for i in range(max(len(c["steps"]), len(v["steps"]))):
        x, y = (c["steps"][i] if i < len(c["steps"]) else None), (v["steps"][i] if i < len(v["steps"]) else None)
        mark = "  " if _same(x, y) else "≠ "
        print(f"{mark}{i:4d} course {_describe(x)}\n{mark}     vLLM   {_describe(y)}")
    print(f"prefix-cache metric (queries, hits, preempted queries, preempted hits): course {c['stats']}, "
          f"vLLM {v['stats']}")


if __name__ == "__main__":
    sys.exit(main())
