"""Real npm against the local registry fixture, and the fake sync-server it installs (DESIGN §7(b)).

These tests pin the behaviour abssctl's install, smoke start, health gate and downgrade checks rely
on, so a change to the fixture that would silently weaken those tests fails here first.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest

from rig.nginx_sandbox import free_port
from rig.npm_registry import (
    NATIVE_PACKAGE,
    PACKAGE,
    NpmRegistry,
    build_fixture_packages,
    install_fixture_version,
    npm_env,
)

NODE = shutil.which("node")
NPM = shutil.which("npm")
needs_npm = pytest.mark.skipif(not (NODE and NPM), reason="node and npm are needed on PATH for real-npm tests "
                               "(Debian: apt-get install nodejs npm)")
pytestmark = pytest.mark.integration

START_TIMEOUT = 15.0  # seconds for the fake server to answer /health
EXIT_TIMEOUT = 20.0  # seconds for a run that must exit by itself


class Installs:
    """Each fixture version installed at most once per session, into its own staging prefix."""

    def __init__(self, registry: NpmRegistry, root: Path) -> None:
        self.registry, self.root = registry, root
        self.results: dict[str, subprocess.CompletedProcess[str]] = {}
        self.requested: dict[str, set[str]] = {}  # registry paths each install asked for

    def prefix(self, version: str) -> Path:
        if version not in self.results:
            mark = self.registry.mark()
            result = install_fixture_version(self.registry.url, version, self.root / version,
                                             self.root / "npm-cache")
            assert result.returncode == 0, f"npm install {version} failed:\n{result.stdout}\n{result.stderr}"
            self.results[version] = result
            self.requested[version] = {r.path for r in self.registry.requests_since(mark)}
        return self.root / version

    def package_dir(self, version: str) -> Path:
        return self.prefix(version) / "node_modules" / PACKAGE

    def bin(self, version: str) -> Path:
        pkg_dir = self.package_dir(version)
        manifest = json.loads((pkg_dir / "package.json").read_text(encoding="utf-8"))
        return pkg_dir / manifest["bin"]["actual-server"]


@pytest.fixture(scope="session")
def installs(npm_registry: NpmRegistry, tmp_path_factory: pytest.TempPathFactory) -> Installs:
    return Installs(npm_registry, tmp_path_factory.mktemp("npm-installs"))


def server_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACTUAL_")}
    env.update(extra)
    return env


def write_config(path: Path, data_dir: Path, port: int) -> Path:
    config = {"dataDir": str(data_dir), "serverFiles": str(data_dir / "server-files"),
              "userFiles": str(data_dir / "user-files"), "port": port, "hostname": "127.0.0.1"}
    path.write_text(json.dumps(config), encoding="utf-8")
    return path


def get(port: int, path: str, body: bytes | None = None) -> tuple[int, Any, Any]:
    """(status, headers, parsed JSON body) of one loopback request with a 2 s timeout."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body)
    try:
        with urllib.request.urlopen(request, timeout=2) as resp:
            return resp.status, resp.headers, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, err.headers, json.loads(err.read() or b"null")


class Running:
    """A fake server started by this test; stopped by its own PID only."""

    def __init__(self, argv: list[str], cwd: Path, log: Path, env: dict[str, str]) -> None:
        self.log = log
        self._out = log.open("wb")
        self.proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=self._out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def wait_healthy(self, port: int) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited {self.proc.returncode} before /health:\n{self.output()}")
            try:
                if get(port, "/health")[2] == {"status": "UP"}:
                    return
            except (OSError, ValueError):
                pass
            time.sleep(0.1)
        pytest.fail(f"/health not UP within {START_TIMEOUT}s:\n{self.output()}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM to this PID
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._out.close()
        return self.proc.returncode


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Any]:
    """launch(installs, version, data_dir, port, config=..., env=...) -> Running; all stopped at teardown."""
    started: list[Running] = []

    def _launch(installs: Installs, version: str, data_dir: Path, port: int,
                config: Path | None = None, **env: str) -> Running:
        data_dir.mkdir(parents=True, exist_ok=True)
        if config is None:
            config = write_config(tmp_path / f"config-{len(started)}.json", data_dir, port)
        argv = [str(NODE), str(installs.bin(version)), "--config", str(config)]
        run = Running(argv, installs.package_dir(version), tmp_path / f"server-{len(started)}.log",
                      server_env(**env))
        started.append(run)
        return run

    yield _launch
    for run in started:
        run.stop()


def run_to_exit(installs: Installs, version: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(NODE), str(installs.bin(version)), *args], cwd=installs.package_dir(version),
                          env=server_env(**env), capture_output=True, text=True, timeout=EXIT_TIMEOUT,
                          stdin=subprocess.DEVNULL, check=False)


def read_migrate(data_dir: Path) -> dict[str, Any]:
    return json.loads((data_dir / ".migrate").read_text(encoding="utf-8"))


def npm(registry_url: str, cache: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(NPM), *args, "--registry", registry_url], env=npm_env(cache),
                          capture_output=True, text=True, timeout=60, check=False)


# -- the built tarballs -----------------------------------------------------------------------------


def test_tarballs_are_deterministic_and_npm_shaped(tmp_path: Path, npm_registry: NpmRegistry) -> None:
    again = build_fixture_packages(tmp_path / "again")
    for name, versions in npm_registry.packages.items():
        for version, fv in versions.items():
            blob = fv.tarball.read_bytes()
            assert blob == again[name][version].tarball.read_bytes(), f"{name}@{version} differs"
            assert fv.shasum == hashlib.sha1(blob).hexdigest()
            assert fv.integrity.startswith("sha512-")
            with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob))) as tar:
                names = tar.getnames()
                assert all(n.startswith("package/") for n in names)
                manifest = json.load(tar.extractfile("package/package.json"))  # type: ignore[arg-type]
            assert (manifest["name"], manifest["version"]) == (name, version)
    server = npm_registry.versions
    assert list(server) == ["1.0.0", "1.1.0", "1.2.0-nightly.1", "2.0.0"]
    assert set(server["1.1.0"].migrations) - set(server["1.0.0"].migrations) == {
        "1702667624000-rename-nordigen-secrets.js"}
    assert server["2.0.0"].engines_node == ">=99"
    assert server["1.0.0"].engines_node == ">=18"


def test_registry_404s_unknown_paths_and_logs_them(npm_registry: NpmRegistry) -> None:
    mark = npm_registry.mark()
    for path in ("/left-pad", "/@actual-app%2fsync-server/-/sync-server-9.9.9.tgz"):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(npm_registry.url + path.lstrip("/"), timeout=5)
        assert err.value.code == 404
        assert json.loads(err.value.read()) == {"error": "Not found"}
    with urllib.request.urlopen(npm_registry.url + "@actual-app/sync-server", timeout=5) as resp:
        doc = json.load(resp)  # the unescaped form is served too
    assert doc["dist-tags"] == {"latest": "1.1.0", "nightly": "1.2.0-nightly.1"}
    assert doc["versions"]["1.0.0"]["dist"]["tarball"] == npm_registry.tarball_url(PACKAGE, "1.0.0")
    assert [(r.path, r.status) for r in npm_registry.requests_since(mark)] == [
        ("/left-pad", 404), ("/@actual-app%2fsync-server/-/sync-server-9.9.9.tgz", 404),
        ("/@actual-app/sync-server", 200)]


# -- npm view, as abssctl calls it ----------------------------------------------------------------


@needs_npm
def test_npm_view_reads_versions_engines_and_tags(npm_registry: NpmRegistry, tmp_path: Path) -> None:
    mark = npm_registry.mark()
    out = npm(npm_registry.url, tmp_path / "cache", "view", PACKAGE, "versions", "--json")
    assert out.returncode == 0, out.stderr
    assert sorted(json.loads(out.stdout)) == sorted(npm_registry.versions)
    out = npm(npm_registry.url, tmp_path / "cache", "view", f"{PACKAGE}@1.0.0", "version", "engines", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"version": "1.0.0", "engines": {"node": ">=18"}}
    out = npm(npm_registry.url, tmp_path / "cache", "view", PACKAGE, "dist-tags.latest")
    assert (out.returncode, out.stdout.strip()) == (0, "1.1.0")
    out = npm(npm_registry.url, tmp_path / "cache", "view", f"{PACKAGE}@9.9.9", "version", "--json")
    assert out.returncode != 0 and "E404" in out.stderr + out.stdout
    # npm asks for the scoped packument with the slash escaped.
    assert {r.path for r in npm_registry.requests_since(mark)} == {"/@actual-app%2fsync-server"}


@needs_npm
def test_dead_url_fails_fast_without_touching_the_registry(npm_registry: NpmRegistry, tmp_path: Path) -> None:
    mark = npm_registry.mark()
    started = time.monotonic()
    out = npm(npm_registry.dead_url(), tmp_path / "cache", "view", PACKAGE, "versions", "--json")
    assert out.returncode != 0
    assert "ECONNREFUSED" in out.stdout + out.stderr
    assert time.monotonic() - started < 30
    assert npm_registry.requests_since(mark) == []


# -- npm install, as DESIGN §4.4.3 steps 2-4 ------------------------------------------------------


@needs_npm
def test_install_lays_down_a_verified_tree(installs: Installs, npm_registry: NpmRegistry) -> None:
    prefix = installs.prefix("1.0.0")
    assert installs.requested["1.0.0"] == {
        "/@actual-app%2fsync-server", "/@actual-app/sync-server/-/sync-server-1.0.0.tgz",
        "/fake-native", "/fake-native/-/fake-native-1.0.0.tgz"}
    pkg_dir = installs.package_dir("1.0.0")
    manifest = json.loads((pkg_dir / "package.json").read_text(encoding="utf-8"))
    assert manifest["version"] == "1.0.0"
    assert manifest["bin"] == {"actual-server": "build/bin/actual-server.js"}
    assert installs.bin("1.0.0").is_file()
    assert os.access(installs.bin("1.0.0"), os.X_OK)
    # allowScripts covered fake-native: its install script ran, and npm did not warn about it.
    assert (prefix / "node_modules" / NATIVE_PACKAGE / "built.txt").is_file()
    assert "not yet covered by allowScripts" not in installs.results["1.0.0"].stderr
    lock = json.loads((prefix / "package-lock.json").read_text(encoding="utf-8"))
    locked = lock["packages"][f"node_modules/{PACKAGE}"]
    assert locked["integrity"] == npm_registry.versions["1.0.0"].integrity
    assert locked["resolved"] == npm_registry.tarball_url(PACKAGE, "1.0.0")
    out = run_to_exit(installs, "1.0.0", "--version")
    assert (out.returncode, out.stdout) == (0, "v1.0.0\n")


@needs_npm
def test_engines_mismatch_installs_with_a_warning(installs: Installs) -> None:
    installs.prefix("2.0.0")
    assert "EBADENGINE" in installs.results["2.0.0"].stderr
    manifest = json.loads((installs.package_dir("2.0.0") / "package.json").read_text(encoding="utf-8"))
    assert manifest["engines"] == {"node": ">=99"}
    assert run_to_exit(installs, "2.0.0", "--version").stdout == "v2.0.0\n"


@needs_npm
def test_denied_install_script_leaves_the_server_unstartable(npm_registry: NpmRegistry, tmp_path: Path) -> None:
    prefix = tmp_path / "denied"
    out = install_fixture_version(npm_registry.url, "1.0.0", prefix, tmp_path / "cache",
                                  allow_scripts={NATIVE_PACKAGE: False})
    assert out.returncode == 0, out.stderr
    assert not (prefix / "node_modules" / NATIVE_PACKAGE / "built.txt").exists()
    pkg_dir = prefix / "node_modules" / PACKAGE
    config = write_config(tmp_path / "config.json", tmp_path / "data", free_port())
    run = subprocess.run([str(NODE), str(pkg_dir / "build/bin/actual-server.js"), "--config", str(config)],
                         cwd=pkg_dir, env=server_env(), capture_output=True, text=True,
                         timeout=EXIT_TIMEOUT, check=False)
    assert run.returncode != 0
    assert "fake-native: built.txt missing" in run.stderr


# -- the fake server ------------------------------------------------------------------------------


@needs_npm
def test_smoke_start_health_info_headers_and_migrate(installs: Installs, launch: Any, tmp_path: Path) -> None:
    data, port = tmp_path / "data", free_port()
    run = launch(installs, "1.0.0", data, port)
    run.wait_healthy(port)
    status, headers, body = get(port, "/info")
    assert status == 200
    assert body["build"] == {"name": PACKAGE, "version": "1.0.0",
                             "description": "actual syncing server (abssctl test fixture)"}
    # like the real server: the isolation headers come with the web app on "/", not with /info or /health
    assert headers.get_all("Cross-Origin-Opener-Policy") is None
    assert get(port, "/health")[1].get_all("Cross-Origin-Embedder-Policy") is None
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as resp:
        assert resp.status == 200 and b"<html" in resp.read()
        assert resp.headers.get_all("Cross-Origin-Opener-Policy") == ["same-origin"]
        assert resp.headers.get_all("Cross-Origin-Embedder-Policy") == ["require-corp"]
    status, _, _ = get(port, "/sync/upload-user-file", body=b"\0" * (1 << 20))  # accepted, discarded
    assert status == 404
    assert "Migrations: DONE" in run.output()
    state = read_migrate(data)
    titles = list(installs.registry.versions["1.0.0"].migrations)
    assert [m["title"] for m in state["migrations"]] == titles
    assert all(isinstance(m["timestamp"], int) for m in state["migrations"])
    assert state["lastRun"] == titles[-1]
    assert (data / "server-files").is_dir() and (data / "user-files").is_dir()
    assert run.stop() == 0  # SIGTERM exits 0


@needs_npm
def test_env_overrides_config_port_and_info_follows_cwd(installs: Installs, launch: Any, tmp_path: Path) -> None:
    data, port = tmp_path / "data", free_port()
    config = write_config(tmp_path / "config.json", data, free_port())
    run = launch(installs, "1.0.0", data, port, config=config, ACTUAL_PORT=str(port))
    run.wait_healthy(port)
    assert get(port, "/info")[2]["build"]["version"] == "1.0.0"
    run.stop()
    # From another working directory /info has no build block, as with express-actuator.
    argv = [str(NODE), str(installs.bin("1.0.0")), "--config", str(config)]
    other = Running(argv, tmp_path, tmp_path / "other.log", server_env(ACTUAL_PORT=str(port)))
    try:
        other.wait_healthy(port)
        assert get(port, "/info")[2] == {}
    finally:
        other.stop()


@needs_npm
def test_older_version_refuses_data_migrated_by_newer(installs: Installs, launch: Any, tmp_path: Path) -> None:
    data, port = tmp_path / "data", free_port()
    run = launch(installs, "1.1.0", data, port)
    run.wait_healthy(port)
    assert run.stop() == 0
    newer = list(installs.registry.versions["1.1.0"].migrations)
    assert [m["title"] for m in read_migrate(data)["migrations"]] == newer
    before = (data / ".migrate").read_bytes()
    started = time.monotonic()
    out = run_to_exit(installs, "1.0.0", "--config", str(write_config(tmp_path / "c.json", data, port)))
    assert out.returncode == 1
    assert time.monotonic() - started < 10
    assert "Missing migration file: 1702667624000-rename-nordigen-secrets.js" in out.stderr
    assert (data / ".migrate").read_bytes() == before


@needs_npm
def test_newer_version_applies_only_missing_migrations(installs: Installs, launch: Any, tmp_path: Path) -> None:
    data, port = tmp_path / "data", free_port()
    run = launch(installs, "1.0.0", data, port)
    run.wait_healthy(port)
    run.stop()
    first = {m["title"]: m["timestamp"] for m in read_migrate(data)["migrations"]}
    run = launch(installs, "1.1.0", data, port)
    run.wait_healthy(port)
    run.stop()
    state = read_migrate(data)
    assert {m["title"]: m["timestamp"] for m in state["migrations"]}.items() >= first.items()
    assert state["lastRun"] == "1702667624000-rename-nordigen-secrets.js"


@needs_npm
def test_missing_config_exits_zero(installs: Installs, tmp_path: Path) -> None:
    out = run_to_exit(installs, "1.0.0", "--config", "/nonexistent/config.json")
    assert out.returncode == 0
    assert "/nonexistent/config.json does not exist" in out.stdout
    assert run_to_exit(installs, "1.0.0").returncode == 0  # no --config at all: nothing to serve


@needs_npm
def test_crash_after_migrate_marker(installs: Installs, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "CRASH_AFTER_MIGRATE").touch()
    out = run_to_exit(installs, "1.0.0", "--config", str(write_config(tmp_path / "c.json", data, free_port())))
    assert out.returncode == 1
    assert "Migrations: DONE" in out.stdout
    assert [m["title"] for m in read_migrate(data)["migrations"]] == list(
        installs.registry.versions["1.0.0"].migrations)
