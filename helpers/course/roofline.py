"""Prefill vs decode: FLOPs, bytes, arithmetic intensity, and a roofline measured on this machine.

A forward step of a decoder multiplies every token it processes by every weight matrix. Per step it does

    FLOPs ≈ 2 × (tokens in the step) × (matmul parameters) + attention (4 × heads × head_dim per token and
            context position)
    bytes ≈ (every weight, read once) + (the KV cache it attends to, read) + (the new K/V, written)

* Prefill: one sequence, n prompt tokens in one step: n × 2 FLOPs per weight read once. Intensity grows with
  n: compute-bound. Its time is the time to first token (TTFT).
* Decode: b sequences, one new token each per step: b × 2 FLOPs per weight. At small b the step reads far more
  bytes than it has FLOPs to hide them behind: memory-bound, and by the roofline the step would take about the
  same time whether it carries 1 or a few tokens (on a CPU it does not quite: small-batch matmuls reach neither
  roof, see chapter 7's correction). Its time is the inter-token latency (ITL). Batching decodes is how a serving
  engine buys throughput (and why the paged KV cache, which fits more sequences, matters).

The roofline: attainable FLOP/s = min(peak FLOP/s, intensity × bandwidth). The ridge point peak / bandwidth
(FLOP per byte) separates the two regimes, and a decode batch stops being memory-bound where its intensity
reaches the ridge.

    from helpers.course.roofline import step_cost, ROOFLINE_CONFIG, measure_linear_steps, ceilings
    step_cost(CONFIG, tokens=1, batch=8, context=100)        # one decode step of 8 sequences: StepCost
    rows = measure_linear_steps(ROOFLINE_CONFIG, [1, 2, 4, ..., 512])
    roofs = ceilings(rows, bandwidth=stream_bandwidth()["triad"])   # the memory roof measured apart (STREAM)

Why a larger model for the measurement. The course's tiny Llama has 3.4 MB of weights: they live in this
CPU's caches, and a step is dominated by Python and kernel-launch overhead, not by memory. ROOFLINE_CONFIG
is a Llama config of ~100 MB of float32 weights (more than the last-level cache of common x86 CPUs), from
which `linear_weights` builds the weight matrices (random, fixed seed: their values do not change the
time). The measurement times the matmuls of one forward step on one thread (`x @ W.T` for every projection of
every layer), which is where both prefill and decode spend their time; the attention over the KV cache adds
bytes to decode (counted by `step_cost`) and makes it more memory-bound still.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers import LlamaConfig

from helpers.course.memory import kv_bytes_per_token

__all__ = ["StepCost", "step_cost", "ROOFLINE_CONFIG", "linear_shapes", "linear_weights", "measure_linear_steps",
           "Ceilings", "ceilings", "stream_bandwidth", "memory_bound_batch",
           "decode_intensity_limit"]

# A Llama layer shape (hidden 1024, 16 heads of 64, 8 KV heads, SwiGLU 2816) with 2 layers: 23 M matmul
# parameters, 93 MB in float32.
ROOFLINE_CONFIG = LlamaConfig(vocab_size=256, hidden_size=1024, intermediate_size=2816, num_hidden_layers=2,
                              num_attention_heads=16, num_key_value_heads=8, head_dim=64,
                              max_position_embeddings=4096, tie_word_embeddings=False)


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def linear_shapes(config) -> list[tuple[int, int]]:
    """(out_features, in_features) of every matmul weight of one forward: q, k, v, o, gate, up, down per
    layer, then lm_head."""
    h, d, f = config.hidden_size, _head_dim(config), config.intermediate_size
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    layer = [(q, h), (kv, h), (kv, h), (h, q), (f, h), (f, h), (h, f)]
    return layer * config.num_hidden_layers + [(config.vocab_size, h)]


@dataclass(frozen=True)
class StepCost:
    """FLOPs and bytes of one forward step (float32 unless `bytes_per_value` says otherwise)."""
    flops: float
    weight_bytes: float
    kv_bytes: float
    activation_bytes: float

    @property
    def bytes(self) -> float:
        return self.weight_bytes + self.kv_bytes + self.activation_bytes

    @property
    def intensity(self) -> float:
        """Arithmetic intensity, FLOP per byte moved."""
        return self.flops / self.bytes


def step_cost(config, tokens: int, batch: int = 1, context: int = 0, bytes_per_value: int = 4) -> StepCost:
    """One forward of `batch` sequences, each feeding `tokens` new tokens after `context` cached ones.

    Prefill of an n-token prompt: tokens=n, batch=1, context=0. A decode step: tokens=1, context=length so far.
    Counts the matmuls (2 FLOPs per multiply-add), attention scores and weighted sums (causal: new token i sees
    context + i + 1 positions), weights read once, the KV cache read and the new K/V written, and each
    matmul's input and output activations. Norms, rotary and softmax are left out (a few FLOPs per value).
    """
    if tokens < 1 or batch < 1 or context < 0:
        raise ValueError(f"tokens={tokens} and batch={batch} must be >= 1, context={context} >= 0")
    n = tokens * batch
    shapes = linear_shapes(config)
    params = sum(o * i for o, i in shapes)
    d, layers = _head_dim(config), config.num_hidden_layers
    seen = batch * (tokens * context + tokens * (tokens + 1) // 2)      # (new token, visible position) pairs
    attention_flops = 4 * config.num_attention_heads * d * seen * layers
    kv_per_token = kv_bytes_per_token(layers, config.num_key_value_heads, d, bytes_per_value)
    return StepCost(flops=2 * n * params + attention_flops,
                    weight_bytes=params * bytes_per_value,
                    kv_bytes=batch * (context + tokens) * kv_per_token,
                    activation_bytes=n * sum(o + i for o, i in shapes) * bytes_per_value)


def linear_weights(config, seed: int = 0, dtype=torch.float32) -> list[torch.Tensor]:
    """One weight tensor per entry of linear_shapes(config), random from `seed` (values do not change timings)."""
    g = torch.Generator().manual_seed(seed)
    # uniform in ±1/sqrt(in), like nn.Linear's default initialisation (and faster to draw than randn)
    return [torch.empty(o, i, dtype=dtype).uniform_(-i ** -0.5, i ** -0.5, generator=g)
            for o, i in linear_shapes(config)]


def _step(weights, x):
    for w in weights:
        torch.mm(x[:, :w.shape[1]], w.t())


def measure_linear_steps(config, batches, repeats: int = 5, weights=None, threads: int = 1) -> list[dict]:
    """Time the matmuls of one forward step for each number of tokens in `batches` (on `threads` threads).

    The sizes are timed in `repeats` interleaved rounds (1, 2, 4, ..., then again), and each keeps its fastest
    run: other processes on the machine only ever add time, and a burst of them then hits every size alike
    instead of one. Returns one dict per entry: tokens, seconds, flops, bytes (the matmul part of step_cost:
    weights + activations), intensity, flop_per_s, bytes_per_s.
    """
    weights = weights if weights is not None else linear_weights(config)
    h = max(i for _, i in linear_shapes(config))
    params = sum(w.numel() for w in weights)
    elt = weights[0].element_size()
    act = sum(w.shape[0] + w.shape[1] for w in weights)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    inputs = {b: torch.randn(b, h, dtype=weights[0].dtype) for b in batches}
    best = {b: float("inf") for b in batches}
    try:
        with torch.no_grad():
            for b in batches:
                _step(weights, inputs[b])                           # warm-up (allocations, kernel choice)
            for _ in range(repeats):
                for b in batches:
                    start = time.perf_counter()
                    _step(weights, inputs[b])
                    best[b] = min(best[b], time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)
    rows = []
    for b in batches:
        flops, nbytes = 2.0 * b * params, (params + b * act) * elt
        rows.append({"tokens": b, "seconds": best[b], "flops": flops, "bytes": nbytes, "intensity": flops / nbytes,
                     "flop_per_s": flops / best[b], "bytes_per_s": nbytes / best[b]})
    return rows


@dataclass(frozen=True)
class Ceilings:
    """The two roofs measured on this machine: peak FLOP/s (the best step) and memory bandwidth (bytes/s: a
    STREAM measurement, or the one-token step's own, which streams every weight once)."""
    peak_flop_per_s: float
    bandwidth: float

    @property
    def ridge(self) -> float:
        """FLOP per byte where the roofs meet: below it a step is memory-bound."""
        return self.peak_flop_per_s / self.bandwidth

    def attainable(self, intensity):
        return torch.minimum(torch.as_tensor(intensity, dtype=torch.float64) * self.bandwidth,
                             torch.tensor(self.peak_flop_per_s, dtype=torch.float64))


def ceilings(rows: list[dict], bandwidth: float | None = None) -> Ceilings:
    """Peak FLOP/s: the best measured step. Bandwidth: `bandwidth` if given (an independent measurement such as
    `stream_bandwidth()["triad"]`), else the one-token step's own bytes/s (which makes "the one-token step is
    memory-bound" true by construction)."""
    one = min(rows, key=lambda r: r["tokens"])
    return Ceilings(peak_flop_per_s=max(r["flop_per_s"] for r in rows),
                    bandwidth=one["bytes_per_s"] if bandwidth is None else bandwidth)


def stream_bandwidth(n: int = 1 << 23, repeats: int = 7, threads: int = 1) -> dict:
    """Memory bandwidth in bytes/s, measured as McCalpin's STREAM does, on `threads` threads: COPY a = b (reads b,
    writes a: 16 B per float64 element) and TRIAD a = b + s·c (24 B per element), on arrays of n float64 (64 MiB
    each by default, well past the last-level cache), best of `repeats` runs (other processes only add time)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    a, b, c = (torch.rand(n, dtype=torch.float64) for _ in range(3))
    best = {"copy": float("inf"), "triad": float("inf")}
    try:
        for _ in range(repeats):
            start = time.perf_counter()
            a.copy_(b)
            best["copy"] = min(best["copy"], time.perf_counter() - start)
            start = time.perf_counter()
            torch.add(b, c, alpha=3.0, out=a)
            best["triad"] = min(best["triad"], time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)
    return {"copy": 16 * n / best["copy"], "triad": 24 * n / best["triad"]}


def memory_bound_batch(config, roofs: Ceilings, context: int = 0, limit: int = 1 << 14) -> int | None:
    """The smallest decode batch whose step (step_cost, tokens=1) reaches the ridge: up to it, adding a sequence
    to the batch costs almost no time. None if no batch up to `limit` does: with a long context every sequence
    brings its own KV cache to read, so the intensity tends to a ceiling (`decode_intensity_limit`) that may
    stay below the ridge however large the batch."""
    b = 1
    while step_cost(config, 1, batch=b, context=context).intensity < roofs.ridge:
        if b >= limit:
            return None
        b = b + 1 if b < 64 else b * 2 if b * 2 <= limit else limit
    return b


def decode_intensity_limit(config, context: int) -> float:
    """FLOP per byte of a decode step as the batch grows without bound: per sequence, its FLOPs over its KV
    bytes and activations (the weights, read once, no longer count)."""
    big = 1 << 30
    return step_cost(config, 1, batch=big, context=context).intensity
