"""Wrong answers to chapter 10's speculative decoding exercises (10.1 rejection_sample, 10.2 verify_and_rollback),
for tests/graders/test_ch10_speculative.py::test_planted_mistakes_are_caught; and valid answers written differently,
for test_valid_alternatives_pass. Records are tests/graders/planted.py's `Mistake`: `check` names the grader's
checks (test_ch10_speculative.CHECKS, joined by '+') that must catch it; `points_at` the regexes one of which the
line the learner reads must match.

Several mistakes give the same tokens under greedy decoding (resampling from p, an inverted ratio): only the
distribution checks catch them. `build(name)` returns an object with `.rejection_sample` and `.verify_and_rollback`.
"""
from __future__ import annotations

import types

import torch

from tests.graders.planted import Mistake

DIST = "distribution_k2+distribution_k1+distribution_point_mass"

MISTAKES = [
    Mistake("10.1", "resample_from_p", "at a rejection the token is drawn from p instead of max(0, p - q)",
            (r"not distributed as the target", r"max\(0, p - q\)"), check=DIST),
    Mistake("10.1", "no_bonus", "all drafts accepted: no bonus token", (r"bonus",), check="greedy+draft_equals_target"),
    Mistake("10.1", "bonus_from_first_row", "the bonus drawn from row 0 instead of the last row",
            (r"bonus", r"LAST row", r"not distributed as the target"), check="greedy+draft_equals_target+" + DIST),
    Mistake("10.1", "keeps_rejected_draft", "the rejected draft token kept before the recovered one (off by one)",
            (r"prefix of the\s+drafts", r"first row that disagrees", r"TARGET's argmax"), check="greedy+" + DIST),
    Mistake("10.1", "drops_last_accepted", "at a rejection the last accepted draft is dropped too (off by one)",
            (r"accept while", r"first row that disagrees", r"not distributed as the target"),
            check="greedy+" + DIST),
    Mistake("10.1", "ratio_inverted", "accepted with probability min(1, q/p)", (r"not distributed as the target",),
            check=DIST),
    Mistake("10.1", "greedy_emits_draft", "greedy: at the first mismatch the draft token is emitted",
            (r"TARGET's argmax",), check="greedy"),
    Mistake("10.1", "global_rng", "random draws from torch's global generator", (r"generator",), check="generator"),
    Mistake("10.2", "no_rollback", "the rejected tokens' slots are never given back", (r"still held",),
            check="verify"),
    Mistake("10.2", "rollback_to_start", "rolled back to the last token only: the accepted drafts' KV is lost",
            (r"ACCEPTED tokens were rolled back",), check="verify"),
    Mistake("10.2", "counts_target_token", "the target's emitted token counted as computed",
            (r"counts the target's emitted token",), check="verify"),
    Mistake("10.2", "rollback_counts_rejected", "rolled back by the accepted count instead of the rejected one",
            (r"rolled back", r"still held", r"slots"), check="verify"),
    Mistake("10.2", "cache_scored_tokens", "the scored sequence, drafts included, registered in the prefix cache",
            (r"prefix cache registered",), check="verify"),
    Mistake("10.2", "ignores_max_tokens", "all emitted tokens kept past max_tokens", (r"max_tokens",),
            check="verify"),
]

ALTERNATIVES = [
    Mistake("10.1", "exponential_race", "vLLM's way: uniforms for all k drawn first, the recovered token as "
            "argmax(residual / Exp(1)) (no normalisation), probabilities compared as p >= u q", (),
            check="greedy+draft_equals_target+generator+" + DIST),
    Mistake("10.2", "truncate_directly", "num_computed from num_tokens - 1 and the block manager's truncate called "
            "directly", (), check="verify"),
]


def _reference():
    import solutions.speculative_decoding as sol
    return sol


def _sampler(residual_from_p=False, bonus=True, bonus_row0=False, keep_rejected=False, drop_last=False,
             inverted=False, greedy_draft=False, global_rng=False):
    def rejection_sample(draft_token_ids, draft_probs, target_probs, generator=None, greedy=False):
        drafts = [int(t) for t in torch.as_tensor(draft_token_ids).reshape(-1).tolist()]
        k, gen = len(drafts), (None if global_rng else generator)
        out = []
        for i, token in enumerate(drafts):
            p = target_probs[i].double()
            if greedy:
                best = int(torch.argmax(p))
                if token != best:
                    if keep_rejected:
                        return out + [token, best]
                    return out[:-1] + [best] if drop_last and out else out + [token if greedy_draft else best]
                out.append(token)
                continue
            q = torch.zeros_like(p) if draft_probs is None else draft_probs[i].double()
            if draft_probs is None:
                q[token] = 1.0
            u = float(torch.rand((), generator=gen, dtype=torch.float64))
            ok = (u * p[token] < q[token]) if inverted else (q[token] > 0 and u * q[token] < p[token])
            if ok:
                out.append(token)
                continue
            residual = p if residual_from_p else torch.clamp(p - q, min=0)
            recovered = int(torch.multinomial(residual / residual.sum(), 1, generator=gen))
            if keep_rejected:
                return out + [token, recovered]
            if drop_last and out:
                return out[:-1] + [recovered]
            return out + [recovered]
        if not bonus:
            return out
        last = target_probs[0 if bonus_row0 else k].double()
        return out + [int(torch.argmax(last)) if greedy else int(torch.multinomial(last, 1, generator=gen))]
    return rejection_sample


def _exponential_race(draft_token_ids, draft_probs, target_probs, generator=None, greedy=False):
    drafts = torch.as_tensor(draft_token_ids).reshape(-1).long()
    k = drafts.numel()
    p = target_probs.double()
    if greedy:
        best = p.argmax(dim=-1)
        wrong = (drafts != best[:k]).nonzero()
        n = int(wrong[0]) if len(wrong) else k
        return drafts[:n].tolist() + [int(best[n])]
    q = torch.nn.functional.one_hot(drafts, p.shape[1]).double() if draft_probs is None else draft_probs.double()
    u = torch.rand(k, generator=generator, dtype=torch.float64)
    rows = torch.arange(k)
    accepted = (q[rows, drafts] > 0) & (p[rows, drafts] >= u * q[rows, drafts]) & (u > 0)
    wrong = (~accepted).nonzero()
    n = int(wrong[0]) if len(wrong) else k
    residual = torch.clamp(p[n] - q[n], min=0) if n < k else p[k]
    noise = torch.empty_like(residual).exponential_(generator=generator)
    return drafts[:n].tolist() + [int(torch.argmax(residual / noise))]


def _verifier(sample, rollback="right", count_target=False, cache_scored=False, cap=True):
    def verify_and_rollback(request, draft_token_ids, target_logits, kv, draft_probs=None):
        from helpers.course.speculative import target_probs_for
        start = request.num_computed_tokens
        drafts = [int(t) for t in torch.as_tensor(draft_token_ids).reshape(-1).tolist()]
        probs, greedy = target_probs_for(target_logits, request.temperature)
        tokens = sample(drafts, draft_probs, probs, request.generator, greedy=greedy)
        if cap:
            tokens = tokens[:max(0, request.max_tokens - len(request.tokens))]
        if cache_scored:
            kv.block_manager.cache_blocks(request.rid, request.all_token_ids + drafts)
        request.tokens.extend(tokens)
        request.num_computed_tokens = start + len(tokens) + (1 if count_target else 0)
        if rollback == "right":
            kv.rollback(request, request.num_computed_tokens)
        elif rollback == "start":
            kv.rollback(request, start + 1)
        elif rollback == "by_rejected":
            kv.rollback(request, start + 1 + (len(drafts) - (len(tokens) - 1)))
        elif rollback == "direct":
            request.num_computed_tokens = request.num_tokens - 1
            kv.block_manager.truncate(request.rid, request.num_computed_tokens)
        return tokens
    return verify_and_rollback


def build(name: str | None):
    """The reference implementation with `name` planted (None: unmodified)."""
    sol = _reference()
    impl = types.SimpleNamespace(rejection_sample=sol.rejection_sample, verify_and_rollback=sol.verify_and_rollback)
    if name is None:
        return impl
    samplers = {"resample_from_p": dict(residual_from_p=True), "no_bonus": dict(bonus=False),
                "bonus_from_first_row": dict(bonus_row0=True), "keeps_rejected_draft": dict(keep_rejected=True),
                "drops_last_accepted": dict(drop_last=True), "ratio_inverted": dict(inverted=True),
                "greedy_emits_draft": dict(greedy_draft=True), "global_rng": dict(global_rng=True)}
    if name in samplers:
        impl.rejection_sample = _sampler(**samplers[name])
    elif name == "exponential_race":
        impl.rejection_sample = _exponential_race
    else:
        verifiers = {"no_rollback": dict(rollback="none"), "rollback_to_start": dict(rollback="start"),
                     "counts_target_token": dict(count_target=True), "rollback_counts_rejected":
                     dict(rollback="by_rejected"), "cache_scored_tokens": dict(cache_scored=True),
                     "ignores_max_tokens": dict(cap=False), "truncate_directly": dict(rollback="direct")}
        impl.verify_and_rollback = _verifier(sol.rejection_sample, **verifiers[name])
    return impl
