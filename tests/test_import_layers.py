"""Imports point one way: no cycles, and no module importing one of a higher layer.

Every ``import`` in ``ml_backend/`` and ``training/`` counts, including those inside functions (an import
moved into a function still makes the dependency). Hand-written over the standard ``ast`` module rather
than import-linter: forty lines, no new dependency, and a failure names the file, the line and the two
layers. When a new module fails here with "no layer", add its name to the layer it belongs to.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ml_backend", "training")

# Top to bottom. A module may import its own layer and any layer below it. A module belongs to the entry
# with the longest matching name (``ml_backend.sam3.worker`` is a command, the rest of ``ml_backend.sam3``
# a service). ``ml_backend`` names the package's ``__init__`` only (it selects Keras's torch backend).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("command lines", ("ml_backend.__main__", "ml_backend.sam.__main__", "ml_backend.embeddings.worker",
                       "ml_backend.retrain.worker", "ml_backend.sam3.worker", "ml_backend.gunicorn_hooks",
                       "ml_backend.settings_reference")),
    ("app", ("ml_backend.app", "ml_backend.dashboard")),
    ("backend", ("ml_backend.backend",)),
    ("runtime", ("ml_backend.runtime",)),
    ("services", ("ml_backend.sam3", "ml_backend.prompt_state",
                  "ml_backend.embeddings", "ml_backend.retrain", "ml_backend.webhook_secret")),
    ("labeling", ("ml_backend.labeling",)),
    ("sam", ("ml_backend.sam",)),
    ("data sets", ("ml_backend.export", "ml_backend.trimaps")),
    ("result forms and Label Studio's API", ("ml_backend.formats", "ml_backend.label_studio_api")),
    ("images", ("ml_backend.images", "ml_backend.brush")),
    ("security and the trimap model", ("ml_backend.security", "ml_backend.preannotation")),
    ("foundation", ("ml_backend.settings", "ml_backend.errors", "ml_backend.lru_files", "ml_backend.logs",
                    "ml_backend.command_line", "ml_backend.metrics", "ml_backend")),
    ("training", ("training",)),  # knows nothing of Label Studio: never imports ml_backend
]



def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imports(known: dict[str, Path]) -> dict[str, dict[str, int]]:
    """module -> {imported project module: line of the first such import}."""
    def resolve(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, dict[str, int]] = {}
    for module, path in known.items():
        edges: dict[str, int] = {}
        package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
                names = [f"{base}.{alias.name}" for alias in node.names]  # a submodule, else resolves to base
            else:
                continue
            for name in names:
                target = resolve(name)
                if target and target != module:
                    edges.setdefault(target, node.lineno)
        graph[module] = edges
    return graph


def layer_of(module: str) -> int | None:
    best: tuple[int, int] | None = None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            inside = module == prefix or (prefix != "ml_backend" and module.startswith(prefix + "."))
            if inside and (best is None or len(prefix) > best[1]):
                best = (index, len(prefix))
    return None if best is None else best[0]


def cycles(graph: dict[str, dict[str, int]]) -> list[set[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph.get(node, {}):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_every_module_has_a_layer() -> None:
    missing = sorted(module for module in modules() if layer_of(module) is None)
    assert not missing, f"no layer for {missing}: add each to LAYERS in {Path(__file__).name}"


def test_no_module_imports_a_higher_layer() -> None:
    known = modules()
    upward = []
    for module, edges in imports(known).items():
        for target, line in edges.items():
            if layer_of(target) < layer_of(module):
                upward.append(f"{known[module].relative_to(ROOT)}:{line}: {module} ({LAYERS[layer_of(module)][0]}) "
                              f"imports {target} ({LAYERS[layer_of(target)][0]})")
    assert not upward, "imports from a higher layer (hand the lower module what it needs instead):\n" + \
        "\n".join(upward)


def test_no_import_cycles() -> None:
    found = [sorted(component) for component in cycles(imports(modules()))]
    assert not found, f"import cycles: {found}"


def test_the_check_sees_an_upward_import_and_a_cycle() -> None:
    """The checks above can fail: a made-up graph with an upward import and a cycle is caught."""
    graph = {"ml_backend.settings": {"ml_backend.app": 1}, "ml_backend.app": {"ml_backend.settings": 1}}
    assert cycles(graph) == [{"ml_backend.settings", "ml_backend.app"}]
    assert layer_of("ml_backend.settings") > layer_of("ml_backend.app")
    assert layer_of("ml_backend.sam3.worker") < layer_of("ml_backend.sam3.job") < layer_of("ml_backend.sam.engine")
