"""Chapter 8's given code (helpers/course/moe.py, sequence_parallel.py) on configurations the notebook never
uses: blocks in float64 and bfloat16 (the wrappers must take the wrapped block's dtype), and the EP dispatch
variants of section A4 against the single-process block."""
import pytest
import torch

from helpers import launch
from helpers.claims import max_abs_diff, tolerance
from helpers.course.moe import (AllGatherReduceScatterMoE, LowLatencyMoE, MoEBlock, PerRankAllToAllMoE, Routing,
                                TensorParallelMoE)
from helpers.course.sequence_parallel import NormMLP, ParallelNormMLP


def mixtral_route(logits, top_k):
    """Dropless Mixtral routing written here (the test must not depend on exercise 8.1)."""
    weights, ids = torch.softmax(logits.float(), -1).topk(top_k, -1)
    return Routing(ids, weights / weights.sum(-1, keepdim=True), torch.ones_like(ids, dtype=torch.bool))


def _dtype_job(rank, world_size, dtype):
    torch.manual_seed(0)
    block, full = MoEBlock(16, 32, 4, 2).to(dtype), NormMLP(16, 32).to(dtype)
    x = torch.randn(6, 16, dtype=dtype)
    with torch.no_grad():
        routing = mixtral_route(block.router(x), 2)
        moe = TensorParallelMoE(block)(x, routing)
        sp = ParallelNormMLP(full)(x)
        return moe, block(x, routing), sp, full(x)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_tensor_parallel_wrappers_keep_the_block_dtype(dtype):
    moe, moe_want, sp, sp_want = launch(_dtype_job, 2, dtype, show_output=False)[0]
    assert moe.dtype == sp.dtype == dtype
    # a reordered sum over ffn=32 and two experts: 64 eps of the block's dtype covers it
    assert max_abs_diff(moe, moe_want) <= tolerance(moe_want, dtype, 64)
    assert max_abs_diff(sp, sp_want) <= tolerance(sp_want, dtype, 64)


def _variants_job(rank, world_size):
    torch.manual_seed(0)
    block = MoEBlock(16, 24, 2 * world_size, 2)
    torch.manual_seed(10 + rank)
    x = torch.randn(7, 16)
    with torch.no_grad():
        routing = mixtral_route(block.router(x), 2)
        want = block(x, routing)
        return [max_abs_diff(cls(block)(x, routing), want) <= tolerance(want, torch.float32, 64)
                for cls in (PerRankAllToAllMoE, AllGatherReduceScatterMoE, LowLatencyMoE)]


def test_dispatch_variants_equal_the_single_process_block():
    assert all(all(ok) for ok in launch(_variants_job, 3, show_output=False))


def _overlap_job(rank, world_size, overlap):
    import torch.distributed as dist
    from helpers.course.ring_attention import TransferOverlap
    a, peer = torch.randn(8, 4), (rank + 1) % world_size
    incoming = torch.empty(3)
    with TransferOverlap() as meter:
        if not overlap:
            a @ a.t()                                       # computed before anything is posted
        ops = [dist.P2POp(dist.isend, torch.ones(3), peer), dist.P2POp(dist.irecv, incoming, (rank - 1) % 2)]
        requests = dist.batch_isend_irecv(ops)
        if overlap:
            a @ a.t()                                       # computed while the transfer is in flight
        for r in requests:
            r.wait()
        a @ a.t()                                           # after the wait: never overlapped
    return meter.overlapped_flops, meter.total_flops


@pytest.mark.parametrize("overlap", [True, False])
def test_transfer_overlap_counts_only_work_between_post_and_wait(overlap):
    for overlapped, total in launch(_overlap_job, 2, overlap, show_output=False):
        assert total == 2 * 2 * 8 * 8 * 4
        assert overlapped == (total // 2 if overlap else 0)
