"""The mutating commands the kill -9 and Ctrl-C matrices interrupt: how to set each one up, its
argv, and what a converged re-run must have produced."""
from __future__ import annotations

import dataclasses
import hashlib
import os
import sqlite3
from pathlib import Path
from typing import Any, Callable

from reliability.rigs import RHost, registry

DOMAIN = "alice.example.org"


def seed(data: Path, blob_bytes: int = 300_000) -> None:
    """A live-looking data dir: a WAL SQLite account db, a group db and a blob."""
    db = sqlite3.connect(data / "server-files" / "account.sqlite")
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE IF NOT EXISTS t (n INTEGER PRIMARY KEY, v TEXT)")
    db.executemany("INSERT INTO t (v) VALUES (?)", [(f"row {i}",) for i in range(200)])
    db.commit()
    db.close()
    group = sqlite3.connect(data / "user-files" / "group-1.sqlite")
    group.execute("CREATE TABLE IF NOT EXISTS m (k TEXT)")
    group.execute("INSERT INTO m VALUES ('budget')")
    group.commit()
    group.close()
    (data / "user-files" / "file-abc.blob").write_bytes(os.urandom(blob_bytes))


def data_digest(data: Path) -> dict[str, str]:
    """Rows of the databases and bytes of the other files (SQLite files differ byte-wise after a
    snapshot, so they are compared by content)."""
    out = {}
    for root, _dirs, files in os.walk(data):
        for name in files:
            path = Path(root) / name
            rel = str(path.relative_to(data))
            if rel.endswith(("-wal", "-shm", "-journal")):
                continue
            if name.endswith(".sqlite"):
                con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
                try:
                    rows = []
                    for (table,) in con.execute("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name"):
                        rows += [table, *map(repr, con.execute(f"SELECT * FROM {table}"))]
                finally:
                    con.close()
                out[rel] = hashlib.sha256("\n".join(rows).encode()).hexdigest()
            else:
                out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def alice_data(h: RHost) -> Path:
    return Path(h.sb.paths["instance_root"]) / "alice" / "data"


@dataclasses.dataclass
class Scenario:
    command: str                                   # as the journal and ops log name it
    setup: Callable[[RHost, dict[str, Any]], None]
    argv: Callable[[dict[str, Any]], list[str]]
    verify: Callable[[RHost, dict[str, Any], Any], list[str]]
    kept_dirs: tuple[str, ...] = ()
    kept_aside: tuple[str, ...] = ()               # name prefixes DESIGN says are kept (never deleted)


# -- setups -------------------------------------------------------------------------------------

def _nothing(h: RHost, ctx: dict[str, Any]) -> None:
    pass


def _alice(h: RHost, ctx: dict[str, Any]) -> None:
    h.ok("instance", "create", "alice", "--domain", DOMAIN, "--tls", "self-signed")
    seed(alice_data(h))


def _alice_with_backup(h: RHost, ctx: dict[str, Any]) -> None:
    _alice(h, ctx)
    ctx["backup"] = h.ok("backup", "create", "alice", "-m", "baseline")["backup"]["id"]
    ctx["digest"] = data_digest(alice_data(h))
    ctx["backups"] = len(registry(h.sb, "backups")["backups"])


def _restore_setup(h: RHost, ctx: dict[str, Any]) -> None:
    _alice_with_backup(h, ctx)
    data = alice_data(h)
    (data / "user-files" / "file-abc.blob").write_bytes(b"changed after the backup")
    (data / "user-files" / "new.blob").write_bytes(b"new after the backup")
    con = sqlite3.connect(data / "server-files" / "account.sqlite")
    con.execute("DELETE FROM t")
    con.commit()
    con.close()


def _switch_setup(h: RHost, ctx: dict[str, Any]) -> None:
    h.ok("version", "install", "26.8.1")
    _alice(h, ctx)


# -- what convergence must show -----------------------------------------------------------------

def _created(h: RHost, ctx: dict[str, Any], res: Any) -> list[str]:
    e = registry(h.sb, "instances")["instances"].get("alice")
    out = [] if e and e["domain"] == DOMAIN else [f"alice not registered: {e}"]
    if res.doc["instance"].get("health") != "UP" and res.doc.get("changed"):
        out.append(f"re-run did not gate alice: {res.doc['instance']}")
    return out


def _renamed(h: RHost, ctx: dict[str, Any], res: Any) -> list[str]:
    insts = registry(h.sb, "instances")["instances"]
    out = [] if list(insts) == ["alicia"] else [f"instances after rename: {sorted(insts)}"]
    for b in registry(h.sb, "backups")["backups"].values():
        if b["instance"] != "alicia" or not b["archive"].startswith("alicia/"):
            out.append(f"backup {b['id']} still belongs to {b['instance']} at {b['archive']}")
    root = Path(h.sb.paths["instance_root"])
    if (root / "alice").exists() or data_digest(root / "alicia" / "data") != ctx["digest"]:
        out.append("the data did not move to alicia intact")
    return out


def _deleted(h: RHost, ctx: dict[str, Any], res: Any) -> list[str]:
    out = []
    if registry(h.sb, "instances")["instances"]:
        out.append("alice still registered")
    if (Path(h.sb.paths["instance_root"]) / "alice").exists():
        out.append("alice's dir survived --purge-data")
    reasons = [b["reason"] for b in registry(h.sb, "backups")["backups"].values()]
    if "manual" not in reasons:
        out.append(f"backups after delete: {reasons}")
    return out


def _backed_up(h: RHost, ctx: dict[str, Any], res: Any) -> list[str]:
    index = registry(h.sb, "backups")["backups"]
    new = res.doc["backup"]["id"]
    out = [] if new in index and len(index) >= ctx["backups"] + 1 else [f"index after backup: {sorted(index)}"]
    return out


def _restored(h: RHost, ctx: dict[str, Any], res: Any) -> list[str]:
    got = data_digest(alice_data(h))
    out = [] if got == ctx["digest"] else [f"restored data differs: {sorted(set(got.items()) ^ set(ctx['digest'].items()))}"]
    e = registry(h.sb, "instances")["instances"]["alice"]
    if (e.get("last_restore") or {}).get("backup_id") != ctx["backup"]:
        out.append(f"last_restore not recorded: {e.get('last_restore')}")
    return out


def _installed(h: RHost, ctx: dict[str, Any], res: Any) -> list[str]:
    v = registry(h.sb, "versions")["versions"].get("26.8.1")
    return [] if v and Path(v["path"], "node_modules").is_dir() else [f"26.8.1 not installed: {v}"]


def _switched(h: RHost, ctx: dict[str, Any], res: Any) -> list[str]:
    out = []
    if registry(h.sb, "versions")["current"] != "26.8.1":
        out.append(f"current is {registry(h.sb, 'versions')['current']}")
    e = registry(h.sb, "instances")["instances"]["alice"]
    if e["resolved_version"] != "26.8.1":
        out.append(f"alice runs {e['resolved_version']}")
    return out


SCENARIOS: dict[str, Scenario] = {s.command: s for s in [
    Scenario("instance create", _nothing,
             lambda c: ["instance", "create", "alice", "--domain", DOMAIN, "--tls", "self-signed"], _created),
    Scenario("instance rename", _alice_with_backup, lambda c: ["instance", "rename", "alice", "alicia"], _renamed),
    # with its final pre-delete backup (a safety backup: kept by a rollback, like pre-restore's)
    Scenario("instance delete", _alice_with_backup,
             lambda c: ["--yes", "instance", "delete", "alice", "--purge-data"], _deleted),
    Scenario("backup create", _alice_with_backup, lambda c: ["backup", "create", "alice", "-m", "again"],
             _backed_up),
    Scenario("backup restore", _restore_setup, lambda c: ["--yes", "backup", "restore", c["backup"]], _restored),
    Scenario("version install", _nothing, lambda c: ["version", "install", "26.8.1"], _installed),
    # DESIGN §4.4.4: a rolled-back switch keeps the instance's data as data.failed-switch-<op_id>
    Scenario("version switch", _switch_setup, lambda c: ["version", "switch", "26.8.1"], _switched,
             kept_aside=("data.failed-switch-",)),
]}
