"""Checks of chapter 3's helpers (not exercises): the activation transport, the schedule generators and
the simulator."""
import sys
from types import SimpleNamespace

import pytest
import torch

from helpers import launch
from helpers.course import schedule_sim as S
from helpers.claims import max_abs_diff, tolerance

EXACT = 64 * sys.float_info.epsilon     # the simulator adds a few hundred small float costs: exact up to rounding
from helpers.course.pipeline_runtime import recv_tensor, send_tensor, stage_neighbours, wait_all

PAYLOADS = [torch.arange(6.0).reshape(2, 3), torch.arange(5), torch.ones(3, 1, 2, dtype=torch.float64),
            torch.randn(300, 100),                      # 120 KB: header and data in two messages
            torch.tensor(2.5), torch.zeros(0, 4), torch.tensor([True, False])]


def _transport_job(rank, world_size, payloads):
    if rank == 0:
        handles = []
        for t in payloads:
            handles += send_tensor(t, 1)
        wait_all(handles)
        return None
    return [recv_tensor(0, prefetch=i < len(payloads) - 1) for i in range(len(payloads))]


def test_send_recv_tensor_any_shape_dtype_with_prefetch():
    got = launch(_transport_job, 2, PAYLOADS, show_output=False)[1]
    for want, have in zip(PAYLOADS, got):
        assert have.dtype == want.dtype and have.shape == want.shape and torch.equal(have, want)


def test_stage_neighbours():
    assert stage_neighbours([1, 3, 5], 3) == (1, 5)
    assert stage_neighbours([1, 3, 5], 1) == (None, 3)
    assert stage_neighbours([2], 2) == (None, None)
    with pytest.raises(ValueError, match="not one of"):
        stage_neighbours([0, 1], 2)


@pytest.mark.parametrize("p,m,v", [(4, 8, 2), (4, 4, 2), (2, 6, 3), (4, 12, 2), (3, 3, 2)])
def test_interleaved_order_matches_pytorch(p, m, v):
    from torch.distributed.pipelining.schedules import ScheduleInterleaved1F1B
    ns = SimpleNamespace(n_local_stages=v, pp_group_size=p, microbatches_per_round=m // max(1, m // p),
                         _n_microbatches=m)
    theirs = {r: ScheduleInterleaved1F1B._calculate_single_rank_operations(ns, r) for r in range(p)}
    assert S.from_torch_order(theirs) == S.interleaved_1f1b_order(p, m, v)


@pytest.mark.parametrize("p,m", [(4, 8), (4, 4), (2, 5), (3, 6)])
def test_zb_h1_order_matches_pytorch(p, m):
    from torch.distributed.pipelining.schedules import ScheduleInterleavedZeroBubble
    ns = SimpleNamespace(n_local_stages=1, pp_group_size=p, microbatches_per_round=m // max(1, m // p),
                         _n_microbatches=m)
    theirs = {r: ScheduleInterleavedZeroBubble._calculate_single_rank_operations(ns, r) for r in range(p)}
    assert S.from_torch_order(theirs) == S.zb_h1_order(p, m)


@pytest.mark.parametrize("p,m", [(4, 8), (2, 4), (4, 16)])
def test_simulated_bubbles_match_the_papers(p, m):
    cases = [("gpipe", S.gpipe_order(p, m), 1), ("interleaved", S.interleaved_1f1b_order(p, m, 2), 2),
             ("zb-h1", S.zb_h1_order(p, m), 1)]
    for name, orders, v in cases:
        S.check_order(orders, m, v)
        res = S.simulate(orders, virtual=v)
        assert abs(res.bubble - S.theory_bubble(name, p, m, v)) <= EXACT, name
    assert S.simulate(S.gpipe_order(p, m)).peak_in_flight == [m] * p


@pytest.mark.parametrize("p", [2, 3, 4, 6])
@pytest.mark.parametrize("v", [2, 3])
def test_interleaved_formula_holds_from_m_equal_p_and_not_below(p, v):
    """Issue 11 item 5: (p-1)/(v·m+p-1) holds for m >= p only; below, the simulated bubble is larger:
    1 - v·m/(v·p+m-1) (a micro-batch's trip round all v·p stages sets the pace)."""
    for m in range(1, 2 * p + 1):
        try:
            orders = S.interleaved_1f1b_order(p, m, v)
        except ValueError:          # m not a multiple of the number of rounds: PyTorch refuses it too
            continue
        res = S.simulate(orders, virtual=v)
        paper = S.theory_bubble("interleaved", p, m, v)
        holds, condition = S.formula_condition("interleaved", p, m, v)
        assert holds == (m >= p) and condition == "m ≥ p"
        if m >= p:
            assert abs(res.bubble - paper) <= EXACT, f"p={p} m={m} v={v}: simulated {res.bubble} vs paper {paper}"
        else:
            assert res.bubble > paper + 0.01, f"p={p} m={m} v={v}: below m = p the bubble exceeds the formula"
            assert abs(res.bubble - S.expected_bubble("interleaved", p, m, v)) <= EXACT


def test_report_says_when_the_formula_does_not_hold(capsys):
    import matplotlib
    matplotlib.use("Agg")
    S.report("interleaved 1F1B", 4, 2, virtual=2, show=False)
    out = capsys.readouterr().out
    assert "✓ m=2 < p=4: the paper's (p-1)/(v·m+p-1) = 0.429 does not hold (it needs m ≥ p)" in out, out
    assert "0.556" in out
    S.report("interleaved 1F1B", 4, 8, virtual=2, show=False)
    assert "✓ simulated bubble 0.158 = paper's (p-1)/(v·m+p-1) = 0.158 (it holds for m ≥ p)" in capsys.readouterr().out
    S.report("ZB-H1", 4, 8, f=0.5, show=False)
    assert "does not hold here (it needs m ≥ p, F = B and W ≤ F)" in capsys.readouterr().out


def test_simulator_reports_deadlock():
    bad = [[S.Action("F", 0), S.Action("B", 0)], [S.Action("B", 0), S.Action("F", 0)]]
    with pytest.raises(ValueError, match="comes before"):
        S.check_order(bad, 1)
    with pytest.raises(RuntimeError, match="deadlocks"):
        S.simulate(bad)


@pytest.mark.parametrize("num_stages", [1, 2, 4])
def test_llama_stages_run_one_after_another_equal_the_model(num_stages):
    """The given stage cut (helpers.course.llama_stages): prefill then one cached decode step through every stage in
    turn gives the full model's logits, in one process, before any pipeline sends anything."""
    from helpers.course.llama_stages import split_llama
    from helpers.course.tiny_llama import PROMPT, encode, load_model
    model = load_model()
    ids = torch.tensor([encode(PROMPT)])
    with torch.no_grad():
        full = model(ids).logits
        next_id = full[:, -1:].argmax(-1)
        full_step = model(torch.cat([ids, next_id], 1)).logits[:, -1:]
    stages = split_llama(model, num_stages)
    caches = [s.new_cache() for s in stages]
    h = ids
    for stage, cache in zip(stages, caches):
        h = stage(h, cache, 0)
    # The stages run the same float32 ops as the model, but the cached path reorders some sums: the bound is
    # tolerance()'s default rounding budget times the size of the logits (not one machine's measured gap).
    assert max_abs_diff(h, full) <= tolerance(full), \
        f"prefill through {num_stages} stage(s): max |diff| {max_abs_diff(h, full):.3g} > {tolerance(full):.3g}"
    h = next_id
    for stage, cache in zip(stages, caches):
        h = stage(h, cache, ids.shape[1])
    assert max_abs_diff(h, full_step) <= tolerance(full_step), \
        f"cached decode step through {num_stages} stage(s): " \
        f"max |diff| {max_abs_diff(h, full_step):.3g} > {tolerance(full_step):.3g}"
