"""Inferers for the fusion workflows: whole-image passes for ordinary images, tiles for large ones.

The network's memory grows with the pixel count (a 2048 x 2048 pair needs about 6 GB fused whole on CPU), so
:class:`TiledInferer` fuses images above a size threshold window by window with MONAI's
``SlidingWindowInferer`` (overlapping windows, Gaussian-weighted blending) and smaller images whole with
``SimpleInferer``. The network's latent Mamba scans the whole window, so a tiled result differs a little from
the whole-image pass; the measured difference is in ``docs/performance.md`` ("Large images").
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from monai.inferers import Inferer, SimpleInferer, SlidingWindowInferer
from monai.utils import ensure_tuple_rep

__all__ = ["TiledInferer"]

logger = logging.getLogger(__name__)


class TiledInferer(Inferer):
    """Whole-image inference up to ``max_pixels`` pixels per image, sliding windows above.

    Input ``(B, C, *spatial)``; output the network's ``(B, C_out, *spatial)``. Windows are ``roi_size``
    (each side a multiple of the network's down-sampling; the bundle pads images to multiples of 8), placed
    with ``overlap`` and blended with a Gaussian weight map (``mode="gaussian"``); an image side shorter than
    the window is padded for the window and cropped back by MONAI.

    Args:
        roi_size: window size, one int per spatial dimension or one for all.
        max_pixels: images with more pixels (voxels) than this are tiled; ``None`` or ``0`` never tiles.
        overlap: fraction of a window shared with its neighbour, in [0, 1).
        mode: blending of overlapping windows, ``"gaussian"`` or ``"constant"``.
        sigma_scale: Gaussian sigma as a fraction of the window (MONAI's default 0.125).
        sw_batch_size: windows per network call.
    """

    def __init__(
        self,
        roi_size: Sequence[int] | int = 512,
        max_pixels: int | None = 1024 * 1024,
        overlap: float = 0.25,
        mode: str = "gaussian",
        sigma_scale: float = 0.125,
        sw_batch_size: int = 1,
    ) -> None:
        super().__init__()
        if not 0.0 <= overlap < 1.0:
            raise ValueError(f"overlap must be in [0, 1), got {overlap}")
        self.max_pixels = int(max_pixels or 0)
        self.whole = SimpleInferer()
        self.tiled = SlidingWindowInferer(
            roi_size=roi_size, sw_batch_size=sw_batch_size, overlap=overlap, mode=mode, sigma_scale=sigma_scale
        )

    def needs_tiles(self, inputs: torch.Tensor) -> bool:
        """Whether ``inputs`` ``(B, C, *spatial)`` has more pixels per image than ``max_pixels``."""
        return self.max_pixels > 0 and inputs[0, 0].numel() > self.max_pixels

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if not self.needs_tiles(inputs):
            return self.whole(inputs, network, *args, **kwargs)
        logger.info(
            "image of %s pixels is above max_pixels=%d: fused in %s windows (overlap %.2f, %s blending)",
            "x".join(map(str, inputs.shape[2:])),
            self.max_pixels,
            "x".join(map(str, ensure_tuple_rep(self.tiled.roi_size, inputs.ndim - 2))),
            self.tiled.overlap,
            self.tiled.mode,
        )
        return self.tiled(inputs, network, *args, **kwargs)
