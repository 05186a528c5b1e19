"""Chapter 10 given code: DeepSeek's serving layout, attention data-parallel and MoE expert-parallel on the same
ranks ("DP attention + EP"), beside the tensor-parallel layout it replaces, on a tiny MLA + MoE model.

Why: MLA caches ONE latent head per token (helpers/course/mla.py). Tensor parallelism splits attention by heads,
but the latent is shared by all heads, so every TP rank must keep the whole latent cache of every request (vLLM
gives MLA's cache spec max_tp_shards=1: TP ranks beyond it hold replicas; vllm/v1/kv_cache_interface.py,
vllm/model_executor/layers/attention/mla_attention.py get_kv_cache_spec). With attention data-parallel each rank
runs the whole attention for ITS OWN requests and keeps only their latents: per-rank KV shrinks by the DP degree.
The MoE layers stay expert-parallel across the same ranks (chapter 8: a token's rows go to the ranks holding its
experts with all_to_all; here helpers/course/moe.py's PerRankAllToAllMoE, DeepEP's normal mode).

The catch: the MoE all_to_all needs EVERY rank at every step. A DP rank with no request must still run a forward
so that its peers' collectives complete. vLLM's DPEngineCoreProc.run_busy_loop (vllm/v1/engine/core.py) does
this: when it has nothing scheduled but the DP group still has unfinished requests it calls execute_dummy_batch
(gpu_worker.py: model_runner._dummy_run(1 token, uniform_decode=True)), and every step all ranks agree whether
any rank still has work with one all_reduce (ParallelConfig.sync_dp_state in vllm/config/parallel.py,
_has_global_unfinished_reqs); the DP coordinator (vllm/v1/engine/coordinator.py) wakes idle engines for a new
"request wave". `generate_dp(..., dummy_batch=False)` leaves the dummy out: the idle rank reaches the agreement
all_reduce while its peers wait in the MoE all_to_all, and the job hangs (the launcher's timeout catches it).

    model = tiny_mla_moe_model()                                   # same seed on every rank: same weights
    out = launch(generate_dp, 4, requests, assignment)            # DP attention + EP MoE
    out = launch(generate_tp, 4, requests)                        # TP attention + TP MoE, latents replicated
    ref = generate_single(model, requests)                        # one process, every request
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from helpers.course.eplb import mixtral_route
from helpers.course.mla import LatentKVCache, MLAConfig, MultiHeadLatentAttention, RMSNorm
from helpers.course.moe import MoEBlock, PerRankAllToAllMoE, TensorParallelMoE

__all__ = ["Request", "TinyMLAMoEModel", "tiny_mla_moe_model", "dropless_route", "TensorParallelMLA",
           "generate_single", "generate_dp", "generate_tp", "EXAMPLE_REQUESTS"]


@dataclass(frozen=True)
class Request:
    """A request: its id, prompt token ids and how many tokens to generate (greedy)."""
    seq: str
    prompt: tuple
    max_new_tokens: int


# Six requests of different lengths; the ranks they go to are chosen by the caller.
EXAMPLE_REQUESTS = [Request(f"req{i}", tuple((7 * i + 3 * j + 1) % 64 for j in range(3 + 2 * i)), 4 + i % 3)
                    for i in range(6)]


# Mixtral's top-k routing without a capacity limit (exercise 8.1's rule, given so that this layout does not depend
# on the learner's answer): softmax over all experts, top_k kept, renormalised to sum to 1 — eplb's, the same rule.
dropless_route = mixtral_route


class DecoderLayer(nn.Module):
    """x + MLA(norm(x)), then x + MoE(norm(x)): DeepSeek-V3's layer without shared experts."""

    def __init__(self, mla: MLAConfig, num_experts: int, top_k: int, ffn: int):
        super().__init__()
        self.attn_norm, self.moe_norm = RMSNorm(mla.hidden_size), RMSNorm(mla.hidden_size)
        self.attn = MultiHeadLatentAttention(mla)
        self.moe = MoEBlock(mla.hidden_size, ffn, num_experts, top_k)


class TinyMLAMoEModel(nn.Module):
    """Embedding, `layers` × (MLA attention, MoE), final norm, LM head. `step` runs one engine step for a batch of
    requests, each with its own new tokens; attention goes request by request on its own cache, the MoE runs
    once on all the batch's rows (the moe callables decide how: one process, EP, TP)."""

    def __init__(self, vocab: int, mla: MLAConfig, layers: int, num_experts: int, top_k: int, ffn: int):
        super().__init__()
        self.mla_config = mla
        self.embed = nn.Embedding(vocab, mla.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(mla, num_experts, top_k, ffn) for _ in range(layers))
        self.norm = RMSNorm(mla.hidden_size)
        self.lm_head = nn.Linear(mla.hidden_size, vocab, bias=False)

    def new_caches(self) -> list:
        """One latent cache per layer."""
        c = self.mla_config
        return [LatentKVCache(c.kv_lora_rank, c.qk_rope_head_dim) for _ in self.layers]

    def step(self, batch: list, caches: list | None, attentions: list, moes: list) -> torch.Tensor:
        """batch: [(seq, token ids [T], first position)] -> logits of each request's last new token [B, vocab].
        caches None: attend only to the new tokens, write nothing (a dummy batch). attentions[i], moes[i]: how
        layer i's attention (x, positions, cache, seq) and MoE (x) run."""
        hs = [self.embed(torch.as_tensor(ids)) for _, ids, _ in batch]
        sizes = [h.shape[0] for h in hs]
        for i, layer in enumerate(self.layers):
            for b, (seq, ids, start) in enumerate(batch):
                positions = torch.arange(start, start + len(ids))
                cache = caches[i] if caches is not None else None
                hs[b] = hs[b] + attentions[i](layer.attn_norm(hs[b]), positions, cache, seq)
            x = torch.cat(hs) if hs else torch.zeros(0, self.mla_config.hidden_size)
            x = x + moes[i](layer.moe_norm(x))
            hs = list(x.split(sizes))
        return self.lm_head(self.norm(torch.stack([h[-1] for h in hs]))) if hs else torch.zeros(0)


def tiny_mla_moe_model(seed: int = 0, vocab: int = 64, hidden: int = 32, layers: int = 2, heads: int = 4,
                       kv_lora_rank: int = 16, num_experts: int = 8, top_k: int = 2) -> TinyMLAMoEModel:
    """The chapter's tiny DeepSeek-style model (random weights from `seed`, no download)."""
    mla = MLAConfig(hidden_size=hidden, num_heads=heads, kv_lora_rank=kv_lora_rank, qk_nope_head_dim=8,
                    qk_rope_head_dim=8, v_head_dim=8, q_lora_rank=None)
    torch.manual_seed(seed)
    model = TinyMLAMoEModel(vocab, mla, layers, num_experts, top_k, ffn=2 * hidden).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                nn.init.normal_(p, std=p.shape[-1] ** -0.5 * (2.0 if "embed" in name or "lm_head" in name else 1.0))
    return model


def _local_moe(block: MoEBlock):
    return lambda x: block(x, dropless_route(block.router(x), block.top_k))


def _run_requests(model, requests, attentions, moes, caches, dummy_batch=True, sync_group=None, stats=None):
    """The engine loop of one DP rank (vLLM's DPEngineCoreProc.run_busy_loop, reduced): step this rank's
    requests (prefill first, then one token each), run a dummy batch when it has none but its peers do, and agree
    every step with one all_reduce whether any rank still has work. Greedy tokens {seq: [ids]}."""
    tokens = {r.seq: [] for r in requests}
    logits_seen = {r.seq: [] for r in requests}
    stats = stats if stats is not None else {}
    stats.setdefault("steps", 0)
    stats.setdefault("dummy_batches", 0)
    while True:
        live = [r for r in requests if len(tokens[r.seq]) < r.max_new_tokens]
        if sync_group is not False and dist.is_initialized():
            # vLLM's sync_dp_state: SUM of "I have unfinished requests" over the DP group
            flag = torch.tensor([int(bool(live))], dtype=torch.int32)
            dist.all_reduce(flag, group=sync_group)
            anyone = int(flag) > 0
        else:
            anyone = bool(live)
        if not anyone:
            return tokens, logits_seen, stats
        stats["steps"] += 1
        if live:
            batch = [(r.seq, list(r.prompt) if not tokens[r.seq] else tokens[r.seq][-1:],
                      0 if not tokens[r.seq] else len(r.prompt) + len(tokens[r.seq]) - 1) for r in live]
            with torch.no_grad():
                logits = model.step(batch, caches, attentions, moes)
            for r, row in zip(live, logits):
                tokens[r.seq].append(int(row.argmax()))
                logits_seen[r.seq].append(row)
        elif dummy_batch:
            # execute_dummy_batch: one token through every layer (its collectives included), nothing cached
            stats["dummy_batches"] += 1
            with torch.no_grad():
                model.step([("dummy", [0], 0)], None, attentions, moes)


def generate_single(model: TinyMLAMoEModel, requests: list) -> dict:
    """One process runs every request: {"tokens": {seq: ids}, "logits": {seq: [steps, vocab]}, "kv_bytes"}."""
    caches = model.new_caches()
    attentions = [layer.attn for layer in model.layers]
    moes = [_local_moe(layer.moe) for layer in model.layers]
    tokens, logits, _ = _run_requests(model, requests, attentions, moes, caches, sync_group=False)
    return {"tokens": tokens, "logits": {s: torch.stack(v) for s, v in logits.items()},
            "kv_bytes": sum(c.nbytes() for c in caches)}


def generate_dp(rank: int, world_size: int, requests: list, assignment: dict, dummy_batch: bool = True,
                seed: int = 0) -> dict:
    """Worker: attention data-parallel (this rank runs the requests `assignment` maps to it, on its own latent
    caches), MoE expert-parallel over all ranks (PerRankAllToAllMoE). dummy_batch=False leaves out vLLM's
    dummy forward of an idle rank. Returns {"tokens", "logits", "kv_bytes", "requests", "experts", "steps",
    "dummy_batches"}."""
    model = tiny_mla_moe_model(seed)
    mine = [r for r in requests if assignment[r.seq] == rank]
    caches = model.new_caches()
    attentions = [layer.attn for layer in model.layers]
    eps = [PerRankAllToAllMoE(layer.moe) for layer in model.layers]
    moes = [lambda x, ep=ep, block=layer.moe: ep(x, dropless_route(block.router(x), block.top_k))
            for ep, layer in zip(eps, model.layers)]
    tokens, logits, stats = _run_requests(model, mine, attentions, moes, caches, dummy_batch=dummy_batch)
    return {"tokens": tokens, "logits": {s: torch.stack(v) for s, v in logits.items()},
            "kv_bytes": sum(c.nbytes() for c in caches), "requests": [r.seq for r in mine],
            "experts": list(range(eps[0].first_expert, eps[0].first_expert + eps[0].experts_per_rank)), **stats}


class TensorParallelMLA(nn.Module):
    """MLA split by heads over the ranks of `group` (Megatron's attention split): this rank's heads' rows of
    q_proj (q_b_proj) and kv_b_proj, their columns of o_proj, the partial outputs summed by one all_reduce.
    kv_a_proj_with_mqa cannot be split (its latent serves every head), so every rank computes and caches the
    WHOLE latent of every request: the cache is replicated, not sharded."""

    def __init__(self, full: MultiHeadLatentAttention, group=None):
        super().__init__()
        self.group = group
        rank, n = dist.get_rank(group), dist.get_world_size(group)
        c = full.config
        if c.num_heads % n:
            raise ValueError(f"num_heads={c.num_heads} is not divisible by the TP degree {n}")
        per = c.num_heads // n
        heads = slice(rank * per, (rank + 1) * per)
        local = MLAConfig(**{**c.__dict__, "num_heads": per})
        self.part = MultiHeadLatentAttention(local)
        q_rows = c.qk_head_dim
        kv_rows = c.qk_nope_head_dim + c.v_head_dim
        with torch.no_grad():
            for name, p in self.part.named_parameters():
                w = dict(full.named_parameters())[name]
                if name in ("q_proj.weight", "q_b_proj.weight"):
                    p.copy_(w.view(c.num_heads, q_rows, -1)[heads].reshape(p.shape))
                elif name == "kv_b_proj.weight":
                    p.copy_(w.view(c.num_heads, kv_rows, -1)[heads].reshape(p.shape))
                elif name == "o_proj.weight":
                    p.copy_(w.view(w.shape[0], c.num_heads, c.v_head_dim)[:, heads].reshape(p.shape))
                else:
                    p.copy_(w)          # q_a_proj, norms, kv_a_proj_with_mqa: replicated

    def forward(self, x, positions, cache=None, seq=None):
        from helpers.course.tp_regions import reduce_from_tensor_model_parallel_region
        return reduce_from_tensor_model_parallel_region(self.part(x, positions, cache, seq), self.group)


def generate_tp(rank: int, world_size: int, requests: list, seed: int = 0) -> dict:
    """Worker: the tensor-parallel layout — attention split by heads (TensorParallelMLA), the MoE by ffn columns
    (TensorParallelMoE), every rank sees every request and caches every request's latents."""
    model = tiny_mla_moe_model(seed)
    caches = model.new_caches()
    attentions = [TensorParallelMLA(layer.attn) for layer in model.layers]
    tps = [TensorParallelMoE(layer.moe) for layer in model.layers]
    moes = [lambda x, tp=tp, block=layer.moe: tp(x, dropless_route(block.router(x), block.top_k))
            for tp, layer in zip(tps, model.layers)]
    tokens, logits, stats = _run_requests(model, requests, attentions, moes, caches)
    return {"tokens": tokens, "logits": {s: torch.stack(v) for s, v in logits.items()},
            "kv_bytes": sum(c.nbytes() for c in caches), **stats}
