"""Disk full and read-only (DESIGN §4.8.1 steps 1 and 5, §2.4): a 2 MiB tmpfs as backup_root, and a
read-only bind mount of the state dir. Each command exits 3 with a clear message and leaves
nothing partial."""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess
from pathlib import Path

import pytest

from reliability.rigs import RHost, registry, rhost, tree_diff  # noqa: F401
from reliability.scenarios import seed

pytestmark = pytest.mark.reliability


def mount(*argv: str) -> None:
    got = subprocess.run(["mount", *argv], capture_output=True, text=True, timeout=30)
    if got.returncode != 0:
        pytest.skip(f"cannot mount ({' '.join(argv)}): {got.stderr.strip()}")


def umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


@pytest.fixture
def small_backup_root(rhost: RHost, tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("small") / "backups"
    d.mkdir()
    mount("-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(d))
    try:
        rhost.sb.configure("paths", backup_root=str(d))
        yield d
    finally:
        umount(d)


def listing(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): (p.read_bytes() if p.is_file() else b"<dir>") for p in sorted(d.rglob("*"))}


def _alice(h: RHost, blob: int) -> Path:
    h.ok("instance", "create", "alice", "--domain", "alice.example.org")
    data = Path(h.sb.paths["instance_root"]) / "alice" / "data"
    seed(data, blob_bytes=blob)
    return data


def test_backup_larger_than_the_free_space_is_refused_before_writing(rhost: RHost, small_backup_root: Path) -> None:
    h = rhost
    _alice(h, 3_000_000)
    first = h.run("--json", "backup", "create", "alice", "--compression", "none")
    before = listing(small_backup_root)
    assert first.rc == 3 and first.doc["error"]["kind"] == "DiskFull", first.err
    assert "free" in first.doc["error"]["message"] and "Traceback" not in first.err
    assert not [p for p in before if ".abssctl-tmp-" in p or p.endswith((".tar", ".sha256"))], before


def test_disk_filling_up_during_the_archive_write_exits_3_and_leaves_nothing(rhost: RHost,
                                                                             small_backup_root: Path) -> None:
    """The pre-check passes (1.1 x the data fits), but snapshots plus archive do not: ENOSPC mid-write."""
    h = rhost
    data = _alice(h, 1_000)
    ok = h.run("--json", "backup", "create", "alice", "--compression", "none")      # a small one fits
    assert ok.rc == 0, ok.err
    index = (small_backup_root / "backups.json").read_bytes()
    before = listing(small_backup_root)
    con = sqlite3.connect(data / "server-files" / "account.sqlite")     # snapshotted into backup_root too
    con.executemany("INSERT INTO t (v) VALUES (?)", [(os.urandom(3000).hex(),) for _ in range(100)])
    con.commit()
    con.close()
    db = (data / "server-files" / "account.sqlite").stat().st_size
    free = os.statvfs(small_backup_root).f_bavail * os.statvfs(small_backup_root).f_frsize
    (data / "user-files" / "file-abc.blob").write_bytes(os.urandom(int(free / 1.1) - db - 60_000))
    got = h.run("--json", "backup", "create", "alice", "--compression", "none")
    assert got.rc == 3, f"rc={got.rc}\n{got.out}\n{got.err}"
    assert got.doc["error"]["kind"] == "DiskFull", got.doc
    assert "space" in got.doc["error"]["message"].lower() and "Traceback" not in got.err
    assert (small_backup_root / "backups.json").read_bytes() == index
    assert listing(small_backup_root) == before, sorted(set(listing(small_backup_root)) ^ set(before))
    assert registry(h.sb, "instances")["instances"]["alice"]["last_backup_id"] == ok.doc["backup"]["id"]
    assert not list((Path(h.sb.paths["state_dir"]) / "journal").iterdir())


@pytest.fixture
def read_only(rhost: RHost):
    mounted: list[Path] = []

    def make(path: Path) -> None:
        mount("--bind", str(path), str(path))
        mounted.append(path)
        mount("-o", "remount,bind,ro", str(path))
    yield make
    for path in reversed(mounted):
        umount(path)


@pytest.mark.parametrize("argv", [
    ["instance", "create", "bob", "--domain", "bob.example.org"],
    ["instance", "stop", "alice"],
    ["backup", "create", "alice"],
    ["instance", "set-port", "alice", "{PORT}"],
], ids=["create", "stop", "backup-create", "set-port"])
def test_a_read_only_state_dir_fails_mutations_with_exit_3_and_nothing_partial(rhost: RHost, read_only,
                                                                               argv: list[str]) -> None:
    h = rhost
    h.ok("instance", "create", "alice", "--domain", "alice.example.org")
    argv = [a.replace("{PORT}", str(h.sb.base + 7)) for a in argv]
    before, units = h.sb.tree(), h.sb.systemctl_units()
    read_only(Path(h.sb.paths["state_dir"]))
    got = h.run("--json", *argv)
    assert got.rc == 3, f"rc={got.rc}\n{got.out}\n{got.err}"
    err = got.doc["error"]
    assert err["kind"] in ("PermissionDenied", "HostError"), err
    assert "read-only" in err["message"].lower(), err
    assert "Traceback" not in got.err
    assert tree_diff(before, h.sb.tree()) == []
    assert {u: (r.get("ActiveState"), r.get("UnitFileState")) for u, r in h.sb.systemctl_units().items()} == \
        {u: (r.get("ActiveState"), r.get("UnitFileState")) for u, r in units.items()}


def test_a_read_only_backup_root_fails_backup_create_with_exit_3(rhost: RHost, read_only) -> None:
    h = rhost
    _alice(h, 10_000)
    broot = Path(h.sb.paths["backup_root"])
    (broot / "alice").mkdir(mode=0o700, exist_ok=True)
    before = h.sb.tree()
    read_only(broot)
    got = h.run("--json", "backup", "create", "alice")
    assert got.rc == 3, f"rc={got.rc}\n{got.out}\n{got.err}"
    assert "read-only" in got.doc["error"]["message"].lower(), got.doc
    assert tree_diff(before, h.sb.tree()) == []
    assert json.loads(json.dumps(registry(h.sb, "instances")))["instances"]["alice"]["last_backup_id"] is None
