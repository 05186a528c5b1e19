"""The engine's KV cache manager: which blocks each request holds, prefix-cache lookups, KV events, metrics.

It is vLLM V1's `KVCacheManager` (`vllm/v1/core/kv_cache_manager.py`) in the course's size, around the
learner's block managers: exercise 7.1's `BlockManager` (labs/paged_kv_cache.py), or with prefix caching
exercise 7.3's `PrefixCachingBlockManager` (labs/prefix_cache.py). The scheduler calls three things:

    get_computed_blocks(request) -> tokens     a waiting request's leading full blocks found in the prefix cache
                                               (never its last token: it must be computed to give logits)
    allocate_slots(request, num_new_tokens, num_new_computed_tokens, num_lookahead_tokens) -> bool
                                               blocks for everything up to num_computed + new (+ look-ahead), or
                                               False, with nothing changed, when they do not fit; then the full
                                               blocks of the tokens scheduled so far are cached (vLLM caches
                                               min(num_computed + num_new, num_tokens) tokens at allocation:
                                               generated tokens too, so a follow-up turn hits the answer)
    free(request)                              blocks back (cached ones stay hittable until evicted)

Metrics as vLLM counts them (`vllm/v1/metrics/stats.py` PrefixCacheStats): one lookup per admission, of
request.num_tokens tokens; a preempted request's re-admission is recorded apart (preempted_queries /
preempted_hits), not in queries / hits. KV events (kv_events.py) for every block stored in and removed from
the cache, from what each call changed (the cache map notes the hashes that enter and leave it). A request's
block hashes (exercise 7.3's block_hashes) are computed once per block and kept on it, `request.block_hashes`,
so a prompt that waits is not hashed again at every step (vLLM keeps the same list: vllm/v1/request.py).
`rollback(request, num_tokens)` drops the slots of draft tokens that were rejected (chapter 10).
"""
from __future__ import annotations

from dataclasses import dataclass

from helpers.course.engine.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventLog
from helpers.course.kv_cache import OutOfBlocks
from helpers.impl import load_impl

__all__ = ["KVCacheManager", "PrefixCacheStats", "UnlimitedKV"]


@dataclass
class PrefixCacheStats:
    """Tokens looked up and found at admission; re-admissions after a preemption counted apart."""
    requests: int = 0
    queries: int = 0
    hits: int = 0
    preempted_requests: int = 0
    preempted_queries: int = 0
    preempted_hits: int = 0

    def record(self, num_tokens: int, num_hits: int, preempted: bool) -> None:
        if preempted:
            self.preempted_requests += 1
            self.preempted_queries += num_tokens
            self.preempted_hits += num_hits
        else:
            self.requests += 1
            self.queries += num_tokens
            self.hits += num_hits

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


class _CacheChanges(dict):
    """The block manager's `cached` {hash: block} map, noting the hashes that enter and leave it: what vLLM's
    BlockPool turns into KV events where it changes the cache (`vllm/v1/core/block_pool.py`: `cache_full_blocks`
    queues a BlockStored for the blocks it just cached, `_maybe_evict_cached_block` a BlockRemoved for the block it
    just evicted). touched: {hash: whether it was cached before its first change} since the last take()."""

    def __init__(self, *args):
        super().__init__(*args)
        self.touched: dict = {}

    def __setitem__(self, h, block):
        if h not in self.touched:
            self.touched[h] = h in self
        super().__setitem__(h, block)

    def __delitem__(self, h):
        if h not in self.touched and h in self:
            self.touched[h] = True
        super().__delitem__(h)

    def pop(self, h, *default):
        if h not in self.touched and h in self:
            self.touched[h] = True
        return super().pop(h, *default)

    def popitem(self):
        h, block = super().popitem()
        self.touched.setdefault(h, True)
        return h, block

    def setdefault(self, h, default=None):
        if h not in self:
            self[h] = default
        return self[h]

    def update(self, *args, **kwargs):
        for h, block in dict(*args, **kwargs).items():
            self[h] = block

    def __ior__(self, other):
        self.update(other)
        return self

    def clear(self):
        for h in self:
            self.touched.setdefault(h, True)
        super().clear()

    def take(self) -> tuple[list, list]:
        """(hashes that left the map, in the order they left; hashes that entered it) since the last take — what
        changed in between, so a hash evicted and cached again (or the reverse) is in neither."""
        removed = [h for h, was in self.touched.items() if was and h not in self]
        stored = [h for h, was in self.touched.items() if not was and h in self]
        self.touched.clear()
        return removed, stored


class KVCacheManager:
    """num_blocks × block_size token slots; enable_caching: prefix caching (exercise 7.3's manager);
    events: a KVEventLog to emit to (None: no events); block_manager: one built already (graders)."""

    def __init__(self, num_blocks: int, block_size: int = 16, enable_caching: bool = False,
                 events: KVEventLog | None = None, block_manager=None):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks={num_blocks} and block_size={block_size} must be at least 1")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_caching, self.events = enable_caching, events
        if block_manager is None:
            if enable_caching:
                block_manager = load_impl("prefix_cache").PrefixCachingBlockManager(num_blocks, block_size)
            else:
                block_manager = load_impl("paged_kv_cache").BlockManager(num_blocks, block_size)
        self.block_manager = block_manager
        self._hash_blocks = load_impl("prefix_cache").block_hashes if enable_caching else None
        # exercise 7.3's manager keys its `cached` map by those hashes: look a request's hashes up in it directly
        # (another manager, e.g. a grader's, is asked with its own cached_prefix)
        self._by_hash = enable_caching and isinstance(block_manager,
                                                      load_impl("prefix_cache").PrefixCachingBlockManager)
        self.stats = PrefixCacheStats()
        self._cached_upto: dict = {}          # rid -> full blocks already offered to the cache

    # ------------------------------------------------------------------ what the scheduler calls
    def get_computed_blocks(self, request) -> int:
        """Tokens at the start of `request` whose blocks the prefix cache holds (a multiple of block_size,
        < request.num_tokens). Changes nothing."""
        if not self.enable_caching:
            return 0
        return len(self._cached_prefix(request, (request.num_tokens - 1) // self.block_size)) * self.block_size

    def _cached_prefix(self, request, max_blocks: int) -> list:
        """The blocks of the request's leading full blocks (at most max_blocks) found in the cache: its block
        hashes, computed once (request.block_hashes_upto), looked up in the manager's `cached` map — what exercise
        7.3's cached_prefix finds, without hashing the prompt again at every step the request waits (vLLM's
        get_computed_blocks looks request.block_hashes up the same way: find_longest_cache_hit)."""
        manager = self.block_manager
        if not self._by_hash:
            return manager.cached_prefix(request.all_token_ids, request.cache_salt)[:max_blocks]
        cached, hits = manager.cached, []
        for h in self._request_hashes(request, max_blocks * self.block_size):
            block = cached.get(h)
            if block is None or len(hits) == max_blocks:
                break
            hits.append(block)
        return hits

    def allocate_slots(self, request, num_new_tokens: int, num_new_computed_tokens: int = 0,
                       num_lookahead_tokens: int = 0, full_sequence_must_fit: bool = False,
                       num_external_computed_tokens: int = 0) -> bool:
        """Blocks for positions up to num_computed + new_computed + external + num_new_tokens + look-ahead.
        A request that holds none yet shares its num_new_computed_tokens cached tokens. False (nothing changed)
        when the blocks do not fit, or, with full_sequence_must_fit (vLLM's admission gate), when its whole
        current sequence would not."""
        manager, rid = self.block_manager, request.rid
        computed = request.num_computed_tokens + num_new_computed_tokens + num_external_computed_tokens
        end = computed + num_new_tokens + num_lookahead_tokens
        tokens = request.all_token_ids
        changes = self._changes()
        if rid not in manager.tables:
            hit_blocks = num_new_computed_tokens // self.block_size
            # hit blocks no one holds are counted free: taking them leaves fewer for the rest (as vLLM's
            # get_num_blocks_to_allocate counts them)
            reused = 0 if not hit_blocks else sum(
                1 for b in self._cached_prefix(request, hit_blocks) if b in manager.evictable)
            if full_sequence_must_fit and manager.blocks_needed(max(end, request.num_tokens)) - hit_blocks + reused \
                    > manager.num_free_blocks:
                return False
            try:
                if self.enable_caching:
                    got = manager.allocate(rid, tokens[:min(end, len(tokens))], request.cache_salt)
                    if got != num_new_computed_tokens:
                        manager.free(rid)
                        raise AssertionError(f"allocate found {got} cached tokens, get_computed_blocks "
                                             f"{num_new_computed_tokens} (labs/prefix_cache.py)")
                    self._cached_upto[rid] = min(end, len(tokens)) // self.block_size   # allocate cached them
                else:
                    manager.allocate(rid, min(end, len(tokens)))
            except OutOfBlocks:
                return False
            held = manager.seq_len(rid)
        else:
            held = manager.seq_len(rid)
            if end > held:
                needed = manager.blocks_needed(end) - len(manager.block_table(rid))
                if needed > manager.num_free_blocks:
                    return False
        for _ in range(end - held):          # look-ahead slots, or a running request's new tokens
            manager.append_slot(rid)
        if self.enable_caching:
            upto = min(computed + num_new_tokens, request.num_tokens)
            if upto // self.block_size > self._cached_upto.get(rid, 0):
                manager.cache_blocks(rid, tokens[:upto], request.cache_salt)
                self._cached_upto[rid] = upto // self.block_size
            if changes is not None:
                self._emit(changes, request, upto)
        return True

    def record_admission(self, request, num_hits: int) -> None:
        """vLLM's prefix-cache metric: one lookup per admission, preempted re-admissions apart."""
        if self.enable_caching:
            self.stats.record(request.num_tokens, num_hits, request.num_preemptions > 0)

    def free(self, request) -> None:
        """Give back the request's blocks (a cached block stays in the cache, evictable)."""
        self._cached_upto.pop(request.rid, None)
        if request.rid in self.block_manager.tables:
            changes = self._changes()
            self.block_manager.free(request.rid)
            if changes is not None:
                self._emit(changes, request, 0)

    def rollback(self, request, num_tokens: int) -> None:
        """Keep only the request's first num_tokens positions (rejected speculative tokens' slots go back)."""
        self.block_manager.truncate(request.rid, num_tokens)

    def reset_prefix_cache(self) -> bool:
        """Drop every cached block no request holds (vLLM's reset_prefix_cache: only when nothing runs)."""
        manager = self.block_manager
        if not self.enable_caching or manager.tables:
            return False
        for block in list(manager.evictable):
            del manager.cached[manager.hash_of_block.pop(block)]
            manager.free_blocks.append(block)
        manager.evictable.clear()
        if self.events is not None:
            self.events.emit(AllBlocksCleared())
        return True

    # ------------------------------------------------------------------ what the engine and metrics read
    def block_table(self, rid) -> list[int]:
        return self.block_manager.block_table(rid)

    @property
    def num_free_blocks(self) -> int:
        return self.block_manager.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of blocks held by requests (vllm:kv_cache_usage_perc)."""
        return 1.0 - self.block_manager.num_free_blocks / self.num_blocks

    # ------------------------------------------------------------------ events
    def _changes(self):
        """The cache map, noting its changes from now on (None when no events are sent). Changes made between two
        calls (reset_prefix_cache, which sends its own event) are not this call's."""
        if not self.enable_caching or self.events is None:
            return None
        cached = self.block_manager.cached
        if type(cached) is not _CacheChanges:
            cached = self.block_manager.cached = _CacheChanges(cached)
        cached.touched.clear()
        return cached

    def _emit(self, changes: _CacheChanges, request, upto: int) -> None:
        """The events of one call from what it changed: one BlockRemoved of the hashes evicted (in eviction
        order), then a BlockStored per run of consecutive blocks of the request just cached."""
        removed, stored = changes.take()
        if removed:
            self.events.emit(BlockRemoved(tuple(removed)))
        if not stored:
            return
        hashes = self._request_hashes(request, upto)
        index = {h: i for i, h in enumerate(hashes)}
        run = []
        for h in sorted(stored, key=lambda h: index.get(h, -1)):
            i = index.get(h)
            if i is None:
                continue
            if run and index[run[-1]] != i - 1:
                self._stored(run, hashes, request)
                run = []
            run.append(h)
        if run:
            self._stored(run, hashes, request)

    def _request_hashes(self, request, upto: int) -> list:
        """The request's block hashes over (at least) its first `upto` tokens, hashed once (Request.block_hashes_upto
        with exercise 7.3's block_hashes)."""
        return request.block_hashes_upto(upto, self.block_size, self._hash_blocks)

    def _stored(self, run: list, hashes: list, request) -> None:
        first = hashes.index(run[0])
        size = self.block_size
        self.events.emit(BlockStored(tuple(run), hashes[first - 1] if first else None,
                                     tuple(request.all_token_ids[first * size:(first + len(run)) * size]), size))


class UnlimitedKV:
    """The KV side of an engine whose memory is not the subject (chapter 6's contiguous cache, a modelled run):
    every allocation fits, nothing is cached."""
    enable_caching = False
    events = None

    def __init__(self):
        self.stats = PrefixCacheStats()

    def get_computed_blocks(self, request) -> int:
        return 0

    def allocate_slots(self, request, num_new_tokens: int, num_new_computed_tokens: int = 0,
                       num_lookahead_tokens: int = 0, full_sequence_must_fit: bool = False,
                       num_external_computed_tokens: int = 0) -> bool:
        return True

    def record_admission(self, request, num_hits: int) -> None:
        pass

    def free(self, request) -> None:
        pass

    @property
    def usage(self) -> float:
        return 0.0
