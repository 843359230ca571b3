"""The artefact (DESIGN.md §2.6, §7): build abssctl.pyz with the target interpreter, run it as admins do.

Every archive run uses /usr/bin/python3 (Debian 12's interpreter, the target), never the python3
that happens to be first on PATH.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import time
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PYTHON = "/usr/bin/python3"
TIMEOUT = 60
EPOCH = 1764633600                      # 2025-12-02T00:00:00Z
EPOCH_DAY = "2025-12-02"
MEMBERS = ["BUILD-INFO.json", "__main__.py", "abssctl.py", "abssctl.pyc",
           "templates/abssctl-backup.service", "templates/abssctl-backup.timer", "templates/abssctl-notify@.service",
           "templates/abssctl-upgrade.service", "templates/abssctl-upgrade.timer",
           "templates/nginx-vhost.conf", "templates/systemd-unit.service"]
PATH_KEYS = ("state_dir", "log_dir", "run_dir", "install_root", "instance_root", "backup_root",
             "templates_dir", "tls_dir", "runtime_root", "acme_webroot", "systemd_unit_dir", "nginx_sites_available",
             "nginx_sites_enabled")
WHICH_FILE = "import sys; sys.path.insert(0, sys.argv[1]); import abssctl; print(abssctl.__file__)"

pytestmark = pytest.mark.skipif(not os.access(PYTHON, os.X_OK),
                                reason=f"{PYTHON}, the target interpreter, is absent")


def _env(**extra: str) -> dict[str, str]:
    """The caller's environment without anything that could steer abssctl or the build."""
    drop = ("ABSSCTL_", "PYTHON", "SOURCE_DATE_EPOCH")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(extra)
    return env


def _run(argv: list[str], *, cwd: Path | None = None,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in argv], cwd=cwd, env=_env() if env is None else env,
                          capture_output=True, text=True, timeout=TIMEOUT, check=False)


def _build(root: Path, out: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return _run([PYTHON, root / "build_zipapp.py", "-o", out], cwd=root, env=_env(**env))


def _copy_sources(dst: Path) -> Path:
    """What the build reads, outside any git checkout (so git_commit is "unknown")."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("build_zipapp.py", "abssctl.py"):
        shutil.copy2(REPO / name, dst / name)
    shutil.copytree(REPO / "templates", dst / "templates")
    return dst


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def pyz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """dist/abssctl.pyz built from the checkout, as `python3 build_zipapp.py -o ...` makes it."""
    out = tmp_path_factory.mktemp("dist") / "abssctl.pyz"
    proc = _build(REPO, out, SOURCE_DATE_EPOCH=str(EPOCH))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{_sha256(out)}  abssctl.pyz\n"
    return out


@pytest.fixture(scope="module")
def info(pyz: Path) -> dict[str, object]:
    with zipfile.ZipFile(pyz) as zf:
        return json.loads(zf.read("BUILD-INFO.json"))


@pytest.fixture(scope="module")
def version_line(info: dict[str, object]) -> str:
    """What --version of this archive prints; the version itself comes from the source."""
    proc = _run([PYTHON, REPO / "abssctl.py", "--version"])
    match = re.fullmatch(r"abssctl (\S+) \(source\)\n", proc.stdout)
    assert proc.returncode == 0 and match, (proc.stdout, proc.stderr)
    assert info["version"] == match[1]
    return f"abssctl {match[1]} (build {str(info['git_commit'])[:12]}, {EPOCH_DAY})"


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A config.toml that points every [paths] key into a sandbox; the registry is empty."""
    root = tmp_path_factory.mktemp("sandbox")
    lines = ["[paths]"] + [f'{key} = "{root / key}"' for key in PATH_KEYS]
    (root / "state_dir" / "registry").mkdir(parents=True)
    cfg = root / "config.toml"
    cfg.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return cfg


def test_archive_layout(pyz: Path, info: dict[str, object]) -> None:
    assert pyz.read_bytes().startswith(b"#!/usr/bin/python3\n")
    assert pyz.stat().st_mode & 0o777 == 0o755
    assert pyz.with_name("abssctl.pyz.sha256").read_text() == f"{_sha256(pyz)}  abssctl.pyz\n"
    with zipfile.ZipFile(pyz) as zf:
        assert zf.testzip() is None
        assert zf.namelist() == MEMBERS
        assert {(i.date_time, i.external_attr) for i in zf.infolist()} == {(time.gmtime(EPOCH)[:6], 0o644 << 16)}
        # the bytecode is stored (inflating it cost every start ~4 ms); the rest is deflated
        assert {i.filename: i.compress_type for i in zf.infolist()} == {
            n: zipfile.ZIP_STORED if n == "abssctl.pyc" else zipfile.ZIP_DEFLATED for n in MEMBERS}
        assert zf.read("abssctl.py") == (REPO / "abssctl.py").read_bytes()
        files = {n: hashlib.sha256(zf.read(n)).hexdigest() for n in MEMBERS if n != "BUILD-INFO.json"}
    assert list(info) == sorted(info) == ["files", "git_commit", "git_dirty", "name",
                                          "python_requires", "source_date_epoch", "version"]
    assert info["files"] == files
    assert (info["name"], info["python_requires"], info["source_date_epoch"]) == (
        "abssctl", ">=3.11", EPOCH)
    assert isinstance(info["git_dirty"], bool)


def test_bytecode_is_for_the_target(pyz: Path) -> None:
    with zipfile.ZipFile(pyz) as zf:
        pyc = zf.read("abssctl.pyc")
    magic = _run([PYTHON, "-c", "import importlib.util, sys; "
                                "sys.stdout.write(importlib.util.MAGIC_NUMBER.hex())"]).stdout
    assert pyc[:4].hex() == magic
    assert int.from_bytes(pyc[4:8], "little") == 0b01      # hash-based, never checked: reproducible


def test_archive_imports_its_bytecode(pyz: Path) -> None:
    # zipimport tries abssctl.pyc before abssctl.py; __file__ names the entry the code came from.
    proc = _run([PYTHON, "-I", "-c", WHICH_FILE, pyz])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{pyz}/abssctl.pyc\n"


def test_bytecode_with_a_wrong_magic_falls_back_to_source(pyz: Path, tmp_path: Path,
                                                          version_line: str) -> None:
    # What another Python version sees: the archive still runs, from abssctl.py.
    other = tmp_path / "other.pyz"
    with zipfile.ZipFile(pyz) as src, open(other, "wb") as f:
        f.write(b"#!/usr/bin/python3\n")
        with zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as dst:
            for name in src.namelist():
                data = src.read(name)
                dst.writestr(name, b"\0\0\0\0" + data[4:] if name == "abssctl.pyc" else data)
    assert _run([PYTHON, "-I", "-c", WHICH_FILE, other]).stdout == f"{other}/abssctl.py\n"
    assert _run([PYTHON, other, "--version"]).stdout == version_line + "\n"


def test_version_names_the_build(pyz: Path, version_line: str) -> None:
    proc = _run([PYTHON, pyz, "--version"])
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, version_line + "\n", "")


def test_json_instance_list(pyz: Path, config: Path) -> None:
    proc = _run([PYTHON, pyz, "--config", config, "--json", "instance", "list"])
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["ok"] is True and doc["instances"] == []


@pytest.mark.parametrize("argv", [["--config", "/nonexistent.toml", "config", "show"],
                                  ["instance", "nosuchverb"],
                                  ["--json", "instance", "nosuchverb"]])
def test_failing_command_exits_as_the_source_does(pyz: Path, argv: list[str]) -> None:
    source = _run([PYTHON, REPO / "abssctl.py", *argv])
    archive = _run([PYTHON, pyz, *argv])
    assert archive.returncode == source.returncode == 2, (source.stderr, archive.stderr)
    if "--json" in argv:            # messages may name the program; the kind may not differ
        docs = [json.loads(p.stdout) for p in (source, archive)]
        assert [(d["ok"], d["error"]["kind"]) for d in docs] == [(False, "UsageError")] * 2


@pytest.mark.parametrize("how", ["./abssctl.pyz", "python3 abssctl.pyz", "symlink on PATH",
                                 "python3 -I"])
def test_runs_every_way(pyz: Path, config: Path, version_line: str, tmp_path: Path,
                        how: str) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "abssctl").symlink_to(pyz)
    prefix = {"./abssctl.pyz": ["./abssctl.pyz"],
              "python3 abssctl.pyz": ["python3", "abssctl.pyz"],
              "symlink on PATH": ["abssctl"],
              "python3 -I": [PYTHON, "-I", pyz]}[how]
    # PATH ends in /usr/bin, so a bare python3 is Debian's, and the link is found first.
    env = _env(PATH=f"{bindir}:/usr/bin:/bin")
    proc = _run([*prefix, "--version"], cwd=pyz.parent, env=env)
    assert (proc.returncode, proc.stdout) == (0, version_line + "\n"), proc.stderr
    proc = _run([*prefix, "--config", config, "--json", "instance", "list"], cwd=pyz.parent, env=env)
    assert proc.returncode == 0 and json.loads(proc.stdout)["ok"] is True, proc.stderr


def test_rebuild_is_byte_identical(tmp_path: Path) -> None:
    src = _copy_sources(tmp_path / "src")
    first = tmp_path / "a" / "abssctl.pyz"
    assert _build(src, first, SOURCE_DATE_EPOCH=str(EPOCH)).returncode == 0
    later = time.time() + 3600
    for path in [src / "abssctl.py", src / "build_zipapp.py", *(src / "templates").iterdir()]:
        os.utime(path, (later, later))
    second = tmp_path / "b" / "abssctl.pyz"
    proc = _build(src, second, SOURCE_DATE_EPOCH=str(EPOCH))
    assert proc.returncode == 0, proc.stderr
    assert _sha256(first) == _sha256(second)
    assert proc.stdout == f"{_sha256(first)}  abssctl.pyz\n"
    # Neither the checkout's location nor the build's temporary directory leaks into the bytes.
    elsewhere = _copy_sources(tmp_path / "another" / "checkout")
    third = tmp_path / "c" / "abssctl.pyz"
    assert _build(elsewhere, third, SOURCE_DATE_EPOCH=str(EPOCH)).returncode == 0
    assert _sha256(third) == _sha256(first)


@pytest.mark.parametrize("stray", ["nginx-vhost.conf~", ".systemd-unit.service.swp", "__pycache__",
                                   "-systemd-unit.service"])
def test_build_refuses_templates_other_than_template_names(tmp_path: Path, stray: str) -> None:
    src = _copy_sources(tmp_path / "src")
    if stray == "__pycache__":
        (src / "templates" / stray).mkdir()
    elif stray.startswith("-"):
        (src / "templates" / stray[1:]).unlink()           # a missing template is refused too
    else:
        (src / "templates" / stray).write_text("leftover\n")
    out = tmp_path / "dist" / "abssctl.pyz"
    proc = _build(src, out, SOURCE_DATE_EPOCH=str(EPOCH))
    assert proc.returncode != 0 and proc.stdout == ""
    assert stray.lstrip("-") in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


def test_build_from_a_commit_takes_its_time_and_id(tmp_path: Path) -> None:
    git = shutil.which("git")
    if git is None:
        pytest.skip("git is absent")
    src = _copy_sources(tmp_path / "src")
    stamp = f"@{EPOCH + 86400} +0000"
    env = _env(GIT_AUTHOR_DATE=stamp, GIT_COMMITTER_DATE=stamp, GIT_AUTHOR_NAME="t",
               GIT_AUTHOR_EMAIL="t@example.org", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@example.org", GIT_CONFIG_GLOBAL="/dev/null")
    for argv in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "build me"]):
        assert _run([git, *argv], cwd=src, env=env).returncode == 0
    commit = _run([git, "rev-parse", "HEAD"], cwd=src, env=env).stdout.strip()
    out = tmp_path / "abssctl.pyz"
    assert _build(src, out).returncode == 0
    with zipfile.ZipFile(out) as zf:
        info = json.loads(zf.read("BUILD-INFO.json"))
    assert (info["git_commit"], info["git_dirty"], info["source_date_epoch"]) == (
        commit, False, EPOCH + 86400)
    version = _run([PYTHON, out, "--version"]).stdout
    assert version == f"abssctl {info['version']} (build {commit[:12]}, 2025-12-03)\n"
