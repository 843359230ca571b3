"""Instances against the real rig: nginx, the systemctl replacement, npm and the fake server."""
from __future__ import annotations

import http.client
import json
import os
import socket
import ssl
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def https_get(host, domain: str, path: str) -> tuple[int, dict[str, list[str]], bytes]:
    """GET through the sandbox nginx over TLS with SNI, like curl --resolve."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    raw = socket.create_connection(("127.0.0.1", host.nginx.https_port), timeout=5)
    with ctx.wrap_socket(raw, server_hostname=domain) as tls:
        conn = http.client.HTTPConnection(domain)
        conn.sock = tls
        conn.request("GET", path, headers={"Host": domain})
        resp = conn.getresponse()
        headers: dict[str, list[str]] = {}
        for k, v in resp.getheaders():
            headers.setdefault(k.lower(), []).append(v)
        return resp.status, headers, resp.read()


def eventually_status(host, domain: str, path: str, want: int = 200, seconds: float = 10) -> int:
    """nginx -s reload returns before the new workers take over: poll, bounded."""
    deadline = time.monotonic() + seconds
    status = 0
    while time.monotonic() < deadline:
        try:
            status = https_get(host, domain, path)[0]
        except OSError:
            status = -1
        if status == want:
            break
        time.sleep(0.1)
    return status


def test_create_serves_https_through_nginx(abssctl_host) -> None:
    h = abssctl_host
    doc = h.ok("instance", "create", "alice", "--domain", "alice.example.test", "--tls", "self-signed")
    inst = doc["instance"]
    assert doc["changed"] is True and inst["health"] == "UP" and inst["resolved_version"] == "1.0.0"
    assert inst["url"] == f"https://alice.example.test:{h.nginx.https_port}/"
    assert eventually_status(h, "alice.example.test", "/health") == 200
    status, headers, body = https_get(h, "alice.example.test", "/health")
    assert status == 200 and json.loads(body) == {"status": "UP"}
    status, headers, _body = https_get(h, "alice.example.test", "/")   # the server sends them on /
    assert status == 200
    assert len(headers.get("cross-origin-opener-policy", [])) == 1
    assert len(headers.get("cross-origin-embedder-policy", [])) == 1
    root = h.paths["instance_root"] / "alice"
    assert (root.stat().st_mode & 0o777, (root / "data").stat().st_mode & 0o777) == (0o750, 0o750)
    assert (root / "config.json").stat().st_mode & 0o777 == 0o640
    key = h.paths["tls_dir"] / "alice" / "privkey.pem"
    assert key.stat().st_mode & 0o777 == 0o600
    cfg = json.loads((root / "config.json").read_text())
    assert cfg["hostname"] == "127.0.0.1" and cfg["trustedProxies"] == ["127.0.0.0/8", "::1/128"]
    again = h.ok("instance", "create", "alice", "--domain", "alice.example.test", "--tls", "self-signed")
    assert again["changed"] is False
    assert h.nginx.test().returncode == 0


def test_lifecycle_rename_set_port_delete_leaves_nothing(abssctl_host) -> None:
    h = abssctl_host
    before = h.tree()
    h.ok("instance", "create", "bob", "--domain", "bob.example.test", "--tls", "self-signed")
    assert h.ok("instance", "stop", "bob")["changed"] is True
    assert h.ok("instance", "stop", "bob")["changed"] is False
    assert h.ok("instance", "start", "bob")["instance"]["health"] == "UP"
    status = h.ok("instance", "status", "bob")["instances"][0]
    assert status["health"] == "UP" and status["listening"] and status["version_ok"]
    port = h.ok("instance", "show", "bob")["instance"]["port"]
    h.ok("instance", "set-port", "bob", str(port + 5))
    assert h.ok("instance", "show", "bob")["instance"]["port"] == port + 5
    assert str(port) not in h.registry_doc("ports")["ports"]
    assert eventually_status(h, "bob.example.test", "/health") == 200
    h.ok("instance", "rename", "bob", "robert")
    assert "bob" not in h.registry_doc("instances")["instances"]
    assert not (h.paths["instance_root"] / "bob").exists()
    assert (h.paths["instance_root"] / "robert" / "data").is_dir()
    assert eventually_status(h, "bob.example.test", "/health") == 200   # same domain, new name
    assert h.ok("instance", "status", "robert")["instances"][0]["health"] == "UP"
    h.ok("--yes", "instance", "delete", "robert", "--purge-data", "--no-backup")
    after = h.tree()
    new = {p for p in after if p not in before}
    assert not [p for p in new if "robert" in p or "bob" in p], sorted(new)
    assert h.registry_doc("instances")["instances"] == {} and h.registry_doc("ports")["ports"] == {}
    assert h.nginx.test().returncode == 0


def test_a_vhost_that_breaks_nginx_rolls_create_back(abssctl_host) -> None:
    h = abssctl_host
    h.paths["templates_dir"].mkdir(parents=True, exist_ok=True)
    override = h.paths["templates_dir"] / "nginx-vhost.conf"
    override.write_text("server { listen ${PORT}; server_name ${DOMAIN}; bogus_directive on; }\n")
    os.chmod(override, 0o644)
    before = h.tree()
    got = h.run("--json", "instance", "create", "carol", "--domain", "carol.example.test", "--tls", "self-signed")
    assert got.rc == 4 and "nginx" in got.doc["error"]["message"]
    override.unlink()
    after = h.tree()
    # registries keep their previous version as .prev, and the systemctl replacement leaves its
    # (empty) multi-user.target.wants directory behind after disable: neither is ours to undo.
    new = {p for p in after if p not in before and not p.endswith(".prev") and "target.wants" not in p}
    assert new == set(), sorted(new)
    assert h.nginx.test().returncode == 0
    assert h.registry_doc("instances")["instances"] == {}


def test_a_server_that_never_becomes_healthy_rolls_create_back(abssctl_host) -> None:
    h = abssctl_host
    h.configure("health", timeout=3)
    mute = h.root / "mute-node"
    mute.write_text("#!/bin/sh\nexec sleep 30\n")                     # runs, never answers
    mute.chmod(0o755)
    h.configure("commands", node=[str(mute)])
    before = h.tree()
    got = h.run("--json", "instance", "create", "dave", "--domain", "dave.example.test", "--tls", "self-signed")
    assert got.rc == 4 and got.doc["error"]["kind"] == "HealthGateFailed", got
    assert {p for p in h.tree() if p not in before and not p.endswith(".prev") and "target.wants" not in p} == set()
    assert h.registry_doc("ports")["ports"] == {}
    assert not list(h.systemd.unit_dir.glob("abssctl-dave*"))


def test_a_foreign_listener_is_a_port_collision(abssctl_host) -> None:
    h = abssctl_host
    base = h.settings["ports"]["base"]
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", base))
        squatter.listen()
        got = h.run("--json", "instance", "create", "erin", "--domain", "erin.example.test", "--port", str(base),
                    "--tls", "self-signed")
        assert got.rc == 2 and "in use" in got.doc["error"]["message"]
        doc = h.ok("instance", "create", "erin", "--domain", "erin.example.test", "--tls", "self-signed")
        assert doc["instance"]["port"] != base


def test_dry_run_create_changes_nothing(abssctl_host) -> None:
    h = abssctl_host
    before = h.tree()
    doc = h.ok("--dry-run", "instance", "create", "fay", "--domain", "fay.example.test", "--tls", "self-signed")
    steps = [s["step"] for s in doc["plan"]]
    assert steps[:2] == ["registry.ports", "registry.instances"] and "nginx.commit" in steps
    assert h.tree() == before
