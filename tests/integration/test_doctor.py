"""doctor against the real rig (DESIGN §4.10): a clean host, then one break per test, each reported by
its probe with the exit code of its category class, repaired by `doctor --fix` when DESIGN says it is
safe to, and left alone (still reported) when it is not."""
from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import pytest

pytestmark = pytest.mark.integration

NAMES = ("alice", "bob")
OLD = time.time() - 2 * 3600          # "older than one hour" for leftovers


# -- helpers -------------------------------------------------------------------------

def domain(name: str) -> str:
    return f"{name}.example.test"


@pytest.fixture
def two(abssctl_host):
    """Two running instances with self-signed TLS and a backup each: a host doctor calls clean."""
    h = abssctl_host
    for name in NAMES:
        h.ok("instance", "create", name, "--domain", domain(name), "--tls", "self-signed")
        h.ok("backup", "create", name)
    return h


def doctor(h, *args: str):
    got = h.run("--json", "doctor", *args)
    assert got.doc is not None, got
    return got


def findings(doc: dict[str, Any], probe_id: str, target: str | None = None) -> list[dict[str, Any]]:
    return [p for p in doc.get("probes", []) if p["id"] == probe_id and (target is None or p["target"] == target)]


def not_ok(doc: dict[str, Any]) -> list[tuple[str, str, str | None, str]]:
    return [(p["status"], p["id"], p["target"], p["message"]) for p in doc.get("probes", []) if p["status"] != "ok"]


def assert_clean(got) -> None:
    assert got.rc == 0 and got.doc["ok"] is True, not_ok(got.doc)
    assert got.doc["summary"]["fail"] == 0 and got.doc["summary"]["warn"] == 0, not_ok(got.doc)


def eventually_clean_for(h, probe_id: str, target: str | None, seconds: float = 10.0):
    """nginx -s reload returns before its new workers take over: re-probe, bounded."""
    deadline = time.monotonic() + seconds
    while True:
        got = doctor(h)
        bad = [p for p in findings(got.doc, probe_id, target) if p["status"] != "ok"]
        if not bad or time.monotonic() > deadline:
            return got, bad
        time.sleep(0.2)


def show(h, name: str) -> dict[str, str]:
    return h.systemd.show(f"abssctl-{name}.service")


def instance(h, name: str) -> dict[str, Any]:
    return h.registry_doc("instances")["instances"][name]


def reload_nginx(h) -> None:
    assert h.nginx.test().returncode == 0, h.nginx.test().stderr
    assert h.nginx.reload().returncode == 0


def https_request(h, name: str, method: str = "GET", path: str = "/health", body: bytes | None = None,
                  seconds: float = 10.0) -> tuple[int, dict[str, list[str]]]:
    """One request through the sandbox nginx with SNI; retried while nginx reloads."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    deadline = time.monotonic() + seconds
    while True:
        try:
            raw = socket.create_connection(("127.0.0.1", h.nginx.https_port), timeout=5)
            with context.wrap_socket(raw, server_hostname=domain(name)) as tls:
                conn = http.client.HTTPConnection(domain(name))
                conn.sock = tls
                conn.request(method, path, body=body, headers={"Host": domain(name),
                                                               "Content-Type": "application/octet-stream"})
                resp = conn.getresponse()
                resp.read()
                headers: dict[str, list[str]] = {}
                for k, v in resp.getheaders():
                    headers.setdefault(k.lower(), []).append(v)
                return resp.status, headers
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def openssl_pair(h, name: str, days: int, where: Path) -> tuple[Path, Path]:
    where.mkdir(parents=True, exist_ok=True)
    cert, key = where / "cert.pem", where / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", str(days), "-subj", f"/CN={domain(name)}",
                    "-addext", f"subjectAltName=DNS:{domain(name)}", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    os.chmod(key, 0o600)
    return cert, key


def pair_in_place(h, instance: str, name: str, days: int, where: Path) -> Path:
    """A new pair for NAME's domain written over INSTANCE's fullchain.pem and privkey.pem in place (as
    a renewal or a careless copy would, with no abssctl command); returns INSTANCE's TLS dir."""
    cert, key = openssl_pair(h, name, days, where)
    tdir = h.paths["tls_dir"] / instance
    (tdir / "fullchain.pem").write_bytes(cert.read_bytes())
    (tdir / "privkey.pem").write_bytes(key.read_bytes())
    return tdir


# -- the clean host --------------------------------------------------------------------

def test_a_clean_host_has_no_failures(two) -> None:
    h = two
    got = doctor(h)
    assert_clean(got)
    doc = got.doc
    assert set(doc["summary"]) == {"ok", "warn", "fail", "skip", "exit_code", "duration_ms"}
    assert doc["summary"]["exit_code"] == 0 and doc["changed"] is False
    cats = {p["category"] for p in doc["probes"]}
    assert cats == {"env", "config", "state", "fs", "ports", "systemd", "nginx", "tls", "app", "disk", "backups",
                    "unattended"}
    for p in doc["probes"]:
        assert set(p) == {"id", "category", "target", "status", "message", "hint", "fixable", "exit_class",
                          "duration_ms", "data"}, p
        assert p["id"].split(".", 1)[0] == p["category"]
        assert p["exit_class"] == (4 if p["category"] in ("ports", "systemd", "nginx", "tls", "app") else 3)
    assert {p["target"] for p in findings(doc, "app.health")} == set(NAMES)
    for probe_id in ("nginx.live", "tls.served"):       # real requests through nginx, one per instance
        assert sorted((p["target"], p["status"]) for p in findings(doc, probe_id)) == [(n, "ok") for n in NAMES]
    # --fix on a clean host has nothing to do
    fixed = doctor(h, "--fix", "--yes")
    assert fixed.rc == 0 and fixed.doc["changed"] is False


# -- break and fix ---------------------------------------------------------------------
#
# Each case breaks one thing and returns (probe id, target, status, exit code, fixable, check).
# `fixable` None means DESIGN does not settle it (not asserted). `check(h)` proves the repair on disk.

Case = tuple[str, Any, str, int, Any, Callable[[Any], None] | None]


def break_tls_dir_mode(h) -> Case:
    tls = h.paths["tls_dir"]
    os.chmod(tls, 0o777)
    return "fs.mode", str(tls), "fail", 3, True, lambda h: (tls.stat().st_mode & 0o7777) == 0o700 or pytest.fail(
        oct(tls.stat().st_mode))


def break_instance_tls_dir_mode(h) -> Case:
    d = h.paths["tls_dir"] / "alice"               # §3.5: <tls_dir>/<name>/ is 0700 too
    os.chmod(d, 0o777)
    return "fs.mode", str(d), "fail", 3, True, lambda h: (d.stat().st_mode & 0o7777) == 0o700 or pytest.fail(
        oct(d.stat().st_mode))


def break_instance_dir_mode(h) -> Case:
    d = h.paths["instance_root"] / "bob"
    os.chmod(d, 0o755)
    return "fs.mode", str(d), "fail", 3, True, lambda h: (d.stat().st_mode & 0o7777) == 0o750 or pytest.fail(
        oct(d.stat().st_mode))


def break_config_json_mode(h) -> Case:
    f = h.paths["instance_root"] / "alice" / "config.json"
    os.chmod(f, 0o666)
    return "fs.mode", str(f), "fail", 3, True, lambda h: (f.stat().st_mode & 0o7777) == 0o640 or pytest.fail(
        oct(f.stat().st_mode))


def break_unit_drift(h) -> Case:
    unit = h.systemd.unit_dir / "abssctl-alice.service"
    with open(unit, "a") as f:
        f.write("Environment=SNEAKY=1\n")

    def check(h) -> None:
        assert "SNEAKY" not in unit.read_text()
    return "systemd.unit", "alice", "warn", 0, True, check


def break_unit_deleted(h) -> Case:
    unit = h.systemd.unit_dir / "abssctl-bob.service"
    unit.unlink()

    def check(h) -> None:
        assert unit.is_file() and "abssctl instance bob" in unit.read_text()
    # also state.drift (class 3); the worst class among failures is systemd's 4
    return "systemd.unit", "bob", "fail", 4, True, check


def break_vhost_drift(h) -> Case:
    vhost = h.nginx.sites_available / "abssctl-alice.conf"
    vhost.write_text(vhost.read_text().replace("proxy_http_version 1.1;", "proxy_http_version 1.0;", 1))
    reload_nginx(h)

    def check(h) -> None:
        assert "proxy_http_version 1.0;" not in vhost.read_text()
        assert https_request(h, "alice")[0] == 200
    return "nginx.vhost", "alice", "warn", 0, True, check


def break_enabled_link(h) -> Case:
    link = h.nginx.sites_enabled / "abssctl-bob.conf"
    link.unlink()
    reload_nginx(h)

    def check(h) -> None:
        assert link.is_symlink() and link.resolve() == (h.nginx.sites_available / "abssctl-bob.conf").resolve()
        deadline = time.monotonic() + 10
        while https_request(h, "bob")[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert https_request(h, "bob")[0] == 200
    return "nginx.vhost", "bob", "warn", 0, True, check


def break_disabled_unit(h) -> Case:
    done = h.systemd.run("disable", "abssctl-alice.service")
    assert done.returncode == 0, done.stderr
    assert show(h, "alice").get("UnitFileState") != "enabled"

    def check(h) -> None:
        assert show(h, "alice").get("UnitFileState") == "enabled"
    return "systemd.enabled", "alice", "warn", 0, True, check


def break_killed_instance(h) -> Case:
    pid = int(show(h, "bob")["MainPID"])
    assert pid > 0
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while show(h, "bob").get("ActiveState") == "active" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert show(h, "bob")["ActiveState"] == "failed", show(h, "bob")

    def check(h) -> None:
        assert show(h, "bob")["ActiveState"] == "active"
        assert h.ok("instance", "status", "bob")["instances"][0]["health"] == "UP"
    return "systemd.failed", "bob", "fail", 4, True, check


def break_port_reservation(h) -> Case:
    path = h.paths["state_dir"] / "registry" / "ports.json"
    doc = json.loads(path.read_text())
    port = str(instance(h, "alice")["port"])
    del doc["ports"][port]
    path.write_text(json.dumps(doc))

    def check(h) -> None:
        assert h.registry_doc("ports")["ports"][port]["instance"] == "alice"
    return "state.ports", "alice", "fail", 3, True, check


def break_stale_lock(h) -> Case:
    lock = h.paths["run_dir"] / "instance-alice.lock"
    lock.write_text(json.dumps({"pid": 999999, "host": socket.gethostname(), "command": "backup create",
                                "op_id": "20200101T000000Z-deadbeef", "mode": "exclusive",
                                "acquired_at": time.time() - 60}))

    def check(h) -> None:
        assert lock.exists(), "lock files are never deleted (§3.8)"
        assert "999999" not in lock.read_text()
    return "state.lock", "instance-alice.lock", "warn", 0, True, check


def break_dead_journal(h) -> Case:
    victim = h.paths["instance_root"] / "half-written-by-a-dead-op"
    victim.write_text("x")
    journal_dir = h.paths["state_dir"] / "journal"
    journal_dir.mkdir(mode=0o700, exist_ok=True)
    op = "20200101T000000Z-0dead0op"
    journal = journal_dir / f"{op}.json"
    journal.write_text(json.dumps({
        "schema_version": 1, "op_id": op, "pid": 999999, "command": "instance create",
        "targets": {"kind": "instance", "name": "zed"}, "plan": [],
        "done": [{"step": "test.write", "undo": {"kind": "remove_path", "args": {"path": str(victim)}}}],
        "started_at": "2020-01-01T00:00:00Z"}))
    os.chmod(journal, 0o600)

    def check(h) -> None:
        assert not victim.exists() and not journal.exists()
    return "state.journal", op, "fail", 3, True, check


def break_leftover_tmp(h) -> Case:
    left = h.paths["instance_root"] / ".abssctl-tmp-20200101T000000Z-0badf00d-config.json"
    left.write_text("{}")
    os.utime(left, (OLD, OLD))
    young = h.paths["instance_root"] / ".abssctl-tmp-20200101T000000Z-0badf00e-config.json"
    young.write_text("{}")                    # under an hour old: maybe a live op's, not reported

    def check(h) -> None:
        assert not left.exists()
        assert young.exists()
        young.unlink()
    return "state.leftover", str(left), "warn", 0, True, check


def break_leftover_in_backup_dir(h) -> Case:
    """backup create snapshots into <backup_root>/<name>/.abssctl-tmp-<op_id>/ (§4.8.1): a kill -9 leaves it."""
    left = h.paths["backup_root"] / "alice" / ".abssctl-tmp-20200101T000000Z-0badf00d"
    left.mkdir()
    (left / "account.sqlite").write_bytes(b"snapshot")
    for p in (left / "account.sqlite", left):
        os.utime(p, (OLD, OLD))
    return "state.leftover", str(left), "warn", 0, True, lambda h: not left.exists() or pytest.fail(str(left))


def break_hostname(h) -> Case:
    cfg = h.paths["instance_root"] / "alice" / "config.json"
    doc = json.loads(cfg.read_text())
    doc["hostname"] = "0.0.0.0"
    cfg.write_text(json.dumps(doc, indent=2))
    return "app.hostname", "alice", "fail", 4, None, None


def break_missing_config(h) -> Case:
    (h.paths["instance_root"] / "bob" / "config.json").unlink()
    return "systemd.config", "bob", "fail", 4, True, None


def break_cert_expiring(h) -> Case:
    cert, key = openssl_pair(h, "alice", 1, h.root / "short-cert")
    h.ok("tls", "install", "alice", "--cert", cert, "--key", key)
    return "tls.expiry", "alice", "warn", 0, False, None


def break_body_size_include(h) -> Case:
    """A 1m client_max_body_size from an included file applies to our server (through a template
    override, so the vhost is not drifted): 413 on sync uploads, and not doctor's to fix."""
    limits = h.root / "nginx-limits.conf"
    limits.write_text("client_max_body_size 1m;\n")
    builtin = (Path(__file__).resolve().parents[2] / "templates" / "nginx-vhost.conf").read_text()
    assert "client_max_body_size ${CLIENT_MAX_BODY_SIZE};" in builtin
    override = h.paths["templates_dir"] / "nginx-vhost.conf"
    override.parent.mkdir(parents=True, exist_ok=True)
    override.write_text(builtin.replace("client_max_body_size ${CLIENT_MAX_BODY_SIZE};", f"include {limits};"))
    os.chmod(override, 0o644)
    doctor(h, "--only", "nginx", "--fix", "--yes")          # re-renders both vhosts from the override
    assert f"include {limits};" in (h.nginx.sites_available / "abssctl-alice.conf").read_text()
    deadline = time.monotonic() + 10
    while https_request(h, "alice", "POST", "/", b"x" * (2 << 20))[0] != 413 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert https_request(h, "alice", "POST", "/", b"x" * (2 << 20))[0] == 413      # the probe is right
    return "nginx.body-size", "alice", "fail", 4, False, None


def break_coop_in_vhost(h) -> Case:
    vhost = h.nginx.sites_available / "abssctl-alice.conf"
    text = vhost.read_text()
    vhost.write_text(text.replace("    location / {", "    add_header Cross-Origin-Opener-Policy same-origin;\n"
                                  "    location / {", 1))
    reload_nginx(h)
    return "nginx.coop", "alice", "fail", 4, False, None


def break_coop_in_include(h) -> Case:
    (h.nginx.sites_enabled / "00-headers.conf").write_text(
        "add_header Cross-Origin-Opener-Policy same-origin;\n")      # http level: inherited by our servers
    reload_nginx(h)
    deadline = time.monotonic() + 10
    while len(https_request(h, "bob", path="/")[1].get("cross-origin-opener-policy", [])) != 2 \
            and time.monotonic() < deadline:
        time.sleep(0.2)
    # doubled for real on "/", where the server sends its own (it sends none on /health)
    assert len(https_request(h, "bob", path="/")[1].get("cross-origin-opener-policy", [])) == 2
    return "nginx.coop", "bob", "fail", 4, False, None


def break_coop_doubled_live(h) -> Case:
    """The same http-level header, seen by the live probe: one real request gets two COOP headers."""
    break_coop_in_include(h)
    return "nginx.live", "bob", "fail", 4, False, None


def break_coop_hidden_live(h) -> Case:
    """An http-level proxy_hide_header drops the server's COOP header on the way out."""
    (h.nginx.sites_enabled / "00-hide.conf").write_text("proxy_hide_header Cross-Origin-Opener-Policy;\n")
    reload_nginx(h)
    deadline = time.monotonic() + 10
    while https_request(h, "alice", path="/")[1].get("cross-origin-opener-policy") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "cross-origin-opener-policy" not in https_request(h, "alice", path="/")[1]
    return "nginx.live", "alice", "warn", 0, False, None


def break_config_json_drift(h) -> Case:
    """Valid JSON that is not what abssctl writes: re-rendered by --fix, and the server restarted."""
    cfg = h.paths["instance_root"] / "alice" / "config.json"
    written = cfg.read_bytes()
    doc = json.loads(written)
    doc["loginMethod"] = "header"
    cfg.write_text(json.dumps(doc))
    pid = show(h, "alice")["MainPID"]

    def check(h) -> None:
        assert cfg.read_bytes() == written
        assert show(h, "alice")["MainPID"] not in (pid, "0"), "the server must re-read config.json"
    return "systemd.config", "alice", "warn", 0, True, check


def edit_registry(h, name: str, change: Callable[[dict[str, Any]], None]) -> None:
    path = h.paths["state_dir"] / "registry" / f"{name}.json"
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc, indent=2))


def edit_config_json(h, name: str, **values: Any) -> None:
    cfg = h.paths["instance_root"] / name / "config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), **values}, indent=2))


def only_version(h) -> str:
    return sorted(h.registry_doc("versions")["versions"])[0]


def break_zstd_missing(h) -> Case:
    h.configure("commands", zstd=[str(h.root / "no-such-zstd")])
    return "env.tool", "zstd", "warn", 0, False, None


def break_node_abi(h) -> Case:
    edit_registry(h, "versions", lambda d: d["versions"][only_version(h)].setdefault("node", {}).update(abi="1"))
    return "env.node-abi", only_version(h), "fail", 3, False, None


def break_engines(h) -> Case:
    edit_registry(h, "versions", lambda d: d["versions"][only_version(h)].update(engines_node=">=99"))
    return "env.engines", only_version(h), "warn", 0, False, None


def break_service_user(h) -> Case:
    h.configure("service", user="abssctl-no-such-user")
    return "env.accounts", None, "fail", 3, False, None


def break_unknown_key(h) -> Case:
    h.configure("nginx", client_max_body_sise="50M")
    return "config.unknown-key", f"nginx.client_max_body_sise in {h.config}", "warn", 0, False, None


def break_template(h) -> Case:
    builtin = (Path(__file__).resolve().parents[2] / "templates" / "systemd-unit.service").read_text()
    override = h.paths["templates_dir"] / "systemd-unit.service"
    override.parent.mkdir(parents=True, exist_ok=True)
    override.write_text(builtin + "Environment=X=${NO_SUCH_PLACEHOLDER}\n")
    os.chmod(override, 0o644)
    return "config.template", "systemd-unit.service", "fail", 4, False, None     # 4: the units cannot render


def break_registry_json(h) -> Case:
    (h.paths["state_dir"] / "registry" / "ports.json").write_text("{ half written")
    return "state.registry", "ports", "fail", 3, False, None


def break_current_link(h) -> Case:
    link = h.paths["install_root"] / "current"
    target = os.readlink(link)
    os.unlink(link)
    os.symlink(target + "-elsewhere", link)
    return "state.current", None, "fail", 3, False, None


def break_data_aside(h) -> Case:
    (h.paths["instance_root"] / "alice" / "data.pre-restore-20261201T000000Z-0badc0de").mkdir()
    return "fs.data-aside", "alice", "warn", 0, False, None


def break_data_location(h) -> Case:
    inside = h.paths["install_root"] / only_version(h) / "node_modules" / "data"
    edit_config_json(h, "alice", dataDir=str(inside))
    return "fs.data-location", "alice", "fail", 3, False, None


def break_server_name(h) -> Case:
    (h.nginx.sites_enabled / "00-old-alice.conf").write_text(
        f"server {{ listen 127.0.0.1:{h.nginx.http_port}; server_name {domain('alice')}; return 404; }}\n")
    reload_nginx(h)
    return "nginx.server-name", domain("alice"), "warn", 0, False, None


def break_duplicate_port(h) -> Case:
    port = instance(h, "alice")["port"]
    edit_registry(h, "instances", lambda d: d["instances"]["bob"].update(port=port))
    return "ports.duplicate", "bob", "fail", 4, False, None


def break_port_range(h) -> Case:
    top = max(instance(h, n)["port"] for n in NAMES)
    h.configure("ports", base=top + 10, max=top + 20)
    return "ports.range", "alice", "warn", 0, False, None


def break_not_listening(h) -> Case:
    """alice runs, but an admin's drop-in moved it to another port than the registry's."""
    from rig.nginx_sandbox import free_port
    dropin = h.paths["systemd_unit_dir"] / "abssctl-alice.service.d" / "port.conf"
    dropin.parent.mkdir()
    dropin.write_text(f"[Service]\nEnvironment=ACTUAL_PORT={free_port()}\n")
    assert h.systemd.run("daemon-reload").returncode == 0
    assert h.systemd.run("restart", "abssctl-alice.service").returncode == 0
    deadline = time.monotonic() + 10
    while show(h, "alice").get("ActiveState") != "active" and time.monotonic() < deadline:
        time.sleep(0.1)
    return "ports.listening", "alice", "fail", 4, False, None


def break_stopped_by_hand(h) -> Case:
    assert h.systemd.run("stop", "abssctl-bob.service").returncode == 0
    return "systemd.inactive", "bob", "warn", 0, False, None


def break_key_mismatch(h) -> Case:
    """Another key in place of alice's: nginx -t fails too; not doctor's to repair."""
    _cert, key = openssl_pair(h, "alice", 30, h.root / "other-pair")
    (h.paths["tls_dir"] / "alice" / "privkey.pem").write_bytes(key.read_bytes())
    return "tls.pair", "alice", "fail", 4, False, None


def break_cert_san(h) -> Case:
    """A valid pair for another name written in place (as a careless renewal would)."""
    pair_in_place(h, "alice", "carol", 30, h.root / "carol-pair")
    reload_nginx(h)
    return "tls.san", "alice", "warn", 0, False, None


def break_key_mode(h) -> Case:
    key = h.paths["tls_dir"] / "bob" / "privkey.pem"
    os.chmod(key, 0o644)

    def check(h) -> None:
        assert key.stat().st_mode & 0o777 == 0o600
    return "tls.key-mode", "bob", "warn", 3, False, check          # 3: fs.mode fails it too, and fixes it


def break_trusted_proxies(h) -> Case:
    edit_config_json(h, "bob", trustedProxies=["10.0.0.0/8"])
    return "app.proxies", "bob", "warn", 0, False, None


def break_app_version(h) -> Case:
    """The package bob runs reports another version than the registry's (its /info reads package.json)."""
    pkg = h.paths["install_root"] / only_version(h) / "node_modules" / "@actual-app" / "sync-server" / "package.json"
    doc = json.loads(pkg.read_text())
    pkg.write_text(json.dumps({**doc, "version": "0.0.1"}))
    return "app.version", "bob", "fail", 4, False, None


def break_disk_full(h) -> Case:
    """backup_root on a 1 MiB tmpfs filled to the brim."""
    mnt = h.root / "full-disk"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.strip()}")
    h.mounts.append(mnt)
    try:
        with open(mnt / "filler", "wb") as f:
            f.write(b"\0" * (2 << 20))
    except OSError:
        pass
    h.configure("paths", backup_root=str(mnt))
    return "disk.free", "backup_root", "fail", 3, False, None


def break_no_backup(h) -> Case:
    h.ok("instance", "create", "carol", "--domain", domain("carol"), "--tls", "self-signed")
    return "backups.age", "carol", "warn", 0, False, None


def break_corrupt_backup(h) -> Case:
    entry = next(b for b in json.loads((h.paths["backup_root"] / "backups.json").read_text())["backups"].values() if b["instance"] == "alice")
    archive = h.paths["backup_root"] / entry["archive"]
    raw = bytearray(archive.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    archive.write_bytes(bytes(raw))
    assert h.run("--json", "backup", "verify", entry["id"]).rc == 3
    return "backups.verify", "alice", "fail", 3, False, None


def break_missing_archive(h) -> Case:
    entry = next(b for b in json.loads((h.paths["backup_root"] / "backups.json").read_text())["backups"].values() if b["instance"] == "bob")
    (h.paths["backup_root"] / entry["archive"]).unlink()
    return "backups.index", None, "warn", 0, False, None


def break_foreign_listener(h) -> Case:
    h.ok("instance", "stop", "alice")
    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    squatter.bind(("127.0.0.1", int(instance(h, "alice")["port"])))
    squatter.listen()
    h.squatter = squatter                        # closed by the test
    return "ports.foreign", "alice", "fail", 4, False, None


def break_nginx_config(h) -> Case:
    """Someone else's site that nginx -t rejects: reported, never touched by --fix."""
    foreign = h.nginx.sites_enabled / "zz-someone-else.conf"
    foreign.write_text("server {\n    listen 127.0.0.1:1;\n    no_such_directive on;\n}\n")
    return "nginx.test", None, "fail", 4, False, None


def break_node_broken(h) -> Case:
    """A node that is there but does not run (a broken install)."""
    node = h.root / "bin-broken" / "node"
    node.parent.mkdir(exist_ok=True)
    node.write_text("#!/bin/sh\necho 'node: error while loading shared libraries' >&2\nexit 127\n")
    node.chmod(0o755)
    h.configure("commands", node=[str(node)])
    return "env.node", None, "fail", 3, False, None


def break_hung_server(h) -> Case:
    """A server whose process is alive, its unit active, its port open, but that answers nothing."""
    pid = int(show(h, "alice")["MainPID"])
    assert pid > 0
    os.kill(pid, signal.SIGSTOP)
    h.stopped.append(pid)                            # continued by the test
    return "app.health", "alice", "fail", 4, False, None


def break_served_cert(h) -> Case:
    """A renewal written in place (as on TurnKey) while nginx keeps serving the old certificate."""
    d = pair_in_place(h, "bob", "bob", 90, h.root / "renewed")

    def check(h) -> None:
        assert_served(h, "bob", (d / "fullchain.pem").read_text())
    return "tls.served", "bob", "warn", 0, True, check


def assert_served(h, name: str, pem: str) -> None:
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    want = ssl.PEM_cert_to_DER_cert(pem)
    deadline = time.monotonic() + 10
    while True:
        with socket.create_connection(("127.0.0.1", h.nginx.https_port), timeout=5) as raw, \
                context.wrap_socket(raw, server_hostname=domain(name)) as tls:
            got = tls.getpeercert(binary_form=True)
        if got == want or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert got == want


CASES = {
    "tls-dir-mode": break_tls_dir_mode,
    "instance-tls-dir-mode": break_instance_tls_dir_mode,
    "instance-dir-mode": break_instance_dir_mode,
    "config-json-mode": break_config_json_mode,
    "unit-drift": break_unit_drift,
    "unit-deleted": break_unit_deleted,
    "vhost-drift": break_vhost_drift,
    "enabled-link-deleted": break_enabled_link,
    "unit-disabled": break_disabled_unit,
    "main-pid-killed": break_killed_instance,
    "port-reservation-missing": break_port_reservation,
    "stale-lock-note": break_stale_lock,
    "dead-journal": break_dead_journal,
    "leftover-tmp": break_leftover_tmp,
    "leftover-tmp-in-backup-dir": break_leftover_in_backup_dir,
    "served-cert-stale": break_served_cert,
    "config-json-missing": break_missing_config,
    "config-json-drift": break_config_json_drift,
    # not fixable by doctor (or only through another probe's repair)
    "hostname-0.0.0.0": break_hostname,
    "cert-expires-tomorrow": break_cert_expiring,
    "body-size-1m-include": break_body_size_include,
    "coop-in-vhost": break_coop_in_vhost,
    "coop-in-include": break_coop_in_include,
    "coop-doubled-live": break_coop_doubled_live,
    "coop-hidden-live": break_coop_hidden_live,
    "foreign-listener": break_foreign_listener,
    "zstd-missing": break_zstd_missing,
    "node-abi": break_node_abi,
    "engines": break_engines,
    "service-user-missing": break_service_user,
    "unknown-config-key": break_unknown_key,
    "template-broken": break_template,
    "registry-half-written": break_registry_json,
    "current-link-wrong": break_current_link,
    "data-aside": break_data_aside,
    "data-in-package-tree": break_data_location,
    "server-name-twice": break_server_name,
    "duplicate-port": break_duplicate_port,
    "port-out-of-range": break_port_range,
    "not-listening": break_not_listening,
    "stopped-by-hand": break_stopped_by_hand,
    "key-mismatch": break_key_mismatch,
    "cert-san": break_cert_san,
    "key-mode": break_key_mode,
    "trusted-proxies": break_trusted_proxies,
    "app-version": break_app_version,
    "disk-full": break_disk_full,
    "no-backup": break_no_backup,
    "corrupt-backup": break_corrupt_backup,
    "missing-archive": break_missing_archive,
    "nginx-t-fails": break_nginx_config,
    "node-broken": break_node_broken,
    "server-hung": break_hung_server,
}

# Not doctor's to fix, but a drift repair re-renders the file that carried it (the vhost, or the
# config.json, which is then read by a restart), so it goes.
CURED_BY_DRIFT_FIX = {"coop-in-vhost", "hostname-0.0.0.0", "data-in-package-tree", "key-mode",
                      "trusted-proxies"}



@pytest.mark.parametrize("case", list(CASES))
def test_break_and_fix(two, case: str) -> None:
    h = two
    h.squatter, h.mounts, h.stopped = None, [], []
    try:
        probe_id, target, status, code, fixable, check = CASES[case](h)
        got = doctor(h)
        mine = findings(got.doc, probe_id, target)
        assert [f["status"] for f in mine] == [status], (mine, not_ok(got.doc))
        assert got.rc == code and got.doc["summary"]["exit_code"] == code, not_ok(got.doc)
        assert got.doc["ok"] is (code == 0)
        if code:
            assert got.doc["error"]["kind"] == ("HostError" if code == 3 else "ProviderError")
        if fixable is not None:
            assert mine[0]["fixable"] is fixable, mine
        if fixable or case in CURED_BY_DRIFT_FIX:
            fixed = doctor(h, "--fix", "--yes")
            if case != "dead-journal":          # see test_fix_that_recovers_a_journal_reports_changed
                assert fixed.doc["changed"] is True, fixed
            again, bad = eventually_clean_for(h, probe_id, target)
            assert bad == [], bad
            assert_clean(again)
            if check:
                check(h)
        else:
            before = not_ok(got.doc)
            doctor(h, "--fix", "--yes")
            after = doctor(h)
            assert [f["status"] for f in findings(after.doc, probe_id, target)] == [status], \
                "doctor --fix must leave what it cannot safely repair (and keep reporting it)"
            assert after.rc == code, (before, not_ok(after.doc))
    finally:
        if h.squatter:
            h.squatter.close()
        for pid in h.stopped:
            os.kill(pid, signal.SIGCONT)
        for mnt in h.mounts:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)


def test_fix_that_recovers_a_journal_reports_changed(two) -> None:
    h = two
    break_dead_journal(h)
    fixed = doctor(h, "--fix", "--yes")
    assert fixed.rc == 0 and fixed.doc["changed"] is True, fixed


def test_fix_without_yes_needs_confirmation_and_changes_nothing(two) -> None:
    h = two
    os.chmod(h.paths["tls_dir"], 0o755)
    got = h.run("--json", "doctor", "--fix")
    assert got.rc == 2 and got.doc["error"]["kind"] == "NeedsConfirmation", got
    assert h.paths["tls_dir"].stat().st_mode & 0o777 == 0o755
    dry = h.run("--json", "--dry-run", "doctor", "--fix")
    assert dry.rc == 0 and dry.doc["dry_run"] is True and any(s["step"] == "fs.mode" for s in dry.doc["plan"]), dry
    assert h.paths["tls_dir"].stat().st_mode & 0o777 == 0o755


def test_data_files_owned_by_root_are_given_back(two) -> None:
    """The rig's service user is root, for whom the probe is moot; switch to the real unprivileged
    `nobody`/`nogroup` (the running servers keep their root processes; only fs is probed)."""
    import grp
    import pwd
    h = two
    try:
        nobody, nogroup = pwd.getpwnam("nobody").pw_uid, grp.getgrnam("nogroup").gr_gid
    except KeyError:
        pytest.skip("no nobody/nogroup account on this host")
    h.configure("service", user="nobody", group="nogroup")
    got = doctor(h, "--only", "fs")
    assert got.rc == 3
    assert {f["target"] for f in findings(got.doc, "fs.data-owner") if f["status"] == "fail"} == set(NAMES)
    fixed = doctor(h, "--only", "fs", "--fix", "--yes")
    assert fixed.rc == 0, not_ok(fixed.doc)
    for name in NAMES:
        for dirpath, dirs, files in os.walk(h.paths["instance_root"] / name / "data"):
            for n in dirs + files:
                assert os.lstat(os.path.join(dirpath, n)).st_uid == nobody, os.path.join(dirpath, n)
    # now plant one file as root
    planted = h.paths["instance_root"] / "alice" / "data" / "user-files" / "restored-by-hand.blob"
    planted.write_bytes(b"x")
    os.chown(planted, 0, 0)
    got = doctor(h, "--only", "fs")
    mine = findings(got.doc, "fs.data-owner", "alice")
    assert got.rc == 3 and [f["status"] for f in mine] == ["fail"] and mine[0]["fixable"] is True, not_ok(got.doc)
    assert "1 file" in mine[0]["message"]
    doctor(h, "--only", "fs", "--fix", "--yes")
    assert (planted.stat().st_uid, planted.stat().st_gid) == (nobody, nogroup)
    assert_clean(doctor(h, "--only", "fs"))


def test_a_1m_http_level_limit_is_overridden_by_the_vhost(two) -> None:
    """No false positive: http-level 1m in an included file, but the vhost's own 50M wins."""
    h = two
    (h.nginx.sites_enabled / "00-limits.conf").write_text("client_max_body_size 1m;\n")
    reload_nginx(h)
    got = doctor(h)
    assert [f for f in not_ok(got.doc) if f[1] == "nginx.body-size"] == []
    assert https_request(h, "alice", "POST", "/", b"x" * (2 << 20))[0] != 413


def test_a_configured_body_size_below_the_upload_limit_fails(two) -> None:
    h = two
    h.configure("nginx", client_max_body_size="1m")
    doctor(h, "--fix", "--yes")                            # re-renders the vhosts with 1m
    assert "client_max_body_size 1m;" in (h.nginx.sites_available / "abssctl-alice.conf").read_text()
    got = doctor(h)
    assert [f["status"] for f in findings(got.doc, "nginx.body-size", "alice")] == ["fail"], not_ok(got.doc)


def test_only_tls_includes_the_served_certificate_probe(two) -> None:
    h = two
    break_served_cert(h)
    got = doctor(h, "--only", "tls")
    assert [f["status"] for f in findings(got.doc, "tls.served", "bob")] == ["warn"], got.doc["probes"]


# -- filters ---------------------------------------------------------------------------

def test_only_and_exclude_filter_categories(two) -> None:
    h = two
    only = doctor(h, "--only", "nginx,tls")
    assert only.rc == 0 and {p["category"] for p in only.doc["probes"]} == {"nginx", "tls"}
    one = doctor(h, "--only", "backups")
    assert {p["category"] for p in one.doc["probes"]} == {"backups"}
    excl = doctor(h, "--exclude", "app,tls,env")
    cats = {p["category"] for p in excl.doc["probes"]}
    assert cats and not cats & {"app", "tls", "env"} and "nginx" in cats
    # a failure outside the chosen categories does not count
    os.chmod(h.paths["tls_dir"], 0o777)
    assert doctor(h, "--only", "nginx").rc == 0
    assert doctor(h, "--exclude", "fs").rc == 0
    assert doctor(h, "--only", "fs").rc == 3
    # --fix honours the filter: nothing outside --only is repaired
    doctor(h, "--only", "nginx", "--fix", "--yes")
    assert h.paths["tls_dir"].stat().st_mode & 0o777 == 0o777


@pytest.mark.parametrize("argv", [("--only", "bogus"), ("--exclude", "nginx,bogus"),
                                  ("--only", "nginx", "--exclude", "tls"),
                                  ("--only", "nginx", "--exclude", "nginx")])
def test_bad_filters_exit_2(abssctl_host, argv) -> None:
    got = abssctl_host.run("--json", "doctor", *argv)
    assert got.rc == 2 and got.doc["ok"] is False and got.doc["error"]["kind"] == "UsageError", got
    text = abssctl_host.run("doctor", *argv)
    assert text.rc == 2 and "Traceback" not in text.err


def test_a_config_that_does_not_parse_is_bad_input(two) -> None:
    """config.file's failing side: doctor cannot probe with a config it cannot read, so it exits 2."""
    h = two
    h.config.write_text(h.config.read_text() + "\n[ports\nbase = 1\n")
    got = h.run("--json", "doctor")
    assert got.rc == 2 and got.doc["error"]["kind"] in ("UsageError", "ConfigError"), got
    assert str(h.config) in got.doc["error"]["message"] + json.dumps(got.doc["error"].get("details")), got


# -- a healthy host, as quickstart leaves it ---------------------------------------------------

def test_one_healthy_instance_warns_only_about_backups_and_self_signed(abssctl_host) -> None:
    """instance create with the default TLS (auto: no lineage, no system pair here, so self-signed)
    and no backup yet: the only warnings doctor may give are the backup age and the self-signed
    certificate; nginx.live sees one COOP and one COEP on / through the real nginx."""
    h = abssctl_host
    h.ok("instance", "create", "alice", "--domain", domain("alice"))
    assert instance(h, "alice")["tls"]["source"] == "self-signed"
    got = doctor(h)
    assert got.rc == 0 and got.doc["summary"]["fail"] == 0, not_ok(got.doc)
    others = [p for p in not_ok(got.doc) if p[0] == "warn" and not p[1].startswith("backups.")
              and "self-signed" not in p[3]]
    assert others == [], others
    assert [(p["status"], p["data"]) for p in findings(got.doc, "nginx.live", "alice")] == \
        [("ok", {"cross-origin-opener-policy": 1, "cross-origin-embedder-policy": 1})]
    root = https_request(h, "alice", path="/")[1]
    assert root.get("cross-origin-opener-policy") == ["same-origin"], root
    assert "cross-origin-opener-policy" not in https_request(h, "alice", path="/health")[1]
