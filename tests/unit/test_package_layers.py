"""The package's shape, read from its source: no import cycle, and every import goes down the
layers of DESIGN.md (protocol, formats and storage, devices, cache core, actors, client), never
up. A new module must be given its layer here; nothing is imported or run.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "trims_ray"

# Lowest first. A module may import modules of its own layer and of the layers below.
LAYERS: dict[str, tuple[str, ...]] = {
    "protocol": (
        "_errors", "_names", "_config", "_protocol", "_malloc", "_gc", "_torchvision_ops",
        "policy", "policy.base", "policy._heap", "policy.lru", "policy.lfu", "policy.fifo",
        "policy.gdsf", "policy.cost", "policy.belady", "policy.admission",
    ),
    "formats and storage": (
        "_hashing", "_safetensors", "_fsio", "_factory", "_hf", "_manifest", "_reader", "_ingest",
        "_store", "_manifest_cache", "_protect",
    ),
    "devices": ("_nvml", "_cuda", "_gpu_ipc", "_devices"),
    "cache core": (
        "cache", "cache.leases", "cache.quotas", "cache.disk_tier", "cache.host_entry", "cache.host_tier", "cache.host_loader", "cache.load_buffers",
        "cache.scrub", "cache.node_cache", "cache.gpu_views", "cache.gpu_tier", "cache.gpu_entry", "cache.gpu_testing",
        "cache.placement_records", "cache.placement", "cache.pins", "cache.node_views", "cache.node_budgets",
    ),
    "actors": (
        "_raycalls", "_metrics", "actors", "actors._naming", "actors.node_cache_actor", "actors.gpu_tier_actor",
        "actors.placement_actor", "actors._node_info", "actors._lending", "actors._budgets", "actors._node_gpus",
        "actors._node_budgets",
    ),
    "client": ("_api", "_routing", "_cluster", "_lease", "_gpu_lease", "_process_tier", "_cli_output", "_cli_commands", "_dashboard", "cli", "__init__"),
}  # fmt: skip
RANK = {module: rank for rank, modules in enumerate(LAYERS.values()) for module in modules}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path, module: str, known: set[str]) -> set[str]:
    """The package's modules that ``module`` imports (at any depth in the file: late imports
    count), as names relative to the package."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name.removeprefix("trims_ray.") for a in node.names if a.name.startswith("trims_ray.")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package and package != "__init__" else []
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                base_name = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("trims_ray"):
                base_name = node.module.removeprefix("trims_ray").lstrip(".")
            else:
                continue
            names = [base_name] + [f"{base_name}.{a.name}" if base_name else a.name for a in node.names]
        else:
            continue
        found |= {n for n in names if n in known and n != module}
    return found


def _runtime_nodes(tree: ast.AST):
    """Every node of ``tree`` except those under ``if TYPE_CHECKING:`` (annotations only)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and isinstance(child.test, ast.Name) and child.test.id == "TYPE_CHECKING":
                todo.extend(child.orelse)
                continue
            todo.append(child)


def import_graph() -> dict[str, set[str]]:
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    known = set(paths)
    return {module: _imports(path, module, known) for module, path in paths.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
    return out


def test_every_module_has_a_layer():
    graph = import_graph()
    assert sorted(set(graph) - set(RANK)) == [], "give these modules a layer in LAYERS"
    assert sorted(set(RANK) - set(graph)) == [], "these modules no longer exist"


def test_the_package_has_no_import_cycle():
    assert _cycles(import_graph()) == []


def test_no_module_imports_from_a_layer_above_its_own():
    names = list(LAYERS)
    upward = sorted(
        f"{module} ({names[RANK[module]]}) -> {target} ({names[RANK[target]]})"
        for module, targets in import_graph().items()
        for target in targets
        if module in RANK and target in RANK and RANK[target] > RANK[module]
    )
    assert upward == []


def test_the_package_never_imports_the_workloads():
    offenders = sorted(
        str(path.relative_to(PACKAGE.parent))
        for path in PACKAGE.rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.Import, ast.ImportFrom))
        and any(
            name == "workloads" or name.startswith("workloads.")
            for name in ([a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""])
        )
    )
    assert offenders == []


@pytest.mark.parametrize(
    "graph, cycles",
    [
        ({"a": {"b"}, "b": {"a"}, "c": set()}, [["a", "b"]]),
        ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
    ],
)
def test_the_cycle_finder_finds_cycles(graph, cycles):
    assert _cycles(graph) == cycles


# The layers below the actors: they must import where Ray cannot (a GPU machine with torch alone).
RAY_FREE = [m for layer in ("protocol", "formats and storage", "devices", "cache core") for m in LAYERS[layer]]


def test_the_ray_free_layers_and_the_package_import_where_ray_cannot():
    script = f"""
import sys

class NoRay:
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("Ray is not installed here (blocked by the test)")

sys.meta_path.insert(0, NoRay())
import importlib
import trims_ray
assert "ray" not in sys.modules and "torch" not in sys.modules, "import trims_ray loaded Ray or torch"
for module in {RAY_FREE!r}:
    importlib.import_module("trims_ray." + module)
assert "ray" not in sys.modules
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_every_public_name_resolves_lazily_to_its_definition():
    import trims_ray

    assert sorted(trims_ray._PUBLIC) == sorted(trims_ray.__all__)
    for name in trims_ray.__all__:
        value = getattr(trims_ray, name)
        assert getattr(value, "__name__", name) == name, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        trims_ray.nope  # noqa: B018


# Processes that never build a module: the node cache and placement actors (each started by
# every trims_ray.init, where importing torch cost about 2 s of start-up and 250 MB per actor)
# and the CLI's read commands.
TORCH_FREE = ["actors.node_cache_actor", "actors.placement_actor", "actors.gpu_tier_actor", "cli", "_cluster"]


def test_the_actors_and_the_cli_import_no_torch():
    script = f"""
import importlib
import sys
for module in {TORCH_FREE!r}:
    importlib.import_module("trims_ray." + module)
loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
print("torch loaded" if loaded else "ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", (done.stdout + done.stderr)[-2000:]
