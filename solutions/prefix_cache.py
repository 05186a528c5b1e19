"""Chapter 7: prefix caching — requests that share a prefix share its KV blocks.

Exercise 7.3  `block_hashes`: a SHA-256 hash chain over the FULL blocks of a token sequence, so that a block is
              identified by its tokens AND everything before them (and the request's cache salt);
              `PrefixCachingBlockManager`: a block manager that finds a new request's leading full blocks in the
              cache and shares them (reference counts) instead of computing them again, registers every full
              block once its tokens are scheduled — generated tokens too, so a follow-up turn hits the previous
              answer — keeps freed blocks cached until their memory is needed, and then evicts the least
              recently used one — never a block some sequence still holds.

This is vLLM's automatic prefix caching (SGLang's RadixAttention does the same with a radix tree): with a shared
system prompt, the second request's prefill computes only the tokens after the cached blocks. The hash is vLLM's
(`vllm/v1/core/kv_cache_utils.py` `hash_block_tokens`, with `vllm/utils/hashing.py` `sha256`: SHA-256 of the
pickled tuple (parent hash, block tokens, extra keys)). vLLM moved from Python's `hash` to SHA-256 after a
collision advisory: a 64-bit hash an attacker can predict lets one tenant craft a prompt whose block collides
with another's, and then read attention over someone else's keys and values. The engine's KV cache manager
(helpers/course/engine/kv_cache_manager.py) drives this manager; helpers/course/paged_llama.py computes with it.
"""
from __future__ import annotations

import hashlib
import pickle
from collections import OrderedDict

from helpers.course.kv_cache import OutOfBlocks

from .paged_kv_cache import BlockManager

# The parent of a sequence's first block. vLLM 0.32 derives it from a fixed string for SHA-256 (sha256 of
# "vllm-none-hash"; older versions seeded it from PYTHONHASHSEED or os.urandom, so hashes could not be predicted from
# outside); the course fixes it to 32 zero bytes. Either way every process and replica computes the same hashes,
# which chapter 9's router needs to compare them across replicas.
NONE_HASH = bytes(32)


def hash_block_tokens(parent_hash: bytes, block_token_ids, extra_keys: tuple | None = None) -> bytes:
    """vLLM's block hash: SHA-256 of the pickled (parent hash, the block's token ids, extra keys), 32 bytes."""
    data = pickle.dumps((parent_hash, tuple(int(t) for t in block_token_ids), extra_keys),
                        protocol=pickle.HIGHEST_PROTOCOL)
    return hashlib.sha256(data).digest()


def block_hashes(token_ids, block_size: int, parent: bytes | None = None, cache_salt: str | None = None) -> list:
    """One hash per FULL block of `token_ids` (a trailing partial block has none), chained:

        h_0 = hash_block_tokens(parent or NONE_HASH, token_ids[0 : block_size], extra_0)
        h_i = hash_block_tokens(h_{i-1},             token_ids[i·block_size : (i+1)·block_size], None)

    so h_i identifies the block's tokens and every token before them: two sequences get the same h_i only if their
    first (i+1)·block_size tokens are equal. (The same tokens after a different prefix have different keys and
    values — position and context enter every layer — so they must not share a block.)
    parent: the hash of the block just before token_ids[0], to continue a chain (None: token_ids starts the
    sequence). cache_salt: mixed in as the extra key of the sequence's FIRST block only, extra_0 = (cache_salt,)
    (vLLM's rule: the salt sits at the start, and the chain carries it to every later block); None or "" adds no
    key (extra_0 = None). Returns a list of 32-byte `bytes`.
    """
    ids = [int(t) for t in token_ids]
    hashes = []
    for start in range(0, len(ids) - block_size + 1, block_size):
        extra = (cache_salt,) if cache_salt and parent is None else None
        parent = hash_block_tokens(parent if parent is not None else NONE_HASH, ids[start:start + block_size], extra)
        hashes.append(parent)
    return hashes


class PrefixCachingBlockManager(BlockManager):
    """A BlockManager whose full blocks are cached by their hash and shared between sequences.

    State (set up in __init__, on top of BlockManager's free_blocks, tables, num_tokens):
      ref_counts     {block: number of live sequences whose table holds it} for every block some sequence holds
      cached         {hash: block}: full blocks whose keys and values are (or are being) computed, by chain hash
      hash_of_block  {block: hash} for the blocks in `cached`
      evictable      OrderedDict {block: None} of cached blocks no sequence holds (ref count 0), least recently
                     used first. They still count as free (num_free_blocks), and are handed out, evicted from
                     the cache, only when free_blocks is empty.

    Exercise 7.3 (cached_prefix, _take_block, allocate, append_slot, cache_blocks, free):
      cached_prefix(token_ids, cache_salt=None) -> list of block ids: the blocks of the leading full blocks of
          token_ids found in `cached` (hashes by block_hashes, in order, stopping at the first miss). At most the
          blocks before the LAST token can hit (the last token must be computed to give the logits of the next
          one): at most (len(token_ids) - 1) // block_size blocks. Changes nothing.
      _take_block() -> a block for new contents: a free one, else the least recently used evictable one,
          evicted (its hash leaves `cached` and `hash_of_block`).
      allocate(seq_id, token_ids, cache_salt=None) -> num_cached_tokens. A new sequence gets blocks for
          token_ids (the tokens it computes now, or all it has): its cached_prefix is shared (ref count + 1; an
          evictable one leaves `evictable`), the other blocks come from _take_block. Then its full blocks are
          registered as cache_blocks does. Returns len(cached_prefix) × block_size. Raises ValueError (seq_id
          already held, empty token_ids) and OutOfBlocks (needed vs free, counting evictable blocks that are not
          among the hits) with the manager exactly as before.
      append_slot(seq_id) -> (block, offset): as BlockManager's, but a new block comes from _take_block.
      cache_blocks(seq_id, token_ids, cache_salt=None) -> list of the hashes newly registered. token_ids: the
          sequence's tokens whose keys and values are computed or scheduled in this step (a prefix of all its
          tokens, prompt and generated). Every FULL block among them that the sequence holds and that is not in
          the cache yet is registered under its hash (in order; a hash already cached by another block is left
          to that block). A trailing partial block is never cached.
      free(seq_id): every block of the sequence loses one reference; a block at 0 references becomes evictable
          if it is cached (the sequence's LAST block first, so that a sequence's tail is evicted before its head),
          else returns to free_blocks. A block that is still referenced is never freed.
    """

    def __init__(self, num_blocks: int, block_size: int):
        super().__init__(num_blocks, block_size)
        self.ref_counts: dict[int, int] = {}
        self.cached: dict[bytes, int] = {}
        self.hash_of_block: dict[int, bytes] = {}
        self.evictable: OrderedDict[int, None] = OrderedDict()

    @property
    def num_free_blocks(self) -> int:
        """Blocks that a new request can get: free ones and cached ones that no sequence holds."""
        return len(self.free_blocks) + len(self.evictable)

    def truncate(self, seq_id, num_tokens: int) -> None:
        """Forget positions num_tokens .. of a sequence (rejected speculative tokens): blocks past the new end that
        no other sequence holds go back to the free list (a block past the end is never a cached one: only full
        blocks of computed tokens are cached)."""
        table = self.block_table(seq_id)
        if not 1 <= num_tokens <= self.num_tokens[seq_id]:
            raise ValueError(f"num_tokens={num_tokens} must be in [1, {self.num_tokens[seq_id]}]")
        keep = self.blocks_needed(num_tokens)
        for block in table[keep:]:
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                del self.ref_counts[block]
                if block in self.hash_of_block:
                    self.evictable[block] = None
                else:
                    self.free_blocks.append(block)
        self.tables[seq_id] = table[:keep]
        self.num_tokens[seq_id] = num_tokens

    def cached_prefix(self, token_ids, cache_salt: str | None = None) -> list[int]:
        hits = []
        usable = (len(token_ids) - 1) // self.block_size
        for h in block_hashes(list(token_ids)[:usable * self.block_size], self.block_size, cache_salt=cache_salt):
            if h not in self.cached:
                break
            hits.append(self.cached[h])
        return hits

    def _take_block(self) -> int:
        if self.free_blocks:
            return self.free_blocks.popleft()
        block, _ = self.evictable.popitem(last=False)
        del self.cached[self.hash_of_block.pop(block)]
        return block

    def allocate(self, seq_id, token_ids, cache_salt: str | None = None) -> int:
        token_ids = [int(t) for t in token_ids]
        if seq_id in self.tables:
            raise ValueError(f"sequence {seq_id!r} already holds blocks {self.tables[seq_id]}: free it first")
        if not token_ids:
            raise ValueError("token_ids is empty: a sequence needs at least one token")
        hits = self.cached_prefix(token_ids, cache_salt)
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
        for _ in range(needed):
            block = self._take_block()
            self.ref_counts[block] = 1
            table.append(block)
        self.tables[seq_id] = table
        self.num_tokens[seq_id] = len(token_ids)
        self.cache_blocks(seq_id, token_ids, cache_salt)
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

    def cache_blocks(self, seq_id, token_ids, cache_salt: str | None = None) -> list:
        table = self.block_table(seq_id)
        new = []
        for i, h in enumerate(block_hashes(token_ids, self.block_size, cache_salt=cache_salt)[:len(table)]):
            block = table[i]
            if block in self.hash_of_block or h in self.cached:
                continue
            self.cached[h] = block
            self.hash_of_block[block] = h
            new.append(h)
        return new

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
