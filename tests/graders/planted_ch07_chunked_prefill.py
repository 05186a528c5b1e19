"""Wrong answers to exercise 7.4 (chunked prefill), planted in the reference solution, for
tests/graders/test_ch07_chunked_prefill.py::test_planted_mistakes_are_caught; and valid answers written
differently, which the graders must pass (test_valid_alternatives_pass).

Each variant is a mistake a learner makes: several give plausible schedules (the budget almost kept, every
request eventually served), so only a grader that checks who gets how many tokens of which step catches
them. `build(name)` returns an object whose `.chunked_prefill` the graders' checks accept in place of
load_impl("chunked_prefill").
"""
from __future__ import annotations

import types
from dataclasses import dataclass


@dataclass(frozen=True)
class Variant:
    what: str
    points_at: tuple    # the first failure message must contain one of these


VARIANTS = {
    "budget_ignores_decodes": Variant("chunks sized from the whole budget, decodes not counted",
                                      ("over token_budget",)),
    "prefill_first": Variant("prompt chunks scheduled before the decodes", ("decodes first",)),
    "decode_partial": Variant("a partly prefilled request decodes before its prompt is complete",
                              ("still prefilling",)),
    "chunk_whole_prompt": Variant("chunk = min(prompt_len, left): cached tokens computed again (duplicates)",
                                  ("already in the cache",)),
    "chunk_fills_budget": Variant("chunk = the budget left: positions past the prompt", ("past the end",)),
    "forgets_partial": Variant("partly prefilled requests never continued (their tail skipped)",
                               ("first come first served",)),
    "shortest_first": Variant("waiting prompts served shortest first: a long one starves",
                              ("first come first served",)),
    "unchunked_first_fit": Variant("unchunked: later prompts that fit overtake one that does not",
                                   ("first come first served",)),
    "unchunked_splits": Variant("chunked=False ignored: prompts split anyway", ("runs whole",)),
    "no_errors": Variant("token_budget=0 accepted without ValueError", ("ValueError",)),
    "mutates_state": Variant("schedule_step advances req.computed itself", ("modified its inputs",)),
}

ALTERNATIVES = {
    "prompts_listed_first": "the entries listed prompt chunks first, decodes after (the tokens are the same)",
    "generator": "a generator of (request, num_tokens) pairs instead of a list",
    "budget_loop": "one queue of (request, need) worked off with a while loop",
    "pairs_as_lists": "[request, num_tokens] lists instead of tuples",
}


def _step(mistake=None):
    def schedule_step(running, waiting, token_budget, chunked=True):
        if token_budget < 1 and mistake != "no_errors":
            raise ValueError(f"token_budget={token_budget} must be >= 1")
        decodes, chunks, left = [], [], token_budget
        if mistake == "decode_partial":
            decoding = list(running)
        else:
            decoding = [r for r in running if r.prefilled]
        partial = [] if mistake in ("decode_partial", "forgets_partial") else [r for r in running if not r.prefilled]
        prompts = partial + list(waiting)
        if mistake == "shortest_first":
            prompts = partial + sorted(waiting, key=lambda r: r.remaining_prompt)

        def fill_prompts(left):
            for req in prompts:
                need = req.remaining_prompt
                if chunked or mistake == "unchunked_splits":
                    if left <= 0:
                        break
                    if mistake == "chunk_whole_prompt":
                        take = min(req.prompt_len, left)
                    elif mistake == "chunk_fills_budget":
                        take = left
                    elif mistake == "budget_ignores_decodes":
                        take = min(need, token_budget)
                    else:
                        take = min(need, left)
                else:
                    if need > token_budget and mistake != "no_errors":
                        raise ValueError(f"request {req.rid}: prompt of {need} tokens over token_budget={token_budget}")
                    if need > left:
                        if mistake == "unchunked_first_fit":
                            continue
                        break
                    take = need
                chunks.append((req, take))
                left -= take
            return left

        if mistake == "prefill_first":
            left = fill_prompts(left)
        for req in decoding:
            if left > 0:
                decodes.append((req, 1))
                left -= 1
        if mistake != "prefill_first":
            fill_prompts(left)
        if mistake == "mutates_state":
            for req, n in chunks:
                req.computed += n
        if mistake == "prompts_listed_first":
            return chunks + decodes
        if mistake == "pairs_as_lists":
            return [[req, n] for req, n in decodes + chunks]
        if mistake == "generator":
            return (entry for entry in decodes + chunks)
        return decodes + chunks

    return schedule_step


def _budget_loop(running, waiting, token_budget, chunked=True):
    if token_budget < 1:
        raise ValueError("token_budget must be >= 1")
    queue = [(r, 1) for r in running if r.prefilled] + \
        [(r, r.remaining_prompt) for r in running if not r.prefilled] + [(r, r.remaining_prompt) for r in waiting]
    out, left, i = [], token_budget, 0
    while i < len(queue) and left > 0:
        req, need = queue[i]
        if not chunked and not req.prefilled:
            if need > token_budget:
                raise ValueError(f"prompt of {need} tokens over the budget")
            if need > left:
                break
        take = min(need, left)
        if req.prefilled and take < 1:
            break
        out.append((req, take))
        left -= take
        i += 1
    return out


def build(name: str | None):
    """The reference implementation with variant `name` planted (None: unmodified)."""
    import solutions.chunked_prefill as sol
    cp = types.SimpleNamespace(**{k: v for k, v in vars(sol).items() if not k.startswith("__")})
    if name == "budget_loop":
        cp.schedule_step = _budget_loop
    elif name is not None:
        if name not in VARIANTS and name not in ALTERNATIVES:
            raise KeyError(f"no planted variant {name!r}")
        cp.schedule_step = _step(name)
    return types.SimpleNamespace(chunked_prefill=cp)
