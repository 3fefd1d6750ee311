"""The package's import graph: no cycle (module- and function-level imports), and importing
any module leaves the process environment alone."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from helpers import ROOT

PACKAGE = ROOT / "mlssp_jax"
THIRD_PARTY = ("jax", "flax.linen", "optax", "orbax.checkpoint", "grain", "scipy.ndimage",
               "nibabel", "matplotlib.figure", "tqdm")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str], package: str) -> set[str]:
    """Package modules that ``path`` (in ``package``) imports anywhere (top level or inside
    functions); relative imports are resolved against ``package``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        found |= {name for name in names if name in modules}
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (a package's ``__init__`` counts as a module)."""
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(paths)
    return {name: _imports(path, modules, _package(name, path)) - {name}
            for name, path in paths.items()}


def _package(name: str, path: Path) -> str:
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for child in sorted(graph[node]):
            if state.get(child) == 1:
                return path[path.index(child):] + [child]
            if child not in state and (cycle := visit(child)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_sees_function_level_imports(tmp_path):
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from mlssp_jax import train_lib\n")
    assert _imports(source, {"mlssp_jax.train_lib"}, "mlssp_jax") == {"mlssp_jax.train_lib"}


def test_package_has_no_import_cycle():
    graph = import_graph()
    assert {"mlssp_jax.checkpointing", "mlssp_jax.ops.conv_ops"} <= set(graph)
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_importing_any_module_leaves_the_environment_alone():
    names = sorted(name for name in import_graph() if name != "mlssp_jax")
    # third-party imports set variables of their own (grain: TF_CPP_MIN_LOG_LEVEL): import
    # them first, then compare
    code = ("import importlib, os, sys\n"
            f"for name in {THIRD_PARTY!r}:\n    importlib.import_module(name)\n"
            "before = dict(os.environ)\n"
            f"for name in {names!r}:\n    importlib.import_module(name)\n"
            "changed = sorted(k for k in set(before) | set(os.environ)"
            " if before.get(k) != os.environ.get(k))\n"
            "sys.exit(f'environment changed: {changed}' if changed else 0)\n")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
