import pytest
import torch

from scripts.networks.scan_orders import axis_order, inverse_orders, scan_orders


@pytest.mark.parametrize(
    "name,grid,k",
    [
        ("identity", (5, 3), 1),
        ("cross2d", (4, 6), 4),
        ("triplane", (2, 3, 4), 6),
        ("coronal", (3, 2, 5), 2),
        ("released3d_single", (2, 3, 4), 3),
        ("released3d_cross", (4, 3, 2), 8),
    ],
)
def test_orders_are_permutations_and_inverses_restore_the_grid(name, grid, k):
    orders = scan_orders(name, grid)
    n = torch.tensor(grid).prod().item()
    assert orders.shape == (k, n)
    assert all(torch.equal(o.sort().values, torch.arange(n)) for o in orders)
    tokens = torch.randn(n)
    for order, inv in zip(orders, inverse_orders(orders)):
        assert torch.equal(tokens[order][inv], tokens)


def test_cross2d_orders_by_hand():
    # grid 2 x 3, tokens 0..5 row-major: rows [0 1 2], [3 4 5]
    orders = scan_orders("cross2d", (2, 3)).tolist()
    assert orders == [[0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0], [0, 3, 1, 4, 2, 5], [5, 2, 4, 1, 3, 0]]


def test_triplane_matches_the_paper_figure_on_a_3x3x3_cube():
    # figure voxels are numbered 9a + 3b + c + 1; axial 1,2,3,...; sagittal 1,10,19,2,...; coronal 1,10,19,4,...
    orders = (scan_orders("triplane", (3, 3, 3)) + 1).tolist()
    assert orders[0][:4] == [1, 2, 3, 4]
    assert orders[2][:7] == [1, 10, 19, 2, 11, 20, 3]
    assert orders[4][:7] == [1, 10, 19, 4, 13, 22, 7]
    assert orders[1] == orders[0][::-1]


def test_axis_order_column_major():
    assert axis_order((2, 2), (1, 0)).tolist() == [0, 2, 1, 3]


def test_bad_grid_for_order_set_is_refused():
    with pytest.raises(ValueError, match="cross2d"):
        scan_orders("cross2d", (2, 2, 2))
    with pytest.raises(ValueError, match="unknown scan order"):
        scan_orders("spiral", (2, 2))


def test_released_3d_orders_follow_the_released_token_order():
    # released token order (h, w, z) = our (H, W, D) with D fastest; P3 swaps the two fastest axes
    grid = (2, 3, 4)
    single = scan_orders("released3d_single", grid)
    index = torch.arange(24).reshape(grid)
    assert torch.equal(single[0], index.permute(1, 2, 0).reshape(-1))
    assert torch.equal(single[1], single[0].flip(0))
    assert torch.equal(single[2], index.permute(1, 0, 2).reshape(-1))
