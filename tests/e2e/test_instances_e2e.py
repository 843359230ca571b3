"""E2E: real instances of the real server behind a real nginx (DESIGN §4.5, §4.8, §4.9, §7(c)).

One host per module (``e2e_host``, tests/rig/e2e_host.py): 25.6.0 installed from the registry on
Node 22, 26.8.1 imported from the ``built_versions`` bundle, units under the systemctl replacement,
vhosts in a sandbox nginx on loopback high ports. ``alice`` runs 25.6.0 and ``bob`` 26.8.1, both
with self-signed certificates, and everything the tests check goes through that nginx over HTTPS
with SNI (curl -k --resolve style), except where a test looks at files or the loopback backend.
"""
from __future__ import annotations

import json
import os
import time
import uuid
from typing import Any

import pytest

from rig.e2e import V25, V26, PhaseTimings
from rig.e2e_host import (E2EHost, bootstrap_and_login, e2e_host, healthy,  # noqa: F401  (the fixture)
                          login, login_refused, upload_headers, user_files)
from rig.systemd_sandbox import pid_alive

pytestmark = pytest.mark.e2e

DOMAINS = {"alice": "alice.e2e.test", "bob": "bob.e2e.test"}
VERSIONS = {"alice": V25, "bob": V26}
UPLOAD_MB = 30
OLD_PASSWORD = "e2e-old-password-1"
NEW_PASSWORD = "e2e-new-password-2"


@pytest.fixture(scope="module")
def instances(e2e_host: E2EHost, e2e_timings: PhaseTimings) -> dict[str, Any]:
    """alice on 25.6.0 and bob on 26.8.1, created, started, gated and published."""
    docs = {}
    for name in ("alice", "bob"):
        with e2e_timings.phase(f"e2e host: instance create {name} ({VERSIONS[name]})"):
            docs[name] = e2e_host.ok("instance", "create", name, "--domain", DOMAINS[name],
                                     "--version", VERSIONS[name], "--tls", "self-signed")
        assert e2e_host.nginx_ok() == ""
    return docs


# ----------------------------------------------------------------------------------------------

def test_two_versions_side_by_side_over_https(e2e_host: E2EHost, instances: dict[str, Any],
                                              e2e_timings: PhaseTimings) -> None:
    h = e2e_host
    uploads: dict[str, str] = {}
    for name, doc in instances.items():
        inst = doc["instance"]
        domain = DOMAINS[name]
        assert doc["changed"] is True, doc
        assert inst["health"] == "UP" and inst["resolved_version"] == VERSIONS[name], inst
        assert inst["url"] == f"https://{domain}:{h.nginx.https_port}/", inst
        healthy(h, domain)
        # the server sets COOP on its web frontend routes only (not on /health or /info): through
        # nginx the frontend must carry exactly one, so the vhost adds no second copy
        health = h.https(domain, "/health")
        assert len(health.headers.get("cross-origin-opener-policy", [])) <= 1, health.describe()
        info = h.https(domain, "/info")
        assert info.status == 200, info.describe()
        assert info.json()["build"]["version"] == VERSIONS[name], info.describe()
        root = h.https(domain, "/")
        assert root.status == 200 and b"<html" in root.body.lower(), root.describe()
        assert root.headers.get("cross-origin-opener-policy") == ["same-origin"], root.describe()
        body = os.urandom(UPLOAD_MB * 1024 * 1024)
        with e2e_timings.phase(f"e2e host: {UPLOAD_MB} MB upload to {name} (no token)"):
            anon = h.https(domain, "/sync/upload-user-file", "POST", body,
                           upload_headers(None, str(uuid.uuid4()), "big"), timeout=120)
        assert anon.status != 413, anon.describe()
        uploads[f"{name} without a token"] = f"HTTP {anon.status}"
    # the server's own encrypted-file limit (50 MB), reached only with a session: on bob
    token = bootstrap_and_login(h, DOMAINS["bob"], "bob-e2e-password")
    file_id = str(uuid.uuid4())
    body = os.urandom(UPLOAD_MB * 1024 * 1024)
    with e2e_timings.phase(f"e2e host: {UPLOAD_MB} MB upload to bob (logged in)"):
        signed = h.https(DOMAINS["bob"], "/sync/upload-user-file", "POST", body,
                         upload_headers(token, file_id, "big budget"), timeout=120)
    uploads["bob with a token"] = f"HTTP {signed.status} {signed.body[:80]!r}"
    print(f"\n{UPLOAD_MB} MB /sync/upload-user-file: {uploads}")
    assert signed.status != 413, signed.describe()
    assert signed.status == 200 and signed.json()["status"] == "ok", signed.describe()
    assert user_files(h, DOMAINS["bob"], token) == {file_id: "big budget"}
    stored = h.paths["instance_root"] / "bob" / "data" / "user-files" / f"file-{file_id}.blob"
    assert stored.stat().st_size == len(body)
    assert h.nginx_ok() == ""


def test_data_survives_backup_password_change_and_restore(e2e_host: E2EHost, instances: dict[str, Any],
                                                          e2e_timings: PhaseTimings) -> None:
    h = e2e_host
    domain = DOMAINS["alice"]
    token = bootstrap_and_login(h, domain, OLD_PASSWORD)
    file_id = str(uuid.uuid4())
    budget = b"PK\x03\x04 e2e budget " + os.urandom(4096)
    up = h.https(domain, "/sync/upload-user-file", "POST", budget,
                 upload_headers(token, file_id, "My Budget"))
    assert up.status == 200 and up.json()["status"] == "ok", up.describe()
    assert user_files(h, domain, token) == {file_id: "My Budget"}

    with e2e_timings.phase("e2e host: backup create alice"):
        backup = h.ok("backup", "create", "alice")["backup"]
    assert backup["instance"] == "alice" and backup["server_version"] == V25, backup

    changed = h.https_json(domain, "/account/change-password", {"password": NEW_PASSWORD}, token=token)
    assert changed.status == 200 and changed.json()["status"] == "ok", changed.describe()
    assert login_refused(h, domain, OLD_PASSWORD)
    login(h, domain, NEW_PASSWORD)

    with e2e_timings.phase("e2e host: backup restore alice"):
        restored = h.ok("backup", "restore", backup["id"], "--yes")["restore"]
    assert restored["health"] == "UP", restored
    healthy(h, domain)
    token = login(h, domain, OLD_PASSWORD)
    assert login_refused(h, domain, NEW_PASSWORD)
    assert user_files(h, domain, token) == {file_id: "My Budget"}
    down = h.https(domain, "/sync/download-user-file", headers={"x-actual-token": token,
                                                                "x-actual-file-id": file_id})
    assert down.status == 200 and down.body == budget, down.describe()
    inst_dir = h.paths["instance_root"] / "alice"
    assert not list(inst_dir.glob("data.pre-restore-*")) and not list(inst_dir.glob(".abssctl-tmp-*"))

    with e2e_timings.phase("e2e host: backup verify --deep"):
        verified = h.ok("backup", "verify", backup["id"], "--deep")["results"][0]
    assert verified["status"] == "ok", verified
    sqlite = verified["checks"]["sqlite"]
    assert sqlite.get("data/server-files/account.sqlite") == "ok", verified
    assert set(sqlite.values()) == {"ok"}, verified
    assert h.nginx_ok() == ""


def test_a_newer_backup_cannot_be_restored_into_an_older_version(e2e_host: E2EHost,
                                                                 instances: dict[str, Any]) -> None:
    h = e2e_host
    backup = h.ok("backup", "create", "bob")["backup"]
    assert backup["server_version"] == V26, backup
    data = h.paths["instance_root"] / "alice" / "data"
    before = sorted(str(p.relative_to(data)) for p in data.rglob("*"))
    res = h.run("backup", "restore", backup["id"], "--instance", "alice", "--yes")
    assert res.rc == 2, res.describe()
    message = res.error.get("message", "")
    assert V26 in message and V25 in message, res.describe()
    # nothing live changed (§4.8.6: staging is discarded before the compatibility check fails)
    inst_dir = data.parent
    assert not list(inst_dir.glob(".abssctl-tmp-*")), sorted(os.listdir(inst_dir))
    assert not list(inst_dir.glob("data.pre-restore-*")), sorted(os.listdir(inst_dir))
    assert sorted(str(p.relative_to(data)) for p in data.rglob("*")) == before
    healthy(h, DOMAINS["alice"])
    info = h.https(DOMAINS["alice"], "/info")
    assert info.json()["build"]["version"] == V25, info.describe()


def test_rename_set_port_and_delete_leave_nothing_behind(e2e_host: E2EHost, instances: dict[str, Any],
                                                         e2e_timings: PhaseTimings) -> None:
    h = e2e_host
    old_backups = {b["id"] for b in h.ok("backup", "list", "--instance", "bob")["backups"]}

    with e2e_timings.phase("e2e host: instance rename bob robert"):
        h.ok("instance", "rename", "bob", "robert")
    assert h.nginx_ok() == ""
    insts = h.state("instances")["instances"]
    assert "bob" not in insts and insts["robert"]["domain"] == DOMAINS["bob"], insts
    assert not (h.paths["instance_root"] / "bob").exists()
    assert (h.paths["instance_root"] / "robert" / "data").is_dir()
    assert not (h.systemd.unit_dir / "abssctl-bob.service").exists()
    assert (h.systemd.unit_dir / "abssctl-robert.service").is_file()
    assert not (h.nginx.sites_enabled / "abssctl-bob.conf").exists()
    assert (h.nginx.sites_enabled / "abssctl-robert.conf").exists()
    assert not (h.paths["tls_dir"] / "bob").exists() and (h.paths["tls_dir"] / "robert").is_dir()
    moved = {b["id"]: b for b in h.ok("backup", "list", "--instance", "robert")["backups"]}
    assert old_backups <= set(moved), (old_backups, moved)
    for b in moved.values():           # index entries: archive is relative to backup_root (§3.6)
        assert b["instance"] == "robert" and b["archive"].startswith("robert/"), b
        assert (h.paths["backup_root"] / b["archive"]).is_file(), b
    assert not (h.paths["backup_root"] / "bob").exists()
    healthy(h, DOMAINS["bob"])                              # same domain, new name
    info = h.https(DOMAINS["bob"], "/info")
    assert info.json()["build"]["version"] == V26, info.describe()

    base, top = h.port_range
    reserved = {int(p) for p in h.state("ports")["ports"]}
    old_port = h.ok("instance", "show", "alice")["instance"]["port"]
    new_port = max(p for p in range(base, top + 1) if p not in reserved)
    with e2e_timings.phase("e2e host: instance set-port alice"):
        h.ok("instance", "set-port", "alice", new_port)
    assert h.nginx_ok() == ""
    assert h.ok("instance", "show", "alice")["instance"]["port"] == new_port
    ports = h.state("ports")["ports"]
    assert str(old_port) not in ports and str(new_port) in ports, ports
    cfg = json.loads((h.paths["instance_root"] / "alice" / "config.json").read_text(encoding="utf-8"))
    assert cfg["port"] == new_port
    vhost = (h.nginx.sites_available / "abssctl-alice.conf").read_text(encoding="utf-8")
    assert f"127.0.0.1:{new_port}" in vhost and f"127.0.0.1:{old_port}" not in vhost
    healthy(h, DOMAINS["alice"])
    status = h.ok("instance", "status", "alice")["instances"][0]
    assert status["health"] == "UP" and status["listening"], status

    pid = h.systemd.status_pids().get("abssctl-robert.service")
    robert_port = insts["robert"]["port"]
    with e2e_timings.phase("e2e host: instance delete robert --purge-data"):
        deleted = h.ok("instance", "delete", "robert", "--purge-data", "--yes")
    assert h.nginx_ok() == ""
    finals = [b for b in h.ok("backup", "list", "--instance", "robert")["backups"]
              if b["reason"] == "pre-delete"]
    assert len(finals) == 1 and (h.paths["backup_root"] / finals[0]["archive"]).is_file(), (deleted, finals)
    assert "robert" not in h.state("instances")["instances"]
    assert str(robert_port) not in h.state("ports")["ports"]
    left = [str(p) for top_dir in (h.systemd.unit_dir, h.nginx.sites_available, h.nginx.sites_enabled,
                                   h.paths["instance_root"], h.paths["tls_dir"])
            for p in top_dir.rglob("*") if "robert" in p.name or "bob" in p.name]
    assert left == [], left
    assert not (h.nginx.sites_enabled / "abssctl-robert.conf").is_symlink()
    deadline = time.monotonic() + 10
    while pid and pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not (pid and pid_alive(pid)), f"robert's server (PID {pid}) still runs"
    healthy(h, DOMAINS["alice"])
