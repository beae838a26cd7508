"""Imports follow the data flow: experiment -> stages -> optimizer -> space -> recipe -> worker
(merge, evaluate) -> ledger, and no module imports another that (directly or not) imports it.

The reading (the one that keeps the code easy to change): every module of evomerge/ belongs to
one layer of `LAYERS`, lowest first. A module may import modules of its own layer and of the
layers below it, never above. Below the flow sits `base`: the shared contracts every layer
reads, importable by all: errors, file and YAML helpers, the registries and the plugin loader,
the recipe data model with the merge-method declarations it is validated against (a worker
must know what a Recipe is, so the flow's `recipe` step is a contract, not a layer of its own),
the result and subset types an evaluation hands back, model kinds, the memory budget. The
zoo provides models that `zoo:` references name, so it sits with the sources, in `worker`.
The experiment layer holds what runs experiments (schema, driver, resume, status, export,
report, API, CLI); `stages` holds the stage loop and its scheduler, checkpoints and fidelity.

Function-local imports count like module-level ones (they only postpone the same dependency).
`from package import name` counts as importing the submodule `name` when there is one, else
the package. A module that is not in the table fails the test: add it to the layer it serves.
"""

from __future__ import annotations

import ast
from pathlib import Path

import evomerge

PACKAGE = Path(evomerge.__file__).parent

# Lowest first. A prefix names a module and everything under it; the longest prefix wins.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "base",
        (
            "evomerge._builtin", "evomerge.errors", "evomerge.faults", "evomerge.fsutil", "evomerge.modeldir",
            "evomerge.models", "evomerge.memory", "evomerge.pkgcall", "evomerge.plugins", "evomerge.progress",
            "evomerge.recipe", "evomerge.registry", "evomerge.resources", "evomerge.evaluate.result",
            "evomerge.evaluate.subset", "evomerge.merge.hfconfig", "evomerge.merge.layout", "evomerge.merge.specs",
            "evomerge.merge.stfile",
        ),
    ),
    ("ledger", ("evomerge.run.ledger", "evomerge.run.rundir", "evomerge.tracking")),
    (
        "worker",
        (
            "evomerge.merge", "evomerge.evaluate", "evomerge.usercode", "evomerge.zoo", "evomerge.run.jobs",
            "evomerge.run.local", "evomerge.run.weights", "evomerge.run.worker_core", "evomerge.run.worker_memory",
            "evomerge.run.worker_store", "evomerge.run.workers",
        ),
    ),
    ("space", ("evomerge.spaces",)),
    ("optimizer", ("evomerge.optim",)),
    ("stages", ("evomerge.run", "evomerge.fidelity")),
    (
        "experiment",
        (
            "evomerge", "evomerge.config", "evomerge.api", "evomerge.cli", "evomerge.demo", "evomerge.report",
            "evomerge.run.card", "evomerge.run.driver", "evomerge.run.export", "evomerge.run.hub",
            "evomerge.run.integrity", "evomerge.run.resume", "evomerge.run.status",
        ),
    ),
]  # fmt: skip
RANK = {prefix: (rank, name) for rank, (name, prefixes) in enumerate(LAYERS) for prefix in prefixes}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if "__pycache__" not in p.parts}


def layer(module: str) -> tuple[int, str]:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in RANK:
            return RANK[".".join(parts[:n])]
    raise AssertionError(f"{module} is in no layer of tests/test_architecture.py's LAYERS: add it to the layer it serves")


def imports(module: str) -> dict[str, int]:
    """The evomerge modules `module` imports -> the line of the first import."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], *([base] if base else [])])
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:  # `import evomerge.x.y` of a name inside a module
                target = target.rpartition(".")[0]
            if target.startswith("evomerge") and target != module:
                found.setdefault(target, node.lineno)
    return found


GRAPH = {module: imports(module) for module in MODULES}


def test_every_module_is_in_a_layer() -> None:
    for module in MODULES:
        layer(module)


def test_no_module_imports_a_module_above_it_in_the_data_flow() -> None:
    violations = []
    for module, deps in GRAPH.items():
        rank, name = layer(module)
        for dep, line in deps.items():
            dep_rank, dep_name = layer(dep)
            if dep_rank > rank:
                violations.append(f"{MODULES[module].relative_to(PACKAGE.parent)}:{line}: {module} ({name}) imports {dep} ({dep_name})")
    assert not violations, "imports against the data flow:\n" + "\n".join(violations)


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(graph[root]))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(graph[child])))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def test_evaluate_and_the_whole_package_have_no_import_cycle() -> None:
    """A package's __init__ counts as a module: importing `evomerge.evaluate` depends on it."""
    evaluate = {m: {d: n for d, n in deps.items() if d.startswith("evomerge.evaluate")} for m, deps in GRAPH.items() if m.startswith("evomerge.evaluate")}
    assert not cycles(evaluate)
    assert not cycles(GRAPH), "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles(GRAPH))


def test_the_check_finds_what_it_looks_for() -> None:
    """The graph sees module-level, function-local, relative and `from package import module`
    imports; a cycle and an upward import would be reported."""
    assert "evomerge.merge.engine" in GRAPH["evomerge.run.worker_core"]
    assert "evomerge.run.weights" in GRAPH["evomerge.run.stages"]  # function-local (torch)
    assert "evomerge.evaluate.registry" in GRAPH["evomerge.evaluate"]
    assert cycles({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}) == [["a", "b", "c"]]
    assert layer("evomerge.run.stages") > layer("evomerge.optim.base") > layer("evomerge.spaces.ps") > layer("evomerge.merge.engine")
    assert layer("evomerge.merge.engine") > layer("evomerge.run.ledger") > layer("evomerge.recipe")
