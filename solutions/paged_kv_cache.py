"""Chapter 7: the paged KV cache.

Exercise 7.1  `BlockManager`: fixed-size blocks of KV memory handed out from a free list, a block table per
              sequence, a new block only when a sequence's last block is full, blocks returned on `free`, and a
              clear `OutOfBlocks` error (with the manager unchanged) when a request needs more than is free.
Exercise 7.2  `paged_attention`: one decode step of attention for one sequence, reading its keys and values
              through its block table straight out of the pools (grouped-query attention), equal to attention
              over a contiguous cache.

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


def paged_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_table,
                    context_len: int) -> torch.Tensor:
    """Attention of one new token over positions 0 .. context_len-1 of its sequence (one decode step).

    q: [heads, head_dim], the new token's query (rotary already applied); its own key and value are already
       written at position context_len-1.
    k_pool, v_pool: [num_blocks, block_size, kv_heads, head_dim] (one layer's pools, KVPool.k[layer]).
    block_table: list of block ids; position p is in block block_table[p // block_size], offset
       p % block_size. Only the first ceil(context_len / block_size) blocks are read, and of the last one
       only the positions below context_len (the rest is another token's future, or garbage).
    Grouped-query attention as in Llama (transformers' repeat_kv): heads is a multiple of kv_heads, and query
    head h reads KV head h // (heads // kv_heads).
    softmax(q·kᵀ / sqrt(head_dim)) · v, the softmax in float32. Returns [heads, head_dim] in q's dtype.
    Raises ValueError when heads is not a multiple of kv_heads, or context_len is not in
    [1, len(block_table) · block_size].
    """
    heads, head_dim = q.shape
    num_blocks, block_size, kv_heads, _ = k_pool.shape
    if heads % kv_heads:
        raise ValueError(f"heads={heads} is not a multiple of kv_heads={kv_heads}")
    if not 1 <= context_len <= len(block_table) * block_size:
        raise ValueError(f"context_len={context_len} must be in [1, {len(block_table) * block_size}] "
                         f"({len(block_table)} blocks of {block_size})")
    used = torch.as_tensor(list(block_table[:math.ceil(context_len / block_size)]), dtype=torch.long)
    k = k_pool[used].reshape(-1, kv_heads, head_dim)[:context_len]            # [context, kv_heads, head_dim]
    v = v_pool[used].reshape(-1, kv_heads, head_dim)[:context_len]
    group = heads // kv_heads
    k = k.repeat_interleave(group, dim=1)                                     # [context, heads, head_dim]
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("hd,thd->ht", q, k) / math.sqrt(head_dim)           # [heads, context]
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return torch.einsum("ht,thd->hd", probs, v)
