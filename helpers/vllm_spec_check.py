"""vLLM's n-gram speculative decoding beside the course's, on the course's tiny Llama (chapter 10).

    make vllm-env                                  # once (see helpers/vllm_check.py)
    make vllm-spec-check    # about 2 minutes (python -m helpers.vllm_spec_check): writes data/vllm_spec_check.json

vLLM's CPU build (0.32) runs `speculative_config={"method": "ngram", "num_speculative_tokens": 4,
"prompt_lookup_min": 2, "prompt_lookup_max": 5}` on the course's checkpoint (offline `vllm.LLM`, float32, eager,
byte ids in). A worker in .venv-vllm (imports only vLLM and the standard library) serves the chapter's three
prompts one at a time, greedy, 40 tokens each, and reads vLLM's own counters after each
(`vllm:spec_decode_num_drafts`, `..._num_draft_tokens`, `..._num_accepted_tokens`, `..._num_accepted_tokens_per_pos`,
vllm/v1/spec_decode/metrics.py). The course's side serves the same prompts on SpeculativeEngine with
NgramProposer(2, 5), k = 4, and the file stores both. tests/test_speculative.py checks the stored vLLM run against
the course's engine as it is now (ids, verifications, accepted tokens per position but the last verification).

Two counting differences, both vLLM's design: vLLM counts k draft tokens for every verification
(a shorter n-gram proposal is padded; the padding is rejected), where the course counts the tokens proposed; and
vLLM does not cut proposals at max_tokens (the excess is dropped after verification), where the course proposes no
more than the request may still emit — so the last verification of a request can accept more drafts in vLLM.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

if __name__ == "__main__" and sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)     # run as a script in vLLM's env: helpers/ must not shadow modules

ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = ROOT / "helpers" / "course" / "data" / "tiny_llama"
RESULT_PATH = ROOT / "helpers" / "course" / "data" / "vllm_spec_check.json"
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
K, LOOKUP_MIN, LOOKUP_MAX, MAX_TOKENS = 4, 2, 5, 40


def vllm_worker(prompts: dict) -> dict:
    import time

    from vllm import LLM, SamplingParams
    from vllm.v1.metrics.reader import Counter, Vector
    started = time.perf_counter()
    llm = LLM(model=str(MODEL_DIR), skip_tokenizer_init=True, dtype="float32", max_model_len=256,
              enforce_eager=True, block_size=32, disable_log_stats=False, seed=0,
              speculative_config={"method": "ngram", "num_speculative_tokens": K, "prompt_lookup_min": LOOKUP_MIN,
                                  "prompt_lookup_max": LOOKUP_MAX})
    startup = time.perf_counter() - started

    def counters():
        out = {}
        for m in llm.get_metrics():
            if isinstance(m, Counter) and "spec_decode" in m.name:
                out[m.name] = out.get(m.name, 0) + m.value
            elif isinstance(m, Vector) and "spec_decode" in m.name:
                out[m.name] = [a + b for a, b in zip(out.get(m.name, [0] * len(m.values)), m.values)]
        return out

    result = {"startup_s": startup, "per_prompt": {}}
    for name, ids in prompts.items():
        before = counters()
        out = llm.generate([{"prompt_token_ids": ids}], SamplingParams(temperature=0, max_tokens=MAX_TOKENS,
                           detokenize=False, ignore_eos=True), use_tqdm=False)
        after = counters()
        spec = {k.removeprefix("vllm:spec_decode_"): (v - before.get(k, 0)) if not isinstance(v, list) else
                [a - b for a, b in zip(v, before.get(k, [0] * len(v)))] for k, v in after.items()}
        result["per_prompt"][name] = {"ids": list(out[0].outputs[0].token_ids), "spec": spec}
    import vllm
    result["vllm_version"] = vllm.__version__
    return result


def course_side(prompts: dict) -> dict:
    import torch

    from helpers.course.speculative import NgramProposer, SpeculativeEngine, generate_speculative
    from helpers.course.tiny_llama import load_model
    torch.set_num_threads(1)
    model, out = load_model(), {}
    for name, ids in prompts.items():
        engine = SpeculativeEngine.paged(model, proposer=NgramProposer(LOOKUP_MIN, LOOKUP_MAX),
                                         num_speculative_tokens=K)
        tokens = generate_speculative(engine, [ids], MAX_TOKENS)[0]
        s = engine.spec_stats
        out[name] = {"ids": tokens, "spec": {"num_drafts": s.num_drafts, "num_draft_tokens": s.num_draft_tokens,
                                             "num_accepted_tokens": s.num_accepted_tokens,
                                             "num_accepted_tokens_per_pos": list(s.accepted_per_pos)}}
    return out


def main() -> None:
    os.environ.setdefault("COURSE_IMPL", "solutions")
    from helpers.benchmarks.speculative import prompts as chapter_prompts
    prompts = chapter_prompts()
    if not VLLM_PYTHON.exists():
        raise FileNotFoundError(f"{VLLM_PYTHON} is missing: run `make vllm-env` first")
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([str(VLLM_PYTHON), str(Path(__file__).resolve()), "--vllm-worker", json.dumps(prompts)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"vLLM worker failed with exit status {proc.returncode}:\n{proc.stderr[-3000:]}")
    result = {"prompts": prompts, "k": K, "prompt_lookup": [LOOKUP_MIN, LOOKUP_MAX], "max_tokens": MAX_TOKENS,
              "vllm": json.loads(lines[-1]), "course": course_side(prompts),
              "how": ".venv/bin/python -m helpers.vllm_spec_check"}
    RESULT_PATH.write_text(json.dumps(result, indent=1) + "\n")
    for name in prompts:
        v, c = result["vllm"]["per_prompt"][name], result["course"][name]
        print(f"{name}: same ids {v['ids'] == c['ids']}; vLLM {v['spec']}; course {c['spec']}")
    print(f"wrote {RESULT_PATH}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--vllm-worker"]:
        print(json.dumps(vllm_worker(json.loads(sys.argv[2]))))
    else:
        main()
