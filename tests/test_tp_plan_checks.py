"""shard_llama's plan is checked before any module is replaced (issue 21 item 15): a size the plan cannot split
raises ValueError naming the config field, and the model is left whole, not half-sharded."""
import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from helpers.course.tp_heads import check_llama_tp


def _model(**sizes):
    config = LlamaConfig(**{"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                            "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 256, **sizes})
    return LlamaForCausalLM(config)


@pytest.mark.parametrize("sizes, world_size, field", [
    ({"intermediate_size": 130}, 4, "intermediate_size=130"),
    ({"vocab_size": 258}, 4, "vocab_size=258"),
    ({}, 3, "num_heads=4"),
])
def test_a_plan_that_cannot_split_raises_before_any_change(sizes, world_size, field):
    shard_llama = pytest.importorskip("solutions.tp_llama", reason="the reference answers are absent").shard_llama
    model = _model(**sizes)
    with pytest.raises(ValueError, match=field):
        check_llama_tp(model.config, world_size)
    before = [(name, type(m)) for name, m in model.named_modules()]
    with pytest.raises(ValueError, match=field):
        shard_llama(model, rank=0, world_size=world_size)
    # Every module by name and type, not just "some nn.Linear is left": the parallel layers are nn.Modules, so a
    # model with layer 0 replaced and layer 1 whole would still hold an nn.Linear and an nn.Embedding.
    after = {name: type(m) for name, m in model.named_modules()}
    changed = [(name, kind.__name__, after.get(name, type(None)).__name__)
               for name, kind in before if after.get(name) is not kind]
    assert not changed, f"a failed shard_llama left replaced modules behind (name, was, now): {changed[:4]}"
