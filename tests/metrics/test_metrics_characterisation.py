"""The ``characterisation`` profile: copy shares, distance to the max rule and edge overshoot, by hand."""

from __future__ import annotations

import numpy as np
import pytest

from scripts.metrics import compute_metrics, edge_overshoot_fraction, gradient_magnitude
from scripts.metrics.characterisation import foreground, max_copy_fraction, mean_abs_to_max, source_copy_fraction


def _images() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """2 x 4 grey-level images: column 0 is background (both sources <= 10)."""
    a = np.array([[0.0, 100, 50, 200], [10, 100, 50, 200]])
    b = np.array([[5.0, 60, 80, 20], [0, 60, 80, 20]])
    f = np.array([[3.0, 100, 80, 150], [7, 60, 65, 200]])
    return f, a, b


def test_copy_shares_and_distance_to_max_by_hand() -> None:
    f, a, b = _images()
    assert foreground(a, b).tolist() == [[False, True, True, True], [False, True, True, True]]
    # foreground pixels: (100 = A, max) (80 = B, max) (150: neither) | (60 = B) (65: neither) (200 = A, max)
    assert source_copy_fraction(f, a, b) == pytest.approx(4 / 6)
    assert max_copy_fraction(f, a, b) == pytest.approx(3 / 6)
    # |F - max|: 0, 0, 50, 40, 15, 0
    assert mean_abs_to_max(f, a, b) == pytest.approx(105 / 6)


def test_gradient_magnitude_of_a_unit_ramp_is_one() -> None:
    ramp2 = np.tile(np.arange(6.0), (5, 1))
    assert np.allclose(gradient_magnitude(ramp2)[:, 1:-1], 1.0)
    ramp3 = np.broadcast_to(np.arange(6.0), (4, 5, 6)).copy()
    assert np.allclose(gradient_magnitude(ramp3)[..., 1:-1], 1.0)
    diagonal = np.add.outer(np.arange(6.0), np.arange(6.0))  # slope 1 along both axes: |grad| = sqrt(2)
    assert np.allclose(gradient_magnitude(diagonal)[1:-1, 1:-1], np.sqrt(2.0))


def test_edge_overshoot_counts_edges_stronger_than_both_sources() -> None:
    flat = np.full((6, 8), 100.0)
    step = flat.copy()
    step[:, 4:] = 200.0  # a switch where neither source has an edge: |grad| = 50 on columns 3 and 4
    assert edge_overshoot_fraction(step, flat, flat) == pytest.approx(2 / 8)
    small = flat.copy()
    small[:, 4:] = 106.0  # |grad| = 3, within the 4-level margin
    assert edge_overshoot_fraction(small, flat, flat) == 0.0
    # the same step present in a source is not an overshoot
    assert edge_overshoot_fraction(step, step, flat) == 0.0


def test_profile_scores_on_the_8bit_scale() -> None:
    f, a, b = _images()
    scores = compute_metrics((f + 0.3) / 255.0, a / 255.0, b / 255.0, profile="characterisation")  # rounds back
    assert list(scores) == ["copy_source", "copy_max", "abs_to_max", "edge_overshoot"]
    assert scores["copy_source"] == pytest.approx(4 / 6) and scores["copy_max"] == pytest.approx(3 / 6)
    assert scores["abs_to_max"] == pytest.approx(105 / 6)
    mean = compute_metrics((a + b) / 510.0, a / 255.0, b / 255.0, profile="characterisation")
    assert mean["copy_source"] == 0.0 and mean["copy_max"] == 0.0  # no source value survives a blend here
