"""Chapter 10's given speculative-decoding code (helpers/course/speculative.py): vLLM's n-gram rule, the one engine
with a proposer verifying k+1 positions in one forward (same tokens as plain greedy decoding, with either proposer,
with prefix caching, at batch 1 and 3; the drafts charged to the token budget, trimmed by it, dropped at a
preemption), the trained draft's acceptance, and the run across processes (target TP=2 on two ranks, the draft on a
third: same tokens as the plain target)."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from helpers import launch
from helpers.course.engine import LLMEngine, SchedulerConfig
from helpers.course.speculative import (DraftModelProposer, NgramProposer, SpeculativeEngine, generate_speculative,
                                        ngram_propose, plain_greedy, speculative_tp_job)
from helpers.course.tiny_llama import PROMPT, encode, load_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = [encode(PROMPT), encode("We hold these truths to be self-evident, that all men"),
           encode("The Fox and the Grapes. A hungry")]


def _vllm_ngram(origin_tokens: np.ndarray, min_ngram: int, max_ngram: int, max_model_len: int, k: int):
    """vLLM 0.32's `_find_longest_matched_ngram_and_propose_tokens` (vllm/v1/spec_decode/ngram_proposer.py),
    transcribed line for line without numba: the KMP search the course's plain rule must agree with."""
    total_token = origin_tokens.shape[0]
    if total_token < min_ngram:
        return []
    k = min(k, max_model_len - total_token)
    if k <= 0:
        return []
    tokens = origin_tokens[::-1]
    lps = np.zeros(max_ngram, dtype=np.int32)
    longest_ngram, position, prev_lps, i = 0, 0, 0, 1
    while i < total_token:
        if tokens[prev_lps] == tokens[i]:
            prev_lps += 1
            if prev_lps >= longest_ngram:
                longest_ngram = prev_lps
                position = i
            if i < max_ngram:
                lps[i] = prev_lps
            if prev_lps == max_ngram:
                prev_lps = lps[max_ngram - 1]
            i += 1
        elif prev_lps != 0:
            prev_lps = lps[prev_lps - 1]
        else:
            i += 1
    if longest_ngram < min_ngram:
        return []
    start_position = total_token - 1 - position + longest_ngram
    k = min(k, total_token - start_position)
    return origin_tokens[start_position:start_position + k].tolist()


def test_ngram_rule_equals_vllms_search():
    rng = random.Random(0)
    for case in range(600):
        n = rng.randrange(1, 40)
        tokens = [rng.randrange(3 if case % 2 else 6) for _ in range(n)]
        lo = rng.randrange(1, 4)
        hi = lo + rng.randrange(0, 4)
        k = rng.randrange(1, 6)
        want = _vllm_ngram(np.array(tokens), lo, hi, 64, k)
        assert ngram_propose(tokens, k, lo, hi, 64) == want, (tokens, lo, hi, k)
    assert ngram_propose(encode("abcXabc"), 3, 2, 3) == encode("Xab")      # what followed the earlier "abc"


@pytest.fixture(scope="module")
def model():
    return load_model()


@pytest.fixture(scope="module")
def reference(model):
    return plain_greedy(PROMPTS, 40, model)


@pytest.mark.parametrize("proposer,k,batch,caching", [("ngram", 3, 3, False), ("draft", 4, 1, False),
                                                      ("draft", 2, 3, True)])
def test_speculative_engine_gives_plain_greedy_tokens(model, reference, proposer, k, batch, caching):
    chosen = NgramProposer() if proposer == "ngram" else DraftModelProposer()
    engine = LLMEngine.paged(model, num_blocks=128, block_size=8, enable_prefix_caching=caching, proposer=chosen,
                             num_speculative_tokens=k)
    got = []
    for i in range(0, len(PROMPTS), batch):
        got += generate_speculative(engine, PROMPTS[i:i + batch], 40)
    assert got == reference
    assert engine.kv.num_free_blocks == engine.kv.num_blocks       # every slot given back
    if caching:                                                    # hashes only of final tokens: a request with
        again = generate_speculative(engine, PROMPTS[:1], 40)      # the same prompt hits them, same tokens
        assert again == reference[:1]


def _recording(engine):
    """Wrap the engine's scheduler: per step, (drafts each running request held before it, the SchedulerOutput)."""
    steps, schedule = [], engine.scheduler.schedule

    def recorded(*args, **kwargs):
        held = {r.rid: len(r.spec_token_ids) for r in engine.scheduler.running}
        output = schedule(*args, **kwargs)
        steps.append((held, output))
        return output
    engine.scheduler.schedule = recorded
    return steps


@pytest.mark.parametrize("proposer", ["ngram", "draft"])
def test_drafts_are_scheduled_tokens_under_the_budget_and_preemption(model, reference, proposer):
    """vLLM's rule: a request's drafts are tokens of its step (num_new_tokens = 1 + drafts), charged to
    max_num_batched_tokens; a budget that cuts the request short trims them; a preempted request loses them. With a
    budget of 8 and 32 blocks of 4 for three requests of up to 92 tokens, all three happen, and the tokens stay
    plain greedy decoding's."""
    chosen = NgramProposer() if proposer == "ngram" else DraftModelProposer()
    engine = LLMEngine.paged(model, num_blocks=32, block_size=4, proposer=chosen, num_speculative_tokens=4,
                             config=SchedulerConfig(max_num_batched_tokens=8))
    steps = _recording(engine)
    assert generate_speculative(engine, PROMPTS, 40) == reference
    assert engine.kv.num_free_blocks == engine.kv.num_blocks
    assert engine.scheduler.num_preemptions > 0
    assert all(output.total_num_scheduled_tokens <= 8 for _, output in steps)
    verified = [(held, output, rid) for held, output in steps for rid in output.spec_decode_tokens]
    assert len(verified) == engine.spec_stats.num_drafts > 0
    for held, output, rid in verified:           # the drafts ride in the request's share of the budget
        assert output.num_scheduled_tokens[rid] == 1 + len(output.spec_decode_tokens[rid]) <= 1 + held[rid]
    assert any(len(output.spec_decode_tokens.get(r.rid, ())) < held.get(r.rid, 0)                 # trimmed
               for held, output in steps for r in output.scheduled)


def test_sampled_drafts_trimmed_by_the_budget_keep_their_probabilities(model):
    """Temperature 0.8 with the draft model's distributions: a trimmed proposal's draft probs are trimmed with it
    (exercise 10.1 checks their shape), every request gets its tokens, every slot comes back."""
    engine = LLMEngine.paged(model, num_blocks=64, block_size=4, proposer=DraftModelProposer(),
                             num_speculative_tokens=4, config=SchedulerConfig(max_num_batched_tokens=8))
    steps = _recording(engine)
    out = generate_speculative(engine, PROMPTS, 24, temperature=0.8, seed=3)
    assert any(0 < len(output.spec_decode_tokens.get(r.rid, ())) < held.get(r.rid, 0)      # some, not all, verified
               for held, output in steps for r in output.scheduled)
    assert [len(tokens) for tokens in out] == [24] * len(PROMPTS)
    assert engine.kv.num_free_blocks == engine.kv.num_blocks
    assert engine.spec_stats.num_accepted_tokens > 0


def test_trained_draft_needs_at_most_half_a_target_forward_per_token(model, reference):
    engine = SpeculativeEngine.paged(model, proposer=DraftModelProposer(), num_speculative_tokens=4)
    assert type(engine) is LLMEngine                               # the old name builds the one engine
    assert generate_speculative(engine, PROMPTS[:1], 40) == reference[:1]
    stats = engine.spec_stats
    assert stats.forwards_per_token <= 0.5, stats
    assert stats.acceptance_rate > 0.6, stats


def test_target_tp2_and_draft_on_a_third_rank_give_the_plain_targets_tokens(reference):
    results = launch(speculative_tp_job, 3, PROMPTS[:2], 24, k=3, timeout=240, show_output=False)
    (tokens0, stats0, rounds0), (tokens1, _, _), (_, _, served) = results
    assert tokens0 == tokens1 == [r[:24] for r in reference[:2]]
    assert served == rounds0 > 0                                   # every proposal came from the draft rank
    assert stats0["num_accepted_tokens"] > 0


def test_stored_vllm_ngram_run_agrees_with_the_course(model):
    """helpers/course/data/vllm_spec_check.json (python -m helpers.vllm_spec_check, vLLM 0.32's CPU build): vLLM's
    n-gram speculative decoding on the course's model gave the course's ids, and as many verifications and accepted
    tokens per position as the course's engine does now, but for the last verification of a request (vLLM does not
    cut proposals at max_tokens: it may accept one more draft per position there)."""
    import json

    from helpers.vllm_spec_check import RESULT_PATH
    stored = json.loads(RESULT_PATH.read_text())
    for name, ids in stored["prompts"].items():
        theirs = stored["vllm"]["per_prompt"][name]
        engine = LLMEngine.paged(model, num_blocks=128, proposer=NgramProposer(*stored["prompt_lookup"]),
                                 num_speculative_tokens=stored["k"])
        assert generate_speculative(engine, [ids], stored["max_tokens"])[0] == theirs["ids"], name
        ours = engine.spec_stats
        assert ours.num_drafts == theirs["spec"]["num_drafts"], name
        gaps = [a - b for a, b in zip(theirs["spec"]["num_accepted_tokens_per_pos"], ours.accepted_per_pos)]
        assert all(g in (0, 1) for g in gaps), (name, gaps)
