"""Loading trained weights safely, with errors a person can act on."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "WeightsChoice",
    "check_weights",
    "choose_weights",
    "load_network_weights",
    "missing_weights_message",
    "read_state_dict",
]

logger = logging.getLogger(__name__)


def read_state_dict(
    path: str | os.PathLike, key: str | None = "model", map_location: str | torch.device = "cpu"
) -> dict:
    """Read a state dict from ``path`` with ``weights_only=True`` (nothing is unpickled beyond tensors).

    Accepts a plain state dict or a checkpoint dict holding it under ``key``; strips the ``module.``
    prefix that DistributedDataParallel adds.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {_where(path)}")
    if os.path.getsize(path) == 0:
        raise ValueError(f"weights file is empty: {path}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # corrupt files raise many types: UnpicklingError, BadZipFile, EOFError, KeyError, ...
        first_line = (str(e).splitlines() or [""])[0][:200]
        raise ValueError(
            f"{path} is not a readable PyTorch weights file (truncated, corrupt, or it holds objects other than "
            f"tensors, which are never unpickled here): {type(e).__name__}: {first_line}"
        ) from e
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict or a checkpoint dict")
    if key is not None and key in obj and isinstance(obj[key], Mapping):
        obj = obj[key]
    state = {}
    for name, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(
                f"{path} looks like a checkpoint without a '{key}' entry (found keys: {', '.join(list(obj)[:8])})"
            )
        state[name[len("module.") :] if name.startswith("module.") else name] = value
    return state


def load_network_weights(
    network: nn.Module,
    path: str | os.PathLike,
    key: str | None = "model",
    map_location: str | torch.device = "cpu",
    allow_missing: bool = False,
) -> nn.Module:
    """Load weights from ``path`` into ``network``; a mismatch is reported as counts and examples.

    ``allow_missing=True`` (fine-tuning a network that adds modules to the one in the file) keeps the
    network's own initialisation for tensors the file lacks; unexpected or differently shaped tensors are
    still errors.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is unreadable, or its tensors do not fit the configured network.
    """
    state = read_state_dict(path, key, map_location)
    _check_match(network, state, path, allow_missing=allow_missing)
    network.load_state_dict(state, strict=not allow_missing)
    return network


@dataclass(frozen=True)
class WeightsChoice:
    """What a workflow does about its network's weights (:func:`choose_weights`).

    Attributes:
        load: load the weights file.
        untrained: the network runs with its random initialisation (only with ``allow_untrained``).
        note: one line for logs and summaries: the file, ``UNTRAINED ...`` or that no weights are needed.
    """

    load: bool
    untrained: bool
    note: str


def _where(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    return path if os.path.isabs(path) else f"{path} (from {os.getcwd()}: {os.path.abspath(path)})"


def missing_weights_message(path: str | os.PathLike, option: str = "--ckpt_path") -> str:
    """The error text for a weights file that does not exist: the path as given and as resolved, and the fixes."""
    return (
        f"weights file not found: {_where(path)}; the network would fuse with random weights, so the run stops. "
        f"Pass {option} FILE, run from the bundle folder (or set --bundle_root DIR), or pass --allow_untrained true "
        "to run with random weights knowingly (tests only: outputs are not meaningful)"
    )


def choose_weights(
    network: nn.Module, path: str | os.PathLike | None, load: bool = True, allow_untrained: bool = False
) -> WeightsChoice:
    """Decide how ``network`` gets its weights; a network with parameters never runs untrained by accident.

    Args:
        network: the configured network (a parameter-free rule such as mean fusion needs no weights).
        path: the weights file.
        load: load ``path`` (``load_pretrain``); ``False`` for a learnable network needs ``allow_untrained``.
        allow_untrained: run a learnable network with its random initialisation when there are no weights.

    Raises:
        FileNotFoundError: ``load`` and ``path`` does not exist (the message names it and the fixes).
        ValueError: ``load`` is ``False`` for a learnable network without ``allow_untrained``.
    """
    if not any(p.numel() for p in network.parameters()):
        return WeightsChoice(False, False, f"none needed ({type(network).__name__} has no parameters)")
    if load and path is not None and os.path.isfile(path):
        return WeightsChoice(True, False, os.fspath(path))
    if not allow_untrained:
        if load:
            raise FileNotFoundError(missing_weights_message(path if path is not None else "(none given)"))
        raise ValueError(
            f"load_pretrain is false, so {type(network).__name__} would fuse with random weights; pass "
            "--load_pretrain true with --ckpt_path FILE, or --allow_untrained true to run untrained knowingly"
        )
    note = f"UNTRAINED: random initialisation (--allow_untrained true; no weights loaded from {path})"
    logger.warning("%s -- outputs are not meaningful", note)
    return WeightsChoice(False, True, note)


def check_weights(network: nn.Module | None, path: str | os.PathLike | None, key: str | None = "model") -> None:
    """Check, without loading them, that the weights in ``path`` fit ``network`` (nothing to do for ``None``).

    Used before resuming a training run: a checkpoint of another configuration is then a readable error
    (:func:`load_network_weights`'s message) instead of a key-by-key dump from ``load_state_dict``.
    """
    if network is None or path is None:
        return
    network = getattr(network, "module", network)  # DistributedDataParallel
    _check_match(network, read_state_dict(path, key), path)


def _check_match(
    network: nn.Module, state: Mapping[str, torch.Tensor], path: str | os.PathLike, allow_missing: bool = False
) -> None:
    """Raise ``ValueError`` (counts and examples) when ``state`` does not fit ``network``."""
    expected = network.state_dict()
    missing = [] if allow_missing else [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong_shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensors missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if wrong_shape:
            k = wrong_shape[0]
            parts.append(
                f"{len(wrong_shape)} with other shapes "
                f"(e.g. {k}: file {tuple(state[k].shape)}, network {tuple(expected[k].shape)})"
            )
        raise ValueError(
            f"weights in {os.fspath(path)} do not match the configured {type(network).__name__}: {'; '.join(parts)}. "
            "They were probably trained with another configuration (spatial_dims, features, depth, d_state, "
            "reference_compat); set network_def to match, or use weights trained for this configuration."
        )
