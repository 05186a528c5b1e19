"""KV events: what a KV cache manager tells the outside world about its prefix cache (chapter 9's router).

vLLM publishes the same three events when started with `--kv-events-config` (`vllm/distributed/kv_events.py`:
BlockStored, BlockRemoved, AllBlocksCleared, sent in batches over ZeroMQ). A router that applies them keeps an
index of which block hashes each replica holds, and sends a request where its prefix is already cached.

    log = KVEventLog()
    manager = KVCacheManager(..., events=log)
    ... run the engine ...
    batch = log.take()          # the events since the last take, in order
"""
from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["BlockStored", "BlockRemoved", "AllBlocksCleared", "KVEventLog"]


@dataclass(frozen=True)
class BlockStored:
    """Full blocks entered the prefix cache: their hashes in order, the hash of the block before the first (None
    at the start of a sequence), and their token ids (block_size per block)."""
    block_hashes: tuple
    parent_block_hash: bytes | None
    token_ids: tuple
    block_size: int
    medium: str = "GPU"        # vLLM's name for the device tier (the pool), whatever the device


@dataclass(frozen=True)
class BlockRemoved:
    """Blocks left the prefix cache (evicted to make room)."""
    block_hashes: tuple
    medium: str = "GPU"


@dataclass(frozen=True)
class AllBlocksCleared:
    """The whole prefix cache was dropped (vLLM's reset_prefix_cache; a restarted replica)."""


@dataclass
class KVEventLog:
    """Collects events in order; `take()` hands them over and forgets them (a publisher sends each batch)."""
    events: list = field(default_factory=list)
    total: int = 0

    def emit(self, event) -> None:
        self.events.append(event)
        self.total += 1

    def take(self) -> list:
        events, self.events = self.events, []
        return events
