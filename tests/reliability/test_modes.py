"""Modes walk (DESIGN §3.5): after init, create (self-signed TLS), create with a custom certificate
and a second `tls install` (so `.prev` exists), backup create and backup restore, every managed path
has the owner and mode the table gives. The service account is nobody:nogroup, so owner checks
can tell root from the service user (from the first init on)."""
from __future__ import annotations

import grp
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from reliability.rigs import show
from reliability.scenarios import seed
from rig.fakes import Sandbox
from unit.test_instances import Backends, pick_port_range

pytestmark = pytest.mark.reliability


def make_cert(d: Path, domain: str) -> tuple[Path, Path]:
    d.mkdir(parents=True, exist_ok=True)
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "90", "-subj", f"/CN={domain}", "-addext", f"subjectAltName=DNS:{domain}",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True, timeout=30)
    key.chmod(0o600)
    return cert, key


class Walked:
    """A host whose service account is nobody:nogroup from the first init. It lives in a 0755 dir
    outside pytest's 0700 basetemp, so the smoke start (run as nobody) can read the version tree."""

    def __init__(self, root: Path, mp: pytest.MonkeyPatch) -> None:
        self.sb = Sandbox(root, mp)
        self.backends = Backends(self.sb)
        self.root = root
        self.sb.configure("service", user="nobody", group="nogroup")
        self.sb.base = pick_port_range()            # type: ignore[attr-defined]
        self.sb.configure("ports", base=self.sb.base, max=self.sb.base + 99)
        self.ok("init")
        self.sb.make_host_dirs()
        self.ok("version", "install", "25.6.0", "--set-current")
        self.sb.make_system_cert("example.org", days=400)

    def ok(self, *argv: object) -> dict:
        res = self.sb.run("--json", *argv)
        assert res.rc == 0, show(res)
        return res.doc

    def run(self, *argv: object):
        return self.sb.run(*argv)


@pytest.fixture
def walked(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    root = Path(tempfile.mkdtemp(prefix="abssctl-modes-"))
    root.chmod(0o755)
    try:
        w = Walked(root, monkeypatch)
        try:
            yield _walk_setup(w, tmp_path_factory)
        finally:
            w.backends.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _walk_setup(h: Walked, tmp_path_factory: pytest.TempPathFactory) -> Walked:
    h.ok("instance", "create", "alice", "--domain", "alice.example.org", "--tls", "self-signed")
    h.ok("instance", "create", "bob", "--domain", "bob.example.org")
    certs = tmp_path_factory.mktemp("certs")
    for n in (1, 2):
        cert, key = make_cert(certs / str(n), "bob.example.org")
        h.ok("tls", "install", "bob", "--cert", cert, "--key", key)
    seed(Path(h.sb.paths["instance_root"]) / "alice" / "data")
    bid = h.ok("backup", "create", "alice")["backup"]["id"]
    h.ok("--yes", "backup", "restore", bid, "--no-pre-backup")
    return h


def test_every_managed_path_has_its_design_owner_and_mode(walked: Walked) -> None:
    h = walked
    P = {k: Path(v) for k, v in h.sb.paths.items()}
    uid, gid = pwd.getpwnam("nobody").pw_uid, grp.getgrnam("nogroup").gr_gid
    R, G, U = (0, 0), (0, gid), (uid, gid)
    want: dict[Path, tuple[tuple[int, int], int]] = {
        P["templates_dir"]: (R, 0o755),
        P["tls_dir"]: (R, 0o700),
        P["install_root"]: (R, 0o755),
        P["instance_root"]: (R, 0o755),
        P["state_dir"]: (R, 0o755),
        P["state_dir"] / "registry": (G, 0o750),
        P["state_dir"] / "journal": (R, 0o700),
        P["backup_root"]: (R, 0o700),
        P["backup_root"] / "backups.json": (R, 0o600),
        P["log_dir"]: (R, 0o750),
        P["log_dir"] / "operations.jsonl": (R, 0o640),
        P["log_dir"] / "abssctl.log": (R, 0o640),
        P["run_dir"]: (R, 0o755),
    }
    for name in ("alice", "bob"):
        root = P["instance_root"] / name
        want[root] = (G, 0o750)
        want[root / "config.json"] = (G, 0o640)
        for sub in ("data", "data/server-files", "data/user-files"):
            want[root / sub] = (U, 0o750)
        want[P["systemd_unit_dir"] / f"abssctl-{name}.service"] = (R, 0o644)
        want[P["nginx_sites_available"] / f"abssctl-{name}.conf"] = (R, 0o644)
        want[P["backup_root"] / name] = (R, 0o700)
    for name in ("alice", "bob"):
        want[P["tls_dir"] / name] = (R, 0o700)
        want[P["tls_dir"] / name / "privkey.pem"] = (R, 0o600)
        want[P["tls_dir"] / name / "fullchain.pem"] = (R, 0o644)
    want[P["tls_dir"] / "bob" / "privkey.pem.prev"] = (R, 0o600)
    want[P["tls_dir"] / "bob" / "fullchain.pem.prev"] = (R, 0o644)
    for f in (P["state_dir"] / "registry").iterdir():
        want[f] = (G, 0o640)                                  # {instances,ports,versions}.json (+ .prev)
    for f in (P["backup_root"] / "alice").iterdir():
        want[f] = (R, 0o600)                                  # <id>.tar.zst, <id>.sha256
    for f in P["run_dir"].iterdir():
        want[f] = (R, 0o600)                                  # lock files
    data = P["instance_root"] / "alice" / "data"
    for dirpath, dirs, files in os.walk(data):
        for d in dirs:
            want[Path(dirpath) / d] = (U, 0o750)
        for f in files:
            # the rig's fake server runs as root and rewrites .migrate on start; a real one runs as U
            if f != ".migrate" and not f.endswith(("-wal", "-shm")):
                want[Path(dirpath) / f] = (U, 0o640)
    if not (P["backup_root"] / "bob").exists():
        want.pop(P["backup_root"] / "bob", None)
    wrong = []
    for path, ((o_uid, o_gid), mode) in sorted(want.items()):
        st = path.lstat()
        got = ((st.st_uid, st.st_gid), stat.S_IMODE(st.st_mode))
        if got != ((o_uid, o_gid), mode):
            wrong.append(f"{path.relative_to(h.root)}: {got[0]} {oct(got[1])}, want {(o_uid, o_gid)} {oct(mode)}")
    assert len(want) > 40
    assert wrong == [], "\n".join(wrong)


def test_version_trees_links_and_journal(walked: Walked) -> None:
    h = walked
    P = {k: Path(v) for k, v in h.sb.paths.items()}
    cur = P["install_root"] / "current"
    assert cur.is_symlink() and not os.path.isabs(os.readlink(cur)), os.readlink(cur)
    wrong = []
    for dirpath, dirs, files in os.walk(P["install_root"] / os.readlink(cur)):
        for d in dirs:
            st = (Path(dirpath) / d).lstat()
            if not stat.S_ISLNK(st.st_mode) and (stat.S_IMODE(st.st_mode) != 0o755 or st.st_uid != 0):
                wrong.append(f"{dirpath}/{d}: {oct(stat.S_IMODE(st.st_mode))}")
        for f in files:
            st = (Path(dirpath) / f).lstat()
            if not stat.S_ISLNK(st.st_mode) and (stat.S_IMODE(st.st_mode) not in (0o644, 0o755) or st.st_uid != 0):
                wrong.append(f"{dirpath}/{f}: {oct(stat.S_IMODE(st.st_mode))}")
    assert wrong == [], wrong
    for name in ("alice", "bob"):
        link = P["nginx_sites_enabled"] / f"abssctl-{name}.conf"
        assert link.is_symlink() and os.readlink(link) == str(P["nginx_sites_available"] / f"abssctl-{name}.conf")
    assert list((P["state_dir"] / "journal").iterdir()) == []


def test_init_after_a_change_of_service_group_re_owns_every_registry(walked: Walked) -> None:
    """§4.1 step 2: init fixes owner and mode of the §3.5 paths; registry/*.json are root:<group>."""
    h = walked
    h.sb.configure("service", group="daemon")
    h.ok("init")
    gid = grp.getgrnam("daemon").gr_gid
    reg = Path(h.sb.paths["state_dir"]) / "registry"
    wrong = [f"{p.name}: gid {p.stat().st_gid}" for p in [reg, *reg.iterdir()] if p.stat().st_gid != gid]
    assert wrong == [], wrong
