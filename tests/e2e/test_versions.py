"""E2E: the real @actual-app/sync-server through `abssctl version ...` (DESIGN §4.4, §7(c)).

Layout (tests/rig/e2e.py, ``built_versions``): sandbox ``host`` is a host whose admin upgrades node.
On the host's node 20 it installs 25.6.0 (ABI 115) from the registry and exports it; then
``[commands] node`` moves to Node 22 and 26.8.1 is installed with ``--set-current`` (ABI 127) and
exported. So one install_root holds both versions side by side, each built for the node it was
installed with. 25.6.0 declares no engines and would run on node 22 too, but a tree built for
ABI 115 cannot load its native modules on ABI 127: that is shown directly, and it is why importing
the node-20 bundle into a node-22 host must be refused. Fresh sandboxes pointed at a dead loopback
registry get versions only from the bundles (the air-gapped path).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest

from rig.e2e import (PACKAGE, V25, V26, BuiltVersions, CliResult, E2ESandbox, NodeRuntime,
                     PhaseTimings, open_bundle, package_dir, read_bundle_head, sha256_file,
                     start_server)

pytestmark = pytest.mark.e2e

ALLOW_SCRIPTS = ("better-sqlite3", "bcrypt", "argon2")
HOST_LIBC = "glibc " + os.confstr("CS_GNU_LIBC_VERSION").split()[1]
ENGINES = {V25: None, V26: ">=22"}


def engines_sentence(version: str, engines: str, node: NodeRuntime) -> str:
    return (f'{PACKAGE} {version} declares engines.node "{engines}"; '
            f"this host runs node {node.version}")


def node_for(abi: str, host_node: NodeRuntime, node22: NodeRuntime) -> NodeRuntime:
    return {host_node.abi: host_node, node22.abi: node22}[abi]


def lock_entry(tree: Path) -> dict[str, Any]:
    lock = json.loads((tree / "package-lock.json").read_text(encoding="utf-8"))
    return lock["packages"][f"node_modules/{PACKAGE}"]


def native_present(tree: Path) -> set[str]:
    return {name for name in ALLOW_SCRIPTS if (tree / "node_modules" / name / "package.json").is_file()}


def assert_nothing_installed(box: E2ESandbox, res: CliResult) -> None:
    assert box.install_root_entries() == [], res.describe()
    assert box.registry_versions() == {}, res.describe()


def assert_verified_version(box: E2ESandbox, res: CliResult, version: str, node: NodeRuntime,
                            source: str) -> dict[str, Any]:
    """The install/import JSON of DESIGN §4.4.3 and the registry entry of §3.6, checked against disk."""
    assert res.rc == 0, res.describe()
    doc = res.doc
    assert doc["ok"] is True and doc["changed"] is True, res.describe()
    assert isinstance(doc["op_id"], str) and isinstance(doc["duration_ms"], int)
    v = doc["version"]
    tree = box.install_root / version
    assert v["version"] == version and v["path"] == str(tree)
    assert v["source"] == source
    assert os.path.normpath(v["bin"]) == "build/bin/actual-server.js"
    assert (package_dir(tree) / v["bin"]).is_file()
    assert v["integrity"].startswith("sha512-") and v["integrity"] == lock_entry(tree)["integrity"]
    assert v["node"] == {"version": node.version, "abi": node.abi, "arch": "x64", "libc": HOST_LIBC}
    assert v["engines_node"] == ENGINES[version]
    assert v["engines_ok"] is True
    natives = native_present(tree)
    assert {"better-sqlite3", "bcrypt"} <= natives
    assert v["native_modules"] == {name: "ok" for name in natives}
    smoke = v["smoke_start"]
    assert smoke["health"] == "UP" and smoke["info_version"] == version, smoke
    assert isinstance(smoke["seconds"], (int, float)) and smoke["seconds"] > 0
    assert v["size_bytes"] > 50_000_000
    assert not [w for w in doc["warnings"] if "engines.node" in w], doc["warnings"]

    entry = box.registry_versions()[version]
    assert entry["version"] == version and entry["path"] == str(tree) and entry["source"] == source
    assert entry["integrity"] == v["integrity"] and entry["node"] == v["node"]
    assert entry["lockfile_sha256"] == sha256_file(tree / "package-lock.json")
    assert sorted(entry["native_modules"]) == sorted(natives)
    migrations = entry["migrations"]
    assert migrations and all(re.fullmatch(r"\d{13}-[A-Za-z0-9_.-]+\.js", t) for t in migrations), migrations
    assert box.leftovers() == []
    # node-gyp found the headers through npm_config_nodedir; it never fell back to a download.
    assert not (box.home / ".cache" / "node-gyp").exists()
    return entry


# ----------------------------------------------------------------------------------------------
# Built in the side-by-side sandbox
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("version", [V25, V26])
def test_install_reports_a_verified_tree(built_versions: BuiltVersions, version: str) -> None:
    built = built_versions[version]
    assert_verified_version(built_versions.host, built.install, version, built.node, "registry")
    # Progress goes to stderr every 5 s while npm runs (an install takes minutes).
    assert re.search(rf"^(abssctl: )?\[(\d+m)?\d+s\] npm install {re.escape(version)}", built.install.err, re.M), \
        built.install.err[-3000:]


@pytest.mark.parametrize("version", [V25, V26])
def test_bin_is_recorded_as_documented(built_versions: BuiltVersions, version: str) -> None:
    """DESIGN §3.6/§4.4.3 record the bin relative to the package, without npm's "./"."""
    built = built_versions[version]
    assert built.install.rc == 0, built.install.describe()
    assert built.install.doc["version"]["bin"] == "build/bin/actual-server.js"
    assert built_versions.host.registry_versions()[version]["bin"] == "build/bin/actual-server.js"


def test_versions_side_by_side_in_one_install_root(built_versions: BuiltVersions,
                                                   host_node: NodeRuntime, node22: NodeRuntime) -> None:
    box = built_versions.host
    for version in (V25, V26):
        assert built_versions[version].install.rc == 0, built_versions[version].install.describe()
    assert set(box.install_root_entries()) == {V25, V26, "current"}
    assert os.readlink(box.install_root / "current") == V26  # relative, set by --set-current
    assert box.registry_doc()["current"] == V26
    assert built_versions[V26].install.doc["version"]["current"] is True

    res = box.run("version", "list")
    assert res.rc == 0, res.describe()
    entries = {e["version"]: e for e in res.doc["versions"]}
    assert set(entries) == {V25, V26}, res.describe()
    assert entries[V26]["current"] is True and entries[V25]["current"] is False
    assert entries[V25]["node_abi"] == host_node.abi == "115"
    assert entries[V26]["node_abi"] == node22.abi == "127"
    assert entries[V25]["engines_ok"] is True and entries[V26]["engines_ok"] is True
    assert entries[V26]["engines_node"] == ">=22"
    assert all(e["installed"] is True and e["instances"] == [] for e in entries.values())


@pytest.mark.parametrize("version", [V25, V26])
def test_installed_tree_serves(built_versions: BuiltVersions, host_node: NodeRuntime,
                               node22: NodeRuntime, tmp_path: Path, e2e_timings: PhaseTimings,
                               version: str) -> None:
    box = built_versions.host
    entry = box.registry_versions().get(version)
    assert entry, built_versions[version].install.describe()
    node = node_for(entry["node"]["abi"], host_node, node22)
    with e2e_timings.phase(f"start {version} from its tree on node {node.version}"):
        with start_server(box.install_root / version, node, tmp_path / "data") as server:
            status, info = server.get("/info")
            assert status == 200 and info["build"]["version"] == version, info
            # A fresh data dir gets exactly the migrations the smoke start recorded.
            assert server.migrate_titles() == entry["migrations"]
    with pytest.raises(ProcessLookupError):  # stopped by its PID and reaped
        os.kill(server.pid, 0)


def test_tree_built_for_abi_115_cannot_load_on_node22(built_versions: BuiltVersions,
                                                      node22: NodeRuntime) -> None:
    """Why an ABI mismatch must be refused: the native module fails once it is used."""
    pkg = package_dir(built_versions.host.install_root / V25)
    assert pkg.is_dir(), built_versions[V25].install.describe()
    proc = subprocess.run([str(node22.node), "-e",
                           "const D = require('better-sqlite3'); new D(':memory:').close()"],
                          cwd=pkg, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode != 0
    assert "NODE_MODULE_VERSION 115" in proc.stderr and "NODE_MODULE_VERSION 127" in proc.stderr, proc.stderr


@pytest.mark.parametrize("version", [V25, V26])
def test_export_writes_a_self_describing_bundle(built_versions: BuiltVersions, version: str) -> None:
    built = built_versions[version]
    bundle = built.require_bundle()
    assert built.export is not None and built.export.doc["ok"] is True, built.export.describe()
    assert (bundle.stat().st_mode & 0o777) == 0o644
    sidecar = bundle.with_name(bundle.name + ".sha256")
    assert sidecar.read_text(encoding="utf-8").split()[0] == sha256_file(bundle)
    names, meta, sums = read_bundle_head(bundle)
    assert names == ["abssctl-bundle.json", "SHA256SUMS"]
    entry = built_versions.host.registry_versions()[version]
    assert meta["schema_version"] == 1 and meta["kind"] == "abssctl-version-bundle"
    assert meta["package"] == PACKAGE and meta["version"] == version
    assert meta["node"]["abi"] == built.node.abi and meta["node"]["version"] == built.node.version
    assert meta["node"]["arch"] == "x64" and meta["node"]["platform"] == "linux"
    assert meta["libc"] == {"family": "glibc", "version": HOST_LIBC.split()[1]}
    assert meta["integrity"] == entry["integrity"] and meta["migrations"] == entry["migrations"]
    assert meta["bin"] == entry["bin"] and meta["engines_node"] == ENGINES[version]
    lines = sums.splitlines()
    assert len(lines) == meta["files"]["count"] > 1000
    assert meta["sums_sha256"] == hashlib.sha256(sums.encode()).hexdigest()
    paths = [line.split("  ", 1)[1] for line in lines]
    assert paths == sorted(paths), "SHA256SUMS is not sorted by path (DESIGN §4.4.6)"


# ----------------------------------------------------------------------------------------------
# 26.x on the host's node 20
# ----------------------------------------------------------------------------------------------

def test_install_26_on_node20_follows_the_engines_rule(e2e_sandbox: Any, host_node: NodeRuntime,
                                                       built_versions: BuiltVersions,
                                                       e2e_timings: PhaseTimings) -> None:
    """DESIGN §4.4.3 step 5: a warning naming both versions, or exit 4 with that sentence."""
    box = e2e_sandbox("engines-node20", host_node)
    with e2e_timings.phase(f"version install {V26} (node {host_node.version}, engines mismatch)"):
        res = box.run("version", "install", V26)
    sentence = engines_sentence(V26, ">=22", host_node)
    if res.rc == 0:
        assert sentence in res.doc["warnings"], res.describe()
        v = res.doc["version"]
        assert v["engines_ok"] is False and v["engines_node"] == ">=22"
        assert v["smoke_start"]["health"] == "UP" and v["smoke_start"]["info_version"] == V26
        assert box.registry_versions()[V26]["engines_ok"] is False
        assert box.leftovers() == []
    else:
        assert res.rc == 4, res.describe()
        assert res.error["kind"] in ("ProviderError", "HealthGateFailed"), res.describe()
        assert sentence in res.error["message"], res.describe()
        assert_nothing_installed(box, res)


# ----------------------------------------------------------------------------------------------
# Air-gapped hosts: bundles only, npm pointed at a dead loopback port
# ----------------------------------------------------------------------------------------------

def test_airgapped_import_serves_and_install_points_at_import(
        e2e_sandbox: Any, node22: NodeRuntime, host_node: NodeRuntime, dead_registry: str,
        built_versions: BuiltVersions, tmp_path: Path, e2e_timings: PhaseTimings) -> None:
    bundle = built_versions[V26].require_bundle()
    box = e2e_sandbox("airgap", node22, registry=dead_registry)
    with e2e_timings.phase(f"version import {V26} (air-gapped, node {node22.version})"):
        res = box.run("version", "import", bundle)
    entry = assert_verified_version(box, res, V26, node22, "bundle:" + sha256_file(bundle))
    assert entry["migrations"] == built_versions.host.registry_versions()[V26]["migrations"]
    with start_server(box.install_root / V26, node22, tmp_path / "data") as server:
        status, info = server.get("/info")
        assert status == 200 and info["build"]["version"] == V26

    again = box.run("version", "import", bundle)
    assert again.rc == 0 and again.doc["changed"] is False, again.describe()

    with e2e_timings.phase("version install 26.9.0 (dead registry)"):
        res = box.run("version", "install", "26.9.0", timeout=120)
    assert res.rc == 4, res.describe()
    assert res.error["kind"] == "ProviderError", res.describe()
    assert "version import" in res.error["hint"], res.describe()
    assert set(box.install_root_entries()) == {V26} and set(box.registry_versions()) == {V26}


def test_import_of_a_bundle_for_another_node_abi_is_refused(
        e2e_sandbox: Any, node22: NodeRuntime, host_node: NodeRuntime, dead_registry: str,
        built_versions: BuiltVersions) -> None:
    bundle = built_versions[V25].require_bundle()  # built on node 20, ABI 115
    box = e2e_sandbox("abi-mismatch", node22, registry=dead_registry)
    res = box.run("version", "import", bundle)
    assert res.rc == 3, res.describe()
    assert res.error["kind"] == "Incompatible", res.describe()
    message = res.error["message"]
    for fact in ("ABI 115", "ABI 127", node22.version, V25):
        assert fact in message, res.describe()
    assert_nothing_installed(box, res)


def _flip_byte(src: Path, dest: Path, offset: int) -> None:
    shutil.copyfile(src, dest)
    with open(dest, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0xFF]))


def _repack_with_edited_file(src: Path, dest: Path) -> str:
    """A well-formed bundle whose first tree file of 64+ bytes has one byte flipped."""
    edited = ""
    with open(dest, "wb") as out_fh:
        zstd = subprocess.Popen(["zstd", "-q", "-c", "-T0"], stdin=subprocess.PIPE, stdout=out_fh)
        try:
            with open_bundle(src) as tar_in, tarfile.open(fileobj=zstd.stdin, mode="w|",
                                                          format=tarfile.PAX_FORMAT) as tar_out:
                for member in tar_in:
                    data = tar_in.extractfile(member) if member.isfile() else None
                    blob = data.read() if data else None
                    if blob is not None and not edited and member.name.startswith("tree/") \
                            and len(blob) >= 64:
                        mid = len(blob) // 2
                        blob = blob[:mid] + bytes([blob[mid] ^ 0xFF]) + blob[mid + 1:]
                        edited = member.name
                    if blob is None:
                        tar_out.addfile(member)
                    else:
                        tar_out.addfile(member, io.BytesIO(blob))
        finally:
            zstd.stdin.close()  # type: ignore[union-attr]
            zstd.wait(timeout=300)
    assert zstd.returncode == 0 and edited
    return edited


@pytest.mark.parametrize("how", ["flipped-byte", "flipped-byte-with-sidecar", "tree-file-edited"])
def test_tampered_bundle_is_refused(e2e_sandbox: Any, node22: NodeRuntime, dead_registry: str,
                                    built_versions: BuiltVersions, tmp_path: Path, how: str) -> None:
    bundle = built_versions[V26].require_bundle()
    copy = tmp_path / bundle.name
    if how == "tree-file-edited":
        _repack_with_edited_file(bundle, copy)
    else:
        _flip_byte(bundle, copy, bundle.stat().st_size // 2)
        if how == "flipped-byte-with-sidecar":
            shutil.copyfile(bundle.with_name(bundle.name + ".sha256"),
                            copy.with_name(copy.name + ".sha256"))
    box = e2e_sandbox(f"tampered-{how}", node22, registry=dead_registry)
    res = box.run("version", "import", copy)
    assert res.rc == 3, res.describe()
    if how != "flipped-byte":  # a corrupt stream may be reported before any sum is compared
        assert res.error["kind"] == "ChecksumMismatch", res.describe()
    assert_nothing_installed(box, res)
