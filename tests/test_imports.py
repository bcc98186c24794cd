"""The import graph of deltatune, read statically (AST): no import loops, and the core imports no method.

Every `import` counts wherever it stands (module level or inside a function); imports under `if TYPE_CHECKING:`
never run, so they form no loop, but they count for the core rule (the core must not know the methods at all).
`from deltatune import name` resolves to the module that defines `name` (the lazy public API of
deltatune/__init__.py), and so does `deltatune.name` after a bare `import deltatune`.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "deltatune"
CORE = ("delta", "registry", "targeting", "arch", "fingerprint", "routing", "schema", "errors", "storage", "safety")
METHODS = "deltatune.methods"


@dataclass
class Graph:
    """module -> the modules it imports at run time (`runtime`), and those it names under TYPE_CHECKING too."""

    runtime: dict[str, set[str]] = field(default_factory=dict)
    typing: dict[str, set[str]] = field(default_factory=dict)


def module_files() -> dict[str, Path]:
    files = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def public_api(files: dict[str, Path]) -> dict[str, str]:
    """The `_API` table of deltatune/__init__.py: public name -> the module defining it."""
    tree = ast.parse(files["deltatune"].read_text())
    table = next(node.value for node in tree.body if isinstance(node, ast.Assign)
                 and any(isinstance(t, ast.Name) and t.id == "_API" for t in node.targets))
    return ast.literal_eval(table)


def is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(tree: ast.AST, typing: bool = False):
    """(import node, under TYPE_CHECKING) for every import in `tree`, at any depth."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, typing
        yield from imports(node, typing or (isinstance(node, ast.If) and is_type_checking(node)))


def targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, files: dict[str, Path],
            api: dict[str, str]) -> set[str]:
    """The deltatune modules one import statement loads (as import-linter counts them)."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if alias.name.split(".")[0] == "deltatune"}
    if node.level:  # relative: from the current package upwards
        base = module.split(".")[:len(module.split(".")) - node.level + (1 if is_package else 0)]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    if source.split(".")[0] != "deltatune":
        return set()
    found = set()
    for alias in node.names:
        name = f"{source}.{alias.name}"
        if name in files:
            found.add(name)
        elif source == "deltatune" and alias.name in api:
            found.add(api[alias.name])
        else:
            found.add(source)
    return found


def api_attributes(tree: ast.AST, api: dict[str, str]) -> set[str]:
    """`deltatune.name` after `import deltatune`: the modules those public names come from."""
    return {api[node.attr] for node in ast.walk(tree) if isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name) and node.value.id == "deltatune" and node.attr in api}


def import_graph() -> Graph:
    files = module_files()
    api = public_api(files)
    graph = Graph()
    for module, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        runtime, typing = set(), set()
        for node, under_type_checking in imports(tree):
            found = targets(node, module, path.name == "__init__.py", files, api)
            if isinstance(node, ast.Import) and "deltatune" in found:  # the package's public names it reads
                found = (found - {"deltatune"}) | api_attributes(tree, api)
            (typing if under_type_checking else runtime).update(found - {module})
        graph.runtime[module] = runtime
        graph.typing[module] = runtime | typing
    return graph


def cycles(edges: dict[str, set[str]]) -> list[tuple[list[str], list[str]]]:
    """Every strongly connected component of more than one module (Tarjan): (one loop through it, the component's
    other modules, each in some loop with the rest)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[tuple[list[str], list[str]]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                loop = loop_through(sorted(component), edges)
                found.append((loop, sorted(set(component) - set(loop))))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def loop_through(component: list[str], edges: dict[str, set[str]]) -> list[str]:
    """A shortest loop from the component's first module back to it, staying inside the component."""
    inside, start = set(component), component[0]
    paths = {start: [start]}
    queue = [start]
    for node in queue:
        for nxt in sorted(edges.get(node, set()) & inside):
            if nxt == start:
                return paths[node] + [start]
            if nxt not in paths:
                paths[nxt] = paths[node] + [nxt]
                queue.append(nxt)
    raise AssertionError(f"no loop through {component}")


def path_to(start: str, goal: str, edges: dict[str, set[str]]) -> list[str] | None:
    """A shortest import chain from `start` to `goal` or one of its submodules."""
    paths = {start: [start]}
    queue = [start]
    for node in queue:
        for nxt in sorted(edges.get(node, ())):
            if nxt not in paths:
                paths[nxt] = paths[node] + [nxt]
                if nxt == goal or nxt.startswith(goal + "."):
                    return paths[nxt]
                queue.append(nxt)
    return None


# ---- the checker itself -------------------------------------------------------------------------------------
def test_the_reader_sees_function_level_lazy_and_relative_imports():
    files = {"deltatune": Path(), "deltatune.a": Path(), "deltatune.b": Path(), "deltatune.b.c": Path()}
    api = {"load": "deltatune.a"}
    tree = ast.parse("def f():\n    from deltatune import load, b\n    from .c import x\n    import deltatune.a\n"
                     "if TYPE_CHECKING:\n    from deltatune.b.c import y\n")
    found = [(targets(n, "deltatune.b", True, files, api), typing) for n, typing in imports(tree)]
    assert found == [({"deltatune.a", "deltatune.b"}, False), ({"deltatune.b.c"}, False), ({"deltatune.a"}, False),
                     ({"deltatune.b.c"}, True)]
    assert api_attributes(ast.parse("import deltatune\ndeltatune.load(m)"), api) == {"deltatune.a"}


def test_the_loop_finder_finds_every_loop_and_only_loops():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": {"e"}, "e": {"d"}, "f": {"a"}}
    assert cycles(edges) == [(["d", "e", "d"], []), (["a", "b", "c", "a"], [])]
    assert cycles({"a": {"b"}, "b": {"a", "c"}, "c": {"b"}}) == [(["a", "b", "a"], ["c"])]
    assert cycles({"a": {"b"}, "b": set()}) == []
    assert path_to("f", "c", edges) == ["f", "a", "b", "c"]


# ---- deltatune ----------------------------------------------------------------------------------------------
def test_deltatune_has_no_import_loops():
    found = cycles(import_graph().runtime)
    assert not found, "import loops (each module imports the next):\n" + "\n".join(
        " -> ".join(loop) + (f" (tangled with {', '.join(others)})" if others else "") for loop, others in found)


def test_the_core_imports_no_method():
    graph = import_graph().typing
    chains = [chain for core in CORE if (chain := path_to(f"deltatune.{core}", METHODS, graph))]
    assert not chains, "the core reaches the methods (import chains):\n" + "\n".join(" -> ".join(c) for c in chains)


def test_every_core_module_exists():
    assert {f"deltatune.{name}" for name in CORE} <= set(module_files())
