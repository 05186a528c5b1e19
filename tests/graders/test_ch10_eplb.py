"""Graders for chapter 10's EPLB placement (labs/eplb.py, exercise 10.5): vLLM's replicate-then-pack rule.

The checks run in a launched rank (learner code never runs in the grading process) and compare with the grader's own
greedy, written here from vLLM's rule (vllm/distributed/eplb/policy/default.py): on inputs without ties the answer
is unique, so it is compared exactly; on inputs with ties only what every tie order gives alike is compared (the
copies' counts under "first expert on ties", the packs' total weights). `test_planted_mistakes_are_caught` (no
exercise marker) runs the same checks on the wrong answers of tests/graders/planted_ch10_eplb.py, and
`test_valid_alternatives_pass` on correct answers written another way.

What the graders check:
  10.5 replicate_experts: slots 0..E-1 hold experts 0..E-1, each spare slot a copy of the expert of highest load
       PER COPY (first on ties); the counts; no spare slot = identity; ValueError when P < E; the largest load per
       copy is the least any hand-out of the spare slots achieves (brute force on small cases).
       balanced_packing: every pack exactly n/R items; heaviest first to the lightest pack with room (exact on
       tie-free weights); rank_in_pack numbers each pack's items 0, 1, ...; with ties, the packs' total weights;
       ValueError when R does not divide n.
       rebalance_experts: phy2log exact on tie-free loads (copies weighed load/count, packed, copy at (rank,
       place) in slot rank·(P/R)+place); every expert keeps a slot; ValueError when R does not divide P.

Mistakes caught (planted in tests/graders/planted_ch10_eplb.py): copies handed out by raw load (not load per copy),
the lightest item packed first, no room limit per pack, round-robin packing, copies packed with their expert's
whole load, the packing's result never used to place the slots, rank_in_pack counted over all items.
"""
from __future__ import annotations

import itertools
import random

import pytest

from helpers import launch, load_impl
from tests.graders.planted import planted_tests

EPLB = "labs/eplb.py"


def _impl(impl):
    return impl if impl is not None else load_impl("eplb")


def _call(failures, where, fn, *args):
    try:
        return True, fn(*args)
    except NotImplementedError:
        raise
    except Exception as exc:
        failures.append(f"{where} raised {type(exc).__name__}: {str(exc)[:160]} ({EPLB})")
        return False, None


def _ints(t):
    return [int(v) for v in (t.tolist() if hasattr(t, "tolist") else t)]


# ------------------------------------------------------------------------- the grader's own greedy (vLLM's rule)

def own_replicate(load, num_physical):
    counts, phy2log = [1] * len(load), list(range(len(load)))
    for _ in range(num_physical - len(load)):
        per_copy = [l / c for l, c in zip(load, counts)]
        hottest = per_copy.index(max(per_copy))
        phy2log.append(hottest)
        counts[hottest] += 1
    return phy2log, counts


def own_pack(weight, num_packs):
    per = len(weight) // num_packs
    order = sorted(range(len(weight)), key=lambda i: -weight[i])
    totals, items = [0.0] * num_packs, [0] * num_packs
    pack_index, rank_in_pack = [0] * len(weight), [0] * len(weight)
    for i in order:
        pack = min((p for p in range(num_packs) if items[p] < per), key=lambda p: (totals[p], p))
        pack_index[i], rank_in_pack[i] = pack, items[pack]
        totals[pack] += weight[i]
        items[pack] += 1
    return pack_index, rank_in_pack, totals


def own_rebalance(load, num_physical, num_ranks):
    phy2log, counts = own_replicate(load, num_physical)
    pack_index, rank_in_pack, _ = own_pack([load[e] / counts[e] for e in phy2log], num_ranks)
    placed = [0] * num_physical
    for copy, expert in enumerate(phy2log):
        placed[pack_index[copy] * (num_physical // num_ranks) + rank_in_pack[copy]] = expert
    return placed


def _tie_free(rng, n, scale=100.0):
    return [round(rng.uniform(1, scale), 6) + i * 1e-7 for i in range(n)]


# ------------------------------------------------------------------------------------------ replicate_experts

def check_replicate(impl):
    eplb, failures = _impl(impl), []
    for load, want, hint in [
            ([10.0, 40.0, 30.0, 5.0], ([0, 1, 2, 3, 1, 2], [1, 2, 2, 1]),
             "slot 4 copies expert 1 (40, the highest); then expert 1 has 40/2 = 20 per copy and expert 2 has 30: "
             "each spare slot goes to the expert of highest load PER COPY (load / copies so far), not of highest load"),
            ([10.0, 40.0, 20.0, 5.0], ([0, 1, 2, 3, 1, 1], [1, 3, 1, 1]),
             "after one copy expert 1 has 40/2 = 20 per copy, tied with expert 2: the first expert on ties takes the "
             "slot")]:
        where = f"[10.5] {EPLB}: replicate_experts({[int(x) for x in load]}, 6)"
        ok, got = _call(failures, where, eplb.replicate_experts, load, 6)
        if not ok:
            return failures
        if (_ints(got[0]), _ints(got[1])) != want:
            return [f"{where} returned phy2log {_ints(got[0])}, counts {_ints(got[1])}; expected {want[0]}, {want[1]}"
                    f" — {hint} ({EPLB})"]
    ok, got = _call(failures, f"[10.5] {EPLB}: replicate_experts with no spare slot", eplb.replicate_experts,
                    [3.0, 1.0, 2.0], 3)
    if ok and (_ints(got[0]), _ints(got[1])) != ([0, 1, 2], [1, 1, 1]):
        failures.append(f"[10.5] {EPLB}: replicate_experts([3, 1, 2], 3) returned {_ints(got[0])}, {_ints(got[1])}; "
                        f"with no spare slot every expert keeps its own: [0, 1, 2], [1, 1, 1] ({EPLB})")
    try:
        eplb.replicate_experts([1.0, 2.0, 3.0], 2)
        failures.append(f"[10.5] {EPLB}: replicate_experts with 2 slots for 3 experts raised no ValueError ({EPLB})")
    except NotImplementedError:
        raise
    except ValueError:
        pass
    except Exception as exc:
        failures.append(f"[10.5] {EPLB}: replicate_experts with 2 slots for 3 experts raised {type(exc).__name__}, "
                        f"expected a ValueError ({EPLB})")
    rng = random.Random(0)
    for case in range(30):
        e, extra = rng.randint(2, 6), rng.randint(0, 5)
        load = _tie_free(rng, e)
        shown = [round(x, 2) for x in load]
        ok, got = _call(failures, f"[10.5] {EPLB}: replicate_experts({shown}, {e + extra})", eplb.replicate_experts,
                        load, e + extra)
        if not ok:
            return failures
        want = own_replicate(load, e + extra)
        if (_ints(got[0]), _ints(got[1])) != (want[0], want[1]):
            return failures + [f"[10.5] {EPLB}: replicate_experts({shown}, {e + extra}) returned {_ints(got[0])}, "
                               f"counts {_ints(got[1])}; expected {want[0]}, {want[1]} (each spare slot to the expert "
                               f"of highest load PER COPY at that moment) ({EPLB})"]
        if extra <= 3:
            best = min(max(load[i] / (1 + c.count(i)) for i in range(e))
                       for c in itertools.combinations_with_replacement(range(e), extra))
            if abs(max(l / c for l, c in zip(load, want[1])) - best) > 1e-9:
                raise AssertionError("grader's own greedy is not optimal")     # the grader's own bug, not yours
    return failures


# ------------------------------------------------------------------------------------------- balanced_packing

def check_packing(impl):
    eplb, failures = _impl(impl), []
    rng = random.Random(1)
    for case in range(30):
        packs = rng.randint(1, 4)
        n = packs * rng.randint(1, 5)
        weight = _tie_free(rng, n)
        where = f"[10.5] {EPLB}: balanced_packing({[round(w, 1) for w in weight]}, {packs})"
        ok, got = _call(failures, where, eplb.balanced_packing, weight, packs)
        if not ok:
            return failures
        pack_index, rank_in_pack = _ints(got[0]), _ints(got[1])
        sizes = [pack_index.count(p) for p in range(packs)]
        if sizes != [n // packs] * packs:
            return failures + [f"{where}: packs got {sizes} items; every pack takes exactly n/num_packs = "
                               f"{n // packs} — once a pack is full it is never the lightest again ({EPLB})"]
        places = {p: sorted(r for i, r in zip(pack_index, rank_in_pack) if i == p) for p in range(packs)}
        if any(v != list(range(n // packs)) for v in places.values()):
            return failures + [f"{where}: rank_in_pack {rank_in_pack} must number each pack's items 0, 1, ..., "
                               f"{n // packs - 1} in the order they arrive in THAT pack ({EPLB})"]
        want_index, want_rank, want_totals = own_pack(weight, packs)
        if pack_index != want_index or rank_in_pack != want_rank:
            totals = [sum(w for w, i in zip(weight, pack_index) if i == p) for p in range(packs)]
            hint = ("take the items HEAVIEST first, each to the lightest pack that has room (the first on ties)"
                    if max(totals) > max(want_totals) + 1e-9 else
                    "heaviest first, each to the pack of least total weight with room; rank_in_pack in arrival order")
            return failures + [f"{where}: returned pack_index {pack_index}, rank_in_pack {rank_in_pack}; expected "
                               f"{want_index}, {want_rank} (heaviest pack {max(totals):.2f}, the rule gives "
                               f"{max(want_totals):.2f}) — {hint} ({EPLB})"]
    # ties: any order among equal weights; the packs' total weights are the same whichever order
    for weight, packs in [([5.0, 5.0, 5.0, 5.0, 3.0, 3.0], 3), ([2.0] * 8, 4), ([4.0, 4.0, 1.0, 1.0], 2)]:
        ok, got = _call(failures, f"[10.5] {EPLB}: balanced_packing({weight}, {packs})", eplb.balanced_packing, weight,
                        packs)
        if not ok:
            return failures
        totals = sorted(sum(w for w, i in zip(weight, _ints(got[0])) if i == p) for p in range(packs))
        if totals != sorted(own_pack(weight, packs)[2]):
            failures.append(f"[10.5] {EPLB}: balanced_packing({weight}, {packs}) gave packs of total weight {totals}, "
                            f"expected {sorted(own_pack(weight, packs)[2])} ({EPLB})")
    try:
        eplb.balanced_packing([1.0, 2.0, 3.0], 2)
        failures.append(f"[10.5] {EPLB}: balanced_packing of 3 items into 2 packs raised no ValueError ({EPLB})")
    except NotImplementedError:
        raise
    except ValueError:
        pass
    except Exception as exc:
        failures.append(f"[10.5] {EPLB}: balanced_packing of 3 items into 2 packs raised {type(exc).__name__}, "
                        f"expected a ValueError ({EPLB})")
    return failures


# ------------------------------------------------------------------------------------------ rebalance_experts

def check_rebalance(impl):
    eplb, failures = _impl(impl), []
    rng = random.Random(2)
    for case in range(30):
        ranks = rng.choice([1, 2, 4])
        e = ranks * rng.randint(1, 4)
        physical = e + ranks * rng.randint(0, 2)
        load = _tie_free(rng, e, scale=rng.choice([10.0, 1000.0]))
        where = f"[10.5] {EPLB}: rebalance_experts({[round(x, 1) for x in load]}, {physical}, {ranks})"
        ok, got = _call(failures, where, eplb.rebalance_experts, load, physical, ranks)
        if not ok:
            return failures
        got, want = _ints(got), own_rebalance(load, physical, ranks)
        if got == want:
            continue
        if sorted(got) != sorted(want):
            return failures + [f"{where}: the slots hold experts {sorted(got)}, expected {sorted(want)} (one slot per "
                               f"expert plus replicate_experts' copies) ({EPLB})"]
        per = physical // ranks
        unplaced, counts = own_replicate(load, physical)
        by_whole = own_pack([load[x] for x in unplaced], ranks)
        whole = [0] * physical
        for copy, expert in enumerate(unplaced):
            whole[by_whole[0][copy] * per + by_whole[1][copy]] = expert
        if got == unplaced:
            hint = ("the slots are still in replicate_experts' order: put the copy that balanced_packing sent to "
                    "(rank, place) in slot rank·(P/R) + place")
        elif got == whole:
            hint = ("a copy carries its expert's load divided among its copies: weigh copy s by "
                    "load[e] / counts[e], not load[e]")
        else:
            hint = "pack the copies (weight load/count each) and put the one at (rank, place) in slot rank·(P/R)+place"
        rank_of = lambda slots: [sum(load[x] / counts[x] for x in slots[r * per:(r + 1) * per])  # noqa: E731
                                 for r in range(ranks)]
        return failures + [f"{where} returned {got}, expected {want} (busiest rank {max(rank_of(got)):.2f} vs "
                           f"{max(rank_of(want)):.2f}) — {hint} ({EPLB})"]
    try:
        eplb.rebalance_experts([1.0, 2.0, 3.0, 4.0], 6, 4)
        failures.append(f"[10.5] {EPLB}: rebalance_experts with 6 slots on 4 ranks raised no ValueError ({EPLB})")
    except NotImplementedError:
        raise
    except ValueError:
        pass
    except Exception as exc:
        failures.append(f"[10.5] {EPLB}: rebalance_experts with 6 slots on 4 ranks raised {type(exc).__name__}, "
                        f"expected a ValueError ({EPLB})")
    return failures


CHECKS = {"replicate": check_replicate, "packing": check_packing, "rebalance": check_rebalance}


def _run(rank, world_size, names, impl=None):
    return [f for name in names for f in CHECKS[name](impl)]


def _graded(*names):
    failures = launch(_run, 1, list(names), show_output=False)[0]
    assert not failures, "\n".join(failures[:6])


@pytest.mark.exercise("10.5", "EPLB placement: replicate hot experts, pack the copies onto ranks")
def test_replicate_experts():
    _graded("replicate")


@pytest.mark.exercise("10.5", "EPLB placement: replicate hot experts, pack the copies onto ranks")
def test_balanced_packing():
    _graded("packing")


@pytest.mark.exercise("10.5", "EPLB placement: replicate hot experts, pack the copies onto ranks")
def test_rebalance_experts():
    _graded("rebalance")


# ------------------------------------------------------------- planted wrong answers (not an exercise)

planted_results, test_planted_mistakes_are_caught, test_valid_alternatives_pass, test_reference_passes_every_check = \
    planted_tests("planted_ch10_eplb", CHECKS, "solutions.eplb")
