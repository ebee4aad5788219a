"""Module boundaries of ``scripts/``, read from the source with ``ast`` (nothing is imported): the network imports
only the scan engine's public entry points, the plain model imports none of the inference speed layer, and the
import graph has no cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"

#: kernel modules of the scan engine (the ``native`` package builds and binds scan_kernel.c; ``compiled_backend``
#: registers it): its internals, reached only through ``scripts.ssm``'s public entry points
KERNEL_MODULES = {
    "scripts.ssm.compiled_backend",
    "scripts.ssm.native",
    "scripts.ssm.native.binding",
    "scripts.ssm.native.build",
    "scripts.ssm.native.loader",
    "scripts.ssm.native.ops",
    "scripts.ssm.native.selfcheck",
    "scripts.ssm.native.threads",
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in SCRIPTS.rglob("*.py")}


def imports_of(path: Path, known: dict[str, Path]) -> set[str]:
    """The ``scripts.*`` modules that ``path`` imports anywhere in its body (functions included)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # "from package import submodule" imports the submodule; "from module import name" the module
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # "import scripts.ssm.native.ops as o" -> the module itself
                target = target.rpartition(".")[0]
            if target.startswith("scripts") and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(path, known) for name, path in known.items()}


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_reader_sees_relative_lazy_and_package_imports():
    graph = import_graph()
    assert "scripts.ssm.native.ops" in graph["scripts.ssm.native.selfcheck"]  # from . import ops
    assert "scripts.ssm.native.binding" in graph["scripts.ssm.native.ops"]  # from .binding import ...
    assert "scripts.ssm.reference" in graph["scripts.ssm.native.selfcheck"]  # from ..reference import ...
    assert "scripts.ssm.reference" in graph["scripts.ssm"]  # from . import reference, ...
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [frozenset("abc")]


def test_networks_import_no_kernel_module():
    graph = import_graph()
    network_modules = [name for name in graph if name.startswith("scripts.networks")]
    assert "scripts.networks.mamba" in network_modules and "scripts.networks.optimize" in network_modules
    offending = {name: sorted(graph[name] & KERNEL_MODULES) for name in network_modules if graph[name] & KERNEL_MODULES}
    assert not offending, f"scripts/networks must use scripts.ssm's public entry points only: {offending}"
    ssm_internal = {name: sorted(t for t in graph[name] if t.startswith("scripts.ssm.")) for name in network_modules}
    assert not any(ssm_internal.values()), f"import from the scripts.ssm package, not its modules: {ssm_internal}"


@pytest.mark.parametrize("module", ["clinicalfmamba", "blocks", "mamba", "scan_orders"])
def test_the_plain_model_imports_nothing_of_the_inference_speed_layer(module):
    imported = import_graph()[f"scripts.networks.{module}"]
    speed = {"scripts.networks.optimize", "scripts.networks.rewrites", "scripts.networks.packed_conv"}
    assert not imported & speed, f"scripts/networks/{module}.py imports {sorted(imported & speed)}"


def private_names_used(path: Path) -> list[str]:
    """Private names (``_x``, not dunders) that ``path`` takes from other ``scripts`` modules: imported
    (``from .m import _x``) or read as an attribute of an imported module (``from . import m; m._x``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found, modules_bound = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("scripts")):
            found += [f"{node.module or '.'}.{a.name}" for a in node.names if a.name.startswith("_")]
            modules_bound |= {a.asname or a.name for a in node.names}
        elif isinstance(node, ast.Import):
            modules_bound |= {a.asname or a.name.split(".")[0] for a in node.names if a.name.startswith("scripts")}
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
            and isinstance(node.value, ast.Name)
            and node.value.id in modules_bound
        ):
            found.append(f"{node.value.id}.{node.attr}")
    return found


def test_private_name_reader_sees_imports_and_attributes(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("from . import ops\nfrom .build import _key, SOURCE\nimport torch\nx = ops._run, torch._C\n")
    assert private_names_used(source) == ["build._key", "ops._run"]


def test_kernel_modules_are_all_listed_and_use_no_private_names_of_each_other():
    graph = import_graph()
    native = {name for name in graph if name.startswith("scripts.ssm.native")}
    assert native <= KERNEL_MODULES, f"add to KERNEL_MODULES: {sorted(native - KERNEL_MODULES)}"
    for name in sorted(name for name in graph if name.startswith("scripts.ssm")):
        private = private_names_used(modules()[name])
        assert not private, f"{name} uses private names of other modules: {private}"


def test_scripts_have_no_import_cycle():
    found = cycles(import_graph())
    assert not found, f"import cycle(s) in scripts/: {[sorted(c) for c in found]}"


def test_the_companion_bundle_cli_copy_matches_the_fusion_bundle_cli() -> None:
    """bundle/tumor_classification/scripts/cli.py is a copy (the companion imports nothing from the fusion bundle):
    apart from its opening docstring line(s), it must stay equal to scripts/cli.py."""
    root = Path(__file__).resolve().parents[1]
    original = (root / "scripts" / "cli.py").read_text().splitlines()
    copy = (root / "bundle" / "tumor_classification" / "scripts" / "cli.py").read_text().splitlines()
    assert copy[2:] == original[1:], "update bundle/tumor_classification/scripts/cli.py from scripts/cli.py"
