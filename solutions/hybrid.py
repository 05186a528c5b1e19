"""Chapter 5 — a Llama served by tensor parallelism inside pipeline stages, replicated by data parallelism.

On a (dp, pp, tp) grid (solutions/device_grid.py) every rank
  * shards the model's projections over its **tp group** (chapter 2's `shard_llama(model, group=...)`),
  * keeps only the layers of its pipeline stage, number pp_idx (chapter 3's `LlamaStage`),
  * passes hidden states to the next stage's rank with the same (dp_idx, tp_idx) (chapter 3's
    `PipelineStage`, wired by the global ranks of its **pp group**),
  * and serves its own requests: the dp groups never talk during inference.
After TP's row-parallel all-reduce every TP rank holds the full hidden state, so tp rank t of stage s sends
to tp rank t of stage s+1: tp parallel point-to-point links between two stages.

Exercise 5.2 is `build_hybrid_stage` and `hybrid_forward`; `hybrid_generate` (greedy decoding) is given.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from helpers import load_impl
from helpers.course.llama_stages import LlamaStage


def build_hybrid_stage(model, dp: int, pp: int, tp: int):
    """Exercise 5.2 — turn a full LlamaForCausalLM (identical on every rank) into this rank's piece of
    a dp × pp × tp deployment. Returns (stage, grid):

      grid  = load_impl("device_grid").build_groups(dp, pp, tp)            (exercise 5.1)
      shard the model in place over grid.groups["tp"]                      (load_impl("tp_llama").shard_llama)
      cut stage number pp_idx of pp with helpers.course.llama_stages.LlamaStage
      stage = load_impl("pipeline_parallel").PipelineStage.from_ranks(module, grid.ranks["pp"],
                                                                       group=grid.groups["pp"])
    Shard before cutting: the stage shares the (sharded) layers of the model, and it holds nothing else
    (each rank keeps about 1/(tp·pp) of the weights). Raises ValueError, on every rank, when dp·pp·tp is not
    the world size (build_groups does).
    """
    grid = load_impl("device_grid").build_groups(dp, pp, tp)
    _, pp_idx, _ = grid.coords
    load_impl("tp_llama").shard_llama(model, group=grid.groups["tp"])
    module = LlamaStage(model, pp_idx, pp)
    stage = load_impl("pipeline_parallel").PipelineStage.from_ranks(module, grid.ranks["pp"],
                                                                    group=grid.groups["pp"])
    return stage, grid


@torch.no_grad()
def hybrid_forward(stage, input_ids: torch.Tensor | None) -> torch.Tensor | None:
    """Exercise 5.2 — one forward pass of the whole model through the pipeline of this rank's dp replica.

    input_ids: [batch, seq] token ids, used on the first stage (ignored on the others).
    Returns the full logits [batch, seq, vocab] on every rank of the last stage (each tp rank has them:
    the LM head gathers the vocabulary), None on the other stages — after this rank's sends completed.
    """
    out = stage.forward(input_ids if stage.is_first else None)
    stage.wait_sends()
    return out


@torch.no_grad()
def hybrid_generate(stage, grid, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding with the hybrid model (no KV cache: each step runs the whole sequence again, which
    keeps the plumbing to one forward). Every rank returns the same new token ids: the last stage picks the
    next token and broadcasts it over the pp group, so the first stage can feed it in."""
    ids = list(prompt_ids)
    last_stage_rank = grid.ranks["pp"][-1]
    for _ in range(max_new_tokens):
        logits = hybrid_forward(stage, torch.tensor([ids]))
        token = torch.zeros(1, dtype=torch.int64)
        if logits is not None:
            token[0] = logits[0, -1].argmax()
        if len(grid.ranks["pp"]) > 1:
            dist.broadcast(token, src=last_stage_rank, group=grid.groups["pp"])
        ids.append(int(token))
    return ids[len(prompt_ids):]
