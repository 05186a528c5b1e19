"""Chapter 10, multi-head latent attention (MLA): decode attention with the absorbed weights.

Exercise 10.3  `absorbed_decode_attention`: one decode step of MLA computed from the latent cache alone. W_UK
               is absorbed into the query (each head's query is projected into the latent space), the scores
               are taken against the cached latents and rope keys, the softmax weights sum the latents, and
               W_UV turns the result into each head's value: no cached token's keys or values are ever re-made.
               Equal to the naive form (helpers/course/mla.py's MultiHeadLatentAttention.forward).

The layer, its latent cache and `split_kv_b_proj` are given in helpers/course/mla.py; `mla_decode_step` (the
glue around the exercise: queries, cache append, o_proj) is the same in labs/ and solutions/.
"""
from __future__ import annotations

import torch

from helpers.course.mla import LatentKVCache, MultiHeadLatentAttention, split_kv_b_proj


def absorbed_decode_attention(layer: MultiHeadLatentAttention, q_nope: torch.Tensor, q_rope: torch.Tensor,
                              cache: LatentKVCache, seqs: list) -> torch.Tensor:
    """MLA decode attention in the absorbed form (vLLM's forward_mqa). B requests decode one token each.

    q_nope: [B, N, P], q_rope: [B, N, R] (already rotated): the new token's query of each request seqs[b],
    whose latents `cache` already holds (the new token's last): c_kv, k_rope = cache.latents(seqs[b]),
    [S_b, L] and [S_b, R]. With W_UK [L, N, P], W_UV [L, N, V] = split_kv_b_proj(layer):
      1. absorb W_UK into the query: ql_nope[b, n] = W_UK[:, n] @ q_nope[b, n]                    [B, N, L]
      2. scores[b, n, s] = (ql_nope[b, n] · c_kv[s] + q_rope[b, n] · k_rope[s]) × layer.config.softmax_scale
         — the scale of the UN-absorbed head dim, (P + R)^-1/2, since the scores are the same numbers
      3. softmax over s (in float32 at least), then o_latent[b, n] = Σ_s p[b, n, s] · c_kv[s]                [B, N, L]
      4. W_UV after the sum: out[b, n] = o_latent[b, n] @ W_UV[:, n]                              [B, N, V]
    Returns [B, N, V] in q_nope's dtype: each head's attention output, before o_proj.

    What is graded: equal to the naive form (keys and values re-made by kv_b_proj) within a bound of the
    dtype, in float32 and float64, on requests of different lengths; and the mechanism: the latents are read
    through cache.latents only, no tensor holding the cached tokens per head (S × N × P keys, S × N × V values,
    or the latents copied per head) is made, and the matrix products stay within twice the FLOPs of steps 1-4.
    """
    W_UK, W_UV = split_kv_b_proj(layer)
    scale = layer.config.softmax_scale
    ql_nope = torch.einsum("bnp,lnp->bnl", q_nope, W_UK.to(q_nope.dtype))
    outs = []
    for b, seq in enumerate(seqs):
        c_kv, k_rope = cache.latents(seq)
        c_kv, k_rope = c_kv.to(q_nope.dtype), k_rope.to(q_nope.dtype)
        scores = (ql_nope[b] @ c_kv.T + q_rope[b] @ k_rope.T) * scale                        # [N, S]
        probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32))
        probs = probs.to(q_nope.dtype)
        outs.append(probs @ c_kv)                                                             # [N, L]
    o_latent = torch.stack(outs)                                                              # [B, N, L]
    return torch.einsum("bnl,lnv->bnv", o_latent, W_UV.to(q_nope.dtype))


def mla_decode_step(layer: MultiHeadLatentAttention, x: torch.Tensor, positions: torch.Tensor,
                    cache: LatentKVCache, seqs: list) -> torch.Tensor:
    """One decode step of B requests through `layer` with the absorbed attention: x [B, hidden] (one new token
    per request seqs[b], at positions[b]) -> [B, hidden]. Appends each token's latent to the cache first."""
    q_nope, q_rope = layer.queries(x, positions)
    c_kv, k_rope = layer.latents(x, positions)
    for b, seq in enumerate(seqs):
        cache.append(seq, c_kv[b:b + 1], k_rope[b:b + 1])
    out = absorbed_decode_attention(layer, q_nope, q_rope, cache, seqs)
    return layer.o_proj(out.reshape(len(seqs), -1))
