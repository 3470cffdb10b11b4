"""The house stays in rooms a newcomer can read: no source file over 500 lines in the code's
folders, no Python class over 300 lines, no function (Python or C) over 80. The CLI's parser
is a table, so it needs no exception."""
import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FOLDERS = ("control", "dataplane", "ebpf", "lab")
MAX_FILE, MAX_CLASS, MAX_FUNCTION = 500, 300, 80
SOURCES = sorted(p for folder in FOLDERS for p in (REPO / folder).rglob("*")
                 if p.suffix in (".py", ".c", ".h") and "__pycache__" not in p.parts)


def _name(path: Path) -> str:
    return str(path.relative_to(REPO))


def _python_blocks(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield node, node.end_lineno - node.lineno + 1


def _c_functions(path: Path):
    """(signature, length) of each function: in the kernel's style, which ebpf/ keeps, its body
    opens with `{` alone at column 0 (a struct's brace ends its first line) and ends with `}`."""
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if line == "{":
            start = max(j for j in range(i) if lines[j][:1].strip())
            end = next(j for j in range(i, len(lines)) if lines[j] == "}")
            yield lines[start], end - start + 1


def test_there_is_something_to_check():
    assert len(SOURCES) > 20 and any(p.suffix == ".c" for p in SOURCES)


@pytest.mark.parametrize("path", SOURCES, ids=_name)
def test_rooms_stay_small(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_FILE, f"{_name(path)} has {lines} lines (at most {MAX_FILE}): split it by concern"
    if path.suffix == ".py":
        for node, length in _python_blocks(path):
            limit = MAX_CLASS if isinstance(node, ast.ClassDef) else MAX_FUNCTION
            assert length <= limit, f"{_name(path)}:{node.lineno} {node.name} has {length} lines (at most {limit})"
    else:
        for signature, length in _c_functions(path):
            assert length <= MAX_FUNCTION, f"{_name(path)}: {signature} has {length} lines (at most {MAX_FUNCTION})"
