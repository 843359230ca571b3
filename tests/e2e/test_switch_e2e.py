"""E2E: `version switch` with the real server, failed then successful (DESIGN §4.4.4, §4.9, §7(c)).

One host per module (``e2e_host``, tests/rig/e2e_host.py) with 25.6.0 and 26.8.1 on Node 22, units
under the systemctl replacement and vhosts in a sandbox nginx. ``current`` is set to 25.6.0 and
``alice`` and ``bob`` follow it; each gets a password (``/account/bootstrap``) and a budget file
(``/sync/upload-user-file``) through nginx before anything is switched.

``[commands] node`` is ``node-fail-after-migrations`` (``NODE_WRAPPER`` below), so every unit's
ExecStart goes through it. It execs the real Node 22, except when the marker file exists and names
the sync-server version being started: then it passes the server's output through and, once the
server logs ``Migrations: DONE`` (``console.log`` in the package's ``migrations`` module, 25.6.0
and 26.8.1 alike), stops the server and exits 1. So with the marker naming 26.8.1, alice (first in
the rolling order) fails her health gate on 26.8.1 *after* 26.8.1 has migrated her data.

26.8.1 carries two migrations 25.6.0 does not know, and 25.6.0's migrate loader refuses to start on
a ``.migrate`` that names them ("Missing migration file"), which the failure test shows on a copy of
the data 26.8.1 left behind. A healthy 25.6.0 alice with a working login after the rollback
therefore proves the data was rolled back, not just the package.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from rig.e2e import V25, V26, NodeRuntime, PhaseTimings, start_server
from rig.e2e_host import (E2EHost, download_user_file, e2e_host, healthy,  # noqa: F401  (the fixture)
                          bootstrap_and_login, login, upload_user_file, user_files)
from rig.systemd_sandbox import pid_alive

pytestmark = pytest.mark.e2e

NAMES = ("alice", "bob")
DOMAINS = {"alice": "alice.switch.test", "bob": "bob.switch.test"}
PASSWORDS = {"alice": "switch-alice-password-1", "bob": "switch-bob-password-2"}
LABEL = f"switch:{V25}->{V26}"

NODE_WRAPPER = '''#!/usr/bin/python3 -S
"""[commands] node of tests/e2e/test_switch_e2e.py: the real node, failing one version on purpose.

Without the marker {marker}, or when it does not name the @actual-app/sync-server version whose
bin is in the arguments, this is an exec of {node}. Otherwise the server runs as a child whose
output is passed through; once it logs "Migrations: DONE" while the marker still names that
version, the server is stopped and this exits 1.
"""
import json, os, signal, subprocess, sys

NODE = {node!r}
MARKER = {marker!r}


def server_version(argv):
    for arg in argv:
        if not (arg.endswith(".js") and os.path.isfile(arg)):
            continue
        d = os.path.dirname(os.path.abspath(arg))
        while d != "/":
            try:
                with open(os.path.join(d, "package.json"), encoding="utf-8") as fh:
                    doc = json.load(fh)
            except (OSError, ValueError):
                doc = None
            if isinstance(doc, dict) and doc.get("name") == "@actual-app/sync-server":
                return doc.get("version")
            d = os.path.dirname(d)
    return None


def marked():
    try:
        with open(MARKER, encoding="utf-8") as fh:
            return fh.read().strip()
    except FileNotFoundError:
        return None


argv = sys.argv[1:]
version = server_version(argv)
if version is None or marked() != version:
    os.execv(NODE, [NODE, *argv])
child = subprocess.Popen([NODE, *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(sig, lambda signum, _frame: child.send_signal(signum))
out = sys.stdout.buffer
for line in child.stdout:
    out.write(line)
    out.flush()
    if b"Migrations: DONE" in line and marked() == version:
        out.write(("node-fail-after-migrations: the marker names " + version + ": stopping the server "
                   "after its migrations and exiting 1\\n").encode())
        out.flush()
        child.terminate()
        try:
            child.wait(timeout=20)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait(timeout=20)
        sys.exit(1)
sys.exit(child.wait())
'''
WRAPPER_NOTE = "node-fail-after-migrations: the marker names " + V26


@dataclass
class Budget:
    """What one instance holds, written through the API before the switch."""

    password: str
    file_id: str
    body: bytes


@dataclass
class Fleet:
    host: E2EHost
    wrapper: Path
    marker: Path
    budgets: dict[str, Budget] = field(default_factory=dict)
    failed_op: str | None = None


def data_dir(h: E2EHost, name: str) -> Path:
    return h.paths["instance_root"] / name / "data"


def migrate_titles(data: Path) -> list[str]:
    """The migration titles recorded in DATA/.migrate (what the server ran on that data)."""
    doc = json.loads((data / ".migrate").read_text(encoding="utf-8"))
    return sorted(m["title"] for m in doc["migrations"])


def last_switch_record(h: E2EHost) -> dict[str, Any]:
    """The last line of <log_dir>/operations.jsonl; it must be a version switch."""
    lines = (h.paths["log_dir"] / "operations.jsonl").read_text(encoding="utf-8").splitlines()
    record = json.loads(lines[-1])
    assert record["command"] == "version switch", record
    return record


def current_link(h: E2EHost) -> str:
    return os.readlink(h.install_root / "current")


def assert_on(h: E2EHost, version: str) -> dict[str, Any]:
    """current is VERSION on disk, in `version list` and in the registry, and every instance runs it
    on data it migrated; returns the instances registry."""
    assert current_link(h) == version
    listed = h.ok("version", "list")
    assert listed["current"] == version, listed
    assert [v["version"] for v in listed["versions"] if v["current"]] == [version], listed
    insts = h.state("instances")["instances"]
    for name in NAMES:
        assert insts[name]["resolved_version"] == insts[name]["data_version"] == version, insts[name]
    return insts


def info_version(h: E2EHost, name: str) -> str | None:
    got = h.https(DOMAINS[name], "/info")
    assert got.status == 200, got.describe()
    return (got.json() or {}).get("build", {}).get("version")


def data_is_there(h: E2EHost, name: str, budget: Budget) -> None:
    """The old password logs in and the budget file is listed and downloads byte for byte."""
    token = login(h, DOMAINS[name], budget.password)
    assert user_files(h, DOMAINS[name], token) == {budget.file_id: f"{name}'s budget"}
    down = download_user_file(h, DOMAINS[name], token, budget.file_id)
    assert down.status == 200 and down.body == budget.body, down.describe()


@pytest.fixture(scope="module")
def fleet(e2e_host: E2EHost, node22: NodeRuntime, e2e_timings: PhaseTimings) -> Fleet:
    """current = 25.6.0; alice and bob follow it, each with a password and a budget file."""
    h = e2e_host
    wrapper = h.root / "bin" / "node-fail-after-migrations"
    marker = h.root / "FAIL-AFTER-MIGRATIONS"
    wrapper.parent.mkdir(parents=True, exist_ok=True)
    wrapper.write_text(NODE_WRAPPER.format(node=str(node22.node), marker=str(marker)), encoding="utf-8")
    wrapper.chmod(0o755)
    h.settings["commands"]["node"] = [str(wrapper)]
    h.write_config()
    # no instance follows current yet: the switch only points current at 25.6.0
    switched = h.ok("version", "switch", V25)
    assert switched["current"] == V25 and current_link(h) == V25, switched
    fleet = Fleet(host=h, wrapper=wrapper, marker=marker)
    for name in NAMES:
        with e2e_timings.phase(f"switch e2e: instance create {name} (follows current {V25})"):
            inst = h.ok("instance", "create", name, "--domain", DOMAINS[name], "--tls", "self-signed")["instance"]
        assert inst["version"] == "current" and inst["resolved_version"] == V25, inst
        unit = (h.systemd.unit_dir / f"abssctl-{name}.service").read_text(encoding="utf-8")
        assert f"ExecStart={wrapper} " in unit, unit
        h.wait_vhost(name, DOMAINS[name])       # not alice's vhost answering for bob's domain
        healthy(h, DOMAINS[name])
        budget = Budget(PASSWORDS[name], str(uuid.uuid4()), b"PK\x03\x04 switch e2e " + os.urandom(8192))
        token = bootstrap_and_login(h, DOMAINS[name], budget.password)
        upload_user_file(h, DOMAINS[name], token, budget.file_id, f"{name}'s budget", budget.body)
        data_is_there(h, name, budget)
        fleet.budgets[name] = budget
    assert h.nginx_ok() == ""
    return fleet


# ----------------------------------------------------------------------------------------------

def test_a_failed_switch_rolls_back_package_and_data(fleet: Fleet, node22: NodeRuntime,
                                                     tmp_path: Path, e2e_timings: PhaseTimings) -> None:
    h = fleet.host
    registry = h.registry_versions()
    m25, m26 = sorted(registry[V25]["migrations"]), sorted(registry[V26]["migrations"])
    # the premise of the test: 26.8.1 migrates further than 25.6.0 knows
    assert set(m25) < set(m26), f"{V26} adds no migration beyond {V25}: {m25} vs {m26}"
    for name in NAMES:
        assert migrate_titles(data_dir(h, name)) == m25
    pids = h.systemd.status_pids()

    fleet.marker.write_text(V26 + "\n", encoding="utf-8")
    with e2e_timings.phase(f"switch e2e: version switch {V26}, forced failure and rollback"):
        res = h.run("version", "switch", V26)
    assert res.rc == 4 and res.doc["error"]["kind"] == "HealthGateFailed", res.describe()
    assert "alice" in res.doc["error"]["message"], res.describe()
    journal = "\n".join(res.doc["error"]["details"].get("journal") or [])
    assert "Migrations: DONE" in journal and WRAPPER_NOTE in journal, res.describe()
    rows = {row["name"]: row for row in res.doc["instances"]}
    assert set(rows) == set(NAMES), rows
    assert rows["alice"]["outcome"] == "rolled-back" and rows["alice"]["backup_id"], rows
    assert rows["bob"]["outcome"] == "untouched" and rows["bob"]["backup_id"] is None, rows
    assert res.doc["error"]["details"].get("backup_ids") == [rows["alice"]["backup_id"]], res.describe()

    record = last_switch_record(h)                  # read before any other mutating command
    fleet.failed_op = record["op_id"]
    assert record["result"] == "rolled-back" and record["exit_code"] == 4, record
    assert record["error"]["kind"] == "HealthGateFailed", record
    assert record["backup_ids"] == [rows["alice"]["backup_id"]], record
    assert record["changed"] is False and record["args"]["version"] == V26, record
    history = h.ok("history", "-n", "1")["operations"]
    assert [(r["op_id"], r["result"], r["backup_ids"]) for r in history] == [
        (record["op_id"], "rolled-back", record["backup_ids"])], history

    # the package: current is 25.6.0 again, on disk and in the registry
    insts = assert_on(h, V25)
    for name in NAMES:
        assert not insts[name].get("pending_restart"), insts[name]

    # the data: alice's live data is 25.6.0's again; what 26.8.1 migrated is kept aside
    alice_dir = data_dir(h, "alice").parent
    assert migrate_titles(data_dir(h, "alice")) == m25
    kept = sorted(p.name for p in alice_dir.glob("data.failed-switch-*"))
    assert kept == [f"data.failed-switch-{record['op_id']}"], kept
    migrated = alice_dir / kept[0]
    assert migrate_titles(migrated) == m26
    assert not list(alice_dir.glob(".abssctl-tmp-*")), sorted(os.listdir(alice_dir))
    assert not list((h.paths["state_dir"] / "journal").glob("*.json"))
    backups = {b["id"]: b for b in h.ok("backup", "list", "--instance", "alice")["backups"]}
    pre = backups[rows["alice"]["backup_id"]]
    assert pre["reason"] == "pre-switch" and pre["labels"] == [LABEL] and pre["server_version"] == V25, pre

    # 25.6.0 cannot start on the data 26.8.1 migrated (on a copy), so a healthy 25.6.0 alice
    # below runs on restored data
    copy = tmp_path / "migrated-copy"
    shutil.copytree(migrated, copy, symlinks=True)
    with pytest.raises(AssertionError, match="Missing migration file") as refused:
        with start_server(h.install_root / V25, node22, copy, timeout=60):
            pass
    assert "before /health answered" in str(refused.value), refused.value

    # alice runs 25.6.0 on her old data: health through nginx, /info, the old password, the file
    healthy(h, DOMAINS["alice"])
    assert info_version(h, "alice") == V25
    data_is_there(h, "alice", fleet.budgets["alice"])
    status = h.ok("instance", "status", "alice")["instances"][0]
    assert status["health"] == "UP" and status["info_version"] == V25, status
    # bob was never stopped
    assert h.systemd.status_pids().get("abssctl-bob.service") == pids["abssctl-bob.service"]
    assert pid_alive(pids["abssctl-bob.service"])
    healthy(h, DOMAINS["bob"])
    assert info_version(h, "bob") == V25
    data_is_there(h, "bob", fleet.budgets["bob"])
    unit = (h.systemd.unit_dir / "abssctl-alice.service").read_text(encoding="utf-8")
    assert f"/{V25}/" in unit and f"/{V26}/" not in unit, unit
    assert h.nginx_ok() == ""


def test_the_switch_then_succeeds_and_keeps_the_data(fleet: Fleet, e2e_timings: PhaseTimings) -> None:
    h = fleet.host
    m26 = sorted(h.registry_versions()[V26]["migrations"])
    fleet.marker.unlink(missing_ok=True)
    pids = h.systemd.status_pids()

    with e2e_timings.phase(f"switch e2e: version switch {V26} (two instances, rolling)"):
        doc = h.ok("version", "switch", V26)
    assert doc["changed"] is True and doc["current"] == V26 and doc["previous"] == V25, doc
    rows = {row["name"]: row for row in doc["instances"]}
    assert set(rows) == set(NAMES), rows
    for name in NAMES:
        row = rows[name]
        assert row["outcome"] == "upgraded" and row["health"] == "UP" and row["info_version"] == V26, row
        assert row["backup_id"], row
    ids = [rows[name]["backup_id"] for name in sorted(NAMES)]   # rolling: name order
    assert len(set(ids)) == len(ids), ids

    record = last_switch_record(h)
    assert record["result"] == "ok" and record["exit_code"] == 0 and record["changed"] is True, record
    assert record["backup_ids"] == ids and record["op_id"] == doc["op_id"], record
    history = h.ok("history", "-n", "1")["operations"]
    assert [(r["op_id"], r["result"], r["backup_ids"]) for r in history] == [(doc["op_id"], "ok", ids)], history

    assert_on(h, V26)
    for name in NAMES:
        backup = {b["id"]: b for b in h.ok("backup", "list", "--instance", name)["backups"]}[rows[name]["backup_id"]]
        assert backup["reason"] == "pre-switch" and backup["labels"] == [LABEL], backup
        assert backup["server_version"] == V25, backup
        # restarted on 26.8.1, through nginx, with the data written on 25.6.0
        old_pid = pids.get(f"abssctl-{name}.service")
        assert h.systemd.status_pids().get(f"abssctl-{name}.service") != old_pid
        healthy(h, DOMAINS[name])
        assert info_version(h, name) == V26
        data_is_there(h, name, fleet.budgets[name])
        assert migrate_titles(data_dir(h, name)) == m26
        unit = (h.systemd.unit_dir / f"abssctl-{name}.service").read_text(encoding="utf-8")
        assert f"ExecStart={fleet.wrapper} " in unit and f"/{V26}/" in unit, unit
    if fleet.failed_op:                         # the failed switch's migrated data is never deleted
        assert (data_dir(h, "alice").parent / f"data.failed-switch-{fleet.failed_op}").is_dir()
    assert h.nginx_ok() == ""
    again = h.ok("version", "switch", V26)
    assert again["changed"] is False, again
