"""What the CNN sees: per-image intensity normalisation, square crops, and the training augmentation.

- :func:`normalise_in_head` — z-score of each channel over the slice's head region (background set to 0), so
  that the image's own brain is the reference whatever the scanner scaling or the per-slice min-max.
- :func:`square_box` / :func:`crop_square` — a square box around a mask's bounding box with a relative margin
  (and a minimum side), cut out with zero padding where it leaves the image and resized to ``size x size``.
- :func:`cnn_inputs` — every slice of an arm prepared for one task. The grade task (``"tumour"``) crops around
  the slice's FLAIR-abnormality mask: the mask is an input there, like the segmentation a radiomics pipeline
  starts from, and it does not carry the grade. The tumour-vs-none task (``"head"``) must never see the mask
  (it would give the answer away): it crops around the head region, which is computed from the input pair
  without labels (:func:`.features.head_mask`).
- :func:`build_augmentation` — a seeded MONAI ``Compose`` applied to each training image: flips, 90-degree
  rotations (``dihedral=True``: a tumour crop has no preferred orientation), a small affine and intensity
  scale / shift. Whole-head images keep their orientation (left-right flips only).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from monai.transforms import (
    Compose,
    NormalizeIntensity,
    RandAffine,
    RandFlip,
    RandRotate90,
    RandScaleIntensity,
    RandShiftIntensity,
    Resize,
)

__all__ = ["INPUT_MODES", "build_augmentation", "cnn_inputs", "crop_square", "normalise_in_head", "square_box"]

INPUT_MODES = ("tumour", "head")


def normalise_in_head(image: torch.Tensor, head: np.ndarray | torch.Tensor) -> torch.Tensor:
    """``(C, H, W)`` -> ``(C, H, W)``: each channel z-scored over the pixels of ``head`` (``(H, W)`` bool),
    0 outside it (MONAI ``NormalizeIntensity(nonzero=True, channel_wise=True)`` of the masked image)."""
    head_t = torch.as_tensor(np.asarray(head), dtype=torch.bool)
    if not bool(head_t.any()):
        head_t = torch.ones_like(head_t)
    masked = torch.as_tensor(image, dtype=torch.float32) * head_t
    return torch.as_tensor(NormalizeIntensity(nonzero=True, channel_wise=True)(masked))


def square_box(mask: np.ndarray, margin: float, min_side: int = 1) -> tuple[int, int, int] | None:
    """Square box ``(top, left, side)`` around the bounding box of ``mask`` (``(H, W)`` bool), centred on it,
    of side ``max(h, w) * (1 + 2 * margin)`` (at least ``min_side``), rounded up to whole pixels. The box
    may extend beyond the image. ``None`` when the mask is empty."""
    rows, cols = np.nonzero(np.asarray(mask))
    if rows.size == 0:
        return None
    r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    side = max(math.ceil(max(r1 - r0, c1 - c0) * (1.0 + 2.0 * float(margin)) - 1e-9), int(min_side), 1)
    top = math.floor((r0 + r1 - side) / 2.0)
    left = math.floor((c0 + c1 - side) / 2.0)
    return top, left, side


def crop_square(image: torch.Tensor, box: tuple[int, int, int], size: int) -> torch.Tensor:
    """``(C, H, W)`` -> ``(C, size, size)``: the square ``box = (top, left, side)`` of the image (zero outside
    the image) resized with bilinear interpolation and anti-aliasing (MONAI ``Resize``)."""
    top, left, side = box
    c, h, w = image.shape
    out = torch.zeros((c, side, side), dtype=torch.float32)
    r0, r1 = max(top, 0), min(top + side, h)
    c0, c1 = max(left, 0), min(left + side, w)
    if r1 > r0 and c1 > c0:
        out[:, r0 - top : r1 - top, c0 - left : c1 - left] = image[:, r0:r1, c0:c1]
    if side == size:
        return out
    return torch.as_tensor(Resize((size, size), mode="bilinear", anti_aliasing=True)(out))


def cnn_inputs(
    images: torch.Tensor,
    heads: np.ndarray,
    rois: np.ndarray | None,
    mode: str,
    size: int,
    margin: float = 0.25,
    min_side_fraction: float = 0.25,
    head_margin: float = 0.05,
) -> tuple[torch.Tensor, np.ndarray]:
    """Every slice of an arm prepared for the CNN: z-scored inside its head (:func:`normalise_in_head`), then
    cropped and resized to ``size``.

    Args:
        images: ``(N, C, H, W)`` the arm's images.
        heads: ``(N, H, W)`` bool head regions (label-free, from the input pair).
        rois: ``(N, H, W)`` bool tumour masks; needed by ``mode="tumour"``, never read by ``mode="head"``.
        mode: ``"tumour"`` — square box around the tumour mask with ``margin`` on each side and a side of at least
            ``min_side_fraction`` of the image; a slice whose mask is empty (or lost by the resize) gets the head
            box instead. ``"head"`` — square box around the head region with ``head_margin``.

    Returns:
        ``(N, C, size, size)`` float32 and ``(N,)`` bool: the slices of ``mode="tumour"`` that got the head box.
    """
    if mode not in INPUT_MODES:
        raise ValueError(f"unknown CNN input mode {mode!r}; choose one of {INPUT_MODES}")
    if mode == "tumour" and rois is None:
        raise ValueError(
            "the CNN's tumour-centred crops need tumour masks; give a 'mask' column in the cohort table, or set "
            "--cnn_patient_input head"
        )
    n, c, h, w = images.shape
    min_side = round(min_side_fraction * max(h, w))
    out = torch.empty((n, c, size, size), dtype=torch.float32)
    fallbacks = np.zeros(n, dtype=bool)
    for i in range(n):
        box = square_box(rois[i], margin, min_side) if mode == "tumour" else None
        if box is None:
            fallbacks[i] = mode == "tumour"
            box = square_box(heads[i], head_margin) or (0, 0, max(h, w))
        out[i] = crop_square(normalise_in_head(images[i], heads[i]), box, size)
    return out, fallbacks


def build_augmentation(
    seed: int,
    dihedral: bool,
    prob: float = 0.5,
    rotate_degrees: float = 10.0,
    scale: float = 0.1,
    translate_fraction: float = 0.05,
    intensity_scale: float = 0.1,
    intensity_shift: float = 0.1,
    size: int = 64,
) -> Compose:
    """Seeded per-image augmentation of ``(C, size, size)`` tensors: left-right flip; with ``dihedral`` also
    up-down flip and 90-degree rotations; then (each with probability ``prob``) an affine (rotation up to
    ``rotate_degrees``, scale within ``1 +- scale`` per axis, shift up to ``translate_fraction`` of the
    side), intensity scaling ``x * (1 + f)`` and shift ``x + o`` (``|f| <= intensity_scale``,
    ``|o| <= intensity_shift``; the images are z-scored)."""
    flips: list = [RandFlip(prob=0.5, spatial_axis=1)]
    if dihedral:
        flips += [RandFlip(prob=0.5, spatial_axis=0), RandRotate90(prob=0.75, max_k=3)]
    aug = Compose(
        [
            *flips,
            RandAffine(
                prob=prob,
                rotate_range=math.radians(rotate_degrees),
                scale_range=(scale, scale),
                translate_range=(translate_fraction * size, translate_fraction * size),
                padding_mode="zeros",
            ),
            RandScaleIntensity(factors=intensity_scale, prob=prob),
            RandShiftIntensity(offsets=intensity_shift, prob=prob),
        ]
    )
    aug.set_random_state(seed=int(seed) % (2**32))
    return aug
