"""§6.3 safe_extract: hostile members are refused and nothing escapes the destination."""
from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path

import pytest

import abssctl


def archive(tmp_path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    path = tmp_path / "a.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def reg(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def special(name: str, kind: bytes, **attrs: object) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    for k, v in attrs.items():
        setattr(info, k, v)
    return info, None


def extract(path: Path, dest: Path, **kw: object) -> abssctl.ExtractReport:
    dest.mkdir(exist_ok=True)
    opts = {"prefix": "tree/", "expected": None, "max_bytes": 1 << 30, "allow_symlinks": True, **kw}
    with open(path, "rb") as raw:      # the forward-only reader every abssctl caller uses
        return abssctl.safe_extract(abssctl.open_tar_reader(raw.readinto), str(dest), **opts)


def test_a_clean_tree_extracts_with_our_modes(tmp_path: Path) -> None:
    info, data = reg("tree/bin/run.js", b"#!/usr/bin/env node\n")
    info.mode = 0o4777                 # archive modes are ignored, except the owner's exec bit
    plain = reg("tree/lib/a.txt", b"hello")
    plain[0].mode = 0o666
    path = archive(tmp_path, [(info, data), plain, special("tree/.bin/run", tarfile.SYMTYPE, linkname="../bin/run.js")])
    sums = {"bin/run.js": hashlib.sha256(data).hexdigest(), "lib/a.txt": hashlib.sha256(b"hello").hexdigest()}
    report = extract(path, tmp_path / "out", expected=sums)
    out = tmp_path / "out"
    assert (report.files, report.bytes) == (2, len(data) + 5)
    assert (out / "lib/a.txt").stat().st_mode & 0o7777 == 0o644
    assert (out / "bin/run.js").stat().st_mode & 0o7777 == 0o755
    assert os.readlink(out / ".bin/run") == "../bin/run.js"


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_directories_go_to_the_service_user_only_after_every_file_is_written(tmp_path: Path,
                                                                             monkeypatch) -> None:
    """While root writes a file, no directory above it may belong to the user who gets the tree:
    that user could swap it for a symlink and steer root's write out of the tree."""
    owners_while_writing = []
    real = abssctl._write_member

    def spy(tar, member, target, mode, uid, gid):
        parents, d = [], os.path.dirname(target)
        while d.startswith(str(tmp_path / "out")):
            parents.append(os.stat(d).st_uid)
            d = os.path.dirname(d)
        owners_while_writing.append((member.name, parents))
        return real(tar, member, target, mode, uid, gid)
    monkeypatch.setattr(abssctl, "_write_member", spy)
    path = archive(tmp_path, [reg("tree/data/user-files/a.blob", b"a"), reg("tree/data/server-files/b", b"b"),
                              reg("tree/data/user-files/deep/c.blob", b"c")])
    extract(path, tmp_path / "out", uid=65534, gid=65534, allow_symlinks=False)
    assert len(owners_while_writing) == 3
    assert all(set(owners) == {0} for _name, owners in owners_while_writing), owners_while_writing
    out = tmp_path / "out"
    for d in ("data", "data/user-files", "data/server-files", "data/user-files/deep"):
        assert (out / d).stat().st_uid == 65534, d
    assert (out / "data/user-files/deep/c.blob").stat().st_uid == 65534
    assert out.stat().st_uid == 0                  # dest is the caller's to hand over


def test_members_spanning_chunks_arrive_whole_from_a_reader_giving_short_reads(tmp_path: Path) -> None:
    # Data crosses 1 MiB chunks and 64 KiB file writes at odd offsets; the reader, like a pipe,
    # never returns more than 100,000 bytes at a time.
    big = os.urandom(abssctl.CHUNK * 2 + abssctl.FILE_SLICE + 12345)
    small = b"q" * (abssctl.FILE_SLICE - 1)
    path = archive(tmp_path, [reg("tree/big", big), reg("tree/small", small), reg("tree/empty", b"")])
    sums = {rel: hashlib.sha256(data).hexdigest() for rel, data in (("big", big), ("small", small), ("empty", b""))}
    (tmp_path / "out").mkdir()
    with open(path, "rb") as raw:
        report = abssctl.safe_extract(abssctl.open_tar_reader(lambda view: raw.readinto(view[:100_000])),
                                      str(tmp_path / "out"), prefix="tree/", expected=sums, max_bytes=1 << 30,
                                      allow_symlinks=False)
    assert report.sums == sums and report.bytes == len(big) + len(small)
    assert (tmp_path / "out" / "big").read_bytes() == big


@pytest.mark.parametrize("members, why", [
    ([reg("tree/../../etc/x", b"x")], "'..'"),
    ([reg("/etc/passwd", b"x")], "absolute"),
    ([reg("other/file", b"x")], "outside the expected top-level"),
    ([special("tree/link", tarfile.SYMTYPE, linkname="/etc/passwd")], "outside the tree"),
    ([special("tree/link", tarfile.SYMTYPE, linkname="../../../etc/passwd")], "outside the tree"),
    ([reg("tree/a", b"x"), special("tree/hard", tarfile.LNKTYPE, linkname="tree/a")], "link, device"),
    ([special("tree/dev", tarfile.CHRTYPE, devmajor=1, devminor=3)], "link, device"),
    ([special("tree/fifo", tarfile.FIFOTYPE)], "link, device"),
    ([reg("tree/a", b"x"), reg("tree/a", b"y")], "appears twice"),
    ([reg("tree/a\nb", b"x")], "control-character"),
])
def test_hostile_members_are_refused(tmp_path: Path, members: list, why: str) -> None:
    path = archive(tmp_path, members)
    with pytest.raises(abssctl.CorruptState) as err:
        extract(path, tmp_path / "out")
    assert why in err.value.message
    assert not (tmp_path / "etc").exists()


def test_symlinks_are_refused_outside_bundle_mode(tmp_path: Path) -> None:
    path = archive(tmp_path, [special("tree/l", tarfile.SYMTYPE, linkname="a")])
    with pytest.raises(abssctl.CorruptState):
        extract(path, tmp_path / "out", allow_symlinks=False)


def test_a_size_claim_beyond_the_allowance_is_refused_before_writing(tmp_path: Path) -> None:
    path = archive(tmp_path, [reg("tree/big", b"x" * 4096)])
    with pytest.raises(abssctl.CorruptState) as err:
        extract(path, tmp_path / "out", max_bytes=1000)
    assert "exceed" in err.value.message and not (tmp_path / "out" / "big").exists()


def test_a_sparse_10_gb_claim_is_refused(tmp_path: Path) -> None:
    info = tarfile.TarInfo("tree/sparse")
    info.type = tarfile.GNUTYPE_SPARSE
    info.size = 10 << 30
    path = tmp_path / "s.tar"
    with open(path, "wb") as f:
        f.write(info.tobuf(format=tarfile.GNU_FORMAT) + b"\0" * 1024)
    with pytest.raises(abssctl.CorruptState):
        extract(path, tmp_path / "out")


def test_checksums_must_match_and_be_complete(tmp_path: Path) -> None:
    path = archive(tmp_path, [reg("tree/a", b"one")])
    with pytest.raises(abssctl.ChecksumMismatch):
        extract(path, tmp_path / "o1", expected={"a": "0" * 64})
    with pytest.raises(abssctl.CorruptState) as err:
        extract(path, tmp_path / "o2", expected={"a": hashlib.sha256(b"one").hexdigest(), "b": "0" * 64})
    assert "missing 1 file" in err.value.message
    with pytest.raises(abssctl.CorruptState) as err:
        extract(path, tmp_path / "o3", expected={})
    assert "not listed" in err.value.message


def test_truncated_archive_is_refused(tmp_path: Path) -> None:
    path = archive(tmp_path, [reg("tree/a", b"z" * 100000)])
    data = path.read_bytes()
    path.write_bytes(data[:20000])
    with pytest.raises((abssctl.CorruptState, tarfile.TarError)):
        extract(path, tmp_path / "out")


@pytest.mark.parametrize("node, spec, ok", [
    ("v20.20.2", ">=22", False), ("v22.23.3", ">=22", True), ("v20.20.2", ">=18", True),
    ("v20.1.0", "^20.0.0", True), ("v21.0.0", "^20", False), ("v20.5.0", ">=18 <21", True),
    ("v22.0.0", ">=18 <21", False), ("v20.5.0", "18.x || 20.x", True), ("v22.0.0", "~20.1", False),
    ("v20.1.5", "~20.1", True), ("v20.0.0", "*", True),
])
def test_engines_ranges(node: str, spec: str, ok: bool) -> None:
    assert abssctl.engines_satisfied(node, spec) is ok


def test_semver_precedence() -> None:
    order = ["1.0.0-alpha", "1.0.0-alpha.1", "1.0.0-alpha.beta", "1.0.0-beta", "1.0.0-beta.2",
             "1.0.0-beta.11", "1.0.0-rc.1", "1.0.0", "2.0.0", "26.9.0", "26.10.0"]
    assert sorted(reversed(order), key=abssctl.semver_key) == order


@pytest.mark.parametrize("bad", ["1.2", "v1.0.0", "1.0.0+build", ">=1.0.0", "../x", "1.0", "01.0.0",
                                 "1.0.0-", "x" * 65, "latest-ish", "1.0.0 "])
def test_version_strings_are_strict(bad: str) -> None:
    with pytest.raises(abssctl.UsageError):
        abssctl.validate_version(bad)
