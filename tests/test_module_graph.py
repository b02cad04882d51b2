"""The package's import graph: layers point one way, no cycles, no private names across modules
(docs/ARCHITECTURE.md). Read from the source (every import, function-local ones included)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import globeflow

ROOT = Path(globeflow.__file__).resolve().parent
LAYERS = ("core", "data", "answers", "jobs", "apps")
"""Lower layers first: a module imports only from its own layer and the ones before it."""


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module imported, names taken from it) for every globeflow import in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("globeflow"):
            found.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.startswith("globeflow")]
    return found


def _edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    for module, path in MODULES.items():
        for target, names in _imports(path):
            for t in [target, *(f"{target}.{n}" for n in names)]:
                if t in MODULES and t != module:
                    edges[module].add(t)
    return edges


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def test_no_import_cycles():
    edges, seen, cycles = _edges(), {}, []

    def visit(node: str, stack: list[str]) -> None:
        seen[node] = "open"
        for nxt in sorted(edges[node]):
            if seen.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in seen:
                visit(nxt, [*stack, nxt])
        seen[node] = "done"

    for module in sorted(edges):
        if module not in seen:
            visit(module, [module])
    assert cycles == []


def test_layers_import_only_downwards():
    upward = [
        (module, target)
        for module, targets in _edges().items()
        for target in targets
        if _layer(module) is not None
        and _layer(target) is not None
        and _layer(target) > _layer(module)
    ]
    assert upward == []


def test_no_private_names_across_modules():
    """``from globeflow.x import _name`` reaches into another module's insides; what several
    modules share is public where it lives."""
    private = [
        (module, target, name)
        for module, path in MODULES.items()
        for target, names in _imports(path)
        for name in names
        if name.startswith("_") and not name.startswith("__") and target != module
    ]
    assert private == []


@pytest.mark.parametrize("probe", ["cycle", "private"])
def test_the_checks_see_what_they_look_for(tmp_path, probe):
    """The AST readers find a cycle and a private import in a made-up pair of modules."""
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text(
        "from globeflow.b import _helper\n" if probe == "private" else "import globeflow.b\n"
    )
    b.write_text("def f():\n    from globeflow.a import g\n")
    found = _imports(a) + _imports(b)
    if probe == "private":
        assert ("globeflow.b", ["_helper"]) in found
    else:
        assert ("globeflow.b", []) in found and ("globeflow.a", ["g"]) in found
