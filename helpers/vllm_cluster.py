"""`make vllm-cluster`: two real `vllm serve` replicas behind the course's router, which reads their KV events.

    make vllm-env            # once: vLLM's CPU build in .venv-vllm (see vllm_check.py)
    make vllm-cluster        # about 10 minutes: the replicas, the router per policy, two workloads, the stored JSON
    python -m helpers.vllm_cluster --show       # the stored run's table (no vLLM)

What runs (all on loopback, all stopped at the end):

* two `vllm serve helpers/course/data/tiny_llama` (vLLM's CPU build, float32, eager), each with
  `--enable-prefix-caching`, `--block-size 32` (the CPU attention takes multiples of 32), a KV cache of
  NUM_BLOCKS blocks (`--num-gpu-blocks-override`: the cache is what routing is about, so it is kept smaller than
  the workload's working set; vllm/v1/core/kv_cache_utils.py applies the override on every platform), its own
  `--kv-events-config` ZMQ publisher (`tcp://*:PORT`: vLLM binds a wildcard endpoint and *connects* to any other,
  ZmqEventPublisher._is_bind_endpoint in vllm/distributed/kv_events.py), and VLLM_SERVER_DEV_MODE=1 for
  POST /reset_prefix_cache (vllm/entrypoints/serve/dev/cache/api_router.py). Each engine's OpenMP thread is bound
  to its own core (VLLM_CPU_OMP_THREADS_BIND 0 and 1): the machine has two.
* the course's router as an HTTP proxy (helpers/course/routing/proxy.py) in front of both, restarted for each
  policy: round robin, then the KV-aware policy (KVAware: vLLM's events applied to the course's KVIndex, Dynamo's
  cost, COURSE_IMPL=solutions). Before each policy both replicas' prefix caches are reset (which also sends the
  router an AllBlocksCleared), so each policy starts cold.
* (a) the chapter's multi-tenant chat workload (helpers/course/routing/workload.py), scaled to the tiny Llama's
  256-token context: TENANTS system prompts of 96-128 tokens, sessions of 2-3 turns, each turn's prompt the
  whole conversation so far (the previous answer's token ids come back with `return_token_ids`). Sent as
  streaming completions of token ids, CONCURRENCY sessions at a time. Per replica, vLLM's own counters
  (`vllm:prefix_cache_queries_total`, `vllm:prefix_cache_hits_total`: tokens, from GET /metrics, read before
  and after) give the hit rate and the prefill tokens computed (queries - hits); the client measures TTFT.
* (b) vLLM's own benchmark client, `vllm bench serve --dataset-name prefix_repetition` (PrefixRepetitionRandom
  Dataset: NUM_PREFIXES random prefixes each shared by num_prompts / NUM_PREFIXES prompts, shuffled), against the
  router, per policy: TTFT side by side, with the replicas' counters again.

* (c) a replica dies and comes back: behind the KV-aware router (weight 4), replica 1's processes are SIGKILLed
  after KILL_AFTER requests of the chat workload; the router must drop its index entries and send everything to
  replica 0 (a turn whose stream broke is sent again by the client, up to twice); then replica 1 is started again with
  the same command and ports and must receive requests and publish events again. `--only-fault` runs this part alone
  and stores it beside the stored rounds.

It writes helpers/course/data/vllm_cluster.json (figures, versions, commands, what failed), which notebook 09
shows. Nothing in `make test` runs this.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from helpers.bench_serve import (KEEP, MODEL_DIR, ROOT, SERVED_MODEL_NAME, VLLM_PYTHON, as_typed, cpu_busy_since,
                                 cpu_times, free_port, machine, versions, vllm_env, wait_http)

RESULT_PATH = ROOT / "helpers" / "course" / "data" / "vllm_cluster.json"
BENCH_SERVE = ROOT / "helpers" / "bench_serve.py"     # `--vllm-cli ...` = the `vllm` command (see bench_serve.py)
BLOCK_SIZE = 32
NUM_BLOCKS = 48               # KV blocks per replica (1,536 tokens, one of them vLLM's null block): less than the
                              # chat workload's prefixes and sessions on one replica, enough for half of them
MAX_NUM_SEQS = 8
REPLICAS = 2
REPEATS = 2                   # rounds over the policies, the second in reverse order
KILL_AFTER = 20               # the fault phase kills replica 1 once the router has routed this many requests
# (key, proxy --policy, --overlap-score-weight, label)
POLICIES = [("round_robin", "round_robin", 1.0, "round robin"),
            ("kv", "kv", 1.0, "KV events, weight 1 (Dynamo's default)"),
            ("kv_w4", "kv", 4.0, "KV events, weight 4 (the chapter's)"),
            ("approx", "approx", 1.0, "predicted, no events (SGLang-like)")]
LABELS = {key: label for key, _, _, label in POLICIES}
# (a) the chat workload, scaled to max_model_len 256: longest prompt 128 + 3*24 + 2*16 = 232, + 16 new tokens
TENANTS, SESSIONS, TURNS = 8, 24, (2, 3)
WORKLOAD = dict(num_tenants=TENANTS, sessions=SESSIONS, turns=TURNS, system_tokens=(96, 128), user_tokens=(8, 24),
                answer_tokens=(8, 16), seed=0)
CONCURRENCY = 4
# (b) vllm bench serve
NUM_PROMPTS, NUM_PREFIXES, MAX_CONCURRENCY, OUTPUT_LEN, SEED = 48, 8, 4, 16, 0
DATASET = ["--dataset-name", "prefix_repetition", "--prefix-repetition-prefix-len", "96",
           "--prefix-repetition-suffix-len", "32", "--prefix-repetition-num-prefixes", str(NUM_PREFIXES),
           "--prefix-repetition-output-len", str(OUTPUT_LEN)]
# What was tried on the 2-core machine and what limits the configuration (recorded with each run).
NOTES = [
    "--num-gpu-blocks-override 8 does not start: vLLM keeps one block as its null block (vllm/v1/core/block_pool.py"
    " BlockPool.null_block), so 8 blocks hold 7 x 32 = 224 tokens < --max-model-len 256, and the engine core "
    "stops with \"To serve at least one request with the model's max seq len (256) ... the estimated maximum model "
    "length is 224\" (7 blocks: 192). 9 blocks is the smallest cache that starts and serves a 250-token prompt. "
    f"The default, {NUM_BLOCKS}, holds the {CONCURRENCY} requests of up to 8 blocks that run at once and about half "
    "of what the chat workload's 8 system prompts and live sessions need. A single round at 32 blocks (make "
    "vllm-cluster ARGS=--num-blocks=32, 2026-12-06 23:23 UTC) gave bench hit rates of 43% (round robin), 44% and "
    "46% (KV events, weight 1 and 4), 62% (predicted; bound 62%): the running requests (up to 4 x 5 blocks) leave "
    "a replica too few blocks for its prefixes.",
    "The --kv-events-config endpoint is a wildcard bind, tcp://*:PORT: vLLM binds only endpoints with '*', '::', "
    "ipc:// or inproc:// and connects to any other (ZmqEventPublisher._is_bind_endpoint in "
    "vllm/distributed/kv_events.py), so tcp://127.0.0.1:PORT would leave no publisher for the router to subscribe "
    "to (read in the source, not run).",
    "Two engines on two cores: VLLM_CPU_OMP_THREADS_BIND=0 and =1 give each engine's OpenMP thread its own core. "
    "With the default 'auto' a lone engine binds core 0 and reserves core 1 (its log: 'core ids=[0]', "
    "'reserved_cpus=[1]'), so two engines would both compute on core 0.",
    "vLLM sends block hashes as 64-bit ints by default (VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1, vllm/envs.py); the "
    "router compares the low 64 bits of the SHA-256 chain it computes. PYTHONHASHSEED is removed from the replicas' "
    "environment: it would re-seed vLLM's NONE_HASH (kv_cache_utils.resolve_none_hash_seed) and no hash would match "
    "(the router counts such events as hash_mismatch).",
]
COUNTERS = ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total", "vllm:prompt_tokens_total",
            "vllm:generation_tokens_total", "vllm:num_preemptions_total")


# ------------------------------------------------------------------------------------------------------------ servers
def vllm_serve_args(port: int, events_port: int) -> list[str]:
    events = json.dumps({"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"tcp://*:{events_port}"})
    return ["serve", MODEL_DIR, "--served-model-name", SERVED_MODEL_NAME, "--dtype", "float32", "--enforce-eager",
            "--max-model-len", "256", "--block-size", str(BLOCK_SIZE), "--max-num-seqs", str(MAX_NUM_SEQS),
            "--num-gpu-blocks-override", str(NUM_BLOCKS), "--enable-prefix-caching", "--seed", "0",
            "--host", "127.0.0.1", "--port", str(port), "--kv-events-config", events]


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the process's session (vllm serve, its engine core and worker), SIGKILL what is left after 30 s."""
    from helpers import proctree
    proctree.stop_session(proc, grace=30)


def rss_gib(pid: int) -> float:
    """Resident memory of a process and everything below it (vllm serve: API server, engine core, worker)."""
    from helpers import proctree
    total = 0
    for p in [pid, *proctree.descendants(pid)]:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return round(total / 2**20, 2)


@contextlib.contextmanager
def replicas(log_dir: Path):
    """Start REPLICAS `vllm serve` at once; yield [{url, events, command, startup_s}]."""
    procs, out = [], []
    try:
        started = time.perf_counter()
        for i in range(REPLICAS):
            port, events_port = free_port(), free_port()
            args = vllm_serve_args(port, events_port)
            env = dict(vllm_env(), VLLM_SERVER_DEV_MODE="1", VLLM_CPU_OMP_THREADS_BIND=str(i % os.cpu_count()))
            env.pop("PYTHONHASHSEED", None)                 # it would re-seed vLLM's NONE_HASH
            log_path = log_dir / f"vllm_serve_{i}.log"
            with open(log_path, "wb") as log:
                procs.append(subprocess.Popen([str(VLLM_PYTHON), str(BENCH_SERVE), "--vllm-cli", *args], cwd=ROOT,
                                              env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
            out.append({"url": f"http://127.0.0.1:{port}", "events": f"tcp://127.0.0.1:{events_port}",
                        "log": log_path, "procs": procs, "index": i, "argv": args, "env": env,
                        "command": (f"VLLM_SERVER_DEV_MODE=1 VLLM_CPU_OMP_THREADS_BIND={i} "
                                                     f"VLLM_CPU_KVCACHE_SPACE=1 " + as_typed(args)
                                                     .replace(f"--port {port}", "--port PORT")
                                                     .replace(f"*:{events_port}", "*:EVENTS_PORT"))})
        print(f"starting {REPLICAS} vllm serve replicas (1-3 minutes)...", flush=True)
        for proc, r in zip(procs, out):
            wait_http(r["url"] + "/v1/models", proc, r["log"], 900)
            r["startup_s"] = round(time.perf_counter() - started, 1)
        for proc, r in zip(procs, out):
            r["rss_gib"] = rss_gib(proc.pid)
        yield out
    finally:
        for proc in procs:
            stop(proc)


@contextlib.contextmanager
def router(policy: str, weight: float, reps: list, log_dir: Path):
    """The course's router (proxy.py) in front of `reps`, as its own process; yields its URL and command."""
    port = free_port()
    argv = ["-m", "helpers.course.routing.proxy", "--policy", policy, "--overlap-score-weight", f"{weight:g}",
            "--block-size", str(BLOCK_SIZE), "--port", str(port)]
    argv += [a for r in reps for a in ("--replica", f"{r['url']}={r['events']}")]
    env = dict(os.environ, COURSE_IMPL="solutions", OMP_NUM_THREADS="1")
    log_path = log_dir / f"router_{policy}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc, log_path, 120)
        yield f"http://127.0.0.1:{port}", "COURSE_IMPL=solutions python " + " ".join(
            a for a in argv).replace(f"--port {port}", "--port PORT"), log_path
    finally:
        stop(proc)


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def scrape(url: str) -> dict:
    """vLLM's counters of interest from its Prometheus /metrics (summed over label sets)."""
    from helpers.course.serving.metrics import parse
    with urllib.request.urlopen(url + "/metrics", timeout=30) as response:
        samples = parse(response.read().decode())
    return {name: sum(v for (n, _), v in samples.items() if n == name) for name in COUNTERS}


def reset_caches(reps: list) -> list:
    """POST /reset_prefix_cache on every replica (dev mode); returns the HTTP statuses."""
    statuses = []
    for r in reps:
        request = urllib.request.Request(r["url"] + "/reset_prefix_cache", data=b"", method="POST")
        with urllib.request.urlopen(request, timeout=60) as response:
            statuses.append(response.status)
    return statuses


def replica_figures(before: list, after: list) -> list:
    out = []
    for b, a in zip(before, after):
        d = {k.removeprefix("vllm:").removesuffix("_total"): a[k] - b[k] for k in COUNTERS}
        d["hit_rate"] = d["prefix_cache_hits"] / d["prefix_cache_queries"] if d["prefix_cache_queries"] else None
        d["prefill_tokens_computed"] = d["prefix_cache_queries"] - d["prefix_cache_hits"]
        out.append(d)
    return out


def totals(per_replica: list) -> dict:
    q = sum(r["prefix_cache_queries"] for r in per_replica)
    h = sum(r["prefix_cache_hits"] for r in per_replica)
    return {"prefix_cache_queries": q, "prefix_cache_hits": h, "hit_rate": h / q if q else None,
            "prefill_tokens_computed": q - h}


# ------------------------------------------------------------------------------------------------------------ (a) chat
async def run_chat(url: str) -> dict:
    """The chat workload through the router: sessions in start order, CONCURRENCY at a time, turns in order."""
    import httpx

    from helpers.course.engine.stats import percentile
    from helpers.course.routing.workload import chat_workload
    workload = chat_workload(**WORKLOAD)
    ttfts, routed, answered, failed, retried = [], {}, 0, [], []
    semaphore = asyncio.Semaphore(CONCURRENCY)

    async def turn(client, prompt, max_tokens):
        body = {"model": SERVED_MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True, "stream": True, "return_token_ids": True}
        start, first, tokens, done = time.perf_counter(), None, [], False
        async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            if response.status_code != 200:
                raise RuntimeError(f"{response.status_code}: {(await response.aread())[:300]!r}")
            replica = response.headers.get("x-routed-to")
            async for line in response.aiter_lines():
                done = done or line == "data: [DONE]"
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise RuntimeError(f"the stream says: {chunk['error']}")
                for choice in chunk.get("choices", []):
                    if choice.get("token_ids"):
                        first = first or time.perf_counter()
                        tokens.extend(choice["token_ids"])
        if not done or first is None:
            raise RuntimeError("the stream ended before [DONE]")
        return first - start, tokens, replica

    async def session(client, s):
        nonlocal answered
        async with semaphore:
            prompt = list(workload.system_prompts[s.tenant]) + list(s.user_messages[0])
            for i in range(len(s.user_messages)):
                if i:
                    prompt = prompt + answer + list(s.user_messages[i])
                try:
                    for attempt in range(3):                # its replica died under it: up to twice more
                        try:
                            ttft, answer, replica = await turn(client, prompt, s.answer_tokens[i])
                            break
                        except (httpx.HTTPError, RuntimeError):
                            if attempt == 2:
                                raise
                            retried.append(f"tenant {s.tenant} session {s.sid} turn {i}")
                except Exception as exc:            # noqa: BLE001 - recorded, the run goes on
                    failed.append(f"tenant {s.tenant} session {s.sid} turn {i}: {exc!r}"[:300])
                    return
                ttfts.append(ttft)
                answered += 1
                routed.setdefault(f"tenant {s.tenant}", []).append(replica)

    async with httpx.AsyncClient(timeout=600) as client:
        started = time.perf_counter()
        await asyncio.gather(*(session(client, s) for s in workload.sessions))
        duration = time.perf_counter() - started
    return {"requests": workload.num_requests, "answered": answered, "failed": failed, "retried": retried,
            "duration_s": duration,
            "ttft_ms": {"mean": 1e3 * statistics.fmean(ttfts), "p50": 1e3 * percentile(ttfts, 50),
                        "p99": 1e3 * percentile(ttfts, 99)} if ttfts else None,
            "replicas_per_tenant": {t: sorted(set(v)) for t, v in sorted(routed.items())},
            "workload": workload.describe()}


# ------------------------------------------------------------------------------------------------------------ (b) bench
def bench_args(port: int, result_dir: str, filename: str) -> list[str]:
    return ["bench", "serve", "--backend", "openai", "--host", "127.0.0.1", "--port", str(port),
            "--model", SERVED_MODEL_NAME, "--served-model-name", SERVED_MODEL_NAME, "--tokenizer", MODEL_DIR,
            *DATASET, "--num-prompts", str(NUM_PROMPTS), "--max-concurrency", str(MAX_CONCURRENCY),
            "--request-rate", "inf", "--seed", str(SEED), "--temperature", "0", "--ignore-eos",
            "--num-warmups", "0", "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
            "--disable-tqdm", "--save-result", "--result-dir", result_dir, "--result-filename", filename]


def run_bench(url: str, result_dir: str, policy: str) -> dict:
    port = int(url.rsplit(":", 1)[1])
    filename = f"bench_{policy}.json"
    args = bench_args(port, result_dir, filename)
    proc = subprocess.run([str(VLLM_PYTHON), str(BENCH_SERVE), "--vllm-cli", *args], cwd=ROOT, env=vllm_env(),
                          capture_output=True, text=True, timeout=900)
    path = Path(result_dir) / filename
    if proc.returncode != 0 or not path.exists():
        tail = "\n".join((proc.stdout.splitlines() + proc.stderr.splitlines())[-30:])
        raise RuntimeError(f"vllm bench serve exited {proc.returncode}:\n{tail}")
    full = json.loads(path.read_text())
    out = {k: full[k] for k in KEEP if k in full and k not in ("input_lens", "output_lens")}
    out["command"] = as_typed(args[:args.index("--result-dir")]).replace(f"--port {port}", "--port ROUTER_PORT")
    return out


def check_tokenization(url: str) -> dict:
    """The router tokenizes what vLLM tokenizes: one chat and one text completion through the router with
    `return_token_ids`; vLLM's prompt_token_ids against the router's own (RouterProxy.prompt_ids)."""
    from helpers.course.routing.proxy import RouterProxy
    messages = [{"role": "system", "content": "You answer in one line."}, {"role": "user", "content": "Four score?"}]
    cases = {"/v1/chat/completions": {"messages": messages}, "/v1/completions": {"prompt": "It was the best of"}}
    out = {}
    for path, extra in cases.items():
        body = {"model": SERVED_MODEL_NAME, "max_tokens": 2, "temperature": 0, "return_token_ids": True, **extra}
        request = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            answer = json.loads(response.read())
        theirs = answer.get("prompt_token_ids") or answer["choices"][0].get("prompt_token_ids")
        ours = RouterProxy.prompt_ids(_Tokenizing(), path, body)
        out[path] = {"same_prompt_ids": theirs == ours, "prompt_tokens": len(ours)}
    return out


class _Tokenizing:
    """Just enough of a RouterProxy for prompt_ids: the course's tokenizer."""
    @property
    def tokenizer(self):
        from helpers.course.tokenizer import load_tokenizer
        return load_tokenizer()


# ------------------------------------------------------------------------------------------------------------ main
def run(result: dict, log_dir: Path) -> None:
    """REPEATS rounds over the policies, the second in reverse order (a shared machine's load drifts: no policy gets
    all the quiet minutes); each round of a policy: a fresh router, both caches reset before each workload."""
    with replicas(log_dir) as reps:
        result["replicas"] = [{k: r[k] for k in ("command", "startup_s", "rss_gib")} for r in reps]
        for round_ in range(REPEATS):
            for policy, name, weight, label in (POLICIES if round_ % 2 == 0 else POLICIES[::-1]):
                print(f"round {round_ + 1}, policy {label}:", flush=True)
                run_policy = result["policies"].setdefault(policy, {"label": label, "rounds": []})
                with router(name, weight, reps, log_dir) as (url, command, router_log):
                    run_policy["router_command"] = command
                    if policy == "round_robin" and "tokenization" not in result:
                        try:
                            result["tokenization"] = check_tokenization(url)
                        except Exception as exc:             # noqa: BLE001 - recorded in the JSON
                            result["failures"].append(f"tokenization check: {exc!r}"[:1000])
                    this = {}
                    for part in ("chat", "bench"):
                        figures = run_part(part, url, reps, log_dir, policy, round_, result)
                        if figures is not None:
                            this[part] = figures
                    run_policy["rounds"].append(this)
                    run_policy["router_log_tail"] = router_log.read_text(errors="replace").splitlines()[-5:]
        fault(result, reps, log_dir)
    for p in result["policies"].values():
        for part in ("chat", "bench"):
            rounds = [r[part] for r in p["rounds"] if part in r]
            if rounds:
                p[part] = merge(rounds)


def run_fault(reps: list, log_dir: Path) -> dict:
    """A replica dies mid-workload and comes back, behind the KV-aware router (weight 4): replica 1's whole process
    group is SIGKILLed once the router has routed KILL_AFTER requests; the chat workload goes on (a turn whose stream
    broke is sent again, up to twice); then replica 1 is started again with the same command and ports, and CONCURRENCY
    requests at once show it serving and publishing again."""
    import threading

    from helpers import proctree
    victim = reps[1]
    out = {"policy": LABELS["kv_w4"], "kill_after_routed": KILL_AFTER}
    with router("kv", 4.0, reps, log_dir) as (url, _command, router_log):
        reset_caches(reps)
        chat: dict = {}
        worker = threading.Thread(target=lambda: chat.update(asyncio.run(run_chat(url))), daemon=True)
        worker.start()
        wait_until(lambda: sum(get_json(url + "/router/stats")["routed"].values()) >= KILL_AFTER, 300, "requests")
        before = get_json(url + "/router/stats")
        out["indexed_blocks_before_kill"] = before["indexed_blocks"]
        victim_proc = victim["procs"][victim["index"]]
        proctree.kill_group(victim_proc.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        victim_proc.wait()
        down = wait_until(lambda: (s := get_json(url + "/router/stats"))["live"] == [0] and s, 60, "replica 1 out")
        out["seconds_to_drop"] = round(time.monotonic() - killed_at, 2)
        out["after_kill"] = {k: down[k] for k in ("live", "indexed_blocks", "replica_failures", "retried")}
        worker.join(600)
        out["chat"] = {k: chat.get(k) for k in ("requests", "answered", "failed", "retried")}
        out["routed_during_chat"] = get_json(url + "/router/stats")["routed"]
        # the same replica again: same command, same ports (the router knows it by its URL and events endpoint)
        restarted = time.monotonic()
        with open(victim["log"], "ab") as log:
            proc = subprocess.Popen([str(VLLM_PYTHON), str(BENCH_SERVE), "--vllm-cli", *victim["argv"]], cwd=ROOT,
                                    env=victim["env"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        victim["procs"].append(proc)
        wait_http(victim["url"] + "/v1/models", proc, victim["log"], 900)
        up = wait_until(lambda: (s := get_json(url + "/router/stats"))["live"] == [0, 1] and s, 60, "replica 1 back")
        out["seconds_to_serve_again"] = round(time.monotonic() - restarted, 1)
        asyncio.run(burst(url))
        with contextlib.suppress(TimeoutError):       # vLLM publishes a step's events after it answered
            wait_until(lambda: get_json(url + "/router/stats")["event_batches"]["1"] > up["event_batches"]["1"],
                       15, "events from the restarted replica")
        time.sleep(0.5)
        after = get_json(url + "/router/stats")
        out["after_restart"] = {"routed_to_1": after["routed"]["1"] - up["routed"]["1"],
                                "event_batches_from_1": after["event_batches"]["1"] - up["event_batches"]["1"],
                                "hash_checked": after["hash_checked"] - up["hash_checked"],
                                "hash_mismatch": after["hash_mismatch"], "live": after["live"],
                                "indexed_blocks": after["indexed_blocks"]}
        out["router_log"] = [line for line in router_log.read_text(errors="replace").splitlines()
                             if "down" in line or "up again" in line][:6]
    return out


async def burst(url: str) -> None:
    """CONCURRENCY * 2 requests with distinct 3-block prompts, CONCURRENCY at a time (so loads differ)."""
    import httpx
    rng = random.Random(1)
    prompts = [[rng.randrange(256) for _ in range(3 * BLOCK_SIZE + 8)] for _ in range(2 * CONCURRENCY)]
    semaphore = asyncio.Semaphore(CONCURRENCY)

    async def one(client, prompt):
        async with semaphore:
            r = await client.post(f"{url}/v1/completions", json={"model": SERVED_MODEL_NAME, "prompt": prompt,
                                                                "max_tokens": 8, "temperature": 0, "ignore_eos": True})
            r.raise_for_status()
    async with httpx.AsyncClient(timeout=600) as client:
        await asyncio.gather(*(one(client, p) for p in prompts))


def wait_until(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise TimeoutError(f"waited {timeout} s for {what}")


def fault(result: dict, reps: list, log_dir: Path) -> None:
    print("a replica dies and comes back...", flush=True)
    try:
        result["fault"] = run_fault(reps, log_dir)
        print(f"  {result['fault']}", flush=True)
    except Exception as exc:                             # noqa: BLE001 - recorded in the JSON
        result["failures"].append(f"fault: {type(exc).__name__}: {exc}"[:2000])
        print(f"  FAILED: {exc}", flush=True)


def run_part(part, url, reps, log_dir, policy, round_, result):
    reset_caches(reps)
    before = [scrape(r["url"]) for r in reps]
    stats_before = get_json(url + "/router/stats")
    busy = cpu_times()
    print(f"  {part}...", flush=True)
    try:
        figures = asyncio.run(run_chat(url)) if part == "chat" else run_bench(url, str(log_dir), f"{policy}_{round_}")
    except Exception as exc:                             # noqa: BLE001 - recorded in the JSON
        result["failures"].append(f"{policy} round {round_ + 1} {part}: {exc}"[:2000])
        print(f"  FAILED: {exc}", flush=True)
        return None
    figures["cpu_busy_during"] = cpu_busy_since(busy)
    time.sleep(1.0)                                      # vLLM's /metrics is updated by its stat logger
    per = replica_figures(before, [scrape(r["url"]) for r in reps])
    stats = get_json(url + "/router/stats")
    figures["replicas"], figures["total"] = per, totals(per)
    figures["router"] = {k: stats[k] for k in ("events_applied", "events_rejected", "hash_checked", "hash_mismatch",
                                               "hash_unchecked", "batches_malformed", "batch_gaps", "stale_routings",
                                               "retried", "live")}
    figures["router"]["routed"] = {k: v - stats_before["routed"].get(k, 0) for k, v in stats["routed"].items()}
    figures["router"]["index_behind"] = stats["index_behind"] - stats_before["index_behind"]
    q, h = (stats[k] - stats_before[k] for k in ("bound_queries", "bound_hits"))
    figures["bound"] = {"prompt_tokens": q, "cached_tokens": h, "hit_rate": h / q if q else None}
    print(f"  {part}: " + summary_line(figures), flush=True)
    return figures


def merge(rounds: list) -> dict:
    """The rounds of one policy and workload as one: counters summed (rates from the sums), timings averaged, the
    rounds' own hit rates kept."""
    out = {"rounds": len(rounds), "round_hit_rates": [r["total"]["hit_rate"] for r in rounds],
           "cpu_busy_during": statistics.fmean(r["cpu_busy_during"] or 0 for r in rounds)}
    per = [{k: sum(r["replicas"][i][k] for r in rounds) for k in rounds[0]["replicas"][i]
            if k not in ("hit_rate",)} for i in range(len(rounds[0]["replicas"]))]
    for r in per:
        r["hit_rate"] = r["prefix_cache_hits"] / r["prefix_cache_queries"] if r["prefix_cache_queries"] else None
    out["replicas"], out["total"] = per, totals(per)
    q, h = (sum(r["bound"][k] for r in rounds) for k in ("prompt_tokens", "cached_tokens"))
    out["bound"] = {"prompt_tokens": q, "cached_tokens": h, "hit_rate": h / q if q else None}
    router = {}
    for k, v in rounds[0]["router"].items():
        if isinstance(v, dict):
            router[k] = {x: sum(r["router"][k].get(x, 0) for r in rounds) for x in v}
        elif isinstance(v, (int, float)):
            router[k] = sum(r["router"][k] for r in rounds)
        else:
            router[k] = v
    out["router"] = router
    if "ttft_ms" in rounds[0]:                          # the chat client's
        out["ttft_ms"] = {k: statistics.fmean(r["ttft_ms"][k] for r in rounds) for k in rounds[0]["ttft_ms"]}
        for k in ("requests", "answered", "duration_s"):
            out[k] = sum(r[k] for r in rounds)
        out["failed"] = [f for r in rounds for f in r["failed"]]
        out["workload"] = rounds[0]["workload"]
    else:                                               # vllm bench serve's
        for k in ("completed", "failed", "num_prompts", "total_input_tokens", "total_output_tokens"):
            out[k] = sum(r.get(k, 0) for r in rounds)
        for k, v in rounds[0].items():
            if k.endswith("_ms") or k in ("request_throughput", "output_throughput", "duration"):
                out[k] = statistics.fmean(r[k] for r in rounds)
        out["round_mean_ttft_ms"] = [r["mean_ttft_ms"] for r in rounds]
        out["command"] = rounds[0]["command"]
    return out


def summary_line(f: dict) -> str:
    t = f["total"]
    ttft = f.get("ttft_ms", {}) or {}
    mean = ttft.get("mean", f.get("mean_ttft_ms"))
    rates = ", ".join("-" if r["hit_rate"] is None else f"{r['hit_rate']:.0%}" for r in f["replicas"])
    bound = f.get("bound", {}).get("hit_rate")
    return (f"hit rate {t['hit_rate']:.1%} (replicas {rates}; bound {bound:.0%}), prefill tokens computed "
            f"{t['prefill_tokens_computed']:.0f}, routed {f['router']['routed']}, mean TTFT {mean:.1f} ms")


def show(result: dict) -> None:
    print(f"vllm-cluster run {result['date']}: {REPLICAS} x vllm serve (vLLM "
          f"{result['versions']['vllm_env'].get('vllm-cpu')}), {result['settings']['num_blocks']} KV blocks of "
          f"{result['settings']['block_size']} tokens each")
    for policy, p in result["policies"].items():
        for part in ("chat", "bench"):
            if part in p:
                print(f"{p['label']:28} {part:6} {summary_line(p[part])}")
    for failure in result["failures"]:
        print("FAILED:", failure)


def main(argv: list[str]) -> None:
    import argparse
    import datetime
    import tempfile
    parser = argparse.ArgumentParser(prog="python -m helpers.vllm_cluster", description=__doc__.split("\n")[0])
    parser.add_argument("--show", action="store_true", help="print the stored run")
    parser.add_argument("--json", type=Path, default=RESULT_PATH)
    parser.add_argument("--keep-logs", type=Path, default=None, help="a folder for the servers' logs")
    parser.add_argument("--num-blocks", type=int, default=NUM_BLOCKS, help="KV blocks per replica")
    parser.add_argument("--only-fault", action="store_true",
                        help="run only the phase where a replica dies and comes back; store it in the JSON's 'fault'")
    args = parser.parse_args(argv)
    globals()["NUM_BLOCKS"] = args.num_blocks
    if args.show:
        show(json.loads(args.json.read_text()))
        return
    if not VLLM_PYTHON.exists():
        sys.exit(f"{VLLM_PYTHON} is missing: run `make vllm-env` first")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    random.seed(SEED)
    if args.only_fault:
        stored = json.loads(args.json.read_text())
        part = {"failures": []}
        with tempfile.TemporaryDirectory(prefix="vllm-cluster-") as tmp:
            log_dir = args.keep_logs or Path(tmp)
            log_dir.mkdir(parents=True, exist_ok=True)
            with replicas(log_dir) as reps:
                fault(part, reps, log_dir)
        stored["fault"] = part.get("fault")
        stored["fault_date"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        stored["failures"] = [f for f in stored["failures"] if not f.startswith("fault")] + part["failures"]
        args.json.write_text(json.dumps(stored, indent=1, default=str) + "\n")
        sys.exit(1 if part["failures"] else 0)
    result = {"how": "make vllm-cluster (python -m helpers.vllm_cluster)",
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "settings": {"replicas": REPLICAS, "block_size": BLOCK_SIZE, "num_blocks": NUM_BLOCKS,
                           "max_num_seqs": MAX_NUM_SEQS, "chat_workload": WORKLOAD, "chat_concurrency": CONCURRENCY,
                           "bench": {"num_prompts": NUM_PROMPTS, "max_concurrency": MAX_CONCURRENCY,
                                     "dataset": DATASET, "seed": SEED}},
              "machine": machine(), "versions": versions(), "notes": NOTES, "policies": {}, "failures": []}
    with contextlib.ExitStack() as stack:
        log_dir = args.keep_logs or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="vllm-cluster-")))
        log_dir.mkdir(parents=True, exist_ok=True)
        try:
            run(result, log_dir)
        except Exception as exc:                        # noqa: BLE001 - what failed goes into the JSON
            result["failures"].append(f"{type(exc).__name__}: {exc}"[:3000])
            print(f"FAILED: {exc}", flush=True)
    args.json.write_text(json.dumps(result, indent=1, default=str) + "\n")
    show(result)
    print(f"wrote {args.json.relative_to(ROOT) if args.json.is_relative_to(ROOT) else args.json}")
    sys.exit(1 if result["failures"] else 0)


if __name__ == "__main__":
    main(sys.argv[1:])
