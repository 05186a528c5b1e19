"""Chapter 10: speculative decoding — a cheap proposer guesses k tokens, the target checks them all in one forward.

Exercise 10.1  `rejection_sample`: keep a prefix of the draft's tokens and add one token of the target's, so that
               what comes out is distributed exactly as if the target had sampled every token itself (Leviathan et
               al., "Fast Inference from Transformers via Speculative Decoding", 2023; Chen et al., 2023). Draft
               token i is accepted with probability min(1, p_i(x_i) / q_i(x_i)); at the first rejection a token is
               drawn from the normalised residual max(0, p_i − q_i) and the round stops; if all k are accepted, a
               bonus token is drawn from the target's last row p_k. Greedy requests: accept while the draft token
               is the target's argmax, then the target's argmax. vLLM: vllm/v1/sample/rejection_sampler.py
               (`rejection_sample`, `rejection_random_sample_kernel`, `sample_recovered_tokens_kernel`, and
               `rejection_greedy_sample_kernel` for greedy requests).
Exercise 10.2  `verify_and_rollback`: on the engine's paged KV cache, one request's verification step: the target
               has just computed the keys and values of its last token and its k draft tokens (the scheduler
               scheduled the drafts as tokens of the step, as vLLM's does, so their slots are allocated, charged to
               the step's token budget); keep the accepted tokens, count their
               keys and values as computed, and give back the rejected tokens' slots (KVCacheManager.rollback: whole
               blocks freed, the last one truncated). vLLM: `Scheduler.update_from_output` in
               vllm/v1/core/sched/scheduler.py (`request.num_computed_tokens -= num_rejected`), and the prefix-cache
               rule of vllm/v1/core/kv_cache_manager.py `allocate_slots` — only tokens of `request.num_tokens`
               (never a draft token, which may be rejected) are ever hashed into the cache.

The proposers (n-gram prompt lookup, a trained draft model), the engine that calls both exercises every step, and
the run across processes (the target tensor-parallel on two ranks, the draft on a third) are given in
helpers/course/speculative.py.
"""
from __future__ import annotations

import torch

from helpers.course.speculative import target_probs_for

__all__ = ["rejection_sample", "verify_and_rollback"]


def rejection_sample(draft_token_ids, draft_probs, target_probs, generator=None, greedy: bool = False) -> list[int]:
    """Exercise 10.1 — the tokens one request emits this round: the accepted draft tokens, then ONE token of the
    target's (the recovered token at the first rejection, or the bonus token when all were accepted).

    draft_token_ids: [k] int (k >= 0), the proposer's tokens, in order.
    draft_probs: [k, vocab] float: row i is the draft distribution q_i that draft_token_ids[i] was sampled from;
        or None for a proposer without probabilities (n-gram lookup): each q_i is then a point mass on the draft
        token, as vLLM's NO_DRAFT_PROBS (accept with probability p_i(x_i); recover from p_i without x_i).
    target_probs: [k + 1, vocab] float: row i is the target's distribution p_i for the token after draft token
        i − 1 (row 0: after the request's last token; row k: after the last draft token, the bonus row).
    generator: the request's torch.Generator; every random draw (uniforms, the recovered and bonus tokens) uses it.
    greedy: temperature 0: accept draft token i while it equals argmax p_i; the emitted target token is the argmax
        of its row. No random draw.

    Returns a list of 1 .. k + 1 ints: n accepted draft tokens (draft_token_ids[:n]) and one target token.
    Sampling: draft token x_i is accepted when u < p_i(x_i) / q_i(x_i) for u uniform in [0, 1) (never when
    q_i(x_i) = 0 or p_i(x_i) = 0); at the first rejection the emitted token is drawn from max(0, p_i − q_i)
    normalised, and nothing after it is looked at. Raises ValueError on inconsistent shapes."""
    drafts = [int(t) for t in torch.as_tensor(draft_token_ids).reshape(-1).tolist()]
    k = len(drafts)
    target_probs = torch.as_tensor(target_probs)
    if target_probs.dim() != 2 or target_probs.shape[0] != k + 1:
        raise ValueError(f"target_probs must be [k + 1, vocab] = [{k + 1}, vocab] for {k} draft tokens, got "
                         f"{tuple(target_probs.shape)}")
    if draft_probs is not None and tuple(draft_probs.shape) != (k, target_probs.shape[1]):
        raise ValueError(f"draft_probs must be [k, vocab] = [{k}, {target_probs.shape[1]}], got "
                         f"{tuple(draft_probs.shape)}")
    out = []
    for i, token in enumerate(drafts):
        p = target_probs[i].double()
        if greedy:
            best = int(torch.argmax(p))
            if token != best:
                return out + [best]
            out.append(token)
            continue
        if draft_probs is None:
            q = torch.zeros_like(p)
            q[token] = 1.0
        else:
            q = draft_probs[i].double()
        u = float(torch.rand((), generator=generator, dtype=torch.float64))
        if q[token] > 0 and u * q[token] < p[token]:
            out.append(token)
            continue
        residual = torch.clamp(p - q, min=0)
        return out + [int(torch.multinomial(residual / residual.sum(), 1, generator=generator))]
    last = target_probs[k].double()
    return out + [int(torch.argmax(last)) if greedy else int(torch.multinomial(last, 1, generator=generator))]


def verify_and_rollback(request, draft_token_ids, target_logits, kv, draft_probs=None) -> list[int]:
    """Exercise 10.2 — one request's verification step on the paged KV cache; returns the tokens it emits.

    Before the call (the engine did it): the request had caught up (request.num_computed_tokens ==
    request.num_tokens − 1, its last token not yet computed); the KV cache manager `kv` reserved slots for that
    token and the k draft tokens (kv.block_manager.seq_len(request.rid) == request.num_computed_tokens + 1 + k);
    the target computed all k + 1 positions in one forward, writing their keys and values into those slots, and
    target_logits [k + 1, vocab] are its logits there (row i: after the last token and draft tokens 0 .. i − 1).
    draft_token_ids: [k] ints; draft_probs: [k, vocab] or None (as rejection_sample).

    Does:
      * the target's distributions from target_logits with the request's temperature (`target_probs_for`, given:
        softmax(logits / temperature); temperature 0 is greedy) and exercise 10.1's rejection_sample with the
        request's generator;
      * keeps no more tokens than the request still may generate (request.max_tokens − len(request.tokens));
      * appends the kept tokens to request.tokens and counts as computed the positions whose keys and values are
        now right: the last token and the accepted draft tokens (the emitted target token is computed next step);
      * gives back every slot past them: kv.rollback(request, request.num_computed_tokens) — a block that held
        only rejected tokens returns to the free list, a partly rejected block is truncated.
    It registers nothing in the prefix cache: a rejected token's keys and values must never be found under a
    hash (vLLM hashes only up to request.num_tokens at allocation, which never counts a draft token; the engine's
    KVCacheManager.allocate_slots caches the accepted tokens' full blocks at the next step)."""
    start = request.num_computed_tokens
    drafts = [int(t) for t in torch.as_tensor(draft_token_ids).reshape(-1).tolist()]
    probs, greedy = target_probs_for(target_logits, request.temperature)
    tokens = rejection_sample(drafts, draft_probs, probs, request.generator, greedy=greedy)
    tokens = tokens[:max(0, request.max_tokens - len(request.tokens))]
    request.tokens.extend(tokens)
    request.num_computed_tokens = start + len(tokens)
    kv.rollback(request, request.num_computed_tokens)
    return tokens
