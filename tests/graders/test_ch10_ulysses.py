"""Graders for chapter 10's Ulysses sequence parallelism (labs/ulysses.py, exercise 10.4).

Each check `check_*(impl, rank, world_size, group, label) -> [failure, ...]` runs inside every rank of a real gloo
job: world sizes 1, 2 and 4, and at 4 also inside the sub-groups {0,1} and {2,3}. Every rank builds the whole
sequence from fixed seeds and takes its own rows, so each rank knows what it must receive. The graders run them on
the implementation under test (COURSE_IMPL); `test_planted_mistakes_are_caught` (no exercise marker) runs the same
checks on the wrong answers of tests/graders/planted_ch10_ulysses.py and asserts each is caught with a message
that points at it (tests/graders/planted.py), and `test_valid_alternatives_pass` on correct answers written
another way.

What the graders check:
  layout     sequence_to_heads: [S/P, H, D] (my rows) -> exactly x[:, my heads] of the whole sequence, rows in
             sequence order; heads_to_sequence: the inverse, exactly. THE COLLECTIVES (CommTracer): only
             all-to-all (dist.all_to_all_single or dist.all_to_all), in the group, one payload of x's bytes each.
  attention  ulysses_attention against attention on the whole sequence (float32 rounding, causal and not, GQA
             with 4P query heads on 2P and on P KV heads, and MHA on 2P heads); the output's layout [S/P, H, D]
             (a head-sharded [S, H/P, D] means the way back is missing); only all-to-alls in the group, moving exactly
             (S/P)·(H + 2·H_kv)·D values out and (S/P)·H·D back (K/V repeated to H heads before the exchange send
             more); THE LAYOUT BETWEEN THE TWO ALL-TO-ALLS: the values this rank received before attention are
             exactly its query heads' rows of the whole sequence and the KV heads those query heads read
             (h // (H/H_kv)), in any order or packing.
  errors     a Ulysses degree above the KV heads raises a ValueError that names the KV heads, before any
             communication; sequence_to_heads with heads not divisible by P raises ValueError.

Mistakes caught (planted in tests/graders/planted_ch10_ulysses.py): the head dimension split along head_dim, the
received blocks concatenated in the wrong order (rows interleaved), GQA's KV heads split by stride (not with their
queries), K/V repeated to H heads before the exchange, the way back forgotten, the way back done by all-gather,
attention on the local rows only, the head-count limit not enforced.
"""
from __future__ import annotations

import re

import pytest
import torch
import torch.distributed as dist

from helpers import launch, load_impl
from helpers.claims import max_abs_diff, tolerance
from helpers.comm_trace import CommTracer
from helpers.course.ring_attention import attention_reference
from tests.graders.planted import assert_no_failures, grouped_job, planted_tests

ULY = "labs/ulysses.py"
A2A = {"all_to_all", "all_to_all_single"}
FACTOR = 64          # softmax over ≤ 12 keys, head_dim 4: a few float32 ulps; 64 leaves room (helpers.claims)
ROWS, HEAD_DIM = 3, 4


def _uly(impl):
    return impl if impl is not None else load_impl("ulysses")


def _seeded(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _group_info(group):
    ranks = tuple(dist.get_process_group_ranks(group)) if group is not None else tuple(range(dist.get_world_size()))
    return ranks, dist.get_rank(group), len(ranks)


class _Received:
    """Records what this rank's all-to-alls received (the output buffers after each call), in call order."""

    def __init__(self):
        self.calls, self._saved = [], {}

    def __enter__(self):
        for name in ("all_to_all_single", "all_to_all"):
            self._saved[name] = getattr(dist, name)
        single, lists = self._saved["all_to_all_single"], self._saved["all_to_all"]

        def all_to_all_single(output, input, *args, **kwargs):
            work = single(output, input, *args, **kwargs)
            self.calls.append(("single", output))
            return work

        def all_to_all(output_tensor_list, input_tensor_list, *args, **kwargs):
            work = lists(output_tensor_list, input_tensor_list, *args, **kwargs)
            self.calls.append(("lists", list(output_tensor_list)))
            return work
        dist.all_to_all_single, dist.all_to_all = all_to_all_single, all_to_all
        return self

    def __exit__(self, *exc):
        for name, fn in self._saved.items():
            setattr(dist, name, fn)
        return False

    def values(self, calls):
        return torch.cat([t.detach().reshape(-1).float() for kind, out in calls
                          for t in (out if kind == "lists" else [out])]) if calls else torch.zeros(0)


def _call(failures, where, fn, *args, **kwargs):
    try:
        return True, fn(*args, **kwargs)
    except NotImplementedError:
        raise
    except Exception as exc:
        failures.append(f"{where} raised {type(exc).__name__}: {str(exc)[:200]} ({ULY})")
        return False, None


def _collectives(where, records, ranks, want_payload, hint):
    """Only all-to-alls, all in the group, their payloads adding up to want_payload bytes."""
    wrong = [r.op for r in records if r.op not in A2A]
    if wrong:
        return [f"{where}: ran {wrong} — Ulysses re-shards with all-to-alls only (dist.all_to_all_single or "
                f"dist.all_to_all): each rank keeps 1/P of the data and sends the rest, an all-gather moves P times "
                f"more ({ULY})"]
    elsewhere = [(r.op, list(r.ranks)) for r in records if tuple(r.ranks) != tuple(ranks)]
    if elsewhere:
        return [f"{where}: ran {elsewhere} outside the group {list(ranks)} — pass group= to every all-to-all ({ULY})"]
    got = sum(r.payload for r in records)
    if got != want_payload:
        return [f"{where}: the all-to-alls moved a payload of {got} B, expected {want_payload} B — {hint} ({ULY})"]
    return []


# ------------------------------------------------------------------------------------------------- layout

def check_layout(impl, rank, world_size, group=None, label="WORLD"):
    uly, failures = _uly(impl), []
    ranks, r, n = _group_info(group)
    heads, seq = 2 * n, n * ROWS
    where = f"[10.4 {label}, rank {rank}] sequence_to_heads"
    x = _seeded(11, seq, heads, HEAD_DIM)
    mine_rows, mine_heads = slice(r * ROWS, (r + 1) * ROWS), slice(r * heads // n, (r + 1) * heads // n)
    with CommTracer() as trace:
        ok, got = _call(failures, where, uly.sequence_to_heads, x[mine_rows].contiguous(), group)
    if not ok:
        return failures
    want = x[:, mine_heads]
    if tuple(got.shape) != tuple(want.shape):
        return [f"{where}: returned shape {tuple(got.shape)} from [S/P, H, D] = {(ROWS, heads, HEAD_DIM)}, expected "
                f"{tuple(want.shape)} = [S, H/P, D] — split the HEADS (dim 1) into P blocks, one per rank, and "
                f"gather the sequence (dim 0); head_dim is never split ({ULY})"]
    if not torch.equal(got, want):
        interleaved = x.reshape(n, ROWS, heads, HEAD_DIM).transpose(0, 1).reshape(seq, heads, HEAD_DIM)
        if torch.equal(got, interleaved[:, mine_heads]):
            failures.append(f"{where}: the rows of the whole sequence come interleaved (row i of rank j at i·P+j) — "
                            f"the block received from rank j holds rows j·S/P .. (j+1)·S/P-1: concatenate the "
                            f"received blocks along the sequence in rank order ({ULY})")
        elif torch.equal(got.sort(dim=0).values, want.sort(dim=0).values) or \
                torch.equal(got.flatten().sort().values, want.flatten().sort().values):
            failures.append(f"{where}: the right values in the wrong places — rows must be in sequence order (rank "
                            f"0's rows first) and heads {mine_heads.start}..{mine_heads.stop - 1} in order ({ULY})")
        else:
            failures.append(f"{where}: expected heads {mine_heads.start}..{mine_heads.stop - 1} of the whole sequence "
                            f"(rank r gets heads r·H/P .. (r+1)·H/P-1), max |diff| {max_abs_diff(got, want):.3g} — "
                            f"send head block j of your rows to rank j ({ULY})")
    if n > 1:
        failures += _collectives(where, trace.records, ranks, x[mine_rows].numel() * 4,
                                 "one all-to-all of this rank's rows")

    where = f"[10.4 {label}, rank {rank}] heads_to_sequence"
    y = _seeded(12, seq, heads, HEAD_DIM)
    with CommTracer() as trace:
        ok, got = _call(failures, where, uly.heads_to_sequence, y[:, mine_heads].contiguous(), group)
    if not ok:
        return failures
    want = y[mine_rows]
    if tuple(got.shape) != tuple(want.shape) or not torch.equal(got, want):
        failures.append(f"{where}: from every row of heads {mine_heads.start}..{mine_heads.stop - 1} expected this "
                        f"rank's rows {mine_rows.start}..{mine_rows.stop - 1} of all {heads} heads "
                        f"{tuple(want.shape)}, got shape {tuple(got.shape)} — the way back is the inverse "
                        f"all-to-all: send rows block j to rank j, put the block from rank j at heads j·H/P.. ({ULY})")
    if n > 1:
        failures += _collectives(where, trace.records, ranks, y[:, mine_heads].numel() * 4,
                                 "one all-to-all of this rank's heads")
    return failures


# ---------------------------------------------------------------------------------------------- attention

def _reference(q, k, v, causal):
    group = q.shape[1] // k.shape[1]
    rep = lambda t: t.repeat_interleave(group, dim=1).transpose(0, 1)           # noqa: E731
    return attention_reference(q.transpose(0, 1), rep(k), rep(v), causal).transpose(0, 1)


def check_attention(impl, rank, world_size, group=None, label="WORLD"):
    uly, failures = _uly(impl), []
    ranks, r, n = _group_info(group)
    seq = n * ROWS
    mine = slice(r * ROWS, (r + 1) * ROWS)
    cases = [(4 * n, 2 * n, True), (4 * n, 2 * n, False), (4 * n, n, True), (2 * n, 2 * n, True)]
    for heads, kv_heads, causal in cases:
        where = f"[10.4 {label}, rank {rank}] ulysses_attention H={heads} H_kv={kv_heads} causal={causal}"
        q, k, v = (_seeded(20 + i, seq, h, HEAD_DIM) for i, h in enumerate((heads, kv_heads, kv_heads)))
        with CommTracer() as trace, _Received() as received:
            ok, out = _call(failures, where, uly.ulysses_attention, q[mine].contiguous(), k[mine].contiguous(),
                            v[mine].contiguous(), group=group, causal=causal)
        if not ok:
            return failures
        want = _reference(q, k, v, causal)[mine]
        if tuple(out.shape) != tuple(want.shape):
            back = (seq, heads // n, HEAD_DIM)
            hint = ("that is the head-sharded layout between the two all-to-alls: the way back is missing — "
                    "heads_to_sequence of the attention output" if tuple(out.shape) == back and n > 1
                    else "this rank's rows, all heads")
            return failures + [f"{where}: returned shape {tuple(out.shape)}, expected {tuple(want.shape)} = "
                               f"[S/P, H, D] — {hint} ({ULY})"]
        if n > 1:
            to_heads = ROWS * (heads + 2 * kv_heads) * HEAD_DIM * 4
            back = ROWS * heads * HEAD_DIM * 4
            repeated = ROWS * 3 * heads * HEAD_DIM * 4 + back
            hint = (f"q, k, v out ({to_heads} B: K and V with their {kv_heads} KV heads) and the output back "
                    f"({back} B)")
            if sum(x.payload for x in trace.records) == repeated and kv_heads != heads:
                hint = (f"K and V were repeated to {heads} heads before the exchange: send the {kv_heads} KV heads "
                        f"as they are ({heads // kv_heads}× fewer K/V bytes) and let each rank's attention share them "
                        f"among its query heads")
            messages = _collectives(where, trace.records, ranks, to_heads + back, hint)
            if messages:
                return failures + messages
            failures += _received_layout(where, received.calls, q, k, v, r, n)
        diff, tol = max_abs_diff(out, want), tolerance(want, torch.float32, FACTOR)
        if not diff <= tol:
            failures.append(f"{where}: output differs from attention on the whole sequence by {diff:.3e} (> {tol:.1e})"
                            f" — attend over the full sequence (after the first all-to-all), causal mask by "
                            f"position, query head h reading KV head h // (H/H_kv) ({ULY})")
    return failures


def _received_layout(where, calls, q, k, v, r, n):
    """The values received before attention: this rank's query heads and their KV heads, whole sequence."""
    if len(calls) < 2:
        return []                                   # (all-to-alls not seen by name: the payload check stands)
    heads, kv_heads = q.shape[1], k.shape[1]
    qh = slice(r * heads // n, (r + 1) * heads // n)
    kvh = slice(r * kv_heads // n, (r + 1) * kv_heads // n)
    want = torch.cat([q[:, qh].reshape(-1), k[:, kvh].reshape(-1), v[:, kvh].reshape(-1)]).sort().values
    got = _Received.values(None, calls[:-1])
    if got.numel() != want.numel():
        return []                                   # a different split of the calls: the payload check stands
    if torch.equal(got.sort().values, want):
        return []
    queries = q[:, qh].reshape(-1).sort().values
    got_q = _Received.values(None, calls[:1]).sort().values
    if got_q.numel() == queries.numel() and not torch.equal(got_q, queries):
        return [f"{where}: between the two all-to-alls this rank did not hold query heads {qh.start}..{qh.stop - 1} "
                f"of the whole sequence — rank r attends for heads r·H/P .. (r+1)·H/P-1 ({ULY})"]
    return [f"{where}: between the two all-to-alls this rank did not hold KV heads {kvh.start}..{kvh.stop - 1}, the "
            f"ones its query heads {qh.start}..{qh.stop - 1} read (GQA: query head h reads KV head h // (H/H_kv)) — "
            f"split the KV heads into P contiguous blocks as the query heads, so each group stays with its KV head "
            f"({ULY})"]


# ------------------------------------------------------------------------------------------------- errors

def check_errors(impl, rank, world_size, group=None, label="WORLD"):
    uly, failures = _uly(impl), []
    _, _, n = _group_info(group)
    if n == 1:
        return failures
    kv_heads = n // 2                               # P > H_kv
    q, k = torch.zeros(ROWS, 2 * n, HEAD_DIM), torch.zeros(ROWS, kv_heads, HEAD_DIM)
    where = f"[10.4 {label}, rank {rank}] ulysses_attention with P={n} > kv_heads={kv_heads}"
    with CommTracer() as trace:
        try:
            uly.ulysses_attention(q, k, k.clone(), group=group)
            failures.append(f"{where} raised no ValueError — the Ulysses degree cannot exceed the number of KV heads "
                            f"(a rank would hold less than one KV head); the docstring promises a ValueError that "
                            f"names the KV heads ({ULY})")
        except NotImplementedError:
            raise
        except ValueError as exc:
            if not re.search(r"kv.?heads|KV heads", str(exc), re.IGNORECASE):
                failures.append(f"{where}: the ValueError ({exc}) does not name the KV heads: say that P must be at "
                                f"most kv_heads={kv_heads} ({ULY})")
        except Exception as exc:
            failures.append(f"{where} raised {type(exc).__name__}: {exc} — the docstring promises a ValueError "
                            f"naming the KV heads, before any communication ({ULY})")
    if trace.records and not failures:
        failures.append(f"{where}: ran {[x.op for x in trace.records]} before raising — check the head counts before "
                        f"any communication ({ULY})")
    where = f"[10.4 {label}, rank {rank}] sequence_to_heads with {2 * n + 1} heads over P={n}"
    try:
        uly.sequence_to_heads(torch.zeros(ROWS, 2 * n + 1, HEAD_DIM), group)
        failures.append(f"{where} raised no ValueError — the docstring promises one ({ULY})")
    except NotImplementedError:
        raise
    except ValueError:
        pass
    except Exception as exc:
        failures.append(f"{where} raised {type(exc).__name__}: {exc} — the docstring promises a ValueError ({ULY})")
    return failures


# ---------------------------------------------------------------------------------------------------- jobs

CHECKS = {"layout": check_layout, "attention": check_attention, "errors": check_errors}


def _job(rank, world_size, checks, impl=None):
    """Run the named checks in the world group and, at 4 ranks, in the sub-groups {0,1} and {2,3}."""
    return grouped_job(rank, world_size, CHECKS, checks, impl)


_check_all = assert_no_failures


@pytest.mark.exercise("10.4", "Ulysses: two all-to-alls around attention, equal to attention on the whole sequence")
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_ulysses_layout(world_size):
    _check_all(launch(_job, world_size, ["layout"], show_output=False))


@pytest.mark.exercise("10.4", "Ulysses: two all-to-alls around attention, equal to attention on the whole sequence")
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_ulysses_attention(world_size):
    _check_all(launch(_job, world_size, ["attention", "errors"], show_output=False))


# ------------------------------------------------------------- planted wrong answers (not an exercise)

planted_results, test_planted_mistakes_are_caught, test_valid_alternatives_pass, _ = \
    planted_tests("planted_ch10_ulysses", CHECKS, "solutions.ulysses", world_size=4, ranked=True, reference=False)


def test_reference_passes_every_check():
    """Its own: the reference through every check in the world group AND in the sub-groups {0,1}, {2,3} (_job)."""
    pytest.importorskip("solutions.ulysses", reason="the reference answers are absent")
    from tests.graders import planted_ch10_ulysses as planted
    _check_all(launch(_job, 4, list(CHECKS), planted.build(None), show_output=False, timeout=120))
