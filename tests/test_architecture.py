"""The import rules the README's Architecture section states, read from the source (no imports run).

Every ``import``/``from ... import`` of an mmray module is counted, function-level ones too: a lazy
import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mmray"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The mmray modules ``path`` imports (``from mmray.data import storage`` -> ``mmray.data.storage``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("mmray")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mmray"):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names if _is_module(f"{node.module}.{a.name}")}
    return found


def _is_module(name: str) -> bool:
    base = PACKAGE.parent.joinpath(*name.split("."))
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


GRAPH = {_module_name(p): _imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def _under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


@pytest.mark.parametrize(
    "package, forbidden",
    [
        ("mmray.models", ["mmray.train", "mmray.score", "mmray.checkpoint", "mmray.cli"]),
        ("mmray.data", ["mmray.models", "mmray.train", "mmray.score", "mmray.checkpoint", "mmray.cli"]),
        ("mmray.score", ["mmray.train", "mmray.cli"]),
        ("mmray.train", ["mmray.score", "mmray.cli"]),
        ("mmray.config", ["mmray.data", "mmray.models", "mmray.train", "mmray.score"]),
    ],
)
def test_imports_go_one_way(package, forbidden):
    bad = sorted(
        f"{module} imports {target}"
        for module, targets in GRAPH.items()
        if _under(module, package)
        for target in targets
        if any(_under(target, f) for f in forbidden)
    )
    assert not bad


def test_models_never_import_ray():
    for path in (PACKAGE / "models").rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not {n for n in names if n == "ray" or n.startswith("ray.")}, path


def test_the_module_graph_has_no_cycle():
    modules = set(GRAPH)
    edges = {m: {t for t in GRAPH[m] if t in modules and t != m and not _under(m, t)} for m in modules}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(edges[module]):
            if state.get(target) == 1:
                cycle = path[path.index(target) :] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(modules):
        if module not in state:
            visit(module, [module])


def test_no_test_hooks_in_the_library():
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert "MMRAY_FAULT" not in text and "os._exit" not in text, path


@pytest.mark.parametrize("init", sorted(PACKAGE.rglob("__init__.py")), ids=lambda p: _module_name(p))
def test_every_name_a_package_exports_exists(init):
    """``__all__`` of each package names what it has: a module renamed or removed leaves no stale name."""
    import importlib
    import importlib.util

    package = importlib.import_module(_module_name(init))
    for name in getattr(package, "__all__", []):
        assert hasattr(package, name) or importlib.util.find_spec(f"{package.__name__}.{name}"), name
