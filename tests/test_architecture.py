"""The import rules the README's Architecture section states, read from the source (no imports run),
and the library's environment reads and process exits, each allowed by name with its reason.

Every ``import``/``from ... import`` of an mmray module is counted, function-level and relative ones
too: a lazy import is still a dependency, and ``from . import x`` is ``mmray.<package>.x``. Each rule
is a function of source text or of a module graph, and a test feeds it a synthetic violation, so a
rule that can no longer fail shows up as a red test rather than as silence.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mmray"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(source: str, module: str, is_package: bool = False) -> set[str]:
    """The mmray modules that ``module`` (with this source) imports: ``from mmray.data import storage``
    and, inside ``mmray.data``, ``from . import storage`` are both ``mmray.data.storage``."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("mmray")}
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, module, is_package)
            if base.startswith("mmray"):
                found.add(base)
                found |= {f"{base}.{a.name}" for a in node.names if _is_module(f"{base}.{a.name}")}
    return found


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The module a ``from`` import names; a relative one counts up from the importing package."""
    if not node.level:
        return node.module or ""
    package = module.split(".") if is_package else module.split(".")[:-1]
    anchor = package[: len(package) - (node.level - 1)]
    return ".".join(anchor + ([node.module] if node.module else []))


def _is_module(name: str) -> bool:
    base = PACKAGE.parent.joinpath(*name.split("."))
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


GRAPH = {
    _module_name(p): _imports(p.read_text(encoding="utf-8"), _module_name(p), p.name == "__init__.py")
    for p in sorted(PACKAGE.rglob("*.py"))
}


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
    assert not _backward_imports(GRAPH, package, forbidden)


def _backward_imports(graph: dict[str, set[str]], package: str, forbidden: list[str]) -> list[str]:
    return sorted(
        f"{module} imports {target}"
        for module, targets in graph.items()
        if _under(module, package)
        for target in targets
        if any(_under(target, f) for f in forbidden)
    )


def test_relative_imports_resolve_and_break_the_rules():
    """``from ..train import loop`` in ``mmray.models.fusion`` is ``mmray.train.loop``: the rule sees it."""
    assert _imports("from . import storage\n", "mmray.data.pipeline") >= {"mmray.data", "mmray.data.storage"}
    assert _imports("from .storage import join\n", "mmray.data", is_package=True) == {"mmray.data.storage"}
    assert _imports("from ..config import Config\n", "mmray.data.storage") == {"mmray.config"}
    graph = {**GRAPH, "mmray.models.fusion": _imports("from ..train import loop\n", "mmray.models.fusion")}
    assert _backward_imports(graph, "mmray.models", ["mmray.train"]) == [
        "mmray.models.fusion imports mmray.train",
        "mmray.models.fusion imports mmray.train.loop",
    ]


def test_models_never_import_ray():
    for path in (PACKAGE / "models").rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not {n for n in names if n == "ray" or n.startswith("ray.")}, path


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or None. A module importing its own package is no edge."""
    modules = set(graph)
    edges = {m: {t for t in graph[m] if t in modules and t != m and not _under(m, t)} for m in modules}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = 1
        for target in sorted(edges[module]):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state and (cycle := visit(target, [*path, target])):
                return cycle
        state[module] = 2
        return None

    for module in sorted(modules):
        if module not in state and (cycle := visit(module, [module])):
            return cycle
    return None


def test_the_module_graph_has_no_cycle():
    assert _find_cycle(GRAPH) is None


def test_a_relative_import_that_closes_a_cycle_is_found():
    """``mmray.data.storage`` imports ``mmray.config``; a relative import back from config closes a loop."""
    assert "mmray.config" in GRAPH["mmray.data.storage"]
    graph = {**GRAPH, "mmray.config": _imports("from .data import storage\n", "mmray.config")}
    assert _find_cycle(graph) == ["mmray.config", "mmray.data.storage", "mmray.config"]


# --------------------------------------------------------------------------------------------------
# No test hooks: behaviour comes from config, not from environment variables a test sets, and the
# library never ends its own process. What reads the environment or ends / signals a process is named
# here, per (file, enclosing function), with the reason it is not a hook.
# --------------------------------------------------------------------------------------------------

PROCESS_HOOKS = frozenset(
    {
        *("os.environ", "os.environb", "os.getenv", "os.getenvb", "os.putenv", "os.unsetenv"),
        *("os.kill", "os.killpg", "os._exit", "os.abort", "sys.exit", "signal.raise_signal", "signal.pthread_kill"),
        *("builtins.exit", "builtins.quit", "builtins.SystemExit"),
    }
)

ALLOWED_HOOKS: dict[tuple[str, str, str], str] = {
    ("cli.py", "<module>", "sys.exit"): "the `python -m mmray.cli` entrypoint returns main()'s exit code",
    ("cli.py", "main", "os.environ"): "MMRAY_DEBUG, documented: print tracebacks of CLI errors",
    ("console.py", "verbose", "os.environ"): "MMRAY_VERBOSE, documented: Ray's own output on",
    ("console.py", "set_verbose", "os.environ"): "sets MMRAY_VERBOSE so processes mmray starts inherit it",
    ("console.py", "progress_interval", "os.environ"): "MMRAY_PROGRESS_INTERVAL, documented: log cadence",
    ("data/storage.py", "redact", "os.environ"): "AWS secret variables' values, to scrub them from messages",
    ("data/storage.py", "_s3_settings", "os.environ"): "standard AWS endpoint/region variables when unset in config",
    ("runtime.py", "init_ray", "os.environ"): "RAY_ADDRESS (Ray's convention); RAY_AUTH_MODE off when embedded",
    ("score/lease.py", "record_alive", "os.kill"): "signal 0: asks whether a lease holder's PID is alive",
    ("train/tracking.py", "MlflowTracker.__init__", "os.environ"): "MLFLOW_ALLOW_FILE_STORE for a file store URI",
    ("train/tune/sweep.py", "_keep_driver_cwd", "os.environ"): "RAY_CHDIR_TO_TRIAL_DIR=0 so trials keep relative paths",
}


def process_hooks(source: str) -> set[tuple[str, str]]:
    """``(enclosing function, name)`` for each environment access or process exit/signal in ``source``,
    through any import alias (``from os import environ``, ``import sys as s``; ``s.exit`` is ``sys.exit``)."""
    tree = ast.parse(source)
    aliases = {name: f"builtins.{name}" for name in ("exit", "quit", "SystemExit")}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {
                a.asname or a.name.split(".")[0]: a.name if a.asname else a.name.split(".")[0] for a in node.names
            }
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            aliases |= {a.asname or a.name: f"{node.module}.{a.name}" for a in node.names}

    def dotted(node: ast.AST) -> str | None:
        if isinstance(node, ast.Name):
            return aliases.get(node.id)
        if isinstance(node, ast.Attribute) and (base := dotted(node.value)):
            return f"{base}.{node.attr}"
        return None

    found = set()

    def visit(node: ast.AST, scope: str) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            scope = f"{scope}.{node.name}" if scope != "<module>" else node.name
        if (name := dotted(node)) in PROCESS_HOOKS:
            found.add((scope, name))
            return
        for child in ast.iter_child_nodes(node):
            visit(child, scope)

    visit(tree, "<module>")
    return found


def test_no_test_hooks_in_the_library():
    found = {
        (path.relative_to(PACKAGE).as_posix(), scope, name)
        for path in sorted(PACKAGE.rglob("*.py"))
        for scope, name in process_hooks(path.read_text(encoding="utf-8"))
    }
    assert sorted(found - set(ALLOWED_HOOKS)) == []  # new: config instead, or allow it above with a reason
    assert sorted(set(ALLOWED_HOOKS) - found) == []  # gone: drop it from the list


@pytest.mark.parametrize(
    "source, found",
    [
        (
            "import os, signal\ndef step():\n    if os.environ.get('MMRAY_FAULT'):\n"
            "        os.kill(os.getpid(), signal.SIGKILL)\n",
            {("step", "os.environ"), ("step", "os.kill")},
        ),
        ("import sys\nclass Loop:\n    def run(self):\n        sys.exit(43)\n", {("Loop.run", "sys.exit")}),
        ("import os as o\nx = o.getenv('X')\n", {("<module>", "os.getenv")}),
        (
            "from os import _exit, environ\ndef f():\n    environ['A']\n    _exit(1)\n",
            {("f", "os.environ"), ("f", "os._exit")},
        ),
        ("def f():\n    raise SystemExit(2)\n", {("f", "builtins.SystemExit")}),
        ("import os\nos.path.join('a', 'b')\nenviron = {}\nenviron.get('x')\n", set()),
    ],
)
def test_process_hooks_are_found_however_written(source, found):
    assert process_hooks(source) == found


@pytest.mark.parametrize("init", sorted(PACKAGE.rglob("__init__.py")), ids=lambda p: _module_name(p))
def test_every_name_a_package_exports_exists(init):
    """``__all__`` of each package names what it has: a module renamed or removed leaves no stale name."""
    import importlib
    import importlib.util

    package = importlib.import_module(_module_name(init))
    for name in getattr(package, "__all__", []):
        assert hasattr(package, name) or importlib.util.find_spec(f"{package.__name__}.{name}"), name
