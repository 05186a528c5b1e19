"""Graders for chapter 3 (labs/pipeline_parallel.py, labs/pipeline_schedules.py, labs/pipelined_decoding.py).
"""
import functools

import pytest
import torch
import torch.distributed as dist
from torch import nn

from helpers import launch, load_impl
from helpers.pipeline_runtime import run_training_schedule, stage_neighbours
from helpers.schedule_sim import Action, check_order, simulate, theory_bubble
from helpers.timeline import Timeline

HIDDEN = 16


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


# --------------------------------------------------------------------------------------------- 3.1

def _stage_job(rank, world_size, stage_ranks, use_group, micro_batches):
    pp = load_impl("pipeline_parallel")
    group = dist.new_group(stage_ranks) if use_group else None   # every rank joins new_group
    if rank not in stage_ranks:
        return "idle"
    index = stage_ranks.index(rank)
    prev_rank, next_rank = stage_neighbours(stage_ranks, rank)
    stage = pp.PipelineStage(_stage_module(index), prev_rank, next_rank, group=group)
    tl = Timeline(rank)
    outs = []
    with torch.no_grad():
        for i, x in enumerate(micro_batches):
            outs.append(stage.forward(x if stage.is_first else None, timeline=tl, micro_batch=i))
    stage.wait_sends()
    return outs, [(e["label"], e["micro_batch"]) for e in tl.events]


@pytest.mark.exercise("3.1", "PipelineStage: receive, compute, send")
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_stage_forward(world_size):
    xs = [_input(5), _input(3)]
    results = launch(_stage_job, world_size, list(range(world_size)), False, xs, show_output=False)
    for rank, (outs, spans) in enumerate(results):
        assert spans == [("F", 0), ("F", 1)], f"rank {rank}: record one span 'F' per call with its micro_batch, got {spans}"
        if rank < world_size - 1:
            assert outs == [None, None], f"rank {rank} is not the last stage: forward must return None"
    for i, x in enumerate(xs):
        got, want = results[-1][0][i], _reference(x, world_size)
        assert isinstance(got, torch.Tensor) and got.shape == want.shape, f"last stage: expected shape {tuple(want.shape)}, got {got!r}"
        assert torch.allclose(got, want, atol=1e-6), f"call {i}: max |diff| vs the unsplit model {(got - want).abs().max():.3g}"


@pytest.mark.exercise("3.1", "PipelineStage: receive, compute, send")
@pytest.mark.parametrize("stage_ranks,use_group", [([3, 1], False), ([2, 0, 3], True)])
def test_stage_on_any_ranks(stage_ranks, use_group):
    """A pipeline that lives on some ranks of a bigger world, in any order (as inside a hybrid grid)."""
    xs = [_input(4)]
    results = launch(_stage_job, 4, stage_ranks, use_group, xs, show_output=False)
    got = results[stage_ranks[-1]][0][0]
    want = _reference(xs[0], len(stage_ranks))
    assert torch.allclose(got, want, atol=1e-6), \
        f"stages on global ranks {stage_ranks}: send to next_rank / receive from prev_rank (global ranks), max |diff| {(got - want).abs().max():.3g}"


# --------------------------------------------------------------------------------------------- 3.2

def _gpipe_job(rank, world_size, batch, m):
    pp = load_impl("pipeline_parallel")
    stage = pp.PipelineStage.from_ranks(_stage_module(rank), list(range(world_size)))
    tl = Timeline(rank)
    with torch.no_grad():
        out = pp.gpipe_forward(stage, batch if rank == 0 else None, m, timeline=tl)
    return out, [e["micro_batch"] for e in tl.events if e["label"] == "F"]


@pytest.mark.exercise("3.2", "GPipe over micro-batches, outputs in order")
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("m", [1, 3, 4])
def test_gpipe_forward(world_size, m):
    batch = _input(7)
    results = launch(_gpipe_job, world_size, batch, m, show_output=False)
    for rank, (out, mbs) in enumerate(results):
        assert mbs == list(range(m)), f"rank {rank}: expected one forward per micro-batch 0..{m - 1} in order, got {mbs}"
        if rank < world_size - 1:
            assert out is None, f"rank {rank} is not the last stage: gpipe_forward must return None"
    got, want = results[-1][0], _reference(batch, world_size)
    assert isinstance(got, torch.Tensor) and got.shape == want.shape, \
        f"last stage: expected the whole batch's output {tuple(want.shape)}, got {got if not isinstance(got, torch.Tensor) else tuple(got.shape)}"
    assert torch.allclose(got, want, atol=1e-6), \
        f"m={m}: outputs differ from the unsplit model (max |diff| {(got - want).abs().max():.3g}); are micro-batches gathered in order?"


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


def _as_text(ops):
    return " ".join(f"{a[0]}{a[1]}" for a in ops)


@pytest.mark.exercise("3.3", "1F1B action order")
@pytest.mark.parametrize("p,m", sorted(KNOWN_1F1B))
def test_one_f_one_b_known_orders(p, m):
    orders = load_impl("pipeline_schedules").one_f_one_b_order(p, m)
    assert len(orders) == p, f"expected one list of actions per rank ({p}), got {len(orders)}"
    for rank, (ops, want) in enumerate(zip(orders, KNOWN_1F1B[(p, m)])):
        assert _as_text(ops) == want, f"p={p} m={m} rank {rank}: expected {want}, got {_as_text(ops)}"


@pytest.mark.exercise("3.3", "1F1B action order")
@pytest.mark.parametrize("p,m", [(p, m) for p in (1, 2, 3, 4, 6) for m in (1, 2, 4, 5, 12)])
def test_one_f_one_b_invariants(p, m):
    orders = load_impl("pipeline_schedules").one_f_one_b_order(p, m)
    check_order([[Action(a[0], a[1]) for a in ops] for ops in orders], m)   # each action once, F before B, no deadlock
    res = simulate(orders)
    for rank, peak in enumerate(res.peak_in_flight):
        assert peak <= min(p - rank, m), f"p={p} m={m} rank {rank} holds {peak} activations at once; 1F1B holds at most p - rank = {p - rank}"
    assert abs(res.bubble - theory_bubble("1f1b", p, m)) < 1e-9, \
        f"p={p} m={m}: simulated bubble {res.bubble:.3f}, 1F1B's is (p-1)/(m+p-1) = {theory_bubble('1f1b', p, m):.3f}"


def _train_job(rank, world_size, m):
    orders = load_impl("pipeline_schedules").one_f_one_b_order(world_size, m)
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
    results = launch(_train_job, world_size, m, show_output=False)
    modules = [_stage_module(i) for i in range(world_size)]
    out = _input(8)
    for mod in modules:
        out = mod(out)
    nn.functional.mse_loss(out, torch.ones(8, HIDDEN)).backward()
    for rank, (grads, _) in enumerate(results):
        for g, p in zip(grads, modules[rank].parameters()):
            assert torch.allclose(g, p.grad, atol=1e-6), f"rank {rank}: gradients differ from one process by {(g - p.grad).abs().max():.3g}"


# --------------------------------------------------------------------------------------------- 3.4

TEXTS = ["Four score and seven years ago", "We hold these truths to be self-evident",
         "A Fox one day fell into a deep well", "The Tortoise and the Hare"]


@functools.lru_cache(maxsize=None)
def _expected_ids(n):
    """Prompt + n greedy tokens of the unsplit model, per group (computed once for all tests)."""
    from helpers.tiny_llama import generate, load_model
    model = load_model()
    return [torch.cat([prompt, torch.tensor([generate(model, row, n) for row in prompt])], dim=1)
            for prompt in _prompt_groups()]


def _prompt_groups():
    from helpers.tiny_llama import encode
    # three groups: batch 2, batch 1, batch 2; different prompt lengths
    return [torch.tensor([encode(TEXTS[0][:10]), encode(TEXTS[1][:10])]), torch.tensor([encode(TEXTS[2][:14])]),
            torch.tensor([encode(TEXTS[3][:6]), encode(TEXTS[1][-6:])])]


def _decode_job(rank, world_size, stage_ranks, groups, n):
    from helpers.llama_stages import LlamaStage
    from helpers.tiny_llama import load_model
    dec = load_impl("pipelined_decoding")
    stage = LlamaStage(load_model(), stage_ranks.index(rank), len(stage_ranks))
    return dec.pipelined_generate(stage, stage_ranks, groups, n)


@pytest.mark.exercise("3.4", "pipelined greedy decoding, groups in flight")
@pytest.mark.parametrize("stage_ranks", [[0], [0, 1], [1, 0], [0, 1, 2, 3]])
def test_pipelined_generate(stage_ranks):
    groups, n = _prompt_groups(), 6
    results = launch(_decode_job, len(stage_ranks), stage_ranks, groups, n, show_output=False)
    got = results[stage_ranks[0]]
    for rank in stage_ranks[1:]:
        assert results[rank] is None, f"rank {rank} is not the first stage: return None"
    assert isinstance(got, list) and len(got) == len(groups), f"first stage: expected {len(groups)} tensors, got {got!r}"
    for g, (out, want) in enumerate(zip(got, _expected_ids(n))):
        assert out.shape == want.shape, f"group {g}: expected shape {tuple(want.shape)} (prompt + {n} tokens), got {tuple(out.shape)}"
        assert torch.equal(out, want), f"group {g}: expected ids {want.tolist()}, got {out.tolist()}"
