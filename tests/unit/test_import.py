"""instance import (DESIGN §11.6): the parser, the source layout, read-only URIs and the inventory."""
from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import Any

import pytest

import abssctl


def data_dir(root: Path, files: dict[str, tuple[str | None, str, bool]] | None = None,
             blobs: tuple[str, ...] = ("a",), wal: bool = False) -> Path:
    """A server data dir: account.sqlite with a files table (id -> group, name, deleted), blobs."""
    (root / "server-files").mkdir(parents=True)
    (root / "user-files").mkdir()
    (root / ".migrate").write_text(json.dumps({"lastRun": "2-b.js", "migrations": [
        {"title": "1-a.js", "timestamp": 1}, {"title": "2-b.js", "timestamp": 2}, {"title": "3-c.js", "timestamp": None}]}))
    db = sqlite3.connect(root / "server-files" / "account.sqlite")
    if wal:
        db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE files (id TEXT PRIMARY KEY, group_id TEXT, deleted BOOLEAN DEFAULT FALSE, name TEXT)")
    for fid, (gid, name, deleted) in (files or {"a": ("g", "Home", False)}).items():
        db.execute("INSERT INTO files (id, group_id, deleted, name) VALUES (?, ?, ?, ?)", (fid, gid, deleted, name))
    db.commit()
    db.close()
    for fid in blobs:
        (root / "user-files" / f"file-{fid}.blob").write_bytes(b"PK" + fid.encode() * 10)
    return root


def usage(fn: Any, *args: Any) -> abssctl.UsageError:
    with pytest.raises(abssctl.UsageError) as got:
        fn(*args)
    assert got.value.exit_code == 2 and got.value.hint, got.value.message
    return got.value


@pytest.mark.parametrize("argv", [
    ["instance", "import", "home"],                                        # no source
    ["instance", "import", "home", "--from", "/a", "--from-backup", "/b"],  # two sources
    ["instance", "import", "Home", "--from", "/a"],                        # a bad name
    ["instance", "import", "home", "--from", "/a", "--version", "latest"],  # not an exact version
])
def test_parser_refuses(sandbox: Any, argv: list[str]) -> None:
    got = sandbox.run("--json", *argv)
    assert got.rc == 2, got


def test_the_data_dir_itself_and_the_dir_above_it(tmp_path: Path) -> None:
    d = data_dir(tmp_path / "npm" / "data")
    assert abssctl.locate_server_data(str(d))["server_files"] == str(d / "server-files")
    (tmp_path / "npm" / "config.json").write_text(json.dumps({"dataDir": "data", "userFiles": "data/user-files"}))
    layout = abssctl.locate_server_data(str(tmp_path / "npm"))
    assert layout == {"data": str(d), "server_files": str(d / "server-files"), "user_files": str(d / "user-files")}


def test_refusals_of_the_layout(tmp_path: Path) -> None:
    assert "not an Actual server data dir" in usage(abssctl.locate_server_data, str(tmp_path)).message
    assert "not a directory" in usage(abssctl.locate_server_data, str(tmp_path / "nope")).message
    data_dir(tmp_path / "elsewhere")
    above = tmp_path / "above"
    above.mkdir()
    (above / "config.json").write_text(json.dumps({"dataDir": "../elsewhere"}))
    err = usage(abssctl.locate_server_data, str(above))
    assert "outside" in err.message and "--from " + str(tmp_path / "elsewhere") in err.hint
    (above / "config.json").write_text(json.dumps({"port": 5006}))
    assert "names no dataDir" in usage(abssctl.locate_server_data, str(above)).message
    (above / "config.json").write_text("{not json")
    usage(abssctl.locate_server_data, str(above))


def test_read_only_uris(tmp_path: Path) -> None:
    plain = data_dir(tmp_path / "plain") / "server-files" / "account.sqlite"
    assert abssctl.source_db_uri(str(plain)).endswith("?mode=ro")
    wal = data_dir(tmp_path / "w a?l", wal=True) / "server-files" / "account.sqlite"
    assert not Path(str(wal) + "-wal").exists()
    uri = abssctl.source_db_uri(str(wal))
    assert uri.endswith("?immutable=1") and "w%20a%3Fl" in uri
    con = sqlite3.connect(uri, uri=True)
    assert con.execute("SELECT count(*) FROM files").fetchone()[0] == 1
    con.close()
    assert sorted(os.listdir(wal.parent)) == ["account.sqlite"]         # no side file made
    live = sqlite3.connect(wal)                                           # a live writer has a -wal
    live.execute("INSERT INTO files (id) VALUES ('z')")
    live.commit()
    assert abssctl.source_db_uri(str(wal)).endswith("?mode=ro")
    live.close()


def test_the_inventory_names_missing_blobs_but_not_deleted_ones(tmp_path: Path) -> None:
    d = data_dir(tmp_path / "d", files={"a": ("g1", "Home", False), "b": ("g2", "Gone", True),
                                        "c": (None, "Lost", False)}, blobs=("a",))
    (d / "user-files" / "group-g1.sqlite").write_bytes(b"")
    (d / "cfg.json").write_text("{}")
    src = abssctl.inspect_server_dir(str(d))
    assert [b["id"] for b in src.budgets] == ["a", "b", "c"]
    assert [b["id"] for b in src.missing] == ["c"]
    assert src.migrations == ["1-a.js", "2-b.js"]                        # a null timestamp never ran
    assert src.skipped == ["cfg.json"]
    kinds = {f["rel"]: f["kind"] for f in src.files}
    assert kinds["server-files/account.sqlite"] == "sqlite" and kinds["user-files/group-g1.sqlite"] == "file"


def test_links_inside_are_followed_and_links_out_refused(tmp_path: Path) -> None:
    d = data_dir(tmp_path / "d", blobs=())
    (d / "user-files" / "real.bin").write_bytes(b"PKa")
    (d / "user-files" / "file-a.blob").symlink_to(d / "user-files" / "real.bin")
    src = abssctl.inspect_server_dir(str(d))
    assert src.missing == [] and {f["rel"] for f in src.files} >= {"user-files/file-a.blob"}
    (tmp_path / "secret").write_text("x")
    (d / "user-files" / "leak").symlink_to(tmp_path / "secret")
    assert "outside" in usage(abssctl.inspect_server_dir, str(d)).message
    (d / "user-files" / "leak").unlink()
    (d / "user-files" / "sub").symlink_to(d / "server-files")
    assert "symlink to a directory" in usage(abssctl.inspect_server_dir, str(d)).message


def test_a_corrupt_database_is_bad_input(tmp_path: Path) -> None:
    d = data_dir(tmp_path / "d")
    db = d / "server-files" / "account.sqlite"
    raw = bytearray(db.read_bytes())
    raw[16:100] = b"\xff" * 84                       # a broken header: "file is not a database"
    db.write_bytes(bytes(raw))
    assert "integrity_check" in usage(abssctl.inspect_server_dir, str(d)).message
