"""The package's layout follows the data flow: a stage imports only the stages before it
(no import cycles, module-level or inside functions)."""

import ast
from pathlib import Path

import kvcli

PACKAGE = Path(kvcli.__file__).parent
# the stages in order; the modules directly under kvcli/ (errors, atomic, keys) are below all
STAGES = {
    "": 0,
    "models": 1,
    "llama": 2,
    "state": 3,
    "predict": 4,
    "engine": 5,
    "eval": 6,
    "bundles": 7,  # making bundles measures them with the engine and eval
    "train": 8,  # trains a bundle's predictor and writes a bundle (bundles.build)
    "api": 8,  # the Python API opens bundles (the default made on first use) and runs the engine
    "cli": 9,
}


def stage_of(module: str) -> str:
    """'kvcli.engine.bundle' -> 'engine'; 'kvcli.errors' -> ''."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in STAGES) else ""


def imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "kvcli":
            if node.module == "kvcli":  # from kvcli import keys
                out += [(node.lineno, f"kvcli.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("kvcli.")]
    return out


def test_every_module_is_in_a_stage():
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).parts
        assert len(rel) <= 2, path
        assert len(rel) == 1 or rel[0] in STAGES, f"{path}: not a known stage"


def test_stages_import_only_earlier_stages():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).parts
        own = rel[0] if len(rel) == 2 else ""
        for line, module in imported_modules(ast.parse(path.read_text())):
            if rel == ("__init__.py",) and module == "kvcli.api":
                continue  # the package's face: kvcli.load, imported when called
            other = stage_of(module)
            if other != own and STAGES[other] >= STAGES[own]:
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {module}")
    assert not wrong, "\n".join(wrong)


def module_name(path: Path) -> str:
    """kvcli/engine/bundle.py -> 'kvcli.engine.bundle'; kvcli/cli/__init__.py -> 'kvcli.cli'."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the kvcli modules it imports, at module level or inside functions (ast.walk
    sees both). ``from kvcli.cli import ui`` names the module kvcli.cli.ui where there is one."""
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in paths.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "kvcli":
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    edges.add(sub if sub in paths else node.module)
            elif isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name.split(".")[0] == "kvcli"}
        if name == "kvcli":  # the package's face: kvcli.load imports the API when called
            edges.discard("kvcli.api")
        graph[name] = {e for e in edges if e in paths and e != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    graph = import_graph()
    assert graph["kvcli.cli.app"], "the graph should see the CLI's imports"
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_cycle_finder_sees_a_cycle_through_three_modules():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
