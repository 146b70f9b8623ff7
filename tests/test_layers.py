"""The architecture holds: layers import one way (import-linter contracts in pyproject.toml), no tunebench module is
imported inside a function to dodge a cycle, files stay small enough to hold in mind, and functions in the runner,
strategies and evaluation stay short."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "tunebench"
ROOT = SRC.parents[1]


def _functions(tree: ast.AST):
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def test_layer_contracts_hold():
    exe = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    if not Path(exe).exists():
        pytest.fail("lint-imports (import-linter) is not installed: pip install -e '.[test]'")
    result = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "0 broken" in result.stdout, result.stdout[-3000:] + result.stderr[-2000:]


def test_no_tunebench_import_inside_a_function():
    """Imports inside functions are for heavy dependencies only (a module that loads torch, matplotlib, onnx ...
    where the caller may not need it, as the CLI's start-up), each with its reason on the line; never to dodge a
    cycle between tunebench's own modules."""
    found = []
    for path in sorted(SRC.rglob("*.py")):
        lines = path.read_text(encoding="utf-8").splitlines()
        for fn in _functions(ast.parse("\n".join(lines))):
            for node in ast.walk(fn):
                own = (isinstance(node, ast.ImportFrom) and (node.level > 0 or (node.module or "").startswith("tunebench"))
                       or isinstance(node, ast.Import) and any(a.name.startswith("tunebench") for a in node.names))
                if own and not any("# heavy" in line for line in lines[node.lineno - 1:node.end_lineno]):
                    found.append(f"{path.relative_to(SRC)}:{node.lineno} {ast.unparse(node)}")
    assert not found, "imports of tunebench modules inside functions:\n" + "\n".join(found)


def test_files_and_functions_stay_small():
    too_long = []
    for path in sorted(SRC.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        rel = path.relative_to(SRC)
        if len(text.splitlines()) > 600:
            too_long.append(f"{rel}: {len(text.splitlines())} lines (at most 600)")
        if rel.parts[0] in ("runner", "strategies", "evaluation"):
            for fn in _functions(ast.parse(text)):
                n = fn.end_lineno - fn.lineno + 1
                if n > 80:
                    too_long.append(f"{rel}:{fn.lineno} {fn.name}: {n} lines (at most 80)")
    assert not too_long, "\n".join(too_long)
