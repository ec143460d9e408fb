"""The library's layout, read from its source with `ast` (nothing is imported): layers, no import circle, no import of
`elite` inside a function, small files. House style: the method (`elite.model`) does not import the data plumbing
(`elite.data`, `elite.jobs`), the plumbing does not import the jobs above it, and the library never imports the
front doors (`flows`, `elite_cli`) or Prefect; an import inside a function is for a heavy optional dependency, never
to dodge a circle."""

from __future__ import annotations

import ast
import itertools
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LIBRARY = REPO / "elite"
MAX_LINES = 450
# (files under this folder, must not import these modules or anything below them, why)
LAYERS = (
    ("elite/model/", ("elite.data", "elite.jobs"), "the method does not import the data plumbing or the jobs"),
    ("elite/data/", ("elite.jobs",), "the data plumbing does not import the jobs"),
    ("elite/", ("flows", "elite_cli", "prefect"), "the library never imports the flows, the CLI or Prefect"),
)


@dataclass(frozen=True)
class Import:
    file: str  # relative to the repo, e.g. "elite/model/encoder.py"
    line: int
    targets: tuple[str, ...]  # the modules this statement imports, resolved to absolute dotted names
    in_function: bool
    lazy_init: bool  # in elite/__init__.py's TYPE_CHECKING block or its lazy `__getattr__`: not part of the graph

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _library_files() -> list[Path]:
    return sorted(p for p in LIBRARY.rglob("*.py") if "__pycache__" not in p.parts)


MODULES = {_module_name(p): p for p in _library_files()}
# packages, with or without an __init__.py: `from elite.model import encoder` names the module elite.model.encoder
PACKAGES = {_module_name(p / "__init__.py") for p in [LIBRARY, *LIBRARY.rglob("*")] if p.is_dir()
            and p.name != "__pycache__"}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


class _ImportCollector(ast.NodeVisitor):
    """Every import statement of one file, at module level or nested, with where it sits."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = str(path.relative_to(REPO))
        self.module = _module_name(path)
        self.package = self.module if path.name == "__init__.py" else self.module.rpartition(".")[0]
        self.is_root_init = path == LIBRARY / "__init__.py"
        self.function_depth = 0
        self.lazy_depth = 0
        self.found: list[Import] = []

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> None:
        lazy = self.is_root_init and self.function_depth == 0 and getattr(node, "name", "") == "__getattr__"
        self.function_depth += 1
        self.lazy_depth += lazy
        self.generic_visit(node)
        self.lazy_depth -= lazy
        self.function_depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_If(self, node: ast.If) -> None:
        lazy = self.is_root_init and _is_type_checking(node.test)
        self.visit(node.test)
        self.lazy_depth += lazy
        for child in node.body:
            self.visit(child)
        self.lazy_depth -= lazy
        for child in node.orelse:
            self.visit(child)

    def _add(self, node: ast.stmt, targets: list[str]) -> None:
        self.found.append(Import(self.file, node.lineno, tuple(targets), self.function_depth > 0, self.lazy_depth > 0))

    def visit_Import(self, node: ast.Import) -> None:
        self._add(node, [alias.name for alias in node.names])

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:  # relative: `from . import x`, `from ..data import y`
            base = self.package.split(".")
            base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
            source = ".".join([*base, *([node.module] if node.module else [])])
        else:
            source = node.module or ""
        targets = [source]
        for alias in node.names:  # `from elite.model import encoder` imports the submodule elite.model.encoder
            candidate = f"{source}.{alias.name}"
            if candidate in MODULES or candidate in PACKAGES:
                targets.append(candidate)
        self._add(node, targets)


@dataclass(frozen=True)
class Scan:
    imports: list[Import]
    unparsable: list[str]  # "file: error" for files that are not valid Python


@pytest.fixture(scope="module")
def scan() -> Scan:
    """Every import statement in the library; a file that does not parse is its own failure, not a collection error."""
    imports: list[Import] = []
    unparsable: list[str] = []
    for path in _library_files():
        try:
            tree = ast.parse(path.read_text(), filename=str(path))
        except SyntaxError as err:
            unparsable.append(f"{path.relative_to(REPO)}:{err.lineno}: {err.msg}")
            continue
        collector = _ImportCollector(path)
        collector.visit(tree)
        imports += collector.found
    return Scan(imports, unparsable)


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _graph(imports: list[Import]) -> dict[str, dict[str, Import]]:
    """module -> {imported elite module -> the first statement importing it}; only modules that are files."""
    graph: dict[str, dict[str, Import]] = {name: {} for name in MODULES}
    for imp in imports:
        if imp.lazy_init:
            continue
        source = _module_name(REPO / imp.file)
        for target in imp.targets:
            if target in MODULES and target != source:
                graph[source].setdefault(target, imp)
    return graph


def _strongly_connected(graph: dict[str, dict[str, Import]]) -> list[list[str]]:
    """Tarjan's algorithm, iteratively; components of more than one module (a module importing itself is skipped)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return components


def _shortest_circle(graph: dict[str, dict[str, Import]], start: str, members: set[str]) -> list[str]:
    """start -> ... -> start, the shortest way round inside one strongly connected component."""
    previous: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for child in sorted(graph[node]):
            if child == start:
                path = [node]
                while path[-1] != start:
                    path.append(previous[path[-1]])
                return [*reversed(path), start]
            if child in members and child not in previous:
                previous[child] = node
                queue.append(child)
    raise AssertionError(f"{start} is in a component but on no circle")


def test_the_scan_sees_the_library(scan: Scan) -> None:
    assert {"elite", "elite.errors", "elite.model.pipeline", "elite.model.encoder"} <= set(MODULES), sorted(MODULES)
    assert any("elite.errors" in imp.targets for imp in scan.imports)


def test_every_file_parses(scan: Scan) -> None:
    problems = scan.unparsable
    assert not problems, "files under elite/ that are not valid Python (the other checks skip them):\n" + (
        "\n".join(problems))


@pytest.mark.parametrize(("folder", "forbidden", "why"), LAYERS, ids=[layer[0] for layer in LAYERS])
def test_layers(scan: Scan, folder: str, forbidden: tuple[str, ...], why: str) -> None:
    problems = []
    for imp in (imp for imp in scan.imports if imp.file.startswith(folder)):
        bad = [t for t in imp.targets if any(_within(t, prefix) for prefix in forbidden)]
        # `from elite.data import store` names elite.data and elite.data.store: report the module
        problems += [f"{imp.where} imports {t}" for t in bad if not any(_within(u, t) and u != t for u in bad)]
    assert not problems, f"{why}:\n" + "\n".join(problems)


def test_no_import_circle(scan: Scan) -> None:
    graph = _graph(scan.imports)
    problems = []
    for component in _strongly_connected(graph):
        circle = _shortest_circle(graph, component[0], set(component))
        steps = [f"{graph[a][b].where} imports {b}" for a, b in itertools.pairwise(circle)]
        problems.append(" -> ".join(circle) + f" (all of {', '.join(component)} are in one circle)\n    "
                        + "\n    ".join(steps))
    assert not problems, "import circles among elite modules (a definition sits in the wrong file):\n" + "\n".join(
        problems)


def test_no_elite_import_inside_a_function(scan: Scan) -> None:
    problems = [f"{imp.where} imports {', '.join(t for t in imp.targets if _within(t, 'elite'))} inside a function"
                for imp in scan.imports if imp.in_function and not imp.lazy_init
                and any(_within(t, "elite") for t in imp.targets)]
    assert not problems, "import elite modules at module level (an import inside a function dodges a circle):\n" + (
        "\n".join(problems))


def test_files_are_small() -> None:
    files = sorted(p for p in LIBRARY.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    sizes = {str(p.relative_to(REPO)): len(p.read_bytes().decode(errors="replace").splitlines()) for p in files}
    problems = [f"{name} has {lines} lines" for name, lines in sizes.items() if lines > MAX_LINES]
    assert not problems, f"files under elite/ have at most {MAX_LINES} lines:\n" + "\n".join(problems)
