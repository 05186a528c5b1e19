"""Chapter 2 — a tensor-parallel plan for a transformers Llama model: exercise 2.5.

`shard_llama(model)` replaces, in place, every projection of a `LlamaForCausalLM` by this rank's shard,
following the plan of Megatron-LM and vLLM: column-parallel for q/k/v and gate/up, row-parallel for o_proj and
down_proj, vocabulary-parallel for the embedding and the LM head. transformers 5.23 shards the projections the
same way (`LlamaConfig.base_model_tp_plan`, and `LlamaForCausalLM._tp_plan = {"lm_head": "colwise_gather_output"}`)
but leaves `embed_tokens` out of its plan: replicated on every rank, where Megatron's and vLLM's
`VocabParallelEmbedding` split the vocabulary. Norms and rotary embeddings stay replicated. Afterwards the model
runs exactly as before (`model(ids)`, `model.generate(...)`, KV cache included) and returns the full logits on
every rank; each rank stores about 1/world_size of the weights and of the KV cache.
"""
from __future__ import annotations

import torch.nn as nn

from labs.tensor_parallel import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                       group_rank_and_size, kv_heads_for_rank, head_slice)
from helpers.course.tp_heads import check_llama_tp  # given: the plan's sizes, checked before any change

__all__ = ["LLAMA_TP_PLAN", "shard_llama"]

# Module name pattern -> style, in the format of transformers' `base_model_tp_plan`
# (`*` is a layer index). "colwise": ColumnParallelLinear(gather_output=False); "rowwise":
# RowParallelLinear(input_is_parallel=True); "vocab": VocabParallelEmbedding; "colwise_gather":
# ColumnParallelLinear(gather_output=True), i.e. full logits on every rank.
LLAMA_TP_PLAN = {
    "model.embed_tokens": "vocab",
    "model.layers.*.self_attn.q_proj": "colwise",
    "model.layers.*.self_attn.k_proj": "colwise",
    "model.layers.*.self_attn.v_proj": "colwise",
    "model.layers.*.self_attn.o_proj": "rowwise",
    "model.layers.*.mlp.gate_proj": "colwise",
    "model.layers.*.mlp.up_proj": "colwise",
    "model.layers.*.mlp.down_proj": "rowwise",
    "lm_head": "colwise_gather",
}


def shard_llama(model: nn.Module, rank: int | None = None, world_size: int | None = None, group=None) -> nn.Module:
    """Exercise 2.5 — shard a (full, identical on every rank) transformers `LlamaForCausalLM` in place onto
    the ranks of `group` (default: all ranks) following LLAMA_TP_PLAN; returns the model.

    Each attention module then holds num_attention_heads / world_size query heads. KV heads are split
    when world_size divides num_key_value_heads and replicated when num_key_value_heads divides
    world_size (`kv_heads_for_rank`); `num_key_value_groups` is updated to match. Collectives per forward:
    one all-reduce for the embedding, two per decoder layer (o_proj, down_proj), one all-gather of logits.
    A size the plan cannot split raises ValueError naming the config field BEFORE anything is replaced (call the
    given `check_llama_tp(model.config, world_size)` first), so a failed call leaves the model whole."""
    raise NotImplementedError("Exercise 2.5: shard_llama is not written yet (labs/tp_llama.py)")
