"""The real engine beside the course's: vLLM's CPU build serving the course's own tiny Llama.

    make vllm-env        # once: vLLM's own environment, .venv-vllm (python3.11, about 3.5 GB, about 10 minutes)
    make vllm-check      # about 4 minutes: this file, run by the course's python; vLLM runs in .venv-vllm

Two environments, kept apart. vLLM 0.32 pins transformers<5.20, the course uses 5.23, so they cannot share
one venv. This file is run by the course's python (`python -m helpers.vllm_check`): it computes the
course's side (the greedy ids of helpers.course.tiny_llama.generate, the decode tokens/s of the course's engine,
LLMEngine.paged),
then starts `.venv-vllm/bin/python helpers/vllm_check.py --vllm-worker TP` once per tensor-parallel degree.
A worker imports only vLLM and the standard library (never `helpers`), runs the same prompts, and prints one
JSON line. The course side compares and writes helpers/course/data/vllm_check.json (committed), which
notebook 07 shows when vLLM is not installed.

What a worker measures (offline `vllm.LLM`, float32, eager, no tokenizer: prompts go in as byte ids):
* greedy ids (temperature 0) of PROMPTS, MAX_NEW_TOKENS each, all in one batch;
* decode tokens/s at batch 1 and 8: batch × (n - 1) / (t(n new tokens) - t(1 new token)), the median of
  REPEATS runs, so the prefill and the first token are not counted (the course engine is timed the same way);
* (TP 1) prefix caching on a workload whose prompts share 90 % of their tokens: one request first, then
  the rest; vLLM's own counters `vllm:prefix_cache_hits` / `vllm:prefix_cache_queries` (tokens) give the
  hit rate; mean TTFT and inter-token latency from its histograms; the names of every metric it exported.

`python -m helpers.vllm_check --course-only` recomputes only the course's side and keeps the stored vLLM
results (cheap; run it after a change to the course engine).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

if __name__ == "__main__" and sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)     # run as a script: helpers/ must not shadow modules (plots, run, magic...) in vLLM's env

ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = ROOT / "helpers" / "course" / "data" / "tiny_llama"
RESULT_PATH = ROOT / "helpers" / "course" / "data" / "vllm_check.json"
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"

PROMPTS = [
    "Four score and seven years ago",
    "We hold these truths to be self-evident",
    "A famished Fox saw some clusters",
    "Look on my Works, ye Mighty,",
    "But thy eternal summer",
    "It is easy to despise",
    "Now we are engaged in a great civil war",
    "The brave men, living and dead,",
]
MAX_NEW_TOKENS = 32
RATE_TOKENS = 64            # new tokens per sequence when timing decode
REPEATS = 3
BATCHES = (1, 8)
TP_DEGREES = (1, 2)
BLOCK_SIZE = 32             # vLLM's CPU attention takes multiples of 32
# Prefix-caching workload: 6 full blocks (192 tokens) shared, 21 tokens of each prompt its own: 90 % shared.
SHARED_PREFIX_TOKENS = 192
OWN_TOKENS = 21
PREFIX_REQUESTS = 8

# What the course calls each serving metric, beside vLLM's name for it: chapter 6's server
# (helpers/course/serving/metrics.py) and the prefix-cache counters notebook 07 exports from its
# PrefixCachingBlockManager. None: the course exports no such series (notebook 07 says what stands for it).
METRIC_PAIRS = [
    ("time to first token (TTFT)", "vllm:time_to_first_token_seconds", "serving_time_to_first_token_seconds"),
    ("inter-token latency (ITL), every gap", "vllm:inter_token_latency_seconds", None),
    ("time per output token, per request", "vllm:request_time_per_output_token_seconds",
     "serving_time_per_output_token_seconds"),
    ("end-to-end request latency", "vllm:e2e_request_latency_seconds", "serving_request_latency_seconds"),
    ("prefix cache queries (tokens)", "vllm:prefix_cache_queries", "serving_prefix_cache_queries_total"),
    ("prefix cache hits (tokens)", "vllm:prefix_cache_hits", "serving_prefix_cache_hits_total"),
    ("KV cache usage", "vllm:kv_cache_usage_perc", "serving_kv_cache_usage_perc"),
    ("preemptions", "vllm:num_preemptions", "serving_num_preemptions_total"),
    ("generated tokens", "vllm:generation_tokens", "serving_generated_tokens_total"),
    ("requests running", "vllm:num_requests_running", "serving_running_sequences"),
    ("requests waiting", "vllm:num_requests_waiting", "serving_queue_depth"),
]


def encode(text: str) -> list[int]:
    """The course's byte-level tokenizer (helpers.course.tiny_llama.encode), repeated here so that a vLLM
    worker needs nothing from the course's environment."""
    return list(text.encode("utf-8"))


def prefix_workload() -> list[list[int]]:
    """PREFIX_REQUESTS prompts: SHARED_PREFIX_TOKENS common tokens (the start of the corpus) + OWN_TOKENS own ones."""
    corpus = (MODEL_DIR.parent / "corpus.txt").read_bytes()
    shared = list(corpus[:SHARED_PREFIX_TOKENS])
    return [shared + encode(f" Question {i}: what did it mean?"[:OWN_TOKENS]) for i in range(PREFIX_REQUESTS)]


def decode_rate(generate_fn, batch: int) -> float:
    """Decode tokens/s: batch × (n - 1) / (t(n) - t(1)), medians of REPEATS; generate_fn(prompts, n) runs a batch."""
    prompts = [encode(p) for p in (PROMPTS * 8)[:batch]]
    generate_fn(prompts, 2)                                 # warm-up
    times = {}
    for n in (1, RATE_TOKENS):
        runs = []
        for _ in range(REPEATS):
            start = time.perf_counter()
            generate_fn(prompts, n)
            runs.append(time.perf_counter() - start)
        times[n] = statistics.median(runs)
    return batch * (RATE_TOKENS - 1) / max(times[RATE_TOKENS] - times[1], 1e-9)


# ------------------------------------------------------------------------------------------------------------
# vLLM side (.venv-vllm): imports vllm, never helpers
# ------------------------------------------------------------------------------------------------------------
def vllm_worker(tp: int) -> dict:
    from vllm import LLM, SamplingParams

    started = time.perf_counter()
    llm = LLM(model=str(MODEL_DIR), skip_tokenizer_init=True, dtype="float32", max_model_len=256,
              enforce_eager=True, tensor_parallel_size=tp, block_size=BLOCK_SIZE, enable_prefix_caching=True,
              disable_log_stats=False, seed=0)
    startup = time.perf_counter() - started

    def generate(prompts, n):
        params = SamplingParams(temperature=0, max_tokens=n, detokenize=False, ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    result = {"tp": tp, "startup_s": startup, "ids": generate([encode(p) for p in PROMPTS], MAX_NEW_TOKENS)}
    result["decode_tokens_per_s"] = {str(b): decode_rate(generate, b) for b in BATCHES}
    if tp == 1:
        result["prefix_cache"] = prefix_cache_run(llm, generate)
    import vllm
    result["vllm_version"] = vllm.__version__
    return result


def _counters(llm) -> dict:
    from vllm.v1.metrics.reader import Counter, Gauge, Histogram
    out = {}
    for m in llm.get_metrics():
        if isinstance(m, (Counter, Gauge)):
            out[m.name] = out.get(m.name, 0) + m.value
        elif isinstance(m, Histogram):
            out[m.name + "_count"] = out.get(m.name + "_count", 0) + m.count
            out[m.name + "_sum"] = out.get(m.name + "_sum", 0.0) + m.sum
    return out


def prefix_cache_run(llm, generate) -> dict:
    """Hit rate of vLLM's prefix cache on the 90 %-shared workload, from its own counters (deltas)."""
    llm.reset_prefix_cache()
    before = _counters(llm)
    prompts = prefix_workload()
    generate(prompts[:1], 4)                 # the first request fills the cache with the shared blocks
    generate(prompts[1:], 4)                 # the others find them
    after = _counters(llm)
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    names = sorted({m.name for m in llm.get_metrics()})
    return {
        "requests": len(prompts), "prompt_tokens": sum(map(len, prompts)),
        "shared_prefix_tokens": SHARED_PREFIX_TOKENS, "block_size": BLOCK_SIZE,
        "queries": delta.get("vllm:prefix_cache_queries", 0), "hits": delta.get("vllm:prefix_cache_hits", 0),
        "mean_ttft_s": delta.get("vllm:time_to_first_token_seconds_sum", 0.0)
        / max(1, delta.get("vllm:time_to_first_token_seconds_count", 0)),
        "mean_itl_s": delta.get("vllm:inter_token_latency_seconds_sum", 0.0)
        / max(1, delta.get("vllm:inter_token_latency_seconds_count", 0)),
        "metric_names": names,
    }


def run_vllm_worker(tp: int) -> dict:
    """Start a worker in vLLM's environment; its last stdout line is its JSON result."""
    if not VLLM_PYTHON.exists():
        raise FileNotFoundError(f"{VLLM_PYTHON} is missing: run `make vllm-env` first")
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", TOKENIZERS_PARALLELISM="false")
    if tp > 1:      # one NUMA node: vLLM asks for the threads of each TP worker to be bound by hand
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(i % (os.cpu_count() or 1)) for i in range(tp))
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([str(VLLM_PYTHON), str(Path(__file__).resolve()), "--vllm-worker", str(tp)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"vLLM worker (TP={tp}) failed with exit status {proc.returncode}:\n"
                           f"{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


# ------------------------------------------------------------------------------------------------------------
# Course side (.venv)
# ------------------------------------------------------------------------------------------------------------
def course_side() -> dict:
    os.environ.setdefault("COURSE_IMPL", "solutions")
    import torch
    from helpers.course import tiny_llama

    torch.set_num_threads(1)     # one core, as vLLM's TP=1 model worker (bound to one core; its engine has the other)
    model = tiny_llama.load_model()
    expected = [tiny_llama.generate(model, encode(p), MAX_NEW_TOKENS) for p in PROMPTS]
    engine, generate = course_engine(model)
    paged_ids = generate([encode(p) for p in PROMPTS], MAX_NEW_TOKENS)
    return {"ids": expected, "engine": engine, "engine_ids_equal": paged_ids == expected,
            "torch_threads": torch.get_num_threads(),
            "decode_tokens_per_s": {str(b): decode_rate(generate, b) for b in BATCHES}}


def course_engine(model, num_blocks: int = 8 * 16, block_size: int = 16):
    """(name, generate(prompts, n) -> new ids): the course's engine (helpers/course/engine: LLMEngine.paged, the
    model on a paged KV cache, with the reference answers of exercises 7.1-7.4 unless COURSE_IMPL says otherwise),
    continuous batching on one pool, every step's tokens in one forward. One engine serves every call, as a
    server would (vLLM's LLM is also built once); each call is a replay of its prompts, all arriving at once."""
    import itertools

    from helpers.course.engine import LLMEngine, Request, run_requests

    engine = LLMEngine.paged(model, num_blocks=num_blocks, block_size=block_size)   # 8 sequences of up to 256
    rids = itertools.count()

    def generate(prompts, n):
        requests = [Request(next(rids), p, n, arrival=0.0) for p in prompts]
        run_requests(engine, requests)
        return [r.tokens for r in requests]
    return "helpers/course/engine (LLMEngine.paged: one forward per step)", generate


def compare(course: dict, workers: dict) -> dict:
    tokens_equal = {str(tp): workers[str(tp)]["ids"] == course["ids"] for tp in map(str, workers)}
    return {"prompts": PROMPTS, "max_new_tokens": MAX_NEW_TOKENS, "course": course, "vllm": workers,
            "tokens_equal": tokens_equal, "metric_pairs": METRIC_PAIRS,
            "how": "make vllm-check (python -m helpers.vllm_check)"}


def main(argv: list[str]) -> None:
    if argv[:1] == ["--vllm-worker"]:
        print(json.dumps(vllm_worker(int(argv[1]))), flush=True)
        return
    course = course_side()
    if "--course-only" in argv:
        workers = json.loads(RESULT_PATH.read_text())["vllm"]
    else:
        workers = {}
        for tp in TP_DEGREES:
            print(f"vLLM at tensor_parallel_size={tp} (starting takes 1-2 minutes)...", flush=True)
            workers[str(tp)] = run_vllm_worker(tp)
    result = compare(course, workers)
    RESULT_PATH.write_text(json.dumps(result, indent=1) + "\n")
    for tp, same in result["tokens_equal"].items():
        print(f"TP={tp}: vLLM's greedy ids {'equal' if same else 'DIFFER FROM'} the course's "
              f"({len(PROMPTS)} prompts x {MAX_NEW_TOKENS} tokens)")
    for b in map(str, BATCHES):
        rates = "  ".join(f"vLLM TP={tp} {w['decode_tokens_per_s'][b]:.0f} tok/s" for tp, w in workers.items())
        print(f"decode, batch {b}: course {course['decode_tokens_per_s'][b]:.0f} tok/s  {rates}")
    pc = workers.get("1", {}).get("prefix_cache")
    if pc:
        print(f"vLLM prefix cache: {pc['hits']} of {pc['queries']} prompt tokens hit "
              f"({pc['hits'] / pc['queries']:.0%})")
    print(f"wrote {RESULT_PATH.relative_to(ROOT)}")
    if not all(result["tokens_equal"].values()):
        sys.exit(1)


if __name__ == "__main__":
    main(sys.argv[1:])
