"""The course's tiny Llama on a paged KV cache: the engine's model runner (chapter 7).

    from helpers.course.paged_llama import PagedLlamaRunner, generate_paged

    new_ids = generate_paged([encode(PROMPT), encode("We hold these truths")], max_new_tokens=20)
    # -> two lists of 20 ids, the same as helpers.course.tiny_llama.generate gives for each prompt alone

    runner = PagedLlamaRunner(num_blocks=32, block_size=16, prefix_caching=True)
    new_ids = runner.generate(prompts, max_new_tokens=20)   # served by helpers/course/engine on this runner
    runner.stats            # {"prefill_tokens": computed, "cached_tokens": found in the prefix cache,
                            #  "preemptions", "peak_blocks_used", "peak_running": the largest decode batch, ...}
    runner.manager          # the block manager (exercise 7.1, or 7.3 with prefix_caching=True)
    runner.pool             # the KV pools (helpers/course/kv_cache.py)

The model is helpers.course.tiny_llama's, with its own weights: this file only re-does the forward pass so
that keys and values go to, and come from, the pools through each sequence's block table instead of
transformers' contiguous cache. The layers' own weights do the rest (RMSNorm, the q/k/v/o projections,
rotary embedding, the SwiGLU MLP, lm_head), so the logits equal transformers' within rounding
(`check_against_transformers`). As in vLLM's Llama, q, k and v are projected by ONE matmul of their stacked
weights and gate and up by another (`_fused`), and what is the same for every layer of a step (the slot mapping,
the rotary cos/sin) is built once per step: `python -m helpers.bench engine_decode` times the decode.

One forward per engine step, as vLLM's model runner does (`forward_batch`): the step's tokens — prompt chunks and
decodes of several sequences — are embedded, projected and run through the MLP together; in every layer each
sequence's new keys and values are written into its blocks first, then each sequence attends over its own
blocks: the step's decodes (one token each) all in one call of `paged_attention` (exercise 7.2, vLLM's batched
paged-attention kernel), a chunk causally over its positions. Which blocks a sequence holds is not decided
here: the engine's KV cache manager (helpers/course/engine/kv_cache_manager.py) allocates them with the block
manager (exercise 7.1, or 7.3 with prefix caching) before the step. `prefill(seq_id, token_ids, start)` and
`decode(seq_ids, token_ids)` are the same forward for one chunk or one batched decode step, for the graders and
the recipes below; `generate` serves prompts with the engine (vLLM V1's scheduling, preemption by recomputation
when blocks run out) on this runner.

Recipes for the notebook (each prints evidence a verdict can check; token ids and counts are exact, logits
within `helpers.claims.tolerance`):

    from helpers.claims import check_close, verdict
    runner = PagedLlamaRunner(num_blocks=16, block_size=16)
    got, want = check_against_transformers(runner, encode(PROMPT), split=12)     # chunked prefill + 1 decode
    check_close("paged logits vs transformers'", got, want)
    runner.manager.block_table(seq_id), runner.manager.num_free_blocks           # who holds which block
    runner.pool.bytes_per_block, runner.pool.bytes_per_token                     # 65,536 B and 4,096 B
    runner = PagedLlamaRunner(num_blocks=7, block_size=8); runner.generate(prompts, 12)
    runner.stats["preemptions"], runner.stats["peak_running"]                    # a small pool preempts, same ids
    plot_block_tables(runner.manager)                                            # block tables -> the pool

`block_owners(manager)` lists, per block id, the sequences holding it (several for a shared prefix block) or
"cached" / "free": the data for a picture of the pool (`plot_block_tables`).

`python -m helpers.bench paged_kv` prints the chapter's figures (bytes padded vs paged, sequences that fit
a budget, TTFT with and without prefix caching at a 90 % shared prefix).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from helpers.course.kv_cache import KVPool, OutOfBlocks
from helpers.impl import load_impl

__all__ = ["PagedLlamaRunner", "generate_paged", "check_against_transformers", "block_owners", "plot_block_tables"]


class PagedLlamaRunner:
    """The tiny Llama's forward through a KVPool, driven by a block manager (exercises 7.1-7.3).

    model: a transformers LlamaForCausalLM (default: helpers.course.tiny_llama.load_model()), whole or sharded by
        chapter 2's `shard_llama` on a tensor-parallel rank. The heads this rank computes are read off its
        projections, so a sharded rank's pool holds only its own KV heads: the KV cache is split by heads
        across the TP ranks, as in vLLM, and every rank's block tables are the same.
    num_blocks, block_size: the size of the pool; the pool holds num_blocks × block_size tokens in all.
    prefix_caching: use PrefixCachingBlockManager (labs/prefix_cache.py) instead of BlockManager.
    """

    def __init__(self, model=None, num_blocks: int = 64, block_size: int = 16, prefix_caching: bool = False):
        if model is None:
            from helpers.course.tiny_llama import load_model
            model = load_model()
        self.model = model
        config = model.config
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        attention = model.model.layers[0].self_attn
        self.heads = attention.q_proj.weight.shape[0] // self.head_dim        # this rank's (all, unsharded)
        self.kv_heads = attention.k_proj.weight.shape[0] // self.head_dim
        self.max_positions = config.max_position_embeddings
        self.pool = KVPool(config.num_hidden_layers, num_blocks, block_size, self.kv_heads, self.head_dim,
                           dtype=next(model.parameters()).dtype)
        self.paged = load_impl("paged_kv_cache")
        self.prefix_caching = prefix_caching
        if prefix_caching:
            self.manager = load_impl("prefix_cache").PrefixCachingBlockManager(num_blocks, block_size)
        else:
            self.manager = self.paged.BlockManager(num_blocks, block_size)
        self.stats = {"prefill_tokens": 0, "cached_tokens": 0, "decode_tokens": 0, "decode_steps": 0,
                      "preemptions": 0, "peak_blocks_used": 0, "peak_running": 0}
        self._fused_cache: dict = {}            # layer index -> (source weights, their versions, fused weights)
        self._rotary_table = None               # (cos, sin) of every position, [max_positions, head_dim] each

    # ------------------------------------------------------------------------------ the forward passes
    def _fused(self, index: int, layer):
        """(qkv, gate_up) of layer `index`: q/k/v's weights in ONE matrix [(heads + 2 kv_heads) × head_dim, hidden]
        and gate/up's in one [2 × intermediate, hidden], so that a layer makes two matmuls where it made five, as
        vLLM's Llama does (vllm/model_executor/models/llama.py: `qkv_proj`, a QKVParallelLinear, and `gate_up_proj`,
        a MergedColumnParallelLinear, loaded from q/k/v_proj and gate/up_proj by `stacked_params_mapping`).
        Built on first use and again whenever one of those weights is replaced or changed in place (its version);
        None when the projections are not plain nn.Linear without hooks (chapter 2's sharded layers): they then run
        one by one, as modules."""
        attn, mlp = layer.self_attn, layer.mlp
        parts = (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj)
        weights = tuple(p.weight for p in parts)
        versions = tuple(w._version for w in weights)
        held = self._fused_cache.get(index)
        if held is not None and all(a is b for a, b in zip(held[0], weights)) and held[1] == versions:
            return held[2]
        fused = None
        if all(_plain_linear(p) and p.bias is None for p in parts):
            fused = (torch.cat(weights[:3]), torch.cat(weights[3:]))
        self._fused_cache[index] = (weights, versions, fused)
        return fused

    def _rotary(self, x: torch.Tensor, positions: list):
        """(cos, sin) of the tokens' positions, [T, 1, head_dim] each, sin with its first half negated (see
        _project_qkv). Llama's default rotary embedding depends on the position alone, so its table over every
        position is computed once, by the model's own rotary_emb, and read by index (vLLM's RotaryEmbedding keeps
        a `cos_sin_cache` the same way); other rope types are computed per step."""
        rotary, half = self.model.model.rotary_emb, self.head_dim // 2
        if getattr(rotary, "rope_type", "default") != "default":
            cos, sin = rotary(x, torch.tensor([positions]))
            return cos[0, :, None], torch.cat((-sin[0, :, :half], sin[0, :, half:]), dim=-1)[:, None]
        if self._rotary_table is None:
            cos, sin = rotary(x, torch.arange(self.max_positions)[None])
            self._rotary_table = (cos[0], torch.cat((-sin[0, :, :half], sin[0, :, half:]), dim=-1))
        cos, sin = self._rotary_table                                            # [max_positions, head_dim]
        at = torch.tensor(positions)
        return cos[at, None], sin[at, None]

    def _project_qkv(self, layer, fused, x: torch.Tensor, rotary):
        """x: [T, hidden] (the residual stream) -> q [T, heads, head_dim], k, v [T, kv_heads, head_dim]: the input
        RMSNorm, the q/k/v projections (one matmul, fused = self._fused(...)) and the rotary embedding, on q and k
        at once. transformers' apply_rotary_pos_emb computes x·cos + rotate_half(x)·sin, rotate_half(x) =
        (-x2, x1) for the halves x1, x2 of head_dim; here (x2, x1)·(-sin1, sin2), the same products."""
        tokens, heads, kv_heads = x.shape[0], self.heads, self.kv_heads
        h = _rms_norm(layer.input_layernorm, x)
        if fused is not None:
            qkv = F.linear(h, fused[0]).view(tokens, heads + 2 * kv_heads, self.head_dim)
            qk, v = qkv[:, :heads + kv_heads], qkv[:, heads + kv_heads:]
        else:
            attn = layer.self_attn
            qk = torch.cat([attn.q_proj(h).view(tokens, heads, self.head_dim),
                            attn.k_proj(h).view(tokens, kv_heads, self.head_dim)], dim=1)
            v = attn.v_proj(h).view(tokens, kv_heads, self.head_dim)
        cos, sin = rotary
        qk = qk * cos + qk.roll(self.head_dim // 2, dims=-1) * sin
        return qk[:, :heads], qk[:, heads:], v

    def _finish_layer(self, layer, fused, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """Residual adds around attention's output projection and the SwiGLU MLP (gate and up: one matmul when
        fused is not None). attn_out: [T, heads × head_dim]."""
        x = x + _linear(layer.self_attn.o_proj, attn_out)
        h, mlp = _rms_norm(layer.post_attention_layernorm, x), layer.mlp
        if fused is None:
            return x + mlp(h)
        gate, up = F.linear(h, fused[1]).chunk(2, dim=-1)
        return x + _linear(mlp.down_proj, mlp.act_fn(gate) * up)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return _linear(self.model.lm_head, _rms_norm(self.model.model.norm, x))

    @torch.inference_mode()
    def forward_batch(self, batch, all_logits: bool = False) -> torch.Tensor:
        """ONE forward over several sequences' new tokens, as vLLM's model runner does for a scheduled step:
        batch = [(seq_id, token_ids, start), ...], the tokens of positions start .. start+len-1 of each (a prompt
        chunk, or the one token of a decode). Their blocks must already hold those positions (the KV cache manager
        allocated them). The projections and the MLP run on all tokens at once; in every layer each sequence's new
        keys and values are written to the pool FIRST, then each sequence attends over its own blocks: all the
        decodes (one token each) in ONE call of `paged_attention` (exercise 7.2, vLLM's batched kernel: a query
        per sequence, their block tables and lengths), each chunk with causal attention over its positions
        0 .. end-1 read back from the pool. Returns the logits of each sequence's last token [len(batch), vocab]
        (all_logits: of every token, [total tokens, vocab]).

        What depends only on the step, not on the layer, is built once before the layers, as vLLM's model runner
        prepares a step's inputs (vllm/v1/worker/gpu_model_runner.py `_prepare_inputs`): the positions, the slot
        mapping (each new token's row in the pool, block × block_size + offset: vllm/v1/worker/block_table.py
        `compute_slot_mapping`), the rotary cos/sin, the decodes' block tables and lengths. It runs under
        torch.inference_mode, as vLLM's `execute_model` does (no autograd bookkeeping on any tensor); the logits
        returned are an ordinary tensor, which a caller may change in place."""
        size = self.pool.block_size
        token_ids, positions, slots, items = [], [], [], []
        for seq_id, ids, start in batch:
            ids = [int(t) for t in ids]
            if not ids or start < 0:
                raise ValueError(f"sequence {seq_id!r}: a step computes at least one token from start >= 0")
            table = self.manager.block_table(seq_id)
            end = start + len(ids)
            if end > len(table) * size:
                raise ValueError(f"sequence {seq_id!r}: positions up to {end - 1} but its block table holds "
                                 f"{len(table)} blocks of {size}: allocate first")
            items.append((len(token_ids), len(ids), start, table))      # its first row in x, tokens, start, table
            token_ids += ids
            positions += range(start, end)
            slots += [table[p // size] * size + p % size for p in range(start, end)]
        slots = torch.tensor(slots)                                     # the slot mapping: rows of the flat pool
        x = _embed(self.model.model.embed_tokens, torch.tensor(token_ids))        # [T, hidden]
        group = self.heads // self.kv_heads
        decodes = [(row, start + 1, table) for row, n, start, table in items if n == 1]
        decode_tables = [table for _, _, table in decodes]
        decode_lens = [length for _, length, _ in decodes]
        chunks = [(row, n, start, table) for row, n, start, table in items if n > 1]
        rotary = self._rotary(x, positions)                             # cos, sin: once per step
        for index, layer in enumerate(self.model.model.layers):
            fused = self._fused(index, layer)                                    # qkv and gate_up weights
            q, k, v = self._project_qkv(layer, fused, x, rotary)
            k_pool, v_pool = self.pool.k[index], self.pool.v[index]
            k_pool.view(-1, self.kv_heads, self.head_dim).index_copy_(0, slots, k.to(self.pool.dtype))
            v_pool.view(-1, self.kv_heads, self.head_dim).index_copy_(0, slots, v.to(self.pool.dtype))
            if not chunks:                                                       # a decode step: every row
                out = self.paged.paged_attention(q, k_pool, v_pool, decode_tables, decode_lens)   # ONE call
            else:
                out = torch.empty_like(q)                                        # [T, heads, head_dim]
                if decodes:                                                      # ONE call for every decode
                    decode_rows = torch.tensor([row for row, _, _ in decodes])
                    out[decode_rows] = self.paged.paged_attention(q[decode_rows], k_pool, v_pool, decode_tables,
                                                                  decode_lens)
            for row, n, start, table in chunks:
                end = start + n
                keys, values = self.pool.gather(index, table, end)              # [end, kv_heads, head_dim]
                keys = keys.repeat_interleave(group, dim=1)                     # query head h reads h // group
                values = values.repeat_interleave(group, dim=1)
                scores = torch.einsum("thd,shd->hts", q[row:row + n], keys) / math.sqrt(self.head_dim)
                future = torch.arange(end)[None, :] > torch.arange(start, end)[:, None]
                probs = torch.softmax(scores.masked_fill(future, float("-inf")).float(), dim=-1).to(q.dtype)
                out[row:row + n] = torch.einsum("hts,shd->thd", probs, values)
            x = self._finish_layer(layer, fused, x, out.reshape(x.shape[0], -1))
        self._note_usage()
        if not all_logits and len(items) < x.shape[0]:                  # a prompt chunk: only its last row
            x = x[torch.tensor([row + n - 1 for row, n, _, _ in items])]
        logits = self._logits(x)
        with torch.inference_mode(False):
            return logits.clone()                                       # an ordinary tensor, not an inference one

    @torch.no_grad()
    def prefill(self, seq_id, token_ids, start: int = 0) -> torch.Tensor:
        """Compute positions start .. len(token_ids)-1 of `seq_id` (whose blocks hold all of token_ids already:
        allocate first). Positions < start must already be in the pool. Returns logits [len - start, vocab]."""
        token_ids = [int(t) for t in token_ids]
        end = len(token_ids)
        if not 0 <= start < end:
            raise ValueError(f"start={start} must be in [0, {end}): prefill computes at least one position")
        logits = self.forward_batch([(seq_id, token_ids[start:], start)], all_logits=True)
        self.stats["prefill_tokens"] += end - start
        return logits

    @torch.no_grad()
    def decode(self, seq_ids, token_ids) -> torch.Tensor:
        """One step: token_ids[i] is the next token of seq_ids[i] (all different sequences). Each gets a slot
        (manager.append_slot); returns logits [len(seq_ids), vocab]. Raises OutOfBlocks, before changing
        anything, when the sequences need more new blocks than are free (the caller preempts one first)."""
        seq_ids, token_ids = list(seq_ids), [int(t) for t in token_ids]
        if len(seq_ids) != len(token_ids) or len(set(seq_ids)) != len(seq_ids):
            raise ValueError("decode needs one token for each of distinct sequences")
        needed = self.blocks_for_next_step(seq_ids)
        if needed > self.manager.num_free_blocks:
            raise OutOfBlocks(f"a decode step of {len(seq_ids)} sequences needs {needed} new blocks, "
                              f"{self.manager.num_free_blocks} are free: preempt a sequence first")
        slots = [self.manager.append_slot(s) for s in seq_ids]
        tables = [self.manager.block_table(s) for s in seq_ids]
        lengths = [self.manager.seq_len(s) for s in seq_ids]
        for s, (block, offset), table, length in zip(seq_ids, slots, tables, lengths):
            if table[(length - 1) // self.pool.block_size] != block or (length - 1) % self.pool.block_size != offset:
                raise AssertionError(f"append_slot({s!r}) returned (block {block}, offset {offset}) but position "
                                     f"{length - 1} of its block table {table} is elsewhere (labs/paged_kv_cache.py)")
        logits = self.forward_batch([(s, [t], length - 1) for s, t, length in zip(seq_ids, token_ids, lengths)])
        self.stats["decode_tokens"] += len(seq_ids)
        self.stats["decode_steps"] += 1
        return logits

    def blocks_for_next_step(self, seq_ids) -> int:
        """How many new blocks one decode step of these sequences takes (those whose last block is full)."""
        size = self.pool.block_size
        return sum(self.manager.seq_len(s) == len(self.manager.block_table(s)) * size for s in seq_ids)

    def _note_usage(self):
        used = self.manager.num_blocks - self.manager.num_free_blocks
        self.stats["peak_blocks_used"] = max(self.stats["peak_blocks_used"], used)

    # ------------------------------------------------------------------------------ requests
    def allocate(self, seq_id, token_ids) -> int:
        """Give a new sequence the blocks for `token_ids` (OutOfBlocks if they do not fit; nothing changes then).
        Returns how many of its first tokens the prefix cache already holds (0 without prefix caching): the
        prefill starts there."""
        token_ids = [int(t) for t in token_ids]
        if len(token_ids) > self.max_positions:
            raise ValueError(f"{len(token_ids)} tokens exceed max_position_embeddings={self.max_positions}")
        if self.prefix_caching:
            cached = self.manager.allocate(seq_id, token_ids)
        else:
            self.manager.allocate(seq_id, len(token_ids))
            cached = 0
        self.stats["cached_tokens"] += cached
        return cached

    def free(self, seq_id) -> None:
        self.manager.free(seq_id)

    def generate(self, prompts, max_new_tokens: int, max_num_batched_tokens: int | None = None) -> list[list[int]]:
        """Greedy continuation of every prompt (lists of ids), served by the course's engine on this paged cache
        (helpers/course/engine: vLLM V1's scheduling, preemption by recomputation when blocks run out); returns
        the new ids of each prompt, in the order given. max_num_batched_tokens: the step's token budget (default:
        every prompt whole). `stats` gains the run's prefill/decode tokens, cached tokens, preemptions and the
        largest decode batch."""
        from helpers.course.engine import KVCacheManager, LLMEngine, PagedRunner, Request, SchedulerConfig, \
            run_requests
        prompts = [[int(t) for t in p] for p in prompts]
        for i, p in enumerate(prompts):
            if not p or len(p) + max_new_tokens > self.max_positions:
                raise ValueError(f"prompt {i}: {len(p)} tokens + max_new_tokens={max_new_tokens} must be in "
                                 f"[1, max_position_embeddings={self.max_positions}]")
        kv = KVCacheManager(self.manager.num_blocks, self.pool.block_size, self.prefix_caching,
                            block_manager=self.manager)
        budget = max_num_batched_tokens or max(2048, max(len(p) for p in prompts) + max_new_tokens)
        engine = LLMEngine(PagedRunner(self), kv, SchedulerConfig(max_num_batched_tokens=budget))
        requests = [Request(i, p, max_new_tokens, arrival=0.0) for i, p in enumerate(prompts)]
        try:
            run_requests(engine, requests)
        except RuntimeError as e:
            if "OutOfBlocks" in str(e):
                raise OutOfBlocks(str(e)) from None
            raise
        steps = engine.steps
        self.stats["prefill_tokens"] += sum(step.prefill_tokens for step in steps)
        self.stats["decode_tokens"] += sum(len(step.decodes) for step in steps)
        self.stats["decode_steps"] += sum(1 for step in steps if step.decodes)
        self.stats["cached_tokens"] += kv.stats.hits + kv.stats.preempted_hits
        self.stats["preemptions"] += engine.scheduler.num_preemptions
        self.stats["peak_running"] = max([self.stats["peak_running"]] + [len(step.decodes) for step in steps])
        self.last_engine = engine
        return [r.tokens for r in requests]


def _plain_linear(module) -> bool:
    """A torch.nn.Linear itself (not a subclass such as chapter 2's parallel layers) with no hooks: its weight can
    be used directly."""
    return type(module) is torch.nn.Linear and not (module._forward_hooks or module._forward_pre_hooks)


def _linear(module, x: torch.Tensor) -> torch.Tensor:
    """module(x), without nn.Module's call overhead when module is a plain nn.Linear."""
    return F.linear(x, module.weight, module.bias) if _plain_linear(module) else module(x)


def _embed(module, ids: torch.Tensor) -> torch.Tensor:
    """module(ids), without nn.Module's call overhead when module is a plain nn.Embedding."""
    if type(module) is torch.nn.Embedding and module.max_norm is None and not (module._forward_hooks or
                                                                              module._forward_pre_hooks):
        return F.embedding(ids, module.weight, module.padding_idx)
    return module(ids)


def _rms_norm(module, x: torch.Tensor) -> torch.Tensor:
    """module(x) for transformers' LlamaRMSNorm as one call of torch's rms_norm (the same numbers: float32 in, the
    mean of squares, rsqrt, times the weight); any other norm module is called."""
    if type(module).__name__ == "LlamaRMSNorm" and x.dtype == torch.float32 and not module._forward_hooks:
        return F.rms_norm(x, module.weight.shape, module.weight, module.variance_epsilon)
    return module(x)


def generate_paged(prompts, max_new_tokens: int, num_blocks: int | None = None, block_size: int = 16,
                   prefix_caching: bool = False, model=None) -> list[list[int]]:
    """Greedy new ids for each prompt, run on a fresh PagedLlamaRunner. num_blocks: default enough for every
    sequence at full length at once (no preemption); fewer makes the engine queue and preempt."""
    if num_blocks is None:
        num_blocks = sum(-(-(len(p) + max_new_tokens) // block_size) for p in prompts)
    engine = PagedLlamaRunner(model, num_blocks=num_blocks, block_size=block_size, prefix_caching=prefix_caching)
    return engine.generate(prompts, max_new_tokens)


@torch.no_grad()
def check_against_transformers(runner: PagedLlamaRunner, token_ids, split: int | None = None):
    """Admit `token_ids` as a new sequence, prefill it (in two chunks, cut at position `split`, if given),
    decode one more token, and run transformers' forward over the same ids, to compare the logits.

    Returns (the runner's logits, transformers' logits), both [len + 1 - cached, vocab]: with prefix caching
    the positions found in the cache are not computed, so not compared. The sequence is freed.
    """
    token_ids = [int(t) for t in token_ids]
    seq = ("check", len(runner.manager.tables))
    cached = runner.allocate(seq, token_ids)
    try:
        parts, start = [], cached
        if split is not None and cached < split < len(token_ids):
            parts.append(runner.prefill(seq, token_ids[:split], cached))
            start = split
        parts.append(runner.prefill(seq, token_ids, start))
        next_id = int(parts[-1][-1].argmax())
        got = torch.cat(parts + [runner.decode([seq], [next_id])])
    finally:
        runner.free(seq)
    want = runner.model(input_ids=torch.tensor([token_ids + [next_id]])).logits[0, cached:]
    return got, want


def block_owners(manager) -> list:
    """Per block id: the list of sequences whose block table holds it; or "cached" for a block no sequence
    holds whose keys and values stay in the prefix cache (evictable); or "free"."""
    owners = [[] for _ in range(manager.num_blocks)]
    for seq_id, table in manager.tables.items():
        for block in table:
            owners[block].append(seq_id)
    evictable = getattr(manager, "evictable", {})
    return [held or ("cached" if block in evictable else "free") for block, held in enumerate(owners)]


def plot_block_tables(manager, seq_ids=None, title: str = ""):
    """A picture of paging: each sequence's block table (left) and the arrows from its entries to the blocks of the
    pool (right), coloured by owner; a block shared by several sequences (a cached prefix) is hatched, a cached
    block no one holds is grey, a free one white. manager: a BlockManager or PrefixCachingBlockManager."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch, Rectangle
    seq_ids = list(manager.tables) if seq_ids is None else list(seq_ids)
    owners = block_owners(manager)
    colours = dict(zip(seq_ids, plt.get_cmap("tab10").colors))
    width = max(len(manager.tables[s]) for s in seq_ids) if seq_ids else 1
    fig, ax = plt.subplots(figsize=(9, 0.55 * max(len(seq_ids), 4) + 1.2), constrained_layout=True)
    pool_x, rows = width + 3, max(len(seq_ids), 1)
    per_row = -(-manager.num_blocks // rows)
    where = {b: (pool_x + b % per_row, rows - 1 - b // per_row) for b in range(manager.num_blocks)}
    for block, (x, y) in where.items():
        held = owners[block]
        if isinstance(held, list):
            face, hatch = colours.get(held[0], "tab:gray"), "///" if len(held) > 1 else None
        else:
            face, hatch = ("lightgrey" if held == "cached" else "white"), None
        ax.add_patch(Rectangle((x, y), 0.9, 0.8, facecolor=face, edgecolor="black", hatch=hatch, linewidth=0.6))
        ax.text(x + 0.45, y + 0.4, str(block), ha="center", va="center", fontsize=7)
    for row, seq in enumerate(seq_ids):
        y = rows - 1 - row
        ax.text(-0.2, y + 0.4, f"{seq}", ha="right", va="center", fontsize=8)
        for i, block in enumerate(manager.tables[seq]):
            ax.add_patch(Rectangle((i, y), 0.9, 0.8, facecolor=colours[seq], edgecolor="black", linewidth=0.6))
            ax.text(i + 0.45, y + 0.4, str(block), ha="center", va="center", fontsize=7, color="white")
            bx, by = where[block]
            ax.add_patch(FancyArrowPatch((i + 0.9, y + 0.4), (bx, by + 0.4), arrowstyle="-|>", mutation_scale=6,
                                         color=colours[seq], linewidth=0.6, alpha=0.6))
    size = manager.block_size
    ax.text(width / 2, rows + 0.2, f"block tables (entry i: positions {size}i..{size}i+{size - 1})", ha="center",
            fontsize=8)
    ax.text(pool_x + per_row / 2, rows + 0.2, "the pool (hatched: shared; grey: cached, free to evict; white: free)",
            ha="center", fontsize=8)
    ax.set_xlim(-2.5, pool_x + per_row + 0.5)
    ax.set_ylim(-0.5, rows + 0.8)
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=9)
    return fig
