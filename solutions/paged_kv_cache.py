"""Chapter 7: the paged KV cache.

Exercise 7.1  `BlockManager`: fixed-size blocks of KV memory handed out from a free list, a block table per
              sequence, a new block only when a sequence's last block is full, blocks returned on `free`, and a
              clear `OutOfBlocks` error (with the manager unchanged) when a request needs more than is free.
Exercise 7.2  `paged_attention`: one decode step of attention for a batch of sequences in one call (vLLM's
              paged-attention kernel), each reading its keys and values through its own block table straight
              out of the pools (grouped-query attention), equal to attention over a contiguous cache.

The pools and the error are given in helpers/course/kv_cache.py (KVPool, OutOfBlocks); the tiny Llama running
on them is helpers/course/paged_llama.py (it calls both exercises through load_impl, so your code runs there).
"""
from __future__ import annotations

import math
from collections import deque

import torch

from helpers.course.kv_cache import OutOfBlocks


class BlockManager:
    """Which KV blocks each sequence holds (vLLM's block manager, without prefix caching: see prefix_cache.py).

    Given state (set up in __init__; keep it up to date, the graders and the engine read it through the
    methods below):
      free_blocks  deque of free block ids (all of 0 .. num_blocks-1 at the start)
      tables       {seq_id: list of block ids}: the block table; position p of the sequence is in block
                   tables[seq_id][p // block_size] at offset p % block_size
      num_tokens   {seq_id: number of positions the sequence holds}

    Exercise 7.1 (allocate, append_slot, free):
      allocate(seq_id, num_tokens) -> block table. Gives a new sequence ceil(num_tokens / block_size) blocks
          for positions 0 .. num_tokens-1 (a prompt). Raises ValueError if seq_id already holds blocks or
          num_tokens < 1, and OutOfBlocks, naming the blocks needed and free, if there are not enough free
          blocks: then nothing is allocated (the manager is exactly as before).
      append_slot(seq_id) -> (block, offset) of the sequence's next position (a generated token). A new
          block is taken from the free list only when the last block is full. Raises OutOfBlocks (the
          manager unchanged) if a new block is needed and none is free; KeyError for an unknown seq_id.
      free(seq_id) returns all of the sequence's blocks to the free list and forgets it (KeyError if unknown).
    """

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks={num_blocks} and block_size={block_size} must both be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free_blocks: deque[int] = deque(range(num_blocks))
        self.tables: dict = {}
        self.num_tokens: dict = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    def blocks_needed(self, num_tokens: int) -> int:
        """Blocks that hold num_tokens positions: ceil(num_tokens / block_size)."""
        return -(-num_tokens // self.block_size)

    def block_table(self, seq_id) -> list[int]:
        """A copy of the sequence's block table."""
        if seq_id not in self.tables:
            raise KeyError(f"sequence {seq_id!r} holds no blocks (allocate it first, or it was freed)")
        return list(self.tables[seq_id])

    def seq_len(self, seq_id) -> int:
        """Positions the sequence holds (prompt + appended tokens)."""
        self.block_table(seq_id)
        return self.num_tokens[seq_id]

    def truncate(self, seq_id, num_tokens: int) -> None:
        """Forget positions num_tokens .. of a sequence (rejected speculative tokens, chapter 10): the blocks past
        the new end go back to the free list."""
        table = self.block_table(seq_id)
        if not 1 <= num_tokens <= self.num_tokens[seq_id]:
            raise ValueError(f"num_tokens={num_tokens} must be in [1, {self.num_tokens[seq_id]}]")
        keep = self.blocks_needed(num_tokens)
        self.free_blocks.extend(table[keep:])
        self.tables[seq_id] = table[:keep]
        self.num_tokens[seq_id] = num_tokens

    def allocate(self, seq_id, num_tokens: int) -> list[int]:
        if seq_id in self.tables:
            raise ValueError(f"sequence {seq_id!r} already holds blocks {self.tables[seq_id]}: free it first")
        if num_tokens < 1:
            raise ValueError(f"num_tokens={num_tokens}: a sequence needs at least one token")
        needed = self.blocks_needed(num_tokens)
        if needed > len(self.free_blocks):
            raise OutOfBlocks(f"sequence {seq_id!r} of {num_tokens} tokens needs {needed} blocks of "
                              f"{self.block_size}, only {len(self.free_blocks)} of {self.num_blocks} are free")
        self.tables[seq_id] = [self.free_blocks.popleft() for _ in range(needed)]
        self.num_tokens[seq_id] = num_tokens
        return list(self.tables[seq_id])

    def append_slot(self, seq_id) -> tuple[int, int]:
        if seq_id not in self.tables:
            raise KeyError(f"sequence {seq_id!r} holds no blocks (allocate it first, or it was freed)")
        table, position = self.tables[seq_id], self.num_tokens[seq_id]
        if position == len(table) * self.block_size:            # the last block is full
            if not self.free_blocks:
                raise OutOfBlocks(f"sequence {seq_id!r} needs 1 new block for position {position}, "
                                  f"0 of {self.num_blocks} are free")
            table.append(self.free_blocks.popleft())
        self.num_tokens[seq_id] = position + 1
        return table[position // self.block_size], position % self.block_size

    def free(self, seq_id) -> None:
        table = self.block_table(seq_id)
        self.free_blocks.extend(table)
        del self.tables[seq_id], self.num_tokens[seq_id]


def paged_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_tables,
                    context_lens) -> torch.Tensor:
    """One decode step of attention for a whole batch of sequences, each over its own blocks: vLLM's
    `paged_attention_v1(out, query, key_cache, value_cache, num_kv_heads, scale, block_tables, seq_lens, ...)`.

    q: [num_seqs, heads, head_dim]: row i is sequence i's one new token's query (rotary already applied); its
       own key and value are already written at position context_lens[i]-1.
    k_pool, v_pool: [num_blocks, block_size, kv_heads, head_dim] (one layer's pools, KVPool.k[layer]), shared by
       all the sequences.
    block_tables: one list of block ids per sequence (lists of different lengths). A block table maps a
       sequence's positions to the pool: position p of sequence i is in block block_tables[i][p // block_size],
       at offset p % block_size; its blocks need not be adjacent or in order, and two sequences may hold the
       same block (a shared prefix). Only the first ceil(context_lens[i] / block_size) blocks are read, and of
       the last one only the positions below context_lens[i]: a position beyond context_len is another
       token's future, or garbage, and must be masked.
    context_lens: one int per sequence, the positions it attends over (0 .. context_len-1).
    Grouped-query attention as in Llama (transformers' repeat_kv): heads is a multiple of kv_heads, and query
    head h reads KV head h // (heads // kv_heads).
    softmax(q·kᵀ / sqrt(head_dim)) · v, the softmax in float32. Returns [num_seqs, heads, head_dim] in q's dtype.
    Raises ValueError when heads is not a multiple of kv_heads, when len(block_tables) or len(context_lens) is not
    num_seqs, or when a context_len is not in [1, len(its block table) · block_size].

    One call for the whole batch, as the engine runs it (helpers/course/paged_llama.py, once per layer): gather
    every sequence's slots into one padded tensor [num_seqs, longest context, kv_heads, head_dim] and mask each
    sequence's positions at and beyond its own context_len, rather than loop over the sequences.
    """
    num_seqs, heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_pool.shape
    if heads % kv_heads:
        raise ValueError(f"heads={heads} is not a multiple of kv_heads={kv_heads}")
    if len(block_tables) != num_seqs or len(context_lens) != num_seqs:
        raise ValueError(f"{num_seqs} queries but {len(block_tables)} block tables and {len(context_lens)} "
                         f"context lengths: one of each per sequence")
    for i, (table, length) in enumerate(zip(block_tables, context_lens)):
        if not 1 <= length <= len(table) * block_size:
            raise ValueError(f"sequence {i}: context_len={length} must be in [1, {len(table) * block_size}] "
                             f"({len(table)} blocks of {block_size})")
    if not num_seqs:
        return q.new_zeros(q.shape)
    lengths = [int(length) for length in context_lens]
    width = math.ceil(max(lengths) / block_size)                                  # blocks of the longest
    rows = [list(table[:math.ceil(n / block_size)]) for table, n in zip(block_tables, lengths)]
    padded = torch.tensor([row + [0] * (width - len(row)) for row in rows], dtype=torch.long)  # [seqs, width]
    longest = max(lengths)
    k = k_pool[padded].reshape(num_seqs, width * block_size, kv_heads, head_dim)[:, :longest]
    v = v_pool[padded].reshape(num_seqs, width * block_size, kv_heads, head_dim)[:, :longest]
    group = heads // kv_heads
    grouped = q.reshape(num_seqs, kv_heads, group, head_dim)                      # head h = (h // group, h % group)
    scores = (grouped @ k.permute(0, 2, 3, 1)).float() / math.sqrt(head_dim)    # [seqs, kv_heads, group, longest]
    if min(lengths) < longest:                                                    # mask what is not a sequence's
        beyond = torch.arange(longest)[None, :] >= torch.tensor(lengths)[:, None]            # [seqs, longest]
        scores = scores.masked_fill(beyond[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    return (probs @ v.transpose(1, 2)).reshape(num_seqs, heads, head_dim)      # [seqs, kv_heads, group, head_dim]
