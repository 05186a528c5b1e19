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
    raise NotImplementedError("Exercise 7.3: block_hashes is not written yet (labs/prefix_cache.py)")


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
        raise NotImplementedError("Exercise 7.3: PrefixCachingBlockManager._take_block is not written yet "
                                  "(labs/prefix_cache.py)")

    def allocate(self, seq_id, token_ids) -> int:
        raise NotImplementedError("Exercise 7.3: PrefixCachingBlockManager.allocate is not written yet "
                                  "(labs/prefix_cache.py)")

    def append_slot(self, seq_id) -> tuple[int, int]:
        raise NotImplementedError("Exercise 7.3: PrefixCachingBlockManager.append_slot is not written yet "
                                  "(labs/prefix_cache.py)")

    def free(self, seq_id) -> None:
        raise NotImplementedError("Exercise 7.3: PrefixCachingBlockManager.free is not written yet "
                                  "(labs/prefix_cache.py)")
