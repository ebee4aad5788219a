"""Metric profiles: named sets of fusion-metric definitions with explicit conventions.

A profile maps the caller's images (fused F and sources A, B on [0, 1], or uint8 0..255) to the
scale it scores on (``prepare``) and defines every metric as ``(F, A, B) -> float`` on that scale,
including how the two sources are combined (sum or mean). Profiles:

* ``default``  - this bundle's conventions: 8-bit quantised 0-255 images (F clipped to [0, 1], x255,
  rounded; no contrast stretch), EN in bits, MI in nats summed, VIF summed, SSIM / MS-SSIM / PSNR /
  NMI / FSIM averaged, Gaussian 11 / 1.5 SSIM windows with data range 255.
* ``cddfuse``  - the CDDFuse Python evaluator: F min-max stretched to 0-255 and rounded (its PNG round
  trip), MI / VIF / SSIM summed, skimage 7x7 SSIM with data range 255, Qabf with the MATLAB quirk.
  ``cddfuse_legacy`` (or ``ssim_data_range=2.0``) reproduces the SSIM of its pinned scikit-image.
* ``clinicalfmamba`` - the ClinicalFMamba paper's code: [0, 1] floats, F clamped, not quantised;
  PSNR / SSIM / FSIM / MI / NMI averaged over sources, EN over unique float values.
* ``characterisation`` - not quality scores: how F relates to its sources on the foreground (copies of a source,
  of the max rule, distance to the max rule, edges stronger than both sources'), on the ``default`` 8-bit scale.

``docs/metrics.md`` lists every definition; ``FusionProfile.describe()`` returns them for reports.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from sklearn.metrics import mutual_info_score

from . import characterisation as chz
from .fmi import fmi
from .fsim import fsim, fsim_clinicalfmamba
from .information import entropy, mutual_information, normalized_mutual_information, unique_value_entropy
from .qabf import qabf
from .similarity import ms_ssim, psnr, ssim, ssim_skimage
from .spatial import average_gradient, scd, spatial_frequency, standard_deviation
from .utils import ArrayLike, as_unit_range, check_same_shape, combine_sources, minmax_to_8bit, quantize_8bit
from .vif import vif_p

__all__ = [
    "MetricFn",
    "MetricSpec",
    "FusionProfile",
    "register_profile",
    "get_profile",
    "available_profiles",
    "compute_metrics",
    "default_profile",
    "cddfuse_profile",
    "clinicalfmamba_profile",
    "characterisation_profile",
]

MetricFn = Callable[[np.ndarray, np.ndarray, np.ndarray], float]
PrepareFn = Callable[[np.ndarray, np.ndarray, np.ndarray], "tuple[np.ndarray, np.ndarray, np.ndarray]"]

_ND = (2, 3)
_2D = (2,)


@dataclass(frozen=True)
class MetricSpec:
    """One metric of a profile: ``fn(F, A, B)`` on the profile's scale, its definition, supported dims."""

    fn: MetricFn
    definition: str
    spatial_dims: tuple[int, ...] = _ND


@dataclass(frozen=True)
class FusionProfile:
    """A named, documented set of metric definitions (see module docstring)."""

    name: str
    scale: str
    prepare: PrepareFn
    metrics: Mapping[str, MetricSpec]
    default_metrics: tuple[str, ...]
    default_metrics_3d: tuple[str, ...] = ()
    options: Mapping[str, object] = field(default_factory=dict)

    def select(self, names: Sequence[str] | None, spatial_dims: int) -> tuple[str, ...]:
        """Validated metric names for images with ``spatial_dims`` (2 or 3); ``None`` -> the defaults."""
        if names is None:
            return self.default_metrics if spatial_dims == 2 else self.default_metrics_3d
        names = (names,) if isinstance(names, str) else tuple(names)
        for n in names:
            if n not in self.metrics:
                raise KeyError(f"profile {self.name!r} has no metric {n!r}; available: {sorted(self.metrics)}")
            if spatial_dims not in self.metrics[n].spatial_dims:
                raise ValueError(f"{n} in profile {self.name!r} is not defined for {spatial_dims}-D images")
        return names

    def describe(self) -> dict[str, str]:
        """Definition of every metric plus the scale convention (for reports)."""
        out = {"scale": self.scale}
        out.update({k: v.definition for k, v in self.metrics.items()})
        return out


# ----------------------------------------------------------------------------------------------
# default
# ----------------------------------------------------------------------------------------------


def _quantize_all(f: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return quantize_8bit(f), quantize_8bit(a), quantize_8bit(b)


def _single(fn: Callable[[np.ndarray], float]) -> MetricFn:
    def metric(f: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
        return float(fn(f))

    return metric


def default_profile() -> FusionProfile:
    """This bundle's conventions on 8-bit quantised 0-255 images (see ``docs/metrics.md``)."""
    metrics = {
        "EN": MetricSpec(_single(entropy), "entropy of F, 256 unit bins over 0..255, log2 (bits)"),
        "SD": MetricSpec(_single(standard_deviation), "population std of F (0-255 units)"),
        "SF": MetricSpec(_single(spatial_frequency), "sqrt(mean dx^2 + mean dy^2) of F, first differences"),
        "AG": MetricSpec(_single(average_gradient), "mean sqrt((gx^2+gy^2)/2), central differences"),
        "MI": MetricSpec(
            combine_sources(mutual_information, "sum"),
            "MI(F,A) + MI(F,B), joint histogram 256x256 unit bins, natural log (nats), summed",
        ),
        "NMI": MetricSpec(
            combine_sources(normalized_mutual_information, "mean"),
            "(H(F)+H(S))/H(F,S), 256x256 unit bins, mean over sources, in [1, 2]",
        ),
        "SCD": MetricSpec(scd, "corr(A, F-B) + corr(B, F-A), Pearson"),
        "VIF": MetricSpec(
            combine_sources(lambda f, s: vif_p(s, f), "sum"),
            "VIF-P(ref=A, dist=F) + VIF-P(ref=B, dist=F), 4 scales, sigma_nsq=2 on 0-255, summed",
            _2D,
        ),
        "Qabf": MetricSpec(
            lambda f, a, b: qabf(f, a, b, matlab_quirk=False, boundary="symm"),
            "Xydeas-Petrovic, Sobel with mirrored borders, Tg .9994 kg -15 Dg .5 Ta .9879 ka -22 Da .8, "
            "ratio 1 where gS == gF",
            _2D,
        ),
        "SSIM": MetricSpec(
            combine_sources(lambda f, s: ssim(f, s, data_range=255.0), "mean"),
            "MONAI SSIM, Gaussian 11/1.5, K1 .01 K2 .03, data_range 255, valid region, mean over sources",
        ),
        "MS-SSIM": MetricSpec(
            combine_sources(lambda f, s: ms_ssim(f, s, data_range=255.0, weights=None), "mean"),
            "MONAI MS-SSIM, 5 scales (Wang weights; fewer, renormalised, if too small), Gaussian 11/1.5, "
            "data_range 255, mean over sources",
        ),
        "PSNR": MetricSpec(
            combine_sources(lambda f, s: psnr(f, s, data_range=255.0), "mean"),
            "10 log10(255^2 / MSE(F,S)), mean over sources (dB); inf if F == S",
        ),
        "FMI": MetricSpec(
            lambda f, a, b: fmi(f, a, b, feature="edge", window=3),
            "Fast-FMI, MATLAB-style Sobel edge features, 3x3 windows, averaged over sources and windows",
            _2D,
        ),
        "FMI_pixel": MetricSpec(
            lambda f, a, b: fmi(f, a, b, feature="none", window=3),
            "Fast-FMI on pixel values, 3x3 windows, averaged over sources and windows",
            _2D,
        ),
        "FSIM": MetricSpec(
            combine_sources(fsim, "mean"),
            "FSIM (Zhang FSIM.m: phasecong2 4 scales 4 orientations, Scharr/16, T1 .85, T2 160), mean",
            _2D,
        ),
    }
    return FusionProfile(
        name="default",
        scale="F clipped to [0,1], x255, rounded (8-bit, no stretch); A, B likewise; 0-255 float64",
        prepare=_quantize_all,
        metrics=metrics,
        default_metrics=tuple(metrics),
        default_metrics_3d=("EN", "SD", "SF", "AG", "MI", "NMI", "SCD", "SSIM", "MS-SSIM", "PSNR"),
    )


# ----------------------------------------------------------------------------------------------
# cddfuse
# ----------------------------------------------------------------------------------------------


def _label_mi(x: np.ndarray, y: np.ndarray) -> float:
    return float(mutual_info_score(x.astype(np.int64).ravel(), y.astype(np.int64).ravel()))


def _cddfuse_psnr(f: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    mse = 0.5 * (float(np.mean((f - a) ** 2)) + float(np.mean((f - b) ** 2)))
    if mse == 0.0:
        return float("inf")
    return float(10.0 * np.log10(float(np.max(f)) ** 2 / mse)) if np.max(f) > 0 else float("-inf")


def _cddfuse_name(ssim_data_range: float, normalize_fused: bool) -> str:
    name = {255.0: "cddfuse", 2.0: "cddfuse_legacy"}.get(float(ssim_data_range))
    name = name or f"cddfuse(ssim_data_range={ssim_data_range:g})"
    return name if normalize_fused else f"{name}(no stretch)"


def cddfuse_profile(ssim_data_range: float = 255.0, normalize_fused: bool = True) -> FusionProfile:
    """The CDDFuse ``utils/Evaluator.py`` definitions (described in ``docs/metrics.md``).

    Args:
        ssim_data_range: ``data_range`` of the skimage SSIM; 255 is correct for 0-255 data,
            2.0 emulates the evaluator under its pinned scikit-image 0.19.
        normalize_fused: min-max stretch F to 0-255 before rounding (the evaluator's save step).
    """

    def prepare(f: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ff = minmax_to_8bit(f) if normalize_fused else quantize_8bit(f)
        return ff, quantize_8bit(a), quantize_8bit(b)

    metrics = {
        "EN": MetricSpec(_single(entropy), "entropy of F, 256-bin histogram of uint8 values, log2 (bits)"),
        "SD": MetricSpec(_single(standard_deviation), "population std of F (0-255)"),
        "SF": MetricSpec(_single(spatial_frequency), "sqrt(mean dx^2 + mean dy^2) of F"),
        "AG": MetricSpec(
            _single(average_gradient), "mean sqrt((gx^2+gy^2)/2), central differences (defined, not printed)"
        ),
        "MI": MetricSpec(
            combine_sources(_label_mi, "sum"),
            "sklearn mutual_info_score on integer pixel labels, nats, MI(F,A) + MI(F,B)",
        ),
        "SCD": MetricSpec(scd, "corr(A, F-B) + corr(B, F-A), Pearson"),
        "VIF": MetricSpec(
            combine_sources(lambda f, s: vif_p(s, f), "sum"),
            "VIF-P(ref=A, dist=F) + VIF-P(ref=B, dist=F), 4 scales, sigma_nsq=2 on 0-255",
            _2D,
        ),
        "Qabf": MetricSpec(
            lambda f, a, b: qabf(f, a, b, matlab_quirk=True),
            "Xydeas-Petrovic with CDDFuse constants, zero-padded Sobel, MATLAB quirk (G = gF where gS == gF)",
            _2D,
        ),
        "SSIM": MetricSpec(
            combine_sources(lambda f, s: ssim_skimage(f, s, data_range=ssim_data_range), "sum"),
            f"skimage structural_similarity defaults (7x7 uniform, sample covariance), "
            f"data_range={ssim_data_range:g}, SSIM(F,A) + SSIM(F,B)",
        ),
        "PSNR": MetricSpec(
            _cddfuse_psnr,
            "10 log10(max(F)^2 / ((MSE(F,A) + MSE(F,B)) / 2)) (defined, not printed)",
        ),
    }
    scale = (
        "F min-max stretched to 0-255 and rounded (PNG round trip); A, B x255 rounded"
        if normalize_fused
        else "F clipped to [0,1], x255, rounded; A, B likewise"
    )
    return FusionProfile(
        name=_cddfuse_name(ssim_data_range, normalize_fused),
        scale=scale,
        prepare=prepare,
        metrics=metrics,
        default_metrics=("EN", "SD", "SF", "MI", "SCD", "VIF", "Qabf", "SSIM"),
        default_metrics_3d=("EN", "SD", "SF", "MI", "SCD", "SSIM"),
        options={"ssim_data_range": ssim_data_range, "normalize_fused": normalize_fused},
    )


# ----------------------------------------------------------------------------------------------
# clinicalfmamba
# ----------------------------------------------------------------------------------------------


def _clamp_fused(f: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.clip(f, 0.0, 1.0), a, b


def clinicalfmamba_profile() -> FusionProfile:
    """The ClinicalFMamba code's definitions on [0, 1] floats (see ``docs/metrics.md``)."""
    metrics = {
        "PSNR": MetricSpec(
            combine_sources(lambda f, s: psnr(f, s, data_range=1.0), "mean"),
            "10 log10(1 / MSE(F,S)) on [0,1], mean over sources",
        ),
        "SSIM": MetricSpec(
            combine_sources(lambda f, s: ssim(f, s, data_range=1.0, padding="reflect"), "mean"),
            "torchmetrics 1.x SSIM defaults: Gaussian 11/1.5, K1 .01 K2 .03, data_range 1, reflect-padded "
            "full-size map averaged; mean over sources",
        ),
        "MS-SSIM": MetricSpec(
            combine_sources(lambda f, s: ms_ssim(f, s, data_range=1.0, weights=None), "mean"),
            "MONAI MS-SSIM on [0,1], Gaussian 11/1.5, Wang weights (fewer scales, renormalised, when "
            "the image is too small, e.g. 4 for 128^3); paper's implementation unknown; mean over sources",
        ),
        "EN": MetricSpec(
            _single(unique_value_entropy),
            "skimage shannon_entropy of float F: entropy over unique values, log2 (up to log2(#pixels))",
        ),
        "FMI": MetricSpec(
            lambda f, a, b: fmi(f, a, b, feature="edge", window=3),
            "Haghighat Fast-FMI defaults: MATLAB-style Sobel edge features, 3x3 windows, averaged",
            _2D,
        ),
        "FSIM": MetricSpec(
            combine_sources(fsim_clinicalfmamba, "mean"),
            "phasepack phasecong (4 scales, 6 orient., sigmaOnf .5978) summed PC, uint16 Scharr, "
            "T1 .85, T2 160, on [0,1], mean over sources",
            _2D,
        ),
        "MI": MetricSpec(
            combine_sources(lambda f, s: mutual_information(f, s, bins=10, value_range=None), "mean"),
            "histogramdd default 10 bins per axis over each image's min..max, nats, mean over sources",
        ),
        "NMI": MetricSpec(
            combine_sources(lambda f, s: normalized_mutual_information(f, s, bins=100, value_range=None), "mean"),
            "skimage normalized_mutual_information (H(F)+H(S))/H(F,S), 100 bins, mean over sources",
        ),
    }
    return FusionProfile(
        name="clinicalfmamba",
        scale="[0,1] floats, F clamped to [0,1], no quantisation",
        prepare=_clamp_fused,
        metrics=metrics,
        default_metrics=("PSNR", "SSIM", "FMI", "FSIM", "EN"),
        default_metrics_3d=("PSNR", "MS-SSIM", "EN"),
    )


def characterisation_profile() -> FusionProfile:
    """Pixel-level behaviour of a fusion method on the 8-bit scale (``scripts.metrics.characterisation``)."""
    fg = f"foreground = max(A, B) > {chz.FOREGROUND_LEVEL:g}"
    metrics = {
        "copy_source": MetricSpec(chz.source_copy_fraction, f"share of foreground pixels with F == A or F == B; {fg}"),
        "copy_max": MetricSpec(chz.max_copy_fraction, f"share of foreground pixels with F == max(A, B); {fg}"),
        "abs_to_max": MetricSpec(chz.mean_abs_to_max, f"mean |F - max(A, B)| over the foreground (grey levels); {fg}"),
        "edge_overshoot": MetricSpec(
            chz.edge_overshoot_fraction,
            f"share of foreground pixels with Sobel |grad F| > max(|grad A|, |grad B|) + {chz.EDGE_MARGIN:g} grey "
            f"levels per pixel (mirrored borders); {fg}",
        ),
    }
    return FusionProfile(
        name="characterisation",
        scale="F clipped to [0,1], x255, rounded (8-bit, no stretch); A, B likewise; 0-255 float64",
        prepare=_quantize_all,
        metrics=metrics,
        default_metrics=tuple(metrics),
        default_metrics_3d=tuple(metrics),
    )


# ----------------------------------------------------------------------------------------------
# registry and entry point
# ----------------------------------------------------------------------------------------------

_REGISTRY: dict[str, Callable[..., FusionProfile]] = {}


def register_profile(name: str, factory: Callable[..., FusionProfile]) -> None:
    """Register ``factory(**options) -> FusionProfile`` under ``name`` (overwrites)."""
    _REGISTRY[name] = factory


def available_profiles() -> tuple[str, ...]:
    """Names of the registered profiles."""
    return tuple(_REGISTRY)


def get_profile(name: str | FusionProfile = "default", **options: object) -> FusionProfile:
    """Build the profile registered as ``name`` (a ``FusionProfile`` is returned as is)."""
    if isinstance(name, FusionProfile):
        if options:
            raise ValueError("options can only be given with a profile name")
        return name
    if name not in _REGISTRY:
        raise KeyError(f"unknown metric profile {name!r}; available: {available_profiles()}")
    return _REGISTRY[name](**options)


register_profile("default", default_profile)
register_profile("cddfuse", cddfuse_profile)
register_profile("cddfuse_legacy", lambda **kw: cddfuse_profile(ssim_data_range=2.0, **kw))
register_profile("clinicalfmamba", clinicalfmamba_profile)
register_profile("characterisation", characterisation_profile)


def compute_metrics(
    fused: ArrayLike,
    a: ArrayLike,
    b: ArrayLike,
    profile: str | FusionProfile = "default",
    metrics: Sequence[str] | str | None = None,
    **profile_options: object,
) -> dict[str, float]:
    """Fusion metrics of ``fused`` against sources ``a`` and ``b`` under a profile.

    Args:
        fused, a, b: same-shape (H, W) images or (H, W, D) volumes (singleton leading batch/channel
            dimensions are dropped), floats on [0, 1] or ``uint8`` on 0..255; numpy or torch.
            Colour PET/SPECT: pass the Y channel (``utils.rgb_to_y``).
        profile: profile name (``available_profiles()``) or a ``FusionProfile``.
        metrics: metric names of the profile; ``None`` -> the profile's defaults for the dimensionality.
        profile_options: forwarded to the profile factory (e.g. ``ssim_data_range=2.0`` for ``cddfuse``).

    Returns:
        ``{name: value}`` in the requested order.
    """
    prof = get_profile(profile, **profile_options)
    f, aa, bb = as_unit_range(fused), as_unit_range(a), as_unit_range(b)
    check_same_shape(f, aa, bb)
    if f.ndim not in (2, 3):
        raise ValueError(f"expected 2-D or 3-D images, got shape {f.shape}")
    names = prof.select(metrics, f.ndim)
    f, aa, bb = prof.prepare(f, aa, bb)
    return {n: float(prof.metrics[n].fn(f, aa, bb)) for n in names}
