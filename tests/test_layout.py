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
    "train": 6,
    "api": 7,
    "cli": 8,
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
