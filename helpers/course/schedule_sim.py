"""Pipeline schedules as data, and a simulator that times them — a teaching aid for chapter 3.

A schedule is, for every rank, the ordered list of what it computes:

    Action("F", 3)        forward of micro-batch 3
    Action("B", 3)        backward of micro-batch 3 (the full backward; in zero-bubble schedules only the
                          gradient w.r.t. the stage's input, which the previous stage is waiting for)
    Action("W", 3)        zero-bubble only: the gradient w.r.t. the stage's weights, which nobody waits for
    Action("F", 3, 1)     interleaved schedules: the same, on the rank's model chunk 1

A rank holds `virtual` model chunks; chunk c of rank r is pipeline stage c * p + r (Megatron's layout),
so a micro-batch visits every rank `virtual` times. Generators here: `gpipe_order`,
`interleaved_1f1b_order`, `zb_h1_order`; 1F1B is exercise 3.3 (`pipeline_schedules.one_f_one_b_order`).

`simulate(orders, ...)` runs the lists on an ideal machine (each rank starts an action as soon as it is
free and the action's inputs have arrived), returns the timeline, the bubble fraction and the peak number
of micro-batches whose activations a rank holds. `draw` turns it into a Gantt chart, `explore` adds sliders.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import NamedTuple

__all__ = ["Action", "gpipe_order", "interleaved_1f1b_order", "zb_h1_order", "check_order", "simulate",
           "SimResult", "draw", "explore", "theory_bubble", "formula_condition", "expected_bubble",
           "bubble_verdict", "from_torch_order"]


class Action(NamedTuple):
    kind: str          # "F", "B" or "W"
    micro_batch: int
    chunk: int = 0

    def __repr__(self):
        return f"{self.kind}{self.micro_batch}" + (f".{self.chunk}" if self.chunk else "")


# ------------------------------------------------------------------------------------------ generators

def gpipe_order(num_stages: int, num_micro_batches: int) -> list[list[Action]]:
    """GPipe (Huang et al. 2019): all forwards, then all backwards. Every rank holds m activations."""
    fwd = [Action("F", i) for i in range(num_micro_batches)]
    bwd = [Action("B", i) for i in range(num_micro_batches)]
    return [fwd + bwd for _ in range(num_stages)]


def _rounds(num_stages, num_micro_batches):
    """Micro-batches go round in groups of up to p (PyTorch's "flexible" interleaving)."""
    rounds = max(1, num_micro_batches // num_stages)
    if num_micro_batches % rounds:
        raise ValueError(f"num_micro_batches={num_micro_batches} must be a multiple of the number of rounds "
                         f"{rounds} (= num_micro_batches // num_stages): try a multiple of {num_stages}")
    return num_micro_batches // rounds


def interleaved_1f1b_order(num_stages: int, num_micro_batches: int, virtual: int = 2) -> list[list[Action]]:
    """Interleaved 1F1B (Narayanan et al. 2021): each rank holds `virtual` chunks of layers; micro-batches
    go through chunk 0 of every rank, then chunk 1, ... The warm-up is longer, the bubble `virtual` times
    shorter: (p-1) / (v*m + p-1) for m >= p; for m < p it is 1 - v*m / (v*p + m-1) (`formula_condition`).
    Same ordering as PyTorch's ScheduleInterleaved1F1B."""
    p, m, v = num_stages, num_micro_batches, virtual
    per_round = _rounds(p, m)
    orders = []
    for rank in range(p):
        total = m * v
        warmup = (p - 1 - rank) if v == 1 else (v - 1) * per_round + 2 * (p - 1 - rank)
        warmup = min(warmup, total)

        def fwd(k):
            return Action("F", (k // (per_round * v)) * per_round + k % per_round, (k // per_round) % v)

        def bwd(k):
            return Action("B", (k // (per_round * v)) * per_round + k % per_round, v - 1 - (k // per_round) % v)

        ops = [fwd(k) for k in range(warmup)]
        for k in range(total - warmup):
            ops += [fwd(warmup + k), bwd(k)]
        ops += [bwd(k) for k in range(total - warmup, total)]
        orders.append(ops)
    return orders


def zb_h1_order(num_stages: int, num_micro_batches: int) -> list[list[Action]]:
    """ZB-H1 (Qi et al. 2024, "Zero Bubble Pipeline Parallelism"): split each backward into B (gradient of
    the input, on the critical path) and W (gradient of the weights, which nothing waits for). Rank r runs
    1F1B with B only, and postpones its first r weight passes into the time 1F1B would spend idle. Same
    order as PyTorch's ScheduleInterleavedZeroBubble with one chunk per rank. Bubble (p-1)(F+B-W)
    instead of (p-1)(F+B+W), with the same number of activations in flight as 1F1B."""
    p, m = num_stages, num_micro_batches
    orders = []
    for rank in range(p):
        warmup = min(p - 1 - rank, m)
        ops = [Action("F", i) for i in range(warmup)]
        b_done = w_done = 0
        for k in range(m - warmup):                        # steady state: F, B and (after r steps) W
            ops += [Action("F", warmup + k), Action("B", b_done)]
            b_done += 1
            if k >= rank:
                ops.append(Action("W", w_done))
                w_done += 1
        for k in range(m - warmup, m):                     # cool-down: the remaining B (and W)
            ops.append(Action("B", b_done))
            b_done += 1
            if k >= rank:
                ops.append(Action("W", w_done))
                w_done += 1
        ops += [Action("W", i) for i in range(w_done, m)]  # flush the postponed W
        orders.append(ops)
    return orders


def from_torch_order(pipeline_order: dict) -> list[list[Action]]:
    """PyTorch's `schedule.pipeline_order` ({rank: [_Action(stage, type, mb) or None]}) as our Actions."""
    kinds = {"FORWARD": "F", "FULL_BACKWARD": "B", "BACKWARD_INPUT": "B", "BACKWARD_WEIGHT": "W"}
    p = len(pipeline_order)
    out = []
    for rank in range(p):
        ops = []
        for a in pipeline_order[rank]:
            if a is None or a.computation_type.name not in kinds:
                continue   # None = idle slot; REDUCE_GRAD etc. are not compute we schedule
            ops.append(Action(kinds[a.computation_type.name], a.microbatch_index, a.stage_index // p))
        out.append(ops)
    return out


def theory_bubble(schedule: str, p: int, m: int, virtual: int = 1, f: float = 1, b: float = 1,
                  w: float = 1) -> float:
    """Idle fraction the papers give: (p-1)(F+B+W) / (m(F+B+W) + (p-1)(F+B+W)) for GPipe and 1F1B,
    divided by v for interleaved, and (p-1)(F+B-W) of idle time for ZB-H1.

    Not every formula holds everywhere: see `formula_condition` (interleaved needs m >= p; ZB-H1's
    analysis assumes m >= p, F = B and W <= F). `expected_bubble` gives what the schedule really has."""
    work = m * (f + b + w)
    idle = {"gpipe": (p - 1) * (f + b + w), "1f1b": (p - 1) * (f + b + w),
            "interleaved": (p - 1) * (f + b + w) / virtual, "zb-h1": (p - 1) * max(f + b - w, 0)}[schedule]
    return idle / (work + idle)


FORMULAS = {"gpipe": "(p-1)/(m+p-1)", "1f1b": "(p-1)/(m+p-1)", "interleaved": "(p-1)/(v·m+p-1)",
            "zb-h1": "(p-1)(F+B-W) of idle per rank"}


def formula_condition(schedule: str, p: int, m: int, virtual: int = 1, f: float = 1, b: float = 1,
                      w: float = 1) -> tuple[bool, str]:
    """(holds, condition): whether `theory_bubble`'s formula describes this case, and when it does.

    GPipe, 1F1B: any m and any F, B, W. Interleaved 1F1B: m >= p. Below it, a micro-batch comes back to
    rank 0 for its next chunk after a trip through all p ranks, but rank 0 has only m < p micro-batches to
    work on meanwhile: it idles, and the bubble is 1 - v·m/(v·p + m - 1) (= the formula at m = p; at
    m = 1 it is (p-1)/p, no gain from interleaving). ZB-H1: the paper's count assumes m >= p, F = B and
    W <= F (otherwise the postponed W's do not fit the idle slots exactly)."""
    if schedule == "interleaved" and virtual > 1:
        return m >= p, "m ≥ p"
    if schedule == "zb-h1":
        return (m >= p and f == b and w <= f), "m ≥ p, F = B and W ≤ F"
    return True, "any m"


def expected_bubble(schedule: str, p: int, m: int, virtual: int = 1, f: float = 1, b: float = 1,
                    w: float = 1) -> float | None:
    """The bubble the schedule has on ideal devices, where a closed form is known; None otherwise."""
    holds, _ = formula_condition(schedule, p, m, virtual, f, b, w)
    if holds:
        return theory_bubble(schedule, p, m, virtual, f, b, w)
    if schedule == "interleaved":
        return 1 - virtual * m / (virtual * p + m - 1)
    return None


_EXACT = 64 * sys.float_info.epsilon   # the simulator adds up a few hundred small float costs


def bubble_verdict(schedule: str, result: "SimResult", p: int, m: int, virtual: int = 1, f: float = 1,
                   b: float = 1, w: float = 1) -> bool:
    """Print (as a helpers.claims verdict) how the simulated bubble compares with the paper's formula:
    equal where the formula's condition holds; where it does not, the simulated value is shown against
    both the formula and (interleaved, m < p) the bubble the schedule really has."""
    from helpers.claims import verdict
    theory = theory_bubble(schedule, p, m, virtual, f, b, w)
    holds, condition = formula_condition(schedule, p, m, virtual, f, b, w)
    formula = FORMULAS[schedule]
    if holds:
        return verdict(abs(result.bubble - theory) <= _EXACT,
                       f"simulated bubble {result.bubble:.3f} = paper's {formula} = {theory:.3f} "
                       f"(it holds for {condition})")
    real = expected_bubble(schedule, p, m, virtual, f, b, w)
    if real is not None:
        return verdict(abs(result.bubble - real) <= _EXACT and abs(result.bubble - theory) > _EXACT,
                       f"m={m} < p={p}: the paper's {formula} = {theory:.3f} does not hold (it needs {condition}); "
                       f"simulated {result.bubble:.3f} = 1 - v·m/(v·p+m-1) = {real:.3f}")
    return verdict(abs(result.bubble - theory) > _EXACT,
                   f"the paper's {formula} = {theory:.3f} does not hold here (it needs {condition}): "
                   f"simulated {result.bubble:.3f}")


# ------------------------------------------------------------------------------------------ checking

def check_order(orders: list[list[Action]], num_micro_batches: int, virtual: int = 1) -> None:
    """Raise ValueError unless every rank runs each (kind, micro-batch, chunk) exactly once, a stage's
    backward of a micro-batch comes after its forward, and (by simulating it) the schedule cannot deadlock."""
    p = len(orders)
    kinds = {a[0] for o in orders for a in o}
    for rank, ops in enumerate(orders):
        want = {(k, mb, c) for k in kinds for mb in range(num_micro_batches) for c in range(virtual)}
        got = [(a[0], a[1], a[2] if len(a) > 2 else 0) for a in ops]
        if sorted(got) != sorted(want):
            missing, extra = want - set(got), [g for g in got if got.count(g) > 1 or g not in want]
            raise ValueError(f"rank {rank} must run every action once: missing {sorted(missing)[:5]}, "
                             f"repeated or unexpected {sorted(set(extra))[:5]}")
        for i, a in enumerate(got):
            if a[0] in "BW" and ("F", a[1], a[2]) not in got[:i]:
                raise ValueError(f"rank {rank}: {a[0]}{a[1]} comes before F{a[1]} (action {i})")
    simulate(orders, virtual=virtual)  # raises on deadlock


# ------------------------------------------------------------------------------------------ simulation

@dataclass
class SimResult:
    events: list[dict]           # {rank, label, start, end, micro_batch, chunk, text}: helpers.plots.gantt
    makespan: float
    bubble: float                # idle share of p x makespan
    peak_in_flight: list         # per rank: max micro-batches forwarded and not yet backwarded (B);
                                 # interleaved: chunk activations / virtual, i.e. in whole micro-batches


def simulate(orders: list[list[Action]], f: float = 1.0, b: float = 1.0, w: float = 1.0, comm: float = 0.0,
             virtual: int = 1) -> SimResult:
    """Time the schedule. f, b, w: cost of a forward, an input-gradient backward and a weight-gradient
    backward of ONE rank's layers (a schedule without W actions pays b + w for each B). A chunk costs
    1/virtual of that. comm: delay of every transfer between ranks. Raises RuntimeError on a deadlock."""
    p = len(orders)
    stages = p * virtual
    split = any(a[0] == "W" for o in orders for a in o)
    cost = {"F": f / virtual, "B": (b if split else b + w) / virtual, "W": w / virtual}
    done: dict[tuple, float] = {}              # (kind, stage, mb) -> finish time
    free = [0.0] * p
    pos = [0] * p
    events = []
    while any(pos[r] < len(orders[r]) for r in range(p)):
        progressed = False
        for r in range(p):
            while pos[r] < len(orders[r]):
                a = orders[r][pos[r]]
                kind, mb, chunk = a[0], a[1], (a[2] if len(a) > 2 else 0)
                stage = chunk * p + r
                deps = []
                if kind == "F" and stage > 0:
                    deps.append((("F", stage - 1, mb), (stage - 1) % p != r))
                if kind == "B":
                    deps.append((("F", stage, mb), False))
                    if stage < stages - 1:
                        deps.append((("B", stage + 1, mb), (stage + 1) % p != r))
                if kind == "W":
                    deps.append((("B", stage, mb), False))
                if any(d not in done for d, _ in deps):
                    break
                ready = max([done[d] + (comm if remote else 0.0) for d, remote in deps], default=0.0)
                start = max(free[r], ready)
                end = start + cost[kind]
                done[(kind, stage, mb)] = free[r] = end
                events.append({"rank": r, "label": kind, "start": start, "end": end, "micro_batch": mb,
                               "chunk": chunk, "text": f"{mb}" + ("'" * chunk)})
                pos[r] += 1
                progressed = True
        if not progressed:
            stuck = {r: repr(orders[r][pos[r]]) for r in range(p) if pos[r] < len(orders[r])}
            raise RuntimeError(f"the schedule deadlocks: each rank waits for an input that never comes; "
                               f"next actions {stuck}")
    makespan = max(e["end"] for e in events)
    busy = sum(e["end"] - e["start"] for e in events)
    peaks = []
    for r in range(p):
        held = peak = 0
        for a in orders[r]:
            held += {"F": 1, "B": -1}.get(a[0], 0)
            peak = max(peak, held)
        peaks.append(peak / virtual if virtual > 1 else peak)  # in whole micro-batches' activations
    return SimResult(events, makespan, 1 - busy / (p * makespan), peaks)


def draw(result: SimResult, title: str = "", ax=None):
    """Gantt chart of a simulated schedule (time in units of one forward of a rank's layers)."""
    from helpers.plots import gantt
    ax = gantt(result.events, title=title, ax=ax, label_key="text", time_unit="s")
    ax.set_xlabel("time (one forward of a rank's layers = 1)")
    return ax


SCHEDULES = ("GPipe", "1F1B", "interleaved 1F1B", "ZB-H1")


def build(schedule: str, p: int, m: int, virtual: int = 2, one_f_one_b=None) -> tuple[list[list[Action]], int]:
    """(orders, virtual) for a schedule name. `one_f_one_b`: the 1F1B generator to use (exercise 3.3)."""
    if schedule == "GPipe":
        return gpipe_order(p, m), 1
    if schedule == "1F1B":
        if one_f_one_b is None:
            raise ValueError("pass one_f_one_b=pipeline_schedules.one_f_one_b_order (exercise 3.3)")
        return one_f_one_b(p, m), 1
    if schedule == "interleaved 1F1B":
        return interleaved_1f1b_order(p, m, virtual), virtual
    if schedule == "ZB-H1":
        return zb_h1_order(p, m), 1
    raise ValueError(f"unknown schedule {schedule!r}: one of {SCHEDULES}")


def report(schedule: str, p: int, m: int, virtual: int = 2, f: float = 1, b: float = 1, w: float = 1,
           one_f_one_b=None, ax=None, show: bool = True):
    """Simulate one schedule, print its bubble and peak activations, draw its Gantt chart."""
    import matplotlib.pyplot as plt
    orders, v = build(schedule, p, m, virtual, one_f_one_b)
    res = simulate(orders, f, b, w, virtual=v)
    key = {"GPipe": "gpipe", "1F1B": "1f1b", "interleaved 1F1B": "interleaved", "ZB-H1": "zb-h1"}[schedule]
    print(f"{schedule:17s} p={p} m={m}{f' v={v}' if v > 1 else ''}: bubble {res.bubble:.3f}, "
          f"peak activations held per rank {res.peak_in_flight}")
    bubble_verdict(key, res, p, m, v, f, b, w)
    draw(res, f"{schedule}: p={p}, m={m}" + (f", v={v}" if v > 1 else ""), ax=ax)
    if show:
        plt.show()
    return res


def explore(one_f_one_b=None):
    """Sliders: schedule, stages, micro-batches, virtual stages, F/B/W costs. Redraws the Gantt chart."""
    import ipywidgets as W

    def view(schedule, stages, micro_batches, virtual, f, b, w):
        try:
            report(schedule, stages, micro_batches, virtual, f, b, w, one_f_one_b=one_f_one_b)
        except (ValueError, NotImplementedError) as exc:
            print(f"{schedule}: {exc}")

    wide = {"description_width": "initial"}      # whole labels, not "micro_bat…"
    return W.interact(view, schedule=W.Dropdown(options=SCHEDULES, value="1F1B", description="schedule", style=wide),
                      stages=W.IntSlider(4, 1, 8, description="stages p", style=wide),
                      micro_batches=W.IntSlider(8, 1, 24, description="micro-batches m", style=wide),
                      virtual=W.IntSlider(2, 1, 4, description="virtual stages v", style=wide),
                      f=W.FloatSlider(1.0, min=0.25, max=3, step=0.25, readout_format=".2f",
                                      description="F cost", style=wide),
                      b=W.FloatSlider(1.0, min=0.25, max=3, step=0.25, readout_format=".2f",
                                      description="B cost", style=wide),
                      w=W.FloatSlider(1.0, min=0.0, max=3, step=0.25, readout_format=".2f",
                                      description="W cost", style=wide))
