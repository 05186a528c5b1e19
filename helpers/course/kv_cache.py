"""The paged KV cache's memory: one pool of fixed-size blocks per layer, addressed through a block table.

    from helpers.course.kv_cache import KVPool, OutOfBlocks

    pool = KVPool.for_model(model.config, num_blocks=64)           # tiny Llama: 4 layers, 4 KV heads of 32
    pool.write(layer, table, start, k, v)       # k, v: [tokens, kv_heads, head_dim] at positions start, start+1, ...
    k, v = pool.gather(layer, table, length)    # positions 0 .. length-1, contiguous: [length, kv_heads, head_dim]

The layout is vLLM's (PagedAttention, Kwon et al., SOSP 2023). Instead of one padded tensor per sequence of
the longest length it might reach, every layer has ONE pool of K and one of V, shaped
`[num_blocks, block_size, kv_heads, head_dim]`. A sequence owns a list of block ids, its *block table*; the
token at position p lives in block `table[p // block_size]`, at offset `p % block_size`. A sequence's blocks
need not be adjacent or in order, so memory is handed out one block at a time as sequences grow, and what a
sequence wastes is at most the unused tail of its last block. Which blocks a sequence holds is decided by a
block manager (exercise 7.1, labs/paged_kv_cache.py: BlockManager); this module only stores and fetches.

`bytes_per_block` counts K and V of all layers: the unit a block manager hands out. For the tiny Llama in
float32 one token costs 2 (K, V) × 4 layers × 4 KV heads × 32 × 4 B = 4,096 B, a block of 16 tokens 64 KiB.

`OutOfBlocks` is what a block manager raises when a request needs more free blocks than there are; the
engine catches it to stop admitting requests or to preempt one (helpers/course/paged_llama.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from helpers.course.memory import kv_bytes_per_token

__all__ = ["OutOfBlocks", "KVPool", "slots_of"]


class OutOfBlocks(RuntimeError):
    """A block manager has fewer free blocks than a request needs. The manager's state is unchanged."""


def slots_of(table, start: int, count: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(block ids, offsets) of positions start .. start+count-1 through `table`: two int64 tensors [count].

    Raises IndexError when a position lies beyond the table's last block (the table must hold
    ceil((start + count) / block_size) blocks).
    """
    if start < 0 or count < 0:
        raise IndexError(f"start={start}, count={count}: both must be >= 0")
    end = start + count
    if end > len(table) * block_size:
        raise IndexError(f"positions {start}..{end - 1} need {-(-end // block_size)} blocks of {block_size} "
                         f"tokens, but the block table holds {len(table)}: allocate (or append_slot) first")
    positions = torch.arange(start, end)
    blocks = torch.as_tensor(list(table), dtype=torch.long)[positions // block_size] if count else \
        torch.zeros(0, dtype=torch.long)
    return blocks, positions % block_size


@dataclass
class KVPool:
    """K and V pools of every layer: `k[layer]`, `v[layer]` of shape [num_blocks, block_size, kv_heads, head_dim].

    Zero-initialised; a block's contents are meaningful only at the positions a sequence has written.
    """
    num_layers: int
    num_blocks: int
    block_size: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype = torch.float32
    k: list = field(init=False, repr=False)
    v: list = field(init=False, repr=False)

    def __post_init__(self):
        for name in ("num_layers", "num_blocks", "block_size", "kv_heads", "head_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        shape = (self.num_blocks, self.block_size, self.kv_heads, self.head_dim)
        self.k = [torch.zeros(shape, dtype=self.dtype) for _ in range(self.num_layers)]
        self.v = [torch.zeros(shape, dtype=self.dtype) for _ in range(self.num_layers)]

    @classmethod
    def for_model(cls, config, num_blocks: int, block_size: int = 16, dtype: torch.dtype = torch.float32):
        """A pool shaped for a transformers Llama config (layers, KV heads, head size)."""
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(config.num_hidden_layers, num_blocks, block_size, config.num_key_value_heads, head_dim, dtype)

    @property
    def bytes_per_token(self) -> int:
        """K and V of one token in all layers (helpers/course/memory.py's kv_bytes_per_token)."""
        return int(kv_bytes_per_token(self.num_layers, self.kv_heads, self.head_dim,
                                      torch.finfo(self.dtype).bits // 8))

    @property
    def bytes_per_block(self) -> int:
        """K and V of one block (block_size tokens) in all layers: the unit a block manager hands out."""
        return self.block_size * self.bytes_per_token

    @property
    def total_bytes(self) -> int:
        return self.num_blocks * self.bytes_per_block

    def write(self, layer: int, table, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v ([tokens, kv_heads, head_dim]) of positions start, start+1, ... through `table`."""
        if k.shape != v.shape or k.dim() != 3 or tuple(k.shape[1:]) != (self.kv_heads, self.head_dim):
            raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must both be [tokens, kv_heads="
                             f"{self.kv_heads}, head_dim={self.head_dim}]")
        blocks, offsets = slots_of(table, start, k.shape[0], self.block_size)
        self.k[layer][blocks, offsets] = k.to(self.dtype)
        self.v[layer][blocks, offsets] = v.to(self.dtype)

    def gather(self, layer: int, table, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of positions 0 .. length-1 through `table`, contiguous: two [length, kv_heads, head_dim]."""
        blocks, offsets = slots_of(table, 0, length, self.block_size)
        return self.k[layer][blocks, offsets], self.v[layer][blocks, offsets]
