"""Graders for chapter 9's router (labs/kv_router.py): the KV index (9.1) and Dynamo's cost (9.2).

Each exercise has check functions that return a list of failures; the graders run them on the implementation under
test (COURSE_IMPL) inside a launched rank (learner code never runs in the grading process), and
tests/graders/planted_ch09_routing.py runs the same functions on wrong answers planted in the reference
(`test_planted_mistakes_are_caught`, no exercise marker) and on valid answers written differently. The checks read
the index only through its methods (apply_event, add_replica, longest_prefix, drop_replica, blocks_of), never its
attributes: any data structure passes. They need no other exercise: the events are the grader's own, built with
the engine's event classes (helpers/course/engine/kv_events.py) and the grader's own SHA-256 chain.

What the graders check:
  9.1 KVIndex: THE INDEX AFTER EACH EVENT — blocks_of(replica) after BlockStored (a run of chained hashes), a second
      replica storing the same hashes, BlockRemoved (only that replica loses them), AllBlocksCleared (the replica
      holds nothing and is still known); longest_prefix counts LEADING blocks per replica and stops at its first
      miss (a replica holding blocks 1.. but not 0 matches 0), answers every known replica (0 included) and
      changes nothing; STALE EVENTS — a BlockRemoved of hashes the replica does not hold (after a clear, twice, of
      another replica's block) is ignored without an error; a BlockStored arriving after the clear is applied;
      events of another tier (medium "CPU") do not count; an unknown event raises TypeError and leaves the index
      as it was; add_replica and drop_replica (a dropped replica is gone from every answer, its blocks too, other
      replicas' blocks untouched). Then a seeded random stream of events over three replicas, checked after every
      event against the grader's own sets, with random longest_prefix queries.
  9.2 choose_replica_kv: THE SCORE'S TWO TERMS — with equal loads the replica holding the longest prefix; with
      equal overlaps the least loaded; a trade-off decided by the weight (the same inputs choose differently at
      weight 1 and weight 4: prefill blocks saved × weight against blocks of load); weight 0 is load only;
      a replica in overlaps but not in loads (down) is never chosen; missing overlaps count 0; ties go to the
      smaller load, then the first in loads' order; ValueError on no candidates and on a negative weight. Then
      seeded random inputs against the grader's own cost.

Mistakes each grader catches (planted in tests/graders/planted_ch09_routing.py and asserted caught):
  9.1 removed_everywhere      BlockRemoved removes the hashes from every replica
      clear_ignored           AllBlocksCleared changes nothing
      clear_forgets_replica   AllBlocksCleared makes the replica unknown (it vanishes from longest_prefix)
      count_anywhere          longest_prefix counts every held hash, not the leading run
      stale_remove_raises     a BlockRemoved of a hash the replica does not hold raises KeyError
      medium_ignored          CPU-tier events counted as device blocks
      unknown_event_ignored   an unknown event is silently ignored
      drop_keeps_blocks       drop_replica leaves the replica's blocks in the index
  9.2 load_only               overlaps ignored
      affinity_only           loads ignored (pure cache affinity)
      weight_on_load          the weight multiplies the load, not the prefill blocks
      highest_cost            the replica of HIGHEST cost
      sign_flipped            cached blocks added to the cost instead of saved
      down_replica_chosen     candidates taken from overlaps: a replica that is down is chosen
      ties_to_last            ties go to the last replica
"""
from __future__ import annotations

import hashlib
import pickle
import random

import pytest

from helpers import launch, load_impl
from helpers.course.engine.kv_events import AllBlocksCleared, BlockRemoved, BlockStored
from tests.graders.planted import planted_tests

INDEX = "labs/kv_router.py: KVIndex"
CHOOSE = "labs/kv_router.py: choose_replica_kv"


def _impl(impl):
    return impl if impl is not None else load_impl("kv_router")


def chain(tokens_seed: int, n: int, parent: bytes | None = None) -> list:
    """n chained 32-byte block hashes (the grader's own SHA-256 chain over made-up block tokens)."""
    out, rng = [], random.Random(tokens_seed)
    for _ in range(n):
        block = tuple(rng.randrange(256) for _ in range(4))
        parent = hashlib.sha256(pickle.dumps((parent or bytes(32), block, None))).digest()
        out.append(parent)
    return out


def stored(hashes, parent=None, medium="GPU"):
    return BlockStored(tuple(hashes), parent, tuple(range(4 * len(hashes))), 4, medium)


def removed(hashes, medium="GPU"):
    return BlockRemoved(tuple(hashes), medium)


def _call(failures, where, fn, *args, expect=None):
    """Run learner code: (ok, value); an unexpected exception becomes a failure saying where."""
    try:
        return True, fn(*args)
    except NotImplementedError:
        raise
    except Exception as exc:
        if expect is not None and isinstance(exc, expect):
            return False, exc
        detail = NAMES.get(exc.args[0], "a block hash") if isinstance(exc, KeyError) and exc.args and \
            isinstance(exc.args[0], bytes) else str(exc)[:160]
        failures.append(f"{where} raised {type(exc).__name__}: {detail}")
        return False, exc


def _short(hashes) -> str:
    names = sorted(NAMES.get(h, h.hex()[:6] if isinstance(h, bytes) else repr(h)) for h in hashes)
    return "{" + ", ".join(names) + "}"


NAMES: dict = {}


def _name(prefix, hashes):
    for i, h in enumerate(hashes):
        NAMES[h] = f"{prefix}{i}"
    return hashes


# ---------------------------------------------------------------------------------------------------- 9.1

def _expect_blocks(failures, index, want: dict, after: str) -> bool:
    for replica, blocks in want.items():
        ok, got = _call(failures, f"{INDEX}.blocks_of({replica!r}) after {after}", index.blocks_of, replica)
        if not ok:
            return False
        if set(got) != set(blocks):
            failures.append(f"[9.1] after {after}, the index says replica {replica!r} holds {_short(got)}, expected "
                            f"{_short(blocks)} ({INDEX}.apply_event)")
            return False
    return True


def _expect_prefix(failures, index, query, want: dict, after: str, rule: str) -> bool:
    ok, got = _call(failures, f"{INDEX}.longest_prefix(...) after {after}", index.longest_prefix, query)
    if not ok:
        return False
    if not isinstance(got, dict) or dict(got) != want:
        failures.append(f"[9.1] after {after}, longest_prefix({_short(query) if len(query) < 6 else 'the request'}) "
                        f"= {got!r}, expected {want!r}: {rule} ({INDEX}.longest_prefix)")
        return False
    return True


def check_index_events(impl=None):
    """The index after each event of a scripted sequence, stale events, a clear, another tier, unknown events."""
    failures, kv = [], _impl(impl)
    a = _name("a", chain(1, 4))          # tenant A's prompt: 4 blocks
    b = _name("b", chain(2, 3))          # tenant B's prompt: 3 blocks
    ok, index = _call(failures, f"{INDEX}()", kv.KVIndex)
    if not ok:
        return failures
    steps = [
        ("r0 stores a0..a3", "r0", stored(a), {"r0": a}),
        ("r1 stores a0..a2", "r1", stored(a[:3]), {"r0": a, "r1": a[:3]}),
        ("r1 stores b0..b2", "r1", stored(b), {"r0": a, "r1": a[:3] + b}),
        ("r0 removes a2..a3 (evicted)", "r0", removed(a[2:]), {"r0": a[:2], "r1": a[:3] + b}),
    ]
    for after, replica, event, want in steps:
        ok, _ = _call(failures, f"{INDEX}.apply_event({replica!r}, {type(event).__name__}) ({after})",
                      index.apply_event, replica, event)
        if not ok:
            return failures
        if not _expect_blocks(failures, index, want, after):
            if after.startswith("r0 removes"):
                failures[-1] += (" — a BlockRemoved from r0 removes the blocks from r0 only: r1 still holds its copy "
                                 "of a2")
            return failures
    if not _expect_prefix(failures, index, a, {"r0": 2, "r1": 3}, "r0 evicted a2, a3",
                          "each replica's count of LEADING blocks it holds"):
        return failures
    if not _expect_prefix(failures, index, b, {"r0": 0, "r1": 3}, "r1 stored b",
                          "a replica that holds none of the blocks is still in the answer, with 0"):
        return failures
    # a replica holding blocks 1.. but not block 0 has no prefix hit
    _call(failures, f"{INDEX}.apply_event('r2', BlockStored a1..a3)", index.apply_event, "r2", stored(a[1:], a[0]))
    if failures or not _expect_prefix(failures, index, a, {"r0": 2, "r1": 3, "r2": 0}, "r2 stored a1..a3 (not a0)",
                                      "a prefix hit starts at the FIRST block and stops at the first miss: r2 lacks "
                                      "a0, so it matches 0 however many later blocks it holds"):
        return failures
    before = {r: set(index.blocks_of(r)) for r in ("r0", "r1", "r2")}
    _call(failures, f"{INDEX}.longest_prefix", index.longest_prefix, a + b)
    if {r: set(index.blocks_of(r)) for r in before} != before:
        failures.append(f"[9.1] longest_prefix changed what the index holds: it only reads ({INDEX}.longest_prefix)")
        return failures
    # a restart: r0's cache is gone
    _call(failures, f"{INDEX}.apply_event('r0', AllBlocksCleared)", index.apply_event, "r0", AllBlocksCleared())
    if failures or not _expect_blocks(failures, index, {"r0": [], "r1": a[:3] + b, "r2": a[1:]},
                                      "r0 sent AllBlocksCleared (it restarted)"):
        if failures and "expected" in failures[-1]:
            failures[-1] += " — AllBlocksCleared empties that replica's entries, and only that replica's"
        return failures
    if not _expect_prefix(failures, index, a, {"r0": 0, "r1": 3, "r2": 0}, "r0 sent AllBlocksCleared",
                          "a cleared replica is still known (it is up, with an empty cache): it answers 0"):
        return failures
    # stale events: removals of blocks r0 no longer holds, removal of another replica's block, a repeated removal
    for after, event in (("a late BlockRemoved(a0) from r0 after its clear", removed(a[:1])),
                         ("a BlockRemoved(b0) from r0, a block only r1 holds", removed(b[:1])),
                         ("the same BlockRemoved(b0) from r0 again", removed(b[:1]))):
        ok, _ = _call(failures, f"{INDEX}.apply_event('r0', BlockRemoved) ({after})", index.apply_event, "r0", event)
        if not ok:
            failures[-1] += (" — events are late and repeated in real life: a removal of a block the replica does "
                             "not hold is ignored")
            return failures
        if not _expect_blocks(failures, index, {"r0": [], "r1": a[:3] + b, "r2": a[1:]}, after):
            failures[-1] += (" — a removal of a block the replica does not hold is ignored; other replicas keep "
                             "their copies")
            return failures
    late = stored(a[:1])
    _call(failures, f"{INDEX}.apply_event('r0', BlockStored a0)", index.apply_event, "r0", late)
    if failures or not _expect_blocks(failures, index, {"r0": a[:1]}, "r0 stored a0 after its clear"):
        return failures
    # another tier: vLLM's offloading connector publishes medium "CPU"
    _call(failures, f"{INDEX}.apply_event('r0', BlockStored medium CPU)", index.apply_event, "r0",
          stored(a[1:], a[0], medium="CPU"))
    _call(failures, f"{INDEX}.apply_event('r1', BlockRemoved medium CPU)", index.apply_event, "r1",
          removed(b, medium="CPU"))
    if failures or not _expect_blocks(failures, index, {"r0": a[:1], "r1": a[:3] + b},
                                      "CPU-tier events (medium 'CPU')"):
        if failures and "expected" in failures[-1]:
            failures[-1] += " — only the device tier (medium 'GPU' or None) counts; other tiers' events are ignored"
        return failures
    # an unknown event: TypeError, nothing changed
    snapshot = {r: set(index.blocks_of(r)) for r in ("r0", "r1", "r2")}
    ok, exc = _call(failures, f"{INDEX}.apply_event('r1', 'BlockStored')", index.apply_event, "r1", "BlockStored",
                    expect=TypeError)
    if failures:
        return failures
    if ok:
        failures.append(f"[9.1] apply_event('r1', 'BlockStored') (a string, not an event) returned: an unknown "
                        f"event must raise TypeError, so the router can log it and count it ({INDEX}.apply_event)")
        return failures
    if {r: set(index.blocks_of(r)) for r in snapshot} != snapshot:
        failures.append(f"[9.1] an unknown event raised TypeError but changed the index: leave it unchanged "
                        f"({INDEX}.apply_event)")
        return failures
    # add and drop
    _call(failures, f"{INDEX}.add_replica('r3')", index.add_replica, "r3")
    if failures or not _expect_prefix(failures, index, a[:1], {"r0": 1, "r1": 1, "r2": 0, "r3": 0},
                                      "add_replica('r3')", "an added replica is known, holding nothing"):
        return failures
    _call(failures, f"{INDEX}.drop_replica('r1')", index.drop_replica, "r1")
    if failures or not _expect_prefix(failures, index, a[:1], {"r0": 1, "r2": 0, "r3": 0}, "drop_replica('r1')",
                                      "a dropped replica (dead) is gone from every answer"):
        return failures
    if not _expect_blocks(failures, index, {"r1": [], "r0": a[:1], "r2": a[1:]}, "drop_replica('r1')"):
        failures[-1] += " — drop_replica forgets every entry of that replica, and only its"
        return failures
    _call(failures, f"{INDEX}.drop_replica('nobody')", index.drop_replica, "nobody")
    return failures


def check_index_random(impl=None, seed: int = 0, num_events: int = 400):
    """A seeded random stream over three replicas (stores of chained runs, evictions, clears, stale removals),
    checked after every event against the grader's own sets; random longest_prefix queries."""
    failures, kv = [], _impl(impl)
    rng = random.Random(seed)
    prompts = [chain(100 + t, rng.randint(3, 8)) for t in range(6)]
    truth = {r: set() for r in range(3)}
    ok, index = _call(failures, f"{INDEX}()", kv.KVIndex)
    if not ok:
        return failures
    for r in truth:
        if not _call(failures, f"{INDEX}.add_replica({r})", index.add_replica, r)[0]:
            return failures
    for i in range(num_events):
        r = rng.randrange(3)
        roll = rng.random()
        if roll < 0.5:
            p = rng.choice(prompts)
            start = rng.randrange(len(p))
            end = rng.randint(start + 1, len(p))
            event, what = stored(p[start:end], p[start - 1] if start else None), "BlockStored"
            truth[r] |= set(p[start:end])
        elif roll < 0.9:
            pool = sorted(truth[r] | set(rng.choice(prompts)))      # held ones, and some stale
            victims = rng.sample(pool, min(len(pool), rng.randint(1, 3)))
            event, what = removed(victims), "BlockRemoved"
            truth[r] -= set(victims)
        else:
            event, what = AllBlocksCleared(), "AllBlocksCleared"
            truth[r] = set()
        where = f"event {i} of a seeded random stream ({what} from replica {r})"
        if not _call(failures, f"{INDEX}.apply_event ({where})", index.apply_event, r, event)[0]:
            return failures
        for replica in truth:
            got = index.blocks_of(replica)
            if set(got) != truth[replica]:
                failures.append(f"[9.1] after {where}, blocks_of({replica}) has {len(set(got))} hashes, expected "
                                f"{len(truth[replica])} ({len(set(got) - truth[replica])} not held, "
                                f"{len(truth[replica] - set(got))} missing) ({INDEX}.apply_event)")
                return failures
        query = rng.choice(prompts)
        want = {}
        for replica, held in truth.items():
            n = 0
            while n < len(query) and query[n] in held:
                n += 1
            want[replica] = n
        if not _expect_prefix(failures, index, query, want, where, "the leading blocks each replica holds"):
            return failures
    return failures


# ---------------------------------------------------------------------------------------------------- 9.2

def reference_choice(overlaps, loads, request_blocks, weight):
    """The grader's own Dynamo cost: lowest weight × (blocks - overlap) + load; ties: smaller load, first."""
    order = list(loads)
    return min(order, key=lambda r: (weight * (request_blocks - overlaps.get(r, 0)) + loads[r], loads[r],
                                     order.index(r)))


def _expect_choice(failures, kv, overlaps, loads, blocks, weight, want, rule) -> bool:
    ok, got = _call(failures, f"{CHOOSE}({overlaps}, {loads}, {blocks}, {weight})", kv.choose_replica_kv,
                    overlaps, loads, blocks, weight)
    if not ok:
        return False
    if got != want:
        costs = {r: weight * (blocks - overlaps.get(r, 0)) + loads[r] for r in loads}
        failures.append(f"[9.2] choose_replica_kv(overlaps={overlaps}, loads={loads}, request_blocks={blocks}, "
                        f"weight={weight}) chose {got!r}, expected {want!r}: {rule}. Dynamo's costs "
                        f"weight × (request_blocks - overlap) + load: {costs} ({CHOOSE})")
        return False
    return True


def check_choose(impl=None):
    """The score's two terms, the weight, candidates, ties, errors."""
    failures, kv = [], _impl(impl)
    cases = [
        ({"r0": 0, "r1": 30, "r2": 10}, {"r0": 20, "r1": 20, "r2": 20}, 40, 1.0, "r1",
         "with equal loads, the replica holding the longest prefix (the fewest blocks left to prefill)"),
        ({"r0": 12, "r1": 12, "r2": 12}, {"r0": 50, "r1": 10, "r2": 30}, 40, 1.0, "r1",
         "with equal overlaps, the least loaded replica"),
        ({"r0": 30, "r1": 0}, {"r0": 50, "r1": 0}, 40, 1.0, "r1",
         "the load term: r0 saves 30 prefill blocks but carries 50 blocks more (10 + 50 > 40 + 0)"),
        ({"r0": 30, "r1": 0}, {"r0": 50, "r1": 0}, 40, 4.0, "r0",
         "the weight: at weight 4 the 30 saved blocks count 120, more than r0's 50 extra blocks of load"),
        ({"r0": 40, "r1": 0}, {"r0": 5, "r1": 0}, 40, 0.0, "r1", "weight 0 routes on load alone"),
        ({"r0": 40, "r9": 40}, {"r0": 10, "r1": 10}, 40, 1.0, "r0",
         "a replica in overlaps but not in loads (r9: down) is no candidate; a candidate missing from overlaps has 0"),
        ({"r9": 40}, {"r0": 10, "r1": 5}, 40, 1.0, "r1",
         "the candidates are the replicas in loads only: r9 is down, however much it holds"),
        ({"r0": 10, "r1": 0, "r2": 5}, {"r0": 10, "r1": 0, "r2": 5}, 40, 1.0, "r1",
         "equal costs (40 each): the smaller load wins"),
        ({}, {"r0": 7, "r1": 7, "r2": 7}, 40, 1.0, "r0", "equal costs and loads: the first in loads' order"),
        ({"r2": 3}, {"r2": 7, "r1": 10, "r0": 10}, 40, 1.0, "r2", "the lowest cost, in loads' order"),
    ]
    for overlaps, loads, blocks, weight, want, rule in cases:
        if not _expect_choice(failures, kv, overlaps, loads, blocks, weight, want, rule):
            return failures
    ok, _ = _call(failures, f"{CHOOSE}({{}}, {{}}, 4)", kv.choose_replica_kv, {}, {}, 4, 1.0, expect=ValueError)
    if failures:
        return failures
    if ok:
        failures.append(f"[9.2] choose_replica_kv with loads={{}} (no replica up) returned: raise ValueError "
                        f"({CHOOSE})")
        return failures
    ok, _ = _call(failures, f"{CHOOSE}(weight=-1)", kv.choose_replica_kv, {}, {"r0": 0}, 4, -1.0, expect=ValueError)
    if failures:
        return failures
    if ok:
        failures.append(f"[9.2] choose_replica_kv with overlap_score_weight=-1 returned: a negative weight would "
                        f"prefer replicas WITHOUT the prefix; raise ValueError ({CHOOSE})")
        return failures
    rng = random.Random(9)
    for _ in range(300):
        n = rng.randint(1, 6)
        blocks = rng.randint(1, 64)
        loads = {f"r{i}": rng.choice([0, 8, 16, rng.randint(0, 200)]) for i in rng.sample(range(8), n)}
        overlaps = {r: rng.randint(0, blocks) for r in loads if rng.random() < 0.8}
        if rng.random() < 0.3:
            overlaps["down"] = blocks
        weight = rng.choice([0.0, 0.5, 1.0, 2.0, 4.0, 1000.0])
        want = reference_choice(overlaps, loads, blocks, weight)
        if not _expect_choice(failures, kv, overlaps, loads, blocks, weight, want,
                              "the lowest weight × (request_blocks - overlap) + load (seeded random inputs)"):
            return failures
    return failures


# ---------------------------------------------------------------------------------------- the graded tests

CHECKS = {"index_events": check_index_events, "index_random": check_index_random, "choose": check_choose}


def _run(rank, world_size, names, impl=None):
    """Run the named checks in this rank (learner code runs only here, never in the grading process)."""
    return [f for name in names for f in CHECKS[name](impl)]


def _graded(*names):
    failures = launch(_run, 1, list(names), show_output=False)[0]
    assert not failures, "\n".join(failures[:6])


@pytest.mark.exercise("9.1", "KV index")
def test_kv_index_after_each_event():
    _graded("index_events")


@pytest.mark.exercise("9.1", "KV index")
def test_kv_index_random_event_stream():
    _graded("index_random")


@pytest.mark.exercise("9.2", "KV-aware routing cost")
def test_choose_replica_kv():
    _graded("choose")


# ------------------------------------------------------------- planted wrong answers (not an exercise)

planted_results, test_planted_mistakes_are_caught, test_valid_alternatives_pass, test_reference_passes_every_check = \
    planted_tests("planted_ch09_routing", CHECKS, "solutions.kv_router")
