"""Memory arithmetic for inference: weights + KV cache, per GPU under tensor parallelism; and counting the
bytes a real model or cache holds. Used by the tensor-parallel, pipeline and serving chapters.

    weights   = parameters × bytes per parameter                         (2 B for fp16/bf16, 1 B for int8/fp8)
    KV cache  = 2 (K and V) × layers × kv_heads × head_dim × bytes/value  per token, × tokens in flight
    per GPU   = weights / TP + KV cache × kv_heads_per_rank(kv_heads, TP) / kv_heads

The KV cache follows the GQA rule of chapter 2: it shrinks as 1/TP only while TP <= kv_heads; beyond that
every rank keeps (a copy of) one whole KV head, so it stops shrinking (8 KV heads: TP=16 holds what TP=8
holds). Ignored: the replicated norms (tiny) and, beyond TP = kv_heads, the replicated K/V projection
weights (Llama-3-70B: 1.3 B of its 70.6 B parameters are K/V projections; at TP=16 each rank holds 1/8
of them instead of 1/16, 0.17 GB more in bf16).

GB here means 10^9 bytes (as GPU data sheets and the "70B needs 140 GB" rule of thumb use), GiB 2^30.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["ModelShape", "MODELS",
           "kv_bytes_per_token", "mla_kv_bytes_per_token", "kv_heads_per_rank", "inference_memory",
           "smallest_tp_that_fits",
           "parameter_bytes", "tensor_bytes", "GB"]

GB = 1e9
BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "fp8": 1, "int8": 1, "int4": 0.5}


@dataclass(frozen=True)
class ModelShape:
    """What the arithmetic needs to know about a decoder-only model."""
    name: str
    parameters: float          # count, e.g. 70e9
    layers: int
    kv_heads: int
    head_dim: int
    heads: int                 # query heads

    @property
    def hidden(self) -> int:
        return self.heads * self.head_dim


# Published shapes (config.json of each model). helpers/course/strategy.py's presets come from here too.
MODELS = {
    "Llama-3.2-1B": ModelShape("Llama-3.2-1B", 1.24e9, 16, 8, 64, 32),
    "Llama-2-7B": ModelShape("Llama-2-7B", 6.74e9, 32, 32, 128, 32),
    "Llama-3-8B": ModelShape("Llama-3-8B", 8.03e9, 32, 8, 128, 32),
    "Llama-2-13B": ModelShape("Llama-2-13B", 13.0e9, 40, 40, 128, 40),
    "Llama-2-70B": ModelShape("Llama-2-70B", 69.0e9, 80, 8, 128, 64),
    "Llama-3-70B": ModelShape("Llama-3-70B", 70.6e9, 80, 8, 128, 64),
    "Llama-3.1-405B": ModelShape("Llama-3.1-405B", 405.8e9, 126, 8, 128, 128),
}


def kv_bytes_per_token(layers: int, kv_heads: int, head_dim: int, bytes_per_value: float = 2) -> float:
    """Bytes of K and V cached for one token in every layer."""
    return 2 * layers * kv_heads * head_dim * bytes_per_value


def mla_kv_bytes_per_token(layers: int, kv_lora_rank: int, rope_head_dim: int, bytes_per_value: float = 2) -> float:
    """Bytes cached for one token in every layer by multi-head latent attention (DeepSeek-V2/V3, chapter 10):
    one latent of kv_lora_rank values and one rope key of rope_head_dim values, shared by all heads, no separate
    V — the formula above with one KV "head" of width (kv_lora_rank + rope_head_dim) / 2 (vLLM's
    MLAAttentionSpec, vllm/v1/kv_cache_interface.py: head_size_v=0; built in
    vllm/model_executor/layers/attention/mla_attention.py with num_kv_heads=1, head_size=L+R).
    helpers/course/mla.py holds the layer."""
    return kv_bytes_per_token(layers, 1, (kv_lora_rank + rope_head_dim) / 2, bytes_per_value)


def kv_heads_per_rank(kv_heads: int, tp: int) -> float:
    """KV heads each rank caches under tensor parallelism: kv_heads / tp while tp <= kv_heads; beyond that
    every rank still holds (a copy of) one whole KV head, so the per-rank KV cache stops shrinking
    (the GQA rule of chapter 2; helpers/course/tp_heads.py decides which head a rank holds)."""
    if tp < 1:
        raise ValueError(f"tp={tp}: the tensor-parallel degree is at least 1")
    return max(kv_heads / tp, 1)


def inference_memory(parameters: float, bytes_per_param: float, kv_per_token: float = 0.0,
                     tokens: int = 0, tp: int = 1, kv_heads: int | None = None) -> dict:
    """Bytes per GPU for the weights and the KV cache of `tokens` cached tokens (summed over the batch)
    under tensor parallelism of degree `tp`. Returns {"weights", "kv_cache", "total"} in bytes, per GPU.

    kv_per_token: the whole model's K and V bytes per token (`kv_bytes_per_token`); kv_heads: the model's
    number of KV heads, required with a KV cache: each GPU caches kv_heads_per_rank(kv_heads, tp) of them,
    so the cache stops shrinking once tp exceeds kv_heads."""
    if tp < 1:
        raise ValueError(f"tp={tp}: the tensor-parallel degree is at least 1")
    weights = parameters * bytes_per_param / tp
    kv = 0.0
    if kv_per_token and tokens:
        if kv_heads is None:
            raise ValueError("pass kv_heads (the model's number of KV heads): the KV cache per GPU shrinks as 1/tp "
                             "only while tp <= kv_heads")
        kv = kv_per_token * tokens * kv_heads_per_rank(kv_heads, tp) / kv_heads
    return {"weights": weights, "kv_cache": kv, "total": weights + kv}


def smallest_tp_that_fits(parameters: float, bytes_per_param: float, gpu_bytes: float, kv_per_token: float = 0.0,
                          tokens: int = 0, degrees=(1, 2, 4, 8, 16, 32), usable: float = 0.9,
                          kv_heads: int | None = None, heads: int | None = None) -> int | None:
    """The smallest TP degree whose per-GPU weights + KV cache fit in `usable` × gpu_bytes (the rest is for
    activations, the CUDA context and fragmentation), or None if even the largest degree does not fit.
    kv_heads: as in inference_memory. heads (query heads, optional): skip degrees that cannot split the
    heads (helpers/course/tp_heads.kv_heads_for_rank: tp must divide heads, and divide kv_heads or be a multiple)."""
    from helpers.course.tp_heads import kv_heads_for_rank
    for tp in degrees:
        if heads is not None:
            try:
                kv_heads_for_rank(heads, kv_heads or heads, 0, tp)
            except ValueError:
                continue
        if (inference_memory(parameters, bytes_per_param, kv_per_token, tokens, tp, kv_heads)["total"]
                <= usable * gpu_bytes):
            return tp
    return None


def tensor_bytes(tensors) -> int:
    """Bytes held by an iterable of tensors (each storage counted once, so tied weights count once)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def parameter_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers, as stored on this rank."""
    return tensor_bytes(list(module.parameters()) + list(module.buffers()))
