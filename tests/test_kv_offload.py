"""The given plumbing of chapter 9's KV offload tier (helpers/course/kv_offload.py): the host tier's process and
its wire protocol, the client's index (LRU eviction, what a load of an evicted block does), the byte counts on
both sides against the formula, TierConnector's load/save through the engine's pool callbacks, and the
recompute-vs-load arithmetic. Exercise 9.3's decisions are graded in tests/graders/test_ch09_offload.py."""
from __future__ import annotations

import pytest
import torch

from helpers import launch
from helpers.course.kv_offload import HostTierClient, TierConnector, block_bytes, recompute_vs_load, serve_host_tier
from helpers.course.memory import kv_bytes_per_token

SHAPE = dict(layers=2, block_size=4, kv_heads=2, head_dim=3)


def _hash(i: int) -> bytes:
    return bytes([i]) * 32


def _blocks(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 2, 4, 2, 3, generator=g)


def _tier_job(rank, world_size):
    if rank == 1:
        return serve_host_tier(0, capacity_blocks=3, **SHAPE)
    tier = HostTierClient(capacity_blocks=3, peer=1, **SHAPE)
    a, b = _blocks(2, 0), _blocks(2, 1)
    tier.store([_hash(0), _hash(1)], a)
    tier.store([_hash(2), _hash(3)], b)                # 4 blocks in 3 slots: hash 0, the least recent, goes
    out = {"held": [tier.lookup(_hash(i)) for i in range(4)], "evicted": tier.blocks_evicted}
    got = tier.load([_hash(3), _hash(1)])
    out["same"] = torch.equal(got[0], b[1]) and torch.equal(got[1], a[1])
    try:
        tier.load([_hash(0)])
        out["missing"] = "loaded"
    except KeyError as exc:
        out["missing"] = str(exc)
    out["client"] = tier.figures()
    out["side"] = tier.close()
    return out


def test_host_tier_in_another_process_stores_loads_and_counts_bytes():
    client, side = launch(_tier_job, 2, show_output=False)
    per_block = 4 * kv_bytes_per_token(2, 2, 3, 4)          # block_size × 2 × layers × kv_heads × head_dim × 4 B
    assert block_bytes(4, 2, 2, 3) == per_block == 4 * 2 * 2 * 2 * 3 * 4
    assert client["held"] == [False, True, True, True] and client["evicted"] == 1
    assert client["same"], "a load returns the blocks stored under those hashes"
    assert "does not hold" in client["missing"]
    figures = client["client"]
    assert figures["kv_bytes_sent"] == 4 * per_block and figures["kv_bytes_received"] == 2 * per_block
    assert client["side"] == side
    assert (side["kv_bytes_received"], side["kv_bytes_sent"], side["stores"], side["loads"]) == \
        (4 * per_block, 2 * per_block, 4, 2)
    assert side["blocks_held"] == 3


class _Everything(TierConnector):
    """Loads every full block the tier holds, saves every full computed block: enough to drive the plumbing."""

    def get_num_new_matched_tokens(self, request, num_computed_tokens):
        return 0

    def blocks_to_save(self, request, num_computed_tokens):
        return list(range(num_computed_tokens // self.block_size))


def test_connector_plumbing_moves_whole_blocks_through_the_pool_callbacks():
    from helpers.course.engine import Request
    hasher = lambda ids, size, parent=None, cache_salt=None: [  # noqa: E731
        bytes([len(ids[:(i + 1) * size]) % 256]) * 32 for i in range(len(ids) // size)]
    tier = HostTierClient(capacity_blocks=8, **SHAPE)
    connector = _Everything(tier, 4, 2, hasher)
    pool = [(torch.randn(12, 2, 3), torch.randn(12, 2, 3)) for _ in range(2)]
    request = Request("r", list(range(10)), 1)
    connector.save(request, 9, lambda layer, start, count: (pool[layer][0][start:start + count],
                                                            pool[layer][1][start:start + count]))
    assert tier.blocks_stored == 2 and connector.saves == [("r", [0, 1])]
    written = {}
    connector.load(request, 4, 4, lambda layer, k, v: written.setdefault(layer, (k, v)))
    assert connector.loads == [("r", 4, 4, [hasher(list(range(8)), 4)[1]])]
    for layer in range(2):
        assert torch.equal(written[layer][0], pool[layer][0][4:8])
        assert torch.equal(written[layer][1], pool[layer][1][4:8])
    with pytest.raises(ValueError, match="whole blocks"):
        connector.load(request, 8, 4, None)                # block 2 is not full


def test_recompute_vs_load_arithmetic():
    rows = recompute_vs_load("Llama-3-8B", context_tokens=1024, peak_tflops=1000.0, efficiency=1.0,
                             links={"x": 10.0})
    n, params = 1024, 8.03e9
    flops = 2 * params * n + 4 * 32 * 128 * 32 * n * (n + 1) / 2
    kv = n * 2 * 32 * 8 * 128 * 2
    assert rows[0]["flops"] == pytest.approx(flops) and rows[0]["kv_bytes"] == kv
    assert rows[0]["ratio"] == pytest.approx((flops / 1e15) / (kv / 1e10))
