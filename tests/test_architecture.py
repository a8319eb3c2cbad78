"""The package's import structure: no module imports another that (directly or through others) imports it
back, top-level or inside a function, and each concern imports only the layers below it."""
from __future__ import annotations

import ast
import os

SRC = os.path.join(os.path.dirname(__file__), "..", "src")
# lowest first: a package may import itself and the packages before it, never one after it
LAYERS = ("actlab.machine", "actlab.activations", "actlab.convert", "actlab", "actlab.models", "actlab.data",
          "actlab.train", "actlab.integrations", "actlab.perf", "actlab.bench", "actlab.cli", "actlab.__main__",
          "actlab.demo")


def modules() -> dict[str, str]:
    found = {}
    for folder, _, files in os.walk(os.path.join(SRC, "actlab")):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                dotted = os.path.relpath(path, SRC)[:-3].replace(os.sep, ".")
                found[dotted.removesuffix(".__init__")] = path
    return found


def imports(module: str, path: str, known: dict[str, str]) -> set[str]:
    """The actlab modules ``module`` imports anywhere in its file (a name imported from a package counts as
    the package, unless it is a module of it)."""
    package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names)
    return {m for m in found if m in known and m != module}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: imports(m, p, known) for m, p in known.items()}


def layer(module: str) -> int:
    return max(i for i, name in enumerate(LAYERS) if module == name or module.startswith(name + "."))


def test_no_module_imports_itself_back():
    known = modules()
    edges = {m: {t for t in ts if not known[t].endswith("__init__.py")} for m, ts in graph().items()
             if not known[m].endswith("__init__.py")}  # a package's facade re-exports; modules are the units
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(edges.get(m, ())):
            assert state.get(t) != 1, "import loop: " + " -> ".join(path[path.index(t):] + [t]) if t in path else t
            if t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])


def test_each_concern_imports_only_the_layers_below_it():
    upward = sorted(f"{m} -> {t}" for m, ts in graph().items() for t in ts if layer(t) > layer(m))
    assert not upward, upward
