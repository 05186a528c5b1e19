"""helpers/strategy.py: the strategy calculator's arithmetic and the seeds' rules of thumb."""
import pytest

from helpers.strategy import Cluster, Model, best, evaluate, layouts, zero_bytes_per_gpu


def test_zero_memory_matches_the_paper():
    # ZeRO paper, Figure 1: 7.5 B parameters, 64 GPUs, mixed-precision Adam -> 120, 31.4, 16.6, 1.9 GB
    got = [round(zero_bytes_per_gpu(7.5e9, 64, s) / 1e9, 1) for s in range(4)]
    assert got == [120.0, 31.4, 16.6, 1.9]
    with pytest.raises(ValueError):
        zero_bytes_per_gpu(1e9, 8, 4)


def test_layout_arithmetic():
    model = Model(params=8e9, layers=32, hidden=4096, heads=32, kv_heads=8)
    row = evaluate(model, Cluster(gpus=8), dp=2, pp=2, tp=2, seq_len=1024, batch=4)
    assert row.weights_gb == pytest.approx(8e9 * 2 / 4 / 1e9)
    # 2 (K,V) x 16 layers x 4 kv heads x 128 dims x 1024 tokens x 2 sequences x 2 bytes
    assert row.kv_cache_gb == pytest.approx(2 * 16 * 4 * 128 * 1024 * 2 * 2 / 1e9)
    assert row.tp_bytes_per_token == pytest.approx(16 * 2 * 2 * (1 / 2) * 4096 * 2)
    assert row.pp_bytes_per_token == 4096 * 2
    assert row.tp_link == "NVLink" and row.pp_link == "NVLink" and row.fits
    assert not evaluate(model, Cluster(gpus=8), dp=1, pp=1, tp=8, seq_len=1024, batch=4).problems
    assert evaluate(model, Cluster(gpus=12), dp=1, pp=1, tp=12, seq_len=1024, batch=4).problems


def test_every_layout_multiplies_to_the_gpu_count():
    rows = layouts(Model.llama(8), Cluster(gpus=16), 4096, 16, feasible_only=False)
    assert sorted((r.dp, r.pp, r.tp) for r in rows) == sorted(
        (16 // (p * t), p, t) for t in (1, 2, 4, 8, 16) for p in (1, 2, 4, 8, 16) if 16 % (p * t) == 0)


def test_rules_of_thumb():
    small = best(Model.llama(1), Cluster(gpus=8), 4096, 64)
    assert (small.tp, small.pp) == (1, 1)                       # small model: data parallel
    large = best(Model.llama(70), Cluster(gpus=8), 4096, 64)
    assert large.tp > 1 and large.tp_link == "NVLink"           # large: model parallel, TP inside the node
    huge = best(Model.llama(405), Cluster(gpus=64), 4096, 64)
    assert huge.dp > 1 and huge.pp > 1 and huge.tp == 8         # huge: hybrid, TP = one node, PP across
    assert huge.pp_link == "InfiniBand"
