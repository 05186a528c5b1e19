"""Wrong answers to exercises 5.1 and 5.2 that a grader must catch, and right answers written another way
that it must accept. Not a test module: tests/graders/test_ch05_hybrid.py runs its checks on each of these.

Each variant is the reference answer (load_impl, COURSE_IMPL=solutions) with one thing changed. Most of the
wrong ones compute the RIGHT numbers the wrong way — that is what they are here for: a grader that only
compared logits would pass them.
"""
from __future__ import annotations

import types

import torch
import torch.distributed as dist

from helpers import load_impl
from helpers.course.llama_stages import LlamaStage

KINDS = ("dp", "pp", "tp")


class Variant:
    """The reference module `base` with some functions replaced. `check`: which grading check shows the
    mistake; `caught_by`: a regex of the failure message it must produce (a message that points at the bug)."""

    def __init__(self, base: str, doc: str, check: str | None = None, caught_by: str | None = None,
                 checks: tuple = (), **replaced):
        self.base, self.doc, self.check, self.caught_by, self.checks = base, doc, check, caught_by, checks
        self.__dict__.update(replaced)

    def __getattr__(self, name):        # anything not replaced: the reference answer
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(load_impl(self.__dict__["base"]), name)

    def __repr__(self):
        return f"<variant of {self.base}: {self.doc}>"


# ------------------------------------------------------------------------------------------- 5.1
def _pp_fastest(rank, dp, pp, tp):
    if not 0 <= rank < dp * pp * tp:
        raise ValueError(f"rank={rank} outside the grid")
    return rank // (pp * tp), rank % pp, (rank // pp) % tp


def _no_range_check(rank, dp, pp, tp):
    return rank // (pp * tp), (rank // tp) % pp, rank % tp


def _transposed_groups(dp, pp, tp):
    """A group of a kind = the ranks that SHARE that coordinate (the complement of the right meaning)."""
    grid = load_impl("device_grid")
    out = {}
    for axis, kind in enumerate(KINDS):
        groups = {}
        for rank in range(dp * pp * tp):
            groups.setdefault(grid.grid_coordinates(rank, dp, pp, tp)[axis], []).append(rank)
        out[kind] = sorted(groups.values())
    return out


def _world_group_for_every_kind(dp, pp, tp):
    """Right rank lists, but every group object is the world."""
    grid_mod = load_impl("device_grid")
    if dp * pp * tp != dist.get_world_size():
        raise ValueError("grid does not match the world size")
    me = dist.get_rank()
    grid = grid_mod.GridGroups((dp, pp, tp), grid_mod.grid_coordinates(me, dp, pp, tp))
    for kind, groups in grid_mod.group_ranks(dp, pp, tp).items():
        for ranks in groups:
            if me in ranks:
                grid.groups[kind], grid.ranks[kind] = dist.group.WORLD, ranks
    return grid


def _grid_size_unchecked(dp, pp, tp):
    grid_mod = load_impl("device_grid")
    me = dist.get_rank()
    grid = grid_mod.GridGroups((dp, pp, tp), grid_mod.grid_coordinates(me, dp, pp, tp))
    for kind, groups in grid_mod.group_ranks(dp, pp, tp).items():
        for ranks in groups:
            group = dist.new_group(ranks)
            if me in ranks:
                grid.groups[kind], grid.ranks[kind] = group, ranks
    return grid


def _mesh_build_groups(dp, pp, tp):
    """Valid: the groups of PyTorch's DeviceMesh instead of new_group."""
    from torch.distributed.device_mesh import init_device_mesh
    grid_mod = load_impl("device_grid")
    if dp * pp * tp != dist.get_world_size():
        raise ValueError(f"a {dp}x{pp}x{tp} grid needs {dp * pp * tp} ranks, not {dist.get_world_size()}")
    mesh = init_device_mesh("cpu", (dp, pp, tp), mesh_dim_names=KINDS)
    grid = grid_mod.GridGroups((dp, pp, tp), tuple(int(c) for c in mesh.get_coordinate()))
    for kind in KINDS:
        grid.groups[kind] = mesh.get_group(kind)
        grid.ranks[kind] = dist.get_process_group_ranks(grid.groups[kind])
    return grid


def _arange_coordinates(rank, dp, pp, tp):
    """Valid: look the rank up in a tensor of the grid."""
    if not 0 <= rank < dp * pp * tp:
        raise ValueError(f"rank={rank} outside the grid")
    where = (torch.arange(dp * pp * tp).reshape(dp, pp, tp) == rank).nonzero()[0]
    return tuple(int(i) for i in where)


def _arange_group_ranks(dp, pp, tp):
    """Valid: reshape, move the kind's axis last, read the rows."""
    grid = torch.arange(dp * pp * tp).reshape(dp, pp, tp)
    return {kind: sorted(grid.movedim(axis, -1).reshape(-1, grid.shape[axis]).tolist())
            for axis, kind in enumerate(KINDS)}


# ------------------------------------------------------------------------------------------- 5.2
def _stage(module, grid, group="pp"):
    pipeline = load_impl("pipeline_parallel")
    return pipeline.PipelineStage.from_ranks(module, grid.ranks["pp"],
                                             group=grid.groups["pp"] if group == "pp" else None)


def _no_tp_sharding(model, dp, pp, tp):
    """Every TP rank keeps the whole stage: right logits, no TP at all."""
    grid = load_impl("device_grid").build_groups(dp, pp, tp)
    return _stage(LlamaStage(model, grid.coords[1], pp), grid), grid


def _shard_after_cut(model, dp, pp, tp):
    """The stage is cut first: it keeps the unsharded embedding and LM head that shard_llama replaced."""
    grid = load_impl("device_grid").build_groups(dp, pp, tp)
    module = LlamaStage(model, grid.coords[1], pp)
    load_impl("tp_llama").shard_llama(model, group=grid.groups["tp"])
    return _stage(module, grid), grid


def _whole_model_on_last_stage(model, dp, pp, tp):
    """Skips the pipeline: the last stage keeps the whole (TP-sharded) model, the others nothing."""
    grid = load_impl("device_grid").build_groups(dp, pp, tp)
    load_impl("tp_llama").shard_llama(model, group=grid.groups["tp"])
    p = grid.coords[1]
    stage = types.SimpleNamespace(model=model if p == pp - 1 else None, grid=grid, is_first=p == 0,
                                  is_last=p == pp - 1)
    return stage, grid


@torch.no_grad()
def _whole_model_forward(stage, input_ids):
    """...and the first stage broadcasts the token ids over the pp group, for the last to run everything."""
    group, src = stage.grid.groups["pp"], stage.grid.ranks["pp"][0]
    shape = torch.tensor(list(input_ids.shape) if input_ids is not None else [0, 0])
    dist.broadcast(shape, src, group=group)
    ids = input_ids if input_ids is not None else torch.empty(tuple(shape.tolist()), dtype=torch.int64)
    dist.broadcast(ids, src, group=group)
    return stage.model(ids).logits if stage.is_last else None


_HIDDEN_MODELS = {}


def _stage_with_hidden_model(model, dp, pp, tp):
    """A proper-looking stage (right bytes in the stage object), with the whole sharded model kept aside."""
    stage, grid = load_impl("hybrid").build_hybrid_stage(model, dp, pp, tp)
    _HIDDEN_MODELS["model"] = model
    return stage, grid


@torch.no_grad()
def _first_stage_runs_everything(stage, input_ids):
    """...the first stage runs the whole model and sends the logits down the pipeline to the last."""
    from helpers.course.pipeline_runtime import recv_tensor, send_tensor, wait_all
    x = _HIDDEN_MODELS["model"](input_ids).logits if stage.is_first else recv_tensor(stage.prev_rank, stage.group)
    if stage.is_last:
        return x
    wait_all(send_tensor(x, stage.next_rank, stage.group))
    return None


def _forward_then_world_barrier(stage, input_ids):
    out = load_impl("hybrid").hybrid_forward(stage, input_ids)
    dist.barrier()          # "make sure everyone is done": couples every replica and stage
    return out


def _build_keeping_grid(model, dp, pp, tp):
    stage, grid = load_impl("hybrid").build_hybrid_stage(model, dp, pp, tp)
    stage.grid = grid
    return stage, grid


def _logits_on_tp_rank0_only(stage, input_ids):
    out = load_impl("hybrid").hybrid_forward(stage, input_ids)
    return out if stage.grid.coords[2] == 0 else None


def _tp_over_the_dp_group(model, dp, pp, tp):
    """Shards over the dp group: the 'TP' all-reduces add up the partial sums of two replicas' requests."""
    grid = load_impl("device_grid").build_groups(dp, pp, tp)
    load_impl("tp_llama").shard_llama(model, group=grid.groups["dp"])
    return _stage(LlamaStage(model, grid.coords[1], pp), grid), grid


def _mesh_build_hybrid_stage(model, dp, pp, tp):
    """Valid: the same stage on DeviceMesh groups."""
    grid = _mesh_build_groups(dp, pp, tp)
    load_impl("tp_llama").shard_llama(model, group=grid.groups["tp"])
    return _stage(LlamaStage(model, grid.coords[1], pp), grid), grid


def _world_group_pipeline(model, dp, pp, tp):
    """Valid: point-to-point in the world group (global ranks), not the pp group."""
    grid = load_impl("device_grid").build_groups(dp, pp, tp)
    load_impl("tp_llama").shard_llama(model, group=grid.groups["tp"])
    return _stage(LlamaStage(model, grid.coords[1], pp), grid, group=None), grid


MISTAKES = {
    "pp_fastest": Variant("device_grid", "coordinates with pp fastest", "coordinates", "tp fastest",
                          grid_coordinates=_pp_fastest),
    "no_range_check": Variant("device_grid", "no ValueError for a rank outside the grid", "coordinates",
                              "promises a ValueError", grid_coordinates=_no_range_check),
    "transposed_groups": Variant("device_grid", "a group = ranks sharing the coordinate", "group_ranks",
                                 "groups should be", group_ranks=_transposed_groups),
    "world_group_for_every_kind": Variant("device_grid", "right rank lists, world group objects", "build_groups",
                                          "group object is not the group", build_groups=_world_group_for_every_kind),
    "grid_size_unchecked": Variant("device_grid", "dp·pp·tp != world size not rejected", "grid_size",
                                   "(?i)ValueError on every rank",
                                   build_groups=_grid_size_unchecked),
    "no_tp_sharding": Variant("hybrid", "stage never sharded over its TP group", "hybrid", "parameter bytes",
                              build_hybrid_stage=_no_tp_sharding),
    "shard_after_cut": Variant("hybrid", "stage cut before sharding: whole embedding and LM head", "hybrid",
                               "parameter bytes", build_hybrid_stage=_shard_after_cut),
    "whole_model_on_last_stage": Variant("hybrid", "pipeline skipped: last stage runs the whole model", "hybrid",
                                         "parameter bytes", build_hybrid_stage=_whole_model_on_last_stage,
                                         hybrid_forward=_whole_model_forward),
    "logits_sent_from_first_stage": Variant("hybrid", "whole model on the first stage (kept outside the stage "
                                            "object), logits sent down the pipeline", "hybrid", "byte message",
                                            build_hybrid_stage=_stage_with_hidden_model,
                                            hybrid_forward=_first_stage_runs_everything),
    "world_barrier_after_forward": Variant("hybrid", "a world barrier after the forward", "hybrid",
                                           "outside its TP group", hybrid_forward=_forward_then_world_barrier),
    "logits_on_tp_rank0_only": Variant("hybrid", "only tp rank 0 of the last stage returns logits", "hybrid",
                                       "should return logits", build_hybrid_stage=_build_keeping_grid,
                                       hybrid_forward=_logits_on_tp_rank0_only),
    "tp_group_across_replicas": Variant("hybrid", "sharded over the dp group", "hybrid_dp",
                                        "outside its TP group|differ from the full model",
                                        build_hybrid_stage=_tp_over_the_dp_group),
}

VALID = {
    "device_mesh_groups": Variant("device_grid", "groups from init_device_mesh",
                                  checks=("build_groups", "grid_size", "hybrid"), build_groups=_mesh_build_groups,
                                  build_hybrid_stage=_mesh_build_hybrid_stage,
                                  hybrid_forward=lambda stage, ids: load_impl("hybrid").hybrid_forward(stage, ids)),
    "arange_group_ranks": Variant("device_grid", "coordinates and groups by reshaping torch.arange",
                                  checks=("coordinates", "group_ranks"), grid_coordinates=_arange_coordinates,
                                  group_ranks=_arange_group_ranks),
    "world_group_pipeline": Variant("hybrid", "pipeline point-to-point in the world group",
                                    checks=("hybrid",), build_hybrid_stage=_world_group_pipeline),
}
