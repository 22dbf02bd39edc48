"""The package's layout: no import cycle among varjax modules (imports inside functions included), and a short
top level (the rest lives in core/, data/, models/, tasks/, sampling/, eval/, interop/, scaling/)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "varjax"
MAX_TOP_LEVEL_MODULES = 6


def _module_name(path: Path) -> str:
    """``varjax.core.mesh`` for varjax/core/mesh.py, ``varjax.tasks`` for varjax/tasks/__init__.py; the config
    files are installed as ``varjax.configs``."""
    if path.is_relative_to(PACKAGE):
        parts = ("varjax", *path.relative_to(PACKAGE).with_suffix("").parts)
    else:
        parts = ("varjax", "configs", *path.relative_to(ROOT / "configs").with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    files = list(PACKAGE.rglob("*.py")) + list((ROOT / "configs").glob("*.py"))
    return {_module_name(p): p for p in files}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The varjax modules ``path`` imports, at any depth of its syntax tree (lazy imports in functions too)."""
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's package
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # `from varjax.core import mesh` imports the module varjax.core.mesh; `from varjax.config import load`
            # imports varjax.config
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in known else module for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known and "." in t:  # `import varjax.models.var` names a module; trim attributes
                t = t.rsplit(".", 1)[0]
            if t in known and t != name:
                out.add(t)
    return out


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, set(mods)) for name, path in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or None (depth-first search, iterative)."""
    WHITE, GREY, BLACK = 0, 1, 2
    color = dict.fromkeys(graph, WHITE)
    for start in sorted(graph):
        if color[start] != WHITE:
            continue
        stack, path = [(start, iter(sorted(graph[start])))], [start]
        color[start] = GREY
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop()
                path.pop()
                color[node] = BLACK
            elif color[child] == GREY:
                return path[path.index(child):] + [child]
            elif color[child] == WHITE:
                color[child] = GREY
                stack.append((child, iter(sorted(graph[child]))))
                path.append(child)
    return None


def test_the_graph_sees_lazy_and_relative_imports():
    graph = import_graph()
    assert "varjax.core.model_dir" in graph["varjax.train"]  # a module-level import
    assert "varjax.data.pipeline" in graph["varjax.data.sources"]  # only imported inside functions
    assert "varjax.tasks.var" in graph["varjax.tasks"]  # a package's __init__
    assert "varjax.configs.common" in graph["varjax.configs.var_shapes"]
    # and the search finds a cycle when there is one, lazy edges included
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_few_modules_at_the_top_of_the_package():
    top = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__"))
    assert len(top) <= MAX_TOP_LEVEL_MODULES, top
    # everything else is in a package of its own role
    assert {"core", "data", "models", "tasks", "sampling", "eval", "interop"} <= {
        p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
