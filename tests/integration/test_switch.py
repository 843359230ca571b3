"""version switch and instance set-version against the real rig: cold backups, gates, data rollback."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def data_digest(data: Path) -> dict[str, str]:
    """sha256 of every file under a data dir (what a rollback must give back byte for byte)."""
    out = {}
    for root, _dirs, files in os.walk(data):
        for name in files:
            path = Path(root) / name
            out[str(path.relative_to(data))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture
def upgrade_host(abssctl_host):
    h = abssctl_host
    h.ok("version", "install", "1.1.0")
    h.ok("instance", "create", "alice", "--domain", "alice.example.test", "--tls", "self-signed")
    data = h.paths["instance_root"] / "alice" / "data"
    (data / "user-files" / "budget.blob").write_bytes(os.urandom(50_000))
    marker = h.arm_crash_after_migrate("1.1.0")
    return h, data, marker


def migrate_titles(data: Path) -> list[str]:
    return [m["title"] for m in json.loads((data / ".migrate").read_text())["migrations"]]


def test_failed_switch_rolls_back_package_and_data_then_succeeds(upgrade_host) -> None:
    h, data, marker = upgrade_host
    before = data_digest(data)
    assert len(migrate_titles(data)) == 3
    marker.write_text("1")
    got = h.run("--json", "--debug", "version", "switch", "1.1.0")
    assert got.rc == 4 and got.doc["error"]["kind"] == "HealthGateFailed", got
    [row] = got.doc["instances"]
    assert row["name"] == "alice" and row["outcome"] == "rolled-back" and row["backup_id"]
    assert os.readlink(h.paths["install_root"] / "current") == "1.0.0"
    assert h.registry_doc("versions")["current"] == "1.0.0"
    assert data_digest(data) == before                      # the bytes, exactly
    failed = list(data.parent.glob("data.failed-switch-*"))
    assert len(failed) == 1 and len(migrate_titles(failed[0])) == 4   # what 1.1.0 migrated is kept
    status = h.ok("instance", "status", "alice")["instances"][0]
    assert status["health"] == "UP" and status["info_version"] == "1.0.0"
    record = [json.loads(x) for x in (h.paths["log_dir"] / "operations.jsonl").read_text().splitlines()][-1]
    assert record["command"] == "version switch" and record["result"] == "rolled-back"
    assert record["backup_ids"] == [row["backup_id"]]
    backups = h.ok("backup", "list", "--instance", "alice")["backups"]
    assert backups[0]["reason"] == "pre-switch" and backups[0]["labels"] == ["switch:1.0.0->1.1.0"]

    marker.unlink()
    doc = h.ok("version", "switch", "1.1.0")
    assert doc["changed"] is True and doc["instances"][0]["outcome"] == "upgraded"
    status = h.ok("instance", "status", "alice")["instances"][0]
    assert status["info_version"] == "1.1.0" and status["health"] == "UP"
    entry = h.ok("instance", "show", "alice")["instance"]
    assert entry["resolved_version"] == entry["data_version"] == "1.1.0"
    assert (data / "user-files" / "budget.blob").exists()
    assert h.ok("version", "switch", "1.1.0")["changed"] is False


def test_a_downgrade_is_refused_naming_the_instance(upgrade_host) -> None:
    h, _data, _marker = upgrade_host
    h.ok("version", "switch", "1.1.0")
    before = h.tree()
    got = h.run("--json", "version", "switch", "1.0.0")
    assert got.rc == 2 and "alice" in got.doc["error"]["message"] and "1.0.0" in got.doc["error"]["message"]
    got = h.run("--json", "instance", "set-version", "alice", "1.0.0")
    assert got.rc == 2
    assert h.tree() == before


def test_restart_none_marks_pending_and_restart_applies_it(upgrade_host) -> None:
    h, _data, _marker = upgrade_host
    doc = h.ok("version", "switch", "1.1.0", "--restart", "none")
    assert doc["changed"] is True
    entry = h.ok("instance", "show", "alice")["instance"]
    assert entry["pending_restart"] is True and entry["resolved_version"] == "1.0.0"
    assert h.ok("instance", "status", "alice")["instances"][0]["info_version"] == "1.0.0"
    h.ok("instance", "restart", "alice")
    entry = h.ok("instance", "show", "alice")["instance"]
    assert entry["pending_restart"] is False and entry["resolved_version"] == "1.1.0"
    assert h.ok("instance", "status", "alice")["instances"][0]["info_version"] == "1.1.0"
    reasons = [b["reason"] for b in h.ok("backup", "list", "--instance", "alice")["backups"]]
    assert reasons == ["pre-set-version"]


def test_set_version_pins_and_follows_current_again(upgrade_host) -> None:
    h, data, marker = upgrade_host
    marker.write_text("1")
    before = data_digest(data)
    got = h.run("--json", "instance", "set-version", "alice", "1.1.0")
    assert got.rc == 4 and got.doc["instances"][0]["outcome"] == "rolled-back"
    assert data_digest(data) == before
    marker.unlink()
    doc = h.ok("instance", "set-version", "alice", "1.1.0")
    assert doc["instance"]["resolved_version"] == "1.1.0"
    assert h.ok("instance", "show", "alice")["instance"]["version"] == "1.1.0"
    plan = h.ok("--dry-run", "version", "switch", "1.1.0")["plan"]
    assert [s["step"] for s in plan][:2] == ["current.swap", "registry.current"]
