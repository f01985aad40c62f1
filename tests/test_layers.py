"""The import graph: layers import downward only, and no package imports itself in a circle.

Every ``import`` / ``from ... import`` in the source (module level *and* inside functions, since a
deferred import that reaches up is still a cycle of design) is read with ``ast``; each module is
mapped to its layer (ARCHITECTURE.md): cli -> serve / bench -> engine / workloads -> launch ->
runtime -> models / parallel / placement -> comm / config (the planner sits beside launch). The client talks HTTP only.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"distgen": ROOT / "distgen", "distgen.parallel": ROOT / "parallel", "distgen.launch": ROOT / "launch"}
LAYERS = {
    "cli": 6, "cluster": 6, "serve": 5, "bench": 5, "engine": 4, "workloads": 4, "launch": 3, "planner": 3, "runtime": 2,
    "models": 1, "parallel": 1, "placement": 1, "comm": 0, "config": 0, "config_video": 0,
}


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join([package, *parts]) if parts else package
            if package == "distgen" and parts and parts[0] in ("parallel", "launch"):
                continue
            found[name] = path
    return found


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def layer_of(module: str) -> tuple[str, int] | None:
    parts = module.split(".")
    if len(parts) < 2:
        return None
    key = parts[1]
    return (key, LAYERS[key]) if key in LAYERS else None


def test_layers_import_downward_only():
    mods = modules()
    known = set(mods)
    violations = []
    for name, path in mods.items():
        mine = layer_of(name)
        for target in imports_of(name, path, known):
            theirs = layer_of(target)
            if name == "distgen.client":
                violations.append(f"{name} -> {target} (the client speaks HTTP only)")
            elif mine and theirs and theirs[1] > mine[1]:
                violations.append(f"{name} ({mine[0]}) -> {target} ({theirs[0]})")
            elif mine and theirs and theirs[1] == mine[1] and theirs[0] != mine[0] and mine[1] >= 4:
                violations.append(f"{name} ({mine[0]}) -> {target} ({theirs[0]}): same layer, separate packages")
    assert not violations, "\n".join(sorted(violations))


def test_no_import_cycles_between_packages():
    mods = modules()
    known = set(mods)
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        mine = layer_of(name)
        for target in imports_of(name, path, known):
            theirs = layer_of(target)
            if mine and theirs and mine[0] != theirs[0]:
                graph.setdefault(mine[0], set()).add(theirs[0])
    cycles = []

    def visit(node, trail):
        for nxt in graph.get(node, ()):
            if nxt in trail:
                cycles.append(" -> ".join(trail[trail.index(nxt):] + [nxt]))
            elif len(trail) < len(LAYERS):
                visit(nxt, trail + [nxt])

    for start in graph:
        visit(start, [start])
    assert not cycles, "\n".join(sorted(set(cycles)))


def test_the_graph_is_read_correctly():
    """The checker must see a deferred (function-level) import, or it could pass vacuously."""
    mods = modules()
    found = imports_of("distgen.cli.text", mods["distgen.cli.text"], set(mods))
    assert "distgen.workloads.text" in found and "distgen.launch" in found
