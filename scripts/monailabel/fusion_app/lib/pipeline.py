"""The MONAI Label fusion app's pure-Python pieces (no ``monailabel`` import).

They run in both environments: in the MONAI Label server (imported as ``lib.pipeline`` from the app folder)
and in the project's own venv (imported as ``scripts.monailabel.fusion_app.lib.pipeline``), where
``tests/test_monailabel_app.py`` drives the same pre-processing -> network -> post-processing -> writer chain the
server runs, without MONAI Label.

- :func:`default_bundle_root`, :func:`resolve_weights`: which bundle and which checkpoint the app serves;
- :func:`bundle_preprocessing`, :func:`bundle_postprocessing`, :func:`drop_by_name`: the bundle's own
  ``configs/inference.json`` transform lists, minus the file writer (``SaveFusedd``) that MONAI Label must not run;
- :func:`write_fused_nifti`: the writer: float32 NIfTI in the input's geometry (affine, header, spatial shape);
- :func:`stack_pair`: two co-registered NIfTI files -> one 2-channel 4-D NIfTI ``(X, Y, Z, 2)``, the app's input;
- :func:`check_fused`: the integration checks (shape, affine, dtype, value range) of a returned fused image.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "DROPPED_POST_TRANSFORMS",
    "MODEL_NAME",
    "RESULT_EXTENSIONS",
    "bundle_on_path",
    "bundle_postprocessing",
    "bundle_preprocessing",
    "check_fused",
    "default_bundle_root",
    "drop_by_name",
    "load_bundle_config",
    "optimize_network",
    "resolve_result_extension",
    "resolve_weights",
    "stack_pair",
    "write_fused_nifti",
]

MODEL_NAME = "clinicalfmamba_fusion"
"""Name of the model in MONAI Label (``/infer/<name>``), unless ``--conf model_name`` says otherwise."""

DROPPED_POST_TRANSFORMS = ("SaveFusedd", "SaveImaged")
"""Bundle post-processing that writes files itself: MONAI Label's writer does that (matched by class name, because
MONAI Label re-imports ``scripts`` for every request, so class identity does not survive)."""

RESULT_EXTENSIONS = (".nii.gz", ".nii")
"""What the writer can produce; anything else a client asks for (3D Slicer asks ``.nrrd``) becomes ``.nii.gz``."""

TRUE = ("1", "true", "yes", "on")


def default_bundle_root(app_dir: str | os.PathLike | None = None) -> Path:
    """The bundle this app ships in: ``<root>/scripts/monailabel/fusion_app`` -> ``<root>``."""
    app_dir = Path(app_dir) if app_dir is not None else Path(__file__).resolve().parents[1]
    return Path(app_dir).resolve().parents[2]


@contextlib.contextmanager
def bundle_on_path(bundle_root: str | os.PathLike) -> Iterator[None]:
    """``bundle_root`` first on ``sys.path`` (so ``scripts.*`` resolves to this bundle), removed afterwards."""
    root = str(bundle_root)
    sys.path.insert(0, root)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(root)


def optimize_network(bundle_root: str | os.PathLike, network: Any) -> Any:
    """``network`` with the bundle's inference modules swapped in (``scripts.networks.optimize.optimize_for_inference``,
    as ``configs/inference.json`` applies it: same weights and outputs, faster). A TorchScript model, or a module
    without ClinicalFMamba parts, comes back unchanged."""
    with bundle_on_path(bundle_root):
        from scripts.networks.optimize import optimize_for_inference

    return optimize_for_inference(network)


def resolve_weights(bundle_root: str | os.PathLike, conf: Mapping[str, Any]) -> tuple[str | None, str]:
    """Which checkpoint to serve, and a one-line note for logs and ``/info/``.

    Order: ``conf["weights"]`` (a file; missing -> ``FileNotFoundError``), ``models/model.pt``, ``models/model.ts``
    (MONAI Label loads TorchScript itself), else nothing: ``(None, "none")``. The caller decides whether an
    untrained network may be served (``--conf allow_untrained true``).
    Returns ``(path_of_a_pt_checkpoint_or_None, note)``.
    """
    root = Path(bundle_root)
    explicit = str(conf.get("weights") or "").strip()
    if explicit:
        path = Path(explicit).expanduser()
        path = path if path.is_absolute() else (root / path)
        if not path.is_file():
            raise FileNotFoundError(f"--conf weights {explicit}: no such checkpoint file ({path})")
        return str(path.resolve()), f"checkpoint {path.resolve()}"
    if (root / "models" / "model.pt").is_file():
        return str((root / "models" / "model.pt").resolve()), "bundle checkpoint models/model.pt"
    if (root / "models" / "model.ts").is_file():
        return None, "bundle TorchScript models/model.ts"
    return None, "none"


def load_bundle_config(bundle_root: str | os.PathLike, config_file: str = "configs/inference.json"):
    """The bundle's inference config as a ``monai.bundle.ConfigParser`` with ``bundle_root`` set."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(Path(bundle_root) / config_file))
    parser.config.update({"bundle_root": str(bundle_root)})  # type: ignore[union-attr]
    return parser


def _transform_list(parser, key: str) -> list:
    from monai.transforms import Compose

    c = parser.get_parsed_content(key, instantiate=True)
    return list(c.transforms) if isinstance(c, Compose) else list(c)


def drop_by_name(transforms: Sequence[Any], names: Sequence[str] = DROPPED_POST_TRANSFORMS) -> list:
    """``transforms`` without those whose class (or a base class) is named in ``names``."""
    return [t for t in transforms if not {c.__name__ for c in type(t).__mro__} & set(names)]


def bundle_preprocessing(bundle_root: str | os.PathLike, parser=None) -> list:
    """The bundle's ``preprocessing`` transforms (``LoadPaird`` ... ``DivisiblePadd``), as MONAI Label runs them."""
    with bundle_on_path(bundle_root):
        return _transform_list(parser or load_bundle_config(bundle_root), "preprocessing")


def bundle_postprocessing(bundle_root: str | os.PathLike, parser=None) -> list:
    """The bundle's ``postprocessing`` (``EnsureTyped``, ``Invertd``, ``AttachChromad``) without ``SaveFusedd``."""
    with bundle_on_path(bundle_root):
        return drop_by_name(_transform_list(parser or load_bundle_config(bundle_root), "postprocessing"))


def resolve_result_extension(requested: str | None) -> str:
    """``.nii`` when asked for, else ``.nii.gz`` (also for ``.nrrd``/``.seg.nrrd``/``.dcm`` requests)."""
    requested = (requested or "").strip().lower()
    if requested and not requested.startswith("."):
        requested = "." + requested
    return requested if requested in RESULT_EXTENSIONS else ".nii.gz"


def _meta(img: Any) -> dict:
    meta = getattr(img, "meta", None)
    return dict(meta) if meta else {}


def _as_numpy(img: Any) -> np.ndarray:
    import torch

    if isinstance(img, torch.Tensor):
        img = img.detach().cpu()
        img = img.as_tensor() if hasattr(img, "as_tensor") else img
        return img.numpy()
    return np.asarray(img)


def _spatial_shape(meta: Mapping[str, Any]) -> tuple[int, ...] | None:
    shape = meta.get("spatial_shape")
    return None if shape is None else tuple(int(s) for s in np.asarray(shape).reshape(-1))


def write_fused_nifti(pred: Any, reference: Any, path: str | os.PathLike, bundle_root: str | os.PathLike) -> str:
    """Write the fused image ``pred`` ``(1, *spatial)`` (or ``(*spatial)``) as a float32 NIfTI at ``path``.

    ``reference`` is the loaded reference image (the pipeline's ``mri`` ``MetaTensor``, whose metadata name the
    input file, its ``spatial_shape`` and ``affine``). For a NIfTI input the bundle's own NIfTI writer
    (``scripts.transforms.SaveFusedd._write_nifti``) is reused: the input file's affine and header
    (qform/sform codes, units, pixel sizes) with the data type float32 and the input's spatial shape
    (a ``(X, Y, 1)`` slice stays ``(X, Y, 1)``; the channel axis of a 2-channel input is dropped). Other inputs
    (e.g. NRRD in the datastore) get a fresh NIfTI header with the loaded image's affine.
    Values are written as they are (the network's sigmoid keeps them in [0, 1]); never an integer cast.
    """
    import nibabel as nib

    arr = _as_numpy(pred).astype(np.float32, copy=False)
    if arr.ndim >= 2 and arr.shape[0] == 1:
        arr = arr[0]
    meta = _meta(reference)
    src = meta.get("filename_or_obj")
    src = src[0] if isinstance(src, (list, tuple)) else src
    shape = _spatial_shape(meta) or arr.shape
    if int(np.prod(shape)) != arr.size:
        raise ValueError(
            f"fused image has shape {arr.shape} ({arr.size} voxels); the input {src} has spatial shape {shape}: "
            "was the padding inverted?"
        )
    path = str(path)
    if src and str(src).lower().endswith((".nii", ".nii.gz")) and os.path.isfile(str(src)):
        import torch

        with bundle_on_path(bundle_root):
            from scripts.transforms import SaveFusedd

            SaveFusedd._write_nifti(torch.from_numpy(np.ascontiguousarray(arr))[None], str(src), meta, path)
        return path
    affine = meta.get("original_affine", meta.get("affine"))
    affine = np.eye(4) if affine is None else _as_numpy(affine).astype(np.float64)
    if affine.shape != (4, 4):  # 2-D affine (3x3) of a PNG-like input
        full = np.eye(4)
        full[:2, :2], full[:2, 3] = affine[:2, :2], affine[:2, 2]
        affine = full
    img = nib.Nifti1Image(np.ascontiguousarray(arr.reshape(shape)), affine)
    img.header.set_data_dtype(np.float32)
    nib.save(img, path)
    return path


def stack_pair(mri: str | os.PathLike, other: str | os.PathLike, out: str | os.PathLike, atol: float = 1e-4) -> str:
    """Stack two co-registered single-channel NIfTI files into one 2-channel 4-D NIfTI ``(X, Y, Z, 2)``.

    Channel 0 = ``mri`` (the reference), channel 1 = ``other``; float32, with the reference's affine and header.
    The two files must have the same 3-D shape and affine (within ``atol``); a 2-D file ``(X, Y)`` becomes
    ``(X, Y, 1, 2)``. This is the input format of the MONAI Label app (and of the bundle's single-file pairs).
    """
    import nibabel as nib

    ref, oth = nib.load(str(mri)), nib.load(str(other))

    def _as_3d(name: Any, x: np.ndarray) -> np.ndarray:
        x = x[..., None] if x.ndim == 2 else x
        x = x[..., 0] if x.ndim == 4 and x.shape[-1] == 1 else x
        if x.ndim != 3:
            raise ValueError(f"{name}: expected a single-channel 2-D or 3-D NIfTI, got shape {x.shape}")
        return x

    a = _as_3d(mri, np.asarray(ref.dataobj, dtype=np.float32))
    b = _as_3d(other, np.asarray(oth.dataobj, dtype=np.float32))
    if a.shape != b.shape:
        raise ValueError(f"the pair differs in size: {mri} {a.shape}, {other} {b.shape}")
    if not np.allclose(ref.affine, oth.affine, atol=atol):
        raise ValueError(f"the pair is not co-registered (different affines): {mri} vs {other}")
    header = ref.header.copy()
    header.set_data_dtype(np.float32)
    header.set_intent("none")
    out_img = type(ref)(np.stack([a, b], axis=-1), ref.affine, header=header)
    out_img.header.set_slope_inter(1.0, 0.0)
    nib.save(out_img, str(out))
    return str(out)


def check_fused(fused: str | os.PathLike, source: str | os.PathLike, atol: float = 1e-5) -> list[tuple[str, bool, str]]:
    """Integration checks of a fused image returned by the server against the 2-channel input it was made from.

    Returns ``[(name, passed, detail), ...]``: readable NIfTI, float32 on disk, spatial shape = the input's
    spatial shape (the input without its channel axis), affine = the input's affine (within ``atol``),
    finite values, values in [0, 1], and not constant (a constant image would hide a broken pipeline).
    """
    import nibabel as nib

    checks: list[tuple[str, bool, str]] = []
    try:
        out = nib.load(str(fused))
        arr = np.asarray(out.dataobj)
    except Exception as e:  # noqa: BLE001 - report, do not raise
        return [("readable NIfTI", False, f"{type(e).__name__}: {e}")]
    checks.append(("readable NIfTI", True, f"{fused} ({os.path.getsize(fused)} bytes)"))
    src = nib.load(str(source))
    want_shape = tuple(src.shape[:3]) if len(src.shape) == 4 else tuple(src.shape)
    dtype = out.get_data_dtype()
    checks.append(("dtype float32", dtype == np.float32, f"on-disk dtype {dtype}"))
    checks.append(("shape", tuple(arr.shape) == want_shape, f"fused {tuple(arr.shape)}, input {tuple(src.shape)}"))
    diff = float(np.abs(out.affine - src.affine).max())
    checks.append(
        ("affine", diff <= atol, f"max |fused - input| = {diff:.3g}; fused affine {np.round(out.affine, 4).tolist()}")
    )
    finite = bool(np.isfinite(arr).all())
    checks.append(("finite", finite, f"{int(np.size(arr) - np.isfinite(arr).sum())} non-finite values"))
    lo, hi = (float(np.nanmin(arr)), float(np.nanmax(arr))) if arr.size else (np.nan, np.nan)
    checks.append(("value range [0, 1]", finite and 0.0 <= lo and hi <= 1.0, f"min {lo:.6f}, max {hi:.6f}"))
    checks.append(("not constant", finite and hi - lo > 1e-6, f"max - min = {hi - lo:.6f}"))
    return checks
