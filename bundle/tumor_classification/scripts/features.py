"""Radiomics features of a patient's tumour: an IBSI-named subset computed with numpy and scikit-image.

``pyradiomics`` does not build on current Python versions, so the study computes a documented subset of the
Image Biomarker Standardisation Initiative (IBSI, Zwanenburg et al., Radiology 2020) features itself. One
feature vector per **patient**: the tumour pixels of all its tumour slices are pooled (a per-patient stack of
2-D slices; the slices are too far apart for 3-D neighbourhoods).

Pre-processing, per slice (:func:`normalise_slice`): intensities are z-scored against the slice's
normal-appearing head region (``head & ~tumour``), so that images that were scaled differently per slice
(min-max normalised slices, fused images) become comparable across slices and patients.

Families (names follow the IBSI reference manual; ``i`` = discretised grey level 1..Ng):

- intensity statistics (first order) on the z-scored ROI values: mean, variance, skewness, (excess) kurtosis,
  median, minimum, 10th / 90th percentile, maximum, interquartile range, range, mean absolute deviation,
  robust mean absolute deviation (values between the 10th and 90th percentile), median absolute deviation,
  root mean square;
- intensity histogram on the discretised ROI (fixed bin number ``Ng``): entropy (log2), uniformity;
- grey-level co-occurrence matrix (GLCM, distance 1, angles 0/45/90/135 degrees, symmetric; the matrices of
  every angle and every slice are **merged** into one before the features are computed, the IBSI "2.5-D
  merged" aggregation; only pixel pairs with both pixels in the ROI count): joint maximum, joint average, joint
  variance, joint entropy (log2), difference average (= dissimilarity), contrast, inverse difference, inverse
  difference moment (= scikit-image's homogeneity), angular second moment, correlation;
- whole-slice features (:func:`whole_slice_features`, no tumour mask: for the slice-level tumour task, where the
  mask would give the answer away): the intensity, histogram and GLCM features above inside the head region,
  z-scored against the patient's head over all its slices (label-free, per patient), plus the fraction of
  head pixels above 2 and 3 SD and the left-right
  asymmetry (absolute difference between the two halves of the head, split at its centroid) of the mean, the
  95th percentile and the fraction above 2 SD;
- morphology (2-D analogues computed from the mask alone, hence **identical in every arm**): number of tumour
  slices, total and largest ROI area (pixels of the working grid), and on the largest slice (scikit-image
  ``regionprops`` of the whole mask): perimeter, compactness ``4 pi A / P^2``, eccentricity, solidity, extent,
  major and minor axis length, number of connected components.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage
from scipy.stats import kurtosis, skew
from skimage.feature import graycomatrix, graycoprops
from skimage.measure import label, regionprops

__all__ = [
    "FIRST_ORDER",
    "GLCM",
    "HISTOGRAM",
    "SHAPE",
    "discretise",
    "first_order_features",
    "glcm_features",
    "head_mask",
    "histogram_features",
    "normalise_slice",
    "patient_features",
    "shape_features",
    "whole_slice_features",
]

FIRST_ORDER = (
    "mean", "variance", "skewness", "kurtosis", "median", "minimum", "p10", "p90", "maximum",
    "interquartile_range", "range", "mean_absolute_deviation", "robust_mean_absolute_deviation",
    "median_absolute_deviation", "root_mean_square",
)  # fmt: skip
HISTOGRAM = ("entropy", "uniformity")
GLCM = (
    "joint_maximum", "joint_average", "joint_variance", "joint_entropy", "difference_average", "contrast",
    "inverse_difference", "inverse_difference_moment", "angular_second_moment", "correlation",
)  # fmt: skip
SHAPE = (
    "n_slices", "total_area", "max_area", "perimeter", "compactness", "eccentricity", "solidity", "extent",
    "major_axis_length", "minor_axis_length", "n_components",
)  # fmt: skip
_ANGLES = (0.0, np.pi / 4, np.pi / 2, 3 * np.pi / 4)


def head_mask(pair: np.ndarray, threshold: float = 0.1) -> np.ndarray:
    """Head region of one slice from both sequences: ``(2, H, W)`` in [0, 1] -> ``(H, W)`` bool (the pixels
    where either sequence exceeds ``threshold``, holes filled). It depends on the input pair only, so it is the
    same in every arm."""
    return ndimage.binary_fill_holes(np.asarray(pair).max(axis=0) > threshold)


def normalise_slice(image: np.ndarray, roi: np.ndarray, head: np.ndarray, min_reference: int = 50) -> np.ndarray:
    """``image`` z-scored against the normal-appearing head (``head & ~roi``; the whole head when that has fewer
    than ``min_reference`` pixels, the whole slice when the head is empty too). ``(H, W)`` -> ``(H, W)``."""
    image = np.asarray(image, dtype=np.float64)
    ref = head & ~roi
    if ref.sum() < min_reference:
        ref = head if head.sum() >= min_reference else np.ones_like(head, dtype=bool)
    v = image[ref]
    sd = float(v.std())
    return (image - float(v.mean())) / (sd if sd > 1e-8 else 1.0)


def first_order_features(values: np.ndarray) -> dict[str, float]:
    """IBSI intensity statistics of the ROI values ``(N,)`` (population moments, as IBSI defines them)."""
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size == 0:
        return dict.fromkeys(FIRST_ORDER, math.nan)
    p10, p25, med, p75, p90 = np.percentile(x, [10, 25, 50, 75, 90])
    mid = x[(x >= p10) & (x <= p90)]
    const = bool(np.ptp(x) == 0)
    return {
        "mean": float(x.mean()),
        "variance": float(x.var()),
        "skewness": 0.0 if const else float(skew(x)),
        "kurtosis": 0.0 if const else float(kurtosis(x)),  # excess kurtosis (Fisher), as IBSI
        "median": float(med),
        "minimum": float(x.min()),
        "p10": float(p10),
        "p90": float(p90),
        "maximum": float(x.max()),
        "interquartile_range": float(p75 - p25),
        "range": float(x.max() - x.min()),
        "mean_absolute_deviation": float(np.abs(x - x.mean()).mean()),
        "robust_mean_absolute_deviation": float(np.abs(mid - mid.mean()).mean()),
        "median_absolute_deviation": float(np.abs(x - med).mean()),
        "root_mean_square": float(np.sqrt(np.mean(x**2))),
    }


def discretise(values: np.ndarray, lo: float, hi: float, n_bins: int) -> np.ndarray:
    """IBSI fixed-bin-number discretisation: ``floor(Ng (x - lo) / (hi - lo)) + 1``, clipped to ``1..Ng``
    (every value is level 1 when ``hi == lo``). Same shape as ``values``, int64."""
    x = np.asarray(values, dtype=np.float64)
    if hi <= lo:
        return np.ones(x.shape, dtype=np.int64)
    return np.clip(np.floor(n_bins * (x - lo) / (hi - lo)).astype(np.int64) + 1, 1, n_bins)


def histogram_features(levels: np.ndarray, n_bins: int) -> dict[str, float]:
    """IBSI intensity-histogram entropy (log2) and uniformity of discretised ROI levels ``(N,)`` in ``1..Ng``."""
    lv = np.asarray(levels).ravel()
    if lv.size == 0:
        return dict.fromkeys(HISTOGRAM, math.nan)
    p = np.bincount(lv, minlength=n_bins + 1)[1:] / lv.size
    nz = p[p > 0]
    return {"entropy": float(-(nz * np.log2(nz)).sum()), "uniformity": float((p**2).sum())}


def glcm_matrix(level_images: Sequence[np.ndarray], rois: Sequence[np.ndarray], n_bins: int) -> np.ndarray:
    """Merged GLCM ``(Ng, Ng)`` (counts, symmetric) of several slices: distance 1, four angles, pairs with both
    pixels inside the ROI. ``level_images[k]`` holds levels ``1..Ng`` (values outside ``rois[k]`` are ignored)."""
    total = np.zeros((n_bins, n_bins), dtype=np.float64)
    for lv, roi in zip(level_images, rois):
        img = np.where(roi, lv, 0).astype(np.uint16)  # level 0 = outside the ROI, dropped below
        m = graycomatrix(img, distances=[1], angles=list(_ANGLES), levels=n_bins + 1, symmetric=True)
        total += m[1:, 1:, 0, :].sum(axis=-1)
    return total


def glcm_features(matrix: np.ndarray) -> dict[str, float]:
    """IBSI GLCM features of one (merged) co-occurrence matrix ``(Ng, Ng)``; levels are 1-based as in IBSI."""
    m = np.asarray(matrix, dtype=np.float64)
    if m.sum() <= 0:
        return dict.fromkeys(GLCM, math.nan)
    p = m / m.sum()
    ng = p.shape[0]
    i, j = np.meshgrid(np.arange(1, ng + 1), np.arange(1, ng + 1), indexing="ij")
    mu = float((i * p).sum())
    var = float(((i - mu) ** 2 * p).sum())
    nz = p[p > 0]
    p4 = p[:, :, None, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = float(graycoprops(p4, "correlation")[0, 0]) if var > 0 else 1.0
    return {
        "joint_maximum": float(p.max()),
        "joint_average": mu,
        "joint_variance": var,
        "joint_entropy": float(-(nz * np.log2(nz)).sum()),
        "difference_average": float(graycoprops(p4, "dissimilarity")[0, 0]),
        "contrast": float(graycoprops(p4, "contrast")[0, 0]),
        "inverse_difference": float((p / (1.0 + np.abs(i - j))).sum()),
        "inverse_difference_moment": float(graycoprops(p4, "homogeneity")[0, 0]),
        "angular_second_moment": float(graycoprops(p4, "ASM")[0, 0]),
        "correlation": corr,
    }


def shape_features(masks: Sequence[np.ndarray]) -> dict[str, float]:
    """2-D morphology of a patient's tumour masks ``[(H, W) bool, ...]`` (only slices with tumour count)."""
    areas = [int(np.asarray(m).sum()) for m in masks]
    if not areas or max(areas) == 0:
        return dict.fromkeys(SHAPE, math.nan)
    big = np.asarray(masks[int(np.argmax(areas))], dtype=bool)
    props = regionprops(big.astype(np.uint8))[0]  # the whole mask as one region
    perim = float(props.perimeter)
    return {
        "n_slices": float(sum(a > 0 for a in areas)),
        "total_area": float(sum(areas)),
        "max_area": float(max(areas)),
        "perimeter": perim,
        "compactness": float(4 * np.pi * props.area / perim**2) if perim > 0 else 1.0,
        "eccentricity": float(props.eccentricity),
        "solidity": float(props.solidity),
        "extent": float(props.extent),
        "major_axis_length": float(props.axis_major_length),
        "minor_axis_length": float(props.axis_minor_length),
        "n_components": float(label(big).max()),
    }


def patient_features(
    images: np.ndarray,
    rois: np.ndarray,
    heads: np.ndarray,
    n_bins: int = 32,
    channel_names: Sequence[str] | None = None,
    with_shape: bool = True,
    normalise: bool = True,
) -> dict[str, float]:
    """Feature vector of one patient and one arm.

    Args:
        images: ``(S, C, H, W)`` the arm's images of the patient's tumour slices (C = 1, or 2 for a two-channel
            arm: the intensity and texture features are computed per channel, prefixed with the channel name).
        rois: ``(S, H, W)`` bool tumour masks.
        heads: ``(S, H, W)`` bool head masks (:func:`head_mask`).
        n_bins: grey levels ``Ng`` of the fixed-bin-number discretisation (over the patient's pooled ROI range).
        channel_names: prefixes of the channels (default ``c0``, ``c1``; a single channel gets no prefix).
        with_shape: add the morphology features (``shape_*``).
        normalise: z-score each slice (:func:`normalise_slice`); ``False`` = the images are already normalised.

    Returns:
        ``{"firstorder_mean": ..., "glcm_contrast": ..., "shape_max_area": ...}`` (NaN where undefined).
    """
    images = np.asarray(images, dtype=np.float64)
    rois = np.asarray(rois, dtype=bool)
    heads = np.asarray(heads, dtype=bool)
    if images.ndim != 4 or images.shape[0] != rois.shape[0] or images.shape[2:] != rois.shape[1:]:
        raise ValueError(f"images must be (S, C, H, W) matching rois (S, H, W); got {images.shape} and {rois.shape}")
    n_ch = images.shape[1]
    names = list(channel_names) if channel_names is not None else [f"c{c}" for c in range(n_ch)]
    out: dict[str, float] = {}
    for c in range(n_ch):
        prefix = "" if n_ch == 1 else f"{names[c]}_"
        z = [
            normalise_slice(images[s, c], rois[s], heads[s]) if normalise else images[s, c]
            for s in range(images.shape[0])
        ]
        values = np.concatenate([zs[r] for zs, r in zip(z, rois)]) if len(z) else np.zeros(0)
        out.update({f"{prefix}firstorder_{k}": v for k, v in first_order_features(values).items()})
        if values.size:
            lo, hi = float(values.min()), float(values.max())
            levels = [discretise(zs, lo, hi, n_bins) for zs in z]
            roi_levels = np.concatenate([lv[r] for lv, r in zip(levels, rois)])
            out.update({f"{prefix}histogram_{k}": v for k, v in histogram_features(roi_levels, n_bins).items()})
            out.update({f"{prefix}glcm_{k}": v for k, v in glcm_features(glcm_matrix(levels, rois, n_bins)).items()})
        else:
            out.update({f"{prefix}histogram_{k}": math.nan for k in HISTOGRAM})
            out.update({f"{prefix}glcm_{k}": math.nan for k in GLCM})
    if with_shape:
        out.update({f"shape_{k}": v for k, v in shape_features(list(rois)).items()})
    return out


def whole_slice_features(
    images: np.ndarray,
    head: np.ndarray,
    n_bins: int = 32,
    channel_names: Sequence[str] | None = None,
    reference: Sequence[tuple[float, float]] | None = None,
) -> dict[str, float]:
    """Features of one whole slice without any tumour mask (:func:`patient_features` inside the head, plus
    hyperintensity fractions and left-right asymmetry).

    Args:
        images: ``(C, H, W)``.
        head: ``(H, W)`` bool head mask.
        reference: per channel ``(mean, sd)`` to z-score with (e.g. the patient's head over all its slices);
            ``None`` = the slice's own head.
    """
    images = np.asarray(images, dtype=np.float64)
    head = np.asarray(head, dtype=bool)
    if not head.any():
        head = np.ones_like(head)
    n_ch = images.shape[0]
    if reference is None:
        z = np.stack([normalise_slice(images[c], np.zeros_like(head), head) for c in range(n_ch)])
    else:
        z = np.stack([(images[c] - m) / (sd if sd > 1e-8 else 1.0) for c, (m, sd) in enumerate(reference)])
    out = patient_features(z[None], head[None], head[None], n_bins, channel_names, with_shape=False, normalise=False)
    cols = np.nonzero(head)[1]
    split = int(round(cols.mean()))
    left, right = head.copy(), head.copy()
    left[:, split:] = False
    right[:, :split] = False
    names = list(channel_names) if channel_names is not None else [f"c{c}" for c in range(n_ch)]
    for c in range(n_ch):
        prefix = "" if n_ch == 1 else f"{names[c]}_"
        out[f"{prefix}head_fraction_above_2sd"] = float((z[c][head] > 2).mean())
        out[f"{prefix}head_fraction_above_3sd"] = float((z[c][head] > 3).mean())
        halves = [z[c][m] if m.any() else np.zeros(1) for m in (left, right)]
        out[f"{prefix}asymmetry_mean"] = float(abs(halves[0].mean() - halves[1].mean()))
        out[f"{prefix}asymmetry_p95"] = float(abs(np.percentile(halves[0], 95) - np.percentile(halves[1], 95)))
        out[f"{prefix}asymmetry_above_2sd"] = float(abs((halves[0] > 2).mean() - (halves[1] > 2).mean()))
    return out
