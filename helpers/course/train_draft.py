"""The draft model of chapter 10's speculative decoding: a Llama about eight times smaller than the tiny Llama, trained
to agree with it.

    .venv/bin/python -m helpers.course.train_draft          # once; writes helpers/course/data/draft_llama (~0.5 MB)

    from helpers.course.train_draft import load_draft
    draft = load_draft()                                      # eval mode, float32, offline

Why a trained draft. Speculative decoding pays only when the draft guesses the target's next tokens: a random
draft is accepted almost never (1 token in 256 under greedy decoding), and every rejected guess wastes a slot of
the verification forward. vLLM's draft-model proposer (vllm/v1/spec_decode/draft_model.py) needs a draft with
the target's vocabulary and nothing else; in practice the draft is a smaller model of the same family, trained
on the same data (Llama 3.2 1B for Llama 3.1 70B). Here the draft shares the byte vocabulary and is trained on
the same text as the tiny Llama (helpers/course/data/corpus.txt), in the same way as `helpers.course.tiny_llama
train` (same windows, same optimiser and schedule, fixed seed, one thread, deterministic algorithms) with one
change: half of its loss is the KL divergence from the target's own next-token distribution on the window
(knowledge distillation, as in DistillSpec, Zhou et al. 2023), the other half the usual cross-entropy. So it
learns what the target would say, not only what the text says.

The checkpoint is committed (no one trains or downloads anything); tests only load it.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from helpers.course import tiny_llama

__all__ = ["DRAFT_CONFIG", "DRAFT_DIR", "build_draft", "load_draft", "train_draft"]

DRAFT_DIR = tiny_llama.DATA_DIR / "draft_llama"

DRAFT_CONFIG = LlamaConfig(
    vocab_size=256,                 # the target's byte vocabulary: a draft token is a target token
    hidden_size=64,
    intermediate_size=192,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    tie_word_embeddings=False,
    rms_norm_eps=1e-5,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
    attn_implementation="eager",
)

TRAIN_SEED = 1
STEPS = 700
DISTILL_WEIGHT = 0.5


def build_draft(seed: int = TRAIN_SEED) -> LlamaForCausalLM:
    """A randomly initialised draft (float32, eval mode)."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(DRAFT_CONFIG).eval()


def load_draft(dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """The trained draft from DRAFT_DIR, in eval mode; offline and silent."""
    return tiny_llama.load_checkpoint(DRAFT_DIR, DRAFT_CONFIG, dtype, "helpers.course.train_draft")


def train_draft(steps: int = STEPS, out_dir: Path = DRAFT_DIR) -> LlamaForCausalLM:
    """Train from seed TRAIN_SEED on the tiny Llama's corpus, half cross-entropy, half KL from the target: the
    tiny Llama's windows, optimiser and schedule (tiny_llama.training_batches, optimizer, optimizer_step)."""
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    target = tiny_llama.load_model()
    data = torch.tensor(tiny_llama.encode(tiny_llama.CORPUS_PATH.read_text(encoding="utf-8")), dtype=torch.long)
    model = build_draft().train()
    opt = tiny_llama.optimizer(model)
    print(f"training a draft of {sum(p.numel() for p in model.parameters()):,} parameters (target: "
          f"{sum(p.numel() for p in target.parameters()):,}) on {len(data):,} bytes: {steps} steps of "
          f"{tiny_llama.BATCH_SIZE} x {tiny_llama.SEQ_LEN} tokens")
    start = time.perf_counter()
    for step, batch in zip(range(steps), tiny_llama.training_batches(data, TRAIN_SEED)):
        with torch.no_grad():
            teacher = torch.log_softmax(target(input_ids=batch).logits[:, :-1].float(), dim=-1)
        out = model(input_ids=batch, labels=batch)
        student = torch.log_softmax(out.logits[:, :-1].float(), dim=-1)
        kl = torch.nn.functional.kl_div(student.reshape(-1, 256), teacher.reshape(-1, 256), log_target=True,
                                        reduction="batchmean")
        loss = (1 - DISTILL_WEIGHT) * out.loss + DISTILL_WEIGHT * kl
        tiny_llama.optimizer_step(model, opt, loss, step, steps)
        if step % 50 == 0 or step == steps - 1:
            print(f"  step {step:4d}  cross-entropy {out.loss.item():.3f}  KL from target {kl.item():.3f}  "
                  f"({time.perf_counter() - start:.0f} s)")
    tiny_llama.save_checkpoint(model, out_dir)
    prompt = tiny_llama.encode(tiny_llama.PROMPT)
    want, got = tiny_llama.generate(target, prompt, 60), tiny_llama.generate(model, prompt, 60)
    same = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), len(want))
    print(f"saved to {out_dir}; greedy from PROMPT: draft {tiny_llama.decode(got)!r}, the first {same} of 60 tokens "
          f"as the target's")
    return model


if __name__ == "__main__":
    if sys.argv[1:]:
        sys.exit("usage: python -m helpers.course.train_draft   (retrains and overwrites helpers/course/data/"
                 "draft_llama)")
    train_draft()
