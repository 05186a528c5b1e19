"""Graders for chapter 8, part A (labs/expert_parallel.py): top-k routing with a capacity limit, and expert
parallelism with all_to_all.

Each exercise has check functions that return a list of failures: the graders run them on the implementation
under test (COURSE_IMPL), and tests/graders/planted_ch08_experts.py runs the same functions on wrong answers planted in
the reference solution (`test_planted_mistakes_are_caught`, no exercise marker). 8.2's check runs inside every
rank of a real job (world sizes 1-4, and at 4 also inside the sub-groups {0,1} and {2,3}); every rank builds
the same block and every rank's tokens from fixed seeds, so each rank knows the whole exchange it must see.

What the graders check:
  8.1 expert_capacity, top_k_route: the experts chosen (exact), the gate weights (softmax over all experts in
      float32, top-k renormalised), the capacity rule (first choices before second choices, token order
      within a round; exact kept mask), dropped slots weigh 0 and kept ones are not renormalised again,
      capacity = ceil(factor·T·k/E) on inputs where each usual wrong rounding gives another integer (the
      message names the rounding the learner's values follow), every promised ValueError.
  8.2 ExpertParallelMoE: WHO HOLDS WHICH BYTES (the router and this rank's E/n experts, exactly those
      weights, nothing else); WHICH COLLECTIVES in which group (CommTracer): only all_to_all (all_gather
      allowed for the counts), counts exchanged FIRST, then one all_to_all of exactly the kept rows this rank
      sends (variable sizes: no padding, no dropped slot), then one of exactly the rows its experts computed
      — or, as the docstring allows (DeepEP's normal mode), one row per (token, destination rank) each way, with
      up to 2·top_k metadata columns (ids, weights) packed beside the dispatched rows;
      WHO COMPUTES WHAT (each local expert sees exactly the rows routed to it from every rank); the output
      against the single-process block, in the original token order, on ranks with 0 tokens too (a wrong
      output is compared with the usual wrong combines, computed with the grader's own block, to name the
      mistake: weights missing, applied before the experts or twice, a token's repeated index written once);
      the promised ValueErrors.

Mistakes each grader catches (each one planted in tests/graders/planted_ch08_experts.py and asserted caught):
  8.1 capacity_floor        floor instead of ceil: a balanced router already drops
      capacity_ceil_twice   ceil(factor·ceil(T·k/E)): rounded up before the factor (the old cases agreed)
      capacity_per_choice   ceil(factor·T/E)·k: each choice rounded up (the old cases agreed)
      capacity_truncated    ceil(int(factor·T·k)/E): the product truncated first (the old cases agreed)
      route_no_renorm       top-k probabilities not renormalised to sum to 1
      route_low_precision   softmax in the logits' dtype (bfloat16), not float32
      route_token_major     capacity served token by token (a token's 2nd choice beats a later token's 1st)
      route_dropped_weight  a dropped slot keeps its weight
      route_renorm_dropped  the kept weights renormalised again after dropping
      route_no_errors       top_k > num_experts accepted without ValueError
  8.2 ep_all_gather         every rank all-gathers all tokens and all-reduces the outputs: no all_to_all
      ep_padded             every payload padded to the largest count (fixed-size buffers): extra bytes
      ep_sends_dropped      dropped slots sent and computed with weight 0: extra bytes, extra rows
      ep_order_lost         results added back in the expert-sorted order, not the tokens' order
      ep_all_experts        every rank keeps every expert
      ep_unweighted         results not multiplied by the gate weights
      ep_weights_early      x's rows scaled by the gate weights before the experts, not the results after
      ep_weighted_twice     the gate weights applied before the experts and again after
      ep_duplicates_lost    out[token] += rows: a token's two slots share an index, one write survives
      ep_per_rank_slot_lost one row per destination rank, its local experts' results assigned, not added
      ep_floor_split        num_experts // world_size experts per rank, no ValueError
"""
import math
from fractions import Fraction
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from helpers import launch, load_impl
from helpers.claims import max_abs_diff, tolerance
from helpers.comm_trace import CommTracer
from helpers.course.moe import MoEBlock, Routing, experts_of_rank, skew_towards
from tests.graders.planted import planted_tests

# Rounding budget (helpers.claims policy): the expert MLPs reduce over hidden/ffn ≤ 32 terms, and the two
# computations differ only in how the rows are batched and in which order at most top_k slots are added.
FACTOR = 64
ROUTE = "labs/expert_parallel.py: top_k_route"
CAPACITY = "labs/expert_parallel.py: expert_capacity"
EP = "labs/expert_parallel.py: ExpertParallelMoE"
ALL_TO_ALL = {"all_to_all", "all_to_all_single"}
GATHERS = {"all_gather", "all_gather_into_tensor", "all_gather_single"}


def _ep(impl):
    return impl.expert_parallel if impl is not None else load_impl("expert_parallel")


def _call(where, what, hint, fn, *args, **kwargs):
    """Run learner code; an error other than the stub's NotImplementedError says where it happened."""
    try:
        return fn(*args, **kwargs)
    except NotImplementedError:
        raise
    except Exception as exc:
        raise AssertionError(f"{where}: {what} raised {type(exc).__name__}: {exc} — {hint}") from exc


def reference_route(logits, top_k, capacity=None) -> Routing:
    """The grader's own routing, written as loops (independent of the vectorised reference solution)."""
    probs = torch.softmax(logits.float(), dim=-1)
    num_tokens, num_experts = probs.shape
    ids = torch.zeros(num_tokens, top_k, dtype=torch.long)
    weights = torch.zeros(num_tokens, top_k)
    for t in range(num_tokens):
        order = sorted(range(num_experts), key=lambda e: (-float(probs[t, e]), e))[:top_k]
        ids[t] = torch.tensor(order)
        weights[t] = probs[t, order] / probs[t, order].sum()
    kept = torch.ones(num_tokens, top_k, dtype=torch.bool)
    if capacity is not None:
        used = [0] * num_experts
        for choice in range(top_k):          # every token's 1st choice, then every token's 2nd, ...
            for t in range(num_tokens):
                e = int(ids[t, choice])
                kept[t, choice] = used[e] < capacity
                used[e] += bool(kept[t, choice])
        weights = weights * kept
    return Routing(ids, weights, kept)


# ---------------------------------------------------------------------------------------- 8.1 routing

def reference_capacity(tokens, experts, k, factor) -> int:
    """ceil(factor·T·k/E), the docstring's formula, in exact arithmetic (the factors below are exact binary
    fractions, so a float computation of the same formula gives the same integer)."""
    return math.ceil(Fraction(factor) * tokens * k / experts)


# (num_tokens, num_experts, top_k, capacity_factor): each wrong rounding below differs from ceil(f·T·k/E) on at
# least one of them (the last five were added for the roundings that agreed on the first five).
CAPACITY_CASES = [(16, 4, 2, 1.0), (10, 4, 1, 1.0), (10, 8, 2, 1.25), (7, 3, 2, 2.0), (0, 4, 2, 1.0),
                  (10, 8, 2, 1.5), (10, 4, 2, 1.0), (5, 4, 1, 1.75), (13, 4, 1, 1.25), (3, 8, 2, 0.5)]

# Roundings a learner writes instead of ceil(f·T·k/E), and what to tell them (each planted in
# planted_ch08_experts.py). The grader names the one that gives the learner's value on EVERY case.
WRONG_CAPACITY = [
    ("floor", lambda t, e, k, f: math.floor(Fraction(f) * t * k / e),
     "round UP (math.ceil), not down: with floor a perfectly balanced router already drops slots"),
    ("round", lambda t, e, k, f: round(Fraction(f) * t * k / e),
     "round UP (math.ceil), not to the nearest integer: a balanced router would drop slots"),
    ("plus_one", lambda t, e, k, f: math.floor(Fraction(f) * t * k / e) + 1,
     "int(x) + 1 is not ceil(x): when factor·T·k/E is a whole number it gives one slot too many"),
    ("ceil_twice", lambda t, e, k, f: math.ceil(Fraction(f) * math.ceil(Fraction(t * k, e))),
     "round once, at the end: ceil(factor·T·k/E), not ceil(factor·ceil(T·k/E)) — rounding the balanced load "
     "up before applying the factor can add a slot"),
    ("per_choice", lambda t, e, k, f: math.ceil(Fraction(f) * t / e) * k,
     "multiply by top_k BEFORE rounding: ceil(factor·T·k/E), not ceil(factor·T/E)·k — rounding each choice "
     "up separately gives up to top_k-1 slots too many"),
    ("truncated", lambda t, e, k, f: -(-int(Fraction(f) * t * k) // e),
     "do not truncate factor·T·k to an integer before dividing (int() drops its fraction): "
     "ceil(factor·T·k/E) in one step"),
]


def _capacity_hint(got: dict) -> str:
    """The wrong rounding that gives every value the learner returned, or the formula to use."""
    for _, formula, hint in WRONG_CAPACITY:
        if all(value == formula(*case) for case, value in got.items()):
            return hint
    return "compute ceil(capacity_factor × num_tokens × top_k / num_experts), rounding up once, at the end"


def check_capacity(impl):
    ep, failures = _ep(impl), []
    got = {case: _call("[8.1]", f"expert_capacity{case}", CAPACITY, ep.expert_capacity, *case)
           for case in CAPACITY_CASES}
    wrong = {case: value for case, value in got.items() if value != reference_capacity(*case)}
    if wrong:
        hint = _capacity_hint(got)
        for (tokens, experts, k, factor), value in wrong.items():
            exact = Fraction(factor) * tokens * k / experts
            failures.append(f"[8.1] expert_capacity(num_tokens={tokens}, num_experts={experts}, top_k={k}, "
                            f"capacity_factor={factor}) = {value}, expected "
                            f"{reference_capacity(tokens, experts, k, factor)} = ceil({factor}·{tokens}·{k}/"
                            f"{experts}) = ceil({float(exact):g}) — {hint} ({CAPACITY})")
    for bad in (0.0, -1.0):
        try:
            ep.expert_capacity(8, 4, 2, bad)
            failures.append(f"[8.1] expert_capacity(capacity_factor={bad}) raised no ValueError — the docstring "
                            f"promises one for capacity_factor <= 0 ({CAPACITY})")
        except ValueError:
            pass
    return failures


ROUTE_CASES = [  # (tokens, experts, top_k, logits dtype, capacities to try)
    (9, 4, 1, torch.float32, (None, 0, 2, 9)),
    (16, 8, 2, torch.float32, (None, 1, 3, 4, 32)),
    (12, 6, 3, torch.float32, (None, 2, 5)),
    (10, 8, 2, torch.bfloat16, (None, 3)),
    (6, 5, 5, torch.float32, (None, 4)),
]


def check_route(impl):
    ep, failures = _ep(impl), []
    for i, (tokens, experts, k, dtype, capacities) in enumerate(ROUTE_CASES):
        torch.manual_seed(800 + i)
        logits = (torch.randn(tokens, experts) * 2).to(dtype)
        logits[:, 0] += 1.5                  # skewed: expert 0 is everyone's favourite, so capacities bite
        for capacity in capacities:
            where = f"[8.1] T={tokens} E={experts} top_k={k} logits {str(dtype)[6:]} capacity={capacity}"
            want = reference_route(logits, k, capacity)
            got = _call(where, "top_k_route", ROUTE, ep.top_k_route, logits, k, capacity)
            if not isinstance(got, tuple) or len(got) != 3:
                failures.append(f"{where}: returned {type(got).__name__}, expected Routing(expert_ids, weights, kept)"
                                f" — {ROUTE}")
                continue
            ids, weights, kept = got
            if tuple(ids.shape) != (tokens, k) or not torch.equal(ids.long(), want.expert_ids):
                failures.append(f"{where}: expert_ids {ids.tolist()} differ from the top-{k} experts by probability, "
                                f"highest first: {want.expert_ids.tolist()} ({ROUTE})")
                continue
            if weights.dtype != torch.float32:
                failures.append(f"{where}: weights are {weights.dtype}, expected float32: take the softmax in "
                                f"float32 (logits.float()), as Mixtral does ({ROUTE})")
                continue
            if kept.dtype != torch.bool or not torch.equal(kept, want.kept):
                bad = (kept != want.kept).nonzero().tolist()[:4]
                failures.append(f"{where}: kept mask wrong at [token, choice] {bad}: expected {want.kept.sum()} "
                                f"slots kept, got {int(kept.sum())}. Serve the first choices of all tokens (in token "
                                f"order) before any second choice, and keep at most `capacity` slots per expert "
                                f"({ROUTE})")
                continue
            diff, tol = max_abs_diff(weights, want.weights), tolerance(want.weights, torch.float32, FACTOR)
            if diff > tol:
                dropped = ~want.kept
                if dropped.any() and float(weights[dropped].abs().max()) > 0:
                    hint = "a dropped slot must have weight 0"
                elif dropped.any() and torch.allclose(weights.sum(-1)[kept.any(-1)], torch.ones(1)):
                    hint = "the kept weights must NOT be renormalised again after dropping"
                elif not torch.allclose(weights.sum(-1), torch.ones(1)) and capacity is None:
                    hint = "renormalise the top-k probabilities to sum to 1 (Mixtral's gate weights)"
                else:
                    hint = "softmax over ALL experts in float32 (logits.float()), then top-k, then renormalise"
                failures.append(f"{where}: weights differ from the reference by {diff:.2e} > {tol:.1e} — {hint} "
                                f"({ROUTE})")
    logits = torch.randn(4, 3)
    for label, args in {"top_k=0": (logits, 0), "top_k=4 > num_experts=3": (logits, 4),
                        "capacity=-1": (logits, 2, -1), "3-D logits": (logits[None], 1)}.items():
        try:
            ep.top_k_route(*args)
            failures.append(f"[8.1] top_k_route with {label} raised no ValueError — the docstring promises one "
                            f"({ROUTE})")
        except ValueError:
            pass
    return failures


@pytest.mark.exercise("8.1", "Top-k routing with a capacity limit")
def test_expert_capacity():
    failures = check_capacity(None)
    assert not failures, "\n".join(failures)


@pytest.mark.exercise("8.1", "Top-k routing with a capacity limit")
def test_top_k_route():
    failures = check_route(None)
    assert not failures, "\n".join(failures[:8])


# --------------------------------------------------------------------------- 8.2 expert parallelism

EP_CASES = [  # (hidden, ffn, experts per rank, top_k, tokens of group rank r, capacity factor or None, skew)
    (16, 24, 3, 2, (6, 0, 11, 3), None, False),
    (16, 24, 2, 2, (13, 9, 1, 7), 1.0, True),
    (8, 16, 1, 1, (5, 7, 4, 6), None, True),
]


def _ep_case(case, n):
    """Block, every rank's tokens and routing: every rank computes all of them, so it knows the whole exchange."""
    hidden, ffn, per_rank, k, tokens, factor, skew = case
    torch.manual_seed(8200 + hidden + per_rank)
    block = MoEBlock(hidden, ffn, per_rank * n, k)
    xs, routings = [], []
    with torch.no_grad():
        for r in range(n):
            torch.manual_seed(8300 + r)
            x = torch.randn(tokens[r % len(tokens)], hidden)
            x = skew_towards(x, block, 0, 2.0) if skew else x       # expert 0 everyone's favourite: drops
            capacity = None if factor is None else reference_capacity(x.shape[0], block.num_experts, k, factor)
            xs.append(x)
            routings.append(reference_route(block.router(x), k, capacity))
    return block, xs, routings


def _collectives(failures, where, trace, group, n, num_experts, send_bytes, recv_bytes):
    """Counts first, then exactly the kept rows out, then exactly the computed rows back; only all_to_all
    (all_gather allowed for the counts); every call in `group`. send_bytes / recv_bytes: the payloads a correct
    answer may have (one per slot, or one per (token, destination rank) with metadata columns)."""
    ranks = tuple(dist.get_process_group_ranks(group)) if group is not None else tuple(range(dist.get_world_size()))
    records = trace.records
    ops = [r.op for r in records]
    wrong_ops = [op for op in ops if op not in ALL_TO_ALL | GATHERS]
    if wrong_ops or not any(op in ALL_TO_ALL for op in ops):
        failures.append(f"{where}: the forward called {ops or 'no collective'}; expected only all_to_all "
                        f"(counts, then the rows out, then the results back) — dispatch each row to the rank of its "
                        f"expert, not to everyone (all-gather/reduce-scatter is vLLM's default backend, a different "
                        f"trade-off that section A4 measures; exercise 8.2 asks for the all_to_all) ({EP}.forward)")
        return
    wrong_group = sorted({r.ranks for r in records if tuple(r.ranks) != ranks})
    if wrong_group:
        failures.append(f"{where}: collectives ran in group(s) {[list(g) for g in wrong_group]}, expected "
                        f"{list(ranks)} — pass group=self.group to every collective ({EP}.forward)")
    counts_budget = n * num_experts * 8          # the whole count matrix as int64: more is not "counts"
    dispatch = next((i for i, r in enumerate(records) if i > 0 and r.op in ALL_TO_ALL and r.payload in send_bytes),
                    None)
    combine = None if dispatch is None else next(
        (i for i, r in enumerate(records) if i > dispatch and r.op in ALL_TO_ALL and r.payload in recv_bytes), None)
    payloads = [(r.op, r.payload) for r in records]
    if dispatch is None or combine is None:
        failures.append(f"{where}: expected an all_to_all of exactly the {send_bytes[0]} bytes of the kept rows this "
                        f"rank sends, after the counts, then one of exactly the {recv_bytes[0]} bytes its experts "
                        f"computed (or one row per destination rank: {send_bytes[1]} and {recv_bytes[1]} bytes); "
                        f"got (op, payload bytes) {payloads} — send only the kept slots, no padding, variable sizes "
                        f"({EP}.forward)")
        return
    if records[0].payload > counts_budget or records[0].op not in ALL_TO_ALL | GATHERS:
        failures.append(f"{where}: the first collective must exchange the counts (≤ {counts_budget} bytes), got "
                        f"{records[0].op} of {records[0].payload} bytes — counts first, so every rank can size its "
                        f"receive buffers ({EP}.forward)")
    extra = sum(r.payload for i, r in enumerate(records) if i not in (dispatch, combine))
    if extra > counts_budget + 2 * 8 * (max(send_bytes) + max(recv_bytes)) // 4:
        failures.append(f"{where}: besides the rows, the collectives carried {extra} bytes: more than counts and "
                        f"per-row metadata — {payloads} ({EP}.forward)")


def _token_rank_pairs(routing, experts_per_rank):
    """The distinct (token, destination rank) pairs of a routing's kept slots."""
    return {(t, int(routing.expert_ids[t, s]) // experts_per_rank) for t, s in zip(*torch.where(routing.kept))
            for t, s in [(int(t), int(s))]}


def _slot_outputs(block, rows, routing):
    """expert_ids[t, s]'s output for rows[t, s] ([T, k, hidden]) at every kept slot, 0 at dropped ones."""
    out = torch.zeros_like(rows)
    for e, expert in enumerate(block.experts):
        token, slot = torch.where((routing.expert_ids == e) & routing.kept)
        if token.numel():
            out[token, slot] = expert(rows[token, slot])
    return out


def _output_hint(block, x, routing, y, tol):
    """What the learner's output `y` is, if it is one of the usual wrong combines, computed with the grader's own
    block (no learner code): the fix for that mistake, else where the rows must go."""
    with torch.no_grad():
        w = routing.weights.to(x.dtype)[..., None]
        slots = _slot_outputs(block, x[:, None].expand(-1, block.top_k, -1).contiguous(), routing)
        early = _slot_outputs(block, x[:, None] * w, routing)        # the rows scaled before the experts
    close = lambda a: a.shape == y.shape and max_abs_diff(y, a) <= tol          # noqa: E731
    if close(slots.sum(1)):
        return "multiply each returned row by its gate weight"
    if close(early.sum(1)):
        return ("apply the gate weights AFTER the experts: an expert MLP is not linear, so expert(w·x) is not "
                "w·expert(x) — dispatch the token's rows unscaled and multiply the returned rows by their weights")
    if close((early * w).sum(1)):
        return ("apply each gate weight once, after the expert: the rows were scaled before the experts and the "
                "results again after")
    weighted = slots * w
    several = routing.kept.sum(1) > 1
    one_each = [any(max_abs_diff(y[t], weighted[t, s]) <= tol for s in range(block.top_k) if routing.kept[t, s])
                or max_abs_diff(y[t], weighted[t].sum(0)) <= tol for t in range(x.shape[0])]
    if several.any() and all(one_each) and max_abs_diff(y[several], weighted[several].sum(1)) > tol:
        return ("each token got only one of its top_k expert results: add every slot's result into its token "
                "with out.index_add_(0, token, rows) — out[token] += rows keeps one write per repeated index, and "
                "so does out[row] = ... for a token whose experts share a rank")
    return ("add each returned row to the token it came from: restore the original order (the rows come back "
            "sorted by expert, not by token)")


def check_ep(impl, rank, world_size, group, label):
    ep, failures = _ep(impl), []
    n, r = dist.get_world_size(group), dist.get_rank(group)
    from helpers.course.memory import parameter_bytes
    for case in EP_CASES:
        block, xs, routings = _ep_case(case, n)
        hidden, per_rank = case[0], case[2]
        x, routing = xs[r], routings[r]
        where = (f"[8.2] rank {rank} {label} E={block.num_experts} top_k={block.top_k} tokens={x.shape[0]} "
                 f"capacity={'none' if case[5] is None else case[5]}")
        module = _call(where, "ExpertParallelMoE(block, group)", f"look at {EP}.__init__", ep.ExpertParallelMoE,
                       block, group)
        mine = experts_of_rank(block.num_experts, r, n)
        experts = getattr(module, "experts", None)
        if getattr(module, "first_expert", None) != mine.start or experts is None or len(experts) != len(mine):
            failures.append(f"{where}: expected first_expert={mine.start} and {len(mine)} experts in self.experts "
                            f"(experts {list(mine)}), got first_expert={getattr(module, 'first_expert', None)} and "
                            f"{None if experts is None else len(experts)} — this rank holds experts "
                            f"[r·E/n, (r+1)·E/n) only ({EP}.__init__)")
            continue
        for j, e in enumerate(mine):
            same = all(torch.equal(a, b) for a, b in zip(experts[j].state_dict().values(),
                                                         block.experts[e].state_dict().values()))
            if not same:
                failures.append(f"{where}: self.experts[{j}] does not hold expert {e}'s weights ({EP}.__init__)")
        want_bytes = parameter_bytes(block.router) + sum(parameter_bytes(block.experts[e]) for e in mine)
        if parameter_bytes(module) != want_bytes:
            failures.append(f"{where}: this rank holds {parameter_bytes(module):,} B of parameters, expected "
                            f"{want_bytes:,} B (the router and its {len(mine)} experts only) — it holds more than "
                            f"its experts ({EP}.__init__)")
        rows_seen = [0] * len(experts)
        def count_rows(j):
            return lambda mod, args: rows_seen.__setitem__(j, rows_seen[j] + args[0].shape[0])
        hooks = [m.register_forward_pre_hook(count_rows(j)) for j, m in enumerate(experts)]
        with torch.no_grad(), CommTracer() as trace:
            y = _call(where, "forward", f"look at {EP}.forward", module, x, routing)
        for h in hooks:
            h.remove()
        with torch.no_grad():
            want = block(x, routing)
        routed = [sum(int(((ro.expert_ids == e) & ro.kept).sum()) for ro in routings) for e in mine]
        if rows_seen != routed:
            failures.append(f"{where}: this rank's experts {list(mine)} computed {rows_seen} rows, expected {routed} "
                            f"(the kept slots routed to them from every rank) — each row goes to its expert's rank "
                            f"only, dropped slots nowhere ({EP}.forward)")
        if n > 1:
            element, k = x.element_size(), block.top_k
            pairs = [_token_rank_pairs(ro, per_rank) for ro in routings]       # per (token, destination rank)
            sent = [int(routing.kept.sum()) * hidden * element] + [
                len(pairs[r]) * (hidden + c) * element for c in (0, k, 2 * k)]
            to_me = sum(1 for p in pairs for _, dest in p if dest == r)
            received = [sum(routed) * hidden * element, to_me * hidden * element]
            _collectives(failures, where, trace, group, n, block.num_experts, sent, received)
        if y is None or tuple(y.shape) != tuple(want.shape):
            failures.append(f"{where}: output shape {None if y is None else tuple(y.shape)}, expected "
                            f"{tuple(want.shape)} ({EP}.forward)")
            continue
        diff, tol = max_abs_diff(y, want), tolerance(want, torch.float32, FACTOR)
        if diff > tol:
            hint = _output_hint(block, x, routing, y, tol)
            failures.append(f"{where}: output differs from the single-process block: max |diff| {diff:.2e} > {tol:.1e}"
                            f" — {hint} ({EP}.forward)")
    return failures


def check_ep_errors(rank, world_size, impl=None):
    """Run on 4 ranks: 6 experts cannot be split over 4; x and routing of different lengths."""
    ep, failures = _ep(impl), []
    try:
        ep.ExpertParallelMoE(MoEBlock(8, 8, 6, 2))
        failures.append(f"[8.2] rank {rank}: ExpertParallelMoE with 6 experts on 4 ranks raised no ValueError — the "
                        f"docstring promises one (num_experts not divisible by the group size) ({EP}.__init__)")
    except ValueError as exc:
        if "6" not in str(exc) or "4" not in str(exc):
            failures.append(f"[8.2] rank {rank}: the ValueError should name num_experts=6 and world_size=4: {exc}")
    torch.manual_seed(0)
    block = MoEBlock(8, 8, 4, 1)
    module = ep.ExpertParallelMoE(block)
    x = torch.randn(5, 8)
    routing = reference_route(block.router(x[:3]), 1)
    try:
        with torch.no_grad():
            module(x, routing)
        failures.append(f"[8.2] rank {rank}: forward with 5 tokens and a routing of 3 raised no ValueError — the "
                        f"docstring promises one ({EP}.forward)")
    except ValueError:
        pass
    return failures


def _run_ep(rank, world_size, impl=None):
    out = [(None, "WORLD")]
    if world_size == 4:
        halves = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        out.append((halves[rank // 2], f"sub-group {[0, 1] if rank < 2 else [2, 3]}"))
    return [f for group, label in out for f in check_ep(impl, rank, world_size, group, label)]


def _check_all(results):
    bad = [msg for rank_msgs in results for msg in rank_msgs]
    assert not bad, "\n".join(bad[:8]) + (f"\n... and {len(bad) - 8} more" if len(bad) > 8 else "")


@pytest.mark.exercise("8.2", "Expert parallelism: dispatch and combine with all_to_all")
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_expert_parallel(world_size):
    _check_all(launch(_run_ep, world_size, show_output=False))


@pytest.mark.exercise("8.2", "Expert parallelism: dispatch and combine with all_to_all")
def test_expert_parallel_errors():
    _check_all(launch(check_ep_errors, 4, None, show_output=False))


# ------------------------------------------------------------- planted wrong answers (not an exercise)

# The EP checks on 2 ranks (2 processes on the 2 cores: quick), the error checks on 4 (6 experts on 4), capacity and
# routing (one process's work) beside the EP ones. Its own alternatives test below: EP on 3 ranks, an odd group.
PLANTED_CHECKS = {"ep": check_ep,
                  "ep_errors": lambda impl, rank, world_size, *_: check_ep_errors(rank, world_size, impl),
                  "capacity": lambda impl, *_: check_capacity(impl), "route": lambda impl, *_: check_route(impl)}
planted_results, test_planted_mistakes_are_caught, _, test_reference_passes_the_checks_the_planted_tests_use = \
    planted_tests("planted_ch08_experts", PLANTED_CHECKS, "solutions.expert_parallel", ranked=True,
                  world_size={"ep": 2, "ep_errors": 4, "capacity": 2, "route": 2}, alternatives=None,
                  reference=["capacity", "route", "ep_errors"])


def _alternatives_job(rank, world_size, names):
    from tests.graders import planted_ch08_experts as planted
    return {name: check_ep(planted.build(name), rank, world_size, None, "WORLD") for name in names}


def test_valid_alternatives_pass():
    """Answers written differently (lists for all_to_all, counts all-gathered, one row per destination rank as
    DeepEP's normal mode, softmax over the top-k logits) pass the same checks: the graders grade the mechanism,
    not one way of writing it."""
    pytest.importorskip("solutions.expert_parallel", reason="the reference answers are absent")
    from tests.graders import planted_ch08_experts as planted
    names = [n for n in planted.ALTERNATIVES if n.startswith("ep_")]
    by_rank = launch(_alternatives_job, 3, names, show_output=False)        # 3 ranks: an odd group size
    for name in names:
        failures = [f for rank_out in by_rank for f in rank_out[name]]
        assert not failures, f"valid alternative {name!r} ({planted.ALTERNATIVES[name]}) failed: {failures[0]}"
    for name in (n for n in planted.ALTERNATIVES if n.startswith("route_")):
        failures = check_route(planted.build(name))
        assert not failures, f"valid alternative {name!r} ({planted.ALTERNATIVES[name]}) failed: {failures[0]}"


def test_grader_routing_matches_the_transformers_router():
    """The grader's loop routing = transformers' MixtralTopKRouter (softmax, top-k, renormalise)."""
    from helpers.course.moe import tiny_mixtral_block
    hf = tiny_mixtral_block(hidden=16, ffn=8, num_experts=6, top_k=2)
    x = torch.randn(11, 16)
    with torch.no_grad():
        logits, scores, ids = hf.gate(x)
    ours = reference_route(logits, 2)
    assert torch.equal(ours.expert_ids, ids)
    assert max_abs_diff(ours.weights, scores) <= tolerance(scores, torch.float32, FACTOR)
