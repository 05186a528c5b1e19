"""Chapter 5's given bookkeeping for the (dp, pp, tp) process grid; exercise 5.1 (labs/device_grid.py) builds on it.

Ranks are laid out with tp fastest, then pp, then dp: rank = (dp_idx · pp + pp_idx) · tp + tp_idx, the order
`init_device_mesh("cpu", (dp, pp, tp), mesh_dim_names=("dp", "pp", "tp"))` uses.
"""
from __future__ import annotations

from dataclasses import dataclass, field

KINDS = ("dp", "pp", "tp")


@dataclass
class GridGroups:
    """This rank's place in a (dp, pp, tp) grid: its coordinates, and per kind its group and the group's
    global ranks (in order of that coordinate)."""
    shape: tuple[int, int, int]
    coords: tuple[int, int, int]
    groups: dict = field(default_factory=dict)    # kind -> ProcessGroup
    ranks: dict = field(default_factory=dict)     # kind -> list of global ranks


def check_shape(dp: int, pp: int, tp: int) -> None:
    """ValueError unless every degree of the grid is a whole number >= 1."""
    for name, size in zip(KINDS, (dp, pp, tp)):
        if not (isinstance(size, int) and size >= 1):
            raise ValueError(f"{name}={size!r}: every degree of the grid must be a whole number >= 1")


def grid_rank(dp_idx: int, pp_idx: int, tp_idx: int, dp: int, pp: int, tp: int) -> int:
    """The global rank at coordinates (dp_idx, pp_idx, tp_idx): the inverse of grid_coordinates."""
    return (dp_idx * pp + pp_idx) * tp + tp_idx


def build_mesh(dp: int, pp: int, tp: int, device_type: str = "cpu"):
    """The same grid with PyTorch's DeviceMesh: mesh.get_group("tp") etc. are this rank's groups."""
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh(device_type, (dp, pp, tp), mesh_dim_names=KINDS)
