"""House rules of abssctl.py (STYLE.md §10): shape, imports and the seams between sections."""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = (ROOT / "abssctl.py").read_text(encoding="utf-8")
TREE = ast.parse(SRC)
BANNERS = [(n, m[1]) for n, line in enumerate(SRC.splitlines(), 1)
           if (m := re.match(r"# (\d+[a-z]?)\. ", line))]
FAST_PATH = {"__future__", "argparse", "enum", "json", "os", "re", "sys"}


def section(lineno: int) -> str:
    """The section number (without its letter) a line belongs to."""
    label = max(((n, s) for n, s in BANNERS if n <= lineno), default=(0, "0"))[1]
    return re.match(r"\d+", label)[0]


def imports(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name.split(".")[0]) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.split(".")[0]))
    return found


def test_sections_are_numbered_in_order() -> None:
    numbers = [s for _n, s in BANNERS]
    assert numbers[:3] == ["0", "1", "2"] and numbers[-2:] == ["9", "10"]
    assert [int(re.match(r"\d+", s)[0]) for s in numbers] == sorted(int(re.match(r"\d+", s)[0]) for s in numbers)


def test_no_shell_true_anywhere() -> None:
    for path in (ROOT / "abssctl.py", ROOT / "build_zipapp.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        assert not [k.lineno for k in ast.walk(tree) if isinstance(k, ast.keyword) and k.arg == "shell"], path


def test_subprocess_only_in_the_runner_section() -> None:
    places = {section(n) for n, name in imports(TREE) if name == "subprocess"}
    assert places == {"5"}


def test_print_only_in_the_output_section() -> None:
    calls = {section(c.lineno) for c in ast.walk(TREE)
             if isinstance(c, ast.Call) and getattr(c.func, "id", "") == "print"}
    assert calls <= {"2"}


def test_standard_library_only() -> None:
    for path in (ROOT / "abssctl.py", ROOT / "build_zipapp.py"):
        names = {name for _n, name in imports(ast.parse(path.read_text(encoding="utf-8")))}
        assert names - set(sys.stdlib_module_names) - {"abssctl"} == set(), path


def test_module_level_imports_are_the_fast_path_only() -> None:
    top = set()
    for node in TREE.body:
        if isinstance(node, ast.Import):
            top |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            top.add(node.module or "")
    assert top <= FAST_PATH, top - FAST_PATH


def test_no_dataclasses() -> None:
    assert "dataclasses" not in {name for _n, name in imports(TREE)}


def test_every_def_is_annotated() -> None:
    missing = []
    for node in ast.walk(TREE):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
            unannotated = [a.arg for a in args if a.annotation is None and a.arg not in ("self", "cls")]
            if node.returns is None or unannotated:
                missing.append(f"{node.name}:{node.lineno}")
    assert not missing, missing


def test_size_budget() -> None:
    # STYLE.md §1: one module, kept readable by its sections. A per-section bound replaces the bound
    # on the whole file: no stretch between two headings (a numbered banner or a `# --- N.M` sub-heading)
    # may pass 1,500 lines, so a section that grows gets sub-headings per concern.
    marks = [n for n, line in enumerate(SRC.splitlines(), 1)
             if re.match(r"# (\d+[a-z]?\. |--- \d+[a-z]?\.\d+ )", line)]
    stretches = [(b - a, a) for a, b in zip(marks, marks[1:] + [SRC.count("\n") + 1])]
    assert all(n < 1500 for n, _at in stretches), [(n, at) for n, at in stretches if n >= 1500]
