"""§4: atomic writes, registries, the ops log, locks with holders, timeouts and stale detection."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import abssctl


def registry(tmp_path: Path, key: str = "instances") -> abssctl.Registry:
    return abssctl.Registry(str(tmp_path / f"{key}.json"), key, lock_path=str(tmp_path / "registry.lock"),
                            gid=lambda: -1)


def test_atomic_write_replaces_whole_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "f.json"
    abssctl.atomic_write(str(target), b"one", mode=0o600, tag="op1")
    abssctl.atomic_write(str(target), b"two", mode=0o640, tag="op1")
    assert target.read_bytes() == b"two" and (target.stat().st_mode & 0o777) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]


def test_atomic_write_failure_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "f"
    target.write_bytes(b"old")

    def no_space(fd: int) -> None:
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError):
        abssctl.atomic_write(str(target), b"new" * 1000, tag="x")
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["f"]


def test_registry_round_trip_keeps_prev(tmp_path: Path) -> None:
    reg = registry(tmp_path)
    assert reg.load() == {"schema_version": 1, "instances": {}}
    with reg.edit() as doc:
        doc["instances"]["alice"] = {"name": "alice"}
    with reg.edit() as doc:
        doc["instances"]["bob"] = {"name": "bob"}
    assert set(reg.load()["instances"]) == {"alice", "bob"}
    prev = json.loads((tmp_path / "instances.json.prev").read_text())
    assert set(prev["instances"]) == {"alice"}


def test_registry_edit_without_change_writes_nothing(tmp_path: Path) -> None:
    reg = registry(tmp_path)
    with reg.edit():
        pass
    assert not (tmp_path / "instances.json").exists()


@pytest.mark.parametrize("content", ["{not json", '{"schema_version": 2, "instances": {}}',
                                     '{"schema_version": 1}', '[1, 2]', '{"schema_version": "1", "instances": {}}'])
def test_untrustworthy_registry_is_corrupt_state(tmp_path: Path, content: str) -> None:
    (tmp_path / "instances.json").write_text(content)
    with pytest.raises(abssctl.CorruptState) as err:
        registry(tmp_path).load()
    assert err.value.exit_code == 3 and "instances.json" in err.value.message
    assert ".prev" in err.value.hint


def test_corrupt_registry_through_the_cli_exits_3(sandbox) -> None:
    assert sandbox.run("init").rc == 0
    (sandbox.paths["state_dir"] / "registry" / "ports.json").write_text("{oops")
    got = sandbox.run("--json", "ports", "list")
    assert got.rc == 3 and got.doc["error"]["kind"] == "CorruptState"


def test_ops_log_appends_json_and_text(tmp_path: Path) -> None:
    log = abssctl.OpsLog(str(tmp_path / "log" / "operations.jsonl"), str(tmp_path / "log" / "abssctl.log"))
    for n in range(3):
        log.append({"ts": f"2026-01-0{n + 1}T00:00:00.000Z", "op_id": f"op{n}", "command": "init",
                    "result": "ok"})
    assert [r["op_id"] for r in log.read()] == ["op0", "op1", "op2"]
    text = (tmp_path / "log" / "abssctl.log").read_text().splitlines()
    assert text[0] == "2026-01-01T00:00:00.000Z op0 INFO init: ok"
    assert (tmp_path / "log").stat().st_mode & 0o777 == 0o750


def test_redaction_of_secret_args() -> None:
    assert abssctl.redact_args({"password": "p", "api_token": "t", "name": "alice"}) == \
        {"password": "<redacted>", "api_token": "<redacted>", "name": "alice"}


HOLDER = """
import sys, time
sys.path.insert(0, {root!r})
import abssctl
lock = abssctl.FileLock({path!r}, shared={shared})
lock.acquire(5, {{"pid": __import__("os").getpid(), "command": "backup create alice", "op_id": "op-x",
                 "acquired_at": time.time()}}, print)
print("locked", flush=True)
sys.stdin.readline()
"""


def hold(path: Path, shared: bool = False) -> subprocess.Popen[str]:
    root = str(Path(abssctl.__file__).parent)
    proc = subprocess.Popen([sys.executable, "-c", HOLDER.format(root=root, path=str(path), shared=shared)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def release(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.close()
    proc.wait(timeout=10)


def test_lock_timeout_names_the_holder(tmp_path: Path) -> None:
    path = tmp_path / "run" / "abssctl.lock"
    proc = hold(path)
    try:
        started = time.monotonic()
        with pytest.raises(abssctl.LockTimeout) as err:
            abssctl.FileLock(str(path)).acquire(0, {"pid": os.getpid()}, lambda m: None)
        assert time.monotonic() - started < 2
        assert f"pid {proc.pid}" in err.value.message and "backup create alice" in err.value.message
        assert err.value.details["holder"]["op_id"] == "op-x"
        assert abssctl.lock_state(str(path)) == "held"
    finally:
        release(proc)
    assert abssctl.lock_state(str(path)) == "stale"      # the file names a dead PID; flock is free
    lock = abssctl.FileLock(str(path))
    lock.acquire(0, {"pid": os.getpid(), "command": "me"}, lambda m: None)
    lock.release()
    assert path.exists() and abssctl.lock_state(str(path)) == "free"


def test_shared_locks_coexist_and_block_exclusive(tmp_path: Path) -> None:
    path = tmp_path / "abssctl.lock"
    proc = hold(path, shared=True)
    try:
        mine = abssctl.FileLock(str(path), shared=True)
        mine.acquire(0, {}, lambda m: None)
        mine.release()
        with pytest.raises(abssctl.LockTimeout):
            abssctl.FileLock(str(path)).acquire(0.2, {}, lambda m: None)
    finally:
        release(proc)


def test_waiting_prints_the_holder_after_a_second(tmp_path: Path) -> None:
    path = tmp_path / "abssctl.lock"
    proc = hold(path)
    said: list[str] = []
    try:
        with pytest.raises(abssctl.LockTimeout):
            abssctl.FileLock(str(path)).acquire(1.5, {}, said.append)
    finally:
        release(proc)
    assert len(said) == 1 and said[0].startswith(f"waiting for lock held by pid {proc.pid} (backup create alice")


def test_cli_lock_timeout_zero_exits_3(sandbox) -> None:
    assert sandbox.run("init").rc == 0
    proc = hold(sandbox.paths["run_dir"] / "abssctl.lock")
    try:
        got = sandbox.run("--json", "--lock-timeout", "0", "init")
        assert got.rc == 3 and got.doc["error"]["kind"] == "LockTimeout"
        assert str(proc.pid) in got.doc["error"]["message"]
    finally:
        release(proc)


@pytest.mark.parametrize("text,seconds", [("90s", 90), ("30m", 1800), ("24h", 86400), ("7d", 604800),
                                          ("2w", 1209600), (" 1h ", 3600)])
def test_parse_duration(text: str, seconds: float) -> None:
    assert abssctl.parse_duration(text, "--if-older-than") == seconds


@pytest.mark.parametrize("text", ["", "24", "h", "0h", "1y", "1.5h", "-1d", "1 h", "1234567d"])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(abssctl.UsageError) as err:
        abssctl.parse_duration(text, "--if-older-than")
    assert "--if-older-than" in err.value.message and err.value.hint
