"""Graders for chapter 0 (labs/warmup.py)."""
import pytest
import torch

from helpers import launch, load_impl


@pytest.mark.exercise("0.1", "sum_of_ranks with one all_reduce")
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_sum_of_ranks(world_size):
    warmup = load_impl("warmup")
    results = launch(warmup.sum_of_ranks, world_size, show_output=False)
    expected = world_size * (world_size - 1) // 2
    assert results == [expected] * world_size, f"world_size={world_size}: expected {expected} on every rank, got {results}"
    assert all(type(r) is int for r in results), f"return a Python int, got {[type(r).__name__ for r in results]}"


def _ring_job(rank, world_size, shape, dtype):
    warmup = load_impl("warmup")
    value = (torch.arange(torch.Size(shape).numel()) + 100 * rank).reshape(shape).to(dtype)
    return warmup.ring_pass(rank, world_size, value)


@pytest.mark.exercise("0.2", "ring_pass with isend/irecv")
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("shape,dtype", [((3,), torch.float32), ((2, 5), torch.int64)])
def test_ring_pass(world_size, shape, dtype):
    results = launch(_ring_job, world_size, shape, dtype, show_output=False)
    for rank, got in enumerate(results):
        left = (rank - 1) % world_size
        expected = (torch.arange(torch.Size(shape).numel()) + 100 * left).reshape(shape).to(dtype)
        assert isinstance(got, torch.Tensor) and got.dtype == dtype and got.shape == expected.shape, \
            f"rank {rank}: expected a {dtype} tensor of shape {tuple(shape)}, got {got!r}"
        assert torch.equal(got, expected), f"rank {rank} should hold rank {left}'s value {expected.tolist()}, got {got.tolist()}"
