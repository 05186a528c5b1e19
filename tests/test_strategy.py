"""helpers/course/strategy.py: the strategy calculator's arithmetic and the seeds' rules of thumb."""
import pytest
import torch

from helpers.course.strategy import Cluster, Model, best, evaluate, layouts, zero_bytes_per_gpu


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


def test_kv_cache_stops_shrinking_at_tp_equal_kv_heads():
    # Llama-3-70B: 8 KV heads. Past tp = 8 each KV head is copied, so neither the cache nor the K/V projections
    # shrink any further (the old calculator divided the K/V projection weights by tp all the way).
    m = Model.llama(70)
    rows = {tp: evaluate(m, Cluster(gpus=tp), dp=1, pp=1, tp=tp, seq_len=4096, batch=8) for tp in (4, 8, 16, 32)}
    assert rows[16].kv_cache_gb == rows[8].kv_cache_gb == rows[32].kv_cache_gb == rows[4].kv_cache_gb / 2
    assert (rows[8].kv_copies, rows[16].kv_copies, rows[32].kv_copies) == (1, 2, 4)
    assert "stopped shrinking" in str(rows[16]) and "stopped shrinking" not in str(rows[8])
    kv_proj = 2 * 80 * 8192 * 8 * 128
    assert m.kv_proj_params == kv_proj
    assert rows[16].weights_gb * 1e9 == pytest.approx(((m.params - kv_proj) / 16 + kv_proj / 8) * 2)
    assert rows[16].weights_gb * 1e9 > m.params * 2 / 16        # not params/tp: the K/V weights are copied
    # the same rule as chapter 2's memory arithmetic, in one place
    from helpers.course.memory import kv_bytes_per_token, kv_heads_per_rank
    for tp in (1, 2, 8, 16, 64):
        got = evaluate(m, Cluster(gpus=tp), dp=1, pp=1, tp=tp, seq_len=100, batch=1).kv_cache_gb * 1e9
        assert got == pytest.approx(kv_bytes_per_token(80, kv_heads_per_rank(8, tp), 128, 2) * 100)


def _kv_job(rank, world_size, config, prompt):
    """Shard a model over all ranks with the course's Llama TP plan, prefill, and count this rank's bytes."""
    from transformers import LlamaForCausalLM

    from helpers import load_impl
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    if world_size > 1:
        load_impl("tp_llama").shard_llama(model)
    with torch.no_grad():
        cache = model(prompt, use_cache=True).past_key_values
    kv_cache = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    attn = model.model.layers[0].self_attn
    kv_weights = sum(p.numel() * p.element_size() for proj in (attn.k_proj, attn.v_proj) for p in proj.parameters())
    return kv_cache, kv_weights


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_calculator_kv_figures_match_a_real_tp_run(tp, monkeypatch):
    """The calculator's formulas against real shards: a Llama with 4 query heads and 2 KV heads on tp ranks
    (tp=4 copies each KV head on 2 ranks) holds exactly the K/V weights and KV cache the calculator says."""
    pytest.importorskip("solutions.tp_llama")
    monkeypatch.setenv("COURSE_IMPL", "solutions")      # the reference TP plan (this is not an exercise)
    from transformers import LlamaConfig

    from helpers import launch
    from helpers.course.strategy import kv_cache_bytes_per_gpu, weight_bytes_per_gpu
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    prompt = torch.arange(10).unsqueeze(0)
    results = launch(_kv_job, tp, config, prompt, show_output=False)
    spec = Model(params=0, layers=2, hidden=64, heads=4, kv_heads=2, bytes_per_value=4)
    want_cache = kv_cache_bytes_per_gpu(spec, tp, 1, tokens=10)
    want_kv_weights = weight_bytes_per_gpu(Model(spec.kv_proj_params, 2, 64, 4, 2, 4), tp, 1) / spec.layers
    for rank, (kv_cache, kv_weights) in enumerate(results):
        assert kv_cache == want_cache, f"tp={tp}: rank {rank} caches {kv_cache} B of K/V, calculator says {want_cache}"
        assert kv_weights == want_kv_weights, \
            f"tp={tp}: rank {rank} holds {kv_weights} B of K/V projection weights per layer, " \
            f"calculator says {want_kv_weights}"
