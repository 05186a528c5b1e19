"""Graders for chapter 3 (labs/pipeline_parallel.py, labs/pipeline_schedules.py, labs/pipelined_decoding.py).

Each grader checks the mechanism its exercise teaches, not only the numbers: which messages went between
which stages (helpers.comm_trace.CommTracer: op, peer, bytes), that stages compute at the same time where
the exercise is about overlap (measured on the run's timeline with a fixed "device time" per stage step,
DeviceTime, so 4 ranks on 2 busy cores still show the pipeline's shape), gradients where they are claimed,
and every error the docstrings promise. Valid alternatives pass: isend/irecv or batch_isend_irecv or
blocking recv, with or without the optional prefetch (3.4), any dtype for the token ids sent back.

Mistakes each grader catches (planted in tests/graders/planted_ch03.py; test_planted_mistakes_are_caught runs each
through the same checks and asserts it is caught with a message that points at it):
3.1 PipelineStage.forward
  - a send that waits for the receiver (forward returns only once the next stage has posted its receive);
  - the "F" span timing the wait for the input (it starts before the input could have arrived);
  - messages to rank ± 1 instead of next_rank / prev_rank (peers checked on stages laid out [0, 2, 1, 3]);
  - collectives, messages to anyone but the neighbours, more bytes than the activation and a header;
  - a non-last stage returning its output, wrong outputs.
3.2 gpipe_forward
  - stages that never overlap: a barrier after every micro-batch, every input received before any is
    computed (makespan vs the sum of stage work, and the longest time two stages compute at once);
  - micro-batches not split as torch.tensor_split (torch.chunk: sizes 3, 3, 1 for 7 rows in 3);
  - prefetch_next on the last micro-batch (a receive posted that no send matches), or never (only the
    timing changes: the grader wraps the stage and records the prefetch_next of each forward);
  - no stage.wait_sends() before returning (sends still pending: recorded the same way);
  - no ValueError for num_micro_batches < 1 or a batch smaller than that; spans missing or out of order.
3.3 one_f_one_b_order
  - GPipe's order, one warm-up forward too many, B before F in the steady state, a warm-up not capped
    at m (known orders, each action once, F before B, no deadlock, at most p - r activations held,
    bubble (p-1)/(m+p-1)); a real run on ranks must give the gradients of one process.
3.4 pipelined_generate
  - one request group at a time (right ids, but only one stage busy: overlap checked as in 3.2);
  - no KV cache (hidden states of the whole sequence re-sent at every step: bytes per link);
  - logits sent back instead of token ids (bytes from the last stage to the first);
  - a collective (broadcast) to hand the token back; messages to anyone but the next stage;
  - a receive posted after the last message (prefetch on the very last receive);
  - spans not labelled prefill / decode with the group index; no ValueError for max_new_tokens < 1 or a
    rank that is not a stage; wrong ids.
"""
import functools
import time

import pytest
import torch
import torch.distributed as dist
from torch import nn

from helpers import launch, load_impl
from helpers.claims import max_abs_diff, tolerance
from helpers.comm_trace import CommTracer
from helpers.launch import LaunchError
from helpers.course.pipeline_runtime import DeviceTime, run_training_schedule, stage_neighbours
from helpers.course.schedule_sim import Action, check_order, simulate, theory_bubble
from helpers.timeline import Timeline
from tests.graders.planted import assert_caught, mistake

HIDDEN = 16
P2P_OPS = {"send", "isend", "recv", "irecv"}
SENDS, RECEIVES = {"send", "isend"}, {"recv", "irecv"}
HEADER_BYTES = 128          # what a message may carry besides the tensor (send_tensor's header is 64 B)
HANDOVER_S = 1.0            # how long the receiver waits before posting its receive (3.1, non-blocking send)
OVERLAP_SHARE = 0.75        # a pipeline's makespan must stay below this share of the summed stage work
EXACT = tolerance(1.0, torch.float64)   # simulated bubbles: exact up to float64 rounding


def _stage_module(stage_index: int) -> nn.Module:
    torch.manual_seed(100 + stage_index)
    return nn.Sequential(nn.Linear(HIDDEN, HIDDEN), nn.Tanh())


def _reference(x: torch.Tensor, num_stages: int) -> torch.Tensor:
    with torch.no_grad():
        for i in range(num_stages):
            x = _stage_module(i)(x)
    return x


def _input(batch=7):
    torch.manual_seed(0)
    return torch.randn(batch, HIDDEN)


class Recorded(nn.Module):
    """A stage's module with a fixed device time, recording (start, end, rows) of each call: the grader's
    own timeline, independent of the spans the exercise records."""

    def __init__(self, inner: nn.Module, device_ms: float = 0.0):
        super().__init__()
        self.inner, self.hold, self.calls = inner, DeviceTime(device_ms), []

    def forward(self, x):
        start = time.perf_counter()
        y = self.hold(self.inner(x))
        self.calls.append((start, time.perf_counter(), x.shape[0]))
        return y


def _comms(trace: CommTracer) -> list[tuple]:
    return [(r.op, r.peer, r.payload) for r in trace.records]


def _spans(tl: Timeline) -> list[tuple]:
    return [(e["label"], e.get("micro_batch"), e["start"], e["end"]) for e in tl.events]


def _fail(failures: list[str]) -> None:
    if failures:
        raise AssertionError("\n".join(failures))


def _check_messages(case: str, comms: dict, stage_ranks: list[int], data_bytes: dict, min_messages: dict,
                    exact_bytes: dict | None = None) -> list[str]:
    """Point-to-point messages between neighbouring stages only, at least `min_messages[(a, b)]` of them
    from a to b, carrying the link's `data_bytes[(a, b)]` plus at most a header each (exactly that many
    data bytes where exact_bytes[(a, b)] is True, at most otherwise), and every receive posted matched by
    a message sent. `comms`: rank -> [(op, peer, payload)]."""
    failures = []
    links = set(data_bytes)
    for rank in stage_ranks:
        collectives = sorted({op for op, _, _ in comms[rank] if op not in P2P_OPS})
        if collectives:
            failures.append(f"{case}: rank {rank} called {', '.join(collectives)}: pipeline stages exchange "
                            f"point-to-point messages with their neighbours only (send_tensor / recv_tensor), "
                            f"no collective")
    if failures:
        return failures
    for rank in stage_ranks:
        outgoing = {b for a, b in links if a == rank}
        incoming = {a for a, b in links if b == rank}
        for op, peer, _ in comms[rank]:
            if op in SENDS and peer not in outgoing:
                want = f"its next stage is rank {sorted(outgoing)[0]}" if outgoing else "it sends nothing"
                failures.append(f"{case}: rank {rank} sent a message to rank {peer}, but {want} "
                                f"(stage ranks {stage_ranks}: use next_rank, a global rank)")
                break
            if op in RECEIVES and peer not in incoming:
                want = f"its previous stage is rank {sorted(incoming)[0]}" if incoming else "it receives nothing"
                failures.append(f"{case}: rank {rank} posted a receive from rank {peer}, but {want} "
                                f"(stage ranks {stage_ranks}: use prev_rank, a global rank)")
                break
    if failures:
        return failures
    for a, b in sorted(links):
        sent = [payload for op, peer, payload in comms[a] if op in SENDS and peer == b]
        posted = [op for op, peer, _ in comms[b] if op in RECEIVES and peer == a]
        total, want, count = sum(sent), data_bytes[(a, b)], len(sent)
        low = want if (exact_bytes or {}).get((a, b), True) else 0
        if count < min_messages[(a, b)]:
            failures.append(f"{case}: rank {a} -> rank {b}: {count} message(s), expected at least "
                            f"{min_messages[(a, b)]} (one per micro-batch / per group and step)")
        elif not low <= total <= want + HEADER_BYTES * count:
            failures.append(f"{case}: bytes sent rank {a} -> rank {b}: {total:,d} B in {count} message(s); "
                            f"the tensors that must travel are {want:,d} B (+ at most {HEADER_BYTES} B of "
                            f"header per message). Too many: is more than the new activation / token sent?")
        if len(posted) > count:
            failures.append(f"{case}: rank {b} has {len(posted)} receives posted from rank {a}, which sent "
                            f"{count} message(s): {len(posted) - count} receive(s) posted for a message never sent "
                            f"(prefetch only when another input surely follows)")
    return failures


def _check_overlap(case: str, calls_by_rank: list[list[tuple]], device_s: float, what: str) -> list[str]:
    """The stages must compute at the same time: the run's makespan well below the sum of its stage work,
    and two ranks busy at once for at least half a stage step. One stage busy at a time (every micro-batch
    or group through the whole pipeline before the next) gives makespan >= the sum."""
    spans = [(rank, s, e) for rank, calls in enumerate(calls_by_rank) for s, e, *_ in calls]
    makespan = max(e for _, _, e in spans) - min(s for _, s, _ in spans)
    work = sum(e - s for _, s, e in spans)
    best = max((min(e1, e2) - max(s1, s2) for r1, s1, e1 in spans for r2, s2, e2 in spans if r1 < r2),
               default=0.0)
    if makespan <= OVERLAP_SHARE * work and best >= device_s / 2:
        return []
    return [f"{case}: the stages did not overlap in time: the run took {makespan:.2f} s for {work:.2f} s of "
            f"stage work (limit {OVERLAP_SHARE:.0%} of it), and two stages computed at once for at most "
            f"{best * 1e3:.0f} ms (a step takes {device_s * 1e3:.0f} ms). {what}"]


def _run(fn, world_size, *args):
    return launch(fn, world_size, *args, show_output=False)


# --------------------------------------------------------------------------------------------- 3.1

STAGE_CASES = {            # stage ranks (in a world of 4 where given), process group?, device ms per step
    "p1": ([0], False, 0.0), "p2": ([0, 1], False, 0.0), "p3": ([0, 1, 2], False, 0.0),
    "p4": ([0, 1, 2, 3], False, 60.0), "ranks31": ([3, 1], False, 0.0), "ranks203group": ([2, 0, 3], True, 0.0),
    "ranks0213": ([0, 2, 1, 3], False, 0.0), "handover": None,
}


def _stage_job(rank, world_size, impl, stage_ranks, use_group, xs, device_ms):
    group = dist.new_group(stage_ranks) if use_group else None   # every rank joins new_group
    dist.barrier()
    if rank not in stage_ranks:
        return None
    index = stage_ranks.index(rank)
    prev_rank, next_rank = stage_neighbours(stage_ranks, rank)
    module = Recorded(_stage_module(index), device_ms)
    stage = impl.PipelineStage(module, prev_rank, next_rank, group=group)
    tl = Timeline(rank)
    outs = []
    with CommTracer() as trace, torch.no_grad():
        for i, x in enumerate(xs):
            outs.append(stage.forward(x if stage.is_first else None, timeline=tl, micro_batch=i))
        stage.wait_sends()
    return {"outs": outs, "spans": _spans(tl), "calls": module.calls, "comms": _comms(trace)}


def _handover_job(rank, world_size, impl):
    """Rank 1 posts its receive HANDOVER_S after rank 0 calls forward: a non-blocking send returns before."""
    stage = impl.PipelineStage(_stage_module(rank), *stage_neighbours([0, 1], rank))
    dist.barrier()
    with torch.no_grad():
        if rank == 0:
            called = time.perf_counter()
            stage.forward(_input(4), micro_batch=0)
            returned = time.perf_counter()
            stage.wait_sends()
            return called, returned
        time.sleep(HANDOVER_S)
        posted = time.perf_counter()
        out = stage.forward(micro_batch=0)
        return posted, out


def check_stage(impl, case: str) -> None:
    if case == "handover":
        (called, returned), (posted, out) = _run(_handover_job, 2, impl)
        failures = []
        if returned > posted:
            failures.append(f"{case}: rank 0's forward took {returned - called:.2f} s and returned only after rank 1 "
                            f"posted its receive ({HANDOVER_S:g} s late): the send waits for the receiver. "
                            f"Start it with send_tensor (isend), keep its handles in self.pending_sends, return")
        want = _reference(_input(4), 2)
        if not (isinstance(out, torch.Tensor) and out.shape == want.shape
                and max_abs_diff(out, want) <= tolerance(want)):
            failures.append(f"{case}: rank 1's output differs from the unsplit model")
        return _fail(failures)
    stage_ranks, use_group, device_ms = STAGE_CASES[case]
    world_size = 4 if case.startswith("ranks") else len(stage_ranks)
    xs = [_input(5), _input(3)]
    results = _run(_stage_job, world_size, impl, stage_ranks, use_group, xs, device_ms)
    failures = []
    by_index = [results[r] for r in stage_ranks]
    for index, (rank, res) in enumerate(zip(stage_ranks, by_index)):
        spans = [(label, mb) for label, mb, _, _ in res["spans"]]
        if spans != [("F", 0), ("F", 1)]:
            failures.append(f"{case}: rank {rank}: record one span 'F' per call with its micro_batch, got {spans}")
        elif device_ms:
            for i, ((_, _, start, end), (c_start, c_end, _)) in enumerate(zip(res["spans"], res["calls"])):
                if not (start <= c_start and c_end <= end):
                    failures.append(f"{case}: rank {rank}, call {i}: the 'F' span must contain the computation")
                if index > 0:
                    earliest = by_index[index - 1]["calls"][i][0] + device_ms / 1e3
                    if start < earliest:
                        failures.append(f"{case}: rank {rank}'s span 'F' of micro-batch {i} starts before its input "
                                        f"could have arrived ({(earliest - start) * 1e3:.0f} ms before the previous "
                                        f"stage finished computing it): record the computation and the send, not "
                                        f"the wait in the receive")
        if index < len(stage_ranks) - 1 and res["outs"] != [None, None]:
            failures.append(f"{case}: rank {rank} is not the last stage: forward must return None")
    for i, x in enumerate(xs):
        got, want = by_index[-1]["outs"][i], _reference(x, len(stage_ranks))
        if not (isinstance(got, torch.Tensor) and got.shape == want.shape):
            failures.append(f"{case}: last stage (rank {stage_ranks[-1]}), call {i}: expected a tensor of shape "
                            f"{tuple(want.shape)}, got {got!r:.100}")
        elif max_abs_diff(got, want) > tolerance(want):
            failures.append(f"{case}: call {i}: max |diff| vs the unsplit model {max_abs_diff(got, want):.3g}: does "
                            f"each stage receive from prev_rank and send to next_rank (global ranks)?")
    links = list(zip(stage_ranks, stage_ranks[1:]))
    data = {link: sum(x.numel() for x in xs) * 4 for link in links}   # float32 activations, same shape as x
    comms = {r: results[r]["comms"] for r in stage_ranks}
    failures += _check_messages(case, comms, stage_ranks, data, {link: len(xs) for link in links})
    _fail(failures)


@pytest.mark.exercise("3.1", "PipelineStage: receive, compute, send")
@pytest.mark.parametrize("case", list(STAGE_CASES))
def test_stage_forward(case):
    check_stage(load_impl("pipeline_parallel"), case)


# --------------------------------------------------------------------------------------------- 3.2

GPIPE_CASES = {"p1": (1, (1, 3, 4), 0.0), "p2": (2, (1, 3, 4), 0.0), "p3": (3, (1, 3, 4), 0.0),
               "p4": (4, (1, 3, 4), 0.0), "overlap": (4, (4,), 60.0)}


class _Watched:
    """The learner's stage as gpipe_forward sees it, with the calls it makes recorded: which prefetch_next each
    forward got, and whether wait_sends came after the last one (prefetch and unfinished sends change only the
    timing, which no output shows)."""

    def __init__(self, stage):
        self._stage, self.log = stage, []

    def __getattr__(self, name):
        return getattr(self._stage, name)

    def forward(self, x=None, timeline=None, micro_batch=None, prefetch_next=False):
        self.log.append(("forward", bool(prefetch_next)))
        return self._stage.forward(x, timeline=timeline, micro_batch=micro_batch, prefetch_next=prefetch_next)

    def wait_sends(self):
        self.log.append(("wait_sends", None))
        return self._stage.wait_sends()


def _check_stage_calls(where, rank, p, m, log, pending):
    """3.2's contract with the stage: prefetch_next=True for all but the last micro-batch (on a stage that
    receives), and the sends complete before gpipe_forward returns (stage.wait_sends after the last forward)."""
    flags = [flag for kind, flag in log if kind == "forward"]
    if rank > 0 and len(flags) == m and flags != [True] * (m - 1) + [False]:
        return [f"{where}: rank {rank} called stage.forward with prefetch_next={flags}; expected True for all but "
                f"the last micro-batch, {[True] * (m - 1) + [False]}: another input surely follows, so its receive is "
                f"posted before this one is computed (False on the last: no send would match the receive)"]
    last = max((i for i, (kind, _) in enumerate(log) if kind == "forward"), default=-1)
    if rank < p - 1 and last >= 0 and not any(kind == "wait_sends" for kind, _ in log[last + 1:]) and pending:
        return [f"{where}: rank {rank} returned from gpipe_forward with {pending} send(s) of its stage still pending "
                f"and no stage.wait_sends() after its last forward: the docstring's stages return None after their "
                f"sends have completed"]
    return []


def _gpipe_job(rank, world_size, impl, batch, ms, device_ms):
    module = Recorded(_stage_module(rank), device_ms)
    stage = impl.PipelineStage.from_ranks(module, list(range(world_size)))
    runs = []
    with torch.no_grad():
        if device_ms:                           # warm-up: the first messages set up the connections
            impl.gpipe_forward(stage, batch if rank == 0 else None, ms[0])
        for m in ms:
            module.calls.clear()
            tl = Timeline(rank)
            dist.barrier()
            watched = _Watched(stage)
            with CommTracer() as trace:
                out = impl.gpipe_forward(watched, batch if rank == 0 else None, m, timeline=tl)
            pending = len(getattr(stage, "pending_sends", None) or [])
            runs.append({"m": m, "out": out, "spans": _spans(tl), "calls": list(module.calls), "comms": _comms(trace),
                         "log": watched.log, "pending": pending})
            stage.wait_sends()          # whatever the learner left, before the next run's messages
        dist.barrier()      # no rank leaves while another still runs (a stray receive would see it go)
        errors = {}
        if world_size == 1:
            for what, args in (("num_micro_batches=0", (batch, 0)),
                               ("a batch of 2 rows in 3 micro-batches", (batch[:2], 3))):
                try:
                    impl.gpipe_forward(stage, args[0], args[1])
                    errors[what] = "no error"
                except Exception as exc:        # noqa: BLE001 - the grader reports what was raised
                    errors[what] = f"{type(exc).__name__}: {exc}"
    return runs, errors


def check_gpipe(impl, case: str) -> None:
    p, ms, device_ms = GPIPE_CASES[case]
    batch = _input(7 if not device_ms else 8)
    results = _run(_gpipe_job, p, impl, batch, ms, device_ms)
    failures = []
    for k, m in enumerate(ms):
        runs = [results[r][0][k] for r in range(p)]
        where = f"{case} m={m}"
        sizes = [t.shape[0] for t in torch.tensor_split(batch, m)]
        for rank, run in enumerate(runs):
            mbs = [mb for label, mb, _, _ in run["spans"] if label == "F"]
            if mbs != list(range(m)):
                failures.append(f"{where}: rank {rank}: expected one 'F' span per micro-batch 0..{m - 1} in order, "
                                f"got {mbs}")
            rows = [c[2] for c in run["calls"]]
            if rows != sizes:
                failures.append(f"{where}: rank {rank} computed micro-batch sizes {rows}, expected {sizes} "
                                f"(torch.tensor_split: sizes differ by at most one)")
            if rank < p - 1 and run["out"] is not None:
                failures.append(f"{where}: rank {rank} is not the last stage: gpipe_forward must return None")
        got, want = runs[-1]["out"], _reference(batch, p)
        if not (isinstance(got, torch.Tensor) and got.shape == want.shape):
            failures.append(f"{where}: last stage: expected the whole batch's output {tuple(want.shape)}, got "
                            f"{tuple(got.shape) if isinstance(got, torch.Tensor) else got!r}")
        elif max_abs_diff(got, want) > tolerance(want):
            failures.append(f"{where}: outputs differ from the unsplit model "
                            f"(max |diff| {max_abs_diff(got, want):.3g}); "
                            f"are micro-batches gathered in order?")
        links = [(r, r + 1) for r in range(p - 1)]
        failures += _check_messages(where, {r: runs[r]["comms"] for r in range(p)}, list(range(p)),
                                    {link: batch.numel() * 4 for link in links}, {link: m for link in links})
        for rank, run in enumerate(runs):
            failures += _check_stage_calls(where, rank, p, m, run["log"], run["pending"])
        if device_ms:
            failures += _check_overlap(where, [run["calls"] for run in runs], device_ms / 1e3,
                                       "Each micro-batch seems to wait for the previous one to leave the pipeline "
                                       "(a barrier or a wait per micro-batch, or all inputs received before any is "
                                       "computed?)")
    for what, got in results[0][1].items():
        if not got.startswith("ValueError"):
            failures.append(f"{case}: gpipe_forward with {what} must raise ValueError (see its docstring), got {got}")
    _fail(failures)


@pytest.mark.exercise("3.2", "GPipe over micro-batches, outputs in order")
@pytest.mark.parametrize("case", list(GPIPE_CASES))
def test_gpipe_forward(case):
    check_gpipe(load_impl("pipeline_parallel"), case)


# --------------------------------------------------------------------------------------------- 3.3

KNOWN_1F1B = {
    (4, 8): ["F0 F1 F2 F3 B0 F4 B1 F5 B2 F6 B3 F7 B4 B5 B6 B7",
             "F0 F1 F2 B0 F3 B1 F4 B2 F5 B3 F6 B4 F7 B5 B6 B7",
             "F0 F1 B0 F2 B1 F3 B2 F4 B3 F5 B4 F6 B5 F7 B6 B7",
             "F0 B0 F1 B1 F2 B2 F3 B3 F4 B4 F5 B5 F6 B6 F7 B7"],
    (2, 3): ["F0 F1 B0 F2 B1 B2", "F0 B0 F1 B1 F2 B2"],
    (3, 1): ["F0 B0", "F0 B0", "F0 B0"],
    (1, 2): ["F0 B0 F1 B1"],
}
ONE_F_ONE_B_CASES = {f"{p}x{m}": (p, m) for p, m in sorted(KNOWN_1F1B)}


def _as_text(ops):
    return " ".join(f"{a[0]}{a[1]}" for a in ops)


def check_1f1b_order(one_f_one_b_order, p: int, m: int) -> None:
    """Orders only (no ranks): the known order where there is one, and the invariants."""
    orders = one_f_one_b_order(p, m)
    assert len(orders) == p, f"p={p} m={m}: expected one list of actions per rank ({p}), got {len(orders)}"
    if (p, m) in KNOWN_1F1B:
        for rank, (ops, want) in enumerate(zip(orders, KNOWN_1F1B[(p, m)])):
            assert _as_text(ops) == want, f"p={p} m={m} rank {rank}: expected {want}, got {_as_text(ops)}"
    check_order([[Action(a[0], a[1]) for a in ops] for ops in orders], m)   # each action once, F before B, no deadlock
    res = simulate(orders)
    for rank, peak in enumerate(res.peak_in_flight):
        assert peak <= min(p - rank, m), \
            f"p={p} m={m} rank {rank} holds {peak} activations at once; 1F1B holds at most p - rank = {p - rank}"
    assert abs(res.bubble - theory_bubble("1f1b", p, m)) <= EXACT, \
        f"p={p} m={m}: simulated bubble {res.bubble:.3f}, 1F1B's is (p-1)/(m+p-1) = {theory_bubble('1f1b', p, m):.3f}"


@pytest.mark.exercise("3.3", "1F1B action order")
@pytest.mark.parametrize("case", list(ONE_F_ONE_B_CASES))
def test_one_f_one_b_known_orders(case):
    check_1f1b_order(load_impl("pipeline_schedules").one_f_one_b_order, *ONE_F_ONE_B_CASES[case])


@pytest.mark.exercise("3.3", "1F1B action order")
@pytest.mark.parametrize("p,m", [(p, m) for p in (1, 2, 3, 4, 6) for m in (1, 2, 4, 5, 12)])
def test_one_f_one_b_invariants(p, m):
    check_1f1b_order(load_impl("pipeline_schedules").one_f_one_b_order, p, m)


def _train_job(rank, world_size, orders, m):
    prev_rank, next_rank = stage_neighbours(list(range(world_size)), rank)
    module = _stage_module(rank)
    x, y = _input(8), torch.ones(8, HIDDEN)
    loss = run_training_schedule(module, orders[rank], prev_rank, next_rank,
                                 micro_batches=list(torch.tensor_split(x, m)), targets=list(torch.tensor_split(y, m)),
                                 loss_fn=nn.functional.mse_loss)
    return [p.grad for p in module.parameters()], loss


@pytest.mark.exercise("3.3", "1F1B action order")
@pytest.mark.parametrize("world_size,m", [(2, 4), (3, 2), (4, 4)])
def test_one_f_one_b_runs_for_real(world_size, m):
    orders = load_impl("pipeline_schedules").one_f_one_b_order(world_size, m)
    check_order([[Action(a[0], a[1]) for a in ops] for ops in orders], m)   # never run an order that deadlocks
    results = _run(_train_job, world_size, orders, m)
    modules = [_stage_module(i) for i in range(world_size)]
    out = _input(8)
    for mod in modules:
        out = mod(out)
    nn.functional.mse_loss(out, torch.ones(8, HIDDEN)).backward()
    for rank, (grads, _) in enumerate(results):
        for g, p in zip(grads, modules[rank].parameters()):
            # micro-batch losses summed in another order than the whole batch's: a few roundings of the grad
            assert max_abs_diff(g, p.grad) <= tolerance(p.grad), \
                f"rank {rank}: gradients differ from one process by {max_abs_diff(g, p.grad):.3g}"


# --------------------------------------------------------------------------------------------- 3.4

TEXTS = ["Four score and seven years ago", "We hold these truths to be self-evident",
         "A Fox one day fell into a deep well", "The Tortoise and the Hare"]
DECODE_CASES = {"1 stage": ([0], 6, 0.0), "2 stages": ([0, 1], 6, 0.0), "2 stages reversed": ([1, 0], 6, 0.0),
                "4 stages": ([0, 1, 2, 3], 6, 0.0), "overlap": ([0, 1, 2, 3], 3, 30.0)}


@functools.lru_cache(maxsize=None)
def _model():
    from helpers.course.tiny_llama import load_model
    return load_model()


@functools.lru_cache(maxsize=None)
def _expected_ids(n):
    """Prompt + n greedy tokens of the unsplit model, per group (computed once for all tests)."""
    from helpers.course.tiny_llama import generate
    return [torch.cat([prompt, torch.tensor([generate(_model(), row, n) for row in prompt])], dim=1)
            for prompt in _prompt_groups()]


def _prompt_groups(num_groups=3):
    from helpers.course.tiny_llama import encode
    # three groups: batch 2, batch 1, batch 2; different prompt lengths (a fourth for the overlap case)
    groups = [torch.tensor([encode(TEXTS[0][:10]), encode(TEXTS[1][:10])]), torch.tensor([encode(TEXTS[2][:14])]),
              torch.tensor([encode(TEXTS[3][:6]), encode(TEXTS[1][-6:])]), torch.tensor([encode(TEXTS[0][-8:])])]
    return groups[:num_groups]


def _decode_job(rank, world_size, generate, model, stage_ranks, groups, n, device_ms):
    from helpers.course.llama_stages import LlamaStage
    errors = {}
    if world_size == 1:     # the docstring's errors, before anything else
        stage = LlamaStage(model, 0, 1)
        for what, args in (("max_new_tokens=0", ([0], 0)), ("a rank that is not a stage", ([1], 2))):
            try:
                generate(stage, args[0], groups, args[1])
                errors[what] = "no error"
            except Exception as exc:            # noqa: BLE001 - the grader reports what was raised
                errors[what] = f"{type(exc).__name__}: {exc}"
    stage = LlamaStage(model, stage_ranks.index(rank), len(stage_ranks))
    calls, inner, hold = [], stage.forward, DeviceTime(device_ms)

    def timed(*args, **kwargs):
        start = time.perf_counter()
        out = hold(inner(*args, **kwargs))
        calls.append((start, time.perf_counter()))
        return out

    stage.forward = timed
    if device_ms:                               # warm-up: the first messages set up the connections
        generate(stage, stage_ranks, groups[:1], 2)
    calls.clear()
    tl = Timeline(rank)
    dist.barrier()
    with CommTracer() as trace:
        out = generate(stage, stage_ranks, groups, n, timeline=tl)
    dist.barrier()          # no rank leaves while another still runs (a stray receive would see it go)
    return {"out": out, "spans": _spans(tl), "calls": calls, "comms": _comms(trace), "errors": errors}


def check_decode(generate, case: str) -> None:
    stage_ranks, n, device_ms = DECODE_CASES[case]
    groups = _prompt_groups(4 if device_ms else 3)
    p, G = len(stage_ranks), len(groups)
    results = _run(_decode_job, p, generate, _model(), stage_ranks, groups, n, device_ms)
    failures = []
    first = stage_ranks[0]
    for what, got in results[0]["errors"].items():
        if not got.startswith("ValueError"):
            failures.append(f"{case}: pipelined_generate with {what} must raise ValueError (see its docstring), "
                            f"got {got}")
    # messages: hidden states of the new tokens along the stages (KV cache), token ids back to the first
    hidden = _model().config.hidden_size
    links = list(zip(stage_ranks, stage_ranks[1:])) + ([(stage_ranks[-1], first)] if p > 1 else [])
    states = sum(g.shape[0] * (g.shape[1] + n - 1) for g in groups) * hidden * 4
    tokens = sum(g.shape[0] for g in groups) * n * 8
    data = {link: (tokens if link[1] == first else states) for link in links}
    comms = {r: results[r]["comms"] for r in stage_ranks}
    failures += _check_messages(case, comms, stage_ranks, data, {link: G * n for link in links},
                                exact_bytes={link: link[1] != first for link in links})
    # spans: one per group and step, the first a prefill
    for rank in stage_ranks:
        spans = [(label, g) for label, g, _, _ in results[rank]["spans"]]
        for g in range(G):
            got = [label for label, gg in spans if gg == g]
            want = ["prefill"] + ["decode"] * (n - 1)
            if got != want:
                failures.append(f"{case}: rank {rank}: spans of group {g}: expected {want}, got {got}")
                break
    if device_ms:
        failures += _check_overlap(case, [results[r]["calls"] for r in stage_ranks], device_ms / 1e3,
                                   "Are the groups interleaved (step s of every group before step s + 1), so that "
                                   "up to G groups are in flight, or does one group go round alone?")
    # ids
    got = results[first]["out"]
    for rank in stage_ranks[1:]:
        if results[rank]["out"] is not None:
            failures.append(f"{case}: rank {rank} is not the first stage: return None")
    if not (isinstance(got, list) and len(got) == G):
        failures.append(f"{case}: first stage: expected a list of {G} tensors, got {got!r:.200}")
    else:
        want_ids = _expected_ids(n) if G == 3 else None
        for g, out in enumerate(got):
            want = want_ids[g] if want_ids else None
            if want is None:
                from helpers.course.tiny_llama import generate as reference
                want = torch.cat([groups[g], torch.tensor([reference(_model(), row, n) for row in groups[g]])], 1)
            if out.shape != want.shape:
                failures.append(f"{case}: group {g}: expected shape {tuple(want.shape)} (prompt + {n} tokens), "
                                f"got {tuple(out.shape)}")
            elif not torch.equal(out, want):
                failures.append(f"{case}: group {g}: expected ids {want.tolist()}, got {out.tolist()}")
    _fail(failures)


@pytest.mark.exercise("3.4", "pipelined greedy decoding, groups in flight")
@pytest.mark.parametrize("case", list(DECODE_CASES))
def test_pipelined_generate(case):
    check_decode(load_impl("pipelined_decoding").pipelined_generate, case)


# ----------------------------------------------------- planted mistakes (not an exercise: the graders' own test)

def _planted():
    from tests.graders import planted_ch03
    return planted_ch03.PLANTED


def _grade(planted) -> str:
    """Run the planted answer through its exercise's check; return what the grader said ('' if it passed)."""
    try:
        if planted.exercise == "3.1":
            check_stage(planted.impl, planted.case)
        elif planted.exercise == "3.2":
            check_gpipe(planted.impl, planted.case)
        elif planted.exercise == "3.3":
            check_1f1b_order(planted.impl, *ONE_F_ONE_B_CASES[planted.case])
        else:
            check_decode(planted.impl, planted.case)
    except (AssertionError, ValueError, LaunchError) as exc:
        return str(exc) or type(exc).__name__
    return ""


@pytest.mark.parametrize("planted", _planted(), ids=lambda p: f"{p.exercise}-{p.name}")
def test_planted_mistakes_are_caught(planted):
    """Each wrong implementation in tests/graders/planted_ch03.py, graded by its exercise's own check on one case,
    must fail with a message that points at its bug."""
    found = _grade(planted)
    assert_caught(mistake(planted.exercise, planted.name, planted.doc, planted.caught_by), found)


def _valid():
    from tests.graders import planted_ch03
    return [(exercise, name, case, impl) for exercise, name, cases, impl in planted_ch03.VALID for case in cases]


@pytest.mark.parametrize("exercise,name,case,impl", _valid(), ids=lambda v: v if isinstance(v, str) else "")
def test_valid_alternatives_pass(exercise, name, case, impl):
    """Other correct ways (own transport with batch_isend_irecv, 3.4 without prefetch, int32 token ids) pass the
    graders."""
    check = {"3.1": check_stage, "3.2": check_gpipe, "3.4": check_decode}[exercise]
    check(impl, case)
