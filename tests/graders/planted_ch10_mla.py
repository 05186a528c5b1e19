"""Wrong answers to chapter 10's MLA exercise (10.3 absorbed_decode_attention), for
tests/graders/test_ch10_mla.py::test_planted_mistakes_are_caught; and valid answers written differently, for
test_valid_alternatives_pass. Records are tests/graders/planted.py's `Mistake`: `check` names the grader's check
(test_ch10_mla.CHECKS) that must catch it; `points_at` the regexes one of which the line the learner reads must
match.

Three of the mistakes give the right numbers (the values or keys re-made from the latents, the naive form in
disguise): only the mechanism check (allocations and FLOPs) catches them. `build(name)` returns an object with
`.absorbed_decode_attention` that the graders' checks accept in place of load_impl("mla").
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from tests.graders.planted import Mistake

V, M = "values", "mechanism"

MISTAKES = [
    Mistake("10.3", "no_rope", "the rope part of the scores forgotten", (r"without the rope part",), check=V),
    Mistake("10.3", "absorbed_scale", "softmax scale (L + R)^-1/2 of the absorbed query",
            (r"softmax scale \(L \+ R\)",), check=V),
    Mistake("10.3", "nope_scale", "softmax scale P^-1/2", (r"softmax scale P\^-1/2",), check=V),
    Mistake("10.3", "newest_missing", "the newest token's latent left out", (r"without the newest token",), check=V),
    Mistake("10.3", "kv_b_unsplit", "W_UK, W_UV cut from kv_b_proj's weight without its transpose",
            (r"differs from the naive attention", r"returned \("), check=V),
    Mistake("10.3", "uv_head0", "every head's latent output through head 0's W_UV",
            (r"differs from the naive attention",), check=V),
    Mistake("10.3", "uv_before_sum", "W_UV applied to every cached latent before the weighted sum",
            (r"decompressed keys or values",), check=M),
    Mistake("10.3", "keys_decompressed", "the cached latents up-projected to per-head keys",
            (r"decompressed keys or values",), check=M),
    Mistake("10.3", "key_per_token", "each cached token's key re-made in a loop", (r"FLOPs of matrix products",),
            check=M),
]

ALTERNATIVES = [
    Mistake("10.3", "mqa_concat", "vLLM's MQA form: [ql_nope, q_rope] against [c_kv, k_rope] in one product",
            (), check=V),
    Mistake("10.3", "mqa_concat_mechanism", "the same, on the mechanism check", (), check=M),
    Mistake("10.3", "sdpa_heads_as_rows", "FlashMLA's layout: heads folded into query rows of one SDPA call",
            (), check=V),
    Mistake("10.3", "sdpa_heads_as_rows_mechanism", "the same, on the mechanism check", (), check=M),
]


def build(name: str | None):
    """The reference implementation with `name` planted (None: unmodified)."""
    import solutions.mla as sol
    impl = types.SimpleNamespace(absorbed_decode_attention=sol.absorbed_decode_attention)
    if name is not None:
        impl.absorbed_decode_attention = _PLANT[name.removesuffix("_mechanism")]
    return impl


def _softmax(scores, dtype):
    return torch.softmax(scores, -1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(dtype)


def _weights(layer, wrong_split=False):
    from helpers.course.mla import split_kv_b_proj
    c = layer.config
    if wrong_split:
        w = layer.kv_b_proj.weight.reshape(c.kv_lora_rank, c.num_heads, c.qk_nope_head_dim + c.v_head_dim)
        return w.split([c.qk_nope_head_dim, c.v_head_dim], dim=-1)
    return split_kv_b_proj(layer)


def _absorbed(layer, q_nope, q_rope, cache, seqs, scale=None, rope=True, newest=True, wrong_split=False,
              uv_head0=False):
    """The reference's steps with one thing changed."""
    c = layer.config
    W_UK, W_UV = _weights(layer, wrong_split)
    scale = c.softmax_scale if scale is None else scale
    ql = torch.einsum("bnp,lnp->bnl", q_nope, W_UK)
    outs = []
    for b, seq in enumerate(seqs):
        c_kv, k_rope = cache.latents(seq)
        if not newest:
            c_kv, k_rope = c_kv[:-1], k_rope[:-1]
        s = ql[b] @ c_kv.T + (q_rope[b] @ k_rope.T if rope else 0)
        outs.append(_softmax(s * scale, q_nope.dtype) @ c_kv)
    o = torch.stack(outs)
    if uv_head0:
        return torch.einsum("bnl,lv->bnv", o, W_UV[:, 0])
    return torch.einsum("bnl,lnv->bnv", o, W_UV)


def _uv_before_sum(layer, q_nope, q_rope, cache, seqs):
    W_UK, W_UV = _weights(layer)
    ql = torch.einsum("bnp,lnp->bnl", q_nope, W_UK)
    outs = []
    for b, seq in enumerate(seqs):
        c_kv, k_rope = cache.latents(seq)
        v = torch.einsum("sl,lnv->snv", c_kv, W_UV)                                   # [S, N, V]: decompressed
        p = _softmax((ql[b] @ c_kv.T + q_rope[b] @ k_rope.T) * layer.config.softmax_scale, q_nope.dtype)
        outs.append(torch.einsum("ns,snv->nv", p, v))
    return torch.stack(outs)


def _keys_decompressed(layer, q_nope, q_rope, cache, seqs):
    W_UK, W_UV = _weights(layer)
    outs = []
    for b, seq in enumerate(seqs):
        c_kv, k_rope = cache.latents(seq)
        k_nope = torch.einsum("sl,lnp->snp", c_kv, W_UK)                               # [S, N, P]: decompressed
        s = torch.einsum("np,snp->ns", q_nope[b], k_nope) + q_rope[b] @ k_rope.T
        p = _softmax(s * layer.config.softmax_scale, q_nope.dtype)
        outs.append(torch.einsum("ns,sl,lnv->nv", p, c_kv, W_UV))
    return torch.stack(outs)


def _key_per_token(layer, q_nope, q_rope, cache, seqs):
    W_UK, W_UV = _weights(layer)
    L, N, P = W_UK.shape
    outs = []
    for b, seq in enumerate(seqs):
        c_kv, k_rope = cache.latents(seq)
        cols = []
        for s in range(c_kv.shape[0]):                                                # one token's key at a time
            k = (c_kv[s:s + 1] @ W_UK.reshape(L, N * P)).view(N, P)
            cols.append((q_nope[b] * k).sum(-1))
        s = torch.stack(cols, -1) + q_rope[b] @ k_rope.T
        p = _softmax(s * layer.config.softmax_scale, q_nope.dtype)
        outs.append(torch.einsum("ns,sl,lnv->nv", p, c_kv, W_UV))
    return torch.stack(outs)


def _mqa_concat(layer, q_nope, q_rope, cache, seqs):
    W_UK, W_UV = _weights(layer)
    q = torch.cat([torch.einsum("bnp,lnp->bnl", q_nope, W_UK), q_rope], dim=-1)       # [B, N, L + R]
    outs = []
    for b, seq in enumerate(seqs):
        c_kv, k_rope = cache.latents(seq)
        kv = torch.cat([c_kv, k_rope], dim=-1)                                         # [S, L + R]: MQA's one head
        p = _softmax(q[b] @ kv.T * layer.config.softmax_scale, q.dtype)
        outs.append(p @ c_kv)
    return torch.einsum("bnl,lnv->bnv", torch.stack(outs), W_UV)


def _sdpa_heads_as_rows(layer, q_nope, q_rope, cache, seqs):
    W_UK, W_UV = _weights(layer)
    q = torch.cat([torch.einsum("bnp,lnp->bnl", q_nope, W_UK), q_rope], dim=-1)
    outs = []
    for b, seq in enumerate(seqs):
        c_kv, k_rope = cache.latents(seq)
        kv = torch.cat([c_kv, k_rope], dim=-1)
        o = F.scaled_dot_product_attention(q[b][None, None], kv[None, None], c_kv[None, None],
                                           scale=layer.config.softmax_scale)            # N query rows, 1 head
        outs.append(o[0, 0])
    return torch.einsum("bnl,lnv->bnv", torch.stack(outs), W_UV)


def _with(**kw):
    return lambda layer, q_nope, q_rope, cache, seqs: _absorbed(layer, q_nope, q_rope, cache, seqs, **kw)


def _absorbed_scale(layer, *args):
    c = layer.config
    return _absorbed(layer, *args, scale=(c.kv_lora_rank + c.qk_rope_head_dim) ** -0.5)


def _nope_scale(layer, *args):
    return _absorbed(layer, *args, scale=layer.config.qk_nope_head_dim ** -0.5)


_PLANT = {
    "no_rope": _with(rope=False),
    "absorbed_scale": _absorbed_scale,
    "nope_scale": _nope_scale,
    "newest_missing": _with(newest=False),
    "kv_b_unsplit": _with(wrong_split=True),
    "uv_head0": _with(uv_head0=True),
    "uv_before_sum": _uv_before_sum,
    "keys_decompressed": _keys_decompressed,
    "key_per_token": _key_per_token,
    "mqa_concat": _mqa_concat,
    "sdpa_heads_as_rows": _sdpa_heads_as_rows,
}
