"""KV events on the wire, byte for byte as vLLM sends them: a msgpack KVEventBatch.

vLLM encodes each batch with msgspec (vllm/distributed/kv_events.py: `EventBatch(msgspec.Struct, array_like=True,
omit_defaults=True)` and tagged event structs, `msgspec.msgpack.Encoder().encode(batch)` in
ZmqEventPublisher._publisher_thread). On the wire that is a msgpack array [ts, [event, ...], data_parallel_rank],
each event a map whose first key is "type" (the struct's tag: "BlockStored", "BlockRemoved", "AllBlocksCleared")
followed by its fields in order, fields left at their default omitted:

    BlockStored       block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium, lora_name
    BlockRemoved      block_hashes, medium
    AllBlocksCleared  (nothing)

The course encodes with the same library, msgspec (msgpack of plain lists and maps in that layout), so its router
decodes vLLM's own events (chapter 9's real replicas) and its replicas publish the same bytes.
tests/test_kv_router.py checks both directions on bytes vLLM 0.32's encoder produced.

    payload = encode_batch(ts, events)          # course events -> vLLM's bytes
    ts, events = decode_batch(payload)          # vLLM's bytes -> course events; ValueError if malformed

Block hashes are bytes (SHA-256, vLLM's default); with VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1 vLLM sends the low 64
bits as an integer instead (kv_cache_utils.maybe_convert_block_hash), which decode_batch passes through unchanged.
"""
from __future__ import annotations

import msgspec

from helpers.course.engine.kv_events import AllBlocksCleared, BlockRemoved, BlockStored

__all__ = ["encode_batch", "decode_batch"]


# ------------------------------------------------------------------------------------------ KV event batches
def _event_map(event) -> dict:
    if isinstance(event, BlockStored):
        return {"type": "BlockStored", "block_hashes": list(event.block_hashes),
                "parent_block_hash": event.parent_block_hash, "token_ids": list(event.token_ids),
                "block_size": event.block_size, "lora_id": None, "medium": event.medium, "lora_name": None}
    if isinstance(event, BlockRemoved):
        return {"type": "BlockRemoved", "block_hashes": list(event.block_hashes), "medium": event.medium}
    if isinstance(event, AllBlocksCleared):
        return {"type": "AllBlocksCleared"}
    raise TypeError(f"not a KV event: {type(event).__name__}")


def encode_batch(ts: float, events, data_parallel_rank: int | None = None) -> bytes:
    """vLLM's KVEventBatch bytes for the course's events (what ZmqEventPublisher sends as its payload frame)."""
    return msgspec.msgpack.encode([float(ts), [_event_map(e) for e in events], data_parallel_rank])


def _event(m):
    if not isinstance(m, dict) or "type" not in m:
        raise ValueError(f"a KV event is a map with a 'type', got {type(m).__name__}")
    kind = m["type"]
    try:
        if kind == "BlockStored":
            return BlockStored(tuple(m["block_hashes"]), m.get("parent_block_hash"), tuple(m["token_ids"]),
                               int(m["block_size"]), m.get("medium"))
        if kind == "BlockRemoved":
            return BlockRemoved(tuple(m["block_hashes"]), m.get("medium"))
    except (KeyError, TypeError) as exc:
        raise ValueError(f"malformed {kind} event: {type(exc).__name__} {exc}") from None
    if kind == "AllBlocksCleared":
        return AllBlocksCleared()
    raise ValueError(f"unknown KV event type {kind!r}")


def decode_batch(payload: bytes) -> tuple:
    """(ts, [events]) from a KVEventBatch payload. ValueError if the payload is not a batch; an event that cannot
    be read becomes None in the list (the router counts and skips it, the rest of the batch still applies)."""
    try:
        batch = msgspec.msgpack.decode(payload)
    except msgspec.DecodeError as exc:
        raise ValueError(f"malformed msgpack: {exc}") from None
    if not isinstance(batch, list) or len(batch) < 2 or not isinstance(batch[1], list):
        raise ValueError("a KV event batch is an array [ts, [events], data_parallel_rank]")
    events = []
    for m in batch[1]:
        try:
            events.append(_event(m))
        except ValueError:
            events.append(None)
    return float(batch[0]), events
