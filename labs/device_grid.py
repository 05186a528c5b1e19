"""Chapter 5 — the process grid of hybrid parallelism: every rank is a point (dp, pp, tp) of a 3-D grid.

Ranks are laid out with tp fastest, then pp, then dp (row-major over the shape (dp, pp, tp), the order
`init_device_mesh("cpu", (dp, pp, tp), mesh_dim_names=("dp", "pp", "tp"))` uses):

    rank = (dp_idx · pp + pp_idx) · tp + tp_idx

so the tp ranks of one group are consecutive — on the same node, where NVLink is. A *group* of one kind
is the set of ranks that differ only in that coordinate: a tp group shares (dp_idx, pp_idx), a pp group
(dp_idx, tp_idx), a dp group (pp_idx, tp_idx).

Exercise 5.1 is `grid_coordinates`, `group_ranks` and `build_groups`.
"""
from __future__ import annotations

import torch.distributed as dist

# Given (helpers/course/process_grid.py): the grid's kinds, this rank's GridGroups, the shape check,
# grid_rank (the inverse of exercise 5.1's grid_coordinates) and the same grid as a DeviceMesh.
from helpers.course.process_grid import KINDS, GridGroups, build_mesh, check_shape, grid_rank  # noqa: F401


def grid_coordinates(rank: int, dp: int, pp: int, tp: int) -> tuple[int, int, int]:
    """Exercise 5.1 — (dp_idx, pp_idx, tp_idx) of global `rank` in a dp × pp × tp grid, tp fastest.
    Raises ValueError if rank is not in 0..dp·pp·tp-1.

    grid_coordinates(5, 2, 2, 2) -> (1, 0, 1)
    """
    raise NotImplementedError("Exercise 5.1: grid_coordinates is not written yet (labs/device_grid.py)")


def group_ranks(dp: int, pp: int, tp: int) -> dict[str, list[list[int]]]:
    """Exercise 5.1 — every group of the grid, per kind: {"dp": [...], "pp": [...], "tp": [...]}.

    Each group is a list of global ranks that differ only in that kind's coordinate, sorted by it; the
    groups of a kind are listed in increasing order of their smallest rank. For (dp, pp, tp) = (2, 2, 2):
      tp: [[0, 1], [2, 3], [4, 5], [6, 7]]   pp: [[0, 2], [1, 3], [4, 6], [5, 7]]   dp: [[0, 4], [1, 5], [2, 6], [3, 7]]
    """
    raise NotImplementedError("Exercise 5.1: group_ranks is not written yet (labs/device_grid.py)")


def build_groups(dp: int, pp: int, tp: int) -> GridGroups:
    """Exercise 5.1 — create the grid's process groups with dist.new_group and return this rank's.

    Every rank must call dist.new_group for EVERY group of every kind, in the same order (new_group is
    collective over the whole world, even for ranks not in the group), keeping the ones it belongs to.
    The world size must be dp·pp·tp (ValueError otherwise).
    """
    raise NotImplementedError("Exercise 5.1: build_groups is not written yet (labs/device_grid.py)")
