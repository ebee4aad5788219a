"""Scan orders: pure index maps from a token grid to 1-D sequences.

Tokens of a grid are stored in row-major order (last axis fastest). A scan order is a LongTensor
``order`` of shape (L,): position ``i`` of the scanned sequence holds token ``order[i]``. A set of K
orders is a (K, L) tensor; ``inverse_orders`` gives the maps that put each scanned output back into
row-major token order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["NUM_DIRECTIONS", "ORDER_SETS", "PLANE_AXES", "axis_order", "inverse_orders", "scan_orders"]


def axis_order(grid: Sequence[int], axes: Sequence[int]) -> torch.Tensor:
    """Raster order visiting the grid with ``axes`` from slowest to fastest, e.g. (1, 0) = column-major in 2D."""
    index = torch.arange(int(torch.tensor(grid).prod())).reshape(*grid)
    return index.permute(*axes).reshape(-1)


def _forward_reverse(orders: list[torch.Tensor]) -> list[torch.Tensor]:
    return [o for order in orders for o in (order, order.flip(0))]


def _identity(grid):
    return [axis_order(grid, range(len(grid)))]


def _cross_2d(grid):
    # row-major forward, row-major reverse, column-major forward, column-major reverse
    return _forward_reverse([axis_order(grid, (0, 1)), axis_order(grid, (1, 0))])


# the paper's tri-plane figure on a (D, H, W) token grid (its toy cube's axes a, b, c = D, H, W), slowest -> fastest
PLANE_AXES = {"axial": (0, 1, 2), "sagittal": (1, 2, 0), "coronal": (2, 1, 0)}


def _plane(name):
    return lambda grid: _forward_reverse([axis_order(grid, PLANE_AXES[name])])


def _triplane_3d(grid):
    # axial, sagittal and coronal raster orders, each forward and reverse
    return _forward_reverse([axis_order(grid, axes) for axes in PLANE_AXES.values()])


def _released_3d_single(grid):
    # the released single-modality 3D mixer ("3dd3"): its token order (h, w, z) is our (H, W, D);
    # P0 = (H, W, D) forward and reverse, P3 = (H, D, W) forward. (The released code adds the reverse
    # scan without re-aligning it; here every direction is re-aligned.)
    p0 = axis_order(grid, (1, 2, 0))
    return [p0, p0.flip(0), axis_order(grid, (1, 0, 2))]


def _released_3d_cross(grid):
    # the released cross-modal 3D mixer ("3dd3_fuse"): P0..P3 = (H, W, D), (W, H, D), (D, W, H), (H, D, W),
    # each forward and reverse
    return _forward_reverse([axis_order(grid, axes) for axes in ((1, 2, 0), (2, 1, 0), (0, 2, 1), (1, 0, 2))])


ORDER_SETS = {
    "identity": _identity,
    "cross2d": _cross_2d,
    "triplane": _triplane_3d,
    "axial": _plane("axial"),
    "sagittal": _plane("sagittal"),
    "coronal": _plane("coronal"),
    "released3d_single": _released_3d_single,
    "released3d_cross": _released_3d_cross,
}
NUM_DIRECTIONS = {
    "identity": 1,
    "cross2d": 4,
    "triplane": 6,
    "axial": 2,
    "sagittal": 2,
    "coronal": 2,
    "released3d_single": 3,
    "released3d_cross": 8,
}
GRID_DIMS = {name: 3 for name in NUM_DIRECTIONS if name not in ("identity", "cross2d")} | {"cross2d": 2}


def scan_orders(name: str, grid: Sequence[int]) -> torch.Tensor:
    """The (K, L) index maps of the order set ``name`` on a token grid."""
    if name not in ORDER_SETS:
        raise ValueError(f"unknown scan order set {name!r}; choose one of {sorted(ORDER_SETS)}")
    grid = tuple(int(g) for g in grid)
    if name in GRID_DIMS and len(grid) != GRID_DIMS[name]:
        raise ValueError(f"scan order {name!r} needs a {GRID_DIMS[name]}-D token grid, got {grid}")
    return torch.stack(ORDER_SETS[name](grid))


def inverse_orders(orders: torch.Tensor) -> torch.Tensor:
    """Inverse permutations, row by row: ``seq[..., inv[k]]`` restores row-major token order."""
    return torch.argsort(orders, dim=-1)
