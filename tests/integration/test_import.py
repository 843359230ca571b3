"""instance import (DESIGN §11.6) against the real rig: a data dir made by the fake server, a live
source written to during the import, every bad input with byte-identical trees, and --from-backup."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import sqlite3
import stat
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest

from rig.host import sqlite_writer
from rig.nginx_sandbox import free_port

pytestmark = pytest.mark.integration

PKG = ("node_modules", "@actual-app", "sync-server")
OLD, NEW = "1.0.0", "1.1.0"           # the fixture's 1.1.0 knows one migration more than 1.0.0
BUDGETS = {"f-1": ("g-1", "Household"), "f-2": ("g-2", "Holidays")}


def dir_tree(top: Path) -> dict[str, tuple[int, int, str]]:
    """{relative path: (mode, size, sha256|link)}: what a byte-identical source must keep."""
    snap = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                snap[str(path.relative_to(top))] = (st.st_mode, 0, os.readlink(path))
            elif stat.S_ISREG(st.st_mode):
                snap[str(path.relative_to(top))] = (st.st_mode, st.st_size,
                                                    hashlib.sha256(path.read_bytes()).hexdigest())
            else:
                snap[str(path.relative_to(top))] = (st.st_mode, 0, "")
    return snap


@contextlib.contextmanager
def fake_server(h: Any, version: str, data: Path) -> Iterator[int]:
    """Run an installed fake server by hand, outside abssctl, on DATA (it writes .migrate and the dirs)."""
    pkg = h.paths["install_root"].joinpath(version, *PKG)
    port = free_port()
    cfg = data.parent / f"{data.name}-server.json"
    cfg.write_text(json.dumps({"dataDir": str(data), "port": port, "hostname": "127.0.0.1"}))
    log = open(data.parent / f"{data.name}-server.log", "wb")
    proc = subprocess.Popen(["/usr/bin/node", str(pkg / "build/bin/actual-server.js"), "--config", str(cfg)],
                            cwd=pkg, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, (data.parent / f"{data.name}-server.log").read_text()
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if json.loads(r.read()) == {"status": "UP"}:
                        break
            assert time.monotonic() < deadline, "the fake server did not come up"
            time.sleep(0.1)
        yield port
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)
        log.close()


def seed(data: Path, wal: bool = True) -> None:
    """account.sqlite with the real server's files table, two budget blobs and their group dbs."""
    db = sqlite3.connect(data / "server-files" / "account.sqlite")
    if wal:
        db.execute("PRAGMA journal_mode=WAL")
    db.executescript("""
        CREATE TABLE auth (method TEXT PRIMARY KEY, display_name TEXT, extra_data TEXT, active INTEGER);
        CREATE TABLE sessions (token TEXT PRIMARY KEY);
        CREATE TABLE files (id TEXT PRIMARY KEY, group_id TEXT, sync_version SMALLINT, encrypt_meta TEXT,
                            encrypt_keyid TEXT, encrypt_salt TEXT, encrypt_test TEXT,
                            deleted BOOLEAN DEFAULT FALSE, name TEXT);
        CREATE TABLE log (n INTEGER PRIMARY KEY, v TEXT);""")
    db.execute("INSERT INTO auth VALUES ('password', 'Password', '$2b$12$hash', 1)")
    for fid, (gid, name) in BUDGETS.items():
        db.execute("INSERT INTO files (id, group_id, sync_version, name) VALUES (?, ?, 2, ?)", (fid, gid, name))
        (data / "user-files" / f"file-{fid}.blob").write_bytes(b"PK\x03\x04" + os.urandom(50_000))
        group = sqlite3.connect(data / "user-files" / f"group-{gid}.sqlite")
        group.execute("CREATE TABLE messages_binary (timestamp TEXT PRIMARY KEY, is_encrypted INTEGER, content)")
        group.execute("INSERT INTO messages_binary VALUES ('t1', 0, ?)", (os.urandom(2000),))
        group.commit()
        group.close()
    db.executemany("INSERT INTO log (v) VALUES (?)", [(f"row {i}",) for i in range(200)])
    db.commit()
    db.close()


@pytest.fixture
def host(abssctl_host: Any) -> Any:
    abssctl_host.ok("version", "install", NEW)
    return abssctl_host


@pytest.fixture
def source(host: Any, tmp_path: Path) -> Path:
    """A data dir the fake 1.1.0 made (4 migrations), seeded with budgets, the server stopped."""
    data = tmp_path / "actual" / "data"
    data.mkdir(parents=True)
    with fake_server(host, NEW, data):
        pass
    seed(data, wal=False)
    return data


def _rows(db: Path, table: str = "log") -> int:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        return con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    finally:
        con.close()


def test_a_fake_server_data_dir_becomes_an_instance_and_the_source_is_untouched(host: Any, source: Path) -> None:
    before = dir_tree(source.parent)
    dry = host.ok("--dry-run", "instance", "import", "home", "--from", source, "--domain", "home.example.test",
                  "--tls", "self-signed")
    rep = dry["import"]
    assert dry["dry_run"] is True and rep["minimum_version"] == NEW and rep["version"] == NEW, rep
    assert {b["id"]: (b["group_id"], b["name"]) for b in rep["budgets"]} == BUDGETS
    assert "home" not in host.registry_doc("instances")["instances"]
    assert not (host.paths["instance_root"] / "home").exists()
    doc = host.ok("instance", "import", "home", "--from", source, "--domain", "home.example.test",
                  "--tls", "self-signed")
    inst = doc["instance"]
    assert inst["health"] == "UP" and inst["resolved_version"] == NEW, doc
    assert {b["id"] for b in doc["import"]["budgets"]} == set(BUDGETS) and doc["import"]["missing"] == []
    data = host.paths["instance_root"] / "home" / "data"
    for fid in BUDGETS:
        assert (data / "user-files" / f"file-{fid}.blob").read_bytes() == \
            (source / "user-files" / f"file-{fid}.blob").read_bytes()
    assert _rows(data / "server-files" / "account.sqlite") == 200
    assert _rows(data / "user-files" / "group-g-1.sqlite", "messages_binary") == 1
    assert json.loads((data / ".migrate").read_text())["migrations"][3]["title"]
    for path in [data, *data.rglob("*")]:
        want = 0o750 if path.is_dir() else 0o640
        assert path.stat().st_mode & 0o777 == want, path
    assert not list(data.parent.glob(".abssctl-tmp-*"))
    assert dir_tree(source.parent) == before          # nothing written to the source, not even -shm
    entry = host.registry_doc("instances")["instances"]["home"]
    assert entry["state"] == "ready" and entry["version"] == NEW


def test_a_running_source_written_to_during_the_import(host: Any, tmp_path: Path) -> None:
    data = tmp_path / "live" / "data"
    data.mkdir(parents=True)
    with fake_server(host, NEW, data):
        seed(data, wal=True)
        db = data / "server-files" / "account.sqlite"
        with sqlite_writer(db, "INSERT INTO log (v) VALUES ('during the import')", 50000) as written:
            doc = host.ok("instance", "import", "live", "--from", data, "--domain", "live.example.test",
                          "--tls", "self-signed")
    assert written[0] > 0 and doc["instance"]["health"] == "UP", doc
    got = _rows(host.paths["instance_root"] / "live" / "data" / "server-files" / "account.sqlite")
    assert 200 <= got <= 200 + written[0]
    status = host.ok("instance", "status", "live")["instances"][0]
    assert status["health"] == "UP"


def test_bad_input_exits_2_and_changes_nothing(host: Any, source: Path, tmp_path: Path) -> None:
    host.ok("instance", "create", "taken", "--domain", "taken.example.test", "--tls", "self-signed")
    outside = tmp_path / "outside.blob"
    outside.write_bytes(b"not yours")
    empty = tmp_path / "empty"
    empty.mkdir()
    escaping = tmp_path / "escaping"
    escaping.mkdir()
    (escaping / "config.json").write_text(json.dumps({"dataDir": "../actual/data"}))

    def corrupt(d: Path) -> None:
        raw = bytearray((d / "user-files" / "group-g-2.sqlite").read_bytes())
        raw[100:4096] = os.urandom(3996)
        (d / "user-files" / "group-g-2.sqlite").write_bytes(bytes(raw))

    cases = [
        ("not a data dir", empty, None, [], "not an Actual server data dir"),
        ("name exists", source, None, ["--name", "taken"], "exists already"),
        ("config escapes", escaping, None, [], "outside"),
        ("version too old", source, None, ["--version", OLD], NEW),
        ("missing blob", source, lambda d: (d / "user-files" / "file-f-2.blob").unlink(), [], "file-f-2.blob"),
        ("symlink out", source, lambda d: (d / "user-files" / "file-x.blob").symlink_to(outside), [], "outside"),
        ("corrupt sqlite", source, corrupt, [], "integrity_check"),
    ]
    for label, src, damage, extra, needle in cases:
        work = src
        if damage is not None:
            work = tmp_path / label.replace(" ", "-") / "data"
            work.parent.mkdir()
            shutil.copytree(src, work, symlinks=True)
            damage(work)
        name = extra[1] if extra[:1] == ["--name"] else "newone"
        flags = [] if extra[:1] == ["--name"] else extra
        host_before, src_before = host.tree(), dir_tree(work)
        got = host.run("--json", "instance", "import", name, "--from", work, "--domain", "new.example.test",
                       "--tls", "self-signed", *flags)
        assert got.rc == 2, (label, got)
        message = got.doc["error"]["message"]
        assert needle in message and got.doc["error"].get("hint"), (label, message)
        if label == "version too old":
            assert OLD in message, message
        assert host.tree() == host_before, label
        assert dir_tree(work) == src_before, label
    # --allow-missing imports the rest, and says what is missing
    work = tmp_path / "missing-blob" / "data"
    doc = host.ok("instance", "import", "partial", "--from", work, "--domain", "partial.example.test",
                  "--tls", "self-signed", "--allow-missing")
    assert doc["import"]["missing"] == ["f-2"] and doc["instance"]["health"] == "UP", doc
    blobs = sorted(p.name for p in (host.paths["instance_root"] / "partial" / "data" / "user-files").iterdir())
    assert "file-f-1.blob" in blobs and "file-f-2.blob" not in blobs


def test_the_dir_above_whose_config_names_the_data_dir(host: Any, source: Path) -> None:
    above = source.parent
    (above / "config.json").write_text(json.dumps({"dataDir": "./data", "port": 5006}))
    rep = host.ok("--dry-run", "instance", "import", "npm", "--from", above, "--domain", "npm.example.test",
                  "--tls", "self-signed")["import"]
    assert rep["files"] >= 5 and {b["id"] for b in rep["budgets"]} == set(BUDGETS), rep


def test_from_backup_of_an_imported_instance(host: Any, source: Path) -> None:
    host.ok("instance", "import", "orig", "--from", source, "--domain", "orig.example.test", "--tls", "self-signed")
    backup = host.ok("backup", "create", "orig")["backup"]
    archive = Path(backup["archive"])
    got = host.run("--json", "instance", "import", "copy", "--from-backup", archive, "--tls", "self-signed")
    assert got.rc == 2 and "orig.example.test" in got.doc["error"]["message"], got   # the manifest's domain
    doc = host.ok("instance", "import", "copy", "--from-backup", archive, "--domain", "copy.example.test",
                  "--tls", "self-signed")
    assert doc["instance"]["health"] == "UP" and doc["import"]["server_version"] == NEW, doc
    copied = host.paths["instance_root"] / "copy" / "data"
    assert (copied / "user-files" / "file-f-1.blob").read_bytes() == \
        (source / "user-files" / "file-f-1.blob").read_bytes()
    assert _rows(copied / "server-files" / "account.sqlite") == 200
    # a flipped byte: exit 3 (a damaged archive, as backup verify/restore say), nothing changed
    bad = archive.parent / ("x" + archive.name)
    raw = bytearray(archive.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    bad.write_bytes(bytes(raw))
    before = host.tree()
    got = host.run("--json", "instance", "import", "third", "--from-backup", bad, "--domain", "third.example.test")
    assert got.rc == 3, got
    assert host.tree() == before
