"""Backups against the real rig: hot SQLite snapshots, zstd/gzip archives, verify, restore, prune."""
from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import pytest

from rig.host import sqlite_writer

pytestmark = pytest.mark.integration


def seed(data: Path, rows: int = 200) -> Path:
    db = data / "server-files" / "account.sqlite"
    con = sqlite3.connect(db)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("CREATE TABLE IF NOT EXISTS t (n INTEGER PRIMARY KEY, v TEXT)")
    con.executemany("INSERT INTO t (v) VALUES (?)", [(f"row {i}",) for i in range(rows)])
    con.commit()
    con.close()
    (data / "user-files" / "file-abc.blob").write_bytes(os.urandom(300_000))
    group = sqlite3.connect(data / "user-files" / "group-1.sqlite")
    group.execute("CREATE TABLE m (k TEXT)")
    group.execute("INSERT INTO m VALUES ('budget')")
    group.commit()
    group.close()
    return db


@pytest.fixture
def alice(abssctl_host):
    h = abssctl_host
    h.ok("instance", "create", "alice", "--domain", "alice.example.test", "--tls", "self-signed")
    data = h.paths["instance_root"] / "alice" / "data"
    seed(data)
    return h, data


@pytest.mark.parametrize("compression", ["zstd", "gzip", "none"])
def test_hot_backup_while_a_writer_commits(alice, compression: str) -> None:
    h, data = alice
    db = data / "server-files" / "account.sqlite"
    with sqlite_writer(db, "INSERT INTO t (v) VALUES ('during backup')", 20000) as written:
        doc = h.ok("backup", "create", "alice", "-m", "before tax season", "--compression", compression)
    b = doc["backup"]
    assert b["compression"] == compression and b["reason"] == "manual" and written[0] > 0
    archive = Path(b["archive"])
    assert archive.stat().st_mode & 0o777 == 0o600 and archive.parent.stat().st_mode & 0o777 == 0o700
    sidecar = archive.parent / (b["id"] + ".sha256")
    assert sidecar.read_text().split()[0] == b["sha256"]
    deep = h.ok("backup", "verify", b["id"], "--deep")["results"][0]
    assert deep["status"] == "ok" and deep["checks"]["sqlite"] == {
        "data/server-files/account.sqlite": "ok", "data/user-files/group-1.sqlite": "ok"}
    listed = h.ok("backup", "list", "--instance", "alice")["backups"]
    assert [x["id"] for x in listed] == [b["id"]] and listed[0]["message"] == "before tax season"
    assert h.ok("instance", "show", "alice")["instance"]["last_backup_id"] == b["id"]


def test_restore_brings_back_the_exact_rows(alice) -> None:
    h, data = alice
    db = data / "server-files" / "account.sqlite"
    b = h.ok("backup", "create", "alice")["backup"]
    con = sqlite3.connect(db)
    con.execute("DELETE FROM t")
    con.commit()
    con.close()
    doc = h.ok("--yes", "backup", "restore", b["id"])
    assert doc["restore"]["health"] == "UP" and doc["restore"]["pre_restore_backup"]
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert con.execute("SELECT count(*) FROM t").fetchone()[0] == 200
    finally:
        con.close()
    assert (data / "user-files" / "file-abc.blob").stat().st_size == 300_000
    assert data.stat().st_mode & 0o777 == 0o750
    assert not list((data.parent).glob("data.pre-restore-*")) and not list(data.parent.glob(".abssctl-tmp-*"))
    reasons = sorted(x["reason"] for x in h.ok("backup", "list")["backups"])
    assert reasons == ["manual", "pre-restore"]


def test_restore_without_a_pre_backup_keeps_the_old_data(alice) -> None:
    h, data = alice
    b = h.ok("backup", "create", "alice")["backup"]
    doc = h.ok("--yes", "backup", "restore", b["id"], "--no-pre-backup")
    kept = doc["restore"]["kept"]
    assert kept and Path(kept).is_dir() and (Path(kept) / "server-files" / "account.sqlite").exists()


def test_restore_needs_confirmation_without_a_tty(alice) -> None:
    h, _data = alice
    b = h.ok("backup", "create", "alice")["backup"]
    got = h.run("--json", "backup", "restore", b["id"])
    assert got.rc == 2 and got.doc["error"]["kind"] == "NeedsConfirmation"


def test_flipped_bytes_and_truncation_make_verify_exit_3(alice) -> None:
    h, _data = alice
    b = h.ok("backup", "create", "alice", "--compression", "gzip")["backup"]
    archive = Path(b["archive"])
    raw = bytearray(archive.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    archive.write_bytes(bytes(raw))
    got = h.run("--json", "backup", "verify", b["id"])
    assert got.rc == 3 and got.doc["error"]["kind"] == "ChecksumMismatch"
    assert h.ok("backup", "list")["backups"][0]["status"] == "corrupt"
    b2 = h.ok("backup", "create", "alice")["backup"]
    a2 = Path(b2["archive"])
    a2.write_bytes(a2.read_bytes()[: a2.stat().st_size // 3])
    got = h.run("--json", "backup", "verify", b2["id"], "--deep")
    assert got.rc == 3


def test_prune_keeps_the_newest_and_honours_dry_run(alice) -> None:
    h, _data = alice
    ids = [h.ok("backup", "create", "alice")["backup"]["id"] for _ in range(3)]
    plan = h.ok("--dry-run", "backup", "prune", "--keep", "1")["plan"]
    assert len(plan) == 2 and len(h.ok("backup", "list")["backups"]) == 3
    h.ok("--yes", "backup", "prune", "--keep", "1")
    left = [x["id"] for x in h.ok("backup", "list")["backups"]]
    assert left == [sorted(ids)[-1]] or len(left) == 1
    assert len(list((h.paths["backup_root"] / "alice").glob("*.tar*"))) == 1


def test_reconcile_adopts_a_copied_archive(alice) -> None:
    h, _data = alice
    b = h.ok("backup", "create", "alice")["backup"]
    index = h.paths["backup_root"] / "backups.json"
    doc = json.loads(index.read_text())
    doc["backups"] = {}
    index.write_text(json.dumps(doc))
    report = h.ok("backup", "reconcile")
    assert report["orphans"] == [b["archive"]]
    h.ok("backup", "reconcile", "--apply")
    entry = h.ok("backup", "list")["backups"][0]
    assert entry["id"] == b["id"] and entry["status"] == "adopted"


def test_if_older_than_skips_a_recent_backup_and_takes_one_when_it_is_old(alice) -> None:
    """backup create --if-older-than (issue 21: Ansible runs it every time, changed only when due)."""
    h, _data = alice
    first = h.ok("backup", "create", "alice", "--if-older-than", "24h")      # no backup yet: one is taken
    assert first["changed"] is True and first["backup"]["instance"] == "alice"
    before = h.tree()
    again = h.ok("backup", "create", "alice", "--if-older-than", "24h")
    assert again["changed"] is False and again["skipped"] == [
        {"instance": "alice", "newest": first["backup"]["id"], "newest_at": first["backup"]["created_at"]}]
    plan = h.ok("--dry-run", "backup", "create", "alice", "--if-older-than", "24h")
    assert plan["changed"] is False and plan["plan"] == []
    assert h.tree() == before, "a skipped backup changed the tree"
    index = h.paths["backup_root"] / "backups.json"
    doc = json.loads(index.read_text())
    doc["backups"][first["backup"]["id"]]["created_at"] = "2020-01-01T00:00:00.000Z"   # age it
    index.write_text(json.dumps(doc))
    due = h.ok("backup", "create", "alice", "--if-older-than", "24h")
    assert due["changed"] is True and due["backup"]["id"] != first["backup"]["id"]


@pytest.mark.parametrize("bad", ["24", "h", "0h", "1y", "1.5h"])
def test_if_older_than_refuses_what_is_not_a_duration(alice, bad: str) -> None:
    h, _data = alice
    before = h.tree()
    got = h.run("--json", "backup", "create", "alice", "--if-older-than", bad)
    assert got.rc == 2 and "not a duration" in got.doc["error"]["message"], got
    assert h.tree() == before


def test_if_older_than_with_all_backs_up_only_the_instances_that_are_due(alice) -> None:
    h, _data = alice
    h.ok("instance", "create", "bob", "--domain", "bob.example.test", "--tls", "self-signed")
    first = h.ok("backup", "create", "alice", "--if-older-than", "7d")
    mixed = h.ok("backup", "create", "--all", "--if-older-than", "7d")
    rows = {r.get("instance") or r["backup"]["instance"]: r for r in mixed["results"]}
    assert mixed["changed"] is True and set(rows) == {"alice", "bob"}, mixed
    assert rows["alice"] == {"ok": True, "skipped": True, "instance": "alice", "newest": first["backup"]["id"]}
    assert rows["bob"]["ok"] is True and rows["bob"]["backup"]["instance"] == "bob"
    again = h.ok("backup", "create", "--all", "--if-older-than", "7d")
    assert again["changed"] is False and [r["instance"] for r in again["skipped"]] == ["alice", "bob"], again
