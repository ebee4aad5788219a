"""Fusion modules of the study's arms: the fusion bundle used as a pipeline would, and the classic rules.

The fused arm consumes the ClinicalFMamba fusion bundle from outside, through one of:

- :func:`load_fusion_bundle` — the bundle folder: its network is built from the folder's
  ``configs/inference.json`` (``network_def``) with MONAI's bundle API (:class:`monai.bundle.ConfigParser`)
  and its weights ``models/model.pt`` are loaded with ``torch.load(..., weights_only=True)``;
- :func:`load_fusion_torchscript` — an exported TorchScript model (``monai.bundle ckpt_export``), which needs
  no Python code of the fusion bundle at all.

Both bundles follow the MONAI convention of a Python package called ``scripts`` at the bundle root, so the
fusion bundle's package is imported **in isolation** (:func:`bundle_imports`): while the fusion network is built
or run, ``scripts`` names the fusion bundle's package; afterwards this bundle's own ``scripts`` is restored.
Input of every fusion module: ``(B, 2, H, W)`` in [0, 1] (channel 0 = sequence A, the reference; channel 1 =
sequence B); output ``(B, 1, H, W)``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "BundleFusion",
    "MaxFusion",
    "MeanFusion",
    "TorchScriptFusion",
    "bundle_imports",
    "load_fusion_bundle",
    "load_fusion_torchscript",
]

_PACKAGE = "scripts"
_FOREIGN: dict[str, dict[str, Any]] = {}  # bundle folder -> its imported 'scripts' modules, kept between calls


def _is_package_module(name: str) -> bool:
    return name == _PACKAGE or name.startswith(_PACKAGE + ".")


@contextmanager
def bundle_imports(bundle_dir: str | os.PathLike) -> Iterator[None]:
    """Inside the block, ``import scripts...`` resolves to the package of ``bundle_dir``; the modules that held
    that name before (this bundle's own) are put back on exit, and the fusion bundle's modules are kept for the
    next block (so its classes stay the same objects)."""
    root = str(Path(bundle_dir).resolve())
    own = {k: sys.modules.pop(k) for k in [k for k in sys.modules if _is_package_module(k)]}
    sys.modules.update(_FOREIGN.get(root, {}))
    sys.path.insert(0, root)
    try:
        yield
    finally:
        sys.path.remove(root)
        _FOREIGN[root] = {k: sys.modules.pop(k) for k in [k for k in sys.modules if _is_package_module(k)]}
        sys.modules.update(own)


class MeanFusion(nn.Module):
    """Pixel-wise mean of the two sequences (a classic fusion baseline)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1, keepdim=True)


class MaxFusion(nn.Module):
    """Pixel-wise maximum of the two sequences (a classic fusion baseline)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.amax(dim=1, keepdim=True)


class BundleFusion(nn.Module):
    """A fusion network built from another bundle; ``forward`` runs inside :func:`bundle_imports` (its code may
    import its own ``scripts`` package lazily). ``weights`` is ``"trained"`` or ``"untrained"``."""

    def __init__(self, network: nn.Module, bundle_dir: str, weights: str, ckpt_path: str | None) -> None:
        super().__init__()
        self.network = network
        self.bundle_dir = bundle_dir
        self.weights = weights
        self.ckpt_path = ckpt_path
        self.size_divisor = int(getattr(network, "size_divisor", 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with bundle_imports(self.bundle_dir):
            return self.network(x)


def _state_dict(path: Path) -> Mapping[str, torch.Tensor]:
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read fusion weights {path} (tensors only, weights_only=True): {e}") from e
    if isinstance(state, Mapping) and "model" in state and isinstance(state["model"], Mapping):
        state = state["model"]
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict of the fusion network")
    return state


def load_fusion_bundle(
    bundle_dir: str | os.PathLike,
    config_file: str = "configs/inference.json",
    ckpt_path: str | os.PathLike | None = None,
    network_key: str = "network_def",
    overrides: Mapping[str, Any] | None = None,
    require_weights: bool = True,
) -> BundleFusion:
    """The fusion network of the MONAI bundle at ``bundle_dir``, with its trained weights.

    Args:
        bundle_dir: the fusion bundle folder (it holds ``configs/`` and ``models/``).
        config_file: the config (relative to ``bundle_dir``) whose ``network_key`` defines the network.
        ckpt_path: weights (default ``bundle_dir/models/model.pt``).
        network_key: the config id of the network definition.
        overrides: config overrides (e.g. ``{"network_def#features": [8, 16]}``).
        require_weights: raise when the weights file is missing (otherwise the network keeps its random
            initialisation and the arm is reported as UNTRAINED).
    """
    from monai.bundle import ConfigParser

    root = Path(bundle_dir).resolve()
    cfg = root / config_file
    if not cfg.is_file():
        raise FileNotFoundError(
            f"fusion bundle config not found: {cfg}; --fusion_bundle_dir must name the ClinicalFMamba bundle folder "
            "(with configs/inference.json and models/model.pt)"
        )
    with bundle_imports(root):
        parser = ConfigParser()
        parser.read_config(str(cfg))
        parser["bundle_root"] = str(root)
        parser.update(dict(overrides or {}))
        network = parser.get_parsed_content(network_key)
    ckpt = Path(ckpt_path) if ckpt_path else root / "models" / "model.pt"
    if ckpt.is_file():
        state = _state_dict(ckpt)
        try:
            network.load_state_dict(state)
        except RuntimeError as e:
            raise ValueError(f"fusion weights {ckpt} do not match the network of {cfg}: {str(e)[:500]}") from e
        weights = "trained"
    elif require_weights:
        raise FileNotFoundError(
            f"trained fusion weights not found at {ckpt}; pass --fusion_ckpt FILE, or --allow_untrained true to "
            "study the arm with random fusion weights (reported as UNTRAINED)"
        )
    else:
        weights = "untrained"
    return BundleFusion(network.eval(), str(root), weights, str(ckpt))


def load_fusion_torchscript(path: str | os.PathLike) -> nn.Module:
    """An exported TorchScript fusion model (``(B, 2, H, W)`` -> ``(B, 1, H, W)``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"TorchScript fusion model not found: {path}")
    return TorchScriptFusion(torch.jit.load(str(path), map_location="cpu"))


class TorchScriptFusion(nn.Module):
    """An exported TorchScript fusion model as a module of the study (its weights count as trained)."""

    weights = "trained"

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)
