"""``FusionInferTask``: the ClinicalFMamba bundle as a MONAI Label infer task that returns a float32 fused image.

It is MONAI Label's ``BundleInferTask`` (which reads ``configs/inference.json``, ``configs/metadata.json`` and the
checkpoint, and re-imports the bundle's ``scripts`` package for each request) with these changes:

- ``type=InferType.OTHERS``. The fused image is an intensity image, not a label map. As a ``segmentation`` model
  MONAI Label clients would treat it as labels: 3D Slicer and OHIF ask for ``result_dtype=uint8`` (a [0, 1]
  image becomes all 0/1), show it as a segmentation with a colour table, and the stock ``Restored`` post
  transform resizes with nearest-neighbour interpolation. ``others`` has no such special handling in MONAI Label's
  writer; the price is that 3D Slicer's MONAI Label module does not list the model (REST clients use it).
- Post-processing: the bundle's ``postprocessing`` (``EnsureTyped``, ``Invertd`` undoing the pad-to-8,
  ``AttachChromad``) without ``SaveFusedd`` (the bundle's file writer: MONAI Label writes the result itself),
  and without MONAI Label's ``Restored`` (its reshape logic assumes the network runs at the file's
  dimensionality; this 2-D network fuses ``(X, Y, 1)`` slices). The writer restores the geometry instead.
- ``writer``: always a float32 NIfTI (``.nii.gz``, or ``.nii`` when asked) with the input file's affine and
  header, whatever ``result_dtype`` / ``result_extension`` the client sends (MONAI Label's default writer casts
  to the requested dtype, and Slicer requests uint8 ``.nrrd``).
- Network: the plain ``network_def`` that ``BundleInferTask`` builds and loads, then the bundle's inference modules
  swapped in (``_get_network``; docs/inference_rewrites.md), as ``configs/inference.json`` does.
- Weights: ``--conf weights FILE`` or ``models/model.pt`` (strict key check: a checkpoint that does not fit the
  network is an error, not a half-random model) or ``models/model.ts``; with none of them the model is not
  served, unless ``--conf allow_untrained true`` (for smoke tests: a seed-0 random initialisation, flagged in the
  model description and in every result's ``weights`` field).
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.bundle import BundleConstants, BundleInferTask
from monailabel.utils.others.class_utils import unload_module

from lib.pipeline import (
    DROPPED_POST_TRANSFORMS,
    TRUE,
    bundle_on_path,
    drop_by_name,
    load_bundle_config,
    optimize_network,
    resolve_result_extension,
    resolve_weights,
    write_fused_nifti,
)

logger = logging.getLogger(__name__)


class FusionBundleConstants(BundleConstants):
    """``BundleConstants`` whose PyTorch checkpoint may live outside ``<bundle>/models`` (an absolute path:
    ``os.path.join(bundle, "models", "/abs/model.pt")`` is ``/abs/model.pt``)."""

    def __init__(self, model_file: str | None = None) -> None:
        self.model_file = model_file

    def model_pytorch(self) -> str:
        return self.model_file or super().model_pytorch()


def _untrained_checkpoint(bundle_path: str) -> str:
    """A seed-0 random initialisation of the bundle's ``network_def``, saved to a temporary file."""
    import torch

    with bundle_on_path(bundle_path):
        unload_module("scripts")
        parser = load_bundle_config(bundle_path)
        torch.manual_seed(0)
        net = parser.get_parsed_content("network_def", instantiate=True)
    folder = tempfile.mkdtemp(prefix="clinicalfmamba_untrained_")
    atexit.register(shutil.rmtree, folder, True)
    path = os.path.join(folder, "model_untrained_seed0.pt")
    torch.save({"model": net.state_dict()}, path)
    return path


class FusionInferTask(BundleInferTask):
    """ClinicalFMamba fusion: 2-channel NIfTI (channel 0 MRI / reference, channel 1 other modality) -> float32
    fused NIfTI in the input's geometry, values in [0, 1].

    Args:
        path: the bundle root (folder with ``configs/inference.json``).
        conf: the app's ``--conf`` options; read here: ``weights``, ``allow_untrained``, ``preload``.
    """

    def __init__(self, path: str, conf: dict[str, str], **kwargs: Any) -> None:
        self.weights_note = "none"
        try:
            model_file, self.weights_note = resolve_weights(path, conf)
        except FileNotFoundError as e:
            logger.error(str(e))
            self.valid = False
            return
        if self.weights_note == "none":
            if str(conf.get("allow_untrained", "false")).lower() not in TRUE:
                logger.error(
                    f"ClinicalFMamba: no weights in {path}/models (model.pt or model.ts) and no --conf weights FILE; "
                    "the fusion model is not served. Pass --conf allow_untrained true to serve a random "
                    "initialisation (smoke tests only)."
                )
                self.valid = False
                return
            model_file = _untrained_checkpoint(path)
            self.weights_note = "UNTRAINED (seed-0 random initialisation; --conf allow_untrained true)"
            logger.warning(f"ClinicalFMamba: serving an {self.weights_note}: outputs are not meaningful fusions")
        super().__init__(
            path,
            conf,
            const=FusionBundleConstants(model_file),
            type=InferType.OTHERS,
            post_filter=None,  # filtered by class name in post_transforms()
            add_post_restore=False,
            load_strict=True,
            **kwargs,
        )
        if self.valid:
            self.description = f"{self.description} Weights: {self.weights_note}."
            logger.info(f"ClinicalFMamba fusion task ready; weights: {self.weights_note}")

    def _get_network(self, device, data):
        """The network as ``BasicInferTask`` loads it (weights, strict), with the bundle's inference modules swapped in,
        as ``configs/inference.json``'s ``network`` is (``BundleInferTask`` builds ``network_def``, the plain one)."""
        return optimize_network(self.bundle_path, super()._get_network(device, data))

    def info(self) -> dict[str, Any]:
        i = super().info()
        i["weights"] = self.weights_note
        i["output"] = "float32 NIfTI (.nii.gz, or .nii on request), the input's affine/header, values in [0, 1]"
        i["input"] = "one 2-channel NIfTI (X, Y, Z, 2): channel 0 MRI / reference, channel 1 other modality"
        return i

    def post_transforms(self, data=None) -> Sequence[Callable]:
        post = list(super().post_transforms(data))
        kept = drop_by_name(post, DROPPED_POST_TRANSFORMS)
        if len(kept) != len(post):
            logger.info(f"dropped bundle post-processing {DROPPED_POST_TRANSFORMS}: MONAI Label writes the result")
        return kept

    def inverse_transforms(self, data=None):
        return None  # the bundle's own Invertd (in post_transforms) undoes the padding

    def writer(self, data: dict[str, Any], extension=None, dtype=None) -> tuple[Any, Any]:
        requested_ext = extension or data.get("result_extension")
        requested_dtype = dtype or data.get("result_dtype")
        ext = resolve_result_extension(requested_ext)
        if requested_ext and resolve_result_extension(requested_ext) != str(requested_ext).lower():
            logger.warning(f"result_extension {requested_ext!r} not supported for fused images; writing {ext}")
        if requested_dtype and str(requested_dtype).lower() not in ("float32", "float", "np.float32"):
            logger.warning(f"result_dtype {requested_dtype!r} ignored: the fused image is always written as float32")
        out = tempfile.NamedTemporaryFile(suffix=ext, delete=False).name
        reference = data.get("mri")  # the loaded reference channel (LoadPaird), carrying the file's metadata
        write_fused_nifti(data[self.output_label_key], reference, out, self.bundle_path)
        pred = data[self.output_label_key]
        result = dict(data.get(self.output_json_key) or {})
        result.update(
            {
                "weights": self.weights_note,
                "result_dtype": "float32",
                "result_extension": ext,
                "fused_min": float(pred.min()),
                "fused_max": float(pred.max()),
            }
        )
        logger.info(f"fused image written: {out}")
        return out, result
