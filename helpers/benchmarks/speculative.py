"""Speculative decoding on the course's engine (chapter 10): acceptance, target forwards per token, modelled speed-up.
The engine is the course's one LLMEngine with a proposer (LLMEngine.paged(..., proposer=..., num_speculative_tokens=k)).

    python -m helpers.bench speculative

1. Per proposer (vLLM's n-gram rule with prompt_lookup 2..5; the trained draft of helpers/course/train_draft.py) and
   k = 1, 2, 4, 6: the acceptance rate (accepted / proposed draft tokens), the mean accepted length (tokens per
   verification, the target's own included) and the target forwards per output token, over three prompts served one
   at a time (batch 1) for 40 tokens each: PROMPT, the Tyger (a poem whose last stanza repeats its first: text to
   look up) and a prompt off the training text. Every run's tokens are checked equal to the plain engine's.
2. Wall time on this CPU at batch 1, plain vs the draft at k = 4 (for the record: the tiny Llama is not
   memory-bound on a CPU, so this is not the accelerator's trade).
3. Modelled speed-up against the decode batch (chapter 7's roofline, helpers/course/roofline.py step_cost, priced
   max(FLOPs / peak, bytes / bandwidth)) for a Llama-3.1-8B-shaped target and a Llama-3.2-1B-shaped draft in bf16 on
   an H100's published roofs (989 TFLOP/s dense bf16, 3.35 TB/s), context 256, k = 4, with section 1's tokens per
   verification: the batch where speculation stops paying.
"""
from __future__ import annotations

import time

import torch
from transformers import LlamaConfig

MAX_TOKENS = 40
KS = (1, 2, 4, 6)
TARGET_8B = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=8, head_dim=128)
DRAFT_1B = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=64)
H100 = (989e12, 3.35e12)


def prompts() -> dict:
    from helpers.course.tiny_llama import CORPUS_PATH, PROMPT, encode
    corpus = CORPUS_PATH.read_text(encoding="utf-8")
    first, last = corpus.index("Tyger Tyger, burning"), corpus.index("Tyger Tyger burning")
    return {"PROMPT": encode(PROMPT), "the Tyger": encode(corpus[first:first + 62] + "\n" + corpus[last - 40:last + 6]),
            "off the corpus": encode("A small model reads the prompt and")}


def run() -> None:
    from helpers.course.engine import LLMEngine
    from helpers.course.speculative import DraftModelProposer, NgramProposer, generate_speculative, modelled_speedup
    from helpers.course.tiny_llama import load_model
    torch.set_num_threads(1)
    model, chosen = load_model(), prompts()
    start = time.perf_counter()
    reference = [generate_speculative(LLMEngine.paged(model, num_blocks=64), [ids], MAX_TOKENS)[0]
                 for ids in chosen.values()]
    plain_seconds = time.perf_counter() - start
    print(f"1. acceptance at batch 1, {len(chosen)} prompts x {MAX_TOKENS} tokens")
    print(f"   {'proposer':12s} {'k':>2s} {'acceptance':>10s} {'mean accepted length':>21s} "
          f"{'target forwards/token':>22s}  same tokens")
    measured = {}
    for name, make in [("n-gram", NgramProposer), ("draft model", DraftModelProposer)]:
        for k in KS:
            engine = LLMEngine.paged(model, num_blocks=64, proposer=make(), num_speculative_tokens=k)
            start = time.perf_counter()
            got = [generate_speculative(engine, [ids], MAX_TOKENS)[0] for ids in chosen.values()]
            seconds = time.perf_counter() - start
            s = engine.spec_stats
            measured[name, k] = (s, seconds)
            print(f"   {name:12s} {k:2d} {s.acceptance_rate:10.2f} {s.mean_accepted_length:21.2f} "
                  f"{s.forwards_per_token:22.2f}  {got == reference}")
    draft4, seconds4 = measured["draft model", 4]
    tokens = len(chosen) * MAX_TOKENS
    print(f"2. wall time on this CPU, batch 1: plain {tokens / plain_seconds:.0f} tok/s, draft model k=4 "
          f"{tokens / seconds4:.0f} tok/s")
    print(f"3. modelled speed-up (8B-shaped target, 1B-shaped draft, bf16, H100 roofs, context 256, k=4, "
          f"{draft4.mean_accepted_length:.2f} tokens per verification)")
    stops = None
    for batch in (1, 4, 16, 64, 128, 256, 512, 1024):
        speedup = modelled_speedup(TARGET_8B, DRAFT_1B, 4, draft4.mean_accepted_length, batch, 256, *H100)
        if speedup < 1 and stops is None:
            stops = batch
        print(f"   batch {batch:5d}: {speedup:.2f}x")
    print(f"   speculation stops paying at batch {stops}")


if __name__ == "__main__":
    run()
