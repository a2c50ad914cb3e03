"""The import rules of the package: every import points to the same or a lower layer, and no modules import
each other in a cycle.

Every ``import`` / ``from ... import`` statement counts, wherever it is (module level, inside functions,
under ``if TYPE_CHECKING:``); relative imports are resolved against the importing module's package, and
``from package import name`` is an import of the submodule ``package.name`` when there is one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import vqdiffusion

PACKAGE = "vqdiffusion"
ROOT = Path(vqdiffusion.__file__).resolve().parent

# Lowest first.  A module belongs to the first entry that matches its dotted name exactly or as a prefix
# followed by ".".  ``vqdiffusion/__init__.py`` lazily exposes the public names and may import anything.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "base",
        (
            "vqdiffusion.config",
            "vqdiffusion.devices",
            "vqdiffusion.io",
            "vqdiffusion.text_vocab",
            "vqdiffusion.image_inputs",
            "vqdiffusion.image_outputs",
        ),
    ),
    (
        "math",
        ("vqdiffusion.diffusion", "vqdiffusion.objectives", "vqdiffusion.unmasking", "vqdiffusion.editing",
         "vqdiffusion.maskgit"),
    ),
    ("models", ("vqdiffusion.models", "vqdiffusion.data")),
    ("sampling", ("vqdiffusion.samplers", "vqdiffusion.sampling")),
    ("formats", ("vqdiffusion.formats",)),
    ("pipeline", ("vqdiffusion.pipeline",)),
    (
        "drivers",
        ("vqdiffusion.convert", "vqdiffusion.training", "vqdiffusion.eval", "vqdiffusion.testing", "vqdiffusion.demo"),
    ),
    ("cli", ("vqdiffusion.cli", "vqdiffusion.__main__")),
    ("package", ("vqdiffusion",)),  # the top-level __init__ only: nothing inside may import it
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def layer_of(name: str) -> int | None:
    for number, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if prefix == PACKAGE and name != PACKAGE:
                continue
            if name == prefix or name.startswith(prefix + "."):
                return number
    return None


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """``(imported module inside the package, line)`` for every import statement of the module."""
    package = name if is_package(path) else name.rpartition(".")[0]
    found: list[tuple[str, int]] = []

    def add(target: str, line: int) -> None:
        # the deepest module of the package that the dotted target names (a.b.c -> a.b if c is a name in a.b)
        while target and target not in modules:
            target = target.rpartition(".")[0]
        if target:
            found.append((target, line))

    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                if node.level - 1 >= len(base_parts):
                    raise AssertionError(f"{path}:{node.lineno}: relative import beyond the top-level package")
                base = ".".join(base_parts[: len(base_parts) - (node.level - 1)])
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
                if source != PACKAGE and not source.startswith(PACKAGE + "."):
                    continue
            for alias in node.names:
                candidate = f"{source}.{alias.name}"
                add(candidate if candidate in modules else source, node.lineno)
    return [(target, line) for target, line in found if target != name]


def import_graph() -> tuple[dict[str, Path], dict[str, dict[str, int]]]:
    modules = all_modules()
    graph: dict[str, dict[str, int]] = {}
    for name, path in modules.items():
        edges: dict[str, int] = {}
        for target, line in imports_of(name, path, modules):
            edges.setdefault(target, line)
        graph[name] = edges
    return modules, graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def test_every_module_has_a_layer():
    unplaced = sorted(name for name in all_modules() if layer_of(name) is None)
    assert not unplaced, f"modules outside the layer table (add them to LAYERS): {unplaced}"


def test_imports_point_down():
    modules, graph = import_graph()
    upward = []
    for name, edges in sorted(graph.items()):
        if name == PACKAGE:
            continue  # the lazy public namespace may import anything
        mine = layer_of(name)
        for target, line in sorted(edges.items()):
            theirs = layer_of(target)
            if mine is not None and theirs is not None and theirs > mine:
                where = modules[name].relative_to(ROOT.parent)
                upward.append(f"{where}:{line}: {name} ({LAYERS[mine][0]}) imports {target} ({LAYERS[theirs][0]})")
    assert not upward, f"{len(upward)} import(s) point to a higher layer:\n" + "\n".join(upward)


def test_no_import_cycles():
    modules, graph = import_graph()
    found = cycles(graph)
    lines = []
    for component in found:
        members = set(component)
        edges = [
            f"    {modules[a].relative_to(ROOT.parent)}:{line}: {a} -> {b}"
            for a in component
            for b, line in sorted(graph[a].items())
            if b in members
        ]
        lines.append(f"cycle among {component}:\n" + "\n".join(edges))
    assert not found, f"{len(found)} import cycle(s):\n" + "\n".join(lines)


def test_the_checker_sees_every_kind_of_import(tmp_path, monkeypatch):
    """The parser on a fake package: function-level, TYPE_CHECKING, relative, absolute and submodule imports."""
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "config.py").write_text("def f():\n    from .pipeline import X\n")
    (pkg / "pipeline.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from vqdiffusion.sub import tool\nimport os\n"
    )
    (pkg / "sub" / "__init__.py").write_text("from . import tool\n")
    (pkg / "sub" / "tool.py").write_text("from .. import config\nfrom ..config import f\n")
    monkeypatch.setattr(f"{__name__}.ROOT", pkg)
    modules, graph = import_graph()
    assert graph == {
        "vqdiffusion": {},
        "vqdiffusion.config": {"vqdiffusion.pipeline": 2},
        "vqdiffusion.pipeline": {"vqdiffusion.sub.tool": 3},
        "vqdiffusion.sub": {"vqdiffusion.sub.tool": 1},
        "vqdiffusion.sub.tool": {"vqdiffusion.config": 1},
    }
    assert cycles(graph) == [["vqdiffusion.config", "vqdiffusion.pipeline", "vqdiffusion.sub.tool"]]


def test_layer_table():
    names = {n: layer_of(f"vqdiffusion.{n}") for n in ("io", "diffusion", "data.tokens", "sampling", "formats.ours")}
    assert names == {"io": 0, "diffusion": 1, "data.tokens": 2, "sampling": 3, "formats.ours": 4}
    assert [layer_of(f"vqdiffusion.{n}") for n in ("pipeline", "convert.authors", "testing", "cli.generate")] == [
        5,
        6,
        6,
        7,
    ]
    assert layer_of("vqdiffusion") == 8 and layer_of("vqdiffusion.iox") is None
