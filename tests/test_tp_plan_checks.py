"""shard_llama's plan is checked before any module is replaced (issue 21 item 15): a size the plan cannot split
raises ValueError naming the config field, and the model is left whole, not half-sharded."""
import pytest
import torch.nn as nn
from transformers import LlamaConfig, LlamaForCausalLM

from helpers.course.tp_heads import check_llama_tp
from solutions.tp_llama import shard_llama


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
    model = _model(**sizes)
    with pytest.raises(ValueError, match=field):
        check_llama_tp(model.config, world_size)
    with pytest.raises(ValueError, match=field):
        shard_llama(model, rank=0, world_size=world_size)
    kinds = {type(m) for m in model.modules() if isinstance(m, (nn.Linear, nn.Embedding))}
    assert kinds == {nn.Linear, nn.Embedding}, f"a failed shard_llama left sharded modules behind: {kinds}"
