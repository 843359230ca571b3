"""§4.4 versions against real node and npm and the local registry fixture (DESIGN §7(b)).

Every test gets a host built from the `sandbox` fixture with `[commands] node/npm` pointed at the
real programs (npm through a small logging wrapper), `[npm] registry` at the fixture registry,
`[service] user = root` (pytest's tmp dirs are 0700, so `nobody` could not reach the tree) and
`fake-native` added to `allow_scripts` (its install script must run or the server cannot start).
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from rig.fakes import Sandbox, RunResult
from rig.npm_registry import NATIVE_PACKAGE, PACKAGE, NpmRegistry, npm_env

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
NODE = shutil.which("node")
NPM = shutil.which("npm")
ZSTD = shutil.which("zstd")
needs_npm = pytest.mark.skipif(not (NODE and NPM), reason="node and npm are needed for the version "
                               "tests (Debian: apt-get install nodejs npm)")
BIN = "build/bin/actual-server.js"
ALLOW_SCRIPTS = ["better-sqlite3", "bcrypt", "argon2", NATIVE_PACKAGE]
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
GZIP_MAGIC = b"\x1f\x8b"
RFC3339_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")
WAIT = 60.0  # bound on every wait for a child process in this file

NPM_WRAPPER = '''#!{python} -IS
# Logs its argv, optionally pauses before "install" (writing its pid to a marker), then execs npm.
import json, os, sys, time
here = os.path.dirname(os.path.abspath(__file__))
try:
    with open(os.path.join(here, "npm-wrapper.json")) as fh:
        knobs = json.load(fh)
except (OSError, ValueError):
    knobs = {{}}
with open(os.path.join(here, "npm-calls.jsonl"), "a") as fh:
    fh.write(json.dumps(sys.argv[1:]) + "\\n")
if "install" in sys.argv[1:] and knobs.get("pause_install"):
    with open(knobs["marker"], "w") as fh:
        fh.write(str(os.getpid()))
    time.sleep(float(knobs["pause_install"]))
os.execv({npm!r}, [{npm!r}, *sys.argv[1:]])
'''

CHILD = '''
import os, signal, sys
sys.path.insert(0, {repo!r})
import abssctl

def observer(step, phase):
    with open({trace!r}, "a") as fh:
        fh.write(step.id + " " + phase + "\\n")
    if {kill_step!r} and step.id == {kill_step!r} and phase == "before":
        os.kill(os.getpid(), signal.SIGKILL)

abssctl.STEP_OBSERVERS.append(observer)
signal.signal(signal.SIGINT, signal.default_int_handler)   # as at a terminal, whatever we inherited
sys.exit(abssctl.main({argv!r}))
'''


def host_node() -> dict[str, str]:
    """What the host's node reports, in the shape of the registry's `node` block."""
    script = ("JSON.stringify({version: process.version, abi: process.versions.modules, "
              "arch: process.arch, platform: process.platform, "
              "glibc: process.report.getReport().header.glibcVersionRuntime})")
    got = subprocess.run([str(NODE), "-p", script], capture_output=True, text=True, timeout=30,
                         check=True)
    return json.loads(got.stdout)


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def show(res: RunResult) -> str:
    return f"argv={res.argv}\nrc={res.rc}\nstdout={res.out}\nstderr={res.err}"


def ok(res: RunResult) -> dict[str, Any]:
    assert res.rc == 0, show(res)
    assert isinstance(res.doc, dict) and res.doc.get("ok") is True, show(res)
    return res.doc


def failed(res: RunResult, rc: int, kind: str | tuple[str, ...] | None = None) -> dict[str, Any]:
    assert res.rc == rc, show(res)
    assert isinstance(res.doc, dict) and res.doc.get("ok") is False, show(res)
    if kind is not None:
        kinds = (kind,) if isinstance(kind, str) else kind
        assert res.doc["error"]["kind"] in kinds, show(res)
    assert "Traceback" not in res.err, show(res)
    return res.doc


def engines_warning(version: str, engines: str, node_version: str) -> str:
    return (f'{PACKAGE} {version} declares engines.node "{engines}"; '
            f"this host runs node {node_version}")


class Host:
    """One sandbox configured for real node/npm; paths and registry readers for assertions."""

    def __init__(self, sb: Sandbox, registry_url: str, cache: Path) -> None:
        self.sb = sb
        self.cache = cache
        wrapper_dir = sb.root / "realbin"
        wrapper_dir.mkdir(exist_ok=True)
        self.npm_wrapper = wrapper_dir / "npm"
        self.npm_wrapper.write_text(NPM_WRAPPER.format(python=sys.executable, npm=str(NPM)),
                                    encoding="utf-8")
        self.npm_wrapper.chmod(0o755)
        self.npm_log = wrapper_dir / "npm-calls.jsonl"
        self.npm_knobs = wrapper_dir / "npm-wrapper.json"
        sb.configure("service", user="root", group="root")
        sb.configure("commands", node=[str(NODE)], npm=[str(self.npm_wrapper)])
        sb.configure("npm", registry=registry_url, allow_scripts=ALLOW_SCRIPTS)
        sb.configure("health", timeout=30, interval=0.1)
        self.use_env()
        for tool in ("node", "npm"):     # nothing may reach the fakes, not even npm's scripts
            (sb.bin / tool).unlink(missing_ok=True)
        ok(self.run("--json", "init"))

    def use_env(self) -> None:
        """Point npm (in-process and in children) at this host's cache, with no retries."""
        mp = self.sb.monkeypatch
        for key in [k for k in os.environ if k.lower().startswith("npm_config_")]:
            mp.delenv(key)
        for key, value in npm_env(self.cache).items():
            if key.lower().startswith("npm_config_"):
                mp.setenv(key, value)
        mp.setenv("PATH", self.sb.orig_path)
        mp.chdir(self.sb.root)

    def run(self, *argv: Any) -> RunResult:
        return self.sb.run(*argv)

    def set_registry(self, url: str) -> None:
        self.sb.configure("npm", registry=url)

    @property
    def install_root(self) -> Path:
        return self.sb.paths["install_root"]

    @property
    def state_dir(self) -> Path:
        return self.sb.paths["state_dir"]

    @property
    def journal_dir(self) -> Path:
        return self.state_dir / "journal"

    def registry(self, name: str = "versions") -> dict[str, Any]:
        path = self.state_dir / "registry" / f"{name}.json"
        return json.loads(path.read_text(encoding="utf-8"))

    def write_instances(self, instances: dict[str, Any]) -> None:
        path = self.state_dir / "registry" / "instances.json"
        path.write_text(json.dumps({"schema_version": 1, "instances": instances}, indent=2,
                                   sort_keys=True) + "\n", encoding="utf-8")

    def leftovers(self) -> list[str]:
        """Staging and trash dirs under install_root (DESIGN §3.5 temporary names)."""
        if not self.install_root.exists():
            return []
        return sorted(n for n in os.listdir(self.install_root)
                      if n.startswith((".staging-", ".trash-", ".smoke-", ".abssctl-tmp-", ".current-")))

    def journals(self) -> list[str]:
        if not self.journal_dir.exists():
            return []
        return sorted(n for n in os.listdir(self.journal_dir) if n.endswith(".json"))

    def npm_calls(self) -> list[list[str]]:
        if not self.npm_log.exists():
            return []
        return [json.loads(line) for line in self.npm_log.read_text().splitlines() if line]

    def oplog(self) -> list[dict[str, Any]]:
        path = self.sb.paths["log_dir"] / "operations.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line]

    def version_tree(self, version: str) -> dict[str, tuple[int, int, str]]:
        """Snapshot of <install_root>/<version>/ (mode, size, sha256 or link target)."""
        snap: dict[str, tuple[int, int, str]] = {}
        root = self.install_root / version
        for dirpath, dirnames, filenames in os.walk(root):
            for name in sorted([*dirnames, *filenames]):
                p = Path(dirpath) / name
                st = p.lstat()
                rel = p.relative_to(root).as_posix()
                if stat.S_ISLNK(st.st_mode):
                    snap[rel] = (st.st_mode, 0, os.readlink(p))
                elif stat.S_ISREG(st.st_mode):
                    snap[rel] = (st.st_mode, st.st_size, sha256_file(p))
                else:
                    snap[rel] = (st.st_mode, 0, "")
        return snap

    def spawn(self, argv: list[str], *, kill_step: str = "") -> subprocess.Popen[str]:
        """abssctl.main(argv) in a child python, with a STEP_OBSERVERS tracer (and maybe a kill)."""
        trace = self.sb.root / "steps.trace"
        code = CHILD.format(repo=str(REPO), trace=str(trace), kill_step=kill_step,
                            argv=["--config", str(self.sb.config), *argv])
        return subprocess.Popen([sys.executable, "-c", code], cwd=str(self.sb.root),
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def traced_steps(self) -> list[str]:
        trace = self.sb.root / "steps.trace"
        return trace.read_text().splitlines() if trace.exists() else []


@pytest.fixture(scope="session")
def npm_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One npm cache shared by the hosts that may use the live fixture registry."""
    return tmp_path_factory.mktemp("npm-cache")


@pytest.fixture(scope="session")
def node_facts() -> dict[str, str]:
    if not NODE:
        pytest.skip("node is not installed")
    return host_node()


@pytest.fixture
def host(sandbox: Sandbox, npm_registry: NpmRegistry, npm_cache: Path) -> Host:
    if not (NODE and NPM):
        pytest.skip("node and npm are needed for the version tests")
    return Host(sandbox, npm_registry.url, npm_cache)


@pytest.fixture
def offline_host(sandbox: Sandbox, npm_registry: NpmRegistry,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A factory for a second host whose registry is a dead loopback port and whose npm cache is
    empty, so nothing it does could be served by the live registry. Call it after `host` is set
    up; it becomes the active host (env, cwd); `host.use_env()` switches back."""
    made: list[Host] = []

    def make() -> Host:
        root = tmp_path_factory.mktemp("offline-host")
        sb = Sandbox(root, sandbox.monkeypatch)
        made.append(Host(sb, npm_registry.dead_url(), tmp_path_factory.mktemp("empty-npm-cache")))
        return made[-1]
    yield make


def install(host: Host, version: str, *extra: str) -> dict[str, Any]:
    return ok(host.run("--json", "version", "install", version, *extra))


def export(host: Host, version: str, dest: Path) -> dict[str, Any]:
    doc = ok(host.run("--json", "version", "export", version, "-o", str(dest)))
    return doc["bundle"]


# -- bundle surgery -----------------------------------------------------------------------------


def decompress(blob: bytes) -> tuple[bytes, str]:
    if blob.startswith(ZSTD_MAGIC):
        raw = subprocess.run([str(ZSTD), "-d", "-c", "-q"], input=blob, capture_output=True,
                             timeout=WAIT, check=True).stdout
        return raw, "zstd"
    if blob.startswith(GZIP_MAGIC):
        return gzip.decompress(blob), "gzip"
    raise AssertionError(f"bundle is neither zstd nor gzip (starts {blob[:8]!r})")


def compress(raw: bytes, how: str) -> bytes:
    if how == "zstd":
        return subprocess.run([str(ZSTD), "-q", "-c", "-3"], input=raw, capture_output=True,
                              timeout=WAIT, check=True).stdout
    return gzip.compress(raw, mtime=0)


def members(raw: bytes) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    out = []
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tar:
        for m in tar.getmembers():
            data = tar.extractfile(m).read() if m.isfile() else None  # type: ignore[union-attr]
            out.append((m, data))
    return out


def rewrite_sidecar(bundle: Path) -> None:
    """Make FILE.sha256 match FILE again after surgery, keeping the sidecar's own format."""
    sidecar = Path(str(bundle) + ".sha256")
    text = sidecar.read_text(encoding="utf-8")
    old = re.search(r"[0-9a-f]{64}", text)
    assert old, f"{sidecar} holds no sha256: {text!r}"
    sidecar.write_text(text.replace(old.group(0), sha256_file(bundle)), encoding="utf-8")


def copy_bundle(src: Path, dest: Path) -> Path:
    shutil.copyfile(src, dest)
    shutil.copyfile(str(src) + ".sha256", str(dest) + ".sha256")
    return dest


def parse_sums(text: str) -> dict[str, str]:
    """SHA256SUMS lines ("<hex>  <path>", sha256sum style) as {path relative to tree/: hex}."""
    sums = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        digest, path = line.split(None, 1)
        path = path.lstrip("*")
        sums[path[len("tree/"):] if path.startswith("tree/") else path] = digest
    return sums


# -- install --------------------------------------------------------------------------------------


@needs_npm
def test_install_lays_down_tree_and_registry_entry(host: Host, npm_registry: NpmRegistry,
                                                   node_facts: dict[str, str]) -> None:
    fixture = npm_registry.versions["1.0.0"]
    doc = install(host, "1.0.0")
    assert doc["changed"] is True and doc["op_id"] and isinstance(doc["duration_ms"], int)
    assert not [w for w in doc["warnings"] if "engines" in w], doc["warnings"]
    root = host.install_root / "1.0.0"
    node = {"version": node_facts["version"], "abi": node_facts["abi"], "arch": node_facts["arch"],
            "libc": f"glibc {node_facts['glibc']}"}
    v = doc["version"]
    assert v["version"] == "1.0.0" and v["path"] == str(root) and v["current"] is False
    assert v["source"] == "registry" and v["bin"] == BIN
    assert v["integrity"] == fixture.integrity
    assert v["node"] == node
    assert (v["engines_node"], v["engines_ok"]) == (">=18", True)
    assert v["native_modules"] == {NATIVE_PACKAGE: "ok"}
    assert v["smoke_start"]["health"] == "UP" and v["smoke_start"]["info_version"] == "1.0.0"
    assert isinstance(v["smoke_start"]["seconds"], (int, float)) and v["smoke_start"]["seconds"] >= 0
    assert isinstance(v["size_bytes"], int) and v["size_bytes"] > 0

    # the tree (§3.5, §4.4.3 step 2)
    top = json.loads((root / "package.json").read_text(encoding="utf-8"))
    assert top == {"name": "abssctl-server-1.0.0", "private": True,
                   "dependencies": {PACKAGE: "1.0.0"},
                   "allowScripts": {name: True for name in ALLOW_SCRIPTS}}
    pkg = root / "node_modules" / PACKAGE
    assert json.loads((pkg / "package.json").read_text(encoding="utf-8"))["version"] == "1.0.0"
    assert (pkg / BIN).is_file()
    assert (root / "node_modules" / NATIVE_PACKAGE / "built.txt").is_file()   # its script ran
    lock = root / "package-lock.json"
    assert json.loads(lock.read_text())["packages"][f"node_modules/{PACKAGE}"]["integrity"] \
        == fixture.integrity
    assert stat.S_IMODE(root.stat().st_mode) == 0o755
    assert stat.S_IMODE((root / "package.json").stat().st_mode) == 0o644
    writable = [rel for rel, (mode, _, _) in host.version_tree("1.0.0").items()
                if not stat.S_ISLNK(mode) and mode & 0o022]
    assert writable == []
    assert host.leftovers() == [] and host.journals() == []

    # the registry entry (§3.6)
    reg = host.registry()
    assert reg["package"] == PACKAGE and reg["current"] is None
    entry = reg["versions"]["1.0.0"]
    assert entry["version"] == "1.0.0" and entry["path"] == str(root)
    assert RFC3339_Z.match(entry["installed_at"]), entry["installed_at"]
    assert entry["source"] == "registry" and entry["bin"] == BIN
    assert entry["integrity"] == fixture.integrity
    assert entry["lockfile_sha256"] == sha256_file(lock)
    assert entry["size_bytes"] == v["size_bytes"]
    assert entry["node"] == node
    assert (entry["engines_node"], entry["engines_ok"]) == (">=18", True)
    assert entry["native_modules"] == [NATIVE_PACKAGE]
    assert entry["migrations"] == list(fixture.migrations)
    reg_file = host.state_dir / "registry" / "versions.json"
    assert stat.S_IMODE(reg_file.stat().st_mode) == 0o640

    # npm was asked exactly as §4.4.3 says
    calls = host.npm_calls()
    assert ["view", f"{PACKAGE}@1.0.0", "version", "engines", "--json",
            "--registry", npm_registry.url] in calls or \
        ["view", f"{PACKAGE}@1.0.0", "version", "engines", "--json"] in \
        [c[:5] for c in calls], calls
    installs = [c for c in calls if c[:1] == ["install"]]
    assert len(installs) == 1, calls
    for flag in ("--omit=dev", "--no-audit", "--no-fund", "--loglevel=warn"):
        assert flag in installs[0], installs[0]
    assert installs[0][installs[0].index("--registry") + 1] == npm_registry.url
    assert installs[0][installs[0].index("--prefix") + 1].startswith(
        str(host.install_root / ".staging-1.0.0-"))

    last = host.oplog()[-1]
    assert (last["command"], last["result"], last["exit_code"]) == ("version install", "ok", 0)


@needs_npm
def test_install_again_changes_nothing(host: Host) -> None:
    install(host, "1.0.0")
    tree = host.version_tree("1.0.0")
    reg = (host.state_dir / "registry" / "versions.json").read_bytes()
    doc = install(host, "1.0.0")
    assert doc["changed"] is False, doc
    assert doc["version"]["version"] == "1.0.0"
    assert host.version_tree("1.0.0") == tree
    assert (host.state_dir / "registry" / "versions.json").read_bytes() == reg
    assert host.leftovers() == [] and host.journals() == []


@needs_npm
def test_set_current_and_a_second_version_side_by_side(host: Host, npm_registry: NpmRegistry) -> None:
    doc = install(host, "1.0.0", "--set-current")
    assert doc["version"]["current"] is True
    current = host.install_root / "current"
    assert current.is_symlink() and os.readlink(current) == "1.0.0"      # relative
    assert host.registry()["current"] == "1.0.0"

    doc = install(host, "1.1.0")
    assert doc["changed"] is True and doc["version"]["current"] is False
    assert os.readlink(current) == "1.0.0"
    for version in ("1.0.0", "1.1.0"):
        pkg = host.install_root / version / "node_modules" / PACKAGE / "package.json"
        assert json.loads(pkg.read_text())["version"] == version
    reg = host.registry()
    assert sorted(reg["versions"]) == ["1.0.0", "1.1.0"] and reg["current"] == "1.0.0"
    assert reg["versions"]["1.1.0"]["migrations"] == list(npm_registry.versions["1.1.0"].migrations)
    assert len(reg["versions"]["1.1.0"]["migrations"]) == len(reg["versions"]["1.0.0"]["migrations"]) + 1

    listed = ok(host.run("--json", "version", "list"))["versions"]
    assert [e["version"] for e in listed] == ["1.0.0", "1.1.0"]
    by = {e["version"]: e for e in listed}
    assert (by["1.0.0"]["current"], by["1.1.0"]["current"]) == (True, False)
    for version, e in by.items():
        assert e["installed"] is True and e["instances"] == []
        assert e["installed_at"] == reg["versions"][version]["installed_at"]
        assert e["size_bytes"] == reg["versions"][version]["size_bytes"]
        assert e["node_abi"] == reg["versions"][version]["node"]["abi"]
        assert (e["engines_node"], e["engines_ok"]) == (">=18", True)
        assert e["source"] == "registry"


@needs_npm
def test_unknown_version_is_not_found_and_leaves_nothing(host: Host) -> None:
    before = host.sb.tree()
    failed(host.run("--json", "version", "install", "99.0.0"), 2, "NotFound")
    assert not (host.install_root / "99.0.0").exists() and host.leftovers() == []
    assert host.registry()["versions"] == {}
    changed = {k for k in set(before) | set(host.sb.tree()) if before.get(k) != host.sb.tree().get(k)}
    assert not [k for k in changed if k.startswith("srv/") or "/registry/" in k], changed


@needs_npm
def test_unreachable_registry_exits_4_with_the_import_hint(host: Host, npm_registry: NpmRegistry) -> None:
    host.set_registry(npm_registry.dead_url())
    started = time.monotonic()
    doc = failed(host.run("--json", "version", "install", "1.0.0"), 4)
    assert time.monotonic() - started < 30
    assert "version import" in (doc["error"]["hint"] or ""), doc
    assert host.leftovers() == [] and host.registry()["versions"] == {}
    assert not (host.install_root / "1.0.0").exists()


@needs_npm
def test_latest_resolves_through_the_dist_tag(host: Host) -> None:
    doc = install(host, "latest")
    assert doc["version"]["version"] == "1.1.0"        # the fixture's dist-tags.latest
    assert (host.install_root / "1.1.0").is_dir()
    assert not (host.install_root / "latest").exists()


@needs_npm
def test_engines_mismatch_warns_naming_both_versions_and_installs(host: Host, node_facts: dict[str, str]) -> None:
    doc = install(host, "2.0.0")                      # the fake starts anyway: warn, do not refuse
    sentence = engines_warning("2.0.0", ">=99", node_facts["version"])
    assert sentence in doc["warnings"], doc["warnings"]
    assert (doc["version"]["engines_node"], doc["version"]["engines_ok"]) == (">=99", False)
    assert doc["version"]["smoke_start"]["health"] == "UP"
    entry = host.registry()["versions"]["2.0.0"]
    assert (entry["engines_node"], entry["engines_ok"]) == (">=99", False)


# -- list, check-updates ----------------------------------------------------------------------------


@needs_npm
def test_list_remote_merges_the_registry(host: Host, npm_registry: NpmRegistry) -> None:
    install(host, "1.0.0")
    listed = ok(host.run("--json", "version", "list", "--remote"))["versions"]
    assert [(e["version"], e["installed"]) for e in listed] == [
        ("1.0.0", True), ("1.1.0", False), ("2.0.0", False)]
    for e in listed[1:]:
        assert e["current"] is False and e["instances"] == []

    listed = ok(host.run("--json", "version", "list", "--remote", "--include-prerelease"))["versions"]
    assert [(e["version"], e["installed"]) for e in listed] == [
        ("1.0.0", True), ("1.1.0", False), ("1.2.0-nightly.1", False), ("2.0.0", False)]

    host.set_registry(npm_registry.dead_url())
    res = host.run("--json", "version", "list", "--remote")
    doc = ok(res)
    assert [(e["version"], e["installed"]) for e in doc["versions"]] == [("1.0.0", True)]
    assert doc.get("warnings") or "warning" in res.err, show(res)


@needs_npm
def test_check_updates_status_follows_installs_and_the_registry(host: Host, npm_registry: NpmRegistry) -> None:
    # latest_stable is the registry's newest non-prerelease version (2.0.0 here, although
    # dist-tags.latest is 1.1.0); update_available compares it with the newest installed one.
    fields = ("package", "current", "newest_installed", "latest_stable", "update_available", "status")
    doc = ok(host.run("--json", "version", "check-updates"))
    assert {k: doc[k] for k in fields} == {
        "package": PACKAGE, "current": None, "newest_installed": None, "latest_stable": "2.0.0",
        "update_available": True, "status": "update-available"}

    install(host, "1.0.0", "--set-current")
    doc = ok(host.run("--json", "version", "check-updates"))
    assert {k: doc[k] for k in fields} == {
        "package": PACKAGE, "current": "1.0.0", "newest_installed": "1.0.0",
        "latest_stable": "2.0.0", "update_available": True, "status": "update-available"}

    install(host, "2.0.0")
    doc = ok(host.run("--json", "version", "check-updates"))
    assert {k: doc[k] for k in fields} == {
        "package": PACKAGE, "current": "1.0.0", "newest_installed": "2.0.0",
        "latest_stable": "2.0.0", "update_available": False, "status": "up-to-date"}

    host.set_registry(npm_registry.dead_url())
    res = host.run("--json", "version", "check-updates")
    doc = ok(res)
    assert (doc["status"], doc["current"], doc["newest_installed"], doc["latest_stable"]) == (
        "unknown", "1.0.0", "2.0.0", None), doc
    assert doc.get("warnings") or "warning" in res.err, show(res)


@needs_npm
def test_set_current_on_a_new_install_moves_the_symlink(host: Host) -> None:
    install(host, "1.0.0", "--set-current")
    install(host, "1.1.0", "--set-current")
    current = host.install_root / "current"
    assert current.is_symlink() and os.readlink(current) == "1.1.0"
    assert host.registry()["current"] == "1.1.0"
    assert host.leftovers() == []


# -- uninstall ------------------------------------------------------------------------------------


def instance_entry(host: Host, name: str, binding: str, resolved: str) -> dict[str, Any]:
    root = host.sb.paths["instance_root"] / name
    return {"name": name, "domain": f"{name}.example.test", "port": 5006, "version": binding,
            "resolved_version": resolved, "data_version": resolved, "enabled": True,
            "pending_restart": False,
            "tls": {"source": "system", "cert": host.sb.settings["tls"]["system_cert"],
                    "key": host.sb.settings["tls"]["system_key"], "chain": None},
            "paths": {"root": str(root), "data": str(root / "data"),
                      "config": str(root / "config.json"),
                      "unit": str(host.sb.paths["systemd_unit_dir"] / f"abssctl-{name}.service"),
                      "vhost": str(host.sb.paths["nginx_sites_available"] / f"abssctl-{name}.conf")},
            "created_at": "2026-11-26T10:02:11Z", "updated_at": "2026-11-26T10:02:19Z",
            "last_backup_id": None, "last_restore": None}


@needs_npm
def test_uninstall_guards_then_removes(host: Host) -> None:
    install(host, "1.0.0", "--set-current")
    install(host, "1.1.0")
    tree = host.version_tree("1.1.0")

    doc = failed(host.run("--json", "--yes", "version", "uninstall", "1.0.0"), 2)
    assert "current" in doc["error"]["message"], doc
    assert (host.install_root / "1.0.0").is_dir() and "1.0.0" in host.registry()["versions"]

    host.write_instances({"alice": instance_entry(host, "alice", "1.1.0", "1.1.0")})
    doc = failed(host.run("--json", "--yes", "version", "uninstall", "1.1.0"), 2)
    assert "alice" in json.dumps(doc["error"]), doc
    # pinned to current but still running 1.1.0 (a pending restart): still in use
    host.write_instances({"alice": instance_entry(host, "alice", "current", "1.1.0")})
    doc = failed(host.run("--json", "--yes", "version", "uninstall", "1.1.0"), 2)
    assert "alice" in json.dumps(doc["error"]), doc
    assert host.version_tree("1.1.0") == tree and "1.1.0" in host.registry()["versions"]

    host.write_instances({})
    failed(host.run("--json", "version", "uninstall", "1.1.0"), 2, "NeedsConfirmation")
    assert host.version_tree("1.1.0") == tree

    doc = ok(host.run("--json", "--yes", "version", "uninstall", "1.1.0"))
    assert doc["changed"] is True
    assert not (host.install_root / "1.1.0").exists()
    reg = host.registry()
    assert sorted(reg["versions"]) == ["1.0.0"] and reg["current"] == "1.0.0"
    assert host.leftovers() == [] and host.journals() == []
    assert os.readlink(host.install_root / "current") == "1.0.0"

    failed(host.run("--json", "--yes", "version", "uninstall", "1.1.0"), 2, "NotFound")


# -- export / import ------------------------------------------------------------------------------


@needs_npm
def test_export_bundle_layout(host: Host, npm_registry: NpmRegistry, node_facts: dict[str, str],
                              tmp_path: Path) -> None:
    install(host, "1.0.0")
    dest = tmp_path / "out" / "sync-server-1.0.0.tar.zst"
    dest.parent.mkdir()
    bundle = export(host, "1.0.0", dest)
    blob = dest.read_bytes()
    digest = hashlib.sha256(blob).hexdigest()
    assert {k: bundle[k] for k in ("path", "sha256", "size_bytes", "version")} == {
        "path": str(dest), "sha256": digest, "size_bytes": len(blob), "version": "1.0.0"}
    assert stat.S_IMODE(dest.stat().st_mode) == 0o644
    sidecar = Path(str(dest) + ".sha256")
    assert digest in sidecar.read_text(encoding="utf-8")
    raw, how = decompress(blob)
    assert how == ("zstd" if ZSTD else "gzip")

    got = members(raw)
    assert [m.name for m, _ in got[:2]] == ["abssctl-bundle.json", "SHA256SUMS"]
    assert all(m.name.startswith("tree/") for m, _ in got[2:]), [m.name for m, _ in got[2:]]
    manifest = json.loads(got[0][1])
    sums_text = got[1][1]
    assert sums_text is not None
    fixture = npm_registry.versions["1.0.0"]
    entry = host.registry()["versions"]["1.0.0"]
    assert manifest["schema_version"] == 1 and manifest["kind"] == "abssctl-version-bundle"
    assert (manifest["package"], manifest["version"]) == (PACKAGE, "1.0.0")
    assert RFC3339_Z.match(manifest["created_at"]), manifest["created_at"]
    assert manifest["abssctl_version"]
    assert manifest["node"] == {"version": node_facts["version"], "abi": node_facts["abi"],
                                "arch": node_facts["arch"], "platform": "linux"}
    assert manifest["libc"] == {"family": "glibc", "version": node_facts["glibc"]}
    assert (manifest["bin"], manifest["integrity"], manifest["engines_node"]) == (
        BIN, fixture.integrity, ">=18")
    assert NATIVE_PACKAGE in manifest["native_modules"]
    assert manifest["migrations"] == list(fixture.migrations) == entry["migrations"]
    assert manifest["sums_sha256"] == hashlib.sha256(sums_text).hexdigest()

    files = {m.name[len("tree/"):]: data for m, data in got[2:] if m.isfile()}
    sums = parse_sums(sums_text.decode())
    assert sums == {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    assert manifest["files"] == {"count": len(files), "bytes": sum(len(d) for d in files.values())}
    pkg = f"node_modules/{PACKAGE}"
    assert {"package.json", "package-lock.json", f"{pkg}/package.json", f"{pkg}/{BIN}",
            f"node_modules/{NATIVE_PACKAGE}/built.txt"} <= set(files)
    kinds = {m.type for m, _ in got[2:]}
    assert kinds <= {tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE}, kinds
    listed = [line.split(None, 1)[1].lstrip("*") for line in sums_text.decode().splitlines() if line]
    assert listed == sorted(listed), "SHA256SUMS is not sorted by path (DESIGN §4.4.6)"


@needs_npm
def test_export_import_round_trip_contacts_no_registry(host: Host, offline_host: Any,
                                                       npm_registry: NpmRegistry, tmp_path: Path) -> None:
    install(host, "1.0.0")
    source_tree = host.version_tree("1.0.0")
    source_entry = host.registry()["versions"]["1.0.0"]
    dest = tmp_path / "sync-server-1.0.0.tar.zst"
    bundle = export(host, "1.0.0", dest)

    other = offline_host()
    mark = npm_registry.mark()
    doc = ok(other.run("--json", "version", "import", str(dest)))
    assert npm_registry.requests_since(mark) == []
    assert not [c for c in other.npm_calls()
                if set(c) & {"view", "install", "i", "ci", "info", "show"}], other.npm_calls()
    assert doc["changed"] is True
    v = doc["version"]
    assert v["version"] == "1.0.0" and v["source"] == f"bundle:{bundle['sha256']}"
    assert v["path"] == str(other.install_root / "1.0.0")
    assert v["smoke_start"]["health"] == "UP" and v["smoke_start"]["info_version"] == "1.0.0"
    assert v["native_modules"] == {NATIVE_PACKAGE: "ok"}
    assert v["integrity"] == source_entry["integrity"]

    imported = other.version_tree("1.0.0")
    assert {k: s[1:] for k, s in imported.items()} == {k: s[1:] for k, s in source_tree.items()}
    entry = other.registry()["versions"]["1.0.0"]
    assert entry["source"] == f"bundle:{bundle['sha256']}"
    for key in ("bin", "integrity", "lockfile_sha256", "engines_node", "engines_ok",
                "native_modules", "migrations", "node"):
        assert entry[key] == source_entry[key], key
    assert other.leftovers() == [] and other.journals() == []
    listed = ok(other.run("--json", "version", "list"))["versions"]
    assert [(e["version"], e["installed"], e["source"]) for e in listed] == [
        ("1.0.0", True, f"bundle:{bundle['sha256']}")]


def assert_import_left_nothing(other: Host) -> None:
    assert not (other.install_root / "1.0.0").exists()
    assert other.leftovers() == [] and other.journals() == []
    assert other.registry()["versions"] == {}


@needs_npm
def test_import_refuses_a_flipped_byte(host: Host, offline_host: Any, tmp_path: Path) -> None:
    install(host, "1.0.0")
    good = tmp_path / "good.tar.zst"
    export(host, "1.0.0", good)
    bad = copy_bundle(good, tmp_path / "flipped.tar.zst")
    raw, how = decompress(bad.read_bytes())
    buf = bytearray(raw)
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tar:
        victim = next(m for m in tar.getmembers()
                      if m.isfile() and m.name.startswith("tree/") and m.name.endswith(".js") and m.size)
    buf[victim.offset_data] ^= 0x01
    bad.write_bytes(compress(bytes(buf), how))
    rewrite_sidecar(bad)                         # the sidecar agrees: only SHA256SUMS can catch it

    other = offline_host()
    doc = failed(other.run("--json", "version", "import", str(bad)), 3,
                 ("ChecksumMismatch", "CorruptState"))
    assert victim.name[len("tree/"):] in json.dumps(doc["error"]), doc
    assert_import_left_nothing(other)


@needs_npm
def test_import_refuses_a_corrupt_sidecar(host: Host, offline_host: Any, tmp_path: Path) -> None:
    install(host, "1.0.0")
    good = tmp_path / "good.tar.zst"
    export(host, "1.0.0", good)
    sidecar = Path(str(good) + ".sha256")
    text = sidecar.read_text(encoding="utf-8")
    sidecar.write_text(re.sub(r"[0-9a-f]{64}", "0" * 64, text), encoding="utf-8")
    other = offline_host()
    failed(other.run("--json", "version", "import", str(good)), 3, ("ChecksumMismatch", "CorruptState"))
    assert_import_left_nothing(other)


@needs_npm
def test_import_refuses_a_bundle_for_another_node_abi(host: Host, offline_host: Any, tmp_path: Path,
                                                      node_facts: dict[str, str]) -> None:
    install(host, "1.0.0")
    good = tmp_path / "good.tar.zst"
    export(host, "1.0.0", good)
    raw, how = decompress(good.read_bytes())
    foreign_abi = "999" if node_facts["abi"] != "999" else "998"
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:", format=tarfile.PAX_FORMAT) as tar:
        for member, data in members(raw):
            if member.name == "abssctl-bundle.json":
                manifest = json.loads(data or b"{}")
                manifest["node"]["abi"] = foreign_abi
                manifest["node"]["version"] = "v99.0.0"
                data = json.dumps(manifest, indent=2, sort_keys=True).encode() + b"\n"
                member.size = len(data)
            tar.addfile(member, io.BytesIO(data) if data is not None else None)
    bad = tmp_path / "foreign.tar.zst"
    bad.write_bytes(compress(out.getvalue(), how))
    Path(str(bad) + ".sha256").write_text(f"{sha256_file(bad)}  {bad.name}\n", encoding="utf-8")

    other = offline_host()
    doc = failed(other.run("--json", "version", "import", str(bad)), 3, "Incompatible")
    message = doc["error"]["message"]
    assert foreign_abi in message and node_facts["abi"] in message, message
    assert_import_left_nothing(other)


# -- a smoke start that fails -----------------------------------------------------------------

NODE_WRAPPER = '''#!{python} -IS
# Real node for everything except the smoke start (`<bin> --config FILE`), which dies at once.
import os, sys
if "--config" in sys.argv[1:]:
    sys.stderr.write("smoke-wrapper: the server refuses to start (test)\\n")
    sys.exit(1)
os.execv({node!r}, [{node!r}, *sys.argv[1:]])
'''


def failing_smoke_start(host: Host) -> None:
    wrapper = host.sb.root / "realbin" / "node"
    wrapper.write_text(NODE_WRAPPER.format(python=sys.executable, node=str(NODE)), encoding="utf-8")
    wrapper.chmod(0o755)
    host.sb.configure("commands", node=[str(wrapper)])


@needs_npm
def test_failed_smoke_start_refuses_and_leaves_nothing(host: Host) -> None:
    failing_smoke_start(host)
    doc = failed(host.run("--json", "version", "install", "1.0.0"), 4)
    assert "smoke-wrapper: the server refuses to start" in json.dumps(doc["error"]), doc
    assert not (host.install_root / "1.0.0").exists()
    assert host.leftovers() == [] and host.journals() == [] and host.registry()["versions"] == {}


@needs_npm
def test_engines_mismatch_with_a_failed_smoke_start_is_refused_with_the_sentence(
        host: Host, node_facts: dict[str, str]) -> None:
    failing_smoke_start(host)
    doc = failed(host.run("--json", "version", "install", "2.0.0"), 4)
    text = json.dumps(doc["error"])
    assert json.dumps(engines_warning("2.0.0", ">=99", node_facts["version"]))[1:-1] in text, doc
    assert "smoke-wrapper: the server refuses to start" in text, doc    # the server's last lines
    assert not (host.install_root / "2.0.0").exists()
    assert host.leftovers() == [] and host.journals() == [] and host.registry()["versions"] == {}


# -- interruptions --------------------------------------------------------------------------------


def wait_exit(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=WAIT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate(timeout=10)
        raise AssertionError(f"abssctl child did not exit in {WAIT:.0f} s:\n{err}")
    return proc.returncode, out, err


INSTALL_STEPS = ["staging.mkdir", "staging.package_json", "npm.install", "verify", "tree.rename",
                 "registry.add"]


@needs_npm
@pytest.mark.parametrize("step", INSTALL_STEPS)
def test_kill_9_during_install_then_rerun_converges(host: Host, step: str) -> None:
    proc = host.spawn(["--json", "version", "install", "1.0.0"], kill_step=step)
    rc, out, err = wait_exit(proc)
    steps = host.traced_steps()
    assert rc == -signal.SIGKILL, f"rc={rc} steps={steps}\nstdout={out}\nstderr={err}"
    assert steps[-1] == f"{step} before", steps
    assert len(host.journals()) == 1, host.journals()           # the intent survives the kill
    listed = ok(host.run("--json", "version", "list"))["versions"]
    assert listed == [], listed                                  # no registry entry yet

    doc = install(host, "1.0.0")                 # the next mutating command rolls back, then installs
    assert doc["changed"] is True
    assert host.leftovers() == [] and host.journals() == []
    assert "1.0.0" in host.registry()["versions"]
    assert (host.install_root / "1.0.0" / "node_modules" / NATIVE_PACKAGE / "built.txt").is_file()


@needs_npm
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_during_npm_install_exits_130_and_undoes(host: Host, sig: signal.Signals) -> None:
    marker = host.sb.root / "npm-install.started"
    host.npm_knobs.write_text(json.dumps({"pause_install": WAIT, "marker": str(marker)}))
    proc = host.spawn(["--json", "version", "install", "1.0.0"])
    deadline = time.monotonic() + WAIT
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if not marker.exists():
        rc, out, err = wait_exit(proc)
        raise AssertionError(f"npm install never started: rc={rc}\nstdout={out}\nstderr={err}")
    time.sleep(0.2)                                   # let the pid land in the marker
    npm_pid = int(marker.read_text() or 0)
    try:
        proc.send_signal(sig)
        rc, out, err = wait_exit(proc)
        assert rc == 130, f"rc={rc}\nstdout={out}\nstderr={err}"
        assert json.loads(out)["error"]["kind"] == "Interrupted"
        assert host.leftovers() == [] and host.journals() == []
        assert host.registry()["versions"] == {}
        assert not (host.install_root / "1.0.0").exists()
        assert host.oplog()[-1]["result"] == "interrupted"
        deadline = time.monotonic() + 10                  # abssctl stops the npm it started
        while npm_pid and _alive(npm_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not (npm_pid and _alive(npm_pid)), f"npm (pid {npm_pid}) outlived abssctl"
    finally:
        if npm_pid and _alive(npm_pid):
            os.kill(npm_pid, signal.SIGKILL)

    host.npm_knobs.unlink()
    assert install(host, "1.0.0")["changed"] is True
    assert host.leftovers() == []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:                                             # a zombie child of abssctl is not alive
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
