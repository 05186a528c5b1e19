"""Checks of chapter 3's helpers (not exercises): the activation transport, the schedule generators and
the simulator."""
from types import SimpleNamespace

import pytest
import torch

from helpers import launch
from helpers import schedule_sim as S
from helpers.pipeline_runtime import recv_tensor, send_tensor, stage_neighbours, wait_all

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
    ns = SimpleNamespace(n_local_stages=v, pp_group_size=p, microbatches_per_round=m // max(1, m // p), _n_microbatches=m)
    theirs = {r: ScheduleInterleaved1F1B._calculate_single_rank_operations(ns, r) for r in range(p)}
    assert S.from_torch_order(theirs) == S.interleaved_1f1b_order(p, m, v)


@pytest.mark.parametrize("p,m", [(4, 8), (4, 4), (2, 5), (3, 6)])
def test_zb_h1_order_matches_pytorch(p, m):
    from torch.distributed.pipelining.schedules import ScheduleInterleavedZeroBubble
    ns = SimpleNamespace(n_local_stages=1, pp_group_size=p, microbatches_per_round=m // max(1, m // p), _n_microbatches=m)
    theirs = {r: ScheduleInterleavedZeroBubble._calculate_single_rank_operations(ns, r) for r in range(p)}
    assert S.from_torch_order(theirs) == S.zb_h1_order(p, m)


@pytest.mark.parametrize("p,m", [(4, 8), (2, 4), (4, 16)])
def test_simulated_bubbles_match_the_papers(p, m):
    cases = [("gpipe", S.gpipe_order(p, m), 1), ("interleaved", S.interleaved_1f1b_order(p, m, 2), 2),
             ("zb-h1", S.zb_h1_order(p, m), 1)]
    for name, orders, v in cases:
        S.check_order(orders, m, v)
        res = S.simulate(orders, virtual=v)
        assert res.bubble == pytest.approx(S.theory_bubble(name, p, m, v)), name
    assert S.simulate(S.gpipe_order(p, m)).peak_in_flight == [m] * p


def test_simulator_reports_deadlock():
    bad = [[S.Action("F", 0), S.Action("B", 0)], [S.Action("B", 0), S.Action("F", 0)]]
    with pytest.raises(ValueError, match="comes before"):
        S.check_order(bad, 1)
    with pytest.raises(RuntimeError, match="deadlocks"):
        S.simulate(bad)


@pytest.mark.parametrize("num_stages", [1, 2, 4])
def test_llama_stages_run_one_after_another_equal_the_model(num_stages):
    """The given stage cut (helpers.llama_stages): prefill then one cached decode step through every stage in
    turn gives the full model's logits, in one process, before any pipeline sends anything."""
    from helpers.llama_stages import split_llama
    from helpers.tiny_llama import PROMPT, encode, load_model
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
    assert (h - full).abs().max() < 1e-5
    h = next_id
    for stage, cache in zip(stages, caches):
        h = stage(h, cache, ids.shape[1])
    assert (h - full_step).abs().max() < 1e-5
