"""Cut a transformers `LlamaForCausalLM` into pipeline stages — not an exercise, code to read (chapter 3).

    stage = LlamaStage(model, stage_index=1, num_stages=2)     # layers 2..3, final norm and lm_head
    cache = stage.new_cache()                                  # one per request group
    h = stage(x, cache, start_pos)                             # x: token ids on stage 0, hidden states after

Stage 0 owns the embedding, the last stage the final RMSNorm and the lm_head; the decoder layers are split
into equal consecutive slices. Each stage keeps the KV cache of its own layers only: a pipeline splits
the cache along with the layers. Between stages flows the hidden state, [batch, seq, hidden].
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache


def layer_range(num_layers: int, stage_index: int, num_stages: int) -> range:
    """The decoder layers of one stage: equal consecutive slices (num_layers must divide evenly)."""
    if num_layers % num_stages:
        raise ValueError(f"{num_layers} layers do not split evenly into {num_stages} stages: use a divisor "
                         f"of {num_layers}")
    per = num_layers // num_stages
    return range(stage_index * per, (stage_index + 1) * per)


class LlamaStage(nn.Module):
    """Stage `stage_index` of `num_stages` of a LlamaForCausalLM (shares the model's weights)."""

    def __init__(self, model, stage_index: int, num_stages: int):
        super().__init__()
        self.config = model.config
        self.stage_index, self.num_stages = stage_index, num_stages
        self.is_first, self.is_last = stage_index == 0, stage_index == num_stages - 1
        inner = model.model
        self.embed_tokens = inner.embed_tokens if self.is_first else None
        self.layers = nn.ModuleList(inner.layers[i] for i in layer_range(len(inner.layers), stage_index, num_stages))
        self.rotary_emb = inner.rotary_emb
        self.norm = inner.norm if self.is_last else None
        self.lm_head = model.lm_head if self.is_last else None

    def new_cache(self) -> DynamicCache:
        """An empty KV cache (layer indices are global, so only this stage's layers get filled)."""
        return DynamicCache(config=self.config)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, cache: DynamicCache | None = None, start_pos: int = 0) -> torch.Tensor:
        """x: token ids [batch, seq] on the first stage, hidden states [batch, seq, hidden] on the others.
        start_pos: position of x's first token (the number of tokens already in the cache).
        Returns hidden states [batch, seq, hidden], or logits [batch, seq, vocab] on the last stage."""
        h = self.embed_tokens(x) if self.is_first else x
        seq = h.shape[1]
        positions = torch.arange(start_pos, start_pos + seq).unsqueeze(0)
        cos_sin = self.rotary_emb(h, positions)
        mask = None
        if seq > 1:   # prefill: causal mask over the new tokens (and everything cached before them)
            allowed = torch.ones(seq, start_pos + seq, dtype=torch.bool).tril(start_pos)
            mask = torch.zeros(allowed.shape, dtype=h.dtype).masked_fill(~allowed, torch.finfo(h.dtype).min)
            mask = mask[None, None]
        for layer in self.layers:
            h = layer(h, attention_mask=mask, position_ids=positions, past_key_values=cache,
                      use_cache=cache is not None, position_embeddings=cos_sin)
        if self.is_last:
            h = self.lm_head(self.norm(h))
        return h


def split_llama(model, num_stages: int) -> list[LlamaStage]:
    """All the stages at once (for a single-process check): running them one after another = the model."""
    return [LlamaStage(model, i, num_stages) for i in range(num_stages)]
