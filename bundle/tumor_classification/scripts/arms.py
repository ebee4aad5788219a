"""Input arms of the classification study: which image the classifier sees for each slice.

Every arm starts from the same pre-processed pair tensor (:func:`load_pairs`): for each slice, sequence A and
sequence B are read, resized to ``size x size`` (area interpolation) and min-max normalised to [0, 1] each,
giving ``(N, 2, size, size)`` with channel 0 = A (FLAIR), channel 1 = B (post-contrast T1). That is the input
convention of the fusion bundle's network (channel 0 = reference, channel 1 = other sequence).

- :class:`ChannelArm` — a selection of the two channels: A alone, B alone, or both stacked (2-channel input).
- :class:`FusionArm` — a fusion module applied to the pair, giving a 1-channel image in [0, 1]: the
  ClinicalFMamba fusion bundle's network (:func:`.fusion.load_fusion_bundle`, or its exported TorchScript
  model) or a classic rule (:class:`.fusion.MeanFusion`, :class:`.fusion.MaxFusion`). The fusion is fixed (it
  never sees labels), so computing it once for all slices before the folds leaks nothing.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import Resize, ScaleIntensity
from torch import nn

from .cohort import Cohort, read_image, select_channel

__all__ = ["Arm", "ChannelArm", "FusionArm", "load_masks", "load_pairs", "state_fingerprint"]

logger = logging.getLogger(__name__)


def load_pairs(cohort: Cohort, size: int) -> torch.Tensor:
    """``(N, 2, size, size)`` float32: both sequences of every slice of ``cohort`` (in ``cohort.slices`` order),
    each resized to ``size`` (area interpolation) and min-max normalised to [0, 1]."""
    resize = Resize((size, size), mode="area")
    scale = ScaleIntensity(minv=0.0, maxv=1.0)
    out = torch.empty((len(cohort.slices), 2, size, size), dtype=torch.float32)
    last: tuple[str, np.ndarray] | None = None  # both sequences often live in one file (LGG: RGB channels)
    for i, rec in enumerate(cohort.slices):
        images = []
        for path, ch in ((rec.seq_a, rec.seq_a_channel), (rec.seq_b, rec.seq_b_channel)):
            if last is None or last[0] != path:
                last = (path, read_image(path))
            images.append(torch.from_numpy(select_channel(last[1], ch, path))[None])
        if images[0].shape != images[1].shape:
            raise ValueError(
                f"slice {rec.patient}/{rec.slice_id}: the two sequences differ in size ({rec.seq_a} is "
                f"{tuple(images[0].shape[1:])}, {rec.seq_b} is {tuple(images[1].shape[1:])}); they must be "
                "co-registered on one grid"
            )
        for c, img in enumerate(images):
            out[i, c] = torch.as_tensor(scale(resize(img)))[0]
    return out


def load_masks(cohort: Cohort, size: int) -> np.ndarray:
    """``(N, size, size)`` bool tumour masks of every slice of ``cohort`` (area-resized, kept where >= 0.5 of a
    pixel is tumour; all-False for a slice without tumour). A slice labelled as tumour without a mask file is an
    error naming the slice."""
    resize = Resize((size, size), mode="area")
    out = np.zeros((len(cohort.slices), size, size), dtype=bool)
    for i, rec in enumerate(cohort.slices):
        if rec.mask is None:
            if rec.tumour == 0:
                continue
            raise ValueError(
                f"slice {rec.patient}/{rec.slice_id} has no tumour mask; the radiomics classifiers need a 'mask' "
                "column in the cohort table (non-zero = tumour)"
            )
        m = read_image(rec.mask)
        m = (m.max(axis=-1) if m.ndim == 3 else m).astype(np.float32) > 0
        out[i] = np.asarray(resize(torch.from_numpy(m.astype(np.float32))[None]))[0] >= 0.5
    return out


def state_fingerprint(module: nn.Module) -> str:
    """Short hash of a module's parameters and buffers (identifies the weights a fused image came from)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class Arm:
    """An input arm: a name, the number of classifier input channels and the images themselves."""

    name: str
    in_channels: int

    def build(
        self, pairs: torch.Tensor, cache_dir: str | os.PathLike | None = None, cache_key: str = ""
    ) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        raise NotImplementedError


class ChannelArm(Arm):
    """Channels of the pair tensor: ``sources=[0]`` = sequence A alone, ``[1]`` = B alone, ``[0, 1]`` = both."""

    def __init__(self, name: str, sources: Sequence[int]) -> None:
        if not sources or any(int(s) not in (0, 1) for s in sources):
            raise ValueError(f"arm {name}: sources must be channel indices 0 and/or 1, got {sources}")
        self.name = str(name)
        self.sources = [int(s) for s in sources]
        self.in_channels = len(self.sources)

    def build(
        self, pairs: torch.Tensor, cache_dir: str | os.PathLike | None = None, cache_key: str = ""
    ) -> torch.Tensor:
        return pairs[:, self.sources].contiguous()

    def describe(self) -> dict[str, Any]:
        return {"arm": self.name, "kind": "channels", "sources": self.sources, "in_channels": self.in_channels}


class FusionArm(Arm):
    """A fusion module applied to the pair (channel 0 = A, channel 1 = B) -> one channel in [0, 1].

    Args:
        name: arm name.
        fusion: an ``nn.Module`` mapping ``(B, 2, H, W)`` in [0, 1] to ``(B, 1, H, W)``: the fusion bundle's
            network (:func:`.fusion.load_fusion_bundle`; its ``weights`` attribute says ``"trained"`` or
            ``"untrained"``, the latter reported as UNTRAINED everywhere) or a parameter-free rule.
        batch_size: fusion batch size.
        device: where to run the fusion (default: CPU).
    """

    def __init__(
        self,
        name: str,
        fusion: nn.Module,
        batch_size: int = 16,
        device: str | torch.device | None = None,
    ) -> None:
        self.name = str(name)
        self.fusion = fusion
        self.in_channels = 1
        self.batch_size = int(batch_size)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        # a network with parameters, or a model that declares its weights (an exported TorchScript fusion model)
        self.learnable = any(True for _ in fusion.parameters()) or hasattr(fusion, "weights")
        self.ckpt_path = getattr(fusion, "ckpt_path", None)
        if self.learnable:
            self.weights = str(getattr(fusion, "weights", "trained"))
            if self.weights == "untrained":
                logger.warning("arm %s: the fusion network has RANDOM weights; the arm is reported as UNTRAINED", name)
        else:
            self.weights = "none (parameter-free rule)"
        self.fingerprint = state_fingerprint(fusion) if self.learnable else type(fusion).__name__

    @property
    def label(self) -> str:
        return f"{self.name} (UNTRAINED fusion weights)" if self.weights == "untrained" else self.name

    def _fuse(self, pairs: torch.Tensor) -> torch.Tensor:
        net = self.fusion.to(self.device).eval()
        div = int(getattr(net, "size_divisor", 1))
        h, w = pairs.shape[-2:]
        ph, pw = (-h) % div, (-w) % div
        out = torch.empty((pairs.shape[0], 1, h, w), dtype=torch.float32)
        t0 = time.perf_counter()
        n_batches = (pairs.shape[0] + self.batch_size - 1) // self.batch_size
        with torch.inference_mode():
            for b, start in enumerate(range(0, pairs.shape[0], self.batch_size)):
                x = pairs[start : start + self.batch_size].to(self.device)
                if ph or pw:
                    x = F.pad(x, (0, pw, 0, ph))
                y = net(x)
                out[start : start + x.shape[0]] = y[..., :h, :w].float().clamp(0.0, 1.0).cpu()
                if b == 0 or (b + 1) % 20 == 0 or b + 1 == n_batches:
                    el = time.perf_counter() - t0
                    logger.info(
                        "arm %s: fused %d/%d slices (%.1f s, %.3f s/slice)",
                        self.name,
                        start + x.shape[0],
                        pairs.shape[0],
                        el,
                        el / (start + x.shape[0]),
                    )
        self.fuse_seconds = time.perf_counter() - t0
        return out

    def build(
        self, pairs: torch.Tensor, cache_dir: str | os.PathLike | None = None, cache_key: str = ""
    ) -> torch.Tensor:
        self.cached = False
        self.fuse_seconds = 0.0
        if not cache_dir or not self.learnable:  # parameter-free rules are cheaper than a cache read
            return self._fuse(pairs)
        path = Path(cache_dir) / f"fused_{self.name}_{cache_key}_{pairs.shape[-1]}_{self.fingerprint}.pt"
        if path.is_file():
            fused = torch.load(str(path), map_location="cpu", weights_only=True)
            if tuple(fused.shape) == (pairs.shape[0], 1, *pairs.shape[-2:]):
                logger.info("arm %s: fused images read from cache %s", self.name, path)
                self.cached = True
                return fused
        fused = self._fuse(pairs)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(fused, str(tmp))
        os.replace(tmp, path)
        return fused

    def describe(self) -> dict[str, Any]:
        return {
            "arm": self.name,
            "kind": "fusion",
            "module": type(getattr(self.fusion, "network", self.fusion)).__name__,
            "in_channels": 1,
            "weights": self.weights,
            "ckpt_path": self.ckpt_path,
            "weights_fingerprint": self.fingerprint,
            "fuse_seconds": round(getattr(self, "fuse_seconds", 0.0), 1),
            "from_cache": getattr(self, "cached", False),
        }
