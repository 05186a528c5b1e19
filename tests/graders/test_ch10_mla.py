"""Graders for chapter 10's multi-head latent attention (labs/mla.py): the absorbed decode attention (10.3).

The checks return lists of failures; the graders run them on the implementation under test (COURSE_IMPL) inside a
launched rank (learner code never runs in the grading process), and tests/graders/planted_ch10_mla.py runs the same
checks on wrong answers planted in the reference and on valid answers written differently.

What the graders check:
  10.3 absorbed_decode_attention: THE NUMBERS — equal to the naive form (every cached latent up-projected by
       kv_b_proj to per-head keys and values, computed by the grader in float64 with the given layer's expand_kv)
       within factor × eps(dtype) × scale, factor 4 (P + L + S) (the dot products over P, L and the S cached
       tokens are summed in another order), in float64 and float32, with q LoRA and without, P ≠ V, requests of
       1, 5 and 40 cached tokens in one batch. A wrong output is compared with the usual wrong answers computed
       by the grader (no rope term, the softmax scale of the absorbed width L + R or of P alone, no scale, the
       newest token left out) and the message names the one it equals.
       THE MECHANISM — on a request of S = 64 cached tokens with N = 8 heads, L = 16, P = 16, V = 8, R = 4:
       the latents are read through cache.latents (a cache that records its reads, and whose private storage
       the learner's code must not need); no new tensor of S × N × min(P, V) values or more is allocated (the
       decompressed keys or values of the cached tokens, or the latents copied per head: every op's output
       storage is recorded with a TorchDispatchMode); and the matrix products stay
       within twice the absorbed form's 2N(PL + S(L + R) + SL + LV) per request (counted per aten op), so
       re-making each cached token's key in a loop is caught too.

Mistakes the grader catches (planted in tests/graders/planted_ch10_mla.py and asserted caught):
  10.3 no_rope            the rope part of the scores (q_rope · k_rope) forgotten
       absorbed_scale     softmax scale (L + R)^-1/2, the width of the absorbed query, not (P + R)^-1/2
       nope_scale         softmax scale P^-1/2
       newest_missing     the newest token's latent left out of the scores
       kv_b_unsplit       W_UK, W_UV cut from kv_b_proj's weight without its transpose
       uv_before_sum      W_UV applied to every cached latent before the weighted sum (values decompressed)
       keys_decompressed  the cached latents up-projected to per-head keys (the naive form's keys)
       key_per_token      each cached token's key re-made in a loop (no big tensor, many FLOPs)
       uv_head0           every head's latent output through head 0's W_UV
"""
from __future__ import annotations

import pytest
import torch

from helpers import launch, load_impl
from helpers.launch import case
from tests.graders.planted import planted_tests

WHERE = "labs/mla.py: absorbed_decode_attention"


def make_layer(q_lora_rank=None, heads=4, kv_lora_rank=16, nope=16, rope=8, v=8, hidden=32, seed=0):
    """A given MLA layer in float64 with seeded weights (std chosen so scores spread over a few units)."""
    from helpers.course.mla import MLAConfig, MultiHeadLatentAttention
    torch.manual_seed(seed)
    config = MLAConfig(hidden_size=hidden, num_heads=heads, kv_lora_rank=kv_lora_rank, qk_nope_head_dim=nope,
                       qk_rope_head_dim=rope, v_head_dim=v, q_lora_rank=q_lora_rank)
    layer = MultiHeadLatentAttention(config).double()
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "layernorm" not in name:
                torch.nn.init.normal_(p, std=p.shape[-1] ** -0.5 * 1.5)
    return layer


def make_case(layer, lengths, dtype, cache_cls=None, seed=1):
    """Requests r0, r1, ... with lengths[b] cached tokens (the newest last); returns (layer in dtype, q_nope,
    q_rope, cache, seqs, want [B, N, V] float64 from the naive form)."""
    from helpers.course.mla import LatentKVCache
    c = layer.config
    g = torch.Generator().manual_seed(seed)
    cache = (cache_cls or LatentKVCache)(c.kv_lora_rank, c.qk_rope_head_dim, dtype)
    seqs, qn, qr, want = [], [], [], []
    with torch.no_grad():
        for b, n in enumerate(lengths):
            x = torch.randn(n, c.hidden_size, generator=g, dtype=torch.float64)
            pos = torch.arange(n)
            c_kv, k_rope = layer.latents(x, pos)
            q_nope, q_rope = layer.queries(x[-1:], pos[-1:])
            seq = f"r{b}"
            cache.append(seq, c_kv, k_rope)
            k, v = layer.expand_kv(c_kv, k_rope)
            scores = torch.einsum("nd,snd->ns", torch.cat([q_nope[0], q_rope[0]], -1), k) * c.softmax_scale
            want.append(torch.einsum("ns,snv->nv", torch.softmax(scores, -1), v))
            seqs.append(seq)
            qn.append(q_nope[0])
            qr.append(q_rope[0])
    return (layer.to(dtype), torch.stack(qn).to(dtype), torch.stack(qr).to(dtype), cache, seqs,
            torch.stack(want))


def _wrong_variants(layer, q_nope, q_rope, cache, seqs):
    """The usual wrong answers, computed by the grader in float64: {description: [B, N, V]}."""
    from helpers.course.mla import split_kv_b_proj
    c = layer.config
    W_UK, W_UV = (w.double() for w in split_kv_b_proj(layer))
    q_nope, q_rope = q_nope.double(), q_rope.double()
    P, R, L = c.qk_nope_head_dim, c.qk_rope_head_dim, c.kv_lora_rank

    def attention(scale, rope=True, drop_newest=False):
        out = []
        for b, seq in enumerate(seqs):
            c_kv, k_rope = (t.double() for t in cache.latents(seq))
            if drop_newest:
                c_kv, k_rope = c_kv[:-1], k_rope[:-1]
            if c_kv.shape[0] == 0:
                out.append(torch.zeros(c.num_heads, c.v_head_dim, dtype=torch.float64))
                continue
            s = torch.einsum("np,lnp,sl->ns", q_nope[b], W_UK, c_kv)
            if rope:
                s = s + q_rope[b] @ k_rope.T
            out.append(torch.einsum("ns,sl,lnv->nv", torch.softmax(s * scale, -1), c_kv, W_UV))
        return torch.stack(out)

    variants = {
        "without the rope part of the scores (q_rope · k_rope): the position term is missing":
            attention(c.softmax_scale, rope=False),
        f"with the softmax scale (L + R)^-1/2 = ({L}+{R})^-1/2 of the absorbed query: the scores are the same "
        f"numbers as the naive form's, so keep its scale (P + R)^-1/2": attention((L + R) ** -0.5),
        f"with the softmax scale P^-1/2 = {P}^-1/2: the rope dims count too, (P + R)^-1/2": attention(P ** -0.5),
        "without any softmax scale: multiply the scores by (P + R)^-1/2": attention(1.0),
        "without the newest token: the cache already holds its latent (appended before the call), attend to it":
            attention(c.softmax_scale, drop_newest=True),
    }
    return variants


def _compare(failures, what, got, want, dtype, factor, variants):
    from helpers.claims import max_abs_diff, tolerance
    if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(want.shape):
        shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
        failures.append(f"{WHERE} ({what}): returned {shape}, expected [B, N, V] = {tuple(want.shape)}")
        return False
    if got.dtype != dtype:
        failures.append(f"{WHERE} ({what}): returned {got.dtype}, expected the queries' dtype {dtype}")
        return False
    diff, tol = max_abs_diff(got, want), tolerance(want, dtype, factor)
    if diff <= tol:
        return True
    named = [d for d, v in variants.items() if max_abs_diff(got, v) <= tolerance(v, dtype, factor)]
    if named:
        failures.append(f"{WHERE} ({what}) differs from the naive attention (max |diff| {diff:.2e}); "
                        f"it equals the attention {named[0]}")
    else:
        b, n = divmod(int((got.double() - want).abs().amax(-1).argmax()), want.shape[1])
        failures.append(f"{WHERE} ({what}) differs from the naive attention (keys and values re-made by "
                        f"kv_b_proj): max |diff| {diff:.2e} > {tol:.1e} ({factor:g} eps × scale), worst at "
                        f"request {b}, head {n}")
    return False


def check_values(impl=None):
    """The numbers: several layers, dtypes and request lengths against the naive form."""
    impl = impl or load_impl("mla")
    failures = []
    for q_lora, heads, nope, v in ((None, 4, 16, 8), (24, 2, 8, 16)):
        for dtype in (torch.float64, torch.float32):
            lengths = (1, 5, 40)
            layer = make_layer(q_lora_rank=q_lora, heads=heads, nope=nope, v=v)
            layer, q_nope, q_rope, cache, seqs, want = make_case(layer, lengths, dtype)
            c = layer.config
            what = (f"{dtype}, q_lora_rank={q_lora}, N={heads}, P={nope}, V={v}, L={c.kv_lora_rank}, "
                    f"R={c.qk_rope_head_dim}, requests of {', '.join(map(str, lengths))} cached tokens")
            factor = 4 * (c.qk_nope_head_dim + c.kv_lora_rank + max(lengths))
            with case(what), torch.no_grad():
                got = impl.absorbed_decode_attention(layer, q_nope, q_rope, cache, seqs)
            if not _compare(failures, what, got, want, dtype, factor,
                            _wrong_variants(layer, q_nope, q_rope, cache, seqs)):
                return failures
    return failures


class _Reads:
    """A LatentKVCache that records which requests' latents were read and how many bytes that returned."""

    def __init__(self):
        from helpers.course.mla import LatentKVCache

        class RecordingCache(LatentKVCache):
            reads: dict = {}

            def latents(self, seq):
                c_kv, k_rope = super().latents(seq)
                self.reads[seq] = self.reads.get(seq, 0) + c_kv.nbytes + k_rope.nbytes
                return c_kv, k_rope
        self.cls = RecordingCache


def _matmul_flops(func, args, out) -> int:
    """FLOPs of one aten matrix product (2 per multiply-add); 0 for any other op. Counted here rather than with
    torch.utils.flop_counter, whose first use imports torch._dynamo (seconds on a busy machine)."""
    aten = torch.ops.aten
    name = func.overloadpacket
    shape = lambda t: tuple(t.shape)
    if name in (aten.mm, aten.addmm):
        a, b = args[-2], args[-1]
        return 2 * shape(a)[0] * shape(a)[1] * shape(b)[1]
    if name in (aten.bmm, aten.baddbmm):
        a, b = args[-2], args[-1]
        return 2 * shape(a)[0] * shape(a)[1] * shape(a)[2] * shape(b)[2]
    if name in (aten.mv, aten.addmv):
        a = args[-2]
        return 2 * shape(a)[0] * shape(a)[1]
    if name in (aten.dot, aten.vdot):
        return 2 * args[0].numel()
    if "scaled_dot_product" in str(name):
        q, k, v = args[:3]
        rows = q.numel() // q.shape[-1]
        return 2 * rows * k.shape[-2] * (q.shape[-1] + v.shape[-1])
    return 0


def _new_storages(fn):
    """Run fn() and return (result, [numel of every output storage an op allocated], matmul FLOPs)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    sizes, flops = [], [0]

    class Allocations(TorchDispatchMode):
        @classmethod
        def _should_skip_dynamo(cls):     # nothing here is compiled: do not import torch._dynamo (seconds)
            return False

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            flops[0] += _matmul_flops(func, args, out)
            inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                      if isinstance(t, torch.Tensor)}
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                    sizes.append(t.untyped_storage().nbytes() // max(1, t.element_size()))
            return out

    with Allocations():
        result = fn()
    return result, sizes, flops[0]


def check_mechanism(impl=None):
    """Only the latents are read; nothing of S × N × min(P, V) values is made; FLOPs of the absorbed form."""
    impl = impl or load_impl("mla")
    failures = []
    lengths = (64, 9)
    layer = make_layer(q_lora_rank=None, heads=8, kv_lora_rank=16, nope=16, rope=4, v=8)
    recorder = _Reads()
    layer, q_nope, q_rope, cache, seqs, want = make_case(layer, lengths, torch.float32, cache_cls=recorder.cls)
    c = layer.config
    N, P, R, V, L = c.num_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank
    what = f"float32, N={N}, P={P}, V={V}, L={L}, R={R}, requests of {lengths[0]} and {lengths[1]} cached tokens"
    recorder.cls.reads = {}
    with case(what), torch.no_grad():
        got, sizes, flops = _new_storages(lambda: impl.absorbed_decode_attention(layer, q_nope, q_rope, cache, seqs))
    read = dict(recorder.cls.reads)
    if not _compare(failures, what, got, want, torch.float32, 4 * (P + L + max(lengths)),
                    _wrong_variants(layer, q_nope, q_rope, cache, seqs)):
        return failures
    unread = [s for s in seqs if s not in read]
    if unread:
        failures.append(f"{WHERE}: the latents of {unread} were not read through cache.latents(seq): read the "
                        f"cache only through its method (its storage is private)")
        return failures
    S = max(lengths)
    limit = S * N * min(P, V)
    big = max(sizes, default=0)
    if big >= limit:
        failures.append(f"{WHERE}: a tensor of {big} values was made, as many as the decompressed keys or values of "
                        f"the {S} cached tokens (S × N × min(P, V) = {limit}): absorb W_UK into the query and "
                        f"apply W_UV after the weighted sum, and read the latents once for all heads, never "
                        f"re-made or copied per head")
        return failures
    absorbed = sum(2 * N * (P * L + s * (L + R) + s * L + L * V) for s in lengths)
    if flops > 2 * absorbed:
        naive_k = sum(2 * s * L * N * P for s in lengths)
        failures.append(f"{WHERE}: {flops} FLOPs of matrix products, more than twice the absorbed form's "
                        f"{absorbed} (re-making each cached token's key costs {naive_k} alone): the cached latents "
                        f"must not be up-projected, token by token or at once")
    return failures


CHECKS = {"values": check_values, "mechanism": check_mechanism}


def _run(rank, world_size, names, impl=None):
    """Run the named checks in this rank (learner code runs only here, never in the grading process)."""
    torch.set_num_threads(1)
    return [f for name in names for f in CHECKS[name](impl)]


def _graded(*names):
    failures = launch(_run, 1, list(names), show_output=False)[0]
    assert not failures, "\n".join(failures[:6])


@pytest.mark.exercise("10.3", "MLA absorbed decode attention")
def test_absorbed_decode_equals_naive():
    _graded("values")


@pytest.mark.exercise("10.3", "MLA absorbed decode attention")
def test_absorbed_decode_reads_only_latents():
    _graded("mechanism")


# ------------------------------------------------------------- planted wrong answers (not an exercise)

planted_results, test_planted_mistakes_are_caught, test_valid_alternatives_pass, test_reference_passes_every_check = \
    planted_tests("planted_ch10_mla", CHECKS, "solutions.mla")
