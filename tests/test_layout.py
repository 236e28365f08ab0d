"""The house's structure, as its imports show it: no import cycle (counting imports made
inside functions, which hide one), and layers that point one way:
errors, config -> data, models, losses -> parallel -> train -> commands (eval, launch,
plan, report, cluster, api) -> cli."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "multitower"

# A module of a layer may import modules of the layers before it only (the package's
# small helpers - files, flags, faults, heartbeat, attempt, procs, progress - sit with config).
LAYERS = [
    {"errors", "config", "files", "flags", "faults", "progress", "heartbeat", "attempt", "procs", "devices"},
    {"data", "models", "losses", "bench"},
    {"parallel"},
    {"train"},
    # (bench's step builder, plan's validation and the interconnect benchmark's cells run
    # training, the last on emulated clusters: commands, not measurement)
    {"eval", "launch", "plan", "report", "runs", "cluster", "api", "bench.step", "bench.validate_plan",
     "bench.interconnect"},
    {"cli", "__main__"},
]


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports() -> dict[str, set[str]]:
    """Module -> the package's modules it imports, anywhere in its code."""
    known = modules()
    graph = {}
    for name, path in known.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
                found.add(base)
                found |= {f"{base}.{alias.name}" for alias in node.names}
        graph[name] = {module for module in found if module in known and module != name}
    return graph


def layer_of(module: str) -> int:
    """The layer of a module: by its own name (e.g. bench.step), else its top package's;
    the package itself (its version, and names resolved lazily by string) is the bottom."""
    if module == "multitower":
        return 0
    parts = module.split(".")[1:]
    for name in (".".join(parts[:2]), parts[0]):
        for i, names in enumerate(LAYERS):
            if name in names:
                return i
    return len(LAYERS)


def test_no_import_cycle_even_through_imports_inside_functions():
    graph = imports()
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for dependency in sorted(graph[module]):
            if state.get(dependency) == "open":
                cycle = path[path.index(dependency):] + [dependency]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if dependency not in state:
                visit(dependency, path + [dependency])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_imports_point_down_the_layers():
    upward = [f"{module} imports {dependency}" for module, dependencies in imports().items()
              for dependency in dependencies
              if module != "multitower" and layer_of(dependency) > layer_of(module)]
    assert not upward, "imports against the layers:\n" + "\n".join(sorted(upward))


def test_config_imports_nothing_of_the_package_but_errors():
    assert imports()["multitower.config"] == {"multitower.errors"}
