"""E2E rig self-checks: the Node 22 runtime from the npm registry and the sandbox config."""
from __future__ import annotations

import re
import subprocess
import tomllib
from typing import Any

import pytest

from rig.e2e import NodeRuntime, PATH_KEYS_E2E

pytestmark = pytest.mark.e2e


def test_node22_ships_a_binary_and_its_headers(node22: NodeRuntime) -> None:
    assert re.fullmatch(r"v22\.\d+\.\d+", node22.version) and node22.abi == "127"
    assert node22.headers == node22.prefix / "include" / "node"
    header = (node22.headers / "node_version.h").read_text(encoding="utf-8")
    assert re.search(r"#define NODE_MAJOR_VERSION 22\b", header)
    for name in ("node_api.h", "v8.h", "uv.h", "common.gypi", "config.gypi"):
        assert (node22.headers / name).is_file(), name
    proc = subprocess.run([str(node22.node), "-p", "process.arch + ' ' + process.platform"],
                          capture_output=True, text=True, timeout=30, check=True)
    assert proc.stdout.split() == ["x64", "linux"]


def test_host_node_is_the_older_abi(host_node: NodeRuntime, node22: NodeRuntime) -> None:
    assert host_node.major == 20 and host_node.abi == "115"
    assert host_node.headers.is_dir() and host_node.node != node22.node


def test_sandbox_config_points_every_path_inside(e2e_sandbox: Any, node22: NodeRuntime) -> None:
    box = e2e_sandbox("rig-config", node22, registry="http://127.0.0.1:9/")
    cfg = tomllib.loads(box.config.read_text(encoding="utf-8"))
    assert set(cfg["paths"]) == set(PATH_KEYS_E2E)
    assert all(value.startswith(str(box.root) + "/") for value in cfg["paths"].values())
    # root, and no per-instance users (empty user_prefix): the rig's servers run as root; the
    # users of DESIGN §11.5 are checked in the integration and host tiers
    assert cfg["service"] == {"user": "root", "group": "root", "user_prefix": ""}
    assert cfg["commands"]["node"] == [str(node22.node)]
    assert cfg["health"]["timeout"] == 120 and cfg["npm"]["registry"] == "http://127.0.0.1:9/"
    assert "npm_config_nodedir" not in box.env() and box.env()["npm_config_fetch_retries"] == "0"
    res = box.run("config", "show")
    assert res.rc == 0, res.describe()
