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
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 1")
    rank = dist.get_rank()
    if rank not in stage_ranks:
        raise ValueError(f"rank {rank} is not one of the pipeline's stage ranks {stage_ranks}")
    index = stage_ranks.index(rank)
    prev_rank = stage_ranks[index - 1] if index > 0 else None
    next_rank = stage_ranks[index + 1] if index + 1 < len(stage_ranks) else None
    first_rank, last_rank = stage_ranks[0], stage_ranks[-1]
    num_groups = len(prompt_groups)
    caches = [stage.new_cache() for _ in range(num_groups)]
    tokens = [g.clone() for g in prompt_groups] if stage.is_first else None
    local = [None] * num_groups     # one-stage pipeline: the "last stage" hands the token to itself
    pending: list = []

    expected = num_groups * max_new_tokens      # tensors this stage receives in all (from prev, or tokens)
    received = 0

    def receive(src):
        nonlocal received
        received += 1
        return recv_tensor(src, group, prefetch=received < expected)

    def next_token(g):
        if stage.is_last:           # first and last at once
            return local[g]
        return receive(last_rank)

    for step in range(max_new_tokens):
        for g in range(num_groups):
            prompt_len = prompt_groups[g].shape[1]
            start_pos = 0 if step == 0 else prompt_len + step - 1
            if stage.is_first:
                if step == 0:
                    x = prompt_groups[g]
                else:
                    x = next_token(g)
                    tokens[g] = torch.cat([tokens[g], x], dim=1)
            else:
                x = receive(prev_rank)
            label = "prefill" if step == 0 else "decode"
            with timeline.span(label, micro_batch=g) if timeline is not None else nullcontext():
                out = stage(x, caches[g], start_pos)
                if stage.is_last:
                    out = out[:, -1].argmax(dim=-1, keepdim=True)
            if stage.is_last and stage.is_first:
                local[g] = out
            elif stage.is_last:
                pending += send_tensor(out, first_rank, group)
            else:
                pending += send_tensor(out, next_rank, group)
    if stage.is_first:
        for g in range(num_groups):     # the token produced by each group's last step
            tokens[g] = torch.cat([tokens[g], next_token(g)], dim=1)
    wait_all(pending)
    return tokens if stage.is_first else None
