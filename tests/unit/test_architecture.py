"""The layers and the import graph, read statically from the source: every import counts, at module level, inside a
function (lazy) or under TYPE_CHECKING, since each is a dependency someone must understand.

instantid_core <- instantid_app <- (deployments | batch: neither imports the other) <- instantid_cli, bench, tests.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PRODUCT = ("instantid_core", "instantid_app", "deployments", "batch", "instantid_cli")
ABOVE = {  # package -> top-level names it must never import
    "instantid_core": {"instantid_app", "deployments", "batch", "instantid_cli", "bench", "tests", "testkit",
                       "cluster", "ray", "fastapi", "starlette"},
    "instantid_app": {"deployments", "batch", "instantid_cli", "bench", "tests", "testkit", "fastapi"},
    "deployments": {"batch", "instantid_cli", "bench", "tests", "testkit"},
    "batch": {"deployments", "instantid_cli", "bench", "tests", "testkit"},
    "instantid_cli": {"deployments", "bench", "tests", "testkit"},
    "bench": {"tests"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, *, at_import_only: bool = False) -> Iterator[str]:
    """Absolute names of every module `path` imports (relative imports resolved), wherever the import stands; with
    `at_import_only`, those its top-level statements import (what importing it costs at once)."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    for node in (tree.body if at_import_only else ast.walk(tree)):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            # `from pkg import name` may import the submodule pkg.name: count both, the graph keeps those that exist
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)


def sources(*packages: str) -> list[Path]:
    return sorted(p for package in packages for p in (REPO / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(ABOVE))
def test_each_layer_imports_nothing_above_it(package: str) -> None:
    wrong = sorted({f"{module_name(path)} imports {name}" for path in sources(package)
                    for name in imports_of(path) if name.split(".")[0] in ABOVE[package]})
    assert wrong == []


def product_graph() -> dict[str, set[str]]:
    modules = {module_name(path): path for path in sources(*PRODUCT)}
    return {name: {imported for imported in imports_of(path) if imported in modules and imported != name}
            for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` (a list of modules that leads back to its first), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_cycle_finder_finds_a_cycle_and_accepts_a_tree() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_product_code_has_no_import_cycle() -> None:
    # A package's __init__ importing its own submodules is no cycle of dependencies between modules.
    graph = {name: {m for m in deps if not name.startswith(m + ".")} for name, deps in product_graph().items()}
    assert find_cycle(graph) is None


def test_the_lower_layers_name_no_module_above_them_in_a_string() -> None:
    # An import path in a string ("deployments.x:Y", what Serve's policy_function takes) is a dependency the
    # import graph cannot see.
    pattern = re.compile(r"^(deployments|batch|instantid_cli)(\.\w+)+(:\w+)?$")
    named = [f"{module_name(path)}: {node.value}" for path in sources("instantid_core", "instantid_app")
             for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Constant)
             and isinstance(node.value, str) and pattern.match(node.value)]
    assert named == []



MODEL_LIBRARIES = {"torch", "diffusers", "transformers", "compel", "peft", "insightface", "onnxruntime", "cv2"}
# No deployment module loads a model library when imported: Serve's app build imports deployments.app (on the
# controller for `serve deploy`, in the driver for `serve.run`) only to bind the graph, and the replicas that only
# route, store and queue hold no model. The stages that hold one import it in their constructors. A model library
# costs seconds of CPU and hundreds of MB at every import (deployments.app: 12 s and 670 MB with them, 2.4 s and
# 225 MB without, on this machine).
MODEL_FREE = ("deployments.app", "deployments.ingress", "deployments.writer", "deployments.jobs.consumer",
              "deployments.denoiser", "deployments.face", "deployments.prompt", "deployments.safety")


def loaded_at_import(module: str) -> set[str]:
    """Every module importing `module` loads at once (its packages' __init__s included), following our own modules
    through their top-level imports; third-party modules are reported, not followed."""
    paths = {module_name(path): path for path in sources(*PRODUCT)}
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))  # a module's packages run first
        if name in paths:
            todo.extend(imports_of(paths[name], at_import_only=True))
    return seen


@pytest.mark.parametrize("module", MODEL_FREE)
def test_deployment_modules_import_no_model_library(module: str) -> None:
    assert sorted({name for name in loaded_at_import(module) if name.split(".")[0] in MODEL_LIBRARIES}) == []


def test_the_model_import_check_sees_a_model_library() -> None:
    assert "torch" in loaded_at_import("instantid_core.denoise")
