"""Scan orders: pure index maps from a token grid to 1-D sequences.

Tokens of a grid are stored in row-major order (last axis fastest). A scan order is a LongTensor
``order`` of shape (L,): position ``i`` of the scanned sequence holds token ``order[i]``. A set of K
orders is a (K, L) tensor; ``inverse_orders`` gives the maps that put each scanned output back into
row-major token order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["ORDER_SETS", "axis_order", "inverse_orders", "scan_orders"]


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


def _triplane_3d(grid):
    # the paper's tri-plane figure on a (D, H, W) grid: axial (D, H, W), sagittal (H, W, D), coronal (W, H, D),
    # each forward and reverse
    return _forward_reverse([axis_order(grid, (0, 1, 2)), axis_order(grid, (1, 2, 0)), axis_order(grid, (2, 1, 0))])


ORDER_SETS = {"identity": _identity, "cross2d": _cross_2d, "triplane": _triplane_3d}


def scan_orders(name: str, grid: Sequence[int]) -> torch.Tensor:
    """The (K, L) index maps of the order set ``name`` on a token grid."""
    if name not in ORDER_SETS:
        raise ValueError(f"unknown scan order set {name!r}; choose one of {sorted(ORDER_SETS)}")
    grid = tuple(int(g) for g in grid)
    if name == "cross2d" and len(grid) != 2:
        raise ValueError(f"scan order 'cross2d' needs a 2-D token grid, got {grid}")
    if name == "triplane" and len(grid) != 3:
        raise ValueError(f"scan order 'triplane' needs a 3-D token grid, got {grid}")
    return torch.stack(ORDER_SETS[name](grid))


def inverse_orders(orders: torch.Tensor) -> torch.Tensor:
    """Inverse permutations, row by row: ``seq[..., inv[k]]`` restores row-major token order."""
    return torch.argsort(orders, dim=-1)
