"""The course's tiny Llama running on a paged KV cache: what a serving engine's model runner does.

    from helpers.course.paged_llama import PagedLlama, generate_paged

    new_ids = generate_paged([encode(PROMPT), encode("We hold these truths")], max_new_tokens=20)
    # -> two lists of 20 ids, the same as helpers.course.tiny_llama.generate gives for each prompt alone

    engine = PagedLlama(num_blocks=32, block_size=16, prefix_caching=True)
    new_ids = engine.generate(prompts, max_new_tokens=20)
    engine.stats            # {"prefill_tokens": computed, "cached_tokens": found in the prefix cache,
                            #  "preemptions", "peak_blocks_used", "peak_running": the largest decode batch, ...}
    engine.manager          # the block manager (exercise 7.1, or 7.3 with prefix_caching=True)
    engine.pool             # the KV pools (helpers/course/kv_cache.py)

The model is helpers.course.tiny_llama's, with its own weights: this file only re-does the forward pass so
that keys and values go to, and come from, the pools through each sequence's block table instead of
transformers' contiguous cache. The layers' own modules do the rest (RMSNorm, the q/k/v/o projections,
rotary embedding, the SwiGLU MLP, lm_head), so the logits equal transformers' within rounding
(`check_against_transformers`).

Two kinds of forward pass, as in vLLM:
  prefill(seq_id, token_ids, start)  the positions start .. len(token_ids)-1 of one sequence at once (a whole
      prompt, or a chunk of one): their K/V are written into the sequence's blocks, and each attends to
      everything before it, positions < start read back from the pool (written by an earlier chunk, or found
      in the prefix cache). Returns their logits.
  decode(seq_ids, token_ids)         one new token for each of several sequences of different lengths: the
      projections and the MLP run batched; each sequence gets a slot from `manager.append_slot` (a new block
      only when its last one is full), and attention is `paged_attention` (exercise 7.2) over its own blocks.

Both exercises are loaded with load_impl when the engine is built, so the learner's labs/ code runs here:
labs/paged_kv_cache.py (BlockManager, paged_attention) and, with prefix_caching=True, labs/prefix_cache.py
(PrefixCachingBlockManager: cached prompt blocks are shared, not computed again; `stats["prefill_tokens"]`
counts only the tokens computed, so prefill FLOPs saved = 2 × parameters × cached tokens, roughly).

`generate` is a small continuous-batching loop on top: requests are admitted while their prompt's blocks
fit (allocate raises OutOfBlocks otherwise), all running sequences decode together, and when a decode step
needs a new block and none is free the most recently admitted sequence is PREEMPTED by recomputation (vLLM's
default policy): its blocks are freed, it goes back to the front of the queue, and when blocks free up it is
prefilled again over its prompt and the tokens it had generated, then continues. Greedy tokens are the same
with or without preemption, with or without prefix caching (tests/graders/test_ch07_kv_cache.py checks both).

Recipes for the notebook (each prints evidence a verdict can check; token ids and counts are exact, logits
within `helpers.claims.tolerance`):

    from helpers.claims import check_close, verdict
    engine = PagedLlama(num_blocks=16, block_size=16)
    got, want = check_against_transformers(engine, encode(PROMPT), split=12)     # chunked prefill + 1 decode
    check_close("paged logits vs transformers'", got, want)
    engine.manager.block_table(seq_id), engine.manager.num_free_blocks           # who holds which block
    engine.pool.bytes_per_block, engine.pool.bytes_per_token                     # 65,536 B and 4,096 B
    engine = PagedLlama(num_blocks=7, block_size=8); engine.generate(prompts, 12)
    engine.stats["preemptions"], engine.stats["peak_running"]                    # a small pool preempts, same ids
    engine = PagedLlama(num_blocks=64, prefix_caching=True)                       # shared system prompt:
    engine.stats["prefill_tokens"], engine.stats["cached_tokens"], engine.manager.hit_rate

`block_owners(engine.manager)` lists, per block id, the sequences holding it (several for a shared prefix
block) or "cached" / "free": the data for a picture of the pool.

Chunked prefill: `prefill(seq_id, token_ids[:end], start)` computes positions start .. end-1 after
`manager.allocate` of the whole prompt. With prefix caching, allocate registers the prompt's full blocks in
the cache at once, so finish a prompt's prefill before admitting another that could hit its blocks.

`python -m helpers.bench paged_kv` prints the chapter's figures (bytes padded vs paged, sequences that fit
a budget, TTFT with and without prefix caching at a 90 % shared prefix).
"""
from __future__ import annotations

import math
from collections import deque

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from helpers.course.kv_cache import KVPool, OutOfBlocks
from helpers.impl import load_impl

__all__ = ["PagedLlama", "generate_paged", "check_against_transformers", "block_owners"]


class PagedLlama:
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

    # ------------------------------------------------------------------------------ the forward passes
    def _project_qkv(self, layer, h: torch.Tensor, positions: torch.Tensor):
        """h: [T, hidden] (normed) -> q [T, heads, head_dim], k, v [T, kv_heads, head_dim], rotary applied."""
        attn = layer.self_attn
        tokens = h.shape[0]
        q = attn.q_proj(h).view(tokens, self.heads, self.head_dim)
        k = attn.k_proj(h).view(tokens, self.kv_heads, self.head_dim)
        v = attn.v_proj(h).view(tokens, self.kv_heads, self.head_dim)
        cos, sin = self.model.model.rotary_emb(h, positions[None])              # [1, T, head_dim]
        q, k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
        return q[0].transpose(0, 1), k[0].transpose(0, 1), v

    def _finish_layer(self, layer, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """Residual adds around attention's output projection and the MLP. attn_out: [T, heads × head_dim]."""
        x = x + layer.self_attn.o_proj(attn_out)
        return x + layer.mlp(layer.post_attention_layernorm(x))

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(self.model.model.norm(x))

    @torch.no_grad()
    def prefill(self, seq_id, token_ids, start: int = 0) -> torch.Tensor:
        """Compute positions start .. len(token_ids)-1 of `seq_id` (whose blocks hold all of token_ids already:
        allocate first). Positions < start must already be in the pool. Returns logits [len - start, vocab]."""
        token_ids = [int(t) for t in token_ids]
        end = len(token_ids)
        if not 0 <= start < end:
            raise ValueError(f"start={start} must be in [0, {end}): prefill computes at least one position")
        table = self.manager.block_table(seq_id)
        positions = torch.arange(start, end)
        x = self.model.model.embed_tokens(torch.tensor(token_ids[start:]))      # [T, hidden]
        group = self.heads // self.kv_heads
        # causal: the token at position start+i sees positions 0 .. start+i
        future = torch.arange(end)[None, :] > positions[:, None]               # [T, end]
        for index, layer in enumerate(self.model.model.layers):
            q, k, v = self._project_qkv(layer, layer.input_layernorm(x), positions)
            self.pool.write(index, table, start, k, v)
            keys, values = self.pool.gather(index, table, end)                  # [end, kv_heads, head_dim]
            keys = keys.repeat_interleave(group, dim=1)                         # query head h reads h // group
            values = values.repeat_interleave(group, dim=1)
            scores = torch.einsum("thd,shd->hts", q, keys) / math.sqrt(self.head_dim)
            scores = scores.masked_fill(future, float("-inf"))
            probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
            out = torch.einsum("hts,shd->thd", probs, values).reshape(end - start, -1)
            x = self._finish_layer(layer, x, out)
        self.stats["prefill_tokens"] += end - start
        self._note_usage()
        return self._logits(x)

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
        positions = torch.tensor([length - 1 for length in lengths])
        x = self.model.model.embed_tokens(torch.tensor(token_ids))              # [B, hidden]
        for index, layer in enumerate(self.model.model.layers):
            q, k, v = self._project_qkv(layer, layer.input_layernorm(x), positions)
            outs = []
            for i, (table, length) in enumerate(zip(tables, lengths)):
                self.pool.write(index, table, length - 1, k[i:i + 1], v[i:i + 1])
                outs.append(self.paged.paged_attention(q[i], self.pool.k[index], self.pool.v[index], table, length))
            x = self._finish_layer(layer, x, torch.stack(outs).reshape(len(seq_ids), -1))
        self.stats["decode_tokens"] += len(seq_ids)
        self.stats["decode_steps"] += 1
        self._note_usage()
        return self._logits(x)

    def blocks_for_next_step(self, seq_ids) -> int:
        """How many new blocks one decode step of these sequences takes (those whose last block is full)."""
        size = self.pool.block_size
        return sum(self.manager.seq_len(s) == len(self.manager.block_table(s)) * size for s in seq_ids)

    def preempt_for_decode(self, decoding, admitted) -> list:
        """Make room for one decode step of `decoding`: free the blocks of the most recently admitted sequences
        until the step's new blocks fit (vLLM's recompute policy: the newest goes first; the caller queues them
        again). admitted: every sequence holding blocks, oldest first, the decoding ones among them. Returns the
        preempted sequences, newest first. Raises OutOfBlocks when one sequence is left and still does not fit."""
        decoding, admitted, victims = list(decoding), list(admitted), []
        while decoding and self.blocks_for_next_step(decoding) > self.manager.num_free_blocks:
            if len(admitted) == 1:
                raise OutOfBlocks(f"sequence {admitted[0]!r} alone needs more than the pool's "
                                  f"{self.manager.num_blocks} blocks of {self.pool.block_size}")
            victim = admitted.pop()
            self.free(victim)
            self.stats["preemptions"] += 1
            victims.append(victim)
            if victim in decoding:
                decoding.remove(victim)
        return victims

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

    def start(self, seq_id, token_ids) -> torch.Tensor:
        """Admit a sequence: allocate its blocks and prefill what the prefix cache does not hold. Returns the
        logits of its last position [vocab]."""
        cached = self.allocate(seq_id, token_ids)
        return self.prefill(seq_id, [int(t) for t in token_ids], start=cached)[-1]

    def free(self, seq_id) -> None:
        self.manager.free(seq_id)

    def generate(self, prompts, max_new_tokens: int) -> list[list[int]]:
        """Greedy continuation of every prompt (lists of ids) by continuous batching on the paged cache; returns
        the new ids of each prompt, in the order given. Sequences are freed when done."""
        prompts = [[int(t) for t in p] for p in prompts]
        for i, p in enumerate(prompts):
            if not p or len(p) + max_new_tokens > self.max_positions:
                raise ValueError(f"prompt {i}: {len(p)} tokens + max_new_tokens={max_new_tokens} must be in "
                                 f"[1, max_position_embeddings={self.max_positions}]")
        new = [[] for _ in prompts]
        waiting, running = deque(range(len(prompts))), []          # request ids; running in admission order
        while waiting or running:
            while waiting:                                         # admit (or re-admit after preemption)
                r = waiting[0]
                try:
                    logits = self.start(r, prompts[r] + new[r])
                except OutOfBlocks:
                    if not running:
                        raise OutOfBlocks(f"prompt {r} ({len(prompts[r]) + len(new[r])} tokens) does not fit in "
                                          f"the whole pool of {self.manager.num_blocks} blocks") from None
                    break
                waiting.popleft()
                new[r].append(int(logits.argmax()))
                running.append(r)
            for r in [r for r in running if len(new[r]) == max_new_tokens]:
                running.remove(r)
                self.free(r)
            if not running:
                continue
            for victim in self.preempt_for_decode(running, running):   # newest first: recompute later
                running.remove(victim)
                waiting.appendleft(victim)
            self.stats["peak_running"] = max(self.stats["peak_running"], len(running))
            logits = self.decode(running, [new[r][-1] for r in running])
            for r, row in zip(running, logits):
                new[r].append(int(row.argmax()))
        return new


def generate_paged(prompts, max_new_tokens: int, num_blocks: int | None = None, block_size: int = 16,
                   prefix_caching: bool = False, model=None) -> list[list[int]]:
    """Greedy new ids for each prompt, run on a fresh PagedLlama. num_blocks: default enough for every
    sequence at full length at once (no preemption); fewer makes the engine queue and preempt."""
    if num_blocks is None:
        num_blocks = sum(-(-(len(p) + max_new_tokens) // block_size) for p in prompts)
    engine = PagedLlama(model, num_blocks=num_blocks, block_size=block_size, prefix_caching=prefix_caching)
    return engine.generate(prompts, max_new_tokens)


@torch.no_grad()
def check_against_transformers(engine: PagedLlama, token_ids, split: int | None = None):
    """Admit `token_ids` as a new sequence, prefill it (in two chunks, cut at position `split`, if given),
    decode one more token, and run transformers' forward over the same ids, to compare the logits.

    Returns (the engine's logits, transformers' logits), both [len + 1 - cached, vocab]: with prefix caching
    the positions found in the cache are not computed, so not compared. The sequence is freed.
    """
    token_ids = [int(t) for t in token_ids]
    seq = ("check", len(engine.manager.tables))
    if engine.prefix_caching:
        cached = engine.manager.allocate(seq, token_ids)
    else:
        cached = 0
        engine.manager.allocate(seq, len(token_ids))
    try:
        parts, start = [], cached
        if split is not None and cached < split < len(token_ids):
            parts.append(engine.prefill(seq, token_ids[:split], cached))
            start = split
        parts.append(engine.prefill(seq, token_ids, start))
        next_id = int(parts[-1][-1].argmax())
        got = torch.cat(parts + [engine.decode([seq], [next_id])])
    finally:
        engine.free(seq)
    want = engine.model(input_ids=torch.tensor([token_ids + [next_id]])).logits[0, cached:]
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
