"""Command-line guards of the study config (this bundle's copy of the ClinicalFMamba bundle's ``scripts/cli.py``:
the companion bundle imports nothing from the fusion bundle's package).

- :func:`check_override_keys`: command-line overrides are checked against the ids of the configs they
  override. MONAI adds any unknown key to the config without a word, so ``--datset_dir mydata`` would be
  ignored and the embedded samples fused instead; here it stops the run with the closest known id
  (``did you mean --dataset_dir?``). Nested ids (``--train#trainer#max_epochs``) are looked up level by
  level; a new keyword of a component (``--network_def#features``) is accepted when the component's
  ``_target_`` takes it.
- :func:`install_error_hook`: a user-facing error (bad input, missing weights, unknown option, failed pairs)
  ends the process with one ``error: ...`` line and exit status 1 instead of MONAI's double
  ``Failed to instantiate component`` traceback. The traceback is logged at DEBUG, and printed in full with
  the environment variable ``CLINICALFMAMBA_TRACEBACK=1``. Other exceptions (bugs) keep their traceback.
- :func:`guard_run`: both, for ``python -m monai.bundle run`` (and ``ckpt_export`` / ``onnx_export``): every
  config calls it first in ``initialize`` (``configs/export.json``, whose commands run no ``initialize``, through
  ``network_def``'s ``_requires_``; the companion bundle's ``study.json`` once the root bundle is importable).
  In other processes (a ``ConfigWorkflow`` built in Python, tests) it does nothing: the caller passes its
  overrides as keyword arguments and sees the exceptions itself.
"""

from __future__ import annotations

import ast
import difflib
import inspect
import logging
import os
import sys
import traceback
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = [
    "RunFailedError",
    "UnknownOverrideError",
    "USER_ERRORS",
    "bundle_run_arguments",
    "check_command_line",
    "command_arguments",
    "check_override_keys",
    "guard_run",
    "install_error_hook",
    "traceback_wanted",
    "user_message",
]

logger = logging.getLogger("ClinicalFMamba")

TRACEBACK_ENV = "CLINICALFMAMBA_TRACEBACK"
ID_SEP = "#"
# keys MONAI reads from any component dict
RESERVED_KEYS = ("_target_", "_disabled_", "_requires_", "_mode_", "_desc_")
# the monai.bundle commands whose other keyword arguments are config overrides
COMMANDS = ("run", "run_workflow", "ckpt_export", "onnx_export", "trt_export")
# MONAI's wrappers around the error that matters
_WRAPPER_PREFIXES = ("Failed to instantiate component", "Failed to evaluate")


class UnknownOverrideError(ValueError):
    """A command-line override names no id of the configs (a typo): nothing has run."""


class RunFailedError(RuntimeError):
    """The run finished, but some (or all) of its pairs failed; the message is the run's summary."""


# exception types whose message is meant for the user: printed as one line, without traceback
USER_ERRORS: tuple[type[BaseException], ...] = (
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
    ValueError,
    NotImplementedError,
    RunFailedError,
)


# --- override keys -----------------------------------------------------------------------------------------


def _target_parameters(target: Any) -> tuple[list[str], bool] | None:
    """``(parameter names, takes **kwargs)`` of a component's ``_target_``; ``None`` when it cannot be told."""
    if not isinstance(target, str) or target.startswith(("$", "@", "%")):
        return None
    try:
        from pydoc import locate

        from monai.bundle.config_item import ComponentLocator

        name = ComponentLocator().get_component_module_name(target)
        if isinstance(name, list):
            name = name[0] if name else None
        obj = locate(f"{name}.{target}") if isinstance(name, str) else locate(target)
        if obj is None:
            return None
        signatures = [inspect.signature(obj)]
        if inspect.isclass(obj) and obj.__module__.startswith("scripts."):
            # the bundle's own subclasses pass **kwargs on to their parent: follow them to the class that takes them
            inits = [k.__dict__["__init__"] for k in obj.__mro__[1:] if "__init__" in k.__dict__]
            own = [f for f in inits if (getattr(f, "__module__", "") or "").startswith("scripts.")]
            signatures += [inspect.signature(f) for f in own]
    except Exception:  # noqa: BLE001 - unknown target: MONAI will report it when it instantiates
        return None
    names: list[str] = []
    for signature in signatures:
        params = signature.parameters.values()
        names += [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name != "self"]
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            return names, False
    return names, len(signatures) == 1  # only **kwargs that reach a class outside the bundle are open-ended


def _join(prefix: str, key: str) -> str:
    return f"{prefix}{ID_SEP}{key}" if prefix else key


def _lookup(config: Any, key: str) -> list[str] | None:
    """``None`` when ``key`` (``a#b#c``) names an id of ``config`` or a keyword its component takes; else the
    known ids at the level where the lookup failed (full ids, for the suggestion)."""
    parts = key.split(ID_SEP)
    node = config
    for depth, part in enumerate(parts):
        prefix = ID_SEP.join(parts[:depth])
        if isinstance(node, Mapping):
            if part in node:
                node = node[part]
                continue
            if part in RESERVED_KEYS or (depth == 0 and part == "_meta_"):
                return None
            known = [str(k) for k in node]
            if "_target_" in node:
                signature = _target_parameters(node["_target_"])
                if signature is None or signature[1] or part in signature[0]:
                    return None  # a keyword the component takes (or one that cannot be checked)
                known += [p for p in signature[0] if p not in known]
            return [_join(prefix, k) for k in known]
        if isinstance(node, list):
            if part.isdigit() and int(part) < len(node):
                node = node[int(part)]
                continue
            return [_join(prefix, str(i)) for i in range(len(node))]
        return [prefix] if prefix else []  # a value (string, number, expression) has no sub-ids
    return None


def _all_ids(config: Any, prefix: str = "", limit: int = 5000) -> list[str]:
    ids: list[str] = []
    stack: list[tuple[str, Any]] = [(prefix, config)]
    while stack and len(ids) < limit:
        pre, node = stack.pop()
        items = node.items() if isinstance(node, Mapping) else enumerate(node) if isinstance(node, list) else ()
        for k, v in items:
            sub = _join(pre, str(k))
            ids.append(sub)
            stack.append((sub, v))
    return ids


def _suggest(key: str, candidates: Sequence[str], config: Any) -> str | None:
    for pool, cutoff in ((candidates, 0.6), (_all_ids(config), 0.75)):
        match = difflib.get_close_matches(key, list(pool), n=1, cutoff=cutoff)
        if match:
            return match[0]
    return None


def _parse_value(text: Any) -> Any:
    if not isinstance(text, str):
        return text
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def check_override_keys(
    config: Mapping[str, Any],
    overrides: Mapping[str, Any] | Iterable[str],
    configs: str = "the configs",
    allowed: Iterable[str] = (),
) -> None:
    """Raise :class:`UnknownOverrideError` when an override key is no id of ``config``.

    Args:
        config: the merged content of the config files (before the overrides).
        overrides: ``{id: value}`` in command-line order (or the ids alone); ``#`` separates nested ids.
            A dict value given to an id counts for the ids below it that follow it.
        configs: how to name the configs in the message (their files).
        allowed: ids accepted although the configs lack them.

    Raises:
        UnknownOverrideError: naming every unknown key, each with the closest known id.
    """
    import copy

    current = copy.deepcopy(dict(config))
    values = overrides if isinstance(overrides, Mapping) else dict.fromkeys(overrides)
    allowed = set(allowed)
    problems = []
    for raw_key, value in values.items():
        key = str(raw_key).replace("::", ID_SEP)
        known = None if key in allowed else _lookup(current, key)
        if known is not None:
            hint = _suggest(key, known, current)
            problems.append(f"--{key}" + (f" (did you mean --{hint}?)" if hint else ""))
            continue
        parsed = _parse_value(value)
        if isinstance(parsed, (Mapping, list)):  # later overrides may go below it
            parent, _, last = key.rpartition(ID_SEP)
            node = current
            for part in parent.split(ID_SEP) if parent else ():
                node = node[int(part)] if isinstance(node, list) else node.get(part, {})
            if isinstance(node, dict):
                node[last] = parsed
    if problems:
        raise UnknownOverrideError(
            f"unknown option{'s' if len(problems) > 1 else ''} {'; '.join(problems)}: not an id of {configs}, "
            "so it would be ignored; nothing was run. Check the spelling (ids are listed in the config files; "
            "nested ids use '#', e.g. --train#trainer#max_epochs)."
        )


def _is_flag(arg: str) -> bool:
    """fire's rule: a flag starts with '-' and is not a negative number."""
    return arg.startswith("--") or (len(arg) > 1 and arg[0] == "-" and arg[1].isalpha())


def bundle_run_arguments(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    """The keyword arguments of a ``python -m monai.bundle run ...`` command line (or ``ckpt_export``, ...,
    :data:`COMMANDS`), parsed as fire does (``--key value``, ``--key=value``, ``--flag``; ``-`` in keys read as
    ``_``), with the command under ``"__command__"``; ``None`` for another process.

    Values stay strings. Keys of ``--args_file`` come first, as MONAI lets the command line override them.
    """
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or Path(argv[0]).parts[-3:] != ("monai", "bundle", "__main__.py") or argv[1] not in COMMANDS:
        return None
    args = argv[2:]
    if "--" in args:  # fire's own flags follow the last '--'
        args = args[: len(args) - 1 - args[::-1].index("--")]
    kwargs: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if not _is_flag(arg):
            continue  # positional: run_id, init_id, ...
        key, eq, value = arg.lstrip("-").partition("=")
        if not eq:
            if i < len(args) and not _is_flag(args[i]):
                value, i = args[i], i + 1
            else:
                value = "True"
        kwargs[key.replace("-", "_")] = value
    args_file = kwargs.get("args_file")
    if args_file:
        from monai.bundle import ConfigParser

        kwargs = {**ConfigParser.load_config_file(str(_parse_value(args_file))), **kwargs}
    return {"__command__": argv[1], **kwargs}


def command_arguments(command: str) -> set[str]:
    """Keyword arguments of ``monai.bundle``'s own ``command`` (and of the workflow it builds): not overrides."""
    import monai.bundle.scripts as bundle_scripts
    from monai.bundle import ConfigWorkflow

    names: set[str] = set()
    for fn in (getattr(bundle_scripts, command), bundle_scripts.create_workflow, ConfigWorkflow.__init__):
        params = inspect.signature(fn).parameters.values()
        names |= {p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    return names - {"self"}


def _config_files(value: Any) -> list[str]:
    value = _parse_value(value)
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]


def check_command_line(argv: Sequence[str] | None = None, allowed: Iterable[str] = ()) -> None:
    """For ``python -m monai.bundle run``: check the command line's override keys against its config files
    (:func:`check_override_keys`). Any other process: nothing to check."""
    kwargs = bundle_run_arguments(argv)
    if not kwargs or "config_file" not in kwargs:
        return
    from monai.bundle import ConfigParser

    files = _config_files(kwargs["config_file"])
    parser = ConfigParser()
    parser.read_config(files)
    own = command_arguments(kwargs["__command__"]) | {"__command__"}
    overrides = {k: v for k, v in kwargs.items() if k not in own}
    check_override_keys(
        parser.get(), overrides, configs=" + ".join(files), allowed=set(allowed) | tracking_ids(kwargs.get("tracking"))
    )


def tracking_ids(tracking: Any) -> set[str]:
    """Ids that ``--tracking NAME`` adds to the config (MONAI's experiment-management settings, e.g. MLflow's
    ``tracking_uri``, ``experiment_name``, ``run_name``), so they are valid overrides with it; none without it."""
    if not tracking:
        return set()
    from monai.bundle.utils import DEFAULT_EXP_MGMT_SETTINGS

    settings = DEFAULT_EXP_MGMT_SETTINGS.get(str(_parse_value(tracking)))
    return set(settings["configs"]) if settings else set()


# --- errors ----------------------------------------------------------------------------------------------


def _chain(err: BaseException | None) -> list[BaseException]:
    seen: list[BaseException] = []
    while err is not None and all(err is not e for e in seen):
        seen.append(err)
        err = err.__cause__ if err.__cause__ is not None else (None if err.__suppress_context__ else err.__context__)
    return seen


def user_message(err: BaseException) -> str | None:
    """The one-line message of the first user-facing error in ``err``'s cause chain, skipping MONAI's wrappers
    (``Failed to instantiate component ...``); ``None`` when the chain holds none (a bug: keep the traceback)."""
    for e in _chain(err):
        if isinstance(e, RuntimeError) and str(e).startswith(_WRAPPER_PREFIXES):
            continue
        if isinstance(e, USER_ERRORS):
            text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
            if isinstance(e, OSError) and e.filename and str(e.filename) not in text:
                text = f"{text}: {e.filename}"
            return text
        return None
    return None


def traceback_wanted() -> bool:
    """Whether the environment asks for full tracebacks (``CLINICALFMAMBA_TRACEBACK=1``)."""
    return os.environ.get(TRACEBACK_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _hook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    message = None if traceback_wanted() else user_message(exc)
    if message is None:
        sys.__excepthook__(exc_type, exc, tb)
        return
    logger.debug("traceback of the error below:\n%s", "".join(traceback.format_exception(exc_type, exc, tb)))
    print(f"error: {message}", file=sys.stderr)
    print(f"(the full traceback: set {TRACEBACK_ENV}=1)", file=sys.stderr)
    sys.stderr.flush()


def install_error_hook() -> None:
    """Print user-facing errors as one ``error: ...`` line (exit status 1), see the module docstring."""
    sys.excepthook = _hook


def guard_run(allowed: Iterable[str] = (), argv: Sequence[str] | None = None) -> None:
    """First step of every config's ``initialize``: under ``python -m monai.bundle run``, install the error hook
    and refuse unknown override keys before anything runs. Elsewhere: nothing."""
    if bundle_run_arguments(argv) is None:
        return
    install_error_hook()
    check_command_line(argv, allowed=allowed)
