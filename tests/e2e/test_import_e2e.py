"""E2E: an Actual server run by hand, outside abssctl, brought in with instance import (DESIGN §11.6).

A real 25.6.0 runs from the E2E host's tree on Node 22 with its own data dir, as a Docker or npm user
runs it (``rig.e2e.start_server``); a password is bootstrapped and a budget file uploaded through its
own API on loopback. ``instance import`` then makes it an instance on the newest installed version
(26.8.1) behind nginx, where the same password logs in and the same file downloads. A second host
(another machine) imports the same data onto 25.6.0 and backs it up; this host imports that archive
with ``--from-backup``. Only the rig's session builds are used.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

from rig.e2e import V25, V26, BuiltVersions, NodeRuntime, PhaseTimings, start_server
from rig.e2e_host import (E2EHost, bootstrap_and_login, download_user_file, e2e_host,  # noqa: F401
                          healthy, login, running_e2e_host, upload_user_file, user_files)
from rig.https_client import HttpsClient

pytestmark = pytest.mark.e2e

PASSWORD = "e2e-import-password-1"


@pytest.fixture(scope="module")
def hand_started(e2e_host: E2EHost, node22: NodeRuntime, tmp_path_factory: pytest.TempPathFactory,
                 e2e_timings: PhaseTimings) -> Iterator[dict[str, Any]]:
    """A real 25.6.0 on its own data dir (a Docker volume's _data), with a password and one budget."""
    data = tmp_path_factory.mktemp("docker-volume") / "_data"
    data.mkdir()
    with start_server(e2e_host.install_root / V25, node22, data) as server:
        direct = HttpsClient("127.0.0.1", server.port, tls=False)   # the server's own port, as its users had it
        token = bootstrap_and_login(direct, "", PASSWORD)        # type: ignore[arg-type]
        file_id = str(uuid.uuid4())
        body = b"PK\x03\x04 imported budget " + os.urandom(8192)
        upload_user_file(direct, "", token, file_id, "Family Budget", body)  # type: ignore[arg-type]
        assert user_files(direct, "", token) == {file_id: "Family Budget"}  # type: ignore[arg-type]
        yield {"data": data, "file_id": file_id, "body": body, "server": server}


def _tree(top: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(top)): (p.lstat().st_mode, p.lstat().st_size)
            for p in top.rglob("*") if p.name not in ("server.log",)}


def _check_served(h: E2EHost, name: str, domain: str, src: dict[str, Any], version: str) -> None:
    h.wait_vhost(name, domain)
    healthy(h, domain)
    info = h.https(domain, "/info")
    assert info.json()["build"]["version"] == version, info.describe()
    token = login(h, domain, PASSWORD)
    assert user_files(h, domain, token) == {src["file_id"]: "Family Budget"}
    down = download_user_file(h, domain, token, src["file_id"])
    assert down.status == 200 and down.body == src["body"], down.describe()
    assert h.nginx_ok() == ""


def test_a_hand_started_server_is_imported_while_it_runs(e2e_host: E2EHost, hand_started: dict[str, Any],
                                                         e2e_timings: PhaseTimings) -> None:
    h, src = e2e_host, hand_started
    before = _tree(src["data"])
    dry = h.ok("--dry-run", "instance", "import", "carol", "--from", src["data"], "--domain", "carol.e2e.test",
               "--tls", "self-signed")["import"]
    assert dry["minimum_version"] == V25 and dry["version"] == V26, dry
    assert [(b["id"], b["name"]) for b in dry["budgets"]] == [(src["file_id"], "Family Budget")], dry
    with e2e_timings.phase("e2e import: instance import --from (running 25.6.0 -> 26.8.1)"):
        doc = h.ok("instance", "import", "carol", "--from", src["data"], "--domain", "carol.e2e.test",
                   "--tls", "self-signed")
    assert doc["instance"]["health"] == "UP" and doc["instance"]["resolved_version"] == V26, doc
    assert [b["id"] for b in doc["import"]["budgets"]] == [src["file_id"]]
    assert src["server"].get("/health")[1] == {"status": "UP"}       # the source still runs
    assert _tree(src["data"]) == before                                # and was not written to
    _check_served(h, "carol", "carol.e2e.test", src, V26)


def test_from_backup_made_on_another_host(e2e_host: E2EHost, hand_started: dict[str, Any], node22: NodeRuntime,
                                          e2e_cache: Path, built_versions: BuiltVersions,
                                          tmp_path_factory: pytest.TempPathFactory,
                                          e2e_timings: PhaseTimings) -> None:
    h, src = e2e_host, hand_started
    with running_e2e_host(tmp_path_factory.mktemp("e2e-host-other"), node22, e2e_cache, built_versions,
                          e2e_timings, "import-other") as other:
        with e2e_timings.phase("e2e import: other host imports onto 25.6.0, backup create"):
            made = other.ok("instance", "import", "dora", "--from", src["data"], "--domain", "dora.e2e.test",
                            "--version", V25, "--tls", "self-signed")
            assert made["instance"]["resolved_version"] == V25, made
            _check_served(other, "dora", "dora.e2e.test", src, V25)
            archive = Path(other.ok("backup", "create", "dora")["backup"]["archive"])
    assert archive.is_file()
    with e2e_timings.phase("e2e import: instance import --from-backup"):
        doc = h.ok("instance", "import", "dora", "--from-backup", archive, "--tls", "self-signed")
    rep = doc["import"]
    assert rep["server_version"] == V25 and rep["minimum_version"] == V25, rep
    assert doc["instance"]["domain"] == "dora.e2e.test" and doc["instance"]["resolved_version"] == V26, doc
    _check_served(h, "dora", "dora.e2e.test", src, V26)
