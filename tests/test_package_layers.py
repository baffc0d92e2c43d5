"""The package's import graph: layers import only downward, commands never import each other, no cycles.

Built from every ``import`` statement in the source (imports inside functions included), independent of
import-linter (``make lint``), which checks the same contract from pyproject.toml.
"""

from __future__ import annotations

import ast
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "step_lightning"


def declared_layers() -> list[list[str]]:
    """pyproject's contract, top layer first; each layer a list of independent first-level parts."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    (contract,) = config["tool"]["importlinter"]["contracts"]
    return [[part.strip() for part in layer.split("|")] for layer in contract["layers"]]


def part_of(module: str) -> str | None:
    """'step_lightning.models.vit' -> 'models'; None outside the package."""
    names = module.split(".")
    return names[1] if names[0] == "step_lightning" and len(names) > 1 else None


def module_imports(path: Path) -> set[str]:
    module = ".".join(path.relative_to(REPO).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def part_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        source = part_of(".".join(path.relative_to(REPO).with_suffix("").parts))
        if source in (None, "__init__"):
            continue
        targets = {part_of(m) for m in module_imports(path)} - {None, source, "__init__"}
        graph.setdefault(source, set()).update(targets)
    return graph


def test_every_part_has_a_layer():
    parts = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
             if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").is_file()}
    declared = {part for layer in declared_layers() for part in layer}
    assert parts - {"conf"} == declared


def test_parts_import_only_lower_layers():
    rank = {part: i for i, layer in enumerate(declared_layers()) for part in layer}
    violations = [
        f"{source} imports {target}"
        for source, targets in part_graph().items()
        for target in targets
        if target in rank and rank[target] <= rank[source]
    ]
    assert violations == []


def test_commands_are_not_libraries():
    """Commands sit in the top layer only: no ``__main__`` inside a library package."""
    assert list(PACKAGE.rglob("__main__.py")) == []
    commands = set(declared_layers()[0])
    assert all((PACKAGE / f"{c}.py").is_file() for c in commands)


def test_no_import_cycles_between_modules():
    files = {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
             for p in PACKAGE.rglob("*.py")}
    graph = {}
    for module, path in files.items():
        targets = set()
        for name in module_imports(path):
            while name and name not in files:
                name = name.rpartition(".")[0]
            if name and name != module and not module.startswith(name + "."):
                targets.add(name)
        graph[module] = targets
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def cycle_from(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                return [*path, node, nxt]
            if nxt not in state and (found := cycle_from(nxt, [*path, node])):
                return found
        state[node] = 2
        return None

    cycles = [c for m in sorted(graph) if m not in state and (c := cycle_from(m, []))]
    assert cycles == []
