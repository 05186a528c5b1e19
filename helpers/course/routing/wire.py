"""KV events on the wire, byte for byte as vLLM sends them: a msgpack KVEventBatch.

vLLM encodes each batch with msgspec (vllm/distributed/kv_events.py: `EventBatch(msgspec.Struct, array_like=True,
omit_defaults=True)` and tagged event structs, `msgspec.msgpack.Encoder().encode(batch)` in
ZmqEventPublisher._publisher_thread). On the wire that is a msgpack array [ts, [event, ...], data_parallel_rank],
each event a map whose first key is "type" (the struct's tag: "BlockStored", "BlockRemoved", "AllBlocksCleared")
followed by its fields in order, fields left at their default omitted:

    BlockStored       block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium, lora_name
    BlockRemoved      block_hashes, medium
    AllBlocksCleared  (nothing)

msgspec is in vLLM's environment, not the course's, and msgpack is not installed either; the subset of msgpack these
batches use (nil, booleans, integers, floats, strings, bytes, arrays, maps) is small enough to write here, so the
course's router decodes vLLM's own events (chapter 9's real replicas) and its replicas publish the same bytes.
tests/test_kv_router.py checks the decoder on bytes vLLM 0.32's encoder produced.

    payload = encode_batch(ts, events)          # course events -> vLLM's bytes
    ts, events = decode_batch(payload)          # vLLM's bytes -> course events; ValueError if malformed

Block hashes are bytes (SHA-256, vLLM's default); with VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1 vLLM sends the low 64
bits as an integer instead (kv_cache_utils.maybe_convert_block_hash), which decode_batch passes through unchanged.
"""
from __future__ import annotations

import struct

from helpers.course.engine.kv_events import AllBlocksCleared, BlockRemoved, BlockStored

__all__ = ["encode_batch", "decode_batch", "packb", "unpackb"]


# ------------------------------------------------------------------------------------------ msgpack, the subset
def packb(obj) -> bytes:
    out = bytearray()
    _pack(obj, out)
    return bytes(out)


def _pack(obj, out: bytearray) -> None:
    if obj is None:
        out.append(0xC0)
    elif obj is True or obj is False:
        out.append(0xC3 if obj else 0xC2)
    elif isinstance(obj, int):
        if 0 <= obj < 128:
            out.append(obj)
        elif -32 <= obj < 0:
            out.append(obj & 0xFF)
        elif 0 <= obj < 1 << 64:
            for fmt, code, limit in ((">B", 0xCC, 1 << 8), (">H", 0xCD, 1 << 16), (">I", 0xCE, 1 << 32),
                                     (">Q", 0xCF, 1 << 64)):
                if obj < limit:
                    out.append(code)
                    out += struct.pack(fmt, obj)
                    break
        elif -(1 << 63) <= obj < 0:
            out.append(0xD3)
            out += struct.pack(">q", obj)
        else:
            raise ValueError(f"integer {obj} does not fit in 64 bits")
    elif isinstance(obj, float):
        out.append(0xCB)
        out += struct.pack(">d", obj)
    elif isinstance(obj, str):
        data = obj.encode("utf-8")
        _header(out, len(data), 0xA0, 32, (0xD9, 0xDA, 0xDB))
        out += data
    elif isinstance(obj, (bytes, bytearray)):
        _header(out, len(obj), None, 0, (0xC4, 0xC5, 0xC6))
        out += obj
    elif isinstance(obj, (list, tuple)):
        _header(out, len(obj), 0x90, 16, (None, 0xDC, 0xDD))
        for item in obj:
            _pack(item, out)
    elif isinstance(obj, dict):
        _header(out, len(obj), 0x80, 16, (None, 0xDE, 0xDF))
        for key, value in obj.items():
            _pack(key, out)
            _pack(value, out)
    else:
        raise TypeError(f"cannot encode {type(obj).__name__} as msgpack")


def _header(out: bytearray, n: int, fix, fix_limit: int, codes) -> None:
    if fix is not None and n < fix_limit:
        out.append(fix | n)
        return
    for code, fmt, limit in zip(codes, (">B", ">H", ">I"), (1 << 8, 1 << 16, 1 << 32)):
        if code is not None and n < limit:
            out.append(code)
            out += struct.pack(fmt, n)
            return
    raise ValueError(f"a msgpack object of {n} items or bytes is too large")


def unpackb(data: bytes):
    """Decode one msgpack object; ValueError if the bytes are not exactly one well-formed object."""
    try:
        obj, end = _unpack(memoryview(data), 0)
    except (IndexError, struct.error, UnicodeDecodeError) as exc:
        raise ValueError(f"malformed msgpack ({type(exc).__name__}: {exc})") from None
    if end != len(data):
        raise ValueError(f"malformed msgpack: {len(data) - end} bytes after the object")
    return obj


_FIXED = {0xCC: (">B", 1), 0xCD: (">H", 2), 0xCE: (">I", 4), 0xCF: (">Q", 8), 0xD0: (">b", 1), 0xD1: (">h", 2),
          0xD2: (">i", 4), 0xD3: (">q", 8), 0xCA: (">f", 4), 0xCB: (">d", 8)}
_LENGTH = {0xD9: (">B", 1, "str"), 0xDA: (">H", 2, "str"), 0xDB: (">I", 4, "str"), 0xC4: (">B", 1, "bin"),
           0xC5: (">H", 2, "bin"), 0xC6: (">I", 4, "bin"), 0xDC: (">H", 2, "array"), 0xDD: (">I", 4, "array"),
           0xDE: (">H", 2, "map"), 0xDF: (">I", 4, "map")}


def _unpack(buf: memoryview, i: int):
    code = buf[i]
    i += 1
    if code <= 0x7F:
        return code, i
    if code >= 0xE0:
        return code - 0x100, i
    if 0xA0 <= code <= 0xBF:
        return _sized(buf, i, code & 0x1F, "str")
    if 0x90 <= code <= 0x9F:
        return _sized(buf, i, code & 0x0F, "array")
    if 0x80 <= code <= 0x8F:
        return _sized(buf, i, code & 0x0F, "map")
    if code in (0xC0, 0xC2, 0xC3):
        return {0xC0: None, 0xC2: False, 0xC3: True}[code], i
    if code in _FIXED:
        fmt, size = _FIXED[code]
        return struct.unpack_from(fmt, buf, i)[0], i + size
    if code in _LENGTH:
        fmt, size, kind = _LENGTH[code]
        return _sized(buf, i + size, struct.unpack_from(fmt, buf, i)[0], kind)
    raise ValueError(f"msgpack type byte 0x{code:02x} is not used by KV event batches")


def _sized(buf: memoryview, i: int, n: int, kind: str):
    if kind in ("str", "bin"):
        if i + n > len(buf):
            raise IndexError("truncated")
        raw = bytes(buf[i:i + n])
        return (raw.decode("utf-8") if kind == "str" else raw), i + n
    if kind == "array":
        items = []
        for _ in range(n):
            item, i = _unpack(buf, i)
            items.append(item)
        return items, i
    mapping = {}
    for _ in range(n):
        key, i = _unpack(buf, i)
        mapping[key], i = _unpack(buf, i)
    return mapping, i


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
    return packb([float(ts), [_event_map(e) for e in events], data_parallel_rank])


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
    batch = unpackb(payload)
    if not isinstance(batch, list) or len(batch) < 2 or not isinstance(batch[1], list):
        raise ValueError("a KV event batch is an array [ts, [events], data_parallel_rank]")
    events = []
    for m in batch[1]:
        try:
            events.append(_event(m))
        except ValueError:
            events.append(None)
    return float(batch[0]), events
