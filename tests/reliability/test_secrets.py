"""Planted secrets (DESIGN P5, §3.7, §5.2, §6.4): none may reach output, `--debug` stderr, the ops
log, abssctl.log, a backup's manifest, or (for a private key) a backup archive or an intent journal.

- a password and a client secret planted in alice's server config.json;
- SECRET_TOKEN=PLANTED2 in the process environment (§5.2: --debug never echoes environment values);
- a custom private key installed with `tls install` (twice, so the first becomes privkey.pem.prev);
- `-m "token=PLANTED3"`: a backup message is user text the admin types to describe the backup, shown
  by `backup list` and stored in the index, the manifest and the ops log by design (§3.6, §3.7's own
  example logs a message). The redactor works on key names, not on values, and there is no way to
  tell a secret from a description inside free text. So it is *expected* to be recorded; the test
  pins that, and that it is recorded only where a message belongs.

The support bundle does not exist yet (§4.11), so it is not searched here.
"""
from __future__ import annotations

import base64
import io
import json
import subprocess
import tarfile
from pathlib import Path

import pytest

from reliability.rigs import RHost, registry, rhost, start_paused, release  # noqa: F401
from reliability.test_modes import make_cert

pytestmark = pytest.mark.reliability
PASSWORD, CLIENT_SECRET, ENV_TOKEN, MESSAGE_TOKEN = "hunter2-PLANTED", "cs-PLANTED1", "PLANTED2", "PLANTED3"


def key_markers(key: Path) -> list[str]:
    """Needles for a PEM private key: its body lines and the base64 of the whole file."""
    text = key.read_text()
    body = [line for line in text.splitlines() if line and not line.startswith("-----")]
    return body + [base64.b64encode(key.read_bytes()).decode(), "PRIVATE KEY-----"]


def archive_members(h: RHost, archive: Path) -> dict[str, bytes]:
    raw = archive.read_bytes()
    if archive.name.endswith(".zst"):
        raw = subprocess.run([*h.sb.commands["zstd"], "-d", "-q", "-c"], input=raw, capture_output=True,
                             check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:*") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isreg()}


@pytest.fixture
def planted(rhost: RHost, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    h = rhost
    h.ok("instance", "create", "alice", "--domain", "alice.example.org")
    h.ok("instance", "create", "bob", "--domain", "bob.example.org")
    cfg_path = Path(h.sb.paths["instance_root"]) / "alice" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["password"] = PASSWORD
    cfg["openId"] = {"client_secret": CLIENT_SECRET, "issuer": "https://id.example.org"}
    cfg_path.write_text(json.dumps(cfg))
    monkeypatch.setenv("SECRET_TOKEN", ENV_TOKEN)
    certs = tmp_path_factory.mktemp("planted-certs")
    pairs = [make_cert(certs / str(n), "bob.example.org") for n in (1, 2)]
    return h, pairs


def test_planted_secrets_reach_no_output_log_or_manifest(planted) -> None:
    h, [(c1, k1), (c2, k2)] = planted
    seen: dict[str, str] = {}

    def run(*argv: object) -> None:
        res = h.run("--debug", *argv)
        seen[" ".join(map(str, argv))] = res.out + res.err
        assert res.rc == 0, f"{argv}: rc={res.rc}\n{res.out}\n{res.err}"
    run("tls", "install", "bob", "--cert", c1, "--key", k1)
    run("--json", "tls", "install", "bob", "--cert", c2, "--key", k2)
    run("tls", "verify", "--cert", c2, "--key", k2)
    run("--json", "tls", "verify", "bob")
    run("--json", "instance", "show", "alice")
    run("instance", "show", "alice")
    run("--json", "instance", "status")
    run("instance", "env", "alice")
    run("--json", "instance", "restart", "alice")
    run("--json", "backup", "create", "alice", "-m", f"token={MESSAGE_TOKEN}")
    run("--json", "backup", "create", "bob")
    run("--json", "backup", "verify", "--all", "--deep")
    run("--json", "config", "show")
    run("--json", "history")
    run("instance", "logs", "alice")
    logs = {p.name: p.read_text() for p in Path(h.sb.paths["log_dir"]).iterdir()}
    index = registry(h.sb, "backups")["backups"]
    archives = {b["id"]: Path(h.sb.paths["backup_root"]) / b["archive"] for b in index.values()}
    manifests, payloads = {}, {}
    for bid, path in archives.items():
        members = archive_members(h, path)
        manifests[bid] = members[f"{bid}/manifest.json"].decode()
        payloads[bid] = b"\n".join(members.values()).decode("latin-1")
    leaks = []
    needles = {"password": PASSWORD, "client secret": CLIENT_SECRET, "env token": ENV_TOKEN}
    needles.update({f"key1 {i}": m for i, m in enumerate(key_markers(k1))})
    needles.update({f"key2 {i}": m for i, m in enumerate(key_markers(k2))})
    for what, needle in needles.items():
        for where, text in [*(("output of " + a, t) for a, t in seen.items()), *logs.items(),
                            *(("manifest " + b, m) for b, m in manifests.items())]:
            if needle in text:
                leaks.append(f"{what} in {where}")
        if what.startswith("key"):
            leaks += [f"{what} in archive {b}" for b, p in payloads.items() if needle in p]
    assert leaks == [], "\n".join(leaks)
    shown = json.loads(seen["--json instance show alice"].split("\nabssctl:")[0])
    assert shown["instance"]["config"]["password"] != PASSWORD           # redacted, not dropped silently
    # the backup message is recorded where a message belongs
    mine = [b for b in index.values() if b.get("message") == f"token={MESSAGE_TOKEN}"]
    assert len(mine) == 1 and MESSAGE_TOKEN in manifests[mine[0]["id"]]
    assert MESSAGE_TOKEN in logs["operations.jsonl"]


def test_no_private_key_bytes_enter_an_intent_journal(planted) -> None:
    """§6.4: key contents are read only by ssl (to match) and openssl. A journal is a file on disk
    that outlives a kill -9, so a re-install's undo must not carry the old key's bytes."""
    h, [(c1, k1), (c2, k2)] = planted
    h.ok("tls", "install", "bob", "--cert", c1, "--key", k1)
    journal_dir = Path(h.sb.paths["state_dir"]) / "journal"
    argv = ["tls", "install", "bob", "--cert", str(c2), "--key", str(k2)]
    steps = len(h.ok("--dry-run", *argv)["plan"])
    assert steps >= 2
    found = []
    for k in range(steps + 1):
        child, note = start_paused(h.sb, k, ["--json", *argv])
        texts = [p.read_text() for p in journal_dir.iterdir()]
        rc, out, err = release(child, note)
        assert rc == 0 and texts, f"rc={rc}\n{out}\n{err}"
        for name, key in (("the old key", k1), ("the new key", k2)):
            hits = [m for m in key_markers(key) if any(m in t for t in texts)]
            if hits:
                form = "base64 of the whole key file" if base64.b64encode(key.read_bytes()).decode() in hits \
                    else "PEM lines"
                found.append(f"boundary {k}: {name} ({form})")
        h.ok("tls", "install", "bob", "--cert", c1, "--key", k1)      # back to pair 1 for the next boundary
    assert found == [], found
