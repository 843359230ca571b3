"""The product's promise, on a real Debian 12 with systemd as PID 1 (DESIGN.md §11.7): as root, the
README's run command, read from README.md and run verbatim, ends at a working HTTPS instance; and
that host then lives a family server's life: doctor is clean, a budget survives a reboot, a second
instance, a backup and its restore, a version change, no failed unit, logs from the real journal.

One guest for the module (``readme_host``); the tests run in file order and each needs the steps
before it (``HostTier.after``), so the first broken promise is the one reported, and the later tests
fail at once naming it. Traffic goes to 127.0.0.1:443 only (the guest's nginx, on this machine's
network), with SNI and Host = the instance's domain.

The second version (step 7): quickstart installs ``latest`` (26.9.0 today); the other current one is
26.8.1. A set-version to an older version is refused when the newer one recorded migrations the older
lacks. Today their migration sets are equal (the same eight titles, 1694360000000-create-folders ...
1763873600000-backfill-files-owner, compared in the packed tarballs' build/chunks/migrations-*.js),
so `two` could go down; but the next ``latest`` may add one, and the test would start failing for a
reason that is no bug. So it goes up, which is allowed whatever the migrations: `two` is created on
26.8.1 and set-version moves it to ``current``.
"""
from __future__ import annotations

import json
import os
import time
import uuid

from rig.acme import listener_cert_argv, pebble_config, served_steadily
from rig.e2e_host import bootstrap_and_login, download_user_file, login, upload_user_file, user_files
from rig.https_client import HttpReply

OTHER_VERSION = "26.8.1"
SECOND = ("two", "two.example.org")
PASSWORD = "host-tier-password-1"
README_TIMEOUT = 1800.0
UP_AFTER_REBOOT = 180.0


def _health(h, domain: str, seconds: float = 60.0) -> None:
    got = h.client.health(domain, seconds)
    assert isinstance(got, HttpReply) and got.status == 200 and got.json() == {"status": "UP"}, (
        f"/health of {domain} through the guest's nginx (127.0.0.1:443): "
        f"{got if isinstance(got, str) else got.describe()}")


def _covers(sans: list[str], domain: str) -> bool:
    return domain in sans or any(s.startswith("*.") and domain.split(".", 1)[-1] == s[2:] for s in sans)


def _sans_eventually(h, domain: str, seconds: float = 20.0) -> list[str]:
    """nginx -s reload returns before the new workers serve: poll (bounded) for DOMAIN's certificate."""
    deadline = time.monotonic() + seconds
    while True:
        sans = h.client.served_sans(domain)
        if _covers(sans, domain) or time.monotonic() > deadline:
            return sans
        time.sleep(0.5)


def _file_intact(h, domain: str, token: str) -> None:
    budget = h.memo["budget"]
    assert budget["id"] in user_files(h.client, domain, token), "the uploaded budget is not listed"
    got = download_user_file(h.client, domain, token, budget["id"])
    assert got.status == 200 and got.body == budget["body"], (
        f"download of {budget['id']}: HTTP {got.status}, {len(got.body)} bytes, "
        f"equal: {got.body == budget['body']} (want {len(budget['body'])} bytes)")


def test_readme_run_command_brings_up_https(readme_host) -> None:
    h = readme_host
    with h.phase("README run command (verbatim, bash -c in /root/abssctl)"):
        res = h.guest.run(h.cmd.line, timeout=README_TIMEOUT, cwd="/root/abssctl")
    h.note("README command", f"rc={res.rc} in {res.seconds:.0f} s: {h.cmd.line}")
    assert res.rc == 0, f"the README's run command failed on a fresh Debian 12 host:\n{res.describe()}"
    apt = [line.strip() for line in res.stderr.splitlines() if "apt-get install" in line]
    h.note("apt by quickstart", apt[0] if apt else "(no apt-get install line on stderr)")
    listed = h.json("version", "list")
    rows = [r for r in listed["versions"] if r.get("current")]
    h.note("version chosen", str(listed.get("current")))
    h.note("runtime", " | ".join(str(r.get("runtime", f"(no runtime field) {r}")) for r in rows) or str(listed))
    with h.phase(f"/health of {h.cmd.domain} over HTTPS"):
        _health(h, h.cmd.domain)
    sans = h.client.served_sans(h.cmd.domain)
    assert _covers(sans, h.cmd.domain), f"the served certificate's SAN {sans} does not cover {h.cmd.domain}"
    h.passed.add("readme")


def test_coop_and_coep_once_on_root(readme_host) -> None:
    h = readme_host
    h.after("readme")
    root = h.client.https(h.cmd.domain, "/")
    assert root.status == 200 and b"<html" in root.body.lower(), root.describe()
    for header in ("cross-origin-opener-policy", "cross-origin-embedder-policy"):
        assert len(root.headers.get(header, [])) == 1, f"{header} x{len(root.headers.get(header, []))}: {root.headers}"
    h.passed.add("headers")


def test_doctor_is_clean_but_for_backup_age_and_self_signed(readme_host) -> None:
    h = readme_host
    h.after("readme")
    with h.phase("doctor"):
        human = h.abssctl("doctor", timeout=300)
        res = h.abssctl("--json", "doctor", timeout=300)
    lines = [line for line in human.stdout.splitlines() if line.strip()]
    h.note("doctor", lines[-1] if lines else f"(no output; rc={human.rc})")
    assert human.rc == 0, human.describe()
    assert res.rc == 0, res.describe()
    doc = json.loads(res.stdout)
    probes = doc["probes"]
    assert probes and doc["summary"]["fail"] == 0, doc["summary"]

    def allowed(p: dict) -> bool:
        text = f"{p.get('message')} {p.get('hint')}".lower()
        return p["id"] == "backups.age" or (p["category"] == "tls" and "self-signed" in text)
    h.note("doctor warnings", ", ".join(f"{p['id']} {p['target'] or ''}".strip() for p in probes
                                        if p["status"] == "warn") or "none")
    unexpected = [p for p in probes if p["status"] not in ("ok", "skip") and not allowed(p)]
    assert not unexpected, "doctor on a fresh quickstart host warns or fails about:\n" + "\n".join(
        f"{p['status']} {p['id']} {p['target']}: {p['message']} (hint: {p['hint']})" for p in unexpected)
    h.passed.add("doctor")


def test_budget_file_survives_a_reboot(readme_host) -> None:
    h = readme_host
    h.after("readme")
    domain = h.cmd.domain
    token = bootstrap_and_login(h.client, domain, PASSWORD)
    h.memo["budget"] = {"id": str(uuid.uuid4()), "body": os.urandom(256 * 1024)}
    upload_user_file(h.client, domain, token, h.memo["budget"]["id"], "Host tier budget", h.memo["budget"]["body"])
    _file_intact(h, domain, token)
    with h.phase("reboot (poweroff, boot the same rootfs, system running)"):
        h.guest.reboot()
    with h.phase(f"{h.cmd.name} UP again after the reboot"):
        _health(h, domain, UP_AFTER_REBOOT)
    _file_intact(h, domain, login(h.client, domain, PASSWORD))
    h.passed.add("reboot")


def test_second_instance_is_served(readme_host) -> None:
    h = readme_host
    h.after("readme")
    name, domain = SECOND
    with h.phase(f"version install {OTHER_VERSION}"):
        h.json("version", "install", OTHER_VERSION, timeout=1800)
    with h.phase(f"instance create {name} --version {OTHER_VERSION}"):
        h.json("instance", "create", name, "--domain", domain, "--version", OTHER_VERSION)
    sans = _sans_eventually(h, domain)
    assert _covers(sans, domain), f"nginx serves {domain} with a certificate for {sans}"
    _health(h, domain)
    info = h.client.https(domain, "/info")
    assert info.status == 200 and info.json()["build"]["version"] == OTHER_VERSION, info.describe()
    _health(h, h.cmd.domain)
    h.passed.add("second")


def test_backup_and_restore(readme_host) -> None:
    h = readme_host
    h.after("readme", "reboot")
    with h.phase(f"backup create {h.cmd.name}"):
        backup = h.json("backup", "create", h.cmd.name)["backup"]
    assert backup["instance"] == h.cmd.name, backup
    with h.phase(f"backup restore {backup['id']}"):
        h.json("backup", "restore", backup["id"], "--yes")
    _health(h, h.cmd.domain)
    _file_intact(h, h.cmd.domain, login(h.client, h.cmd.domain, PASSWORD))
    h.passed.add("backup")


def test_set_version_up_to_current_passes_the_gate(readme_host) -> None:
    h = readme_host
    h.after("second")
    name, domain = SECOND
    current = h.json("version", "list")["current"]
    assert current and current != OTHER_VERSION, f"current is {current}; the test needs another one"
    with h.phase(f"instance set-version {name} current ({OTHER_VERSION} -> {current})"):
        h.json("instance", "set-version", name, "current", "--yes")
    _health(h, domain)
    info = h.client.https(domain, "/info")
    assert info.status == 200 and info.json()["build"]["version"] == current, info.describe()
    h.passed.add("set-version")


def test_no_failed_units(readme_host) -> None:
    h = readme_host
    h.after("readme")
    res = h.guest.ok(["systemctl", "--failed", "--no-legend", "--plain"], timeout=60)
    assert res.stdout.strip() == "", f"failed units:\n{res.stdout}"
    state = h.guest.run(["systemctl", "is-system-running"], timeout=60)
    assert state.stdout.strip() == "running", state.describe()


def test_logs_read_the_real_journal(readme_host) -> None:
    h = readme_host
    h.after("readme")
    res = h.ok("instance", "logs", h.cmd.name, "-n", "20", timeout=60)
    assert res.stdout.strip(), f"instance logs printed nothing:\n{res.describe()}"
    if "Listening on" not in res.stdout:
        more = h.abssctl("instance", "logs", h.cmd.name, "-n", "300", timeout=60)
        raise AssertionError(f"the last 20 lines lack the server's 'Listening on' startup line:\n{res.stdout}\n"
                             f"--- last 300 lines ---\n{more.stdout}")


# -- tls acme against pebble on the test host (issue 17) ---------------------------------------------
#
# Debian's certbot and pebble in the guest; pebble-challtestsrv answers 127.0.0.1 for every name, so
# pebble validates HTTP-01 against the guest's nginx on port 80 (the guest shares this machine's
# network: the ports are picked free here). Both servers are transient systemd units, stopped at the
# end. The guest's config.toml points [commands] certbot and [tls] acme_server at pebble for the test
# and is restored afterwards; `home` stays on its (pebble) letsencrypt lineage, served.

PEBBLE_DIR = "/root/abssctl-test-pebble"
PEBBLE_UNITS = ("abssctl-test-pebble", "abssctl-test-challtestsrv")
PEBBLE_ENV = ("PEBBLE_VA_NOSLEEP=1", "PEBBLE_WFE_NONCEREJECT=0", "PEBBLE_AUTHZREUSE=0")
CONFIG = "/etc/abssctl/config.toml"
CONFIG_SAVED = "/etc/abssctl/config.toml.before-acme-test"
ACME_EMAIL = "admin@example.org"
SERVED_WITHIN = 30.0
# key = value (VALUE already TOML) as the first line of [SECTION], dropping that key's other lines there
SET_TOML_KEY = r"""
import re, sys
path, section, key, value = sys.argv[1:]
out, current, done = [], None, False
for line in open(path, encoding="utf-8").read().splitlines():
    text = line.strip()
    if text.startswith("["):
        current = text[1:-1].strip()
        out.append(line)
        if current == section:
            out.append(f"{key} = {value}")
            done = True
        continue
    if current == section and re.match(rf"{re.escape(key)}\s*=", text):
        continue
    out.append(line)
if not done:
    out += ["", f"[{section}]", f"{key} = {value}"]
open(path, "w", encoding="utf-8").write("\n".join(out) + "\n")
"""


def _pem_der(pem: str) -> bytes:
    import ssl
    first = pem.split("-----END CERTIFICATE-----")[0] + "-----END CERTIFICATE-----\n"
    return ssl.PEM_cert_to_DER_cert(first[first.index("-----BEGIN CERTIFICATE-----"):])


def _served_der(h, domain: str) -> bytes:
    try:
        return h.client.served_cert(domain)
    except OSError:
        return b""


def _wait_served(h, domain: str, want: bytes, seconds: float = SERVED_WITHIN) -> float:
    """Seconds until the guest's nginx serves WANT for DOMAIN 5 times in a row; bounded."""
    return served_steadily(lambda: _served_der(h, domain), domain, want, seconds)


def _start_pebble(h, ports: dict[str, int]) -> str:
    """Listener certificate, pebble.json, the two transient units; returns the listener cert's PEM
    once pebble's directory answers (bounded)."""
    import ssl
    import urllib.request
    d = PEBBLE_DIR
    h.guest.ok(["mkdir", "-p", d], timeout=30)
    h.guest.ok(listener_cert_argv(f"{d}/listener.key", f"{d}/listener.pem"), timeout=60)
    config = pebble_config(port=ports["acme"], mgmt_port=ports["mgmt"], http_port=80, tls_port=ports["tls"],
                           cert=f"{d}/listener.pem", key=f"{d}/listener.key")
    h.guest.ok(["python3", "-c", "import sys; open(sys.argv[1], 'w').write(sys.argv[2])", f"{d}/pebble.json",
                json.dumps(config)], timeout=30)
    env = [f"--property=Environment={kv}" for kv in PEBBLE_ENV]
    h.guest.ok(["systemd-run", f"--unit={PEBBLE_UNITS[1]}", "--collect", *env, "--",
                "/usr/bin/pebble-challtestsrv", "-defaultIPv4", "127.0.0.1", "-defaultIPv6=",
                "-dns01", f"127.0.0.1:{ports['dns']}", "-http01=", "-https01=", "-tlsalpn01=",
                "-management", f"127.0.0.1:{ports['dns_mgmt']}"], timeout=60)
    h.guest.ok(["systemd-run", f"--unit={PEBBLE_UNITS[0]}", "--collect", f"--property=WorkingDirectory={d}", *env,
                "--", "/usr/bin/pebble", "-config", f"{d}/pebble.json", "-dnsserver", f"127.0.0.1:{ports['dns']}"],
                timeout=60)
    listener = h.guest.ok(["cat", f"{d}/listener.pem"], timeout=30).stdout
    context = ssl.create_default_context(cadata=listener)
    deadline, last = time.monotonic() + 30.0, ""
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"https://127.0.0.1:{ports['acme']}/dir", context=context, timeout=5) as r:
                json.loads(r.read())
            return listener
        except (OSError, ValueError) as exc:
            last = str(exc)
            time.sleep(0.2)
    status = h.guest.run(["systemctl", "status", "--no-pager", *PEBBLE_UNITS], timeout=30)
    journal = h.guest.run(["journalctl", "--no-pager", "-n", "60", *[f"--unit={u}" for u in PEBBLE_UNITS]],
                          timeout=30)
    raise AssertionError(f"pebble's directory did not answer within 30 s ({last}):\n{status.stdout}\n{journal.stdout}")


def _pebble_issuers(listener: str, mgmt_port: int) -> tuple[str, str]:
    """pebble's issuing intermediate and root, from its management port."""
    import ssl
    import urllib.request
    context = ssl.create_default_context(cadata=listener)
    got = []
    for path in ("intermediates/0", "roots/0"):
        with urllib.request.urlopen(f"https://127.0.0.1:{mgmt_port}/{path}", context=context, timeout=5) as r:
            got.append(r.read().decode())
    return got[0], got[1]


def _verify_chain(leaf: bytes, inter: str, root: str, domain: str, tmp_path) -> None:
    import ssl
    import subprocess
    (tmp_path / "root.pem").write_text(root)
    (tmp_path / "inter.pem").write_text(inter)
    (tmp_path / "leaf.pem").write_text(ssl.DER_cert_to_PEM_cert(leaf))
    done = subprocess.run(["openssl", "verify", "-CAfile", str(tmp_path / "root.pem"), "-untrusted",
                           str(tmp_path / "inter.pem"), "-verify_hostname", domain, str(tmp_path / "leaf.pem")],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and ": OK" in done.stdout, (
        f"the served certificate of {domain} does not chain to pebble's root: {done.stdout}{done.stderr}")
    issuer = subprocess.run(["openssl", "x509", "-noout", "-issuer", "-in", str(tmp_path / "leaf.pem")],
                            capture_output=True, text=True, timeout=30).stdout
    assert "Pebble" in issuer, issuer


def test_tls_acme_against_pebble_and_certbot_timer(readme_host, tmp_path) -> None:
    from rig.nginx_sandbox import free_port
    h = readme_host
    h.after("readme")
    name, domain = h.cmd.name, h.cmd.domain
    with h.phase("apt-get install certbot pebble"):
        h.guest.ok("DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends certbot pebble openssl",
                   timeout=900)
    # Debian's certbot package is the renewal: its timer, enabled and started by the package under systemd
    for verb, want in (("is-enabled", "enabled"), ("is-active", "active")):
        got = h.guest.run(["systemctl", verb, "certbot.timer"], timeout=30)
        assert got.stdout.strip() == want, f"certbot.timer after apt-get install certbot:\n{got.describe()}"
    ports: dict[str, int] = {}
    for key in ("acme", "mgmt", "dns", "dns_mgmt", "tls"):
        port = free_port()
        while port in ports.values():
            port = free_port()
        ports[key] = port
    shown = h.json("config", "show")
    assert shown["path"] == CONFIG and shown["exists"] is True, shown
    letsencrypt = shown["config"]["paths"]["letsencrypt_dir"]
    h.guest.ok(["cp", "-p", CONFIG, CONFIG_SAVED], timeout=30)
    try:
        with h.phase("start pebble + pebble-challtestsrv (transient units)"):
            listener = _start_pebble(h, ports)
        bundle = f"{PEBBLE_DIR}/listener.pem"
        server = f"https://127.0.0.1:{ports['acme']}/dir"
        for section, key, value in (("commands", "certbot", json.dumps(["env", f"REQUESTS_CA_BUNDLE={bundle}",
                                                                        "certbot"])),
                                    ("tls", "acme_server", json.dumps(server))):
            h.guest.ok(["python3", "-c", SET_TOML_KEY, CONFIG, section, key, value], timeout=30)
        h.ok("config", "check", timeout=60)
        shown = h.json("config", "show")["config"]
        assert shown["commands"]["certbot"][-1] == "certbot" and shown["tls"]["acme_server"] == server, shown
        before = _served_der(h, domain)

        with h.phase(f"tls acme {name} (certbot against pebble)"):
            res = h.abssctl("--json", "tls", "acme", name, "--email", ACME_EMAIL, timeout=600)
        assert res.rc == 0, res.describe()
        h.note("tls acme issue time", f"{res.seconds:.2f} s (abssctl tls acme {name}, certbot certonly "
                                      f"--webroot against pebble, nginx reload)")
        live = f"{letsencrypt}/live/{domain}"
        issued = _pem_der(h.guest.ok(["cat", f"{live}/fullchain.pem"], timeout=30).stdout)
        assert issued != before, "tls acme reported success but the lineage holds the certificate served before"
        _wait_served(h, domain, issued)
        inter, root = _pebble_issuers(listener, ports["mgmt"])
        _verify_chain(_served_der(h, domain), inter, root, domain, tmp_path)
        _health(h, domain)

        info = h.json("tls", "verify", name)["tls"]
        assert "Pebble" in str(info.get("issuer")) and info.get("not_after") and info.get("covers_domain") is True, info
        doctor = h.json("doctor", timeout=300)
        found = {(p["id"], p["target"]): p for p in doctor["probes"]}
        for key in (("tls.renewal-timer", None), ("tls.deploy-hook", name), ("tls.served", name)):
            assert key in found and found[key]["status"] == "ok", (key, found.get(key))
        conf = h.guest.ok(["cat", f"{letsencrypt}/renewal/{domain}.conf"], timeout=30).stdout
        hooks = [line for line in conf.splitlines() if line.startswith("renew_hook = ")]
        assert hooks and hooks[0].endswith("tls deploy-hook"), f"renewal conf of {domain}:\n{conf}"

        with h.phase("certbot renew --force-renewal -> new certificate served"):
            start = time.monotonic()
            renew = h.guest.run(["env", f"REQUESTS_CA_BUNDLE={bundle}", "certbot", "renew", "--force-renewal",
                                 "--no-random-sleep-on-renew", "--non-interactive", "--config-dir", letsencrypt],
                                timeout=600)
            assert renew.rc == 0, renew.describe()
            renewed = _pem_der(h.guest.ok(["cat", f"{live}/fullchain.pem"], timeout=30).stdout)
            assert renewed != issued, "certbot renew --force-renewal left the same certificate in live/"
            _wait_served(h, domain, renewed)
            renew_to_served = time.monotonic() - start
        h.note("renew-to-served time", f"{renew_to_served:.2f} s (certbot renew --force-renewal "
                                       f"{renew.seconds:.2f} s, its deploy hook reloads nginx)")
        _verify_chain(_served_der(h, domain), inter, root, domain, tmp_path)
        _health(h, domain)
        h.guest.ok(["nginx", "-t"], timeout=60)
    finally:
        h.guest.run(["systemctl", "stop", *PEBBLE_UNITS], timeout=60)
        h.guest.run(["systemctl", "reset-failed", *PEBBLE_UNITS], timeout=30)
        h.guest.run(["mv", "-f", CONFIG_SAVED, CONFIG], timeout=30)
    h.passed.add("acme")


# -- running unattended (DESIGN §11.4): real timers, the real notify unit, a real upgrade ----------

NOTIFIED = "/root/abssctl-notified.txt"


def _set_config(h, section: str, **values) -> None:
    """Set [section] keys in the guest's config with abssctl's own writer (what schedule enable uses)."""
    import base64

    import abssctl
    path = "/etc/abssctl/config.toml"
    text = h.guest.ok(["cat", path], timeout=30).stdout
    data = base64.b64encode(abssctl.set_config_keys(text, section, values).encode()).decode()
    h.guest.ok(f"echo {data} | base64 -d > {path}.new && mv {path}.new {path}", timeout=30)


def _start_oneshot(h, unit: str, timeout: float) -> tuple[int, str]:
    res = h.guest.run(["systemctl", "start", unit], timeout=timeout)
    result = h.guest.run(["systemctl", "show", unit, "-p", "Result", "--value"], timeout=30).stdout.strip()
    return res.rc, result


def test_scheduled_backups_run_from_the_real_timer_service(readme_host) -> None:
    h = readme_host
    h.after("backup", "set-version")
    _set_config(h, "notify", command=["/bin/sh", "-c", f'cat > {NOTIFIED}; echo "$ABSSCTL_UNIT $ABSSCTL_RESULT" '
                                      f'>> {NOTIFIED}'])
    with h.phase("backup schedule enable"):
        h.json("backup", "schedule", "enable", "--keep-last", "2", "--keep-daily", "0", "--keep-weekly", "0",
               "--keep-monthly", "0", "--restore-test", "weekly")
    timers = h.guest.ok(["systemctl", "list-timers", "--all", "--no-pager"], timeout=30).stdout
    assert "abssctl-backup.timer" in timers, timers
    runs = []
    for n in range(2):
        with h.phase(f"systemctl start abssctl-backup.service ({n + 1})"):
            rc, result = _start_oneshot(h, "abssctl-backup.service", 900)
        show = h.json("backup", "schedule", "show")["schedule"]
        assert rc == 0 and result == "success", (rc, result, show)
        last = show["last_run"]
        assert last["result"] == "ok" and len(last["backups"]) == 2 and sorted(last["verified"]) == sorted(
            last["backups"]), last
        runs.append(last)
        time.sleep(1.1)
    assert any(r["pruned"] for r in runs), runs
    # the first run took the weekly restore test of a real backup on its real server version
    tested = h.json("backup", "schedule", "show")["schedule"]["last_restore_test"]
    assert tested and tested["result"] == "ok" and tested["backup_id"] in runs[0]["backups"], tested
    backups = h.json("backup", "list")["backups"]
    for name in (h.cmd.name, SECOND[0]):
        scheduled = [b for b in backups if b["instance"] == name and "scheduled" in (b.get("labels") or [])]
        assert len(scheduled) <= 2, scheduled
    # and a restore test by hand
    with h.phase("backup verify --restore-test"):
        doc = h.json("backup", "verify", runs[-1]["backups"][0], "--restore-test", timeout=600)
    assert doc["restore_test"]["health"] == "UP", doc
    h.passed.add("schedule")


def test_a_failing_run_reaches_the_notify_command(readme_host) -> None:
    h = readme_host
    h.after("schedule")
    _set_config(h, "backups", copy_to="/nonexistent-disk")
    try:
        rc, result = _start_oneshot(h, "abssctl-backup.service", 900)
        assert rc != 0 and result == "exit-code", (rc, result)
        deadline = time.monotonic() + 60
        while h.guest.run(["test", "-s", NOTIFIED], timeout=30).rc != 0 and time.monotonic() < deadline:
            time.sleep(1)
        got = h.guest.run(["cat", NOTIFIED], timeout=30).stdout
        assert "abssctl-backup.service failed" in got and "/nonexistent-disk" in got, got
        assert got.strip().splitlines()[-1] == "abssctl-backup.service exit-code", got
    finally:
        _set_config(h, "backups", copy_to="")
        h.guest.run(["systemctl", "reset-failed", "abssctl-backup.service"], timeout=30)
    # the copy problem gone, the next run is ok again and doctor no longer fails the schedule (the
    # tests after this one need a doctor that exits 0)
    rc, result = _start_oneshot(h, "abssctl-backup.service", 900)
    assert rc == 0 and result == "success", (rc, result)
    probes = {p["id"]: p for p in h.json("doctor", "--only", "unattended", timeout=300)["probes"]}
    assert probes["unattended.schedule"]["status"] == "ok", probes["unattended.schedule"]
    h.passed.add("notify")


def test_auto_upgrade_moves_from_the_older_real_version_to_the_newer(readme_host) -> None:
    h = readme_host
    h.after("schedule")
    newer = h.json("version", "list")["current"]
    assert newer != OTHER_VERSION
    # Staged without building a third version: current goes back to the older one (their migration
    # sets are equal today, see the module docstring), then the upgrade service brings it forward.
    with h.phase(f"version switch {OTHER_VERSION} (staging)"):
        h.json("version", "switch", OTHER_VERSION, "--yes", timeout=900)
    with h.phase("version auto-upgrade enable"):
        h.json("version", "auto-upgrade", "enable", "--to", "minor")
    timers = h.guest.ok(["systemctl", "list-timers", "--all", "--no-pager"], timeout=30).stdout
    assert "abssctl-upgrade.timer" in timers and "abssctl-backup.timer" in timers, timers
    with h.phase("systemctl start abssctl-upgrade.service"):
        rc, result = _start_oneshot(h, "abssctl-upgrade.service", 2400)
    show = h.json("version", "auto-upgrade", "show")["auto_upgrade"]
    assert rc == 0 and result == "success", (rc, result, show)
    assert show["last_run"]["result"] == "upgraded" and show["blocked"] == {}, show
    now = h.json("version", "list")["current"]
    assert now != OTHER_VERSION and now == show["last_run"]["target"], (now, show)
    _health(h, h.cmd.domain)
    _health(h, SECOND[1])
    info = h.client.https(h.cmd.domain, "/info")
    assert info.status == 200 and info.json()["build"]["version"] == now, info.describe()
    h.passed.add("auto-upgrade")


# -- DESIGN §11.5: one instance cannot read another; the hardened unit on the real server -----------

BIG = 30 * 1024 * 1024           # the upload the hardened server must take (30 MB)
EXPOSURE_MAX = 2.5
SANDBOX_KEYS = ("User", "Group", "UMask", "NoNewPrivileges", "CapabilityBoundingSet", "AmbientCapabilities",
                "ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "PrivateMounts", "DevicePolicy",
                "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups",
                "ProtectClock", "ProtectHostname", "ProtectProc", "ProcSubset", "KeyringMode", "RemoveIPC",
                "RestrictAddressFamilies", "RestrictNamespaces", "RestrictRealtime", "RestrictSUIDSGID",
                "LockPersonality", "SystemCallArchitectures", "SystemCallFilter", "SystemCallErrorNumber",
                "IPAddressDeny", "IPAddressAllow", "ReadWritePaths")


def _names(h) -> list[str]:
    return [h.cmd.name, SECOND[0]]


def _domain(h, name: str) -> str:
    return h.cmd.domain if name == h.cmd.name else SECOND[1]


def _exposure(h, unit: str) -> tuple[float, str]:
    res = h.guest.run(["systemd-analyze", "security", "--no-pager", unit], timeout=120)
    line = next((x for x in res.stdout.splitlines() if "Overall exposure level" in x), "")
    assert line, f"systemd-analyze security {unit} printed no overall level:\n{res.describe()}"
    words = line.split(":", 1)[1].split()
    return float(words[0]), words[1]


def _unit_props(h, name: str) -> tuple[str, list[str]]:
    """node's path and the sandbox lines of NAME's unit, as systemd-run -p arguments."""
    text = h.guest.ok(["cat", f"/etc/systemd/system/abssctl-{name}.service"], timeout=30).stdout
    node = next(x for x in text.splitlines() if x.startswith("ExecStart=")).split("=", 1)[1].split()[0]
    return node, [x for x in text.splitlines() if x.split("=", 1)[0] in SANDBOX_KEYS]


def _connect_from_sandbox(h, name: str) -> str:
    """In a transient unit with NAME's sandbox, node opens a TCP connection to this guest's nginx on
    127.0.0.1:443 and closes it: proof that an INET socket can be made and connected, with no traffic
    leaving the machine. Returns what node printed."""
    node, props = _unit_props(h, name)
    script = ("const s=require('net').connect(443,'127.0.0.1',()=>{console.log('connected');s.end()});"
              "s.on('error',e=>{console.log('error '+e.code);process.exit(1)})")
    argv = ["systemd-run", "--wait", "--pipe", "--quiet", "--collect"]
    for p in props:
        argv += ["-p", p]
    res = h.guest.run(argv + ["--", node, "-e", script], timeout=120)
    return res.stdout.strip() + (f" (rc {res.rc}: {res.stderr.strip()[-300:]})" if res.rc else "")


def test_each_instance_runs_as_its_own_user_and_cannot_read_the_other(readme_host) -> None:
    h = readme_host
    h.after("second")
    home, two = _names(h)
    show = {n: h.json("instance", "show", n)["instance"] for n in (home, two)}
    for n in (home, two):
        user = f"actual-{n}"
        assert h.guest.run(["id", "-u", user], timeout=30).rc == 0, f"no system user {user}"
        unit = h.guest.ok(["systemctl", "show", "-p", "User", "-p", "MainPID", f"abssctl-{n}.service"],
                          timeout=30).stdout
        assert f"User={user}" in unit, unit
        pid = next(x for x in unit.splitlines() if x.startswith("MainPID=")).split("=")[1]
        owner = h.guest.ok(["stat", "-c", "%U", f"/proc/{pid}"], timeout=30).stdout.strip()
        assert owner == user, f"{n}'s server (pid {pid}) runs as {owner}"
        data = show[n]["paths"]["data"]
        st = h.guest.ok(["stat", "-c", "%a %U", data], timeout=30).stdout.strip()
        assert st == f"700 {user}", f"{data}: {st}"
    h.note("instance users", ", ".join(f"{n}: actual-{n}" for n in (home, two)))
    other = show[two]["paths"]["data"]
    account = f"{other}/server-files/account.sqlite"
    # the control: two's own user reads both
    assert h.guest.run(["runuser", "-u", f"actual-{two}", "--", "head", "-c", "16", account], timeout=30).rc == 0
    assert h.guest.run(["runuser", "-u", f"actual-{two}", "--", "ls", f"{other}/user-files"], timeout=30).rc == 0
    for argv in (["cat", account], ["ls", f"{other}/user-files"]):
        res = h.guest.run(["runuser", "-u", f"actual-{home}", "--", *argv], timeout=30)
        assert res.rc != 0 and "Permission denied" in res.stderr, f"as actual-{home}: {argv}: {res.describe()}"
    doc = h.json("doctor", timeout=300)
    users = {p["target"]: p for p in doc["probes"] if p["id"] == "fs.user"}
    assert all(users[n]["status"] == "ok" and f"actual-{n}" in users[n]["message"] for n in (home, two)), users
    h.passed.add("isolation")


def test_each_unit_has_an_exposure_of_at_most_2_5(readme_host) -> None:
    h = readme_host
    h.after("second")
    # before: the first edition's unit (NoNewPrivileges, ProtectSystem=strict, ProtectHome, PrivateTmp
    # only), written beside the real ones under another name, analysed, never started, removed
    text = h.guest.ok(["cat", f"/etc/systemd/system/abssctl-{h.cmd.name}.service"], timeout=30).stdout
    old_keys = ("NoNewPrivileges", "ProtectSystem", "ProtectHome", "PrivateTmp", "ReadWritePaths")
    old = "\n".join(x.replace("UMask=0077", "UMask=0027") for x in text.splitlines()
                    if x.split("=", 1)[0] not in SANDBOX_KEYS or x.split("=", 1)[0] in old_keys + ("User", "Group"))
    h.guest.ok(["python3", "-c", "import sys; open('/etc/systemd/system/abt-before-probe.service', 'w')"
                ".write(sys.argv[1])", old + "\n"], timeout=30)
    h.guest.ok(["systemctl", "daemon-reload"], timeout=60)
    try:
        before = _exposure(h, "abt-before-probe.service")
    finally:
        h.guest.run(["rm", "-f", "/etc/systemd/system/abt-before-probe.service"], timeout=30)
        h.guest.run(["systemctl", "daemon-reload"], timeout=60)
    h.note("exposure before (first edition's unit)", f"{before[0]} {before[1]}")
    after = {n: _exposure(h, f"abssctl-{n}.service") for n in _names(h)}
    h.note("exposure after", ", ".join(f"abssctl-{n}.service {v[0]} {v[1]}" for n, v in after.items()))
    assert before[0] > EXPOSURE_MAX, before
    assert all(v[0] <= EXPOSURE_MAX for v in after.values()), after
    doc = h.json("doctor", timeout=300)
    probed = {p["target"]: p for p in doc["probes"] if p["id"] == "systemd.exposure"}
    assert all(probed[n]["status"] == "ok" and probed[n]["data"]["exposure"] == after[n][0] for n in _names(h)), probed
    h.passed.add("exposure")


def test_budgets_survive_restart_restore_and_a_version_switch_on_the_hardened_units(readme_host) -> None:
    h = readme_host
    h.after("second", "reboot", "set-version")
    home, two = _names(h)
    tokens = {home: login(h.client, _domain(h, home), PASSWORD),
              two: bootstrap_and_login(h.client, _domain(h, two), PASSWORD)}
    files = {home: h.memo["budget"], two: {"id": str(uuid.uuid4()), "body": os.urandom(BIG)}}
    upload_user_file(h.client, _domain(h, two), tokens[two], files[two]["id"], "Big budget", files[two]["body"])

    def intact(when: str) -> None:
        for n in (home, two):
            token = login(h.client, _domain(h, n), PASSWORD)
            got = download_user_file(h.client, _domain(h, n), token, files[n]["id"])
            assert got.status == 200 and got.body == files[n]["body"], (
                f"{n} after {when}: HTTP {got.status}, {len(got.body)} bytes (want {len(files[n]['body'])})")
    intact("the upload")
    for n in (home, two):
        with h.phase(f"instance restart {n}"):
            h.json("instance", "restart", n)
    intact("a restart")
    with h.phase(f"backup create + restore {two}"):
        backup = h.json("backup", "create", two)["backup"]
        h.json("backup", "restore", backup["id"], "--yes")
    data = h.json("instance", "show", two)["instance"]["paths"]["data"]
    owner = h.guest.ok(["stat", "-c", "%a %U", data], timeout=30).stdout.strip()
    assert owner == f"700 actual-{two}", f"{data} after the restore: {owner}"
    intact("a backup and restore")
    current = h.json("version", "list")["current"]
    with h.phase(f"version switch {OTHER_VERSION} (every instance follows current)"):
        h.json("version", "switch", OTHER_VERSION, "--yes", timeout=1800)
    for n in (home, two):
        info = h.client.https(_domain(h, n), "/info")
        assert info.status == 200 and info.json()["build"]["version"] == OTHER_VERSION, info.describe()
    intact(f"version switch {OTHER_VERSION}")
    with h.phase(f"version switch {current} (back)"):
        h.json("version", "switch", current, "--yes", timeout=1800)
    intact(f"version switch back to {current}")
    h.passed.add("budgets")


def test_bank_sync_on_can_reach_out_and_off_is_loopback_only(readme_host) -> None:
    h = readme_host
    h.after("second")
    home, two = _names(h)
    show = h.guest.ok(["systemctl", "show", "-p", "IPAddressDeny", "-p", "IPAddressAllow", "-p",
                       "RestrictAddressFamilies", f"abssctl-{home}.service"], timeout=30).stdout
    props = dict(x.split("=", 1) for x in show.splitlines() if "=" in x)
    assert props.get("IPAddressDeny", "") == "" and "AF_INET" in props.get("RestrictAddressFamilies", ""), props
    assert "AF_INET6" in props["RestrictAddressFamilies"], props
    reach = _connect_from_sandbox(h, home)
    h.note("bank sync on: node in the unit's sandbox connects to 127.0.0.1:443", reach)
    assert reach == "connected", reach
    cfg = "/etc/abssctl/config.toml"
    assert h.guest.run(["grep", "-qx", "# bank_sync = true", cfg], timeout=30).rc == 0, \
        h.guest.run(["cat", cfg], timeout=30).stdout
    h.guest.ok(["sed", "-i", "s/^# bank_sync = true$/bank_sync = false/", cfg], timeout=30)
    with h.phase("bank_sync = false: doctor --fix re-renders the units"):
        h.json("doctor", "--fix", "--yes", timeout=600)
    for n in (home, two):
        show = h.guest.ok(["systemctl", "show", "-p", "IPAddressDeny", "-p", "IPAddressAllow",
                           f"abssctl-{n}.service"], timeout=30).stdout
        props = dict(x.split("=", 1) for x in show.splitlines() if "=" in x)
        assert set(props["IPAddressDeny"].split()) == {"0.0.0.0/0", "::/0"}, props     # any, in either order
        assert {"127.0.0.0/8", "::1/128"} <= set(props["IPAddressAllow"].split()), props
        h.note(f"bank sync off: abssctl-{n}.service", f"IPAddressDeny={props['IPAddressDeny']} "
               f"IPAddressAllow={props['IPAddressAllow']}")
        _health(h, _domain(h, n))
    assert _connect_from_sandbox(h, two) == "connected"       # loopback stays allowed
    off = {n: _exposure(h, f"abssctl-{n}.service") for n in (home, two)}
    h.note("exposure with bank sync off", ", ".join(f"abssctl-{n}.service {v[0]} {v[1]}" for n, v in off.items()))
    assert all(v[0] <= EXPOSURE_MAX for v in off.values()), off
    doc = h.json("doctor", timeout=300)
    bad = [p for p in doc["probes"] if p["id"] in ("systemd.unit", "systemd.exposure") and p["status"] != "ok"]
    assert not bad, bad
