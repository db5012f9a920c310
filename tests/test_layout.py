"""The scripts stay readable (issue #21): each within its line budget, and no function (main
included) longer than 100 lines. What is not the method belongs in common/ or benchmarks/."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BUDGETS = {"lacol.py": 450, "scal.py": 500, "uscal.py": 400, "conlst.py": 800, "msmo.py": 700}


@pytest.mark.parametrize("script", sorted(BUDGETS))
def test_script_within_its_line_budget_and_every_function_within_100_lines(script):
    src = (ROOT / script).read_text()
    assert len(src.splitlines()) <= BUDGETS[script], f"{script}: {len(src.splitlines())} lines"
    long = {n.name: n.end_lineno - n.lineno + 1 for n in ast.walk(ast.parse(src))
            if isinstance(n, ast.FunctionDef) and n.end_lineno - n.lineno + 1 > 100}
    assert not long, f"{script}: functions over 100 lines: {long}"
    assert "def main(" in src and 'README "paper vs. code"' not in src
