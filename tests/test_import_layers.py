"""The package's import graph: every part stands on the parts below it, and no modules import each other in a circle.

Read from the source (every ``import``, function-local ones included), so a new arrow that runs back up fails here
before it reaches the picture in ARCHITECTURE.md.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fastsoft"

# From the ground up; a part may import only parts on its own floor or below. One floor may hold several parts that
# do not import each other.
FLOORS = [
    {"errors", "signals", "distributed", "text", "ops", "kernels", "_C"},
    {"data"},  # jobs and templates
    {"io"},  # atomic files, locks, exports, reports, checkpoints
    {"frozen"},  # the frozen model: loading, attention, fused layers, the shared prefix, packing
    {"teacher"},
    {"train"},
    {"eval"},
    {"config"},  # collects every stage's settings and vocabularies
    {"pipeline"},  # the conductor and its stage files
    {"api"},
    {"cli", "__init__"},
    {"__main__"},
]
FLOOR = {part: level for level, parts in enumerate(FLOORS) for part in parts}


def _modules() -> dict[str, Path | None]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if "kernels" in parts[1:2]:
            continue  # the Triton kernels: a link to the top-level kernels/ folder
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    modules["fastsoft._C"] = None  # the compiled C++ extension: imports nothing of the package
    return modules


def _imports(path: Path | None, modules: dict[str, Path]) -> set[str]:
    found = set()
    if path is None:
        return found
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        for name in names:
            if name.startswith("fastsoft"):
                while name not in modules and "." in name:  # `from fastsoft.x import name`: the module x
                    name = name.rsplit(".", 1)[0]
                if name in modules:
                    found.add(name)
                    break
    return found


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_part_of_the_package_has_a_floor():
    parts = {_part(m) for m in _modules()}
    assert parts <= FLOOR.keys(), f"give these parts a floor in FLOORS: {sorted(parts - FLOOR.keys())}"


def test_no_import_runs_back_up():
    modules = _modules()
    upward = [
        f"{module} imports {target}"
        for module, path in modules.items()
        for target in _imports(path, modules)
        if FLOOR.get(_part(target), -1) > FLOOR.get(_part(module), -1)
    ]
    assert not upward, "imports that run back up: " + "; ".join(sorted(upward))


def test_no_modules_import_each_other_in_a_circle():
    modules = _modules()
    graph = {module: _imports(path, modules) - {module} for module, path in modules.items()}
    graph = {m: {t for t in targets if not m.startswith(t + ".")} for m, targets in graph.items()}  # a package's face
    index, low, stack, on_stack, circles, counter = {}, {}, [], set(), [], [0]

    def visit(node):  # Tarjan's strongly connected components
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for module in graph:
        if module not in index:
            visit(module)
    assert not circles, f"modules that import each other in a circle: {circles}"
