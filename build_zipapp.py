#!/usr/bin/python3
"""Build abssctl.pyz, a reproducible zip app of abssctl.py (DESIGN.md §2.6, STYLE.md §11).

Usage: python3 build_zipapp.py [-o dist/abssctl.pyz] [--python /usr/bin/python3]

Members: abssctl.py, abssctl.pyc (compiled by the target interpreter, so zipimport need not
recompile the module on every start), templates/* (exactly abssctl.TEMPLATE_NAMES), __main__.py
and BUILD-INFO.json. The same sources and SOURCE_DATE_EPOCH (else the last commit's time) give
the same bytes. After a self-check the archive replaces the destination and
<archive>.sha256 is written. Exit 0 on success, 1 when the build is refused, 2 on bad usage.
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parent
NAME = "abssctl"
MODULE = "abssctl.py"
BYTECODE = "abssctl.pyc"
TEMPLATES = "templates"
BUILD_INFO = "BUILD-INFO.json"
PYTHON_REQUIRES = ">=3.11"
DEFAULT_PYTHON = "/usr/bin/python3"
ZIP_EPOCH = 315532800           # 1980-01-01T00:00:00Z: zip cannot store an earlier date
FALLBACK_EPOCH = ZIP_EPOCH      # no SOURCE_DATE_EPOCH and no commit: still reproducible
STEP_TIMEOUT = 60               # seconds for any one git, compile or self-check subprocess
VERSION_RE = re.compile(r"^\d+\.\d+\.\d+(?:[-+][0-9A-Za-z.-]+)?$")
PYTHON_RE = re.compile(r"^/[A-Za-z0-9._/+-]+$")   # a shebang cannot hold spaces

# Only syntax every Python can parse before the gate: no f-strings, no walrus.
MAIN_PY = """\
import sys
if sys.version_info < (3, 11):
    sys.stderr.write("abssctl: needs Python 3.11 or newer, not %s (%s)\\n"
                     % (sys.version.split()[0], sys.executable))
    sys.exit(3)
import abssctl
sys.exit(abssctl.main())
"""

# Run by the target interpreter. The recorded file name is relative and not <...>, so a
# traceback's linecache falls back to the zipimporter's get_source() for the lines.
COMPILE_PY = """\
import py_compile, sys
py_compile.compile(sys.argv[1], cfile=sys.argv[2], dfile=sys.argv[3], doraise=True,
                   invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
"""
PYC_DFILE = "abssctl.pyz/abssctl.py"
PYC_FLAGS_UNCHECKED_HASH = 0b01

# Asks the target interpreter which file zipimport loaded abssctl from.
WHICH_FILE_PY = "import sys; sys.path.insert(0, sys.argv[1]); import abssctl; print(abssctl.__file__)"


class BuildError(Exception):
    """The build is refused; the message says why."""


# ============================================================================
# Sources
# ============================================================================

def _literal_assignments(tree: ast.Module) -> dict[str, object]:
    """Top-level `NAME = <literal>` and `NAME: T = <literal>` assignments."""
    found: dict[str, object] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            target, value = node.target, node.value
        else:
            continue
        if isinstance(target, ast.Name):
            try:
                found[target.id] = ast.literal_eval(value)
            except ValueError:
                found[target.id] = None
    return found


def read_module_facts(source: bytes) -> tuple[str, tuple[str, ...]]:
    """`__version__` and `TEMPLATE_NAMES` of abssctl.py, read with ast, never imported."""
    try:
        tree = ast.parse(source, filename=MODULE)
    except SyntaxError as exc:
        raise BuildError(f"{MODULE} does not parse: {exc}") from None
    facts = _literal_assignments(tree)
    version, names = facts.get("__version__"), facts.get("TEMPLATE_NAMES")
    if not isinstance(version, str) or not VERSION_RE.match(version):
        raise BuildError(f"{MODULE}: __version__ must be a literal X.Y.Z string, got {version!r}")
    if (not isinstance(names, tuple) or not names
            or not all(isinstance(n, str) and _plain_name(n) for n in names)
            or len(set(names)) != len(names)):
        raise BuildError(f"{MODULE}: TEMPLATE_NAMES must be a literal tuple of distinct "
                         f"file names, got {names!r}")
    return version, names


def _plain_name(name: str) -> bool:
    return bool(name) and "/" not in name and not name.startswith(".")


def read_templates(root: Path, names: tuple[str, ...]) -> dict[str, bytes]:
    """templates/<name> for each of TEMPLATE_NAMES; anything else in templates/ is refused."""
    folder = root / TEMPLATES
    try:
        present = set(os.listdir(folder))
    except OSError as exc:
        raise BuildError(f"cannot list {folder}: {exc.strerror}") from None
    if extra := sorted(present - set(names)):
        raise BuildError(f"{folder} holds files not in TEMPLATE_NAMES: {', '.join(extra)} "
                         "(remove editor backups and __pycache__)")
    if missing := sorted(set(names) - present):
        raise BuildError(f"{folder} lacks templates named in TEMPLATE_NAMES: {', '.join(missing)}")
    members = {}
    for name in names:
        path = folder / name
        if path.is_symlink() or not path.is_file():
            raise BuildError(f"{path} must be a regular file")
        members[f"{TEMPLATES}/{name}"] = path.read_bytes()
    return members


def compile_bytecode(python: str, source: bytes) -> bytes:
    """abssctl.pyc as the target interpreter writes it (unchecked-hash pyc, reproducible)."""
    # 3.11's marshal already sorts frozenset constants (bpo-37596); a fixed hash seed keeps any
    # other hash-order dependence out of the bytes. No -E/-I: those would drop PYTHONHASHSEED.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONHASHSEED"] = "0"
    with tempfile.TemporaryDirectory(prefix="abssctl-build-") as tmp:
        src, pyc = Path(tmp, MODULE), Path(tmp, BYTECODE)
        src.write_bytes(source)     # compile exactly the bytes that go into the archive
        argv = [python, "-s", "-S", "-c", COMPILE_PY, str(src), str(pyc), PYC_DFILE]
        proc = _run(argv, cwd=tmp, env=env)
        if proc.returncode != 0:
            raise BuildError(f"{python} could not compile {MODULE}:\n{proc.stderr.strip()}")
        data = pyc.read_bytes()
    if int.from_bytes(data[4:8], "little") != PYC_FLAGS_UNCHECKED_HASH:
        raise BuildError(f"{python} did not write an unchecked-hash pyc")
    return data


# ============================================================================
# Provenance: git and SOURCE_DATE_EPOCH
# ============================================================================

def _run(argv: list[str], *, cwd: str | Path | None = None,
         env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=STEP_TIMEOUT, check=False)
    except FileNotFoundError:
        raise BuildError(f"{argv[0]}: not found") from None
    except PermissionError:
        raise BuildError(f"{argv[0]}: permission denied") from None
    except subprocess.TimeoutExpired:
        raise BuildError(f"{' '.join(argv[:2])}: no answer within {STEP_TIMEOUT} s") from None


def _git(root: Path, *args: str) -> str | None:
    """git's stdout, or None when git is missing or fails (no repository, no commits yet)."""
    try:
        proc = _run(["git", "-C", str(root), *args])
    except BuildError:
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def git_facts(root: Path) -> tuple[str, bool, int | None]:
    """(commit, dirty, commit time) of the checkout at root; ("unknown", True, None) outside one."""
    top = _git(root, "rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != root:     # not a checkout, or inside someone else's
        return "unknown", True, None
    commit = _git(root, "rev-parse", "--verify", "--quiet", "HEAD^{commit}")
    if commit is None:                                  # a repository with no commits yet
        return "unknown", True, None
    status = _git(root, "status", "--porcelain", "--untracked-files=all", "--",
                  MODULE, TEMPLATES, Path(__file__).name)
    stamp = _git(root, "log", "-1", "--format=%ct")
    return commit, status != "", int(stamp) if stamp and stamp.isdigit() else None


def source_date_epoch(commit_time: int | None) -> int:
    """SOURCE_DATE_EPOCH, else the last commit's time, else a fixed date."""
    raw = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if raw:
        if not raw.isdigit():
            raise BuildError(f"SOURCE_DATE_EPOCH must be a whole number of seconds, not {raw!r}")
        return int(raw)
    return commit_time if commit_time is not None else FALLBACK_EPOCH


def build_info(version: str, commit: str, dirty: bool, stamp: int,
               members: Mapping[str, bytes]) -> bytes:
    """BUILD-INFO.json: provenance and a sha256 per member, no wall-clock time."""
    info = {
        "name": NAME, "version": version, "git_commit": commit, "git_dirty": dirty,
        "source_date_epoch": stamp, "python_requires": PYTHON_REQUIRES,
        "files": {name: hashlib.sha256(data).hexdigest() for name, data in members.items()},
    }
    return (json.dumps(info, sort_keys=True, indent=2) + "\n").encode()


# ============================================================================
# Archive
# ============================================================================

def collect_members(root: Path, python: str) -> tuple[dict[str, bytes], str, int, str]:
    """Every member with its bytes, plus the version, the stamp and the commit."""
    try:
        source = (root / MODULE).read_bytes()
    except OSError as exc:
        raise BuildError(f"cannot read {root / MODULE}: {exc.strerror}") from None
    version, names = read_module_facts(source)
    members = read_templates(root, names)
    members[MODULE] = source
    members[BYTECODE] = compile_bytecode(python, source)
    members["__main__.py"] = MAIN_PY.encode()
    commit, dirty, commit_time = git_facts(root)
    stamp = source_date_epoch(commit_time)
    members[BUILD_INFO] = build_info(version, commit, dirty, stamp, members)
    return members, version, stamp, commit


def write_archive(path: Path, members: Mapping[str, bytes], python: str, stamp: int) -> None:
    """Shebang plus a zip whose bytes depend only on the members and the stamp."""
    when = time.gmtime(max(stamp, ZIP_EPOCH))[:6]
    with open(path, "wb") as f:
        f.write(f"#!{python}\n".encode())
        with zipfile.ZipFile(f, "w") as zf:
            for name in sorted(members):
                info = zipfile.ZipInfo(name, date_time=when)
                info.external_attr = 0o644 << 16
                # The bytecode is stored, not deflated: inflating its ~1 MB took ~4 ms of every start,
                # a tenth of the start-up budget (DESIGN.md §8); the archive grows by ~0.6 MB.
                info.compress_type = zipfile.ZIP_STORED if name == BYTECODE else zipfile.ZIP_DEFLATED
                zf.writestr(info, members[name])
    os.chmod(path, 0o755)


def expected_version_line(version: str, commit: str, stamp: int) -> str:
    """What `abssctl.pyz --version` must print for this build."""
    day = time.strftime("%Y-%m-%d", time.gmtime(stamp))
    return f"{NAME} {version} (build {commit[:12]}, {day})"


def self_check(path: Path, members: Mapping[str, bytes], python: str, want: str) -> None:
    """The archive is intact, holds exactly the members, runs, and loads its bytecode."""
    with zipfile.ZipFile(path) as zf:
        if (bad := zf.testzip()) is not None:
            raise BuildError(f"self-check: {bad} is corrupt in {path}")
        if zf.namelist() != sorted(members):
            raise BuildError(f"self-check: members {zf.namelist()} != {sorted(members)}")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "ABSSCTL_"))}
    proc = _run([python, str(path), "--version"], cwd=path.parent, env=env)
    if proc.returncode != 0 or proc.stdout.strip() != want:
        raise BuildError(f"self-check: {python} {path.name} --version exited {proc.returncode} "
                         f"and printed {proc.stdout.strip()!r} (stderr {proc.stderr.strip()!r}); "
                         f"wanted {want!r}")
    proc = _run([python, "-I", "-c", WHICH_FILE_PY, str(path)], cwd=path.parent, env=env)
    if proc.returncode != 0 or not proc.stdout.strip().endswith("/" + BYTECODE):
        raise BuildError(f"self-check: {python} did not import {BYTECODE} from the archive "
                         f"(got {proc.stdout.strip()!r}, stderr {proc.stderr.strip()!r})")


def write_checksum(path: Path) -> str:
    """Write <archive>.sha256 in sha256sum's format and return its line."""
    line = f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.name}\n"
    sums = path.with_name(path.name + ".sha256")
    tmp = sums.with_name(f".{sums.name}.tmp-{os.getpid()}")
    tmp.write_text(line, encoding="ascii")
    os.replace(tmp, sums)
    return line


def build(dest: Path, python: str, root: Path = ROOT) -> str:
    """Build, check and install the archive at dest; return the sha256 line."""
    members, version, stamp, commit = collect_members(root, python)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write_archive(tmp, members, python, stamp)
        self_check(tmp, members, python, expected_version_line(version, commit, stamp))
        os.replace(tmp, dest)   # only a checked archive ever replaces the destination
    finally:
        tmp.unlink(missing_ok=True)
    return write_checksum(dest)


# ============================================================================
# CLI
# ============================================================================

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line: -o/--output and --python."""
    p = argparse.ArgumentParser(prog="build_zipapp.py", description=__doc__.split("\n\n")[0])
    p.add_argument("-o", "--output", type=Path, default=ROOT / "dist" / "abssctl.pyz",
                   help="where to write the archive (default: dist/abssctl.pyz in the checkout)")
    p.add_argument("--python", default=DEFAULT_PYTHON,
                   help="target interpreter: the shebang, the bytecode and the self-check "
                        f"(default: {DEFAULT_PYTHON})")
    return p.parse_args(argv)


def _check_python(python: str) -> None:
    if not PYTHON_RE.match(python):
        raise BuildError(f"--python must be an absolute path usable in a shebang, not {python!r}")
    if not os.access(python, os.X_OK) or not os.path.isfile(python):
        raise BuildError(f"--python {python}: no such executable")


def main(argv: list[str] | None = None) -> int:
    """Build the archive; print its sha256 line; 0 on success, 1 when refused."""
    args = parse_args(argv)
    try:
        _check_python(args.python)
        line = build(args.output.absolute(), args.python)
    except BuildError as exc:
        print(f"build_zipapp: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"build_zipapp: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
