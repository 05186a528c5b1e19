"""Graders for chapter 7's chunked prefill (labs/chunked_prefill.py): exercise 7.4, one scheduler step that
mixes prompt chunks with decodes under a per-step token budget.

The learner's `schedule_step` never runs in the grading process: every check runs inside a launched rank
(helpers.launch, one process), which also contains a scheduler that loops or crashes. Each check returns a
list of failures; tests/graders/planted_ch07_chunked_prefill.py plants wrong answers in the reference and
`test_planted_mistakes_are_caught` asserts each one is caught with a message pointing at it.

What the graders check (the mechanism: who gets how many tokens of which step):
  * one step, on hand-made states (decoding, partly prefilled and waiting requests, tight and loose budgets,
    chunked and unchunked): exactly the tokens each request gets, against the grader's own reference;
    a difference is explained by the rule it breaks (budget, decodes first, a request decodes only once its
    prompt is complete, chunks of the REMAINING prompt, first come first served, whole prompts when
    unchunked, no budget left unused); the inputs are not modified; the promised ValueErrors;
  * a whole run of helpers/course/engine_loop.py's engine with the learner's scheduler, chunked and
    unchunked: every step equal to the reference's on the same state, every token emitted at the same
    modelled time, no request starved.

Mistakes caught (each planted in tests/graders/planted_ch07_chunked_prefill.py):
  budget_ignores_decodes   prompt chunks sized from the whole budget: the decodes push the step over it
  prefill_first            prompt chunks before decodes: with a tight budget the running decodes stall
  decode_partial           a partly prefilled request decodes (1 token) before its prompt is complete
  chunk_whole_prompt       chunk = min(prompt_len, left): tokens already in the cache computed again
  chunk_fills_budget       chunk = the budget left: positions past the end of the prompt
  forgets_partial          partly prefilled requests never continued: their prompt's tail is skipped
  shortest_first           waiting prompts served shortest first: a long one starves
  unchunked_first_fit      unchunked, later prompts that fit overtake one that does not: it starves
  unchunked_splits         chunked=False ignored: the prompt is split anyway
  no_errors                token_budget=0 accepted without ValueError
  mutates_state            schedule_step advances req.computed itself (the engine applies a step)
"""
import numbers

import pytest

from helpers import launch, load_impl
from helpers.course.engine_loop import Request, Workload, run_workload

WHERE = "(labs/chunked_prefill.py: schedule_step)"


def _impl(impl):
    return impl.chunked_prefill if impl is not None else load_impl("chunked_prefill")


# ------------------------------------------------------------------------------- the grader's reference

def reference_step(running, waiting, token_budget, chunked=True):
    """{rid: tokens} of one step, written independently of the reference solution."""
    out, left = {}, token_budget
    for req in running:
        if req.computed >= req.prompt_len and left >= 1:
            out[req.rid], left = 1, left - 1
    for req in [r for r in running if r.computed < r.prompt_len] + list(waiting):
        need = req.prompt_len - req.computed
        if not chunked and need > left:
            break
        if left == 0:
            break
        out[req.rid] = min(need, left)
        left -= out[req.rid]
    return out


def _decoding(rid, prompt=16, generated=3):
    return Request(rid, prompt, 64, 0.0, prompt, [0.01 * i for i in range(generated)])


def _partial(rid, prompt, computed):
    return Request(rid, prompt, 8, 0.0, computed)


def _new(rid, prompt, arrival=0.0):
    return Request(rid, prompt, 8, arrival)


def _state(req):
    return (req.computed, tuple(req.token_times), req.prompt_len, req.max_tokens)


def _describe(req):
    if req.computed >= req.prompt_len:
        return f"request {req.rid} (decoding)"
    if req.computed:
        return f"request {req.rid} (prompt {req.computed}/{req.prompt_len} computed)"
    return f"request {req.rid} (waiting, prompt {req.prompt_len})"


def diagnose(got, running, waiting, token_budget, chunked):
    """The first rule `got` (what schedule_step returned) breaks, as a message; None when it is right."""
    want = reference_step(running, waiting, token_budget, chunked)
    ids = {id(r): r for r in list(running) + list(waiting)}
    try:
        entries = list(got)
    except TypeError:
        return f"returned {type(got).__name__}, expected a list of (request, num_tokens) {WHERE}"
    tokens = {}
    for entry in entries:
        if not (isinstance(entry, (tuple, list)) and len(entry) == 2):
            return f"entry {entry!r} is not a (request, num_tokens) pair {WHERE}"
        req, n = entry
        if id(req) not in ids:
            return f"entry {entry!r}: the request is not one of `running` or `waiting` (return those objects) {WHERE}"
        if req.rid in tokens:
            return f"{_describe(req)} appears twice in one step: give each request one entry {WHERE}"
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
            return (f"{_describe(req)}: num_tokens={n!r}, expected an int >= 1 (leave out requests that get none) "
                    f"{WHERE}")
        tokens[req.rid] = int(n)
    by_rid = {r.rid: r for r in ids.values()}
    total = sum(tokens.values())
    if total > token_budget:
        return (f"the step computes {total} tokens, over token_budget={token_budget} ({tokens}): the budget counts "
                f"every token of the step, the decodes' one each included — size the chunks from what the decodes "
                f"left {WHERE}")
    for rid, n in tokens.items():
        req = by_rid[rid]
        if req.computed < req.prompt_len and n == 1 and want.get(rid, 0) > 1 and req in running:
            return (f"{_describe(req)} got 1 token, as if it were decoding: it is still prefilling, and a request "
                    f"decodes only once its whole prompt is computed — give it a chunk of its remaining prompt, "
                    f"min(prompt_len - computed, budget left) = {want[rid]} {WHERE}")
        if req.computed >= req.prompt_len and n != 1:
            return f"{_describe(req)} got {n} tokens: a decoding request computes exactly 1 token per step {WHERE}"
        remaining = req.prompt_len - req.computed
        if req.computed < req.prompt_len and n > remaining:
            if n <= req.prompt_len and req.computed:
                what = (f"it computes again {n - remaining} tokens already in the cache (a chunk of the whole "
                        f"prompt, not of what is left)")
            else:
                what = f"it runs {n - remaining} positions past the end of the prompt"
            return (f"{_describe(req)} got a chunk of {n} tokens but only {remaining} remaining prompt tokens are "
                    f"left: {what} — a chunk is min(prompt_len - computed, budget left) {WHERE}")
    missing = [r for r in running if r.computed >= r.prompt_len and r.rid in want and r.rid not in tokens]
    if missing:
        prompts = sum(n for rid, n in tokens.items() if by_rid[rid].computed < by_rid[rid].prompt_len)
        if prompts:
            return (f"{_describe(missing[0])} got no token while prompt chunks took {prompts} tokens of the budget: "
                    f"decodes first (one token each), prompt chunks only from what is left — otherwise every "
                    f"running request stalls while a prompt is prefilled {WHERE}")
        return f"{_describe(missing[0])} got no token although the budget had room: every decode runs {WHERE}"
    extra = [rid for rid in tokens if rid not in want and by_rid[rid].computed >= by_rid[rid].prompt_len]
    if extra:
        return (f"{_describe(by_rid[extra[0]])} decoded although the budget of {token_budget} was spent by the "
                f"decodes before it: decodes in the order of `running`, as many as the budget holds {WHERE}")
    if not chunked:
        for rid, n in tokens.items():
            req = by_rid[rid]
            if req.computed < req.prompt_len and n < req.prompt_len - req.computed:
                return (f"chunked=False but {_describe(req)} got {n} of its {req.prompt_len - req.computed} remaining "
                        f"tokens: without chunking a prompt runs whole in one step or waits {WHERE}")
    line = [r for r in running if r.computed < r.prompt_len] + list(waiting)
    for i, req in enumerate(line):
        short = tokens.get(req.rid, 0) < req.prompt_len - req.computed
        later = [r for r in line[i + 1:] if r.rid in tokens]
        if short and later:
            return (f"first come first served: {_describe(req)} got {tokens.get(req.rid, 0)} of its "
                    f"{req.prompt_len - req.computed} remaining prompt tokens while {_describe(later[0])}, later in "
                    f"line, got {tokens[later[0].rid]} — a later prompt must not overtake an earlier one (partly "
                    f"prefilled requests of `running` first, then `waiting` in order), or the earlier one can starve "
                    f"{WHERE}")
    if tokens != want:
        if total < sum(want.values()):
            return (f"the step uses {total} of token_budget={token_budget} tokens ({tokens}) while prompts still wait: "
                    f"expected {want} — fill what the decodes leave with prompt chunks {WHERE}")
        return f"expected {{rid: tokens}} = {want}, got {tokens} {WHERE}"
    return None


# ---------------------------------------------------------------------------------- one step, many states

def step_cases():
    """(label, running, waiting, token_budget, chunked), fresh objects on every call."""
    return [
        ("4 decodes, a prompt larger than the budget left", [_decoding(i) for i in range(4)],
         [_new(4, 300), _new(5, 50)], 256, True),
        ("a prompt shorter than the budget", [], [_new(0, 10)], 256, True),
        ("decodes, a partly prefilled request, two waiting", [_decoding(0), _partial(1, 100, 40), _decoding(2)],
         [_new(3, 30), _new(4, 500)], 256, True),
        ("a tight budget: 6 decodes, budget 4", [_decoding(i) for i in range(6)], [_new(6, 100)], 4, True),
        ("a long prompt in line before a short one", [_decoding(0), _decoding(1)], [_new(2, 1000), _new(3, 20)],
         512, True),
        ("budget spent exactly by the decodes", [_decoding(i) for i in range(3)], [_new(3, 10)], 3, True),
        ("the last chunk of a prompt, then the next", [_partial(0, 600, 512)], [_new(1, 700)], 256, True),
        ("unchunked: whole prompts while they fit", [_decoding(i) for i in range(3)],
         [_new(3, 600), _new(4, 100), _new(5, 50)], 700, False),
        ("unchunked: a large budget", [], [_new(0, 100), _new(1, 200)], 8192, False),
        ("unchunked: the first prompt does not fit after the decodes", [_decoding(0), _decoding(1)],
         [_new(2, 500), _new(3, 8)], 500, False),
    ]


def check_step(impl):
    cp, failures = _impl(impl), []
    for label, running, waiting, budget, chunked in step_cases():
        before = [_state(r) for r in running + waiting]
        run_order, wait_order = list(running), list(waiting)
        try:
            got = cp.schedule_step(running, waiting, budget, chunked)
        except NotImplementedError:
            raise
        except Exception as exc:
            failures.append(f"[7.4] {label}: schedule_step(..., token_budget={budget}, chunked={chunked}) raised "
                            f"{type(exc).__name__}: {exc} {WHERE}")
            continue
        got = list(got) if not isinstance(got, (list, tuple)) and hasattr(got, "__iter__") else got
        if [_state(r) for r in run_order + wait_order] != before or running != run_order or waiting != wait_order:
            failures.append(f"[7.4] {label}: schedule_step modified its inputs (a request's computed or token_times, "
                            f"or the lists): it only decides; the engine applies the step {WHERE}")
            continue
        problem = diagnose(got, running, waiting, budget, chunked)
        if problem:
            failures.append(f"[7.4] {label} (token_budget={budget}, chunked={chunked}): {problem}")
    return failures


def check_errors(impl):
    cp, failures = _impl(impl), []
    cases = {"token_budget=0": ([_decoding(0)], [], 0, True),
             "token_budget=-8": ([], [_new(0, 4)], -8, True),
             "chunked=False and a prompt of 600 with token_budget=512": ([], [_new(0, 600)], 512, False)}
    for label, (running, waiting, budget, chunked) in cases.items():
        try:
            cp.schedule_step(running, waiting, budget, chunked)
        except NotImplementedError:
            raise
        except ValueError:
            continue
        except Exception as exc:
            failures.append(f"[7.4] {label}: raised {type(exc).__name__}: {exc}, expected ValueError {WHERE}")
            continue
        failures.append(f"[7.4] {label}: raised no ValueError — the docstring promises one (a budget < 1 computes "
                        f"nothing; an unchunked prompt over the budget could never run) {WHERE}")
    return failures


# ------------------------------------------------------------------------------------- a whole engine run

class _Mismatch(Exception):
    pass


def _graded(schedule_step):
    """The learner's scheduler, each step compared with the reference on the same state."""
    count = [0]

    def step(running, waiting, token_budget, chunked):
        count[0] += 1
        now = max([t for r in running for t in r.token_times] or [0.0])
        shown = f"{len(running)} running, {len(waiting)} waiting"
        got = schedule_step(running, waiting, token_budget, chunked)
        got = list(got) if not isinstance(got, (list, tuple)) and hasattr(got, "__iter__") else got
        problem = diagnose(got, running, waiting, token_budget, chunked)
        if problem:
            raise _Mismatch(f"step {count[0]} (after t={now:.3f} s, {shown}): {problem}")
        return got

    return step


LOOP_WORKLOAD = Workload(decoders=3, decoder_prompt=20, decoder_tokens=40, long_prompts=3, long_prompt=300,
                         long_tokens=4, long_rate=20.0, first_long=0.02, seed=7)


def _short_stream():
    """A long prompt behind which short prompts keep arriving: FCFS or starvation."""
    return [Request(0, 8, 30, 0.0), Request(1, 900, 3, 0.01)] + \
        [Request(2 + i, 12, 2, 0.012 + 0.004 * i) for i in range(12)]


def _reference_schedule(running, waiting, token_budget, chunked):
    tokens = reference_step(running, waiting, token_budget, chunked)
    return [(req, tokens[req.rid]) for req in running + waiting if req.rid in tokens]


def check_loop(impl):
    cp, failures = _impl(impl), []
    runs = [("a workload of decodes and long prompts, chunked", LOOP_WORKLOAD, 64, True),
            ("the same, unchunked", LOOP_WORKLOAD, 1024, False),
            ("a long prompt behind a stream of short ones, chunked", _short_stream, 48, True),
            ("the same, unchunked", _short_stream, 1024, False)]
    for label, workload, budget, chunked in runs:
        ref = run_workload(workload() if callable(workload) else workload, budget, chunked,
                           schedule_step=_reference_schedule)
        try:
            got = run_workload(workload() if callable(workload) else workload, budget, chunked,
                               schedule_step=_graded(cp.schedule_step))
        except NotImplementedError:
            raise
        except _Mismatch as exc:
            failures.append(f"[7.4] engine run, {label} (token_budget={budget}): {exc}")
            continue
        except Exception as exc:
            failures.append(f"[7.4] engine run, {label} (token_budget={budget}): {type(exc).__name__}: {exc} {WHERE}")
            continue
        want = {r.rid: r.token_times for r in ref.requests}
        have = {r.rid: r.token_times for r in got.requests}
        if have != want:
            rid = next(k for k in want if have.get(k) != want[k])
            failures.append(f"[7.4] engine run, {label}: request {rid} emitted its tokens at {have.get(rid)}, expected "
                            f"{want[rid]} (modelled seconds) {WHERE}")
    return failures


# ------------------------------------------------------------------------------------- the graded tests

def _job(rank, world_size, checks, impl_name=None):
    """Runs in a launched rank: the learner's code never runs in the grading process."""
    impl = None
    if impl_name is not None:
        from tests.graders import planted_ch07_chunked_prefill as planted
        impl = planted.build(impl_name)
    return [f for name in checks for f in CHECKS[name](impl)]


CHECKS = {"step": check_step, "errors": check_errors, "loop": check_loop}


def _assert_none(failures):
    assert not failures, "\n".join(failures[:6]) + (f"\n... and {len(failures) - 6} more" if len(failures) > 6 else "")


@pytest.mark.exercise("7.4", "One scheduler step: prompt chunks with decodes under a token budget")
def test_schedule_step():
    _assert_none(launch(_job, 1, ["step", "errors"], show_output=False)[0])


@pytest.mark.exercise("7.4", "One scheduler step: prompt chunks with decodes under a token budget")
def test_engine_runs_with_schedule_step():
    _assert_none(launch(_job, 1, ["loop"], show_output=False)[0])


# ------------------------------------------------------------- planted wrong answers (not an exercise)

def _planted_job(rank, world_size, names):
    from tests.graders import planted_ch07_chunked_prefill as planted
    out = {}
    for name in names:
        impl = planted.build(name)
        found = []
        for check in ("step", "errors", "loop"):
            try:
                found += CHECKS[check](impl)
            except Exception as exc:
                found.append(f"{type(exc).__name__}: {exc}")
        out[name] = found
    return out


def _variant_names(table="VARIANTS"):
    import ast
    import pathlib
    tree = ast.parse((pathlib.Path(__file__).parent / "planted_ch07_chunked_prefill.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == table:
            return [k.value for k in node.value.keys]
    return []


@pytest.fixture(scope="module")
def planted_results():
    pytest.importorskip("solutions.chunked_prefill", reason="the reference answers are absent (instructor grading)")
    return launch(_planted_job, 1, _variant_names() + _variant_names("ALTERNATIVES") + [None], show_output=False,
                  timeout=120)[0]


@pytest.mark.parametrize("name", _variant_names())
def test_planted_mistakes_are_caught(planted_results, name):
    from tests.graders import planted_ch07_chunked_prefill as planted
    variant = planted.VARIANTS[name]
    failures = planted_results[name]
    assert failures, f"planted mistake {name!r} ({variant.what}) passed every check"
    assert any(word in failures[0] for word in variant.points_at), (
        f"planted mistake {name!r} ({variant.what}) was caught, but the first message does not point at it "
        f"(expected one of {variant.points_at}): {failures[0]}")


@pytest.mark.parametrize("name", _variant_names("ALTERNATIVES"))
def test_valid_alternatives_pass(planted_results, name):
    """Answers written differently pass: the graders grade who gets how many tokens, not one way to write it."""
    from tests.graders import planted_ch07_chunked_prefill as planted
    failures = planted_results[name]
    assert not failures, f"valid alternative {name!r} ({planted.ALTERNATIVES[name]}) failed: {failures[0]}"


def test_reference_passes(planted_results):
    _assert_none(planted_results[None])


def _same_tokens_job(rank, world_size):
    """The reference scheduler driving the tiny Llama on the paged cache: chunking changes when tokens come,
    never which (each prompt's greedy ids equal helpers.course.tiny_llama.generate's for it alone)."""
    import os
    os.environ["COURSE_IMPL"] = "solutions"
    from helpers.course import tiny_llama
    from helpers.course.engine_loop import run_with_model
    from solutions.chunked_prefill import schedule_step
    ids = tiny_llama.encode(tiny_llama.CORPUS_PATH.read_text(encoding="utf-8"))
    prompts, arrivals = [ids[:20], ids[100:300], ids[500:530], ids[40:180]], [0.0, 0.01, 0.02, 0.05]
    model = tiny_llama.load_model()
    want = {i: tiny_llama.generate(model, p, 6) for i, p in enumerate(prompts)}
    problems = []
    for budget, chunked in ((7, True), (32, True), (512, False)):
        run = run_with_model(prompts, 6, arrivals, budget, chunked, schedule_step=schedule_step)
        split = sum(1 for s in run.steps for _ in s.chunks) > len(prompts)
        if run.tokens != want or split != chunked:
            problems.append(f"budget {budget}, chunked={chunked}: prompts split over steps: {split}; tokens "
                            f"{run.tokens} vs {want}")
    return problems


def test_chunked_prefill_keeps_greedy_tokens():
    pytest.importorskip("solutions.chunked_prefill", reason="the reference answers are absent")
    _assert_none(launch(_same_tokens_job, 1, show_output=False, timeout=120)[0])


def test_engine_loop_prices_steps_like_chapter_6_and_refuses_bad_steps():
    """A decode-only step costs what chapter 6's DeviceCost gives a [batch, 1] forward, a prefill-only one what
    it gives a [1, n] forward; the engine refuses a step over its budget or a chunk past a prompt."""
    from helpers.course.engine_loop import ScheduleError, apply_schedule, step_seconds
    from helpers.course.serving.device_time import DeviceCost
    cost = DeviceCost()
    for batch in (1, 8):
        assert step_seconds(batch, 0, cost) == cost.seconds(batch, 1)
    for tokens in (2, 300):
        assert step_seconds(0, tokens, cost) == cost.seconds(1, tokens)
    assert step_seconds(8, 248, cost) == (max(cost.decode_ms, cost.prefill_ms) + 8 * cost.decode_per_sequence_ms
                                          + 248 * cost.prefill_per_token_ms) / 1e3
    for schedule, budget in (([(0, 1), (2, 10)], 10), ([(2, 31)], 64), ([(0, 2)], 64)):
        running, waiting = [_decoding(0)], [_new(2, 30)]
        by_rid = {r.rid: r for r in running + waiting}
        with pytest.raises(ScheduleError):
            apply_schedule([(by_rid[rid], n) for rid, n in schedule], running, waiting, budget, 1.0)
