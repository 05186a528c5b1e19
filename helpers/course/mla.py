"""Chapter 10 given code: multi-head latent attention (MLA, DeepSeek-V2/V3) and its latent KV cache.

MLA caches, per token and layer, ONE compressed vector c_kv (the latent, kv_lora_rank values) and ONE small
key k_rope that carries the position (qk_rope_head_dim values), shared by all heads, instead of a key and a
value per KV head. The per-head keys and values are re-made from the latent by an up-projection, kv_b_proj:

    c_kv, k_rope = split(kv_a_proj_with_mqa(x))          [T, L] and [T, R]; c_kv through an RMSNorm,
                                                         k_rope through RoPE (the decoupled rope key)
    k_nope, v    = split(kv_b_proj(c_kv))                [T, N, P] and [T, N, V]: W_UK and W_UV
    q_nope, q_pe = split(q_b_proj(norm(q_a_proj(x))))    [T, N, P] and [T, N, R] (q_proj when q_lora_rank=None)
    scores       = (q_nope · k_nope + RoPE(q_pe) · k_rope) · (P + R)^-1/2     (the un-absorbed head dim)
    out          = o_proj(softmax(scores) @ v)

`MultiHeadLatentAttention` computes this "naive" (vLLM: compute-friendly, forward_mha) form, with DeepSeek-V3's
parameter names, so that `from_deepseek_v3` copies the weights of transformers' DeepseekV3Attention
(transformers/models/deepseek_v3/modeling_deepseek_v3.py, whose cache also holds only the latents:
"Cache read / write is performed while latent KV is still compressed"). Exercise 10.3 (labs/mla.py) computes
the same attention for decode without ever re-making the cached keys and values: W_UK is absorbed into the
query and W_UV applied after the weighted sum of latents (vLLM's forward_mqa, the "data-movement friendly
approach" of vllm/model_executor/layers/attention/mla_attention.py, whose module docstring names W_UK, W_UV;
`split_kv_b_proj` there gives them as [L, N, P] and [L, N, V], as here).

KV bytes per token: `helpers.course.memory.mla_kv_bytes_per_token` = layers × (kv_lora_rank + rope) × bytes,
one "head" and no separate V (vLLM's MLAAttentionSpec: num_kv_heads=1, head_size = L + R, head_size_v = 0,
vllm/v1/kv_cache_interface.py). Under tensor parallelism that single latent head cannot be split: vLLM gives
MLA's cache max_tp_shards=1, so every TP rank holds a full replica (see helpers/course/dp_attention.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

__all__ = ["MLAConfig", "RMSNorm", "rope_cos_sin", "apply_rope", "LatentKVCache", "MultiHeadLatentAttention",
           "split_kv_b_proj", "tiny_deepseek_v3_config", "from_deepseek_v3", "DEEPSEEK_V3"]


@dataclass(frozen=True)
class MLAConfig:
    """The shape of one MLA layer (DeepSeek-V3's config.json names; its values in `DEEPSEEK_V3`)."""
    hidden_size: int
    num_heads: int
    kv_lora_rank: int                 # L: the latent's width
    qk_nope_head_dim: int             # P: per-head query/key width without position
    qk_rope_head_dim: int             # R: the decoupled rope key's width (one key shared by all heads)
    v_head_dim: int                   # V
    q_lora_rank: int | None = None    # None: q_proj directly; else q_a_proj -> RMSNorm -> q_b_proj
    rope_theta: float = 10000.0
    rope_interleave: bool = False     # DeepSeek's checkpoints pair dims (0,1),(2,3)...; False: rotate_half
    rms_norm_eps: float = 1e-6

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """(P + R)^-1/2: the head dim of the UN-absorbed keys (vLLM: self.scaling = self.qk_head_dim**-0.5)."""
        return self.qk_head_dim ** -0.5


# DeepSeek-V3's published config.json (the numbers only; nothing is downloaded): 61 layers, 128 heads.
DEEPSEEK_V3 = dict(layers=61, config=MLAConfig(hidden_size=7168, num_heads=128, kv_lora_rank=512, qk_nope_head_dim=128,
                                               qk_rope_head_dim=64, v_head_dim=128, q_lora_rank=1536))


class RMSNorm(nn.Module):
    """DeepSeek-V3's RMSNorm (computed in float32, as transformers' DeepseekV3RMSNorm)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, dim: int, theta: float = 10000.0, dtype=torch.float32):
    """cos, sin [T, dim] for integer positions [T] (the default RoPE: inv_freq = theta^(-2i/dim), halves
    repeated, as transformers' DeepseekV3RotaryEmbedding)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool = False) -> torch.Tensor:
    """Rotate x [T, ..., dim] by the angles of its token (cos/sin [T, dim]). interleave=False: rotate_half (the
    two halves are the pairs); True: DeepSeek's layout, pairs (x0, x1), (x2, x3), ... written back as
    [evens rotated, odds rotated] (transformers' apply_rotary_pos_emb_interleave)."""
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1],)
    cos, sin = cos.view(shape), sin.view(shape)
    if interleave:
        half = x.shape[-1] // 2
        c, s = cos[..., :half], sin[..., :half]
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class LatentKVCache:
    """One layer's MLA cache: per request, the latent c_kv [S, L] and the rope key k_rope [S, R] of each of
    its S cached tokens, nothing else (no per-head K or V). Contiguous per request (a paged version would keep
    the same two tensors in blocks: vLLM stores them side by side, [num_blocks, block_size, L + R]).

        cache.append(seq, c_kv, k_rope)   # the new tokens' latents (after norm and RoPE)
        c_kv, k_rope = cache.latents(seq) # every cached token of `seq`
        cache.nbytes()                    # what this cache holds
    """

    def __init__(self, kv_lora_rank: int, rope_dim: int, dtype: torch.dtype = torch.float32):
        self.kv_lora_rank, self.rope_dim, self.dtype = kv_lora_rank, rope_dim, dtype
        self._c_kv: dict = {}
        self._k_rope: dict = {}

    def append(self, seq, c_kv: torch.Tensor, k_rope: torch.Tensor) -> None:
        if c_kv.shape[-1] != self.kv_lora_rank or k_rope.shape[-1] != self.rope_dim or c_kv.shape[0] != \
                k_rope.shape[0]:
            raise ValueError(f"append expects c_kv [T, {self.kv_lora_rank}] and k_rope [T, {self.rope_dim}], got "
                             f"{tuple(c_kv.shape)} and {tuple(k_rope.shape)}")
        c_kv, k_rope = c_kv.detach().to(self.dtype), k_rope.detach().to(self.dtype)
        if seq in self._c_kv:
            c_kv, k_rope = torch.cat([self._c_kv[seq], c_kv]), torch.cat([self._k_rope[seq], k_rope])
        self._c_kv[seq], self._k_rope[seq] = c_kv, k_rope

    def latents(self, seq) -> tuple[torch.Tensor, torch.Tensor]:
        """(c_kv [S, L], k_rope [S, R]) of every cached token of `seq`, oldest first."""
        if seq not in self._c_kv:
            raise KeyError(f"request {seq!r} has nothing cached (cached: {sorted(map(str, self._c_kv))})")
        return self._c_kv[seq], self._k_rope[seq]

    def length(self, seq) -> int:
        return self._c_kv[seq].shape[0] if seq in self._c_kv else 0

    def sequences(self) -> list:
        return list(self._c_kv)

    def free(self, seq) -> None:
        self._c_kv.pop(seq, None)
        self._k_rope.pop(seq, None)

    def nbytes(self) -> int:
        """Bytes held: Σ over requests of S × (L + R) × bytes per value."""
        return sum(t.numel() * t.element_size() for d in (self._c_kv, self._k_rope) for t in d.values())


class MultiHeadLatentAttention(nn.Module):
    """One MLA layer (DeepSeek-V3's structure and parameter names), computed in the naive form: the cached
    latents are up-projected to per-head keys and values at every step.

    forward(x [T, hidden], positions [T], cache=None, seq=None) -> [T, hidden]: the T new tokens of ONE request
    attend causally to themselves and to everything `cache` holds for `seq` (their latents are appended first).
    """

    def __init__(self, config: MLAConfig):
        super().__init__()
        c = self.config = config
        N, P, R, V, L = c.num_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank
        if c.q_lora_rank is None:
            self.q_proj = nn.Linear(c.hidden_size, N * (P + R), bias=False)
        else:
            self.q_a_proj = nn.Linear(c.hidden_size, c.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, c.rms_norm_eps)
            self.q_b_proj = nn.Linear(c.q_lora_rank, N * (P + R), bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(c.hidden_size, L + R, bias=False)     # W_DKV and W_KR side by side
        self.kv_a_layernorm = RMSNorm(L, c.rms_norm_eps)
        self.kv_b_proj = nn.Linear(L, N * (P + V), bias=False)                     # [W_UK; W_UV] per head
        self.o_proj = nn.Linear(N * V, c.hidden_size, bias=False)

    def queries(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(q_nope [T, N, P], q_rope [T, N, R]) of the tokens x [T, hidden]; q_rope already rotated."""
        c = self.config
        q = self.q_proj(x) if c.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_rope = q.view(x.shape[0], c.num_heads, c.qk_head_dim).split(
            [c.qk_nope_head_dim, c.qk_rope_head_dim], dim=-1)
        cos, sin = rope_cos_sin(positions, c.qk_rope_head_dim, c.rope_theta, x.dtype)
        return q_nope, apply_rope(q_rope, cos, sin, c.rope_interleave)

    def latents(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(c_kv [T, L], k_rope [T, R]): what the cache keeps for the tokens x [T, hidden]."""
        c = self.config
        c_kv, k_rope = self.kv_a_proj_with_mqa(x).split([c.kv_lora_rank, c.qk_rope_head_dim], dim=-1)
        cos, sin = rope_cos_sin(positions, c.qk_rope_head_dim, c.rope_theta, x.dtype)
        return self.kv_a_layernorm(c_kv), apply_rope(k_rope, cos, sin, c.rope_interleave)

    def expand_kv(self, c_kv: torch.Tensor, k_rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The naive step: per-head keys [S, N, P + R] and values [S, N, V] re-made from S cached latents."""
        c = self.config
        kv = self.kv_b_proj(c_kv).view(c_kv.shape[0], c.num_heads, c.qk_nope_head_dim + c.v_head_dim)
        k_nope, v = kv.split([c.qk_nope_head_dim, c.v_head_dim], dim=-1)
        k = torch.cat([k_nope, k_rope[:, None, :].expand(-1, c.num_heads, -1)], dim=-1)
        return k, v

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: LatentKVCache | None = None,
                seq=None) -> torch.Tensor:
        c = self.config
        T = x.shape[0]
        q_nope, q_rope = self.queries(x, positions)
        c_kv, k_rope = self.latents(x, positions)
        if cache is not None:
            cache.append(seq, c_kv, k_rope)
            c_kv, k_rope = cache.latents(seq)
        S = c_kv.shape[0]
        k, v = self.expand_kv(c_kv.to(x.dtype), k_rope.to(x.dtype))
        q = torch.cat([q_nope, q_rope], dim=-1)
        scores = torch.einsum("tnd,snd->nts", q, k) * c.softmax_scale
        # causal: new token t (at cache row S - T + t) sees rows 0 .. S - T + t
        mask = torch.arange(S)[None, :] > (torch.arange(T)[:, None] + S - T)
        scores = scores.masked_fill(mask, float("-inf"))
        probs = torch.softmax(scores, -1, dtype=torch.promote_types(x.dtype, torch.float32)).to(x.dtype)
        out = torch.einsum("nts,snv->tnv", probs, v)
        return self.o_proj(out.reshape(T, c.num_heads * c.v_head_dim))


def split_kv_b_proj(layer: MultiHeadLatentAttention) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_UK [L, N, P], W_UV [L, N, V]) from kv_b_proj's weight [N·(P + V), L], as vLLM's split_kv_b_proj
    (vllm/model_executor/layers/attention/mla_attention.py): k_nope[s, n] = c_kv[s] @ W_UK[:, n],
    v[s, n] = c_kv[s] @ W_UV[:, n]."""
    c = layer.config
    w = layer.kv_b_proj.weight.T.reshape(c.kv_lora_rank, c.num_heads, c.qk_nope_head_dim + c.v_head_dim)
    return w.split([c.qk_nope_head_dim, c.v_head_dim], dim=-1)


def tiny_deepseek_v3_config(q_lora_rank: int | None = 24, rope_interleave: bool = False, hidden: int = 64,
                            heads: int = 4, kv_lora_rank: int = 16, nope: int = 16, rope: int = 8, v: int = 16):
    """A transformers DeepseekV3Config of one tiny layer (no download): DeepSeek-V3's structure at toy sizes."""
    from transformers import DeepseekV3Config
    config = DeepseekV3Config(vocab_size=64, hidden_size=hidden, intermediate_size=64, moe_intermediate_size=32,
                              num_hidden_layers=1, num_attention_heads=heads, num_key_value_heads=heads,
                              q_lora_rank=q_lora_rank, kv_lora_rank=kv_lora_rank, qk_nope_head_dim=nope,
                              qk_rope_head_dim=rope, v_head_dim=v, rope_interleave=rope_interleave,
                              n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
                              first_k_dense_replace=1, max_position_embeddings=256)
    config._attn_implementation = "eager"
    return config


def from_deepseek_v3(hf_attention) -> MultiHeadLatentAttention:
    """Our layer with the weights of a transformers DeepseekV3Attention (same parameter names)."""
    hf = hf_attention.config
    theta = (getattr(hf, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    config = MLAConfig(hidden_size=hf.hidden_size, num_heads=hf.num_attention_heads, kv_lora_rank=hf.kv_lora_rank,
                       qk_nope_head_dim=hf.qk_nope_head_dim, qk_rope_head_dim=hf.qk_rope_head_dim,
                       v_head_dim=hf.v_head_dim, q_lora_rank=hf.q_lora_rank, rope_theta=theta,
                       rope_interleave=bool(hf.rope_interleave), rms_norm_eps=hf.rms_norm_eps)
    if hf.rope_parameters.get("rope_type", "default") != "default":
        raise ValueError("only the default RoPE is modelled here (no YaRN scaling)")
    layer = MultiHeadLatentAttention(config).to(hf_attention.o_proj.weight.dtype)
    own = dict(layer.named_parameters())
    with torch.no_grad():
        for name, p in hf_attention.named_parameters():
            if name not in own:
                raise KeyError(f"DeepseekV3Attention parameter {name} has no counterpart here")
            own[name].copy_(p)
    return layer
