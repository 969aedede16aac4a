"""The shape of the package: the layers import only downwards, no module
imports another in a circle, and no module is over 400 lines. Read from the
source (ast), so it holds for imports inside functions too."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "fleet"
MAX_LINES = 400

# Lowest first. A module may import its own layer and the layers below it.
LAYERS: list[set[str]] = [
    {"fleet.version", "fleet.errors", "fleet.states"},
    {"fleet.settings", "fleet.record", "fleet.egress_config", "fleet.on_done_config", "fleet.redis_url",
     "fleet.config_writer"},
    {"fleet.connection"},
    {"fleet.state"},
    {"fleet.credentials"},
    {"fleet.container", "fleet.broker", "fleet.egress", "fleet.standin"},
    {"fleet.forwarding"},
    {"fleet.worker"},
    {"fleet.client", "fleet.async_client"},
    {"fleet", "fleet.cli", "fleet.app", "fleet.web"},  # `fleet` itself re-exports the client, lazily
]
# Runs inside the agent's container, standard library only: imports nothing of fleet.
INSIDE = "fleet.inside"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    for rank, prefixes in enumerate(LAYERS):
        if module in prefixes:
            return rank
    parent = module.rpartition(".")[0]
    return layer_of(parent) if parent else -1


def fleet_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
            found |= {n if (PACKAGE.parent / (n.replace(".", "/") + ".py")).exists()
                      or (PACKAGE.parent / n.replace(".", "/")).is_dir() else node.module
                      for n in names}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return {name for name in found if name == "fleet" or name.startswith("fleet.")}


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def test_every_module_has_a_layer() -> None:
    unplaced = [m for m in modules() if layer_of(m) < 0 and not m.startswith(INSIDE)]
    assert unplaced == []


def test_imports_go_only_downwards() -> None:
    upward = []
    for module, path in modules().items():
        imported = fleet_imports(path)
        if module.startswith(INSIDE):
            assert not imported, f"{module} runs in the container and must not import fleet"
            continue
        upward += [f"{module} -> {name}" for name in imported
                   if layer_of(name) > layer_of(module)]
    assert upward == []


def test_no_import_cycles() -> None:
    graph = {module: fleet_imports(path) - {module} for module, path in modules().items()}
    # A package's __init__ importing its own submodules is not a cycle of modules.
    graph = {m: {i for i in imported if not m.startswith(i + ".")} for m, imported in graph.items()}
    state: dict[str, int] = {}  # 1: on the path, 2: done
    cycles: list[str] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*path[path.index(nxt):], nxt]))
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for module in graph:
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_no_module_is_over_400_lines() -> None:
    long = {m: n for m, p in modules().items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}
