"""Chapter 3 pipelined decoding: greedy generation with several request groups in flight.

Inference has no backward pass to fill the pipeline's bubble. What fills it is other work: several
independent request groups in flight, so that while stage 1 computes group 0's next step, stage 0 already
computes group 1's. The last stage turns logits into the next token and sends it back to the first
stage: the pipeline is a ring, and one group's token goes round it once per generated token.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.distributed as dist

from helpers.course.pipeline_runtime import recv_tensor, send_tensor, wait_all


def pipelined_generate(stage, stage_ranks: list[int], prompt_groups: list[torch.Tensor], max_new_tokens: int,
                       group=None, timeline=None) -> list[torch.Tensor] | None:
    """Exercise 3.4 — greedy decoding of several request groups through a pipeline of ranks.

    stage: this rank's `helpers.course.llama_stages.LlamaStage` (`stage(x, cache, start_pos)`; it knows
        `stage.is_first` / `stage.is_last`, and `stage.new_cache()` makes an empty KV cache).
    stage_ranks: global ranks of the stages in order (stage_ranks[i] holds stage i); this rank is one.
    prompt_groups: G tensors of token ids [batch_g, prompt_len_g], the same on every rank (only the first
        stage reads the ids; the others use len(prompt_groups) and the prompt lengths).
    Each group runs a prefill (its whole prompt, start_pos 0), then max_new_tokens - 1 decode steps (its
    last token, start_pos = tokens so far). Stage after stage, through a KV cache per group on every stage.
    The last stage takes the argmax of the last position's logits ([batch_g, 1] token ids) and sends it to
    the first stage, which feeds it back in for that group's next step. Groups are interleaved: step s of
    group 0, step s of group 1, ..., so up to G groups are in flight across the stages.
    Sends are non-blocking (`send_tensor`), receives block (`recv_tensor`); with one stage there is no
    communication at all. Every stage receives G * max_new_tokens tensors in all (the first stage: tokens),
    so all but the last receive can pass prefetch=True (faster, optional). If `timeline` is given record each stage
    computation as a span labelled "prefill" (step 0) or "decode", with micro_batch=group index.
    Returns, on the first stage, the G tensors [batch_g, prompt_len_g + max_new_tokens] (prompt + new
    tokens, the same ids as greedy decoding with the unsplit model); None on the other stages.
    Raises ValueError if max_new_tokens < 1 or this rank is not one of stage_ranks (before any message).
    """
    raise NotImplementedError("Exercise 3.4: pipelined_generate is not written yet (labs/pipelined_decoding.py)")
