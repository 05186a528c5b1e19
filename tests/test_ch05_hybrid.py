"""Graders for chapter 5 (labs/device_grid.py, labs/hybrid.py)."""
import itertools

import pytest
import torch
import torch.distributed as dist

from helpers import launch, load_impl

SHAPES = [(1, 1, 1), (2, 1, 1), (1, 1, 4), (2, 2, 2), (3, 2, 2), (2, 3, 1), (1, 2, 4), (4, 2, 3)]


def _expected_groups(dp, pp, tp):
    grid = torch.arange(dp * pp * tp).reshape(dp, pp, tp)      # tp fastest
    def along(axis):
        moved = grid.movedim(axis, -1).reshape(-1, grid.shape[axis])
        return sorted(row.tolist() for row in moved)
    return {"dp": along(0), "pp": along(1), "tp": along(2)}


@pytest.mark.exercise("5.1", "Rank <-> grid coordinates and the groups of a DP×PP×TP grid")
@pytest.mark.parametrize("shape", SHAPES)
def test_grid_coordinates_and_group_ranks(shape):
    grid = load_impl("device_grid")
    dp, pp, tp = shape
    seen = set()
    for rank in range(dp * pp * tp):
        coords = tuple(grid.grid_coordinates(rank, dp, pp, tp))
        d, p, t = coords
        assert (d * pp + p) * tp + t == rank, \
            f"{shape}: rank {rank} -> {coords}; with tp fastest, then pp, then dp, rank = (dp_idx·pp + pp_idx)·tp + tp_idx"
        seen.add(coords)
    assert seen == set(itertools.product(range(dp), range(pp), range(tp)))
    with pytest.raises(ValueError):
        grid.grid_coordinates(dp * pp * tp, dp, pp, tp)
    got = grid.group_ranks(dp, pp, tp)
    expected = _expected_groups(dp, pp, tp)
    for kind in ("dp", "pp", "tp"):
        assert [list(g) for g in got[kind]] == expected[kind], f"{shape}: {kind} groups should be {expected[kind]}, got {got[kind]}"


def _groups_job(rank, world_size, shape):
    from torch.distributed.device_mesh import init_device_mesh
    grid_mod = load_impl("device_grid")
    grid = grid_mod.build_groups(*shape)
    out = {"coords": tuple(grid.coords)}
    mesh = init_device_mesh("cpu", shape, mesh_dim_names=("dp", "pp", "tp"))
    for kind in ("dp", "pp", "tp"):
        t = torch.tensor([float(rank)])
        dist.all_reduce(t, group=grid.groups[kind])
        out[kind] = (list(grid.ranks[kind]), int(t.item()), dist.get_process_group_ranks(mesh.get_group(kind)))
    return out


@pytest.mark.exercise("5.1", "Rank <-> grid coordinates and the groups of a DP×PP×TP grid")
@pytest.mark.parametrize("shape", [(2, 1, 2), (1, 2, 2), (2, 2, 2)])
def test_build_groups(shape):
    results = launch(_groups_job, shape[0] * shape[1] * shape[2], shape, show_output=False)
    expected = _expected_groups(*shape)
    for rank, got in enumerate(results):
        for kind in ("dp", "pp", "tp"):
            mine = next(g for g in expected[kind] if rank in g)
            ranks, total, mesh_ranks = got[kind]
            assert ranks == mine, f"{shape}: rank {rank}'s {kind} group should be {mine}, got {ranks}"
            assert total == sum(mine), \
                f"{shape}: all_reduce of the rank ids in rank {rank}'s {kind} group gave {total}, expected {sum(mine)}"
            assert mesh_ranks == mine, f"{shape}: init_device_mesh's {kind} group of rank {rank} is {mesh_ranks}, yours {ranks}"


def _hybrid_job(rank, world_size, shape, prompts):
    from helpers.tiny_llama import load_model
    hybrid = load_impl("hybrid")
    stage, grid = hybrid.build_hybrid_stage(load_model(), *shape)
    return hybrid.hybrid_forward(stage, prompts)


@pytest.mark.exercise("5.2", "Hybrid TP×PP forward matching the full model")
@pytest.mark.parametrize("shape", [(1, 2, 2), (1, 4, 1), (2, 2, 1)])
def test_hybrid_forward_matches_full_model(shape):
    from helpers.tiny_llama import encode, load_model
    prompts = torch.tensor([encode("Four score and seven"), encode("The fox and the grape")[:20]])
    with torch.no_grad():
        expected = load_model()(prompts).logits
    results = launch(_hybrid_job, shape[0] * shape[1] * shape[2], shape, prompts, show_output=False)
    grid = load_impl("device_grid")
    for rank, got in enumerate(results):
        _, pp_idx, _ = grid.grid_coordinates(rank, *shape)
        if pp_idx == shape[1] - 1:
            assert isinstance(got, torch.Tensor) and got.shape == expected.shape, \
                f"{shape}: rank {rank} is on the last stage and should return logits {tuple(expected.shape)}, got {got!r}"
            err = (got - expected).abs().max().item()
            assert err < 1e-4, f"{shape}: rank {rank}'s logits differ from the full model's by {err:.2e}"
        else:
            assert got is None, f"{shape}: rank {rank} is on stage {pp_idx}, not the last: return None"
