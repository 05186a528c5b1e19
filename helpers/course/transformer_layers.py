"""Unsharded reference layers that chapter 2 shards: a 2-layer MLP, causal attention with grouped-query
heads, and a pre-norm transformer block. Plain PyTorch, no framework; the tensor-parallel versions in
`solutions/tensor_parallel.py` are built *from* these, so their outputs can be compared with them.

Shapes: x is [batch, seq, hidden] everywhere.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class MLP(nn.Module):
    """fc1 (hidden -> ffn) -> GELU -> fc2 (ffn -> hidden): the transformer feed-forward block."""

    def __init__(self, hidden: int, ffn: int, bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(hidden, ffn, bias=bias)
        self.fc2 = nn.Linear(ffn, hidden, bias=bias)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


def causal_attention(q, k, v):
    """q: [batch, heads, seq, head_dim]; k, v: [batch, kv_heads, seq, head_dim] with heads a multiple of
    kv_heads (grouped-query attention: each KV head serves heads // kv_heads query heads)."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class Attention(nn.Module):
    """Causal self-attention with `num_heads` query heads and `num_kv_heads` key/value heads (GQA when
    num_kv_heads < num_heads, MHA when equal). Projections q_proj, k_proj, v_proj, o_proj as in Llama."""

    def __init__(self, hidden: int, num_heads: int, num_kv_heads: int | None = None, bias: bool = False):
        super().__init__()
        num_kv_heads = num_kv_heads or num_heads
        if hidden % num_heads or num_heads % num_kv_heads:
            raise ValueError(f"hidden={hidden} must be divisible by num_heads={num_heads}, and num_heads by "
                             f"num_kv_heads={num_kv_heads}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, hidden // num_heads
        self.q_proj = nn.Linear(hidden, num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * self.head_dim, hidden, bias=bias)

    def forward(self, x):
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        out = causal_attention(q, k, v).transpose(1, 2).reshape(b, s, -1)
        return self.o_proj(out)


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, hidden: int, num_heads: int, num_kv_heads: int | None = None, ffn: int | None = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden)
        self.attn = Attention(hidden, num_heads, num_kv_heads)
        self.norm2 = nn.LayerNorm(hidden)
        self.mlp = MLP(hidden, ffn or 4 * hidden)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))
