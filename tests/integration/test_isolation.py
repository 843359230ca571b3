"""One system user per instance (DESIGN §11.5) against the real rig: the real useradd/usermod/userdel,
the systemctl replacement (which runs the fake server as the unit's User=), nginx.

Every account these tests make is named `abt<4 hex>-<instance>` (a prefix no real account has), and the
fixture removes each one with userdel/groupdel at teardown, whatever the test did.
"""
from __future__ import annotations

import grp
import json
import os
import pwd
import stat
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest

from reliability.rigs import run_child

pytestmark = pytest.mark.integration


def _accounts(prefix: str) -> tuple[list[str], list[str]]:
    users = [p.pw_name for p in pwd.getpwall() if p.pw_name.startswith(prefix)]
    groups = [g.gr_name for g in grp.getgrall() if g.gr_name.startswith(prefix)]
    return users, groups


@pytest.fixture
def tmp_path() -> Iterator[Path]:
    """The rig's tree outside pytest's 0700 /tmp/pytest-of-root (which every pytest session starting on
    this machine chmods back to 0700): the instance users, and the replacement as them, must traverse it."""
    import shutil
    import tempfile
    top = Path(tempfile.mkdtemp(prefix="abt-iso-", dir="/tmp"))
    os.chmod(top, 0o711)
    yield top
    shutil.rmtree(top, ignore_errors=True)


@pytest.fixture
def iso(abssctl_host: Any) -> Iterator[Any]:
    """abssctl_host (in a tree the instance users can traverse) with [service] user_prefix = abtXXXX-."""
    if os.geteuid() != 0:
        pytest.skip("needs root: real system users")
    h = abssctl_host
    prefix = f"abt{os.urandom(2).hex()}-"
    h.prefix = prefix
    h.configure("service", user_prefix=prefix)
    try:
        yield h
    finally:
        for name in h.registry_doc("instances").get("instances", {}):
            h.run("instance", "stop", name)        # userdel refuses a user with running processes
        users, groups = _accounts(prefix)
        for u in users:
            subprocess.run(["userdel", u], check=False, capture_output=True, timeout=30)
        for g in _accounts(prefix)[1]:
            subprocess.run(["groupdel", g], check=False, capture_output=True, timeout=30)
        assert _accounts(prefix) == ([], []), "accounts left behind"


def owner(path: Path) -> tuple[int, int, int]:
    st = os.lstat(path)
    return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)


def assert_own_layout(h: Any, name: str) -> pwd.struct_passwd:
    user = h.prefix + name
    pw = pwd.getpwnam(user)
    gid = grp.getgrnam(user).gr_gid
    assert pw.pw_shell == "/usr/sbin/nologin" and pw.pw_gid == gid
    root = h.paths["instance_root"] / name
    assert owner(root) == (0, gid, 0o750)
    assert owner(root / "config.json") == (pw.pw_uid, gid, 0o640)
    assert owner(root / "data") == (pw.pw_uid, gid, 0o700)
    for dirpath, dirs, files in os.walk(root / "data"):
        for n in dirs + files:
            assert os.lstat(os.path.join(dirpath, n)).st_uid == pw.pw_uid, os.path.join(dirpath, n)
    unit = (h.systemd.unit_dir / f"abssctl-{name}.service").read_text()
    assert f"\nUser={user}\n" in unit and f"\nGroup={user}\n" in unit
    assert h.registry_doc("instances")["instances"][name]["user"] == user
    return pw


def test_create_rename_delete_give_each_instance_its_own_user(iso: Any) -> None:
    h = iso
    doc = h.ok("instance", "create", "alice", "--domain", "alice.example.test", "--tls", "self-signed")
    assert doc["instance"]["health"] == "UP"
    pw = assert_own_layout(h, "alice")
    h.ok("instance", "create", "bob", "--domain", "bob.example.test", "--tls", "self-signed")
    bob = assert_own_layout(h, "bob")
    assert bob.pw_uid != pw.pw_uid
    # alice's user cannot read bob's data (0700 to another uid)
    got = subprocess.run(["runuser", "-u", h.prefix + "alice", "--", "ls", str(h.paths["instance_root"] / "bob" /
                                                                             "data")],
                         capture_output=True, text=True, timeout=30)
    assert got.returncode != 0 and "Permission denied" in got.stderr

    h.ok("--yes", "instance", "rename", "alice", "carol")
    moved = assert_own_layout(h, "carol")
    assert moved.pw_uid == pw.pw_uid                    # usermod -l keeps the uid: no chown needed
    assert _accounts(h.prefix + "alice") == ([], [])

    h.ok("--yes", "instance", "delete", "carol")         # data kept: it goes to root, the user goes
    kept = h.paths["instance_root"] / "carol"
    assert owner(kept)[:2] == (0, 0) and owner(kept / "data")[:2] == (0, 0)
    assert all(os.lstat(os.path.join(d, n)).st_uid == 0 for d, ds, fs in os.walk(kept) for n in ds + fs)
    assert _accounts(h.prefix + "carol") == ([], [])

    h.ok("--yes", "instance", "delete", "bob", "--purge-data", "--no-backup")
    assert _accounts(h.prefix + "bob") == ([], [])
    assert not (h.paths["instance_root"] / "bob").exists()


def test_restore_gives_the_data_to_the_instance_user(iso: Any) -> None:
    h = iso
    h.ok("instance", "create", "alice", "--domain", "alice.example.test", "--tls", "self-signed")
    data = h.paths["instance_root"] / "alice" / "data"
    (data / "user-files" / "file-1.blob").write_bytes(b"budget")
    pw = pwd.getpwnam(h.prefix + "alice")
    os.chown(data / "user-files" / "file-1.blob", pw.pw_uid, pw.pw_gid)
    bid = h.ok("backup", "create", "alice")["backup"]["id"]
    (data / "user-files" / "file-1.blob").unlink()
    h.ok("--yes", "backup", "restore", bid)
    assert (data / "user-files" / "file-1.blob").read_bytes() == b"budget"
    assert_own_layout(h, "alice")


def test_a_name_that_makes_too_long_a_user_exits_2_and_changes_nothing(iso: Any) -> None:
    h = iso
    before = h.tree()
    name = "n" * (33 - len(h.prefix))
    got = h.run("--json", "instance", "create", name, "--domain", "long.example.test", "--tls", "self-signed")
    assert got.rc == 2 and "useradd allows at most 32" in got.err and "at most" in got.doc["error"]["hint"]
    assert h.tree() == before and _accounts(h.prefix) == ([], [])
    h.ok("instance", "create", "alice", "--domain", "alice.example.test", "--tls", "self-signed")
    before = h.tree()
    got = h.run("--json", "--yes", "instance", "rename", "alice", name)
    assert got.rc == 2 and "useradd allows at most 32" in got.err
    assert h.tree() == before


def _old_style(h: Any, name: str) -> None:
    """An instance as the first edition made it: the shared user (root in this rig)."""
    h.configure("service", user_prefix="")
    h.ok("instance", "create", name, "--domain", f"{name}.example.test", "--tls", "self-signed")
    h.configure("service", user_prefix=h.prefix)
    assert "user" not in h.registry_doc("instances")["instances"][name]


def test_doctor_fix_moves_an_old_style_instance_to_its_own_user(iso: Any) -> None:
    h = iso
    _old_style(h, "alice")
    got = h.run("--json", "doctor")
    found = [f for f in got.doc["probes"] if f["id"] == "fs.user" and f["target"] == "alice"]
    assert found and found[0]["status"] == "warn" and found[0]["fixable"]
    assert "runs as the shared user" in found[0]["message"]
    fixed = h.run("--json", "--yes", "doctor", "--fix")
    assert fixed.doc["changed"] is True, fixed
    assert_own_layout(h, "alice")
    assert h.ok("instance", "status", "alice") is not None
    ops = [json.loads(x) for x in (h.paths["log_dir"] / "operations.jsonl").read_text().splitlines()]
    own = [o for o in ops if o.get("args", {}).get("user") == h.prefix + "alice"]
    assert own and own[-1]["result"] == "ok" and own[-1]["target"] == {"kind": "instance", "name": "alice"}
    again = h.run("--json", "--yes", "doctor", "--fix")
    assert [f for f in again.doc["probes"] if f["id"] == "fs.user" and f["status"] != "ok"] == []


def test_kill9_at_each_step_of_the_move_then_doctor_fix_converges(iso: Any) -> None:
    h = iso
    _old_style(h, "alice")
    proc, seen = run_child(h, "count", 0, ["--yes", "doctor", "--fix"])
    assert proc.returncode in (0, 3, 4), proc.stderr
    steps = [s for s, phase, _c in (seen or []) if phase == "after"]
    assert steps[:2] == ["accounts.create", "systemctl.stop"] and "fs.owner" in steps and "unit.write" in steps
    assert_own_layout(h, "alice")
    h.ok("--yes", "instance", "delete", "alice", "--purge-data", "--no-backup")
    for k in range(len(steps) + 1):
        name = f"m{k}"
        _old_style(h, name)
        proc, note = run_child(h, "kill", k, ["--yes", "doctor", "--fix"])
        assert proc.returncode == -9 and note, (k, proc.stderr[-2000:])
        fixed = h.run("--json", "--yes", "doctor", "--fix")
        assert fixed.doc is not None, (k, fixed)
        assert h.registry_doc("instances")["instances"][name].get("user"), (k, fixed.err[-3000:])
        assert_own_layout(h, name)
        status = h.ok("instance", "status", name)
        assert json.dumps(status).count('"UP"') >= 1, (k, status)
        assert not list(h.paths["state_dir"].glob("journal/*.json")), k
        h.ok("--yes", "instance", "delete", name, "--purge-data", "--no-backup")
        assert _accounts(h.prefix + name) == ([], [])


def test_import_gives_the_data_to_the_new_instance_user(iso: Any) -> None:
    """instance import, from a data dir and from a backup, makes the new instance's user and hands it
    the data (the source is another instance here: its data dir, stopped, and its backup)."""
    from .test_import import seed
    h = iso
    h.ok("instance", "create", "alice", "--domain", "alice.example.test", "--tls", "self-signed")
    h.ok("instance", "stop", "alice")
    data = h.paths["instance_root"] / "alice" / "data"
    seed(data, wal=False)                                 # the account database and two budgets
    bid = h.ok("backup", "create", "alice")["backup"]["id"]
    doc = h.ok("instance", "import", "bob", "--from", str(data), "--domain", "bob.example.test",
               "--tls", "self-signed")
    assert doc["instance"]["health"] == "UP", doc
    bob = assert_own_layout(h, "bob")
    assert owner(data)[0] == pwd.getpwnam(h.prefix + "alice").pw_uid      # the source keeps its owner
    blobs = sorted(p.name for p in (h.paths["instance_root"] / "bob" / "data" / "user-files").glob("*.blob"))
    assert blobs == sorted(p.name for p in (data / "user-files").glob("*.blob")) and len(blobs) == 2
    archive = h.paths["backup_root"] / "alice" / f"{bid}.tar.zst"
    doc = h.ok("instance", "import", "carol", "--from-backup", str(archive), "--domain", "carol.example.test",
               "--tls", "self-signed")
    assert doc["instance"]["health"] == "UP", doc
    assert assert_own_layout(h, "carol").pw_uid not in (bob.pw_uid, pwd.getpwnam(h.prefix + "alice").pw_uid)


def test_restore_test_runs_the_server_as_the_instance_user(iso: Any) -> None:
    h = iso
    seen = h.root / "node-users.log"
    seen.touch()
    os.chmod(seen, 0o666)                               # every instance user appends to it
    wrapper = h.root / "node-who"
    wrapper.write_text(f'#!/bin/sh\necho "$(id -un) $*" >> {seen}\nexec /usr/bin/node "$@"\n')
    wrapper.chmod(0o755)
    h.configure("commands", node=[str(wrapper)])
    h.ok("instance", "create", "alice", "--domain", "alice.example.test", "--tls", "self-signed")
    bid = h.ok("backup", "create", "alice")["backup"]["id"]
    doc = h.ok("backup", "verify", bid, "--restore-test")
    assert doc["restore_test"]["health"] == "UP", doc
    drills = [line.split()[0] for line in seen.read_text().splitlines() if ".smoke-restore-test-" in line]
    assert drills == [h.prefix + "alice"], seen.read_text()
    assert not list(h.paths["install_root"].glob(".smoke-restore-test-*"))


def test_a_changed_user_prefix_is_for_new_users_and_running_instances_keep_theirs(iso: Any) -> None:
    h = iso
    h.ok("instance", "create", "alice", "--domain", "alice.example.test", "--tls", "self-signed")
    alice = assert_own_layout(h, "alice")
    first = h.prefix
    h.prefix = first + "n"             # still under the fixture's prefix, so its teardown removes these too
    h.configure("service", user_prefix=h.prefix)
    h.ok("instance", "create", "bob", "--domain", "bob.example.test", "--tls", "self-signed")
    assert_own_layout(h, "bob")
    # set-port re-renders alice's unit with the user she has, not one made from the new prefix
    port = h.ok("instance", "show", "alice")["instance"]["port"]
    h.ok("instance", "set-port", "alice", str(port + 7))
    unit = (h.systemd.unit_dir / "abssctl-alice.service").read_text()
    assert f"\nUser={first}alice\n" in unit, unit
    assert owner(h.paths["instance_root"] / "alice" / "data")[:2] == (alice.pw_uid, alice.pw_gid)
    assert h.ok("instance", "status", "alice")["instances"][0]["health"] == "UP"
    doc = h.run("--json", "doctor", "--only", "fs").doc
    assert [f["status"] for f in doc["probes"] if f["id"] == "fs.user"] == ["ok", "ok"], doc
    # a rename takes the prefix of today: the same uid under the new name
    h.ok("--yes", "instance", "rename", "alice", "carol")
    assert assert_own_layout(h, "carol").pw_uid == alice.pw_uid
    assert _accounts(first + "alice") == ([], [])
