"""Malicious archives through `backup restore` (DESIGN §6.3, §4.8.6 step 1).

A real backup of alice is re-packed with one hostile member (or damaged), its index entry and
sidecar are given the crafted archive's true sha256 and size, and the restore must exit 3 with
nothing written outside its staging dir: the sandbox tree is as before (modulo bookkeeping), alice's
live data and unit are untouched, and the hostile member's target outside the sandbox does not
exist. A re-pack without a hostile member restores fine (the control), so each refusal is the
hostile member's doing. One case goes through `backup reconcile --apply` adoption instead.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import uuid
from pathlib import Path
from typing import Any, Callable

import pytest

from reliability.rigs import RHost, SharedRHost, registry, tree_diff
from reliability.scenarios import alice_data, data_digest, seed

pytestmark = pytest.mark.reliability
TAG = uuid.uuid4().hex[:8]
ESCAPE = f"abssctl-evil-{TAG}"
OUTSIDE = [Path("/tmp") / ESCAPE, Path("/") / ESCAPE, Path("/etc") / ESCAPE]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def gnu_sparse(name: str, realsize: int) -> bytes:
    """A GNU sparse ('S') member claiming `realsize` bytes with one 512-byte data block."""
    info = tarfile.TarInfo(name)
    info.size, info.type, info.mode = 512, tarfile.GNUTYPE_SPARSE, 0o640
    hdr = bytearray(info.tobuf(format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape")[-512:])

    def octal(n: int, width: int) -> bytes:
        return (f"%0{width - 1}o" % n).encode() + b"\0"
    hdr[386:398], hdr[398:410] = octal(realsize - 512, 12), octal(512, 12)   # one sparse map entry
    hdr[482] = 0
    hdr[483:495] = octal(realsize, 12)
    hdr[148:156] = b" " * 8
    hdr[148:156] = (f"%06o" % sum(hdr)).encode() + b"\0 "
    return bytes(hdr) + b"x" * 512


Hostile = Callable[[str], list[tuple[tarfile.TarInfo, bytes | None] | bytes]]


def reg(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o640
    return info, data


def special(name: str, kind: bytes, **fields: Any) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    for k, v in fields.items():
        setattr(info, k, v)
    return info, None


def claim_10g(name: str) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mode = 10 << 30, 0o640
    return info.tobuf(format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape")


HOSTILE: dict[str, Hostile] = {
    "dotdot": lambda i: [reg(f"{i}/data/../../../../../../../../tmp/{ESCAPE}", b"escaped")],
    "dotdot-inner": lambda i: [reg(f"{i}/data/user-files/../../../{ESCAPE}", b"escaped")],
    "absolute": lambda i: [reg(f"/tmp/{ESCAPE}", b"absolute")],
    "symlink-etc-passwd": lambda i: [special(f"{i}/data/server-files/passwd", tarfile.SYMTYPE,
                                             linkname="/etc/passwd"),
                                     reg(f"{i}/data/server-files/passwd", b"root::0:0::/:/bin/sh\n")],
    "symlink-dir-escape": lambda i: [special(f"{i}/data/evil", tarfile.SYMTYPE, linkname="/tmp"),
                                     reg(f"{i}/data/evil/{ESCAPE}", b"through the link")],
    "hardlink": lambda i: [special(f"{i}/data/user-files/hl", tarfile.LNKTYPE, linkname="/etc/passwd")],
    "hardlink-internal": lambda i: [special(f"{i}/data/user-files/hl", tarfile.LNKTYPE,
                                            linkname=f"{i}/data/.migrate")],
    "char-device": lambda i: [special(f"{i}/data/null", tarfile.CHRTYPE, devmajor=1, devminor=3)],
    "block-device": lambda i: [special(f"{i}/data/sda", tarfile.BLKTYPE, devmajor=8, devminor=0)],
    "fifo": lambda i: [special(f"{i}/data/fifo", tarfile.FIFOTYPE)],
    "sparse-10g": lambda i: [gnu_sparse(f"{i}/data/user-files/sparse.blob", 10 << 30)],
    "size-claim-10g": lambda i: [claim_10g(f"{i}/data/user-files/huge.blob")],
    "duplicate-name": lambda i: [reg(f"{i}/data/.migrate", b'{"migrations": []}')],
    "outside-prefix": lambda i: [reg(f"other-{i}/data/x", b"elsewhere")],
    "newline-name": lambda i: [reg(f"{i}/data/a\nb", b"x")],
    "empty-component": lambda i: [reg(f"{i}/data//x", b"x")],
}


def _setup(h: RHost, ctx: dict[str, Any]) -> None:
    h.ok("instance", "create", "alice", "--domain", "alice.example.org")
    seed(alice_data(h))
    ctx["backup"] = h.ok("backup", "create", "alice", "--compression", "none")["backup"]
    (alice_data(h) / "user-files" / "after-backup.blob").write_bytes(b"live data the restore must not touch")


class Crafter:
    """alice with data and one real backup; re-packs that backup's archive in place."""

    def __init__(self, h: RHost, backup: dict[str, Any]) -> None:
        self.h = h
        self.backup = backup
        self.id = self.backup["id"]
        self.archive = Path(self.backup["archive"])
        self.original = self.archive.read_bytes()

    def members(self) -> list[tuple[tarfile.TarInfo, bytes | None]]:
        with tarfile.open(fileobj=io.BytesIO(self.original), mode="r:") as tar:
            return [(m, tar.extractfile(m).read() if m.isreg() else None) for m in tar.getmembers()]

    def repack(self, extra: list, at: int = 1) -> bytes:
        buf = io.BytesIO()
        items = self.members()
        items[at:at] = extra
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
            for item in items:
                if isinstance(item, bytes):
                    tar.fileobj.write(item)
                    tar.offset += len(item)
                else:
                    info, data = item
                    tar.addfile(info, io.BytesIO(data) if data is not None else None)
        return buf.getvalue()

    def install(self, raw: bytes, *, index_sha: str | None = None) -> None:
        """Put RAW in place of the archive; the index and sidecar get its sha256 (or index_sha)."""
        self.archive.write_bytes(raw)
        digest = hashlib.sha256(raw).hexdigest()
        index_path = Path(self.h.sb.paths["backup_root"]) / "backups.json"
        doc = json.loads(index_path.read_text())
        doc["backups"][self.id].update(sha256=index_sha or digest, size_bytes=len(raw))
        index_path.write_text(json.dumps(doc, indent=2, sort_keys=True))
        self.archive.with_name(self.id + ".sha256").write_text(f"{index_sha or digest}  {self.archive.name}\n")


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory):
    s = SharedRHost(tmp_path_factory, _setup)
    yield s
    s.close()


@pytest.fixture
def rhost(shared: SharedRHost) -> RHost:
    return shared.get()           # restored to the set-up state before every test


@pytest.fixture
def crafter(rhost: RHost, shared: SharedRHost) -> Crafter:
    return Crafter(rhost, shared.ctx["backup"])


def assert_refused(h: RHost, c: Crafter, why: str) -> None:
    live, passwd = data_digest(alice_data(h)), sha(Path("/etc/passwd"))
    before = h.sb.tree()
    got = h.run("--json", "--yes", "backup", "restore", c.id)
    assert got.rc == 3, f"{why}: rc={got.rc}\n{got.out}\n{got.err}"
    assert got.doc["error"]["kind"] in ("CorruptState", "ChecksumMismatch"), got.doc
    assert got.doc["error"]["message"] and "Traceback" not in got.err
    changed = [p for p in tree_diff(before, h.sb.tree()) if not p.startswith("srv/abssctl/backups/")]
    assert changed == [], f"{why}: wrote outside the staging dir: {changed}"
    assert [p for p in h.sb.tree() if ".abssctl-tmp-" in p or ESCAPE in p] == []
    assert data_digest(alice_data(h)) == live
    assert sha(Path("/etc/passwd")) == passwd
    assert not [p for p in OUTSIDE if os.path.lexists(p)]
    assert h.sb.systemctl_units()["abssctl-alice.service"]["ActiveState"] == "active"


def test_the_repacked_control_archive_restores(rhost: RHost, crafter: Crafter) -> None:
    crafter.install(crafter.repack([]))
    got = rhost.run("--json", "--yes", "backup", "restore", crafter.id)
    assert got.rc == 0, got.err
    assert not (alice_data(rhost) / "user-files" / "after-backup.blob").exists()


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_member_is_refused_with_nothing_written_outside_staging(rhost: RHost, crafter: Crafter,
                                                                          case: str) -> None:
    crafter.install(crafter.repack(HOSTILE[case](crafter.id)))
    assert_refused(rhost, crafter, case)


@pytest.mark.parametrize("case", ["flipped-stale-sha", "flipped-matching-sha", "truncated-stale-sha",
                                  "truncated-matching-sha", "manifest-flipped"])
def test_damaged_archives_are_refused(rhost: RHost, crafter: Crafter, case: str) -> None:
    raw = bytearray(crafter.original)
    if case.startswith("flipped"):
        blob = raw.find(b"/data/user-files/file-abc.blob")
        raw[blob + 512 + 1000] ^= 0xFF                   # inside the blob's data
    elif case.startswith("truncated"):
        raw = raw[: len(raw) * 2 // 3]
    else:
        at = raw.find(b'"files"', raw.find(b"manifest.json"))
        raw[at + 40] ^= 0x01
    stale = hashlib.sha256(crafter.original).hexdigest() if "stale" in case else None
    crafter.install(bytes(raw), index_sha=stale)
    assert_refused(rhost, crafter, case)


def test_a_hostile_archive_adopted_by_reconcile_is_still_refused(rhost: RHost, crafter: Crafter) -> None:
    h = rhost
    crafter.install(crafter.repack(HOSTILE["symlink-etc-passwd"](crafter.id)))
    index_path = Path(h.sb.paths["backup_root"]) / "backups.json"
    doc = json.loads(index_path.read_text())
    del doc["backups"][crafter.id]
    index_path.write_text(json.dumps(doc))
    crafter.archive.with_name(crafter.id + ".sha256").unlink()
    adopted = h.run("--json", "backup", "reconcile", "--apply")
    assert adopted.rc == 0, adopted.err
    entry = registry(h.sb, "backups")["backups"][crafter.id]
    assert entry["status"] in ("adopted", "corrupt"), entry
    assert_refused(h, crafter, "adopted symlink")
