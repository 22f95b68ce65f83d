"""The packages' import graph has no cycle: every import statement counts, also one inside a function (a cycle
hidden by a function-level import still ties two modules together and breaks the day someone moves the import up)."""

import ast
from pathlib import Path
from typing import Dict, List, Set

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "cgd", "reir", "sreml", "irt", "fastretri", "benchmarks")
SCRIPTS = ("data_utils",)


def module_files() -> Dict[str, Path]:
    """Dotted module name -> file, for the packages (``pkg/__init__.py`` is ``pkg``) and the top-level scripts."""
    files = {name: REPO / f"{name}.py" for name in SCRIPTS}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def imported(module: str, path: Path, known: Set[str]) -> Set[str]:
    """The project modules that ``module``'s import statements (anywhere in the file) load."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    targets: Set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: up from this module's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:  # `import a.b.c` of a non-module attribute path: its module
                name = name.rpartition(".")[0]
            parts = name.split(".") if name else []
            for i in range(1, len(parts) + 1):  # a module loads its packages first
                target = ".".join(parts[:i])
                if target in known and not module.startswith(target + "."):
                    targets.add(target)
    targets.discard(module)
    return targets


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """One cycle (a path returning to its start) per strongly connected component of more than one module."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    components: List[List[str]] = []

    def connect(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return [_path_through(graph, set(c), c[0]) for c in components]


def _path_through(graph: Dict[str, Set[str]], members: Set[str], start: str) -> List[str]:
    """A shortest cycle from ``start`` back to itself inside one component (breadth first)."""
    parent: Dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [start] + path[::-1][1:] + [start] if len(path) > 1 else [start, v, start]
                if w not in parent:
                    parent[w] = v
                    following.append(w)
        frontier = following
    return [start]


def import_graph() -> Dict[str, Set[str]]:
    files = module_files()
    return {module: imported(module, path, set(files)) for module, path in files.items()}


def test_the_walker_sees_imports_inside_functions_and_relative_ones(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from pkg.b import thing\n    return thing\n")
    (pkg / "b.py").write_text("from . import c\nimport pkg.c as cc\n")
    (pkg / "c.py").write_text("if True:\n    from .a import f\n")
    known = {"pkg", "pkg.a", "pkg.b", "pkg.c"}
    graph = {m: imported(m, pkg / f"{m.split('.')[-1]}.py", known) for m in ("pkg.a", "pkg.b", "pkg.c")}
    assert graph == {"pkg.a": {"pkg.b"}, "pkg.b": {"pkg.c"}, "pkg.c": {"pkg.a"}}
    assert cycles({**graph, "pkg": set()}) == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"]]
    assert cycles({"x": {"y"}, "y": set()}) == []


def test_no_import_cycle_between_modules():
    graph = import_graph()
    assert {"common.errors", "cgd.train", "data_utils", "benchmarks.gpu_check"} <= set(graph)
    found = cycles(graph)
    assert found == [], "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def _reached(graph: Dict[str, Set[str]], start: str) -> Set[str]:
    seen: Set[str] = set()
    todo = [start]
    while todo:
        for w in graph[todo.pop()] - seen:
            seen.add(w)
            todo.append(w)
    return seen


def test_answering_queries_never_loads_the_training_loop():
    """inference, the server and export load runs through common.runs, not through the training engine."""
    graph = import_graph()
    for script in ("inference", "serve", "export"):
        for method in ("cgd", "reir", "sreml", "irt", "fastretri"):
            assert "common.engine" not in _reached(graph, f"{method}.{script}"), f"{method}/{script}.py"
    assert "common.runs" in graph["common.engine"]  # the engine writes the files runs.py names
