"""conveyor's layers point one way, downwards; nothing imports upwards, not even for types.

    errors, model, codec, durations, periodic   plain data and helpers
    stores                                      the Store protocol and the backends (all SQL)
    worker                                      the loop, lanes, keeper, outcomes, supervisor
    app                                         App: what users call
    cli, web, demo                              the shells

Run as a script (`python tests/test_layers.py`) to print each module's imports of conveyor modules.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "conveyor"

#: lower number = lower layer; a module may import only from its own layer or lower ones
LAYERS = {
    "conveyor.errors": 0,
    "conveyor.model": 1,
    "conveyor.codec": 1,
    "conveyor.durations": 1,
    "conveyor.periodic": 1,
    "conveyor.stores": 2,
    "conveyor.worker": 3,
    "conveyor.app": 4,
    "conveyor": 5,  # the package's __init__: the public surface, re-exports
    "conveyor.cli": 6,
    "conveyor.web": 6,
    "conveyor.demo": 6,
    "conveyor.__main__": 7,
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> tuple[str, int]:
    """The layer a module belongs to; a KeyError for a module no layer claims."""
    names = [name for name in LAYERS if module == name or (name != "conveyor" and module.startswith(name + "."))]
    if not names:
        raise KeyError(f"{module} belongs to no layer: add it to LAYERS")
    best = max(names, key=len)
    return best, LAYERS[best]


def imports_of(path: Path) -> set[str]:
    """Every conveyor module this file imports, at any level of the file (TYPE_CHECKING included)."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "conveyor")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "conveyor":
                continue
            # `from . import x` / `from .stores import sqlite` may name submodules
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if (SRC.parent / Path(*sub.split("."))).with_suffix(".py").exists()
                          or (SRC.parent / Path(*sub.split("."))).is_dir() else target)
    found.discard(me)
    return found


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in sorted(SRC.rglob("*.py"))}


def back_edges(g: dict[str, set[str]]) -> list[str]:
    problems = []
    for mod, deps in g.items():
        own_group, own = layer_of(mod)
        for dep in sorted(deps):
            dep_group, theirs = layer_of(dep)
            if theirs > own:
                problems.append(f"{mod} (layer {own_group}) imports {dep} (higher layer {dep_group})")
    return problems


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Import cycles between modules (each found once, from its smallest member)."""
    found: list[list[str]] = []
    seen: set[tuple[str, ...]] = set()

    def visit(node: str, path: list[str]) -> None:
        for dep in sorted(g.get(node, ())):
            if dep == path[0]:
                key = tuple(sorted(path))
                if key not in seen:
                    seen.add(key)
                    found.append(path + [dep])
            elif dep not in path and dep > path[0] and dep in g:
                visit(dep, path + [dep])

    for start in sorted(g):
        visit(start, [start])
    return found


def test_every_module_has_a_layer():
    for mod in graph():
        assert layer_of(mod), mod


def test_no_module_imports_a_higher_layer():
    problems = back_edges(graph())
    assert not problems, "imports that point upwards:\n" + "\n".join(problems)


def test_no_import_cycles():
    found = cycles(graph())
    assert not found, "import cycles:\n" + "\n".join(" → ".join(c) for c in found)


def test_the_checker_sees_a_back_edge():
    """The check itself can fail: a store importing the worker is caught."""
    g = {"conveyor.stores.sqlite": {"conveyor.worker.loop"}, "conveyor.worker.loop": {"conveyor.stores.sqlite"}}
    assert back_edges(g) == ["conveyor.stores.sqlite (layer conveyor.stores) imports conveyor.worker.loop "
                             "(higher layer conveyor.worker)"]
    assert cycles(g) == [["conveyor.stores.sqlite", "conveyor.worker.loop", "conveyor.stores.sqlite"]]


if __name__ == "__main__":
    g = graph()
    for mod, deps in g.items():
        group, n = layer_of(mod)
        print(f"{n} {mod:32} → {', '.join(sorted(deps)) or '-'}")
    problems = back_edges(g) + [" → ".join(c) for c in cycles(g)]
    print("\n".join(problems) if problems else "no back edges, no cycles")
    sys.exit(1 if problems else 0)
