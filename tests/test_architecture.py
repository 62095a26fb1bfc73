"""The package's layers point only down and its import graph has no cycle (docs/ARCHITECTURE.md).

Every import counts, the ones inside functions too: a lazy import still ties two modules together.
A module may import modules of its own layer (without a cycle) or of a lower layer, never a higher one.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Lowest first. A module's layer is that of its longest listed prefix.
LAYERS = {
    "base": ["hptransfer._version", "hptransfer._env", "hptransfer._C", "hptransfer.constants", "hptransfer.errors",
             "hptransfer.config", "hptransfer.pose", "hptransfer.profiling", "hptransfer.weights",
             "hptransfer.images", "hptransfer.checkpoint", "hptransfer.kernels"],
    "ops": ["hptransfer.ops"],
    "method": ["hptransfer.models", "hptransfer.losses", "hptransfer.flow_losses", "hptransfer.step",
               "hptransfer.backend", "hptransfer.metrics", "hptransfer.report", "hptransfer.data",
               "hptransfer.distributed"],
    "entry": ["hptransfer", "hptransfer.__main__", "hptransfer.cli", "hptransfer.train", "hptransfer.flow_task",
              "hptransfer.evaluate", "hptransfer.infer", "hptransfer.video", "hptransfer.demo", "hptransfer.export",
              "hptransfer.ablate", "hptransfer.compare", "hptransfer.garment", "hptransfer.garment_eval",
              "hptransfer.garment_study",
              "hptransfer.doctor", "hptransfer.models.summary", "hptransfer.data.cli", "hptransfer.data.check",
              "hptransfer.data.prepare_common", "hptransfer.data.prepare_deepfashion", "hptransfer.data.prepare_h36m",
              "hptransfer.data.prepare_video", "hptransfer.data.prepare_photos", "hptransfer.data.split",
              "hptransfer.data.shard_writer"],
}
ORDER = list(LAYERS)
# ops' private modules and names are for ops alone; everything above uses hptransfer.ops' public names
OPS_PUBLIC = "hptransfer.ops"


def _modules() -> dict[str, Path]:
    mods = {"hptransfer._C": None}
    for p in sorted((REPO / "hptransfer").rglob("*.py")):
        parts = list(p.relative_to(REPO).with_suffix("").parts)
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    for p in sorted((REPO / "kernels").glob("*.py")):  # installed as hptransfer.kernels
        mods["hptransfer.kernels" + ("" if p.stem == "__init__" else "." + p.stem)] = p
    return mods


def _resolve(name: str, mods) -> str:
    while name not in mods and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def _top_level_names(path: Path) -> set[str]:
    """Names a module binds at top level (what ``from module import name`` finds before a submodule)."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    return names


def _imports(mods) -> dict[str, set[tuple[str, str]]]:
    """module -> {(imported module, imported name or "")}."""
    graph = {}
    for name, path in mods.items():
        graph[name] = set()
        if path is None:
            continue
        package = name if path.stem == "__init__" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                graph[name] |= {(_resolve(a.name, mods), "") for a in node.names if a.name.startswith("hptransfer")}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                if not base.startswith("hptransfer"):
                    continue
                base = _resolve(base, mods)
                bound = _top_level_names(mods[base]) if mods.get(base) is not None else set()
                for a in node.names:
                    full = f"{base}.{a.name}"
                    graph[name].add((full, "") if full in mods and a.name not in bound else (base, a.name))
        graph[name].discard((name, ""))
    return graph


def upward_imports(graph) -> list[str]:
    return sorted(f"{a} ({ORDER[_layer(a)]}) imports {b} ({ORDER[_layer(b)]})"
                  for a, targets in graph.items() for b, _ in targets if _layer(b) > _layer(a))


def import_cycles(graph) -> list[str]:
    edges = {a: {b for b, _ in targets} for a, targets in graph.items()}
    state, stack, cycles = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node)
    return cycles


def _layer(name: str) -> int:
    best, layer = -1, None
    for i, prefixes in enumerate(LAYERS.values()):
        for p in prefixes:
            if (name == p or name.startswith(p + ".")) and len(p) > best:
                best, layer = len(p), i
    if layer is None:
        raise AssertionError(f"{name} is in no layer: add it to LAYERS in tests/test_architecture.py "
                             "and docs/ARCHITECTURE.md")
    return layer


@pytest.fixture(scope="module")
def graph():
    return _imports(_modules())


def test_every_module_has_a_layer(graph):
    for name in graph:
        _layer(name)


def test_no_upward_import(graph):
    upward = upward_imports(graph)
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_import_cycle(graph):
    cycles = import_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_ops_private_parts_stay_in_ops(graph):
    leaks = [f"{a} imports {b}{'.' + n if n else ''}" for a, targets in graph.items() if not a.startswith(OPS_PUBLIC)
             for b, n in targets
             if b.startswith(OPS_PUBLIC + ".") or (b == OPS_PUBLIC and n.startswith("_"))]
    assert not leaks, "use hptransfer.ops' public names:\n" + "\n".join(sorted(leaks))


def test_the_checker_sees_a_planted_cycle_and_upward_import(tmp_path):
    """The checks above fail on a lazy upward import inside a function (the kind that hid a cycle before)."""
    planted = {"hptransfer.pose": "def f():\n    from hptransfer import train\n",
               "hptransfer.train": "from hptransfer.pose import f\n"}
    mods = {}
    for name, text in planted.items():
        mods[name] = tmp_path / (name.replace(".", "_") + ".py")
        mods[name].write_text(text)
    g = _imports(mods)
    assert upward_imports(g) == ["hptransfer.pose (base) imports hptransfer.train (entry)"]
    assert import_cycles(g) == ["hptransfer.pose -> hptransfer.train -> hptransfer.pose"]
