"""Chapter 10's given MLA code (helpers/course/mla.py) against transformers' DeepseekV3Attention, the KV-bytes
formula against the bytes a real cache holds, and the DP-attention + EP layout (helpers/course/dp_attention.py)
on 4 real ranks: the same tokens as one process, the KV bytes per rank, and the idle rank's dummy forward."""
import pytest
import torch

from helpers.claims import max_abs_diff, tolerance
from helpers.course.memory import kv_bytes_per_token, mla_kv_bytes_per_token
from helpers.course.mla import LatentKVCache, from_deepseek_v3, tiny_deepseek_v3_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _hf_attention(q_lora_rank, rope_interleave, seed=0):
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, DeepseekV3RotaryEmbedding
    config = tiny_deepseek_v3_config(q_lora_rank=q_lora_rank, rope_interleave=rope_interleave)
    torch.manual_seed(seed)
    hf = DeepseekV3Attention(config, layer_idx=0).eval()
    with torch.no_grad():
        for p in hf.parameters():
            torch.nn.init.normal_(p, std=0.2)
    return config, hf, DeepseekV3RotaryEmbedding(config)


@pytest.mark.parametrize("q_lora_rank,rope_interleave", [(None, False), (24, True)])
def test_mla_layer_equals_transformers_deepseek_v3_attention(q_lora_rank, rope_interleave):
    """Prefill of 7 tokens, then one decode step on the cache: outputs and the cached latents equal transformers'."""
    from transformers import DynamicCache
    config, hf, rotary = _hf_attention(q_lora_rank, rope_interleave)
    ours = from_deepseek_v3(hf)
    hf_cache, cache = DynamicCache(config=config), LatentKVCache(config.kv_lora_rank, config.qk_rope_head_dim)
    torch.manual_seed(1)
    x = torch.randn(1, 8, config.hidden_size)
    with torch.no_grad():
        pos = torch.arange(7)[None]
        mask = torch.full((7, 7), float("-inf")).triu(1)[None, None]
        want, _ = hf(x[:, :7], rotary(x, pos), mask, past_key_values=hf_cache)
        got = ours(x[0, :7], pos[0], cache, "a")
        pos = torch.tensor([[7]])
        want_decode, _ = hf(x[:, 7:], rotary(x, pos), None, past_key_values=hf_cache)
        got_decode = ours(x[0, 7:], pos[0], cache, "a")
    # the same operations in the same order, up to transformers' fused kernels: 64 eps of float32 covers it
    assert max_abs_diff(got, want[0]) <= tolerance(want, torch.float32, 64)
    assert max_abs_diff(got_decode, want_decode[0]) <= tolerance(want_decode, torch.float32, 64)
    c_kv, k_rope = cache.latents("a")
    layer = hf_cache.layers[0]                                    # transformers caches the latents too
    assert layer.keys.shape == (1, 1, 8, config.kv_lora_rank) and layer.values.shape == (1, 1, 8, 8)
    assert max_abs_diff(c_kv, layer.keys[0, 0]) <= tolerance(layer.keys, torch.float32, 64)
    assert max_abs_diff(k_rope, layer.values[0, 0]) <= tolerance(layer.values, torch.float32, 64)


def test_mla_kv_bytes_formula_counts_what_the_caches_hold():
    """The formula against the bytes held by transformers' cache and by ours after 7 tokens (float32)."""
    from transformers import DynamicCache
    config, hf, rotary = _hf_attention(None, False)
    hf_cache, cache = DynamicCache(config=config), LatentKVCache(config.kv_lora_rank, config.qk_rope_head_dim)
    x = torch.randn(1, 7, config.hidden_size)
    pos = torch.arange(7)[None]
    with torch.no_grad():
        hf(x, rotary(x, pos), torch.full((7, 7), float("-inf")).triu(1)[None, None], past_key_values=hf_cache)
        from_deepseek_v3(hf)(x[0], pos[0], cache, "a")
    layer = hf_cache.layers[0]
    held = layer.keys.nbytes + layer.values.nbytes
    per_token = mla_kv_bytes_per_token(1, config.kv_lora_rank, config.qk_rope_head_dim, bytes_per_value=4)
    assert held == cache.nbytes() == 7 * per_token
    # and it is the one KV formula with one "head" of half the latent + rope width
    assert per_token == kv_bytes_per_token(1, 1, (config.kv_lora_rank + config.qk_rope_head_dim) / 2, 4)


# ------------------------------------------------------------------------ DP attention + EP on 4 real ranks

def _cached_tokens(requests):
    """Tokens each request leaves in the cache: its prompt and every generated token but the last."""
    return {r.seq: len(r.prompt) + r.max_new_tokens - 1 for r in requests}


def test_dp_attention_with_ep_equals_one_process_and_shards_the_latent_cache():
    from helpers import launch
    from helpers.course.dp_attention import EXAMPLE_REQUESTS, generate_dp, generate_single, generate_tp, \
        tiny_mla_moe_model
    requests = EXAMPLE_REQUESTS
    assignment = {r.seq: i % 4 for i, r in enumerate(requests)}
    ref = generate_single(tiny_mla_moe_model(), requests)
    dp = launch(generate_dp, 4, requests, assignment, show_output=False)
    tp = launch(generate_tp, 4, requests, show_output=False)
    model = tiny_mla_moe_model()
    c = model.mla_config
    per_token = mla_kv_bytes_per_token(len(model.layers), c.kv_lora_rank, c.qk_rope_head_dim, bytes_per_value=4)
    cached = _cached_tokens(requests)
    assert ref["kv_bytes"] == per_token * sum(cached.values())
    for rank, out in enumerate(dp):
        assert out["requests"] == [s for s, r in assignment.items() if r == rank]
        assert out["experts"] == [2 * rank, 2 * rank + 1]
        # the experts' all_to_all reorders sums over top_k=2 rows and hidden=32 terms: 64 eps of float32
        for seq, toks in out["tokens"].items():
            assert toks == ref["tokens"][seq]
            assert max_abs_diff(out["logits"][seq], ref["logits"][seq]) <= tolerance(ref["logits"][seq],
                                                                                      torch.float32, 64)
        assert out["kv_bytes"] == per_token * sum(cached[s] for s in out["requests"])
        assert out["dummy_batches"] == out["steps"] - max(r.max_new_tokens for r in requests
                                                         if r.seq in out["requests"])
    for out in tp:                                           # every TP rank holds every request's latents
        assert out["tokens"] == ref["tokens"] and out["kv_bytes"] == ref["kv_bytes"]


def _idle_rank_job(rank, world_size, requests, assignment, dummy_batch):
    import os
    from helpers.course.dp_attention import generate_dp
    print(f"pid {os.getpid()}")
    return generate_dp(rank, world_size, requests, assignment, dummy_batch=dummy_batch)


def test_an_idle_dp_rank_without_the_dummy_batch_hangs_the_ep_collectives():
    """Rank 3 gets no request. Without vLLM's dummy forward its peers wait in the MoE all_to_all while it waits in
    the step's all_reduce: the launcher's timeout names where every rank was stuck and leaves no process. With
    the dummy batch the same job completes."""
    import os
    import re
    from helpers import launch
    from helpers.course.dp_attention import EXAMPLE_REQUESTS
    from helpers.launch import JobTimeout
    assignment = {r.seq: i % 3 for i, r in enumerate(EXAMPLE_REQUESTS)}
    with pytest.raises(JobTimeout) as hung:
        launch(_idle_rank_job, 4, EXAMPLE_REQUESTS, assignment, False, timeout=3, show_output=False)
    stacks = hung.value.stacks
    assert all("all_to_all_single" in stacks[r] for r in (0, 1, 2)), stacks
    assert "all_reduce" in stacks[3] and "all_to_all" not in stacks[3], stacks[3]
    pids = [int(re.search(r"pid (\d+)", out)[1]) for out in hung.value.outputs]
    assert not [p for p in pids if os.path.exists(f"/proc/{p}")], "a rank outlived the launcher"
    done = launch(_idle_rank_job, 4, EXAMPLE_REQUESTS, assignment, True, show_output=False)
    assert done[3]["requests"] == [] and done[3]["dummy_batches"] == done[3]["steps"] > 0
