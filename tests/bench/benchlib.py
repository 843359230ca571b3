"""What the bench scripts share: their error, the fake tools of tests/rig/fakes.py, and a tool lookup.

Imported as `benchlib` by the scripts beside it (run as `/usr/bin/python3 tests/bench/X.py`, their
folder is the first entry of sys.path)."""
from __future__ import annotations

import shutil
import sys
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


class BenchError(Exception):
    """The bench cannot produce meaningful figures."""


def load_fakes() -> types.ModuleType:
    """tests/rig/fakes.py; it imports pytest for its fixture, which /usr/bin/python3 may lack."""
    try:
        import pytest  # noqa: F401
    except ImportError:
        stub = types.ModuleType("pytest")
        stub.fixture = lambda fn=None, **_kw: fn if fn else (lambda f: f)   # type: ignore[attr-defined]
        stub.MonkeyPatch = object                                            # type: ignore[attr-defined]
        sys.modules["pytest"] = stub
    sys.path.insert(0, str(REPO / "tests" / "rig"))
    import fakes
    return fakes


def need(tool: str) -> str:
    """The path of TOOL on PATH, or BenchError."""
    path = shutil.which(tool)
    if path is None:
        raise BenchError(f"{tool} is not installed")
    return path
