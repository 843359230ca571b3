"""init --discover and --rebuild-state against the real rig (DESIGN §4.1): what is on the host is
found, lost registries are rebuilt from it, the old ones are kept aside, and a conflict writes nothing."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

NAMES = ("alice", "bob")
REGISTRIES = ("instances", "ports", "versions")


@pytest.fixture
def two(abssctl_host):
    h = abssctl_host
    for name in NAMES:
        h.ok("instance", "create", name, "--domain", f"{name}.example.test", "--tls", "self-signed")
    return h


def registry_path(h, name: str) -> Path:
    return h.paths["state_dir"] / "registry" / f"{name}.json"


def listing(h) -> tuple[list[tuple[str, str, int]], list[str], str | None]:
    insts = h.ok("instance", "list")["instances"]
    versions = h.ok("version", "list")
    return (sorted((i["name"], i["domain"], i["port"]) for i in insts),
            sorted(v["version"] for v in versions["versions"]), h.registry_doc("versions").get("current"))


def discovered(h) -> dict:
    return h.ok("init", "--discover")["discovered"]


def test_discover_then_rebuild_lost_registries(two) -> None:
    h = two
    before = listing(h)
    assert [n for n, _d, _p in before[0]] == list(NAMES) and before[1] == ["1.0.0"]
    tree = h.tree()
    found = discovered(h)
    assert h.tree() == tree, "init --discover is read-only"
    by_name = {s["name"]: s for s in found["instances"]}
    assert sorted(by_name) == list(NAMES)
    for name, dom, port in before[0]:
        s = by_name[name]
        assert s["registered"] is True and s["issues"] == [], s
        assert (s["domain"], s["port"], s["version"]) == (dom, port, "1.0.0"), s
        assert s["unit"].endswith(f"abssctl-{name}.service") and s["vhost"].endswith(f"abssctl-{name}.conf")
        assert s["root"] == str(h.paths["instance_root"] / name)
    assert [(v["version"], v["registered"]) for v in found["versions"]] == [("1.0.0", True)]

    for name in REGISTRIES:
        registry_path(h, name).unlink()
    lost = discovered(h)
    assert [(s["name"], s["registered"]) for s in lost["instances"]] == [(n, False) for n in NAMES]
    assert [(v["version"], v["registered"]) for v in lost["versions"]] == [("1.0.0", False)]

    rebuilt = h.ok("init", "--rebuild-state")
    assert rebuilt["changed"] is True and rebuilt["op_id"]
    assert listing(h) == before
    for name in REGISTRIES:
        path = registry_path(h, name)
        assert path.stat().st_mode & 0o777 == 0o640
    # the rebuilt registries describe a host doctor agrees with
    got = h.run("--json", "doctor", "--only", "state,systemd,nginx,ports")
    assert got.rc == 0, [(p["id"], p["target"], p["message"]) for p in got.doc["probes"] if p["status"] != "ok"]

    # a second rebuild copies the registries it replaces into registry/backup-<op_id>/
    saved = {name: registry_path(h, name).read_bytes() for name in REGISTRIES}
    again = h.ok("init", "--rebuild-state")
    backup = h.paths["state_dir"] / "registry" / f"backup-{again['op_id']}"
    assert backup.is_dir()
    assert {name: (backup / f"{name}.json").read_bytes() for name in REGISTRIES} == saved
    assert listing(h) == before


def test_two_units_on_one_port_refuse_to_rebuild_and_write_nothing(two) -> None:
    h = two
    alice_port = h.registry_doc("instances")["instances"]["alice"]["port"]
    bob_port = h.registry_doc("instances")["instances"]["bob"]["port"]
    unit = h.systemd.unit_dir / "abssctl-bob.service"
    unit.write_text(unit.read_text().replace(f"ACTUAL_PORT={bob_port}", f"ACTUAL_PORT={alice_port}"))
    for name in REGISTRIES:
        registry_path(h, name).unlink()
    tree = h.tree()
    got = h.run("--json", "init", "--rebuild-state")
    assert got.rc == 2 and got.doc["ok"] is False, got
    assert got.doc["error"]["kind"] == "Conflict" and str(alice_port) in got.doc["error"]["message"]
    assert h.tree() == tree
    assert not [p for p in os.listdir(h.paths["state_dir"] / "registry") if p.startswith("backup-")]
    dry = h.run("--json", "--dry-run", "init", "--rebuild-state")
    assert dry.rc == 2, dry


def test_discover_reports_an_unregistered_leftover(two) -> None:
    h = two
    doc = json.loads(registry_path(h, "instances").read_text())
    del doc["instances"]["bob"]
    registry_path(h, "instances").write_text(json.dumps(doc))
    found = {s["name"]: s for s in discovered(h)["instances"]}
    assert found["alice"]["registered"] is True and found["bob"]["registered"] is False
    got = h.run("--json", "doctor", "--only", "state")
    drift = [p for p in got.doc["probes"] if p["id"] == "state.drift" and p["target"] == "bob"]
    assert drift and {p["status"] for p in drift} == {"warn"}, got.doc["probes"]


def test_an_unregistered_unit_hints_init_discover(two) -> None:
    h = two
    doc = json.loads(registry_path(h, "instances").read_text())
    del doc["instances"]["bob"]
    registry_path(h, "instances").write_text(json.dumps(doc))
    got = h.run("--json", "doctor", "--only", "state")
    drift = [p for p in got.doc["probes"] if p["id"] == "state.drift" and p["target"] == "bob"]
    assert drift and all("init --discover" in (p["hint"] or "") for p in drift), drift
