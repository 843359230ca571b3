"""§11.2 against a real ACME server on loopback: Debian's pebble and certbot, the sandbox nginx."""
from __future__ import annotations

import hashlib
import os
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest

from rig.acme import served_steadily

pytestmark = pytest.mark.integration


def served_der(h, domain: str) -> bytes | None:
    """The certificate the sandbox nginx serves for ``domain`` (SNI), DER."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    try:
        with socket.create_connection(("127.0.0.1", h.nginx.https_port), timeout=3) as raw, \
                ctx.wrap_socket(raw, server_hostname=domain) as tls:
            return tls.getpeercert(binary_form=True)
    except OSError:
        return None


def fingerprint(der: bytes | None) -> str:
    return hashlib.sha256(der or b"").hexdigest()


def file_der(path: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(path.read_text().split("-----END CERTIFICATE-----")[0]
                                    + "-----END CERTIFICATE-----\n")


def wait_served(h, domain: str, want: bytes, seconds: float = 15) -> float:
    """Seconds until nginx serves ``want`` for ``domain`` 5 times in a row; bounded."""
    return served_steadily(lambda: served_der(h, domain), domain, want, seconds)


def verified_by_pebble(h, der: bytes, domain: str, tmp: Path) -> None:
    """The served leaf chains to pebble's root through its intermediate, and names the domain."""
    inter, root = h.pebble.issuer_pems()
    (tmp / "root.pem").write_text(root)
    (tmp / "inter.pem").write_text(inter)
    (tmp / "leaf.pem").write_text(ssl.DER_cert_to_PEM_cert(der))
    done = subprocess.run(["openssl", "verify", "-CAfile", str(tmp / "root.pem"), "-untrusted", str(tmp / "inter.pem"),
                           "-verify_hostname", domain, str(tmp / "leaf.pem")], capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 0 and ": OK" in done.stdout, done.stdout + done.stderr


def certbot(h, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*h.certbot, *args, "--config-dir", str(h.paths["letsencrypt_dir"]),
                           "--non-interactive"], capture_output=True, text=True, timeout=180)


def create(h, name: str, domain: str, *extra: str) -> dict:
    return h.ok("instance", "create", name, "--domain", domain, *extra)


def test_issue_for_a_new_instance_and_renewal_through_the_deploy_hook(acme_host, tmp_path: Path) -> None:
    h = acme_host
    domain = "alice.example.test"
    t0 = time.monotonic()
    doc = create(h, "alice", domain, "--tls", "acme")
    create_time = time.monotonic() - t0
    assert doc["instance"]["tls"]["source"] == "letsencrypt", doc
    live = h.paths["letsencrypt_dir"] / "live" / domain
    entry = h.registry_doc("instances")["instances"]["alice"]
    assert entry["tls"]["cert"] == str(live / "fullchain.pem") and entry["tls"]["lineage"] == str(live)
    wait_served(h, domain, file_der(live / "fullchain.pem"))
    first = served_der(h, domain)
    verified_by_pebble(h, first, domain, tmp_path)
    # the deploy hook is recorded for renewals: this abssctl, this config
    conf = (h.paths["letsencrypt_dir"] / "renewal" / f"{domain}.conf").read_text()
    hook = next(line for line in conf.splitlines() if line.startswith("renew_hook = "))
    assert hook.endswith(f"--config {h.config} tls deploy-hook") and "abssctl.py" in hook, hook
    # tls verify names the issuer and expiry
    info = h.ok("tls", "verify", "alice")["tls"]
    assert "Pebble Intermediate CA" in info["issuer"] and info["not_after"] and info["covers_domain"] is True
    # a second tls acme: timed (issue time against pebble)
    t0 = time.monotonic()
    h.ok("tls", "acme", "alice")
    issue_time = time.monotonic() - t0
    # renewal: certbot runs the deploy hook, which reloads nginx; the served fingerprint changes
    before = served_der(h, domain)
    t0 = time.monotonic()
    done = certbot(h, "renew", "--force-renewal", "--no-random-sleep-on-renew")
    assert done.returncode == 0, done.stdout + done.stderr
    after_file = file_der(live / "fullchain.pem")
    assert after_file != before
    wait_served(h, domain, after_file)
    renew_to_served = time.monotonic() - t0
    assert fingerprint(served_der(h, domain)) != fingerprint(before)
    assert h.nginx.test().returncode == 0
    print(f"\nACME TIMES: create --tls acme {create_time:.2f} s, tls acme {issue_time:.2f} s, "
          f"renew-to-served {renew_to_served:.2f} s")
    doctor = h.run("--json", "doctor", "--only", "tls")
    found = {(f["id"], f["target"]): f for f in doctor.doc["probes"]}
    assert found[("tls.served", "alice")]["status"] == "ok", doctor.doc
    assert found[("tls.deploy-hook", "alice")]["status"] == "ok", doctor.doc


def test_a_broken_renewed_pair_is_refused_and_the_old_one_stays_served(acme_host, tmp_path: Path) -> None:
    h = acme_host
    domain = "bob.example.test"
    create(h, "bob", domain, "--tls", "acme")
    live = h.paths["letsencrypt_dir"] / "live" / domain
    served = file_der(live / "fullchain.pem")
    wait_served(h, domain, served)
    # a renewal whose new key does not match its certificate (as certbot would have swapped live/ by now)
    archive = h.paths["letsencrypt_dir"] / "archive" / domain
    for kind in ("cert", "chain", "fullchain"):
        (archive / f"{kind}2.pem").write_bytes((archive / f"{kind}1.pem").read_bytes())
    subprocess.run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-out",
                    str(archive / "privkey2.pem")], check=True, capture_output=True, timeout=30)
    for kind in ("cert", "chain", "fullchain", "privkey"):
        os.unlink(live / f"{kind}.pem")
        os.symlink(f"../../archive/{domain}/{kind}2.pem", live / f"{kind}.pem")
    env = dict(os.environ, RENEWED_LINEAGE=str(live), RENEWED_DOMAINS=domain)
    got = subprocess.run([os.sys.executable, str(Path(__file__).resolve().parents[2] / "abssctl.py"), "--config",
                          str(h.config), "tls", "deploy-hook"], capture_output=True, text=True, timeout=120, env=env)
    assert got.returncode == 4, got.stdout + got.stderr
    assert "refused the renewed certificate" in got.stderr and "does not match" in got.stderr, got.stderr
    assert h.nginx.test().returncode == 0
    assert served_der(h, domain) == served
    entry = h.registry_doc("instances")["instances"]["bob"]
    assert entry["tls"]["cert"] == str(archive / "fullchain1.pem") and entry["tls"]["lineage"] == str(live)
    # another reload keeps serving the old pair (the vhost no longer points at the broken live/ files)
    assert h.nginx.reload().returncode == 0
    assert served_der(h, domain) == served
    # doctor names the pin; a good renewal (its deploy hook) serves the lineage again and the pin is gone
    def pinned() -> list[dict]:
        doc = h.run("--json", "doctor", "--only", "tls").doc
        return [f for f in doc["probes"] if f["id"] == "tls.pinned" and f["target"] == "bob"]
    assert [f["status"] for f in pinned()] == ["warn"] and "--cert-name bob.example.test" in pinned()[0]["hint"]
    done = certbot(h, "renew", "--force-renewal", "--no-random-sleep-on-renew", "--cert-name", domain)
    assert done.returncode == 0, done.stdout + done.stderr
    assert h.registry_doc("instances")["instances"]["bob"]["tls"]["cert"] == str(live / "fullchain.pem")
    wait_served(h, domain, file_der(live / "fullchain.pem"))
    assert pinned() == []


def test_an_unreachable_challenge_exits_4_and_changes_nothing(acme_host, tmp_path: Path) -> None:
    from rig.acme import Pebble, certbot_prefix
    from rig.nginx_sandbox import free_port
    h = acme_host
    domain = "carol.example.test"
    create(h, "carol", domain, "--tls", "self-signed")
    served = file_der(h.paths["tls_dir"] / "carol" / "fullchain.pem")
    wait_served(h, domain, served)
    # a CA whose HTTP-01 validation reaches a dead port, as when port 80 is not reachable from outside
    dead = Pebble(tmp_path / "pebble-dead", free_port())
    dead.start()
    try:
        h.configure("commands", certbot=certbot_prefix(dead, tmp_path))
        before = h.tree()
        got = h.run("tls", "acme", "carol", "--server", dead.directory)
    finally:
        dead.stop()
    assert got.rc == 4, got
    assert f"certbot could not get a certificate for {domain}" in got.err, got.err
    assert "connection refused" in got.err.lower() and "port 80" in got.err, got.err
    after = h.tree()
    # certbot registered its account with that CA and made its empty directory skeleton (its own state,
    # kept for the next try); no other file or link moved (the unused key it wrote is gone again)
    accounts, logs = str(h.paths["letsencrypt_dir"] / "accounts"), str(h.paths["log_dir"])
    moved = {k for k in set(after) | set(before) if not k.startswith((accounts, logs)) and after.get(k) != before.get(k)
             and (after.get(k) or before.get(k))[2] != ""}
    assert not moved, sorted(moved)
    assert served_der(h, domain) == served and h.nginx.test().returncode == 0
    assert h.registry_doc("instances")["instances"]["carol"]["tls"]["source"] == "self-signed"


def test_auto_picks_up_a_lineage_made_by_hand(acme_host) -> None:
    h = acme_host
    domain = "dave.example.test"
    # a vhost must answer the challenge first: any instance's port-80 server does, for its own name
    create(h, "dave", domain, "--tls", "self-signed")
    h.nginx.reload()
    done = certbot(h, "certonly", "--webroot", "-w", str(h.paths["acme_webroot"]), "-d", domain, "--agree-tos",
                   "--register-unsafely-without-email", "--server", h.pebble.directory)
    assert done.returncode == 0, done.stdout + done.stderr
    h.ok("instance", "delete", "dave", "--yes", "--no-backup", "--purge-data")
    doc = create(h, "dave", domain)            # [tls] default_source = auto
    assert doc["instance"]["tls"]["source"] == "letsencrypt", doc
    live = h.paths["letsencrypt_dir"] / "live" / domain
    wait_served(h, domain, file_der(live / "fullchain.pem"))
    doctor = h.run("--json", "doctor", "--only", "tls")
    found = {(f["id"], f["target"]): f for f in doctor.doc["probes"]}
    assert found[("tls.deploy-hook", "dave")]["status"] == "warn", doctor.doc
    assert found[("tls.deploy-hook", "dave")]["fixable"] is True, doctor.doc
    # doctor --fix records the hook in certbot's renewal conf; certbot itself then runs it on renewal
    conf = h.paths["letsencrypt_dir"] / "renewal" / f"{domain}.conf"
    mode = conf.stat().st_mode
    fixed = h.run("--json", "doctor", "--only", "tls", "--fix", "--yes")
    found = {(f["id"], f["target"]): f for f in fixed.doc["probes"]}
    assert found[("tls.deploy-hook", "dave")]["status"] == "ok", fixed.doc
    assert conf.stat().st_mode == mode and not list(conf.parent.glob(".abssctl-tmp-*"))
    before = served_der(h, domain)
    done = certbot(h, "renew", "--force-renewal", "--no-random-sleep-on-renew", "--cert-name", domain)
    assert done.returncode == 0, done.stdout + done.stderr
    renewed = file_der(live / "fullchain.pem")
    assert renewed != before
    wait_served(h, domain, renewed)         # no reload by the test: only the hook reloads nginx


def test_rename_and_set_domain_of_a_letsencrypt_instance(acme_host) -> None:
    h = acme_host
    create(h, "erin", "erin.example.test", "--tls", "acme")
    h.ok("instance", "rename", "erin", "erin2")
    live = h.paths["letsencrypt_dir"] / "live" / "erin.example.test"
    wait_served(h, "erin.example.test", file_der(live / "fullchain.pem"))
    assert h.registry_doc("instances")["instances"]["erin2"]["tls"]["lineage"] == str(live)
    doc = h.ok("instance", "set-domain", "erin2", "frank.example.test")
    assert doc["changed"] is True
    new_live = h.paths["letsencrypt_dir"] / "live" / "frank.example.test"
    wait_served(h, "frank.example.test", file_der(new_live / "fullchain.pem"))
    entry = h.registry_doc("instances")["instances"]["erin2"]
    assert entry["domain"] == "frank.example.test" and entry["tls"]["lineage"] == str(new_live)
    assert h.nginx.test().returncode == 0


def test_create_passes_its_acme_flags_to_certbot_and_a_failed_step_leaves_it_served(acme_host) -> None:
    """--server on instance create wins over [tls] acme_server (pebble, which works): a CA that is not
    there fails the certificate step (exit 4), but the instance stays, served self-signed; tls acme
    with the configured CA then finishes the job."""
    from rig.nginx_sandbox import free_port
    h = acme_host
    domain = "gina.example.test"
    res = h.run("--json", "instance", "create", "gina", "--domain", domain, "--tls", "acme",
                "--server", f"https://127.0.0.1:{free_port()}/dir", "--email", "gina@example.test")
    assert res.rc == 4, res
    assert "self-signed certificate, but the Let's Encrypt step failed" in res.doc["error"]["message"], res.doc
    assert "abssctl tls acme gina" in res.doc["error"]["hint"], res.doc
    entry = h.registry_doc("instances")["instances"]["gina"]
    assert entry["tls"]["source"] == "self-signed", entry
    assert served_der(h, domain) is not None and h.nginx.test().returncode == 0
    assert not (h.paths["letsencrypt_dir"] / "live" / domain).exists()
    h.ok("tls", "acme", "gina")
    live = h.paths["letsencrypt_dir"] / "live" / domain
    wait_served(h, domain, file_der(live / "fullchain.pem"))
    assert h.registry_doc("instances")["instances"]["gina"]["tls"]["source"] == "letsencrypt"
