"""The one-way layers stay true: no module imports inside a function, except a few optional or
slow-to-load dependencies that one function needs, and the CLI (whose commands import their library
call when they run, so that `robustdissect --help` starts without torch). The layers themselves and
the absence of import cycles are checked by `lint-imports` (.importlinter) in scripts/test.sh."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "robustdissect"
# modules a function may import where it runs: optional, or slow to load and used by one function
LAZY = {"pandas", "playwright.sync_api", "captum.attr", "skimage.data", "skimage.color", "matplotlib.pyplot",
        "torch._dynamo"}
LAZY_FILES = {"cli.py"}


def function_level_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import statement inside a function body of the file at `path`."""
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if in_function and isinstance(child, ast.Import):
                found.extend((child.lineno, a.name) for a in child.names)
            elif in_function and isinstance(child, ast.ImportFrom):
                found.append((child.lineno, "." * child.level + (child.module or "")))
            visit(child, inside)

    visit(ast.parse(path.read_text(encoding="utf-8")), False)
    return found


def test_no_module_imports_inside_a_function_but_optional_dependencies() -> None:
    offenders = [
        f"{path.relative_to(SRC)}:{line}: {module}"
        for path in sorted(SRC.rglob("*.py"))
        if path.name not in LAZY_FILES or path.parent != SRC
        for line, module in function_level_imports(path)
        if module not in LAZY
    ]
    assert offenders == []


def test_the_check_finds_imports_inside_functions_and_methods(tmp_path: Path) -> None:
    code = (
        "import os\n"
        "def f():\n    from .pipeline import STAGES\n    return STAGES\n"
        "class C:\n    def m(self):\n        import json, pandas\n"
        "        def inner():\n            from ..x import y\n"
    )
    path = tmp_path / "m.py"
    path.write_text(code)
    assert function_level_imports(path) == [(3, ".pipeline"), (7, "json"), (7, "pandas"), (9, "..x")]


SHARED_STAGE_MODULES = {"base", "common"}


def stage_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in the stage module at `path` of another module of the
    `stages` package that is not one of the shared ones (base, common)."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names = [node.module] if node.module else [a.name for a in node.names]
            found += [(node.lineno, name.split(".")[0]) for name in names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("robustdissect.stages."):
            found.append((node.lineno, node.module.split(".")[2]))
    return [(line, name) for line, name in found if name not in SHARED_STAGE_MODULES]


def test_no_stage_module_imports_another_stage() -> None:
    offenders = [
        f"stages/{path.name}:{line}: {name}"
        for path in sorted((SRC / "stages").glob("*.py"))
        if path.name != "__init__.py"  # imports every stage so that each registers itself
        for line, name in stage_imports(path)
    ]
    assert offenders == []


def test_the_stage_check_finds_imports_of_other_stages(tmp_path: Path) -> None:
    path = tmp_path / "m.py"
    path.write_text(
        "from .base import STAGES\nfrom .common import feature_scores\nfrom ..analysis import x\n"
        "from .concepts import stage_dissection\nfrom . import features\n"
        "from robustdissect.stages.metric import y\n"
    )
    assert stage_imports(path) == [(4, "concepts"), (5, "features"), (6, "metric")]


MAX_STAGE_FUNCTION_LINES = 60  # a stage orchestrates; the work lives in helpers and the library


def long_functions(path: Path, limit: int = MAX_STAGE_FUNCTION_LINES) -> list[tuple[str, int]]:
    """(name, lines) of every function in `path` longer than `limit` lines (def to last line)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [
        (node.name, node.end_lineno - node.lineno + 1)
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno is not None
        and node.end_lineno - node.lineno + 1 > limit
    ]


def test_no_stage_function_is_longer_than_60_lines() -> None:
    offenders = [f"stages/{p.name}: {name} ({n} lines)" for p in sorted((SRC / "stages").glob("*.py"))
                 for name, n in long_functions(p)]  # fmt: skip
    assert offenders == []


def test_the_length_check_counts_lines(tmp_path: Path) -> None:
    path = tmp_path / "m.py"
    body = "\n".join(f"    x{i} = {i}" for i in range(61))
    path.write_text(f"def long() -> None:\n{body}\n\n\ndef short() -> None:\n    pass\n")
    assert long_functions(path) == [("long", 62)]
