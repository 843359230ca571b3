"""§4.1 init: the tree and its modes, idempotence, dry runs, accounts, unwritable paths."""
from __future__ import annotations

import grp
import json
import os
import stat

import pytest

import abssctl

EXPECTED = {  # Paths attribute -> (mode, group is the service group)
    "templates_dir": (0o755, False), "tls_dir": (0o700, False), "install_root": (0o755, False),
    "instance_root": (0o755, False), "state_dir": (0o755, False), "registry_dir": (0o750, True),
    "journal_dir": (0o700, False), "backup_root": (0o700, False), "log_dir": (0o750, False),
    "run_dir": (0o755, False), "acme_webroot": (0o755, False),
}


def paths_of(sandbox) -> abssctl.Paths:
    cfg, _ = abssctl.load_config(str(sandbox.config), {}, {})
    return abssctl.Paths(cfg)


def test_init_creates_the_tree_with_design_modes(sandbox) -> None:
    got = sandbox.run("--json", "init")
    assert got.rc == 0, got.err
    assert got.doc["changed"] is True and got.doc["op_id"]
    p = paths_of(sandbox)
    gid = grp.getgrnam(sandbox.group).gr_gid
    for attr, (mode, service_group) in EXPECTED.items():
        st = os.stat(getattr(p, attr))
        assert stat.S_ISDIR(st.st_mode), attr
        assert stat.S_IMODE(st.st_mode) == mode, (attr, oct(st.st_mode))
        if os.geteuid() == 0:
            assert (st.st_uid, st.st_gid) == (0, gid if service_group else 0), attr
    for name in ("instances", "ports", "versions"):
        path = os.path.join(p.registry_dir, f"{name}.json")
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
        doc = json.loads(open(path).read())
        assert doc["schema_version"] == 1 and doc[name] == {}
    assert stat.S_IMODE(os.stat(p.backup_index).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(p.oplog).st_mode) == 0o640
    assert os.listdir(p.journal_dir) == []           # the journal is gone after success


def test_second_init_reports_no_change(sandbox) -> None:
    assert sandbox.run("init").rc == 0
    before = sandbox.tree()
    got = sandbox.run("--json", "init")
    assert got.rc == 0 and got.doc["changed"] is False and got.doc["steps"] == []
    after = sandbox.tree()
    changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
    assert changed <= {"var/log/abssctl/operations.jsonl", "var/log/abssctl/abssctl.log",
                       "run/abssctl/abssctl.lock"}


def test_init_fixes_modes_of_managed_paths_only(sandbox) -> None:
    assert sandbox.run("init").rc == 0
    p = paths_of(sandbox)
    os.chmod(p.tls_dir, 0o755)
    parent = os.path.dirname(p.install_root)
    os.chmod(parent, 0o700)
    got = sandbox.run("--json", "init")
    assert got.doc["changed"] is True
    assert [s["step"] for s in got.doc["steps"]] == ["fs.fix"]
    assert stat.S_IMODE(os.stat(p.tls_dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(parent).st_mode) == 0o700     # a parent: never touched


def test_dry_run_prints_the_plan_and_changes_nothing(sandbox) -> None:
    before = sandbox.tree()
    got = sandbox.run("--json", "--dry-run", "init")
    assert got.rc == 0 and got.doc["dry_run"] is True and got.doc["changed"] is False
    steps = got.doc["plan"]
    assert steps and all(set(s) == {"step", "summary", "target", "undo"} for s in steps)
    assert any(s["target"] == str(paths_of(sandbox).registry_dir) for s in steps)
    assert sandbox.tree() == before
    text = sandbox.run("init", "--dry-run")
    assert text.rc == 0 and text.out.startswith("init:\n  1. ")


def test_init_writes_a_commented_default_config_when_missing(sandbox, monkeypatch) -> None:
    for key, path in sandbox.paths.items():
        monkeypatch.setenv(f"ABSSCTL_PATHS__{key.upper()}", str(path))
    monkeypatch.setenv("ABSSCTL_SERVICE__USER", sandbox.user)
    monkeypatch.setenv("ABSSCTL_SERVICE__GROUP", sandbox.group)
    for tool, argv in sandbox.commands.items():
        monkeypatch.setenv(f"ABSSCTL_COMMANDS__{tool.upper()}", json.dumps(argv))
    cfg = sandbox.root / "etc" / "fresh" / "config.toml"
    assert sandbox.run("--json", "--config", str(cfg), "config", "show").rc == 2   # others need it
    got = sandbox.run("--json", "--config", str(cfg), "init")
    assert got.rc == 0, got.err
    assert stat.S_IMODE(os.stat(cfg).st_mode) == 0o644
    text = cfg.read_text()
    for section, keys in abssctl.CONFIG_SCHEMA.items():
        assert f"[{section}]" in text
        assert all(f"# {key} = " in text for key in keys)
    assert sandbox.run("--json", "--config", str(cfg), "config", "check").rc == 0


def test_user_creation_needs_the_flag_without_a_terminal(sandbox) -> None:
    sandbox.configure("service", user="abssctl-test-nouser")
    before = sandbox.tree()
    got = sandbox.run("--json", "init")
    assert got.rc == 2 and got.doc["error"]["kind"] == "NeedsConfirmation"
    assert "--allow-create-user" in got.doc["error"]["hint"]
    got = sandbox.run("--json", "--yes", "init")        # --yes takes the default, which is "no"
    assert got.rc == 2 and got.doc["error"]["kind"] == "NeedsConfirmation"
    assert sandbox.tree() == before and sandbox.calls("useradd") == []


def test_allow_create_user_runs_useradd_with_the_design_argv(sandbox) -> None:
    sandbox.configure("service", user="abssctl-test-nouser")
    got = sandbox.run("--json", "init", "--allow-create-user")
    assert got.rc == 0, got.err
    assert sandbox.calls("useradd") == [["useradd", "--system", "--gid", sandbox.group, "--no-create-home",
                                         "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin",
                                         "abssctl-test-nouser"]]
    assert sandbox.calls("groupadd") == []


def test_missing_group_is_created_first(sandbox) -> None:
    sandbox.configure("service", user="abssctl-test-nouser", group="abssctl-test-nogroup")
    got = sandbox.run("--json", "init", "--allow-create-user")
    assert got.rc == 0, got.err
    tools = [c[0] for c in sandbox.calls() if c[0] in ("useradd", "groupadd")]
    assert tools == ["groupadd", "useradd"]
    assert sandbox.calls("groupadd") == [["groupadd", "--system", "abssctl-test-nogroup"]]


@pytest.mark.parametrize("bad", ["Root", "9lives", "a b", "x" * 40])
def test_bad_account_names_exit_2(sandbox, bad: str) -> None:
    sandbox.configure("service", user=bad)
    before = sandbox.tree()
    got = sandbox.run("--json", "init")
    assert got.rc == 2 and sandbox.tree() == before


def test_a_path_under_a_file_exits_3_and_changes_nothing(sandbox) -> None:
    blocker = sandbox.root / "blocker"
    blocker.write_text("not a directory")
    sandbox.configure("paths", state_dir=str(blocker / "state"))
    before = sandbox.tree()
    got = sandbox.run("--json", "init")
    assert got.rc == 3 and got.doc["error"]["kind"] == "HostError"
    assert str(blocker) in got.doc["error"]["message"]
    assert sandbox.tree() == before


def test_unwritable_directory_exits_3(sandbox) -> None:
    ro = sandbox.root / "ro"
    ro.mkdir()
    ret = os.system(f"mount -t tmpfs -o ro,size=1m tmpfs {ro} 2>/dev/null")
    if ret != 0:
        os.chmod(ro, 0o555)
        if os.geteuid() == 0:
            pytest.skip("cannot mount a read-only tmpfs here and root ignores mode bits")
    try:
        sandbox.configure("paths", log_dir=str(ro / "log"))
        got = sandbox.run("--json", "init")
        assert got.rc == 3 and got.doc["error"]["kind"] == "PermissionDenied"
        assert str(ro) in got.doc["error"]["message"]
    finally:
        os.system(f"umount {ro} 2>/dev/null")


def test_init_is_logged_with_its_steps(sandbox) -> None:
    assert sandbox.run("init").rc == 0
    got = sandbox.run("--json", "history", "-n", "1")
    record = got.doc["operations"][0]
    assert record["command"] == "init" and record["result"] == "ok" and record["exit_code"] == 0
    assert record["steps"] and all(s["status"] == "done" for s in record["steps"])
    assert record["schema_version"] == 1 and record["ts"].endswith("Z")
