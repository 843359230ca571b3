"""What the bench scripts share: their error, the fake tools of tests/rig/fakes.py, a tool lookup, and
the build of the archive they measure.

Imported as `benchlib` by the scripts beside it (run as `/usr/bin/python3 tests/bench/X.py`, their
folder is the first entry of sys.path)."""
from __future__ import annotations

import os
import shutil
import subprocess
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


def build_pyz(python: str, out: Path) -> Path:
    """This checkout as admins get it: build_zipapp.py's abssctl.pyz at OUT, compiled for PYTHON and
    self-checked by the build (ABSSCTL_* and PYTHON* variables of this shell left out)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ABSSCTL_", "PYTHON"))}
    try:
        done = subprocess.run([python, str(REPO / "build_zipapp.py"), "-o", str(out), "--python", python],
                              env=env, capture_output=True, text=True, timeout=300, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BenchError(f"build_zipapp.py: {exc}") from None
    if done.returncode != 0 or not out.is_file():
        raise BenchError(f"build_zipapp.py exited {done.returncode}:\n{done.stderr.strip()[-500:]}")
    return out


def need(tool: str) -> str:
    """The path of TOOL on PATH, or BenchError."""
    path = shutil.which(tool)
    if path is None:
        raise BenchError(f"{tool} is not installed")
    return path
