"""An FP8 KV cache, given code for chapter 10: keys and values stored as float8 e4m3 with a scale, half the bytes
of bf16 and a quarter of float32, so the same memory holds 2× / 4× the blocks (more requests, longer contexts).

vLLM (`--kv-cache-dtype fp8` = fp8_e4m3): the cache holds one byte per value (vllm/utils/torch_utils.py maps
"fp8"/"fp8_e4m3" to a uint8 cache); each attention layer has ONE scale for K and one for V (`_k_scale`,
`_v_scale`, vllm/model_executor/layers/quantization/kv_cache.py: BaseKVCacheMethod loads `k_scale`/`v_scale`
from the checkpoint, 1.0 when the checkpoint has none — with a warning — and refuses anything but per-tensor
scales on that path: "Only support per-tensor scaling factor for fp8 KV cache"); a written value is stored as
fp8(x / scale) and read back as fp8 · scale. Its per-token-head modes (kv_cache_uses_per_token_head_scales,
vllm/v1/kv_cache_interface.py) compute scales at write time in the kernel instead.

Here: per-tensor scales (one per layer for K, one for V, vLLM's) or per-head scales (one per layer and KV head),
calibrated as checkpoint tools do: scale = max |x| / 448 over a calibration prompt (448 is e4m3's largest
finite value; larger values saturate). The error follows from the format: e4m3 keeps 3 mantissa bits, so a
value in the normal range is rounded to within half a step, 2^-4 of its magnitude; below the smallest normal
(2^-6 · scale) the steps are 2^-9 · scale, so the error is at most 2^-10 · scale (`e4m3_error_bound`).

    pool = Fp8KVPool.for_model(config, num_blocks, block_size, k_scales, v_scales)
    runner = fp8_runner(model, calibrate_scales(model, calibration_ids, "head"))   # the tiny Llama on it
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from helpers.course.kv_cache import KVPool
from helpers.course.memory import kv_bytes_per_token

__all__ = ["FP8", "E4M3_MAX", "MANTISSA_BITS", "quantize", "dequantize", "scale_for", "e4m3_error_bound",
           "attention_error_bound", "Fp8Pages", "Fp8KVPool", "calibrate_scales", "fp8_runner", "blocks_in_memory"]

FP8 = torch.float8_e4m3fn
E4M3_MAX = float(torch.finfo(FP8).max)               # 448
MANTISSA_BITS = 3
SMALLEST_NORMAL = 2.0 ** -6                          # e4m3fn: exponent bias 7, smallest normal 2^-6


def scale_for(x: torch.Tensor, per: str = "tensor") -> torch.Tensor:
    """The scale that maps max |x| onto 448: per="tensor" -> a 0-d tensor; per="head" -> [kv_heads, 1] for x of
    shape [..., kv_heads, head_dim] (one per KV head). Never 0 (an all-zero head gets scale 1)."""
    if per == "tensor":
        amax = x.detach().abs().max()
    elif per == "head":
        amax = x.detach().abs().reshape(-1, *x.shape[-2:]).amax(dim=(0, 2))[:, None]
    else:
        raise ValueError(f"per={per!r}: use 'tensor' or 'head'")
    amax = amax.float()
    return torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))


def quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale rounded to e4m3 (nearest even), saturated at ±448 (a plain cast would give NaN)."""
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(FP8)


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * scale).to(dtype)


def e4m3_error_bound(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Per element, the most |x - dequantize(quantize(x))| can be for |x| ≤ 448·scale: half a step of e4m3 —
    |x|·2^-(m+1) in the normal range (m = 3 mantissa bits), 2^-(6+m+1)·scale below it (subnormals)."""
    return torch.maximum(x.abs().float() * 2.0 ** -(MANTISSA_BITS + 1),
                         (2.0 ** -(6 + MANTISSA_BITS + 1)) * scale * torch.ones_like(x, dtype=torch.float32))


def attention_error_bound(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_bound: torch.Tensor,
                          v_bound: torch.Tensor) -> torch.Tensor:
    """The most that attention's output can move when K and V each move by at most k_bound, v_bound (per element,
    e4m3_error_bound). q: [heads, T, D], k, v, bounds: [heads, S, D] (no mask; a causal mask only removes terms).
    A score moves by at most ε = max_j Σ_i |q_i|·k_bound[j, i] / √D, so every probability by a factor within
    e^(±2ε); the output Σ p_j v_j moves by at most max v_bound + (e^(2ε) - 1)·max |v|. Returns [heads, T, 1]."""
    eps = (q.abs().float() @ k_bound.float().transpose(-1, -2)).amax(dim=-1, keepdim=True) / math.sqrt(q.shape[-1])
    v_max = v.abs().float().amax(dim=(-2, -1), keepdim=True)
    return v_bound.float().amax(dim=(-2, -1), keepdim=True) + torch.expm1(2 * eps) * v_max


class _FlatPages:
    """A view [-1, kv_heads, head_dim] of an Fp8Pages, for the runner's slot-mapping write (index_copy_)."""

    def __init__(self, pages):
        self.pages = pages

    def index_copy_(self, dim, index, values):
        if dim != 0:
            raise ValueError("only rows (slots) of the flat pool are written")
        flat = self.pages.data.view(torch.uint8).view(-1, *self.pages.data.shape[2:])
        flat.index_copy_(0, index, quantize(values, self.pages.scale).view(torch.uint8))
        return self

    def __getitem__(self, index):
        flat = self.pages.data.view(-1, *self.pages.data.shape[2:])
        return dequantize(flat[index], self.pages.scale, self.pages.dtype)


class Fp8Pages:
    """One layer's K (or V) pool, [num_blocks, block_size, kv_heads, head_dim], stored as float8 e4m3 (one byte a
    value) with `scale` (0-d, or [kv_heads, 1]). Reads (`pages[blocks, offsets]`, `pages[block_ids]`) return
    dequantized values of `dtype`; writes (`pages[blocks, offsets] = x`, the runner's flat index_copy_)
    quantize. What the runner and paged attention see is an ordinary pool of `dtype`."""

    def __init__(self, shape, scale: torch.Tensor, dtype: torch.dtype = torch.float32):
        self.data = torch.zeros(shape, dtype=FP8)
        self.scale, self.dtype = scale.float(), dtype

    @property
    def shape(self):
        return self.data.shape

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def __getitem__(self, index):
        return dequantize(self.data[index], self.scale, self.dtype)

    def __setitem__(self, index, value):
        raw = self.data.view(torch.uint8)
        raw[index] = quantize(value, self.scale).view(torch.uint8)

    def view(self, *shape):
        if tuple(shape[1:]) != tuple(self.data.shape[2:]):
            raise ValueError(f"view{shape}: only the flat [-1, kv_heads, head_dim] view is supported")
        return _FlatPages(self)


@dataclass
class Fp8KVPool(KVPool):
    """A KVPool whose pages hold float8 e4m3: k_scales[layer], v_scales[layer] (0-d per tensor, [kv_heads, 1] per
    head). `dtype` is what reads return (the model's dtype); bytes_per_token counts one byte a value."""
    k_scales: list = field(default=None)
    v_scales: list = field(default=None)

    def __post_init__(self):
        for name in ("num_layers", "num_blocks", "block_size", "kv_heads", "head_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.k_scales is None or self.v_scales is None:
            raise ValueError("an FP8 pool needs k_scales and v_scales, one per layer (calibrate_scales)")
        shape = (self.num_blocks, self.block_size, self.kv_heads, self.head_dim)
        self.k = [Fp8Pages(shape, s, self.dtype) for s in self.k_scales]
        self.v = [Fp8Pages(shape, s, self.dtype) for s in self.v_scales]

    @classmethod
    def for_model(cls, config, num_blocks: int, block_size: int = 16, k_scales=None, v_scales=None,
                  dtype: torch.dtype = torch.float32):
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(config.num_hidden_layers, num_blocks, block_size, config.num_key_value_heads, head_dim, dtype,
                   k_scales=k_scales, v_scales=v_scales)

    @property
    def bytes_per_token(self) -> int:
        return int(kv_bytes_per_token(self.num_layers, self.kv_heads, self.head_dim, 1))

    @property
    def stored_bytes(self) -> int:
        """Bytes the pages really hold (the fp8 tensors), to compare with total_bytes."""
        return sum(p.nbytes for p in self.k + self.v)


def calibrate_scales(model, token_ids, per: str = "tensor"):
    """{"k": [scale per layer], "v": [...]}: max |K|, |V| / 448 of each layer over one prompt, from a float run of
    the paged runner (what a checkpoint's k_scale / v_scale are computed from)."""
    from helpers.course.paged_llama import PagedLlamaRunner
    size = 16
    runner = PagedLlamaRunner(model, num_blocks=math.ceil(len(token_ids) / size) + 1, block_size=size)
    runner.allocate("calibration", token_ids)
    runner.prefill("calibration", token_ids)
    table = runner.manager.block_table("calibration")
    k, v = [], []
    for layer in range(runner.pool.num_layers):
        keys, values = runner.pool.gather(layer, table, len(token_ids))
        k.append(scale_for(keys, per))
        v.append(scale_for(values, per))
    return {"k": k, "v": v}


def fp8_runner(model, scales, num_blocks: int = 64, block_size: int = 16):
    """helpers/course/paged_llama.py's runner with its pool replaced by an Fp8KVPool of the same size."""
    from helpers.course.paged_llama import PagedLlamaRunner
    runner = PagedLlamaRunner(model, num_blocks=num_blocks, block_size=block_size)
    dtype = next(model.parameters()).dtype
    runner.pool = Fp8KVPool.for_model(model.config, num_blocks, block_size, scales["k"], scales["v"], dtype)
    return runner


def blocks_in_memory(memory_bytes: int, layers: int, kv_heads: int, head_dim: int, block_size: int,
                     bytes_per_value: float) -> int:
    """How many KV blocks of block_size tokens fit in memory_bytes (memory.py's kv_bytes_per_token)."""
    return int(memory_bytes // (block_size * kv_bytes_per_token(layers, kv_heads, head_dim, bytes_per_value)))
