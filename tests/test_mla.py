"""Chapter 10's given MLA code (helpers/course/mla.py) against transformers' DeepseekV3Attention, the KV-bytes
formula against the bytes a real cache holds, and the DP-attention + EP layout (helpers/course/dp_attention.py)
on 4 real ranks: the same tokens as one process, the KV bytes per rank, and the idle rank's dummy forward."""
import pytest
import torch

from helpers.claims import max_abs_diff, tolerance
from helpers.course.memory import kv_bytes_per_token, mla_kv_bytes_per_token
from helpers.course.mla import LatentKVCache, from_deepseek_v3, tiny_deepseek_v3_config


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
