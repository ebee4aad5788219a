"""Dictionary transforms for image-fusion pairs: load, check, colour, and write.

Pre-processing chain used by ``configs/inference.json`` (MONAI transforms where they do the job):

1. :class:`LoadPaird` — ``mri`` and ``other`` file paths (or one 2-channel ``image`` file) to channel-first
   ``MetaTensor`` s ``(C, *spatial)`` in MONAI's index order (PNG: width first; NIfTI: as stored);
2. :class:`EnsureSpatialDimsd` — drop trailing singleton spatial dims (a NIfTI slice ``(X, Y, 1)`` becomes 2D);
3. :class:`CheckSameShaped` — both images of the pair have the same spatial size and, for NIfTI pairs, the same
   voxel grid (spacing, orientation, origin); errors name both files. ``resample=True`` resamples the other image
   onto the reference grid instead;
4. :class:`SplitLumaChromad` — RGB(A) colour images (PET/SPECT) become their BT.601 luma ``Y`` (1 channel),
   the full ``YCbCr`` is kept under ``<key>_ycbcr`` to re-attach the colour after fusion; RGB images that are
   really grey become grey;
5. ``monai.transforms.ScaleIntensityd(minv=0, maxv=1)`` — per-image min-max normalisation (a constant image
   becomes zeros);
6. ``monai.transforms.ConcatItemsd(keys=["mri", "other"], name="image")`` — the 2-channel network input,
   carrying the reference image's metadata/affine;
7. ``monai.transforms.DivisiblePadd(keys="image", k=8)`` — pad to a valid size, undone by ``Invertd``.

Post-processing: ``monai.transforms.Invertd`` (crop ``pred`` back), :class:`AttachChromad` (colour fused
image from the fused ``Y`` and the colour source's ``Cb``/``Cr``), :class:`SaveFusedd` (atomic writer, never
overwrites unless asked) with a :class:`FusionSummary` counting written / skipped / failed pairs.

Colour convention (``YCbCr``): ITU-R BT.601 full range ("JPEG" YCbCr, what ``PIL.Image.convert("YCbCr")``
computes), on the 8-bit scale: ``Y`` in [0, 255], ``Cb``/``Cr`` centred on 128. The fused ``Y`` (``pred`` in
[0, 1]) is mapped back to an 8-bit ``Y`` by ``y_range``:

- ``"source"`` (default): onto the colour source's own ``Y`` range ``[min Y, max Y]``, the inverse of the
  per-image normalisation its ``Y`` went through, so the colour image keeps the source's brightness;
- ``"full"``: ``Y = 255 * pred`` as in the reference code (its colour outputs look brighter than the source
  when the source ``Y`` does not reach 255; spec section 13, item 17).

The grey fused image written next to the colour one (``<id>_fused_y.png``) is always ``255 * pred``: the
fused image on the scale the metrics use.
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
import uuid
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor, NibabelReader, PILReader
from monai.transforms import LoadImage, MapTransform

from scripts.data import (
    IMAGE_EXTENSIONS,
    NIFTI_EXTENSIONS,
    channels_message,
    check_nifti_frames,
    check_nifti_size,
    dims_message,
    geometry_differences,
    split_extension,
    unsupported_format_message,
)

__all__ = [
    "AttachChromad",
    "CheckSameShaped",
    "EnsureSpatialDimsd",
    "FusionSummary",
    "LoadPaird",
    "SaveFusedd",
    "SplitLumaChromad",
    "check_output_dir",
    "fused_output_path",
    "pending_pairs",
    "rgb_to_ycbcr",
    "run_fusion",
    "validate_pair",
    "ycbcr_to_rgb",
]

logger = logging.getLogger(__name__)

# ITU-R BT.601 full-range (JPEG) YCbCr, the convention of PIL's "YCbCr" mode, on the 8-bit scale
_RGB_TO_YCBCR = torch.tensor(
    [[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]], dtype=torch.float64
)
_YCBCR_TO_RGB = torch.linalg.inv(_RGB_TO_YCBCR)
_CHROMA_OFFSET = 128.0


def _with_meta(tensor: torch.Tensor, like: Any) -> torch.Tensor:
    """``tensor`` as a ``MetaTensor`` carrying ``like``'s metadata (when ``like`` has any)."""
    tensor = tensor.as_tensor() if isinstance(tensor, MetaTensor) else tensor
    return MetaTensor(tensor, meta=dict(like.meta)) if isinstance(like, MetaTensor) else tensor


def _filename(img: Any) -> str:
    """The source file of a loaded image, for error messages."""
    meta = getattr(img, "meta", None) or {}
    name = meta.get("filename_or_obj", "<unknown file>")
    if isinstance(name, (list, tuple)):  # collated
        name = name[0] if name else "<unknown file>"
    return str(name)


def rgb_to_ycbcr(rgb: torch.Tensor) -> torch.Tensor:
    """RGB ``(3, *spatial)`` on the 8-bit scale to BT.601 full-range ``YCbCr`` ``(3, *spatial)``, as float."""
    flat = rgb.reshape(3, -1).to(torch.float64)
    ycbcr = _RGB_TO_YCBCR.to(flat.device) @ flat
    ycbcr[1:] += _CHROMA_OFFSET
    return ycbcr.reshape(rgb.shape).to(rgb.dtype if rgb.is_floating_point() else torch.float32)


def ycbcr_to_rgb(ycbcr: torch.Tensor) -> torch.Tensor:
    """BT.601 full-range ``YCbCr`` ``(3, *spatial)`` to RGB ``(3, *spatial)`` on the 8-bit scale (not clipped)."""
    flat = ycbcr.reshape(3, -1).to(torch.float64).clone()
    flat[1:] -= _CHROMA_OFFSET
    rgb = _YCBCR_TO_RGB.to(flat.device) @ flat
    return rgb.reshape(ycbcr.shape).to(ycbcr.dtype if ycbcr.is_floating_point() else torch.float32)


def _pil_to_grey_or_rgb(image: Any) -> Any:
    """PIL converter for :class:`monai.data.PILReader`: palette/CMYK/bilevel images to RGB(A)/L."""
    if image.mode in ("P", "PA"):
        return image.convert("RGBA" if "transparency" in image.info or image.mode == "PA" else "RGB")
    if image.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        return image.convert("RGB")
    if image.mode == "1":
        return image.convert("L")
    return image


class LoadPaird(MapTransform):
    """Load both images of a pair into channel-first ``MetaTensor`` s.

    Input: ``data[keys[0]]`` and ``data[keys[1]]`` file paths, or — when those are absent — one 2-channel file
    under ``image_key`` (channel 0 reference, channel 1 other modality; e.g. a 4-D NIfTI ``(X, Y, Z, 2)``),
    which is split into the two keys. Output: ``data[key]`` as ``(C, *spatial)`` float32 ``MetaTensor`` with
    the file's metadata (``filename_or_obj``, ``affine``, ``spatial_shape``). NIfTI files are read with
    MONAI's ``NibabelReader``, PNG/JPEG/TIFF/BMP with its ``PILReader`` (palette images converted to RGB);
    other formats are refused (nothing is ever unpickled). PNG arrays are width-first, as ``PILReader``
    returns them (``PILWriter`` transposes back on writing). Missing, empty, unreadable files and images
    with NaN or infinite voxels raise errors naming the file; a constant image is accepted with a warning
    (it normalises to zeros).

    Args:
        keys: the reference and the other-modality key, in this order.
        image_key: key of a single 2-channel file, used when ``keys`` are absent.
    """

    def __init__(self, keys: KeysCollection = ("mri", "other"), image_key: str = "image") -> None:
        super().__init__(keys)
        if len(self.keys) != 2:
            raise ValueError(f"LoadPaird needs exactly two keys (reference, other), got {self.keys}")
        self.image_key = image_key
        self._nifti_reader = NibabelReader()
        self._pil_reader = PILReader(converter=_pil_to_grey_or_rgb)
        self._loader = LoadImage(
            reader=[self._nifti_reader, self._pil_reader], image_only=True, ensure_channel_first=True
        )

    def load(self, path: str | os.PathLike) -> MetaTensor:
        """One file to ``(C, *spatial)``; errors name the file."""
        path = str(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"image file not found: {path}")
        if os.path.getsize(path) == 0:
            raise ValueError(f"image file is empty (0 bytes): {path}; re-export or re-download it")
        ext = split_extension(path)[1].lower()
        if ext not in NIFTI_EXTENSIONS + IMAGE_EXTENSIONS:
            raise ValueError(unsupported_format_message(path))
        reader = self._nifti_reader if ext in NIFTI_EXTENSIONS else self._pil_reader
        try:
            if ext in NIFTI_EXTENSIONS:
                check_nifti_size(path)  # before the reader allocates what a (corrupt) header declares
            img = self._loader(path, reader)
        except Exception as e:
            cause = str(e).strip().splitlines()[-1][:300] if str(e).strip() else ""
            raise ValueError(
                f"cannot read image file {path}: {type(e).__name__}: {cause} (truncated, corrupt, or not the format "
                "its extension says); re-export the image"
            ) from e
        values = (img.as_tensor() if isinstance(img, MetaTensor) else torch.as_tensor(img)).detach().cpu().numpy()
        finite = np.isfinite(values)
        if not finite.all():
            raise ValueError(
                f"{path}: {values.size - int(finite.sum())} of {values.size} voxels are NaN or infinite; replace them "
                "(e.g. with the background value) before fusion"
            )
        if values.size and values.max() == values.min():
            logger.warning(
                "%s is constant (every voxel %g): it normalises to zeros and adds nothing", path, float(values.max())
            )
        return img

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        ref_key, other_key = self.keys
        if ref_key in d and other_key in d:
            for key in self.keys:
                if not isinstance(d[key], torch.Tensor) and split_extension(d[key])[1].lower() in NIFTI_EXTENSIONS:
                    check_nifti_frames(d[key])  # several frames per voxel: colour only if the header says so
                d[key] = d[key] if isinstance(d[key], torch.Tensor) else self.load(d[key])
            return d
        if self.image_key not in d:
            raise KeyError(f"a pair needs '{ref_key}' and '{other_key}' file paths or one 2-channel '{self.image_key}'")
        img = d[self.image_key] if isinstance(d[self.image_key], torch.Tensor) else self.load(d[self.image_key])
        if img.shape[0] != 2:
            raise ValueError(
                f"{_filename(img)}: a single-file pair needs 2 channels (reference, other), it has {img.shape[0]} "
                f"(shape {tuple(img.shape)} channel-first)"
            )
        d[ref_key], d[other_key] = _with_meta(img[0:1], img), _with_meta(img[1:2], img)
        return d


class EnsureSpatialDimsd(MapTransform):
    """Drop trailing singleton spatial dimensions until ``spatial_dims`` remain.

    ``(C, X, Y, 1)`` becomes ``(C, X, Y)`` for ``spatial_dims=2`` (a NIfTI slice); the metadata keep the
    file's ``spatial_shape`` and affine so the writer restores the file's geometry. More non-singleton
    dimensions than ``spatial_dims`` raise an error naming the file.
    """

    def __init__(self, keys: KeysCollection, spatial_dims: int = 2, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.spatial_dims = spatial_dims

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            spatial = tuple(img.shape[1:])
            while len(spatial) > self.spatial_dims and spatial[-1] == 1:
                spatial = spatial[:-1]
            if len(spatial) != self.spatial_dims:
                raise ValueError(dims_message(_filename(img), self.spatial_dims, tuple(img.shape[1:])))
            if spatial != tuple(img.shape[1:]):
                d[key] = _with_meta(img.reshape(img.shape[0], *spatial), img)
        return d


def _has_geometry(img: Any) -> bool:
    """Whether an image came from a file with a world geometry (NIfTI) and carries its affine."""
    return (
        isinstance(img, MetaTensor)
        and split_extension(_filename(img))[1].lower() in NIFTI_EXTENSIONS
        and img.meta.get("affine") is not None
    )


def _file_grid(img: MetaTensor) -> MetaTensor:
    """``img`` reshaped to its file's spatial shape (undoing :class:`EnsureSpatialDimsd`), for resampling."""
    shape = img.meta.get("spatial_shape")
    shape = [int(s) for s in np.asarray(shape).reshape(-1)] if shape is not None else list(img.shape[1:])
    return MetaTensor(img.as_tensor().reshape(img.shape[0], *shape), meta=dict(img.meta))


def _resample_onto(img: MetaTensor, ref: MetaTensor) -> MetaTensor:
    """``img`` resampled (bilinear, zeros outside its field of view) onto ``ref``'s voxel grid and shape."""
    from monai.transforms import ResampleToMatch

    moved = ResampleToMatch(mode="bilinear", padding_mode="zeros")(_file_grid(img), img_dst=_file_grid(ref))
    values = torch.as_tensor(moved).reshape(img.shape[0], *ref.shape[1:]).to(torch.float32)
    meta = dict(ref.meta)
    meta["filename_or_obj"] = _filename(img)
    return MetaTensor(values, meta=meta)  # no applied operations: the fused image stays on the reference grid


class CheckSameShaped(MapTransform):
    """Both images of a pair must lie on one grid: the same spatial size and, for NIfTI images, the same voxel
    spacing, orientation and origin (within ``tolerance``, :func:`scripts.data.geometry_differences`).

    A mismatch raises ``ValueError`` naming both files and what differs. With ``resample=True`` (an explicit
    choice: it interpolates the other image) NIfTI images that differ are resampled onto the first key's grid
    instead (bilinear, zeros outside their field of view); images without a world geometry (PNG, ...) cannot
    be resampled and are still refused.

    Args:
        keys: the reference key first, then the other image(s).
        resample: resample the other images onto the reference grid instead of refusing.
        tolerance: voxel-grid tolerance.
    """

    def __init__(
        self, keys: KeysCollection, resample: bool = False, tolerance: float = 1e-3, allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.resample = resample
        self.tolerance = tolerance

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        keys = list(self.key_iterator(d))
        if not keys:
            return d
        ref_key = keys[0]
        ref = d[ref_key]
        for key in keys[1:]:
            img = d[key]
            same_size = tuple(img.shape[1:]) == tuple(ref.shape[1:])
            geometry = _has_geometry(ref) and _has_geometry(img)
            diffs = geometry_differences(ref.meta["affine"], img.meta["affine"], self.tolerance) if geometry else []
            if same_size and not diffs:
                continue
            if self.resample and geometry:
                logger.warning(
                    "resampling %s onto the grid of %s (%s)", _filename(img), _filename(ref), "; ".join(diffs) or "size"
                )
                d[key] = _resample_onto(img, ref)
                continue
            if not geometry:
                hint = " (resampling needs NIfTI images with a world geometry)" if self.resample else ""
                raise ValueError(
                    f"the images of a pair must have the same size: {ref_key} {_filename(ref)} has spatial shape "
                    f"{tuple(ref.shape[1:])}, {key} {_filename(img)} has spatial shape {tuple(img.shape[1:])}; "
                    f"resize or register the other image onto the reference{hint}"
                )
            detail = "; ".join(
                diffs + ([] if same_size else [f"size {tuple(ref.shape[1:])} vs {tuple(img.shape[1:])}"])
            )
            raise ValueError(
                f"the images of a pair are not on the same voxel grid ({detail}): {_filename(ref)} (reference) and "
                f"{_filename(img)}; register / resample the other image onto the reference first, or pass "
                "--resample true to resample it onto the reference grid"
            )
        return d


def _check_channels(img: Any) -> None:
    """1 (grey), 3 (RGB) or 4 (RGBA) channels, or 2 (grey + alpha) for a PNG/TIFF/...; else a ``ValueError``."""
    channels = img.shape[0]
    pil = split_extension(_filename(img))[1].lower() in IMAGE_EXTENSIONS
    if channels not in (1, 3, 4) and not (channels == 2 and pil):
        raise ValueError(channels_message(_filename(img), channels))


class SplitLumaChromad(MapTransform):
    """Colour images to their luma ``Y``; keep the full ``YCbCr`` to re-attach the colour after fusion.

    For each key: 1 channel: unchanged. 2 channels of a PNG/TIFF (grey + alpha): the grey channel (2 channels
    of any other file are refused: that is a pair in one file, see :class:`LoadPaird`). 3 or 4 channels (RGB,
    RGBA; alpha dropped): if the colour channels are equal within ``grey_tolerance`` the image is grey and
    channel 0 is kept; otherwise ``data[key]`` becomes ``Y`` ``(1, *spatial)`` and ``data[key + suffix]`` the
    ``YCbCr`` image ``(3, *spatial)`` (BT.601 full range, 8-bit scale; see the module docstring).

    Args:
        keys: keys of the loaded images.
        ycbcr_suffix: suffix of the key that receives the ``YCbCr`` image of a colour input.
        grey_tolerance: largest channel difference still treated as grey.
    """

    def __init__(
        self,
        keys: KeysCollection,
        ycbcr_suffix: str = "_ycbcr",
        grey_tolerance: float = 0.0,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.ycbcr_suffix = ycbcr_suffix
        self.grey_tolerance = grey_tolerance

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            channels = img.shape[0]
            if channels == 1:
                continue
            _check_channels(img)
            if channels == 2:  # grey + alpha
                d[key] = _with_meta(img[0:1], img)
                continue
            rgb = img[:3]
            if float((rgb - rgb[0:1]).abs().max()) <= self.grey_tolerance:
                d[key] = _with_meta(img[0:1], img)
                continue
            ycbcr = rgb_to_ycbcr(rgb.as_tensor() if isinstance(rgb, MetaTensor) else rgb)
            d[key] = _with_meta(ycbcr[0:1], img)
            d[f"{key}{self.ycbcr_suffix}"] = _with_meta(ycbcr, img)
        return d


class AttachChromad(MapTransform):
    """Colour fused image from the fused luma and the colour source's chroma.

    ``data[key]`` is the fused image ``(1, *spatial)`` in [0, 1]; when ``data[ycbcr_key]`` holds the colour
    source's ``YCbCr`` ``(3, *spatial)``, ``data[output_key]`` receives the RGB image ``(3, *spatial)`` on the
    8-bit scale (float, clipped to [0, 255]). Without ``ycbcr_key`` (grey pair) nothing changes.

    Args:
        keys: the fused image key (``"pred"``).
        ycbcr_key: key of the colour source's ``YCbCr`` image (:class:`SplitLumaChromad`).
        output_key: key for the RGB result.
        y_range: ``"source"`` (fused ``Y`` mapped onto the source's ``[min Y, max Y]``) or ``"full"``
            (``Y = 255 * fused``, the reference code's choice).
    """

    def __init__(
        self,
        keys: KeysCollection = "pred",
        ycbcr_key: str = "other_ycbcr",
        output_key: str = "pred_rgb",
        y_range: str = "source",
    ) -> None:
        super().__init__(keys, allow_missing_keys=False)
        if y_range not in ("source", "full"):
            raise ValueError(f"y_range must be 'source' or 'full', got {y_range!r}")
        self.ycbcr_key = ycbcr_key
        self.output_key = output_key
        self.y_range = y_range

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        ycbcr = d.get(self.ycbcr_key)
        if ycbcr is None:
            return d
        for key in self.key_iterator(d):
            fused = torch.as_tensor(d[key]).detach().cpu().to(torch.float64).clamp(0.0, 1.0)
            source = torch.as_tensor(ycbcr).detach().cpu().to(torch.float64)
            if tuple(fused.shape[1:]) != tuple(source.shape[1:]):
                raise ValueError(
                    f"fused image {tuple(fused.shape)} and colour source {tuple(source.shape)} of "
                    f"{_filename(ycbcr)} differ in size; invert the padding first"
                )
            if self.y_range == "source":
                y_min, y_max = float(source[0].min()), float(source[0].max())
                y = y_min + fused[0] * (y_max - y_min)
            else:
                y = 255.0 * fused[0]
            rgb = ycbcr_to_rgb(torch.stack([y, source[1], source[2]])).clamp(0.0, 255.0)
            d[self.output_key] = rgb.to(torch.float32)
        return d


class FusionSummary:
    """Fused pairs written, skipped (outputs exist) and failed (with the reason), logged at the end of a run.

    ``failed`` starts with the pairs set aside before fusion (:func:`scripts.pair_check.check_pairs`);
    :func:`pending_pairs` adds the pairs skipped because their outputs exist, the writer the pairs written or whose
    outputs could not be written. ``untrained``: the network ran with random weights (``--allow_untrained true``),
    said in the summary line. ``interrupted`` is set by :func:`run_fusion` when the user stops the run.
    :meth:`raise_if_failed` turns failures into the run's error (exit status 1 on the command line).
    """

    def __init__(self, failed: Sequence[tuple[Mapping[str, Any], str]] = (), untrained: bool = False) -> None:
        self.written: list[list[str]] = []
        self.skipped: list[list[str]] = []
        self.failed: list[tuple[Mapping[str, Any], str]] = list(failed)
        self.untrained = bool(untrained)
        self.interrupted = False

    def add_written(self, paths: Sequence[str]) -> None:
        self.written.append(list(paths))

    def add_skipped(self, paths: Sequence[str]) -> None:
        self.skipped.append(list(paths))

    def add_failed(self, item: Mapping[str, Any], reason: str) -> None:
        self.failed.append((item, reason))

    def failed_names(self, limit: int = 10) -> str:
        """The failed pairs' ids (or reference files), at most ``limit`` of them."""
        names = [str(item.get("id") or item.get("mri") or item.get("image") or "?") for item, _ in self.failed]
        return ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")

    def __str__(self) -> str:
        text = f"{len(self.written)} pairs written, {len(self.skipped)} skipped, {len(self.failed)} failed"
        if self.failed:
            text += f" ({self.failed_names()})"
        if self.untrained:
            text += "; UNTRAINED network: random weights (--allow_untrained true), outputs are not meaningful"
        return text + (" (interrupted)" if self.interrupted else "")

    def raise_if_failed(self, fail_on: str = "any", total: int | None = None) -> None:
        """Raise :class:`scripts.cli.RunFailedError` (exit status 1) when pairs failed.

        Args:
            fail_on: ``"any"``: when any pair failed; ``"all"``: only when every pair failed.
            total: the number of pairs of the run (default: written + skipped + failed).
        """
        from scripts.cli import RunFailedError

        if fail_on not in ("any", "all"):
            raise ValueError(f"fail_on must be 'any' or 'all', got {fail_on!r}")
        n_failed = len(self.failed)
        total = len(self.written) + len(self.skipped) + n_failed if total is None else int(total)
        if n_failed == 0 or (fail_on == "all" and n_failed < total):
            return
        raise RunFailedError(
            f"{n_failed} of {total} pairs failed: {self.failed_names()} (reasons in the log above; the other pairs' "
            "outputs are written). "
            + (
                "Fix the inputs named there"
                if fail_on == "all"
                else "Fix the inputs named there, or pass --fail_on all to end with an error only when every pair fails"
            )
        )

    def log(self, log: logging.Logger | None = None) -> str:
        """Log the counts, then the written files, the skipped and the failed pairs; returns the one-line summary."""
        log = log or logger
        text = f"fusion summary: {self}"
        log.info(text)
        for paths in self.written:
            log.info("written: %s", ", ".join(paths))
        if self.skipped:
            log.warning(
                "%d pairs skipped because their outputs exist (set overwrite=true to replace them), e.g. %s",
                len(self.skipped),
                self.skipped[0][0],
            )
        for item, reason in self.failed:
            log.error("failed pair %s: %s", item.get("id", item), reason)
        return text


def _clean_name(name: Any) -> str:
    """A pair id or task as one file-name component."""
    return str(name).replace(os.sep, "_").replace("/", "_").strip() or "pair"


def fused_output_path(
    item: Mapping[str, Any],
    output_dir: str | os.PathLike,
    output_postfix: str = "fused",
    ref_key: str = "mri",
    image_key: str = "image",
) -> Path:
    """The main output file of a pair, from its datalist entry: ``output_dir/<task>/<id>_<postfix><ext>``.

    ``<ext>`` is the reference file's NIfTI extension, else ``.png`` (a colour pair also gets ``<id>_<postfix>_y.png``,
    written together with it). ``id`` defaults to the reference file's name, no ``<task>`` folder when the pair
    has none. :class:`SaveFusedd` writes to this path.
    """
    ref_path = str(item.get(ref_key) or item.get(image_key) or "")
    stem, ext = split_extension(ref_path)
    pair_id = _clean_name(item.get("id") or stem)
    folder = Path(output_dir) / _clean_name(item["task"]) if item.get("task") else Path(output_dir)
    base = f"{pair_id}_{output_postfix}" if output_postfix else pair_id
    return folder / (f"{base}{ext.lower()}" if ext.lower() in NIFTI_EXTENSIONS else f"{base}.png")


def check_output_dir(output_dir: str | os.PathLike) -> Path:
    """Create ``output_dir`` if needed and check that a file can be written there; errors name the folder."""
    folder = Path(output_dir).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(
            f"cannot create the output folder {folder}: {type(e).__name__}: {e.strerror or e}; choose another "
            "--output_dir"
        ) from e
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write_check_"):
            pass
    except OSError as e:
        raise ValueError(
            f"the output folder {folder} is not writable ({type(e).__name__}: {e.strerror or e}); nothing was fused. "
            "Fix its permissions or choose another --output_dir"
        ) from e
    return folder


def pending_pairs(
    datalist: Sequence[Mapping[str, Any]],
    output_dir: str | os.PathLike,
    overwrite: bool = False,
    summary: FusionSummary | None = None,
    output_postfix: str = "fused",
) -> list[dict[str, Any]]:
    """The pairs still to fuse, decided before any compute: the output folder is checked for writability
    (:func:`check_output_dir`), and without ``overwrite`` the pairs whose output (:func:`fused_output_path`)
    exists are skipped and counted in ``summary``, so a re-run fuses only what is missing. An empty ``datalist``
    (every pair set aside) touches nothing.
    """
    if not datalist:
        return []
    check_output_dir(output_dir)
    pending: list[dict[str, Any]] = []
    for item in datalist:
        path = fused_output_path(item, output_dir, output_postfix)
        if path.exists() and not overwrite:
            if summary is not None:
                summary.add_skipped([str(path)])
            continue
        pending.append(dict(item))
    if len(pending) < len(datalist):
        logger.warning(
            "%d of %d pairs already fused in %s (outputs exist): skipped without computing them; "
            "set overwrite=true to fuse them again",
            len(datalist) - len(pending),
            len(datalist),
            output_dir,
        )
    return pending


def run_fusion(
    evaluator: Any, summary: FusionSummary, log: logging.Logger | None = None, total: int | None = None
) -> None:
    """Run ``evaluator`` (the fusion loop, an ignite engine) so that Ctrl-C stops it cleanly.

    The first interrupt (SIGINT) lets the pair in progress finish and be written, then ends the loop
    (``engine.terminate()``); a second one stops at once (:class:`SaveFusedd` writes a pair whole or not at all,
    so no partial file is left either way). The summary of what was written is logged and the process exits
    with status 130 (the shell's code for SIGINT) without a traceback. Re-running the same command fuses the
    remaining pairs only (:func:`pending_pairs`).
    """
    import signal
    import threading

    log = log or logger
    state = {"interrupted": False}

    def on_sigint(signum: int, frame: Any) -> None:
        if state["interrupted"]:
            raise KeyboardInterrupt
        state["interrupted"] = True
        log.warning("interrupt received: finishing the pair in progress, then stopping (Ctrl-C again stops at once)")
        evaluator.terminate()

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, on_sigint) if main_thread else None
    try:
        evaluator.run()
    except KeyboardInterrupt:
        state["interrupted"] = True
    finally:
        if main_thread and previous is not None:
            signal.signal(signal.SIGINT, previous)
    if state["interrupted"]:
        summary.interrupted = True
        log.error(
            "interrupted by the user after %d of %s pairs; no partial file was left. Re-run the same command to fuse "
            "the remaining pairs (finished ones are skipped)",
            len(summary.written),
            total if total is not None else "?",
        )
        summary.log(log)
        raise SystemExit(130)


def _atomic_write(write: Callable[[str], None], path: Path, overwrite: bool) -> bool:
    """Write through ``write(tmp_path)`` to a temporary file beside ``path``, then move it into place.

    Without ``overwrite`` the final step is a hard link, which fails if ``path`` appeared meanwhile (no
    file is ever replaced); returns False in that case. With ``overwrite`` it is an atomic ``os.replace``.
    """
    stem, ext = split_extension(path)
    tmp = path.with_name(f".{stem}.{uuid.uuid4().hex[:8]}.tmp{ext}")
    try:
        write(str(tmp))
        if overwrite:
            os.replace(tmp, path)
            return True
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError:  # file system without hard links: best effort
            if path.exists():
                return False
            os.replace(tmp, path)
        return True
    finally:
        if tmp.exists():
            tmp.unlink()


def _to_uint8(img: torch.Tensor, scale: float) -> np.ndarray:
    arr = torch.as_tensor(img).detach().cpu().to(torch.float64).nan_to_num(0.0).numpy() * scale
    return np.clip(np.rint(arr), 0, 255).astype(np.uint8)


class SaveFusedd(MapTransform):
    """Write the fused image of a pair next to nothing it could overwrite.

    Outputs go to ``output_dir/<task>/<id>_<postfix><ext>`` (no ``<task>`` folder when the pair has none;
    ``id`` defaults to the reference file's name):

    - NIfTI reference (``.nii``/``.nii.gz``): float32 NIfTI, same extension, with the reference file's affine,
      header (qform/sform, units) and spatial shape (a ``(X, Y, 1)`` slice stays ``(X, Y, 1)``);
    - any other reference (PNG, JPEG, TIFF, ...): 8-bit PNG of ``round(255 * pred)``; when the pair had a
      colour source (``data[colour_key]`` from :class:`AttachChromad`) that PNG is the colour (RGB) image and
      the grey fused ``Y`` is written as ``<id>_<postfix>_y.png``.

    Every file is written to a temporary name and moved into place. Existing outputs are never replaced unless
    ``overwrite=True``: the pair is skipped with a warning (and counted in ``summary``), so re-running a
    command completes the missing outputs only. A pair whose outputs cannot be written (e.g. a full disk) leaves
    no file behind: with ``on_error="skip"`` it is logged and counted as failed and the run goes on, with
    ``"raise"`` the run stops.

    Args:
        keys: the fused image key (``"pred"``), ``(1, *spatial)`` in [0, 1], cropped back to the input size.
        output_dir: output folder (created when needed).
        ref_key: key of the loaded reference image, whose metadata name the reference file.
        colour_key: key of the RGB fused image, if any.
        output_postfix: appended to the id in output names.
        overwrite: replace existing outputs.
        summary: collects written / skipped / failed pairs.
        on_error: ``"skip"`` or ``"raise"`` when writing a pair fails.
    """

    def __init__(
        self,
        keys: KeysCollection = "pred",
        output_dir: str | os.PathLike = "./eval/fused",
        ref_key: str = "mri",
        colour_key: str = "pred_rgb",
        output_postfix: str = "fused",
        overwrite: bool = False,
        summary: FusionSummary | None = None,
        on_error: str = "raise",
    ) -> None:
        super().__init__(keys)
        if on_error not in ("skip", "raise"):
            raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
        self.on_error = on_error
        self.output_dir = Path(output_dir)
        self.ref_key = ref_key
        self.colour_key = colour_key
        self.output_postfix = output_postfix
        self.overwrite = overwrite
        self.summary = summary

    def _reference(self, d: Mapping[Hashable, Any], key: Hashable) -> tuple[str, Mapping[str, Any]]:
        for candidate in (d.get(self.ref_key), d[key]):
            if isinstance(candidate, MetaTensor) and "filename_or_obj" in candidate.meta:
                return _filename(candidate), candidate.meta
        raise ValueError(f"cannot tell the reference file of '{key}': no '{self.ref_key}' image with metadata")

    def output_paths(self, d: Mapping[Hashable, Any], key: Hashable) -> tuple[list[Path], str, Mapping[str, Any]]:
        """Output files of one pair (:func:`fused_output_path`, then the grey ``_y`` image of a colour pair), the
        reference file and its metadata."""
        ref_path, ref_meta = self._reference(d, key)
        item = {"mri": ref_path, "id": d.get("id"), "task": d.get("task")}
        main = fused_output_path(item, self.output_dir, self.output_postfix)
        if main.name.endswith(NIFTI_EXTENSIONS) or d.get(self.colour_key) is None:
            return [main], ref_path, ref_meta
        return [main, main.with_name(main.name[: -len(".png")] + "_y.png")], ref_path, ref_meta

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            try:
                self._save(d, key)
            except Exception as e:
                if self.on_error == "raise" or self.summary is None:
                    raise
                logger.error("pair '%s' failed, nothing written: %s", d.get("id", ""), e)
                self.summary.add_failed({k: v for k, v in d.items() if isinstance(v, str)}, f"{type(e).__name__}: {e}")
        return d

    def _save(self, d: dict[Hashable, Any], key: Hashable) -> None:
        """Write the outputs of one pair (see the class docstring)."""
        paths, ref_path, ref_meta = self.output_paths(d, key)
        existing = [str(p) for p in paths if p.exists()]
        if existing and not self.overwrite:
            logger.warning("outputs exist, pair '%s' skipped (overwrite=false): %s", d.get("id", ""), existing)
            if self.summary is not None:
                self.summary.add_skipped(existing)
            return
        pred = torch.as_tensor(d[key]).detach().cpu()
        self._check_shape(pred, ref_path, ref_meta)
        paths[0].parent.mkdir(parents=True, exist_ok=True)
        if paths[0].name.endswith(NIFTI_EXTENSIONS):
            writers = [lambda p, pred=pred: self._write_nifti(pred, ref_path, ref_meta, p)]
        elif len(paths) == 2:
            writers = [
                lambda p: self._write_png(_to_uint8(d[self.colour_key], 1.0), p),
                lambda p, pred=pred: self._write_png(_to_uint8(pred, 255.0), p),
            ]
        else:
            writers = [lambda p, pred=pred: self._write_png(_to_uint8(pred, 255.0), p)]
        done: list[str] = []
        try:
            for path, write in zip(paths, writers):
                if _atomic_write(write, path, self.overwrite):
                    done.append(str(path))
        except BaseException:
            for path in done:  # a pair is written whole or not at all
                Path(path).unlink(missing_ok=True)
            raise
        if len(done) < len(paths):
            not_written = sorted(set(map(str, paths)) - set(done))
            logger.warning("outputs appeared while writing, not replaced: %s", not_written)
        if self.summary is not None:
            (self.summary.add_written if done else self.summary.add_skipped)(done or [str(p) for p in paths])

    @staticmethod
    def _check_shape(pred: torch.Tensor, ref_path: str, ref_meta: Mapping[str, Any]) -> None:
        """The fused image must have the reference's spatial size (trailing singleton dims aside)."""
        shape = ref_meta.get("spatial_shape")
        if shape is None:
            return
        expected = [int(s) for s in np.asarray(shape).reshape(-1)]
        got = list(pred.shape[1:])
        while len(expected) > 1 and expected[-1] == 1:
            expected.pop()
        while len(got) > 1 and got[-1] == 1:
            got.pop()
        if expected != got:
            raise ValueError(
                f"fused image of {ref_path} has spatial shape {tuple(pred.shape[1:])}, the reference image has "
                f"{tuple(int(s) for s in np.asarray(shape).reshape(-1))}: was the padding inverted (Invertd)?"
            )

    @staticmethod
    def _write_png(arr: np.ndarray, path: str) -> None:
        """``arr``: ``(C, W, H)`` uint8 in MONAI's width-first order, ``C`` 1 (grey) or 3 (RGB)."""
        from monai.data import PILWriter

        writer = PILWriter(output_dtype=np.uint8, scale=None)
        writer.set_data_array(arr, channel_dim=0)
        writer.write(path)

    @staticmethod
    def _write_nifti(pred: torch.Tensor, ref_path: str, ref_meta: Mapping[str, Any], path: str) -> None:
        """``pred`` ``(1, *spatial)`` reshaped to the reference's spatial shape, saved with its affine and header.

        nibabel with the reference header (rather than MONAI's ``NibabelWriter``, which builds a fresh header)
        keeps qform/sform codes, units and pixel sizes exactly.
        """
        import nibabel as nib

        ref = nib.load(ref_path)
        shape = ref_meta.get("spatial_shape")
        shape = tuple(int(s) for s in np.asarray(shape).reshape(-1)) if shape is not None else tuple(ref.shape[:3])
        arr = pred.to(torch.float32).numpy().reshape(shape)
        header = ref.header.copy()
        header.set_data_dtype(np.float32)
        header.set_intent("none")
        header["cal_min"], header["cal_max"] = 0.0, 0.0
        out = type(ref)(arr, ref.affine, header=header)
        out.header.set_slope_inter(1.0, 0.0)
        nib.save(out, path)


@functools.lru_cache(maxsize=4)
def _pair_loader(keys: tuple[str, ...], image_key: str) -> LoadPaird:
    """A reused :class:`LoadPaird` (building MONAI's ``LoadImage`` registers every reader: slow per pair)."""
    return LoadPaird(keys=list(keys), image_key=image_key)


def validate_pair(
    item: Mapping[str, Any],
    keys: Sequence[str] = ("mri", "other"),
    image_key: str = "image",
    spatial_dims: int | None = None,
    resample: bool = False,
    tolerance: float = 1e-3,
) -> dict[Hashable, Any]:
    """Load and check one pair as the workflows do, without fusing it; errors name the file(s).

    Runs :class:`LoadPaird` (missing, empty, unsupported, unreadable files; NaN/Inf voxels),
    :class:`EnsureSpatialDimsd` (when ``spatial_dims`` is given), :class:`CheckSameShaped` (size and voxel grid,
    or resampling with ``resample``) and the channel check of :class:`SplitLumaChromad`. Returns the loaded pair.
    """
    keys = list(keys)
    d = _pair_loader(tuple(keys), image_key)(item)
    if spatial_dims is not None:
        d = EnsureSpatialDimsd(keys=keys, spatial_dims=spatial_dims)(d)
    d = CheckSameShaped(keys=keys, resample=resample, tolerance=tolerance)(d)
    for key in keys:
        _check_channels(d[key])
    return d
