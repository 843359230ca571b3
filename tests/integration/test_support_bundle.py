"""support-bundle against the real rig (DESIGN §4.11): planted secrets never reach any member, the
default bundle is de-identified, --no-redact keeps identities but still drops secrets, and no budget
data, key or certificate file is ever packed."""
from __future__ import annotations

import hashlib
import json
import os
import re
import ssl
import tarfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

NAMES = ("alice", "bob")
PLANTED = {
    "config-password": "PLANTED-PW",
    "openid-client-secret": "PLANTED-CLIENT-SECRET",
    "openid-client-id": "PLANTED-OPENID-CLIENT-ID",           # the whole openId section goes
    "https-key": "PLANTED-HTTPS-KEY-PATH",
    "nginx-authorization": "PLANTED-BEARER-TOKEN",
    "nginx-api-key-header": "PLANTED-NGINX-API-KEY",
    "nginx-ssl-password-file": "PLANTED-SSL-PASSWORD-FILE",
}
# secrets in the value of a header directive (`proxy_set_header Authorization ...`) are removed too
HEADER_SECRETS = ("nginx-authorization", "nginx-api-key-header")
BUDGET_MARKER = b"PLANTED-BUDGET-BYTES"


def domain(name: str) -> str:
    return f"{name}.example.test"


def key_body_lines(pem: str) -> list[str]:
    """The base64 lines of a PEM private key (long enough to be unique)."""
    return [line for line in pem.splitlines() if line and not line.startswith("-----") and len(line) >= 40]


@pytest.fixture
def planted(abssctl_host):
    """Two instances, a backup each, budget bytes, and every kind of secret DESIGN names."""
    h = abssctl_host
    for name in NAMES:
        h.ok("instance", "create", name, "--domain", domain(name), "--tls", "self-signed")
    data = h.paths["instance_root"] / "alice" / "data"
    (data / "user-files" / "file-budget.blob").write_bytes(BUDGET_MARKER * 100)
    for name in NAMES:
        h.ok("backup", "create", name)
    key_pem = (h.paths["tls_dir"] / "alice" / "privkey.pem").read_text()
    assert "PRIVATE KEY" in key_pem
    cfg_path = h.paths["instance_root"] / "alice" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["password"] = PLANTED["config-password"]
    cfg["openId"] = {"issuer": "https://idp.example.invalid/", "client_id": PLANTED["openid-client-id"],
                     "client_secret": PLANTED["openid-client-secret"], "server_hostname": "https://x.invalid"}
    cfg["https"] = {"key": PLANTED["https-key"], "cert": "/nonexistent/cert.pem"}
    cfg["comment"] = key_pem                          # a PEM block "anywhere"
    cfg_path.write_text(json.dumps(cfg, indent=2))
    # an included nginx file (shows up in nginx -T) with secrets in directives, and a key in a comment
    pw_file = h.root / f"{PLANTED['nginx-ssl-password-file']}.txt"
    pw_file.write_text("unused passphrase\n")
    (h.nginx.sites_enabled / "00-upstream-auth.conf").write_text(
        'proxy_set_header Authorization "Bearer %s";\n'
        "proxy_set_header X-Api-Key %s;\n"
        "ssl_password_file %s;\n"
        "%s\n" % (PLANTED["nginx-authorization"], PLANTED["nginx-api-key-header"], pw_file,
                  "\n".join("# " + line for line in key_pem.splitlines())))
    assert h.nginx.test().returncode == 0, h.nginx.test().stderr
    assert h.nginx.reload().returncode == 0
    return h, key_pem


def build(h, tmp: Path, *extra: str) -> tuple[dict, dict[str, bytes], Path]:
    out = tmp / "bundle.tar.gz"
    if out.exists():
        out.unlink()
        (tmp / "bundle.tar.gz.sha256").unlink()
    got = h.run("--json", "support-bundle", "-o", out, *extra)
    assert got.rc == 0, got
    members: dict[str, bytes] = {}
    with tarfile.open(out, "r:gz") as tar:
        for info in tar.getmembers():
            assert info.isfile(), info.name
            f = tar.extractfile(info)
            assert f is not None
            members[info.name] = f.read()
    return got.doc, members, out


def leaks(members: dict[str, bytes], needles: dict[str, str]) -> list[tuple[str, str]]:
    return [(label, name) for name, body in members.items() for label, needle in needles.items()
            if needle.encode() in body]


def assert_no_secrets(members: dict[str, bytes], key_pem: str) -> None:
    needles = {k: v for k, v in PLANTED.items() if k not in HEADER_SECRETS}
    needles.update({f"key-line-{i}": line for i, line in enumerate(key_body_lines(key_pem))})
    found = leaks(members, needles)
    assert found == [], found
    for name, body in members.items():
        assert b"PRIVATE KEY" not in body, name
        assert BUDGET_MARKER not in body, name
        assert b"SQLite format 3" not in body, name


def assert_no_data_or_key_files(members: dict[str, bytes]) -> None:
    for name in members:
        assert not name.endswith((".sqlite", ".blob", ".pem", ".key", ".crt", ".tar", ".tar.gz", ".tar.zst",
                                  ".migrate")), name
        assert "user-files" not in name and "server-files" not in name, name
    for name, body in members.items():
        assert b"-----BEGIN CERTIFICATE-----" not in body, f"{name} holds a certificate file's contents"


def test_default_bundle_has_no_secrets_and_no_identities(planted, tmp_path: Path) -> None:
    h, key_pem = planted
    doc, members, out = build(h, tmp_path)
    assert_no_secrets(members, key_pem)
    assert_no_data_or_key_files(members)
    # de-identified: no domain anywhere, member names included
    for name, body in members.items():
        for inst in NAMES:
            assert domain(inst).encode() not in body, (name, inst)
            assert domain(inst) not in name
    # the file: mode 0600, a matching sidecar, a manifest that lists every member
    assert out.stat().st_mode & 0o777 == 0o600
    sidecar = Path(str(out) + ".sha256")
    assert sidecar.stat().st_mode & 0o777 == 0o600
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    assert sidecar.read_text() == f"{digest}  {out.name}\n"
    assert doc["bundle"]["sha256"] == digest and doc["bundle"]["path"] == str(out)
    assert doc["bundle"]["redacted"] is True
    manifest = json.loads(members["manifest.json"])
    assert set(manifest["members"]) == set(members) - {"manifest.json"}
    assert all(manifest["members"][n] == len(members[n]) for n in manifest["members"])
    assert manifest["redactions"]["secrets"] > 0 and manifest["redactions"]["keys"] > 0
    assert manifest["redactions"]["identities"] > 0
    # what DESIGN says is in it
    want = {"doctor.json", "config/effective.json", "config/config.toml", "registry/instances.json",
            "registry/ports.json", "registry/versions.json", "registry/backups.json", "nginx/nginx-T.txt",
            "versions.txt", "logs/operations.jsonl", "logs/abssctl.log"}
    for inst in NAMES:
        want |= {f"instances/{inst}/config.json", f"instances/{inst}/abssctl-{inst}.service",
                 f"instances/{inst}/abssctl-{inst}.conf", f"instances/{inst}/journal.txt"}
    assert want <= set(members), sorted(want - set(members))
    assert json.loads(members["doctor.json"])["probes"]
    assert b"client_max_body_size" in members["nginx/nginx-T.txt"]
    # redacted values stay visible as redacted, the rest of config.json survives
    cfg = json.loads(members["instances/alice/config.json"])
    assert cfg["password"] == "<redacted>" and cfg["openId"] == "<redacted>" and cfg["port"]
    backups = json.loads(members["registry/backups.json"])["backups"]
    assert {b["instance"] for b in backups.values()} == set(NAMES)
    # certificate metadata instead of the certificate file
    for inst in NAMES:
        der = ssl.PEM_cert_to_DER_cert((h.paths["tls_dir"] / inst / "fullchain.pem").read_text())
        meta = json.loads(members[f"instances/{inst}/certificate.json"])
        assert meta["fingerprint_sha256"].replace(":", "").lower() == hashlib.sha256(der).hexdigest(), meta
        assert meta["not_after"].endswith("Z") and meta["san"] == [meta["subject"].split("=")[-1].strip()], meta
        assert meta["san"][0].startswith("<domain-"), meta


def test_no_redact_keeps_identities_but_still_removes_secrets(planted, tmp_path: Path) -> None:
    h, key_pem = planted
    doc, members, out = build(h, tmp_path, "--no-redact")
    assert doc["bundle"]["redacted"] is False
    assert_no_secrets(members, key_pem)
    assert_no_data_or_key_files(members)
    assert domain("alice").encode() in members["instances/alice/abssctl-alice.conf"]
    assert domain("bob").encode() in members["registry/instances.json"]
    assert out.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("extra", [(), ("--no-redact",)])
def test_secret_headers_in_nginx_directives_are_removed(planted, tmp_path: Path, extra) -> None:
    h, _key = planted
    _doc, members, _out = build(h, tmp_path, *extra)
    assert leaks(members, {k: PLANTED[k] for k in HEADER_SECRETS}) == []


def test_secrets_never_reach_the_ops_log(planted, tmp_path: Path) -> None:
    h, _key = planted
    build(h, tmp_path)
    log = (h.paths["log_dir"] / "operations.jsonl").read_text() + (h.paths["log_dir"] / "abssctl.log").read_text()
    assert [label for label, needle in PLANTED.items() if needle in log] == []
    assert "PRIVATE KEY" not in log


def test_bad_output_path_exits_2(abssctl_host, tmp_path: Path) -> None:
    h = abssctl_host
    got = h.run("--json", "support-bundle", "-o", tmp_path / "no-such-dir" / "b.tar.gz")
    assert got.rc == 2 and got.doc["error"]["kind"] == "UsageError"
    got = h.run("--json", "support-bundle", "-o", tmp_path)
    assert got.rc == 2
    assert not [p for p in os.listdir(tmp_path) if re.match(r"\.abssctl-tmp-", p)]
