"""The comm tracer every byte count rests on: it sees every call form of torch.distributed, and traffic that
never calls a dist.* function (DDP's C++ reducer and buffer broadcasts, DTensor's functional collectives)."""
import torch
import torch.distributed as dist

from helpers import launch
from helpers.comm_trace import CommTracer


def _call_forms(rank, world_size):
    sub = dist.new_group([0, 1])
    t = torch.ones(4)
    with CommTracer() as trace:
        dist.all_reduce(tensor=t)                                  # keyword argument
        if rank < 2:
            dist.all_reduce(t, dist.ReduceOp.SUM, sub)             # group passed positionally
            if rank == 0:
                dist.send(t, 1, sub)                               # positional group, global dst
            else:
                dist.recv(t, group=sub, group_src=0)               # group-local source
        out = torch.zeros(4 * world_size)
        dist.all_gather_into_tensor(output_tensor=out, input_tensor=t)   # deprecated name: recorded once
        ops = [dist.P2POp(dist.isend, t, (rank + 1) % world_size),
               dist.P2POp(dist.irecv, torch.zeros(4), (rank - 1) % world_size)]
        for work in dist.batch_isend_irecv(ops):
            work.wait()
    return [(r.op, r.ranks, r.payload, r.peer, r.via) for r in trace.records]


def test_every_call_form_is_recorded_with_its_group_and_peer():
    results = launch(_call_forms, 3, show_output=False)
    assert results[0] == [
        ("all_reduce", (0, 1, 2), 16, None, "dist"),
        ("all_reduce", (0, 1), 16, None, "dist"),
        ("send", (0, 1), 16, 1, "dist"),
        ("all_gather_into_tensor", (0, 1, 2), 48, None, "dist"),
        ("isend", (0, 1, 2), 16, 1, "dist"),
        ("irecv", (0, 1, 2), 16, 2, "dist"),
    ]
    assert results[1][2] == ("recv", (0, 1), 16, 0, "dist")
    assert [r[0] for r in results[2]] == ["all_reduce", "all_gather_into_tensor", "isend", "irecv"]


def _ddp_traffic(rank, world_size):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8))
    with CommTracer() as construct:
        ddp = torch.nn.parallel.DistributedDataParallel(model)
    with CommTracer() as forward:
        with torch.no_grad():
            ddp(torch.randn(4, 8))
    with CommTracer() as backward:
        ddp(torch.randn(4, 8)).sum().backward()
    return [[(r.op, r.payload, r.via) for r in t.records] for t in (construct, forward, backward)]


def test_ddp_broadcasts_and_bucket_all_reduce_are_seen():
    construct, forward, backward = launch(_ddp_traffic, 2, show_output=False)[0]
    params = (8 * 8 + 8 + 8 + 8) * 4               # Linear weight + bias, BatchNorm weight + bias (float32)
    buffers = (8 + 8) * 4 + 8                       # running mean + var (float32), num_batches_tracked (int64)
    # Construction checks parameter shapes across ranks (an all_gather of metadata), then broadcasts rank 0's
    # parameters and buffers (coalesced per dtype), plus a small metadata broadcast.
    assert construct[0][0] == "all_gather"
    assert sum(p for op, p, via in construct if op == "broadcast") >= params + buffers
    assert all(via == "c10d" for _, _, via in construct)
    assert [(op, p) for op, p, _ in forward] and all(op == "broadcast" for op, _, _ in forward)
    assert sum(p for _, p, _ in forward) == buffers                # DDP re-broadcasts buffers before a forward
    reduced = [p for op, p, _ in backward if op == "all_reduce"]
    assert sum(reduced) == params                                    # every gradient, in bucket all-reduces


def _dtensor_traffic(rank, world_size):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    mesh = init_device_mesh("cpu", (world_size,))
    shard = distribute_tensor(torch.ones(4, 6), mesh, [Shard(0)])
    with CommTracer() as trace:
        shard.full_tensor()
    return [(r.op, r.ranks, r.payload, r.via) for r in trace.records]


def test_dtensor_functional_collectives_are_seen():
    records = launch(_dtensor_traffic, 2, show_output=False)[0]
    assert records == [("all_gather_into_tensor", (0, 1), 4 * 6 * 4, "c10d")]
