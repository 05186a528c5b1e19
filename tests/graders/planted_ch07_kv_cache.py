"""Wrong answers to chapter 7's paged KV cache exercises (7.1-7.3), planted in the reference solution, for
tests/graders/test_ch07_kv_cache.py::test_planted_mistakes_are_caught; and valid answers written differently,
for test_valid_alternatives_pass.

Several mistakes give the RIGHT tokens on an easy workload (a leaked block, a block with two owners, MRU
eviction, a referenced block freed): only a grader that checks which blocks each sequence holds, the ref
counts and what stays cached catches them. `build(name)` returns an implementation object (`.paged_kv_cache`,
`.prefix_cache`) that the graders' check functions accept in place of load_impl.
"""
from __future__ import annotations

import hashlib
import math
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from helpers.course.kv_cache import OutOfBlocks


@dataclass(frozen=True)
class Variant:
    exercise: str
    checks: tuple       # names in test_ch07_kv_cache.CHECKS, run in order in one launched rank
    what: str
    points_at: tuple = ()   # the first failure message must contain one of these


VARIANTS = {
    "append_every_token": Variant("7.1", ("manager",), "append_slot takes a new block for every token",
                                  ("only when the last one is full",)),
    "free_leaks_last": Variant("7.1", ("manager",), "free forgets the last block", ("leaked",)),
    "half_allocated": Variant("7.1", ("manager",), "allocate keeps the blocks it took before OutOfBlocks",
                              ("unchanged",)),
    "floor_blocks": Variant("7.1", ("manager",), "floor(tokens / block_size) blocks", ("ceil(",)),
    "shared_free_block": Variant("7.1", ("manager",), "free ids read without being removed",
                                 ("held by two sequences",)),
    "attn_past_context": Variant("7.2", ("attention",), "reads the whole of every gathered block",
                                 ("tail of its last block",)),
    "attn_drop_partial": Variant("7.2", ("attention",), "ignores the last, partial block", ("partial block",)),
    "attn_gqa_modulo": Variant("7.2", ("attention",), "query head h reads KV head h % kv_heads", ("h // ",)),
    "attn_no_scale": Variant("7.2", ("attention",), "no 1/sqrt(head_dim)", ("sqrt(head_dim)",)),
    "attn_float32_out": Variant("7.2", ("attention",), "the float32 softmax's result not brought back to q's dtype",
                                ("q's dtype",)),
    "attn_one_length": Variant("7.2", ("attention",), "sequence 0's context_len applied to every sequence",
                               ("OWN context_len",)),
    "attn_padding_unmasked": Variant("7.2", ("attention",), "padded to the longest sequence, the padding not masked",
                                     ("padding",)),
    "attn_tables_cut": Variant("7.2", ("attention",), "block tables of different lengths cut to the shortest",
                               ("different lengths",)),
    "attn_past_full_table": Variant("7.2", ("attention",), "n // block_size + 1 blocks read: a context that "
                                    "exactly fills its table indexes past it", ("exactly fills",)),
    "python_hash": Variant("7.3", ("hashes",), "Python's hash instead of SHA-256", ("SHA-256",)),
    "hash_no_parent": Variant("7.3", ("hashes",), "each block hashed alone", ("parent",)),
    "hash_partial": Variant("7.3", ("hashes",), "a partial block gets a hash", ("FULL block",)),
    "salt_every_block": Variant("7.3", ("hashes",), "the cache salt in every block's extra keys",
                                ("EVERY block",)),
    "salt_ignored": Variant("7.3", ("hashes",), "the cache salt ignored", ("salt is ignored",)),
    "parent_ignored": Variant("7.3", ("hashes",), "the chain restarts at NONE_HASH whatever `parent` is",
                              ("continue from `parent`",)),
    "whole_prompt_hit": Variant("7.3", ("prefix",), "a hit covers the last token", ("LAST token",)),
    "cache_partial": Variant("7.3", ("prefix",), "the trailing partial block cached",
                             ("partial block is never cached",)),
    "cache_dup": Variant("7.3", ("prefix",), "cache_blocks re-registers a hash another block holds",
                         ("left to that block",)),
    "allocate_no_register": Variant("7.3", ("prefix",), "allocate does not register its full blocks",
                                    ("allocate registers",)),
    "cache_blocks_noop": Variant("7.3", ("prefix",), "cache_blocks registers nothing: generated blocks never cached",
                                 ("generated",)),
    "generated_not_cached_engine": Variant("7.3", ("prefix_llama",), "the same, seen through the engine: a "
                                           "follow-up turn misses the answer", ("generated tokens",)),
    "free_referenced": Variant("7.3", ("prefix",), "free frees blocks other sequences hold", ("still",)),
    "no_ref_on_hit": Variant("7.3", ("prefix",), "a hit does not take a reference", ("one reference per",)),
    "free_head_first": Variant("7.3", ("prefix",), "free makes the head evictable before the tail",
                               ("LAST block",)),
    "evict_mru": Variant("7.3", ("prefix",), "the most recently freed block evicted first", ("LEAST recently",)),
    "half_allocated_prefix": Variant("7.3", ("prefix",), "hits taken before OutOfBlocks", ("unchanged",)),
    "hits_counted_free": Variant("7.3", ("prefix",), "evictable hits also counted as free",
                                 ("NOT among this prompt's hits",)),
    # issue 21 item 18: what the cache maps after an eviction, a hit left evictable, out of blocks with
    # evictable ones left (append_slot)
    "evict_keeps_hash": Variant("7.3", ("prefix",), "an evicted block keeps its hash in `cached` and "
                                "`hash_of_block`", ("still maps",)),
    "hit_left_evictable": Variant("7.3", ("prefix",), "a hit block taken by allocate is left in `evictable`",
                                  ("a sequence holds",)),
    "append_free_list_only": Variant("7.3", ("prefix",), "append_slot raises OutOfBlocks when free_blocks is "
                                     "empty, though evictable blocks are left", ("evictable",)),
    "append_counts_first": Variant("7.3", ("prefix",), "append_slot counts the token before it raises OutOfBlocks",
                                   ("unchanged",)),
}

# Valid answers written differently: the graders must pass them (test_valid_alternatives_pass).
ALTERNATIVES = {
    "lifo_free_list": Variant("7.1", ("manager",), "a LIFO free list (the most recently freed block "
                                                              "is handed out first)"),
    "attn_sdpa": Variant("7.2", ("attention",), "one sequence at a time: gather with index tensors, then "
                                                "PyTorch's scaled_dot_product_attention with enable_gqa"),
    "attn_sdpa_masked": Variant("7.2", ("attention",), "vectorised another way: tables padded with -1, "
                                                       "repeat_interleave, SDPA with a boolean length mask"),
    "hashes_inline": Variant("7.3", ("hashes", "prefix", "prefix_llama"), "block_hashes written with hashlib and "
                                                                           "pickle directly, the chain by recursion"),
    "prefix_lifo": Variant("7.3", ("prefix",), "prefix caching on a LIFO free list"),
}


def build(name: str | None):
    """The reference implementation with variant `name` planted (None: unmodified)."""
    import solutions.paged_kv_cache as pkv_sol
    import solutions.prefix_cache as pc_sol
    pkv = types.SimpleNamespace(**{k: v for k, v in vars(pkv_sol).items() if not k.startswith("__")})
    pc = types.SimpleNamespace(**{k: v for k, v in vars(pc_sol).items() if not k.startswith("__")})
    if name is not None:
        _PLANT[name](pkv_sol, pc_sol, pkv, pc)
    return types.SimpleNamespace(paged_kv_cache=pkv, prefix_cache=pc)


def _manager(**methods):
    """Plant methods into a subclass of the reference BlockManager."""
    def plant(pkv_sol, pc_sol, pkv, pc):
        pkv.BlockManager = type("BlockManager", (pkv_sol.BlockManager,), methods)
    return plant


def _prefix(**methods):
    def plant(pkv_sol, pc_sol, pkv, pc):
        pc.PrefixCachingBlockManager = type("PrefixCachingBlockManager", (pc_sol.PrefixCachingBlockManager,), methods)
    return plant


# ------------------------------------------------------------------------------------------------ 7.1

def _append_every_token(self, seq_id):
    table, position = self.tables[seq_id], self.num_tokens[seq_id]
    if not self.free_blocks:
        raise OutOfBlocks("no free block")
    table.append(self.free_blocks.popleft())
    self.num_tokens[seq_id] = position + 1
    return table[-1], position % self.block_size


def _free_leaks_last(self, seq_id):
    table = self.block_table(seq_id)
    self.free_blocks.extend(table[:-1])
    del self.tables[seq_id], self.num_tokens[seq_id]


def _allocate_half(self, seq_id, num_tokens):
    if seq_id in self.tables or num_tokens < 1:
        raise ValueError("bad request")
    self.tables[seq_id], self.num_tokens[seq_id] = [], num_tokens
    for _ in range(self.blocks_needed(num_tokens)):
        if not self.free_blocks:
            raise OutOfBlocks(f"{seq_id!r} needs {self.blocks_needed(num_tokens)} blocks, the free list ran out")
        self.tables[seq_id].append(self.free_blocks.popleft())
    return list(self.tables[seq_id])


def _allocate_floor(self, seq_id, num_tokens):
    if seq_id in self.tables or num_tokens < 1:
        raise ValueError("bad request")
    needed = max(1, num_tokens // self.block_size)
    if needed > len(self.free_blocks):
        raise OutOfBlocks(f"needs {needed} blocks, {len(self.free_blocks)} free")
    self.tables[seq_id] = [self.free_blocks.popleft() for _ in range(needed)]
    self.num_tokens[seq_id] = num_tokens
    return list(self.tables[seq_id])


def _allocate_shared(self, seq_id, num_tokens):
    if seq_id in self.tables or num_tokens < 1:
        raise ValueError("bad request")
    needed = self.blocks_needed(num_tokens)
    if needed > len(self.free_blocks):
        raise OutOfBlocks(f"needs {needed} blocks, {len(self.free_blocks)} free")
    self.tables[seq_id] = [self.free_blocks[i] for i in range(needed)]       # read, not taken
    self.num_tokens[seq_id] = num_tokens
    return list(self.tables[seq_id])


def _lifo_allocate(self, seq_id, num_tokens):
    if seq_id in self.tables:
        raise ValueError(f"sequence {seq_id!r} is live")
    if num_tokens < 1:
        raise ValueError("num_tokens < 1")
    needed = math.ceil(num_tokens / self.block_size)
    if needed > len(self.free_blocks):
        raise OutOfBlocks(f"{seq_id!r}: needs {needed} blocks, {len(self.free_blocks)} free")
    self.tables[seq_id] = [self.free_blocks.pop() for _ in range(needed)]
    self.num_tokens[seq_id] = num_tokens
    return list(self.tables[seq_id])


def _lifo_append(self, seq_id):
    table, position = self.tables[seq_id], self.num_tokens[seq_id]
    if position % self.block_size == 0:
        if not self.free_blocks:
            raise OutOfBlocks("0 free blocks")
        table.append(self.free_blocks.pop())
    self.num_tokens[seq_id] += 1
    return table[-1], position % self.block_size


# ------------------------------------------------------------------------------------------------ 7.2

def _attention(mistake):
    """The batched reference (padded gather, a length mask, grouped heads by reshape) with one mistake."""
    def paged_attention(q, k_pool, v_pool, block_tables, context_lens):
        num_seqs, heads, head_dim = q.shape
        _, size, kv_heads, _ = k_pool.shape
        if heads % kv_heads or len(block_tables) != num_seqs or len(context_lens) != num_seqs or \
                any(not 1 <= n <= len(t) * size for t, n in zip(block_tables, context_lens)):
            raise ValueError("bad arguments")
        lengths = list(context_lens)
        if mistake == "one_length":                       # sequence 0's length applied to all
            lengths = [lengths[0]] * num_seqs
        blocks_of = (lambda n: n // size) if mistake == "drop_partial" else (lambda n: -(-n // size))
        rows = [list(t[:blocks_of(n)]) for t, n in zip(block_tables, context_lens)]
        if mistake == "past_full_table":                  # n // size + 1 blocks: one past a full last block
            rows = [[t[i] for i in range(n // size + 1)] for t, n in zip(block_tables, context_lens)]
        if mistake == "cut_tables":                       # every table cut to the shortest one: a rectangle
            width = min(len(t) for t in block_tables)
            rows = [list(t[:width]) for t in block_tables]
            lengths = [min(n, width * size) for n in lengths]
        width = max(max(len(r) for r in rows), -(-max(lengths) // size))
        padded = torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.long)
        k = k_pool[padded].reshape(num_seqs, width * size, kv_heads, head_dim)
        v = v_pool[padded].reshape(num_seqs, width * size, kv_heads, head_dim)
        positions = torch.arange(width * size)[None, :]
        if mistake == "no_mask":                          # padded to the longest, nothing masked
            valid = positions < max(context_lens)
        elif mistake in ("past_context", "drop_partial"):  # whole blocks: the last block's tail read (or dropped)
            valid = positions < torch.tensor([blocks_of(n) * size for n in context_lens])[:, None]
        else:
            valid = positions < torch.tensor(lengths)[:, None]
        group = heads // kv_heads
        if mistake == "gqa_modulo":                       # head h -> KV head h % kv_heads
            grouped = q.reshape(num_seqs, group, kv_heads, head_dim).transpose(1, 2)
        else:
            grouped = q.reshape(num_seqs, kv_heads, group, head_dim)
        scores = torch.einsum("skgd,stkd->skgt", grouped, k).float()
        scores = scores / (1.0 if mistake == "no_scale" else math.sqrt(head_dim))
        probs = torch.softmax(scores.masked_fill(~valid[:, None, None, :], float("-inf")), dim=-1)
        if mistake == "float32_out":                      # the float32 softmax never brought back to q's dtype
            out = torch.einsum("skgt,stkd->skgd", probs, v.float())
        else:
            out = torch.einsum("skgt,stkd->skgd", probs.to(q.dtype), v)
        if mistake == "gqa_modulo":
            out = out.transpose(1, 2)
        return out.reshape(num_seqs, heads, head_dim)
    return lambda pkv_sol, pc_sol, pkv, pc: setattr(pkv, "paged_attention", paged_attention)


def _attention_sdpa(pkv_sol, pc_sol, pkv, pc):
    """One sequence at a time: gather with index tensors, PyTorch's scaled_dot_product_attention with enable_gqa
    (valid, though not what the engine wants: a loop over the sequences)."""
    def paged_attention(q, k_pool, v_pool, block_tables, context_lens):
        num_seqs, heads, head_dim = q.shape
        _, block_size, kv_heads, _ = k_pool.shape
        if heads % kv_heads:
            raise ValueError(f"heads={heads} not a multiple of kv_heads={kv_heads}")
        if not len(block_tables) == len(context_lens) == num_seqs:
            raise ValueError("one block table and one context_len per sequence")
        outs = []
        for query, table, context_len in zip(q, block_tables, context_lens):
            if not 0 < context_len <= len(table) * block_size:
                raise ValueError(f"context_len={context_len} out of range")
            positions = torch.arange(context_len)
            blocks = torch.tensor(table)[positions // block_size]
            k = k_pool[blocks, positions % block_size].transpose(0, 1)              # [kv_heads, context, d]
            v = v_pool[blocks, positions % block_size].transpose(0, 1)
            outs.append(F.scaled_dot_product_attention(query[:, None], k, v, enable_gqa=True)[:, 0])
        return torch.stack(outs)
    pkv.paged_attention = paged_attention


def _attention_sdpa_masked(pkv_sol, pc_sol, pkv, pc):
    """Vectorised another way: tables padded with -1 (the pool's LAST block, garbage), every sequence's slots
    gathered by (block, offset) index tensors, repeat_interleave for the heads, SDPA with a boolean mask."""
    def paged_attention(q, k_pool, v_pool, block_tables, context_lens):
        num_seqs, heads, head_dim = q.shape
        _, size, kv_heads, _ = k_pool.shape
        if heads % kv_heads or not len(block_tables) == len(context_lens) == num_seqs:
            raise ValueError("heads must be a multiple of kv_heads; one table and one length per sequence")
        if any(not 1 <= n <= len(t) * size for t, n in zip(block_tables, context_lens)):
            raise ValueError("a context_len outside [1, len(table) * block_size]")
        longest = max(context_lens)
        width = max(len(t) for t in block_tables)
        table = torch.tensor([list(t) + [-1] * (width - len(t)) for t in block_tables])
        positions = torch.arange(longest)
        slots = table[:, (positions // size).clamp(max=width - 1)]                   # [seqs, longest]
        k = k_pool[slots, positions % size].repeat_interleave(heads // kv_heads, dim=2).transpose(1, 2)
        v = v_pool[slots, positions % size].repeat_interleave(heads // kv_heads, dim=2).transpose(1, 2)
        mask = positions[None, :] < torch.tensor(context_lens)[:, None]                # [seqs, longest]
        out = F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=mask[:, None, None, :])
        return out[:, :, 0]
    pkv.paged_attention = paged_attention


# ------------------------------------------------------------------------------------------------ 7.3

def _hashes(mistake):
    """block_hashes with one mistake; the rest as the reference (hash_block_tokens, NONE_HASH)."""
    def block_hashes(token_ids, block_size, parent=None, cache_salt=None):
        import solutions.prefix_cache as sol
        ids, out = [int(t) for t in token_ids], []
        if mistake == "parent_ignored":
            parent = None
        first = parent is None
        stop = len(ids) if mistake == "partial" else len(ids) - block_size + 1
        for start in range(0, stop, block_size):
            block = ids[start:start + block_size]
            salted = cache_salt and (first or mistake == "salt_every_block") and mistake != "salt_ignored"
            extra = (cache_salt,) if salted else None
            if mistake == "python_hash":
                parent = hash((parent or 0, tuple(block), extra))
            elif mistake == "no_parent":
                parent = sol.hash_block_tokens(sol.NONE_HASH, block, extra)
            else:
                parent = sol.hash_block_tokens(parent if parent is not None else sol.NONE_HASH, block, extra)
            out.append(parent)
            first = False
        return out
    return block_hashes


def _hashes_inline(token_ids, block_size, parent=None, cache_salt=None):
    """A valid answer written without hash_block_tokens: hashlib and pickle directly, the chain by recursion."""
    import pickle
    ids = list(map(int, token_ids))
    if len(ids) < block_size:
        return []
    extra = (cache_salt,) if cache_salt and parent is None else None
    digest = hashlib.sha256(pickle.dumps((parent or bytes(32), tuple(ids[:block_size]), extra),
                                         protocol=pickle.HIGHEST_PROTOCOL)).digest()
    return [digest] + _hashes_inline(ids[block_size:], block_size, digest)


def _prefix(mistake=None, hashes=None):
    """The reference PrefixCachingBlockManager with one mistake switched on (and block_hashes replaced by
    `hashes`, module and manager alike)."""
    def plant(pkv_sol, pc_sol, pkv, pc):
        fn = hashes or pc_sol.block_hashes
        base = pc_sol.PrefixCachingBlockManager

        class Planted(base):
            def cached_prefix(self, token_ids, cache_salt=None):
                size, ids = self.block_size, [int(t) for t in token_ids]
                usable = len(ids) // size if mistake == "whole_prompt_hit" else (len(ids) - 1) // size
                hits = []
                for h in fn(ids[:usable * size], size, cache_salt=cache_salt):
                    if h not in self.cached:
                        break
                    hits.append(self.cached[h])
                return hits

            def _take_block(self):
                if self.free_blocks:
                    return self.free_blocks.pop() if mistake == "lifo" else self.free_blocks.popleft()
                block, _ = self.evictable.popitem(last=mistake == "evict_mru")
                if mistake != "evict_keeps_hash":
                    del self.cached[self.hash_of_block.pop(block)]
                return block

            def allocate(self, seq_id, token_ids, cache_salt=None):
                token_ids = [int(t) for t in token_ids]
                if seq_id in self.tables or not token_ids:
                    raise ValueError("bad request")
                hits = self.cached_prefix(token_ids, cache_salt)
                needed = self.blocks_needed(len(token_ids)) - len(hits)
                if mistake == "half_allocated":
                    for block in hits:
                        self.evictable.pop(block, None)
                        self.ref_counts[block] = self.ref_counts.get(block, 0) + 1
                if mistake == "hits_counted_free":
                    available = self.num_free_blocks
                else:
                    available = len(self.free_blocks) + sum(1 for b in self.evictable if b not in hits)
                if needed > available:
                    raise OutOfBlocks(f"needs {needed} new blocks, {available} free")
                if mistake != "half_allocated":
                    for block in hits:
                        if mistake != "hit_left_evictable":
                            self.evictable.pop(block, None)
                        self.ref_counts[block] = 1 if mistake == "no_ref" else self.ref_counts.get(block, 0) + 1
                table = list(hits)
                for _ in range(needed):
                    block = self._take_block()
                    self.ref_counts[block] = 1
                    table.append(block)
                self.tables[seq_id], self.num_tokens[seq_id] = table, len(token_ids)
                if mistake == "cache_blocks_noop":          # registers the prompt's blocks itself, nothing later
                    base.cache_blocks(self, seq_id, token_ids, cache_salt)
                elif mistake != "allocate_no_register":
                    self.cache_blocks(seq_id, token_ids, cache_salt)
                return len(hits) * self.block_size

            def append_slot(self, seq_id):
                table, position = self.tables[seq_id], self.num_tokens[seq_id]
                if mistake == "append_counts_first":        # the token counted before the block is known
                    self.num_tokens[seq_id] = position + 1
                if position == len(table) * self.block_size:
                    if not (self.free_blocks if mistake == "append_free_list_only" else self.num_free_blocks):
                        raise OutOfBlocks("0 free blocks")
                    block = self._take_block()
                    self.ref_counts[block] = 1
                    table.append(block)
                self.num_tokens[seq_id] = position + 1
                return table[position // self.block_size], position % self.block_size

            def cache_blocks(self, seq_id, token_ids, cache_salt=None):
                if mistake == "cache_blocks_noop":
                    return []
                table, size, new = self.tables[seq_id], self.block_size, []
                ids = [int(t) for t in token_ids]
                hashes = fn(ids, size, cache_salt=cache_salt)
                if mistake == "cache_partial" and len(ids) % size and len(hashes) < len(table):
                    hashes.append(pc_sol.hash_block_tokens(hashes[-1] if hashes else pc_sol.NONE_HASH,
                                                           ids[len(hashes) * size:]))
                for block, h in zip(table, hashes):
                    if block in self.hash_of_block or (h in self.cached and mistake != "cache_dup"):
                        continue
                    self.cached[h], self.hash_of_block[block] = block, h
                    new.append(h)
                return new

            def free(self, seq_id):
                table = self.tables[seq_id]
                for block in (table if mistake == "free_head_first" else reversed(table)):
                    if mistake == "free_referenced":
                        self.ref_counts.pop(block, None)
                    else:
                        self.ref_counts[block] -= 1
                        if self.ref_counts[block]:
                            continue
                        del self.ref_counts[block]
                    if block in self.hash_of_block:
                        self.evictable[block] = None
                    else:
                        self.free_blocks.append(block)
                del self.tables[seq_id], self.num_tokens[seq_id]

        pc.PrefixCachingBlockManager = Planted
        pc.block_hashes = fn
    return plant


_PLANT = {
    "append_every_token": _manager(append_slot=_append_every_token),
    "free_leaks_last": _manager(free=_free_leaks_last),
    "half_allocated": _manager(allocate=_allocate_half),
    "floor_blocks": _manager(allocate=_allocate_floor),
    "shared_free_block": _manager(allocate=_allocate_shared),
    "attn_past_context": _attention("past_context"),
    "attn_drop_partial": _attention("drop_partial"),
    "attn_gqa_modulo": _attention("gqa_modulo"),
    "attn_no_scale": _attention("no_scale"),
    "attn_float32_out": _attention("float32_out"),
    "attn_one_length": _attention("one_length"),
    "attn_padding_unmasked": _attention("no_mask"),
    "attn_tables_cut": _attention("cut_tables"),
    "attn_past_full_table": _attention("past_full_table"),
    "python_hash": _prefix(hashes=_hashes("python_hash")),
    "hash_no_parent": _prefix(hashes=_hashes("no_parent")),
    "hash_partial": _prefix(hashes=_hashes("partial")),
    "salt_every_block": _prefix(hashes=_hashes("salt_every_block")),
    "salt_ignored": _prefix(hashes=_hashes("salt_ignored")),
    "parent_ignored": _prefix(hashes=_hashes("parent_ignored")),
    "whole_prompt_hit": _prefix("whole_prompt_hit"),
    "cache_partial": _prefix("cache_partial"),
    "cache_dup": _prefix("cache_dup"),
    "allocate_no_register": _prefix("allocate_no_register"),
    "cache_blocks_noop": _prefix("cache_blocks_noop"),
    "generated_not_cached_engine": _prefix("cache_blocks_noop"),
    "free_referenced": _prefix("free_referenced"),
    "no_ref_on_hit": _prefix("no_ref"),
    "free_head_first": _prefix("free_head_first"),
    "evict_mru": _prefix("evict_mru"),
    "half_allocated_prefix": _prefix("half_allocated"),
    "hits_counted_free": _prefix("hits_counted_free"),
    "evict_keeps_hash": _prefix("evict_keeps_hash"),
    "hit_left_evictable": _prefix("hit_left_evictable"),
    "append_free_list_only": _prefix("append_free_list_only"),
    "append_counts_first": _prefix("append_counts_first"),
    # valid alternatives
    "lifo_free_list": _manager(allocate=_lifo_allocate, append_slot=_lifo_append),
    "attn_sdpa": _attention_sdpa,
    "attn_sdpa_masked": _attention_sdpa_masked,
    "hashes_inline": _prefix(hashes=_hashes_inline),
    "prefix_lifo": _prefix("lifo"),
}
