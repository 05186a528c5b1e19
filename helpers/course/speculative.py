"""Speculative decoding on the course's engine (chapter 10): the proposers that plug into LLMEngine, its counters,
and the same across processes (the target tensor-parallel on two ranks, the draft on a third).

    from helpers.course.engine import LLMEngine
    from helpers.course.speculative import NgramProposer, DraftModelProposer, generate_speculative

    engine = LLMEngine.paged(proposer=DraftModelProposer(), num_speculative_tokens=4)
    tokens = generate_speculative(engine, [encode(PROMPT)], max_tokens=60)[0]   # = plain greedy decoding's tokens
    engine.spec_stats            # drafts proposed, accepted (per position), target forwards, tokens generated

Speculation is a part of the one engine loop (LLMEngine.step, helpers/course/engine/engine.py), as in vLLM V1
(vllm/v1/core/sched/scheduler.py `schedule` and `update_from_output`; vllm/v1/worker/gpu_model_runner.py
`propose_draft_token_ids`; vllm/v1/engine/core.py `post_step`; the proposers in vllm/v1/spec_decode/):
  1. after a step, the proposer guesses up to k tokens for each request that is decoding (`propose`: n-gram prompt
     lookup, or a draft model running k small forwards on its own paged cache); they wait in
     `request.spec_token_ids`;
  2. the next step's scheduler (exercise 7.4, unchanged) sees the request's num_new_tokens = 1 + k (its last token
     and the drafts: vLLM's num_tokens_with_spec) and charges them to the token budget; the KV cache manager
     allocates their slots like any scheduled token's;
  3. the target runs ONE forward over every scheduled token (a k+1-token causal chunk per speculating request,
     prompt chunks of other requests in the same forward) and returns the logits of all positions;
  4. exercise 10.2 (`verify_and_rollback`, with exercise 10.1's rejection sampler) keeps the accepted tokens and
     one target token, and rolls the rejected tokens' slots back (KVCacheManager.rollback; vLLM:
     num_computed_tokens -= num_rejected).
Draft tokens are never in `request.tokens` until accepted, so the KV cache manager, which hashes blocks only up to
`request.num_tokens` (vllm/v1/core/kv_cache_manager.py `allocate_slots`: "only finalized tokens are cached"),
never registers a rejected token's keys and values in the prefix cache.

Proposers (`propose(requests, k) -> {rid: (draft token ids, draft probs [n, vocab] or None)}`; `release(rid)`):
  NgramProposer        vLLM's prompt lookup (vllm/v1/spec_decode/ngram_proposer.py,
                       `_find_longest_matched_ngram_and_propose_tokens`): the longest n-gram, prompt_lookup_min <= n
                       <= prompt_lookup_max, that ends the request's tokens and occurs earlier; of equally long
                       matches the earliest; propose the (up to) k tokens that followed it. No probabilities: a point
                       mass (the rejection sampler's NO_DRAFT_PROBS case).
  DraftModelProposer   a small Llama trained to agree with the target (helpers/course/train_draft.py), on its own
                       paged KV cache: it catches up on the tokens it has not seen (the accepted ones and the target's
                       token), then drafts k tokens one forward each, greedy or sampled from its own distribution
                       q with the request's temperature (vllm/v1/spec_decode/draft_model.py + llm_base_proposer.py).
                       Its keys and values live in its own cache, so the target reserves no look-ahead slots
                       (vLLM's num_lookahead_tokens is 0 for n-gram; a draft model sharing the target's blocks
                       needs k).

Across processes (`speculative_tp_job`, 3 ranks on gloo via helpers.launch): ranks 0 and 1 hold the target sharded
by chapter 2's `shard_llama` (TP=2 within a sub-group) and each runs the same engine in lockstep (as the course's
TP replicas do); rank 2 holds the draft. After every step rank 0 broadcasts each decoding request's tokens (the
verdict of the step is in them: the accepted tokens and the target's token), rank 2 answers with its proposals, and
both target ranks verify them identically in the next step.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from helpers.course.engine.engine import LLMEngine
from helpers.impl import load_impl

__all__ = ["target_probs_for", "ngram_propose", "NgramProposer", "DraftModelProposer", "SpeculativeEngine",
           "SpecStats", "generate_speculative", "plain_greedy", "speculative_tp_job", "roofline_seconds",
           "modelled_speedup", "expected_tokens_per_step"]


def target_probs_for(logits: torch.Tensor, temperature: float):
    """(probs [rows, vocab] float64, greedy): softmax(logits / temperature), or greedy for temperature 0 (below
    the engine's SAMPLING_EPS), then the probs are the softmax of the logits (only their argmax is read)."""
    from helpers.course.serving.protocol import MIN_TEMPERATURE, SAMPLING_EPS
    greedy = temperature < SAMPLING_EPS
    scaled = logits.double() if greedy else logits.double() / max(temperature, MIN_TEMPERATURE)
    return torch.softmax(scaled, dim=-1), greedy


# ---------------------------------------------------------------------------------------------- proposers
def ngram_propose(token_ids, k: int, prompt_lookup_min: int, prompt_lookup_max: int,
                  max_model_len: int | None = None) -> list[int]:
    """vLLM's n-gram rule, written plainly: the largest n in [prompt_lookup_min, prompt_lookup_max] such that the
    last n tokens also occur starting at an earlier position s (s + n <= len − 1; the earliest such s), and the up to
    k tokens after that occurrence (fewer if the tokens end first, none past max_model_len). [] if no n matches."""
    tokens = list(token_ids)
    total = len(tokens)
    if total < prompt_lookup_min:
        return []
    if max_model_len is not None:
        k = min(k, max_model_len - total)
    if k <= 0:
        return []
    for n in range(min(prompt_lookup_max, total - 1), prompt_lookup_min - 1, -1):
        suffix = tokens[total - n:]
        for s in range(total - n):
            if tokens[s:s + n] == suffix:
                return tokens[s + n:min(s + n + k, total)]
    return []


class NgramProposer:
    """Prompt lookup (vLLM's `--speculative-config '{"method": "ngram", ...}'`); vLLM's default n is 5..5."""
    name = "n-gram"

    def __init__(self, prompt_lookup_min: int = 2, prompt_lookup_max: int = 5, max_model_len: int | None = None):
        if not 1 <= prompt_lookup_min <= prompt_lookup_max:
            raise ValueError(f"need 1 <= prompt_lookup_min={prompt_lookup_min} <= prompt_lookup_max="
                             f"{prompt_lookup_max}")
        self.min_n, self.max_n, self.max_model_len = prompt_lookup_min, prompt_lookup_max, max_model_len

    def propose(self, requests, k: int) -> dict:
        return {r.rid: (ngram_propose(r.all_token_ids, k, self.min_n, self.max_n, self.max_model_len), None)
                for r in requests}

    def release(self, rid) -> None:
        pass


class DraftModelProposer:
    """A small Llama (default: helpers.course.train_draft.load_draft()) on its own paged KV cache
    (paged_llama.PagedLlamaRunner: its own pool and block manager, exercise 7.1). Per request it remembers the
    tokens its cache holds; a proposal first truncates the cache to the part still shared with the request's
    tokens (rejected drafts go), computes the rest in one chunk, then drafts one token per forward. All requests'
    forwards are batched: k forwards per step whatever the batch. forwards: how many it ran."""
    name = "draft model"

    def __init__(self, model=None, num_blocks: int = 128, block_size: int = 16):
        from helpers.course.paged_llama import PagedLlamaRunner
        if model is None:
            from helpers.course.train_draft import load_draft
            model = load_draft()
        self.runner = PagedLlamaRunner(model, num_blocks=num_blocks, block_size=block_size)
        self.manager = self.runner.manager
        self.seen: dict = {}              # rid -> the token ids whose keys and values the draft's cache holds
        self.generators: dict = {}
        self.forwards = 0

    def _generator(self, request):
        if request.rid not in self.generators:
            seed = getattr(request, "seed", None)
            self.generators[request.rid] = torch.Generator().manual_seed((0 if seed is None else int(seed)) + 1)
        return self.generators[request.rid]

    def _catch_up(self, request, k: int) -> tuple:
        """Truncate the draft's cache to what it shares with the request, reserve slots for the new tokens and
        k - 1 drafts; returns (tokens to compute, their first position)."""
        tokens, rid = list(request.all_token_ids), request.rid
        seen = self.seen.get(rid, [])
        common = 0
        for a, b in zip(seen, tokens[:-1]):     # the last token is always computed: its logits give draft 1
            if a != b:
                break
            common += 1
        if rid in self.manager.tables and common == 0:
            self.manager.free(rid)
        if rid not in self.manager.tables:
            self.manager.allocate(rid, len(tokens) + k - 1)
        else:
            self.manager.truncate(rid, common)
            for _ in range(len(tokens) + k - 1 - common):
                self.manager.append_slot(rid)
        self.seen[rid] = tokens
        return tokens[common:], common

    @torch.no_grad()
    def propose(self, requests, k: int) -> dict:
        requests = list(requests)
        if not requests or k < 1:
            return {r.rid: ([], None) for r in requests}
        batch = [(r.rid, *self._catch_up(r, k)) for r in requests]
        drafts = {r.rid: [] for r in requests}
        probs = {r.rid: [] for r in requests}
        for step in range(k):
            logits = self.runner.forward_batch(batch)             # [len(requests), vocab]: each one's last row
            self.forwards += 1
            batch = []
            for r, row in zip(requests, logits):
                q, greedy = target_probs_for(row, r.temperature)
                token = int(torch.argmax(q)) if greedy else int(torch.multinomial(q, 1, generator=self._generator(r)))
                drafts[r.rid].append(token)
                probs[r.rid].append(q)
                if step < k - 1:
                    position = len(self.seen[r.rid])
                    self.seen[r.rid] = self.seen[r.rid] + [token]
                    batch.append((r.rid, [token], position))
        return {r.rid: (drafts[r.rid], None if r.temperature == 0 else torch.stack(probs[r.rid]).float())
                for r in requests}

    def release(self, rid) -> None:
        if rid in self.manager.tables:
            self.manager.free(rid)
        self.seen.pop(rid, None)
        self.generators.pop(rid, None)


# ---------------------------------------------------------------------------------------------- counters, the engine
@dataclass
class SpecStats:
    """vLLM's spec-decode metrics (vllm/v1/spec_decode/metrics.py: num_drafts, num_draft_tokens,
    num_accepted_tokens, num_accepted_tokens_per_pos), plus target forwards and tokens generated."""
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: list = field(default_factory=list)
    target_forwards: int = 0
    tokens_generated: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per verification: accepted drafts + the target's own token (vLLM's 'mean acceptance
        length' counts it too)."""
        return 1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 1.0

    @property
    def forwards_per_token(self) -> float:
        return self.target_forwards / self.tokens_generated if self.tokens_generated else float("nan")


class SpeculativeEngine:
    """Not an engine of its own: the name chapter 10 first used for the one engine with a proposer.
    SpeculativeEngine.paged(model, proposer, num_speculative_tokens, ...) is LLMEngine.paged(model, ...,
    proposer=proposer, num_speculative_tokens=...) with this chapter's defaults (n-gram lookup, k = 4, 128 blocks);
    the speculation itself is a part of LLMEngine.step (helpers/course/engine/engine.py)."""

    @staticmethod
    def paged(model=None, proposer=None, num_speculative_tokens: int = 4, num_blocks: int = 128,
              **options) -> LLMEngine:
        return LLMEngine.paged(model, num_blocks=num_blocks, proposer=proposer or NgramProposer(),
                               num_speculative_tokens=num_speculative_tokens, **options)


def generate_speculative(engine: LLMEngine, prompts, max_tokens: int, temperature: float = 0.0,
                         seed: int | None = None) -> list[list[int]]:
    """Serve every prompt to max_tokens on `engine` (an LLMEngine with a proposer, or without for the reference);
    returns the generated ids per prompt, in order. Failed requests raise."""
    from helpers.course.engine.request import Request
    requests = [Request(i, p, max_tokens=max_tokens, temperature=temperature,
                        seed=None if seed is None else seed + i) for i, p in enumerate(prompts)]
    for request in requests:
        engine.add_request(request)
    while engine.has_unfinished:
        engine.step()
        failed = engine.take_failed()
        if failed:
            raise RuntimeError(f"request {failed[0].rid!r} failed: {failed[0].error}\n{failed[0].traceback}")
    return [r.tokens for r in requests]


def plain_greedy(prompts, max_tokens: int, model=None) -> list[list[int]]:
    """The reference: the same prompts on the plain paged engine (one token per forward)."""
    engine = LLMEngine.paged(model, num_blocks=128, block_size=16)
    return generate_speculative(engine, prompts, max_tokens)


# ---------------------------------------------------------------------------------------------- across processes
class RemoteProposer:
    """A target rank's proposer: the draft lives on rank `draft_rank`. Each call, rank 0 broadcasts the requests'
    tokens (and sampling settings); the draft rank broadcasts its proposals back (torch.distributed over gloo)."""
    name = "draft model on another rank"

    def __init__(self, draft_rank: int):
        self.draft_rank, self.released, self.messages = draft_rank, [], 0

    def propose(self, requests, k: int) -> dict:
        import torch.distributed as dist
        ask = [{"rid": r.rid, "tokens": r.all_token_ids, "temperature": r.temperature, "seed": r.seed}
               for r in requests]
        box = [{"ask": ask, "k": k, "release": self.released}]
        dist.broadcast_object_list(box, src=0)
        self.released = []
        answer = [None]
        dist.broadcast_object_list(answer, src=self.draft_rank)
        self.messages += 1
        return answer[0]

    def release(self, rid) -> None:
        self.released.append(rid)

    def stop(self) -> None:
        import torch.distributed as dist
        dist.broadcast_object_list([None], src=0)


@dataclass
class _AskedRequest:
    rid: object
    all_token_ids: list
    temperature: float
    seed: object


def serve_proposals(proposer) -> int:
    """The draft rank's loop: answer rank 0's requests for proposals until it says stop. Returns the rounds served."""
    import torch.distributed as dist
    rounds = 0
    while True:
        box = [None]
        dist.broadcast_object_list(box, src=0)
        if box[0] is None:
            return rounds
        for rid in box[0]["release"]:
            proposer.release(rid)
        asked = [_AskedRequest(a["rid"], a["tokens"], a["temperature"], a["seed"]) for a in box[0]["ask"]]
        dist.broadcast_object_list([proposer.propose(asked, box[0]["k"])], src=dist.get_rank())
        rounds += 1


def speculative_tp_job(rank, world_size, prompts, max_tokens: int, k: int = 4, temperature: float = 0.0,
                       seed: int | None = None):
    """3 ranks: 0 and 1 the target at TP=2 (shard_llama over a sub-group), each an LLMEngine with the remote
    proposer, in lockstep; 2 the draft model. Returns, on the target ranks, (generated ids per prompt, spec stats
    as a dict, proposal rounds); on the draft rank (None, None, rounds served)."""
    import torch.distributed as dist
    from helpers.course.tiny_llama import load_model
    if world_size != 3:
        raise ValueError(f"speculative_tp_job runs on 3 ranks (target TP=2 + draft), got world_size={world_size}")
    torch.set_num_threads(1)
    tp_group = dist.new_group([0, 1])            # every rank takes part in creating it
    if rank == 2:
        return None, None, serve_proposals(DraftModelProposer())
    model = load_impl("tp_llama").shard_llama(load_model(), group=tp_group)
    proposer = RemoteProposer(draft_rank=2)
    engine = LLMEngine.paged(model, num_blocks=128, proposer=proposer, num_speculative_tokens=k)
    try:
        tokens = generate_speculative(engine, prompts, max_tokens, temperature, seed)
    finally:
        if rank == 0:
            proposer.stop()
        else:
            dist.broadcast_object_list([None], src=0)    # rank 1 takes part in the stop broadcast too
    return tokens, vars(engine.spec_stats), proposer.messages


# ---------------------------------------------------------------------------------------------- modelled time
def roofline_seconds(config, tokens: int, batch: int, context: int, peak_flop_per_s: float, bandwidth: float,
                     bytes_per_value: int = 2) -> float:
    """Modelled seconds of one forward of `batch` sequences of `tokens` new tokens after `context` cached ones:
    max(FLOPs / peak, bytes / bandwidth) from chapter 7's step_cost (helpers/course/roofline.py)."""
    from helpers.course.roofline import step_cost
    cost = step_cost(config, tokens, batch=batch, context=context, bytes_per_value=bytes_per_value)
    return max(cost.flops / peak_flop_per_s, cost.bytes / bandwidth)


def expected_tokens_per_step(alpha: float, k: int) -> float:
    """Tokens emitted per verification when each draft token is accepted with probability alpha independently
    (Leviathan et al. 2023, eq. 1): (1 − alpha^(k+1)) / (1 − alpha)."""
    return float(k + 1) if alpha >= 1 else (1 - alpha ** (k + 1)) / (1 - alpha)


def modelled_speedup(target_config, draft_config, k: int, tokens_per_step: float, batch: int, context: int,
                     peak_flop_per_s: float, bandwidth: float) -> float:
    """Decode throughput with speculation over without, at one batch size, on modelled time: per step the target
    verifies k + 1 tokens per sequence and the draft runs k one-token forwards; plain decoding runs one target
    forward per token. tokens_per_step: measured (accepted + 1 per verification)."""
    plain = roofline_seconds(target_config, 1, batch, context, peak_flop_per_s, bandwidth)
    verify = roofline_seconds(target_config, k + 1, batch, context, peak_flop_per_s, bandwidth)
    draft = k * roofline_seconds(draft_config, 1, batch, context, peak_flop_per_s, bandwidth)
    return tokens_per_step * plain / (verify + draft)
