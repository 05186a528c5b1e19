"""Chapter 7: prefix caching — requests that share a prefix share its KV blocks.

Exercise 7.3  `block_hashes`: a hash chain over the FULL blocks of a prompt, so that a block is identified by
              its tokens AND everything before them; `PrefixCachingBlockManager`: a block manager that finds
              a new prompt's leading full blocks in the cache and shares them (reference counts) instead of
              computing them again, keeps freed blocks cached until their memory is needed, and then evicts
              the least recently used one — never a block some sequence still holds.

This is what vLLM calls automatic prefix caching (SGLang's RadixAttention does the same with a radix tree):
with a shared system prompt, the second request's prefill computes only the tokens after the cached blocks.
helpers/course/paged_llama.py runs the tiny Llama with it (`prefix_caching=True`) and counts the prefill
tokens it did not compute.
"""
from __future__ import annotations

from collections import OrderedDict

from helpers.course.kv_cache import OutOfBlocks

from .paged_kv_cache import BlockManager

# The parent of a prompt's first block. A fixed number, not None: in Python 3.11 hash(None) depends on
# None's address, so it would differ between runs.
ROOT_HASH = 0


def block_hashes(token_ids, block_size: int) -> list[int]:
    """One hash per FULL block of `token_ids` (a trailing partial block has none), chained:

        h_0 = hash((ROOT_HASH, tuple(token_ids[0 : block_size])))
        h_i = hash((h_{i-1}, tuple(token_ids[i·block_size : (i+1)·block_size])))

    so h_i identifies the block's tokens and every token before them: two prompts get the same h_i only if
    their first (i+1)·block_size tokens are equal. (The same tokens after a different prefix have different
    keys and values — position and context enter every layer — so they must not share a block.)
    token_ids: a list of ints (or anything `list()` turns into one). Returns a list of ints.
    """
    ids = [int(t) for t in token_ids]
    hashes, parent = [], ROOT_HASH
    for start in range(0, len(ids) - block_size + 1, block_size):
        parent = hash((parent, tuple(ids[start:start + block_size])))
        hashes.append(parent)
    return hashes


class PrefixCachingBlockManager(BlockManager):
    """A BlockManager whose full prompt blocks are cached by their hash and shared between sequences.

    State (set up in __init__, on top of BlockManager's free_blocks, tables, num_tokens):
      ref_counts     {block: number of live sequences whose table holds it} for every block some sequence holds
      cached         {hash: block}: full blocks whose keys and values are known, found by their chain hash
      hash_of_block  {block: hash} for the blocks in `cached`
      evictable      OrderedDict {block: None} of cached blocks no sequence holds (ref count 0), least recently
                     used first. They still count as free (num_free_blocks), and are handed out, evicted from
                     the cache, only when free_blocks is empty.
      query_tokens, hit_tokens  prompt tokens asked for and found cached (successful allocate calls only):
                     the prefix-cache hit rate hit_tokens / query_tokens that vLLM exports as a metric.

    Exercise 7.3 (allocate, append_slot, free):
      allocate(seq_id, token_ids) -> num_cached_tokens. Looks the prompt's block hashes up in `cached` in
          order and stops at the first miss: the leading hits are shared (ref count + 1; an evictable one
          leaves `evictable`). At most the blocks before the prompt's LAST token can hit (the last token must
          be computed to give the logits of the next one), so num_cached_tokens is a multiple of block_size and
          < len(token_ids). The other blocks come from free_blocks, else by evicting the least recently used
          evictable block (dropping its hash). Every new FULL block of the prompt is then registered in
          `cached` under its hash (unless that hash is already cached): the engine computes its keys and
          values right after allocate, before any later prompt can read them. A trailing partial block is
          never cached. Raises ValueError (seq_id already held, empty prompt) and OutOfBlocks (needed vs
          free, counting evictable blocks that are not among the hits) with the manager exactly as before.
      append_slot(seq_id) -> (block, offset): as BlockManager's, but a new block may be an evicted one.
      free(seq_id): every block of the sequence loses one reference; a block at 0 references becomes
          evictable if it is cached (the sequence's LAST block first, so that a prompt's tail is evicted
          before its head), else returns to free_blocks. A block that is still referenced is never freed.
    """

    def __init__(self, num_blocks: int, block_size: int):
        super().__init__(num_blocks, block_size)
        self.ref_counts: dict[int, int] = {}
        self.cached: dict[int, int] = {}
        self.hash_of_block: dict[int, int] = {}
        self.evictable: OrderedDict[int, None] = OrderedDict()
        self.query_tokens = 0
        self.hit_tokens = 0

    @property
    def num_free_blocks(self) -> int:
        """Blocks that a new request can get: free ones and cached ones that no sequence holds."""
        return len(self.free_blocks) + len(self.evictable)

    @property
    def hit_rate(self) -> float:
        """Prompt tokens found cached / prompt tokens asked for (0 before any request)."""
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0

    def _take_block(self) -> int:
        """A block for new contents: a free one, else the least recently used evictable one (uncached)."""
        if self.free_blocks:
            return self.free_blocks.popleft()
        block, _ = self.evictable.popitem(last=False)
        del self.cached[self.hash_of_block.pop(block)]
        return block

    def allocate(self, seq_id, token_ids) -> int:
        token_ids = [int(t) for t in token_ids]
        if seq_id in self.tables:
            raise ValueError(f"sequence {seq_id!r} already holds blocks {self.tables[seq_id]}: free it first")
        if not token_ids:
            raise ValueError("token_ids is empty: a sequence needs at least one token")
        hashes = block_hashes(token_ids, self.block_size)
        hits = []
        for h in hashes[:(len(token_ids) - 1) // self.block_size]:
            if h not in self.cached:
                break
            hits.append(self.cached[h])
        needed = self.blocks_needed(len(token_ids)) - len(hits)
        available = len(self.free_blocks) + sum(1 for b in self.evictable if b not in hits)
        if needed > available:
            raise OutOfBlocks(f"sequence {seq_id!r} of {len(token_ids)} tokens needs {needed} new blocks of "
                              f"{self.block_size} ({len(hits)} cached), only {available} of {self.num_blocks} "
                              f"are free")
        for block in hits:
            self.evictable.pop(block, None)
            self.ref_counts[block] = self.ref_counts.get(block, 0) + 1
        table = list(hits)
        for i in range(len(hits), len(hits) + needed):
            block = self._take_block()
            self.ref_counts[block] = 1
            table.append(block)
            if i < len(hashes) and hashes[i] not in self.cached:
                self.cached[hashes[i]] = block
                self.hash_of_block[block] = hashes[i]
        self.tables[seq_id] = table
        self.num_tokens[seq_id] = len(token_ids)
        self.query_tokens += len(token_ids)
        self.hit_tokens += len(hits) * self.block_size
        return len(hits) * self.block_size

    def append_slot(self, seq_id) -> tuple[int, int]:
        if seq_id not in self.tables:
            raise KeyError(f"sequence {seq_id!r} holds no blocks (allocate it first, or it was freed)")
        table, position = self.tables[seq_id], self.num_tokens[seq_id]
        if position == len(table) * self.block_size:
            if not self.num_free_blocks:
                raise OutOfBlocks(f"sequence {seq_id!r} needs 1 new block for position {position}, "
                                  f"0 of {self.num_blocks} are free")
            block = self._take_block()
            self.ref_counts[block] = 1
            table.append(block)
        self.num_tokens[seq_id] = position + 1
        return table[position // self.block_size], position % self.block_size

    def free(self, seq_id) -> None:
        table = self.block_table(seq_id)
        for block in reversed(table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                del self.ref_counts[block]
                if block in self.hash_of_block:
                    self.evictable[block] = None            # most recently used: evicted last
                else:
                    self.free_blocks.append(block)
        del self.tables[seq_id], self.num_tokens[seq_id]
