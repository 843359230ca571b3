"""An E2E host (DESIGN.md §7(c)): real instances of the real server behind a real nginx.

``e2e_host`` (module scope) is one abssctl host in ``tmp_path_factory`` wired like the integration
tier's (tests/rig/host.py) but driven as a subprocess like the E2E sandboxes (tests/rig/e2e.py):

- its own ``NginxSandbox`` and ``SystemdSandbox`` (the classes behind ``real_nginx`` and
  ``systemd_sandbox``, whose fixtures are function-scoped), started here and stopped by PID at the
  end of the module: units first (the sandbox's own teardown), then nginx;
- ``[paths]`` under ``<basetemp>/e2e-host*/host`` (a /tmp path, so the systemctl replacement's
  ``SANDBOX/tmp -> /tmp`` link makes ``WorkingDirectory=`` resolve), with ``systemd_unit_dir`` and
  the nginx sites dirs taken from the sandboxes;
- ``[commands] node`` = Node 22 for every version, ``systemctl``/``journalctl``/``nginx``/
  ``nginx_reload`` from the sandboxes; ``[nginx]`` ports from the sandbox nginx; ``[ports]`` a free
  high range; ``[service] user/group = root``; ``[health] timeout = 120``; the real npm registry;
- ``init --yes``, then 25.6.0 on Node 22 (ABI 127) and 26.8.1 imported from the ``built_versions``
  bundle (built on Node 22). The run's first host installs 25.6.0 from the registry (the shared npm
  cache of ``$CACHE/npm-cache``) and exports it into the run's bundle dir; later hosts (other
  modules) import that bundle, so no version is built twice on the same node in one run.

``E2EHost`` is an ``E2ESandbox`` (``run``/``env``/``registry_doc``...) plus ``nginx``, ``systemd``,
``ok()`` (a call that must exit 0), ``https()`` (one request through the sandbox nginx with SNI,
like ``curl -k --resolve DOMAIN:PORT:127.0.0.1``), ``eventually()`` (bounded polling),
``wait_vhost()`` (nginx presents an instance's certificate for its domain, so the new vhost is the
one answering), ``nginx_ok()`` and ``state()`` (a registry document). Helpers for the server's API
through that nginx, shared by the E2E modules: ``healthy``, ``bootstrap_and_login``, ``login``,
``login_refused``, ``user_files``, ``upload_headers``, ``upload_user_file`` and
``download_user_file``. Only loopback is spoken to; every wait is bounded.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import ssl
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from rig.e2e import V25, V26, BuiltVersions, CliResult, E2ESandbox, NodeRuntime, PhaseTimings
from rig.https_client import HTTP_TIMEOUT, HttpReply, HttpsClient
from rig.nginx_sandbox import NginxSandbox, free_port
from rig.nginx_sandbox import NGINX
from rig.systemd_sandbox import SystemdSandbox, systemctl_script

__all__ = ["E2EHost", "HttpReply", "bootstrap_and_login", "download_user_file", "e2e_host", "healthy",
           "login", "login_refused", "running_e2e_host", "upload_headers", "upload_user_file", "user_files"]



class E2EHost(E2ESandbox):
    """An E2E sandbox whose units run under the systemctl replacement and whose sites are served."""

    def __init__(self, root: Path, node: NodeRuntime, cache: Path, nginx: NginxSandbox,
                 systemd: SystemdSandbox) -> None:
        super().__init__(root, node, None, cache)
        self.nginx = nginx
        self.client = HttpsClient("127.0.0.1", nginx.https_port)
        self.systemd = systemd
        self.paths.update(systemd_unit_dir=systemd.unit_dir,
                          nginx_sites_available=nginx.sites_available,
                          nginx_sites_enabled=nginx.sites_enabled)
        base = free_port(span=41)
        self.port_range = (base, base + 40)
        self.settings["paths"] = {k: str(v) for k, v in self.paths.items()}
        self.settings["ports"] = {"base": base, "max": base + 40}
        self.settings["nginx"] = {"http_port": nginx.http_port, "https_port": nginx.https_port}
        self.settings["commands"].update(
            systemctl=systemd.command, journalctl=systemd.journalctl_command,
            nginx=nginx.command, nginx_reload=nginx.reload_command,
            openssl=[shutil.which("openssl") or "/usr/bin/openssl"],
            zstd=[shutil.which("zstd") or "/usr/bin/zstd"])
        self.write_config()

    # -- abssctl -------------------------------------------------------------------------------

    def ok(self, *args: Any, timeout: float = 600.0) -> Any:
        """Run abssctl --json ARGS; it must exit 0. Returns the JSON document."""
        res = self.run(*args, timeout=timeout)
        assert res.rc == 0 and isinstance(res.doc, dict) and res.doc.get("ok") is True, res.describe()
        return res.doc

    def state(self, name: str) -> dict[str, Any]:
        """state_dir/registry/NAME.json (instances, ports, versions)."""
        path = self.paths["state_dir"] / "registry" / f"{name}.json"
        return json.loads(path.read_text(encoding="utf-8"))

    def nginx_ok(self) -> str:
        """'' when `nginx -t` passes on the sandbox config, else its output."""
        proc = self.nginx.test()
        return "" if proc.returncode == 0 else f"nginx -t rc={proc.returncode}: {proc.stderr}"

    # -- HTTP through the sandbox nginx (an HttpsClient for 127.0.0.1:https_port) ----------------

    def https(self, domain: str, path: str, method: str = "GET", body: bytes | None = None,
              headers: dict[str, str] | None = None, timeout: float = HTTP_TIMEOUT) -> HttpReply:
        """One request to 127.0.0.1:https_port with SNI and Host = DOMAIN (the cert is not checked)."""
        return self.client.https(domain, path, method, body, headers, timeout)

    def https_json(self, domain: str, path: str, payload: Any = None, token: str | None = None,
                   headers: dict[str, str] | None = None) -> HttpReply:
        """GET (payload None) or POST a JSON payload, with x-actual-token when given."""
        return self.client.https_json(domain, path, payload, token, headers)

    def eventually(self, probe: Callable[[], HttpReply], want: Callable[[HttpReply], bool],
                   seconds: float = 20.0) -> HttpReply | str:
        return self.client.eventually(probe, want, seconds)

    def served_cert(self, domain: str) -> bytes:
        """DER of the certificate nginx presents for SNI DOMAIN: it tells which vhost answers."""
        return self.client.served_cert(domain)

    def wait_vhost(self, name: str, domain: str, seconds: float = 20.0, times: int = 3) -> None:
        """Wait (bounded) until nginx answers DOMAIN with NAME's certificate, TIMES connections in a
        row. abssctl's `nginx -s reload` returns before the new workers serve; until they do, a new
        domain meets the first vhost on the port, whose /health says UP just the same."""
        pem = (self.paths["tls_dir"] / name / "fullchain.pem").read_text(encoding="ascii")
        end = "-----END CERTIFICATE-----"
        want = ssl.PEM_cert_to_DER_cert(pem[:pem.index(end) + len(end)] + "\n")
        deadline = time.monotonic() + seconds
        streak, last = 0, "never answered"
        while streak < times:
            try:
                got = self.served_cert(domain)
                streak = streak + 1 if got == want else 0
                last = "the certificate of another vhost" if got != want else "a match"
            except OSError as exc:
                streak, last = 0, repr(exc)
            if streak >= times:
                return
            assert time.monotonic() < deadline, (
                f"nginx did not serve {domain} with {name}'s certificate within {seconds} s: {last}")
            time.sleep(0.1)

    def health(self, domain: str) -> HttpReply | str:
        """GET /health through nginx until it says UP (bounded); returns the last reply."""
        return self.client.health(domain)


# -- the server's API through nginx (assertions shared by the E2E modules) --------------------------

def healthy(host: E2EHost, domain: str) -> None:
    """/health of DOMAIN through nginx says UP (polled, bounded), else the test fails."""
    got = host.health(domain)
    assert isinstance(got, HttpReply) and got.status == 200 and got.json() == {"status": "UP"}, (
        f"/health of {domain} through nginx: {got if isinstance(got, str) else got.describe()}")


def upload_headers(token: str | None, file_id: str, name: str) -> dict[str, str]:
    """The headers of /sync/upload-user-file for an encrypted budget file (with x-actual-token)."""
    headers = {"Content-Type": "application/encrypted-file", "x-actual-file-id": file_id,
               "x-actual-name": name, "x-actual-format": "2"}
    if token:
        headers["x-actual-token"] = token
    return headers


def bootstrap_and_login(host: E2EHost, domain: str, password: str) -> str:
    """Set the first password of a fresh server, then log in; returns the session token."""
    needs = host.https_json(domain, "/account/needs-bootstrap")
    assert needs.status == 200 and needs.json()["data"]["bootstrapped"] is False, needs.describe()
    boot = host.https_json(domain, "/account/bootstrap", {"password": password})
    assert boot.status == 200 and boot.json()["status"] == "ok", boot.describe()
    return login(host, domain, password)


def login(host: E2EHost, domain: str, password: str) -> str:
    """/account/login with the password must succeed; returns the session token."""
    got = host.https_json(domain, "/account/login", {"loginMethod": "password", "password": password})
    doc = got.json() or {}
    assert got.status == 200 and doc.get("status") == "ok" and doc["data"]["token"], got.describe()
    return doc["data"]["token"]


def login_refused(host: E2EHost, domain: str, password: str) -> bool:
    got = host.https_json(domain, "/account/login", {"loginMethod": "password", "password": password})
    return (got.json() or {}).get("status") == "error"


def user_files(host: E2EHost, domain: str, token: str) -> dict[str, str]:
    """fileId -> name from /sync/list-user-files."""
    got = host.https_json(domain, "/sync/list-user-files", token=token)
    doc = got.json() or {}
    assert got.status == 200 and doc.get("status") == "ok", got.describe()
    return {row["fileId"]: row["name"] for row in doc["data"] if not row.get("deleted")}


def upload_user_file(host: E2EHost, domain: str, token: str, file_id: str, name: str, body: bytes) -> None:
    """POST a budget file to /sync/upload-user-file; the server must accept it."""
    up = host.https(domain, "/sync/upload-user-file", "POST", body, upload_headers(token, file_id, name))
    assert up.status == 200 and up.json()["status"] == "ok", up.describe()


def download_user_file(host: E2EHost, domain: str, token: str, file_id: str) -> HttpReply:
    return host.https(domain, "/sync/download-user-file", headers={"x-actual-token": token,
                                                                   "x-actual-file-id": file_id})


def _require(res: CliResult, what: str) -> None:
    if res.rc != 0:
        pytest.fail(f"{what} failed:\n{res.describe()}")


# 25.6.0 as built on Node 22 by the first E2E host of this run, exported so later hosts import it
# (seconds) instead of installing it from the registry again (minutes): version -> bundle.
_NODE22_BUNDLES: dict[str, Path] = {}


def _install_v25(host: E2EHost, node: NodeRuntime, bundles: Path, timings: PhaseTimings, who: str) -> None:
    """25.6.0 on Node 22: from the registry on the run's first host (then exported), else its bundle."""
    bundle = _NODE22_BUNDLES.get(V25)
    if bundle is not None and bundle.is_file():
        with timings.phase(f"e2e host {who}: version import {V25} (bundle from an earlier host, node "
                           f"{node.version})"):
            res = host.run("version", "import", bundle)
        _require(res, f"version import {bundle}")
        return
    with timings.phase(f"e2e host {who}: version install {V25} (registry, node {node.version})"):
        res = host.run("version", "install", V25)
    _require(res, f"version install {V25} on node {node.version}")
    bundle = bundles / f"sync-server-{V25}-abi{node.abi}.tar.zst"
    with timings.phase(f"e2e host {who}: version export {V25} (for later hosts)"):
        res = host.run("version", "export", V25, "-o", bundle)
    _require(res, f"version export {V25} -o {bundle}")
    _NODE22_BUNDLES[V25] = bundle


@pytest.fixture(scope="module")
def e2e_host(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, node22: NodeRuntime,
             e2e_cache: Path, built_versions: BuiltVersions, e2e_timings: PhaseTimings) -> Iterator[E2EHost]:
    """One host per test module with 25.6.0 (Node 22: the registry for the run's first host, a bundle
    of that install for the others) and 26.8.1 (the ``built_versions`` bundle) installed."""
    who = request.module.__name__.rsplit(".", 1)[-1]
    with running_e2e_host(tmp_path_factory.mktemp("e2e-host"), node22, e2e_cache, built_versions,
                          e2e_timings, who) as host:
        yield host


@contextlib.contextmanager
def running_e2e_host(base: Path, node22: NodeRuntime, e2e_cache: Path, built_versions: BuiltVersions,
                     e2e_timings: PhaseTimings, who: str) -> Iterator[E2EHost]:
    """What ``e2e_host`` yields, for a module that needs a second host (another machine, say)."""
    script = systemctl_script()
    if script is None:
        pytest.skip(f"systemctl replacement not unpacked under {e2e_cache}/systemctl "
                    "(tests/run fetches it with apt-get download systemctl)")
    if not shutil.which(NGINX):
        pytest.skip(f"{NGINX} not found (apt-get install nginx-light)")
    bundle26 = built_versions[V26].require_bundle()
    nginx = NginxSandbox(base / "nginx")
    systemd = SystemdSandbox(base / "sd", script)
    systemd.create()
    nginx.write_conf()
    try:
        nginx.start()
        host = E2EHost(base / "host", node22, e2e_cache, nginx, systemd)
        _require(host.run("init", "--yes", timeout=60), "abssctl init --yes")
        _install_v25(host, node22, bundle26.parent, e2e_timings, who)
        with e2e_timings.phase(f"e2e host {who}: version import {V26} (bundle)"):
            res = host.run("version", "import", bundle26)
        _require(res, f"version import {bundle26}")
        yield host
    finally:
        systemd.teardown()
        nginx.stop()
