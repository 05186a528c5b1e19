"""Graders for chapter 5 (labs/device_grid.py, labs/hybrid.py).

Each check is a function that takes the implementation under test (a module, or a planted variant from
tests/graders/planted_ch05.py) and raises AssertionError naming the case, what was expected, what came back and
where to look. The exercise tests run them on `load_impl(...)`; `test_planted_mistakes_are_caught` runs
them on wrong answers and asserts each is caught, and `test_valid_alternatives_pass` on other right ones.

What the graders catch (planted in tests/graders/planted_ch05.py):
  5.1  * coordinates in another order than tp fastest, then pp, then dp        (check_grid_coordinates)
       * no ValueError for a rank outside the grid                             (check_grid_coordinates)
       * group lists in another order or of the wrong ranks                    (check_group_ranks)
       * group objects that are not the listed ranks' groups (e.g. the world
         group for every kind): an all_reduce in "the tp group" sums the world  (check_build_groups)
       * a grid that does not match the world size accepted (docstring: ValueError, on every rank,
         before any group is created; otherwise some ranks raise and the others hang)   (check_grid_size_error)
  5.2  * a stage that never shards over its TP group (every TP rank holds the
         whole stage; no all-reduce in the TP group)                            (bytes, collectives)
       * sharding after cutting the stage: the embedding and LM head stay whole  (bytes)
       * skipping the pipeline: the first stage hands the tokens over and the
         last stage runs the whole model                                         (bytes, collectives)
       * replicas or stages synchronised with a collective outside the TP group
         (e.g. a world barrier after the forward): the dp replicas must never talk  (collectives)
       * point-to-point messages to anything but the neighbouring stage of the
         same dp replica, or a stage that never sends / receives                 (p2p peers)
       * the whole model run on one stage (kept outside the stage object), its
         logits sent down the pipeline instead of the hidden state               (p2p payload)
       * logits missing on a TP rank of the last stage, or wrong logits           (logits)
       * a grid that does not match the world size accepted                       (check_grid_size_error)
Valid alternatives that must pass: groups from `init_device_mesh` instead of `new_group`, group lists
computed by reshaping `torch.arange`, pipeline point-to-point in the world group instead of the pp group.
"""
import functools
import itertools

import pytest
import torch
import torch.distributed as dist
from torch import nn

from helpers import launch, load_impl
from helpers.claims import tolerance
from helpers.launch import JobTimeout, RankFailed
from helpers.course.memory import tensor_bytes
from tests.graders.planted import assert_caught, mistake

SHAPES = [(1, 1, 1), (2, 1, 1), (1, 1, 4), (2, 2, 2), (3, 2, 2), (2, 3, 1), (1, 2, 4), (4, 2, 3)]
P2P_OPS = ("send", "isend", "recv", "irecv")
REDUCTIONS = ("all_reduce", "reduce_scatter", "reduce_scatter_tensor", "reduce_scatter_single")


def expected_groups(dp, pp, tp):
    grid = torch.arange(dp * pp * tp).reshape(dp, pp, tp)      # tp fastest
    def along(axis):
        moved = grid.movedim(axis, -1).reshape(-1, grid.shape[axis])
        return sorted(row.tolist() for row in moved)
    return {"dp": along(0), "pp": along(1), "tp": along(2)}


def coords_of(rank, dp, pp, tp):
    return rank // (pp * tp), (rank // tp) % pp, rank % tp


# ------------------------------------------------------------------------------------------- 5.1 checks
def check_grid_coordinates(impl, shape):
    dp, pp, tp = shape
    seen = set()
    for rank in range(dp * pp * tp):
        coords = tuple(impl.grid_coordinates(rank, dp, pp, tp))
        assert coords == coords_of(rank, *shape), \
            f"grid {shape}: rank {rank} -> {coords}, expected {coords_of(rank, *shape)}. With tp fastest, then pp, " \
            f"then dp: rank = (dp_idx·pp + pp_idx)·tp + tp_idx (labs/device_grid.py, grid_coordinates)"
        seen.add(coords)
    assert seen == set(itertools.product(range(dp), range(pp), range(tp)))
    for outside in (dp * pp * tp, -1):
        try:
            got = impl.grid_coordinates(outside, dp, pp, tp)
        except ValueError:
            continue
        raise AssertionError(f"grid {shape}: grid_coordinates({outside}, ...) returned {got!r}; the docstring "
                             f"promises a ValueError for a rank outside 0..{dp * pp * tp - 1} (labs/device_grid.py)")


def check_group_ranks(impl, shape):
    got = impl.group_ranks(*shape)
    expected = expected_groups(*shape)
    for kind in ("dp", "pp", "tp"):
        assert [list(g) for g in got[kind]] == expected[kind], \
            f"grid {shape}: {kind} groups should be {expected[kind]}, got {got[kind]} (labs/device_grid.py, " \
            f"group_ranks: a {kind} group = ranks that differ only in the {kind} coordinate, sorted)"


def _groups_job(rank, world_size, impl, shape):
    from torch.distributed.device_mesh import init_device_mesh
    grid = impl.build_groups(*shape)
    out = {"coords": tuple(grid.coords)}
    mesh = init_device_mesh("cpu", shape, mesh_dim_names=("dp", "pp", "tp"))
    for kind in ("dp", "pp", "tp"):
        t = torch.tensor([float(rank)])
        dist.all_reduce(t, group=grid.groups[kind])
        out[kind] = (list(grid.ranks[kind]), int(t.item()), dist.get_process_group_ranks(mesh.get_group(kind)))
    return out


def check_build_groups(impl, shape):
    results = launch(_groups_job, shape[0] * shape[1] * shape[2], impl, shape, show_output=False)
    expected = expected_groups(*shape)
    for rank, got in enumerate(results):
        assert got["coords"] == coords_of(rank, *shape), \
            f"grid {shape}: rank {rank}'s grid.coords = {got['coords']}, expected {coords_of(rank, *shape)}"
        for kind in ("dp", "pp", "tp"):
            mine = next(g for g in expected[kind] if rank in g)
            ranks, total, mesh_ranks = got[kind]
            assert ranks == mine, f"grid {shape}: rank {rank}'s {kind} group should be {mine}, got {ranks}"
            assert total == sum(mine), \
                f"grid {shape}: an all_reduce of the rank ids in rank {rank}'s grid.groups[{kind!r}] gave {total}, " \
                f"expected {sum(mine)} (the sum over {mine}): the group object is not the group of those ranks " \
                f"(labs/device_grid.py, build_groups: keep the dist.new_group(ranks) of the group this rank is in)"
            assert mesh_ranks == mine, \
                f"grid {shape}: init_device_mesh's {kind} group of rank {rank} is {mesh_ranks}, yours {ranks}"


def _grid_size_job(rank, world_size, build, shape):
    try:
        build(*shape)
    except ValueError as err:
        return "ValueError", str(err)
    except Exception as err:  # noqa: BLE001 - reported to the parent, which names it
        return type(err).__name__, str(err)
    return "returned", None


def check_grid_size_error(build, world, shape, where):
    """`build(*shape)` on `world` ranks with dp·pp·tp != world must raise ValueError on every rank (and not hang
    the ranks that would otherwise go on creating groups)."""
    try:
        results = launch(_grid_size_job, world, build, shape, show_output=False, timeout=15)
    except (JobTimeout, RankFailed) as err:
        raise AssertionError(
            f"a {shape[0]}x{shape[1]}x{shape[2]} grid on {world} ranks: the job did not finish "
            f"({type(err).__name__}); {where} must raise ValueError on EVERY rank when dp·pp·tp != world size, "
            f"before creating any group (new_group waits for all ranks)") from None
    for rank, (kind, message) in enumerate(results):
        if kind == "NotImplementedError":
            raise NotImplementedError(message)       # an unfinished exercise, not a wrong one
        assert kind == "ValueError", \
            f"a {shape[0]}x{shape[1]}x{shape[2]} grid on {world} ranks: rank {rank} got {kind} {message or ''}; " \
            f"{where} must raise ValueError on every rank when dp·pp·tp != world size (docstring contract)"


# ------------------------------------------------------------------------------------------- 5.2 checks
def _held_parameters(obj, depth=0, seen=None):
    """Parameters reachable from `obj` (a stage object): nn.Modules in its attributes, lists, tuples, dicts."""
    seen = set() if seen is None else seen
    if id(obj) in seen or depth > 4:
        return []
    seen.add(id(obj))
    if isinstance(obj, nn.Module):
        return list(obj.parameters())
    if isinstance(obj, (list, tuple)):
        items = obj
    elif isinstance(obj, dict):
        items = obj.values()
    elif hasattr(obj, "__dict__") and not type(obj).__module__.startswith("torch"):
        items = vars(obj).values()
    else:
        return []
    return [p for item in items for p in _held_parameters(item, depth + 1, seen)]


@functools.lru_cache(maxsize=None)
def expected_stage_bytes(pp_idx, pp, tp):
    """Bytes of the parameters one rank of stage pp_idx should hold: every matrix of the stage split over
    tp (vocabulary, heads, MLP width), vectors (RMSNorm weights) replicated."""
    from helpers.course.llama_stages import LlamaStage
    from helpers.course.tiny_llama import load_model
    stage = LlamaStage(load_model(), pp_idx, pp)
    return sum(p.numel() * p.element_size() // (tp if p.dim() >= 2 else 1) for p in stage.parameters())


def _hybrid_job(rank, world_size, impl, shape, batches):
    from helpers.comm_trace import CommTracer
    from helpers.course.tiny_llama import load_model
    dp, pp, tp = shape
    d, p, _ = coords_of(rank, *shape)
    stage, grid = impl.build_hybrid_stage(load_model(), *shape)
    held = tensor_bytes(_held_parameters(stage))
    with CommTracer() as trace:       # the input is given to the first stage only: the others must receive it
        logits = impl.hybrid_forward(stage, batches[d] if p == 0 else None)
    records = [(r.op, tuple(r.ranks), getattr(r, "peer", None), r.payload) for r in trace.records]
    return logits, held, records


def check_hybrid(impl, shape):
    from helpers.course.tiny_llama import encode, load_model
    dp, pp, tp = shape
    world = dp * pp * tp
    batches = [torch.tensor([encode("Four score and seven"), encode("The fox and the grape")[:20]]),
               torch.tensor([encode("The tortoise and the"), encode("We hold these truths")])]
    with torch.no_grad():
        expected = [load_model()(b).logits for b in batches]
    results = launch(_hybrid_job, world, impl, shape, batches, show_output=False)
    config = load_model().config
    layers_per_stage = config.num_hidden_layers // pp
    hidden_bytes = batches[0].numel() * config.hidden_size * 4        # [batch, seq, hidden] float32
    for rank, (got, held, records) in enumerate(results):
        d, p, t = coords_of(rank, *shape)
        where = f"grid {shape}: rank {rank} (dp, pp, tp) = {(d, p, t)}"
        # logits: every TP rank of the last stage returns the whole replica's logits, the others None
        want = expected[d % len(batches)]
        if p == pp - 1:
            assert isinstance(got, torch.Tensor) and got.shape == want.shape, \
                f"{where} is on the last stage and should return logits {tuple(want.shape)}, got {got!r} " \
                f"(labs/hybrid.py, hybrid_forward: every TP rank of the last stage has the gathered logits)"
            err, tol = (got - want).abs().max().item(), tolerance(want)
            assert err <= tol, \
                f"{where}: logits differ from the full model's by {err:.2e} > {tol:.1e} (64 float32 eps × scale)"
        else:
            assert got is None, \
                f"{where} is on stage {p}, not the last: hybrid_forward should return None, got {type(got).__name__}"
        # who holds which bytes: about 1/(tp·pp) of the model, this stage's layers split over the TP group
        want_bytes = expected_stage_bytes(p, pp, tp)
        assert abs(held - want_bytes) <= 0.05 * want_bytes, \
            f"{where}: the stage holds {held:,d} parameter bytes, expected {want_bytes:,d} (stage {p}'s layers " \
            f"split over the {tp} ranks of its TP group; {held / want_bytes:.2f}x that). Shard the model over " \
            f"grid.groups['tp'] BEFORE cutting the stage, keep only this stage's layers, and keep no other copy " \
            f"of the model in the stage (labs/hybrid.py, build_hybrid_stage)"
        # collectives: only inside this rank's TP group; at least the two all-reduces of every layer when tp > 1
        tp_group = tuple(expected_groups(*shape)["tp"][rank // tp])
        collectives = [(op, ranks) for op, ranks, _, _ in records if op not in P2P_OPS]
        outside = [(op, list(ranks)) for op, ranks in collectives if ranks != tp_group]
        assert not outside, \
            f"{where}: collectives outside its TP group {list(tp_group)} during a forward: {outside}. Only the " \
            f"TP group runs collectives; stages talk point-to-point, and dp replicas never talk at inference " \
            f"(no barrier or broadcast over the world or the pp group in labs/hybrid.py)"
        reductions = sum(op in REDUCTIONS for op, _ in collectives)
        if tp > 1:
            assert reductions >= 2 * layers_per_stage, \
                f"{where}: {reductions} all-reduce(s) in its TP group {list(tp_group)}, expected at least " \
                f"{2 * layers_per_stage} (two per decoder layer of the stage): the stage is not sharded over its " \
                f"TP group (labs/hybrid.py: shard_llama(model, group=grid.groups['tp']))"
        # point-to-point: only with the neighbouring stages of the same replica; every boundary is crossed
        sent = [peer for op, _, peer, _ in records if op in ("send", "isend")]
        received = [peer for op, _, peer, _ in records if op in ("recv", "irecv")]
        for op, _, peer, payload in records:
            assert op not in ("send", "isend") or payload <= hidden_bytes + 1024, \
                f"{where} sent a {payload:,d}-byte message to rank {peer}; between stages flows the hidden state " \
                f"[batch, seq, hidden] = {hidden_bytes:,d} B (+ a small header). Is the stage sending something " \
                f"else, e.g. logits computed by a whole model on one stage? (labs/hybrid.py)"
        next_stage = {r for r in range(world) if coords_of(r, *shape)[:2] == (d, p + 1)}
        prev_stage = {r for r in range(world) if coords_of(r, *shape)[:2] == (d, p - 1)}
        assert set(sent) <= next_stage, \
            f"{where} sent to rank(s) {sorted(set(sent) - next_stage)}; a stage sends only to the next stage of " \
            f"its own dp replica {sorted(next_stage) or '(none: it is the last stage)'}"
        assert set(received) <= prev_stage, \
            f"{where} received from rank(s) {sorted(set(received) - prev_stage, key=str)}; a stage receives only " \
            f"from the previous stage of its own dp replica {sorted(prev_stage) or '(none: it is the first stage)'}"
        if p < pp - 1:
            assert sent, f"{where} sent nothing point-to-point to the next stage {sorted(next_stage)}: the " \
                         f"pipeline is skipped (hidden states must flow stage to stage)"
        if p > 0:
            assert received, f"{where} received nothing point-to-point from the previous stage {sorted(prev_stage)}: " \
                             f"the pipeline is skipped (its input must come from the previous stage)"


# ------------------------------------------------------------------------------------------- exercise tests
@pytest.mark.exercise("5.1", "Rank <-> grid coordinates and the groups of a DP×PP×TP grid")
@pytest.mark.parametrize("shape", SHAPES)
def test_grid_coordinates_and_group_ranks(shape):
    impl = load_impl("device_grid")
    check_grid_coordinates(impl, shape)
    check_group_ranks(impl, shape)


@pytest.mark.exercise("5.1", "Rank <-> grid coordinates and the groups of a DP×PP×TP grid")
@pytest.mark.parametrize("shape", [(2, 1, 2), (1, 2, 2), (2, 2, 2)])
def test_build_groups(shape):
    check_build_groups(load_impl("device_grid"), shape)


@pytest.mark.exercise("5.1", "Rank <-> grid coordinates and the groups of a DP×PP×TP grid")
@pytest.mark.parametrize("world, shape", [(2, (1, 1, 1)), (2, (2, 2, 1))])
def test_build_groups_rejects_a_grid_of_another_size(world, shape):
    check_grid_size_error(load_impl("device_grid").build_groups, world, shape, "build_groups (labs/device_grid.py)")


@pytest.mark.exercise("5.2", "Hybrid TP×PP forward matching the full model")
@pytest.mark.parametrize("shape", [(1, 2, 2), (2, 1, 2), (1, 4, 1), (2, 2, 1)])
def test_hybrid_forward_matches_full_model(shape):
    check_hybrid(load_impl("hybrid"), shape)


def _build_hybrid(*shape):
    from helpers.course.tiny_llama import load_model
    return load_impl("hybrid").build_hybrid_stage(load_model(), *shape)


@pytest.mark.exercise("5.2", "Hybrid TP×PP forward matching the full model")
def test_build_hybrid_stage_rejects_a_grid_of_another_size():
    check_grid_size_error(_build_hybrid, 2, (1, 1, 1), "build_hybrid_stage (labs/hybrid.py, via build_groups)")


# ------------------------------------------------------------------------------------------- planted mistakes
def _planted():
    pytest.importorskip("solutions.hybrid")       # the variants are the reference answers with one change
    from tests.graders import planted_ch05
    return planted_ch05


CHECKS = {
    "coordinates": lambda impl: check_grid_coordinates(impl, (2, 2, 2)),
    "group_ranks": lambda impl: check_group_ranks(impl, (2, 2, 2)),
    "build_groups": lambda impl: check_build_groups(impl, (2, 1, 2)),
    "grid_size": lambda impl: check_grid_size_error(impl.build_groups, 2, (1, 1, 1), "build_groups"),
    "hybrid": lambda impl: check_hybrid(impl, (1, 2, 2)),
    "hybrid_dp": lambda impl: check_hybrid(impl, (2, 1, 2)),
}


@pytest.mark.parametrize("name", ["pp_fastest", "no_range_check", "transposed_groups", "world_group_for_every_kind",
                                  "grid_size_unchecked", "no_tp_sharding", "shard_after_cut",
                                  "whole_model_on_last_stage", "logits_sent_from_first_stage",
                                  "world_barrier_after_forward",
                                  "logits_on_tp_rank0_only", "tp_group_across_replicas"])
def test_planted_mistakes_are_caught(name, monkeypatch):
    monkeypatch.setenv("COURSE_IMPL", "solutions")
    variant = _planted().MISTAKES[name]
    with pytest.raises(AssertionError) as caught:
        CHECKS[variant.check](variant)
    assert_caught(mistake("5", name, variant.doc, variant.caught_by), caught.value)


@pytest.mark.parametrize("name", ["device_mesh_groups", "arange_group_ranks", "world_group_pipeline"])
def test_valid_alternatives_pass(name, monkeypatch):
    monkeypatch.setenv("COURSE_IMPL", "solutions")
    variant = _planted().VALID[name]
    for check in variant.checks:
        CHECKS[check](variant)
