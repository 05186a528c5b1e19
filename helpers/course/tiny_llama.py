"""The course's small language model: a real `transformers.LlamaForCausalLM`, 0.85 M parameters, trained.

    from helpers.course.tiny_llama import PROMPT, decode, encode, generate, load_model

    model = load_model()                                   # eval mode, float32, from helpers/course/data/tiny_llama
    new_ids = generate(model, encode(PROMPT), max_new_tokens=40)
    print(decode(new_ids))                                 # " our fathers brought forth on this ..."

What it is. The same architecture as Llama 2/3 (RMSNorm, rotary positions, grouped-query attention, SwiGLU
MLP), only tiny: 4 layers, hidden size 128, 8 query heads sharing 4 key/value heads of size 32, MLP width
256. Every size divides by 1, 2 and 4, so the model splits over tensor-parallel degree 1, 2 or 4 (heads,
key/value heads, MLP width, vocabulary) and over 2 or 4 pipeline stages (layers). Its "tokenizer" is the
identity on bytes: token id = byte value of the UTF-8 text, so the vocabulary is 256 and `encode` /
`decode` are two one-line functions.

Why it was trained. A randomly initialised model is a weak witness for a distributed implementation: under
greedy decoding it soon repeats one token for ever (`build_model()` continues PROMPT with byte 75, "K",
over and over), so a broken tensor- or pipeline-parallel version that gets the first token right
"generates identical tokens" too. This
model was trained for about two minutes of one CPU core on `helpers/course/data/corpus.txt` (10 KB of
public-domain English: the Gettysburg Address, the Declaration of Independence, Aesop's fables, a few
poems). It has more or less memorised that text, so it continues a prompt with varied, readable English,
each token chosen by a clear margin from the whole prefix: a mistake in any layer, head or cached key
shows up as different text. Still compare logits (max |difference|) as well as tokens.

The checkpoint (config.json + model.safetensors, float32, ~3.4 MB) is committed, so no one downloads
anything and every chapter sees the same weights. Training is reproducible (fixed seed, one thread,
deterministic algorithms: the same bytes on every run on the same kind of CPU); to retrain it:

    .venv/bin/python -m helpers.course.tiny_llama train

(the token ids recorded in tests/test_tiny_llama.py and in stored notebook outputs then change too).
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

__all__ = ["CONFIG", "MODEL_DIR", "CORPUS_PATH", "PROMPT", "encode", "decode", "build_model", "load_model",
           "generate", "train"]

DATA_DIR = Path(__file__).resolve().parent / "data"
MODEL_DIR = DATA_DIR / "tiny_llama"
CORPUS_PATH = DATA_DIR / "corpus.txt"

PROMPT = "Four score and seven years ago"

CONFIG = LlamaConfig(
    vocab_size=256,                 # byte-level: token id = byte value
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,            # 4 layers: 2 or 4 pipeline stages
    num_attention_heads=8,
    num_key_value_heads=4,          # grouped-query attention: 2 query heads per key/value head
    head_dim=32,                    # set, not 128 / 8 = 16: vLLM's CPU attention needs a head size of at least 32
    max_position_embeddings=256,
    tie_word_embeddings=False,      # embedding and lm_head are separate weights, sharded separately
    rms_norm_eps=1e-5,
    # No special tokens: every one of the 256 ids is a byte. (Llama's defaults, bos=1 and eos=2, would make
    # model.generate stop at byte 0x02.)
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
    # The plain matmul-softmax-matmul attention: easiest to read, to shard and to compare bit for bit.
    attn_implementation="eager",
)


def encode(text: str) -> list[int]:
    """Text -> token ids: the bytes of its UTF-8 encoding (each in 0..255)."""
    return list(text.encode("utf-8"))


def decode(ids) -> str:
    """Token ids (a list of ints or a 1-D tensor) -> text. A cut-off multi-byte character becomes U+FFFD."""
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def build_model(seed: int = 0) -> LlamaForCausalLM:
    """A randomly initialised model with CONFIG (float32, eval mode): the untrained twin, for comparisons."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(CONFIG)
    return model.eval()


def load_model(dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """The trained model from MODEL_DIR, in eval mode. Offline, silent (no progress bar, no warning), < 1 s.

    Safe to call inside a forked rank (helpers.launch): it only reads two local files.
    """
    return load_checkpoint(MODEL_DIR, CONFIG, dtype, "helpers.course.tiny_llama train")


def load_checkpoint(directory: Path, config, dtype: torch.dtype, remake: str) -> LlamaForCausalLM:
    """A committed Llama checkpoint (this model's, or chapter 10's draft) in eval mode, offline and silent.
    remake: the module (and arguments) that writes it, for the error when it is missing."""
    if not (directory / "model.safetensors").exists():
        raise FileNotFoundError(f"no checkpoint in {directory}: run `.venv/bin/python -m {remake}` to create it "
                                "(or restore it with git)")
    # transformers draws a "Loading weights" progress bar on stderr; stored notebook outputs would see it.
    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        # config.json does not record the attention implementation: without this argument transformers
        # would pick "sdpa" and the loaded model would not be the eager one of the config and build_model().
        model = LlamaForCausalLM.from_pretrained(directory, dtype=dtype, local_files_only=True,
                                                 attn_implementation=config._attn_implementation)
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
    return model.eval()


@torch.no_grad()
def generate(model, prompt_ids, max_new_tokens: int) -> list[int]:
    """Greedy decoding with the KV cache; returns only the `max_new_tokens` new ids (not the prompt).

    A manual loop rather than `model.generate`, so that every step is visible: one forward pass over the
    whole prompt (prefill) fills the cache, then one forward pass per new token (decode) feeds only that
    token, with `past_key_values` holding the keys and values of everything before it. The next token is
    the argmax of the last position's logits. It gives the same ids as
    `model.generate(ids, do_sample=False, max_new_tokens=n)` (tests/test_tiny_llama.py checks this).

    prompt_ids: list of ints or a 1-D tensor, at least one id.
    """
    ids = torch.as_tensor(prompt_ids, dtype=torch.long).reshape(1, -1)       # [batch=1, seq]
    limit = model.config.max_position_embeddings
    if ids.shape[1] == 0:
        raise ValueError("prompt_ids is empty: greedy decoding needs at least one token to start from")
    if ids.shape[1] + max_new_tokens > limit:
        raise ValueError(f"prompt of {ids.shape[1]} tokens + max_new_tokens={max_new_tokens} exceeds "
                         f"max_position_embeddings={limit}: shorten the prompt or generate fewer tokens")
    new_ids: list[int] = []
    past = None
    step_input = ids
    for _ in range(max_new_tokens):
        out = model(input_ids=step_input, past_key_values=past, use_cache=True)
        past = out.past_key_values
        next_id = int(out.logits[0, -1].argmax())
        new_ids.append(next_id)
        step_input = torch.tensor([[next_id]])
    return new_ids


# ---------------------------------------------------------------------------------------------------------
# Training (run once; its result is committed). `python -m helpers.course.tiny_llama train`
# ---------------------------------------------------------------------------------------------------------
TRAIN_SEED = 0
SEQ_LEN = 128
BATCH_SIZE = 16
STEPS = 450
PEAK_LR = 5e-3
WARMUP_STEPS = 20


def _learning_rate(step: int, steps: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak at the last of `steps`."""
    if step < WARMUP_STEPS:
        return PEAK_LR * (step + 1) / WARMUP_STEPS
    progress = (step - WARMUP_STEPS) / max(1, steps - WARMUP_STEPS)
    return PEAK_LR * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def training_batches(data: torch.Tensor, seed: int):
    """Endless batches [BATCH_SIZE, SEQ_LEN] of windows of `data`, drawn from a generator seeded with `seed`.

    Half of the windows start at the beginning of a line. A prompt is read from position 0 with nothing
    before it; a model that only ever saw windows cut mid-word learns to recite the corpus given a long
    context but not to continue a short prompt such as PROMPT."""
    windows = torch.Generator().manual_seed(seed)
    is_newline = data[:len(data) - SEQ_LEN] == ord("\n")
    line_starts = torch.cat([torch.zeros(1, dtype=torch.long), torch.nonzero(is_newline).flatten() + 1])
    while True:
        anywhere = torch.randint(0, len(data) - SEQ_LEN, (BATCH_SIZE,), generator=windows)
        at_line = line_starts[torch.randint(0, len(line_starts), (BATCH_SIZE,), generator=windows)]
        from_line = torch.rand(BATCH_SIZE, generator=windows) < 0.5
        starts = torch.where(from_line, at_line, anywhere)
        yield torch.stack([data[s:s + SEQ_LEN] for s in starts.tolist()])         # [batch, seq]


def optimizer(model) -> torch.optim.AdamW:
    """AdamW with the schedule's peak rate (optimizer_step sets each step's rate)."""
    return torch.optim.AdamW(model.parameters(), lr=PEAK_LR, betas=(0.9, 0.95), weight_decay=0.1)


def optimizer_step(model, opt, loss: torch.Tensor, step: int, steps: int) -> None:
    """One update at step `step` of `steps`: the scheduled rate, gradients clipped to norm 1."""
    for group in opt.param_groups:
        group["lr"] = _learning_rate(step, steps)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def save_checkpoint(model, out_dir: Path) -> None:
    """model in eval mode, saved to out_dir as safetensors (no progress bar)."""
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_logging.disable_progress_bar()
    model.save_pretrained(out_dir, safe_serialization=True)


def train(steps: int = STEPS, out_dir: Path = MODEL_DIR) -> LlamaForCausalLM:
    """Train from seed TRAIN_SEED on CORPUS_PATH (windows of SEQ_LEN bytes) and save to out_dir."""
    torch.set_num_threads(1)        # one thread: the same order of floating-point sums on every run
    torch.use_deterministic_algorithms(True)
    data = torch.tensor(encode(CORPUS_PATH.read_text(encoding="utf-8")), dtype=torch.long)
    model = build_model(seed=TRAIN_SEED).train()
    opt = optimizer(model)
    print(f"training {sum(p.numel() for p in model.parameters()):,} parameters on {len(data):,} bytes: "
          f"{steps} steps of {BATCH_SIZE} x {SEQ_LEN} tokens")
    losses = []
    start, start_cpu = time.perf_counter(), time.process_time()
    for step, batch in zip(range(steps), training_batches(data, TRAIN_SEED)):
        loss = model(input_ids=batch, labels=batch).loss    # transformers shifts labels by one inside
        optimizer_step(model, opt, loss, step, steps)
        losses.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            print(f"  step {step:4d}  loss {loss.item():.3f}  ({time.perf_counter() - start:.0f} s)")
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
    first, last = sum(losses[:10]) / min(10, len(losses)), sum(losses[-10:]) / min(10, len(losses))
    print(f"loss {first:.3f} -> {last:.3f} (mean of the first / last 10 steps; uniform guess = "
          f"{math.log(256):.3f}) in {seconds:.0f} s ({cpu_seconds:.0f} s of CPU time)")
    save_checkpoint(model, out_dir)
    print(f"saved to {out_dir}")
    sample = generate(model, encode(PROMPT), 80)
    print(f"{PROMPT!r} -> {decode(sample)!r}")
    return model


if __name__ == "__main__":
    if sys.argv[1:] == ["train"]:
        train()
    else:
        sys.exit("usage: python -m helpers.course.tiny_llama train   "
                 "(retrains and overwrites helpers/course/data/tiny_llama)")
