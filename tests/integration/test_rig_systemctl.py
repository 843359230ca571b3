"""The systemd_sandbox rig: the systemctl replacement starts, reports and stops a real service."""
from __future__ import annotations

import http.client
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from rig.nginx_sandbox import free_port
from rig.systemd_sandbox import SystemdSandbox, pid_alive

UNIT = "abssctl-demo.service"


def _write_unit(sd: SystemdSandbox, name: str, workdir: Path, exec_start: str,
                extra: str = "") -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    (sd.unit_dir / name).write_text(
        "[Unit]\nDescription=abssctl rig demo\n\n"
        f"[Service]\nType=simple\nWorkingDirectory={workdir}\n{extra}ExecStart={exec_start}\n\n"
        "[Install]\nWantedBy=multi-user.target\n", encoding="utf-8")


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _until(pred: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return bool(pred())


@pytest.mark.integration
def test_start_show_stop_a_real_service(systemd_sandbox: SystemdSandbox, tmp_path: Path) -> None:
    sd = systemd_sandbox
    port = free_port()
    work = tmp_path / "work"
    _write_unit(sd, UNIT, work, f"/usr/bin/python3 -m http.server {port} --bind 127.0.0.1",
                extra=f"EnvironmentFile={tmp_path}/demo.env\n")
    (tmp_path / "demo.env").write_text("DEMO=1\n", encoding="utf-8")
    (work / "marker.txt").write_text("served from WorkingDirectory\n", encoding="utf-8")

    assert sd.run("--no-pager", "daemon-reload").returncode == 0
    assert sd.run("--no-pager", "enable", UNIT).returncode == 0  # is-active says unknown otherwise
    started = sd.run("--no-pager", "start", UNIT)
    assert started.returncode == 0, started.stderr
    active = sd.run("--no-pager", "is-active", UNIT)
    assert (active.returncode, active.stdout.strip()) == (0, "active")

    props = sd.show(UNIT)
    assert (props["ActiveState"], props["SubState"]) == ("active", "running")
    pid = int(props["MainPID"])
    assert pid > 0 and pid_alive(pid)
    assert sd.status_pids() == {UNIT: pid}
    one = sd.run("--no-pager", "show", "-p", "MainPID", UNIT)
    assert one.stdout.strip() == f"MainPID={pid}"

    assert _until(lambda: _answers(port), 10), "the service never listened"
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:  # proves WorkingDirectory (given as an absolute path) reached the real tmp_path dir
        conn.request("GET", "/marker.txt")
        resp = conn.getresponse()
        assert (resp.status, resp.read()) == (200, b"served from WorkingDirectory\n")
    finally:
        conn.close()

    journal = sd.journal("-u", UNIT, "-n", "20", "--no-pager", "-o", "short-iso")
    assert journal.returncode == 0
    assert "GET /marker.txt" in journal.stdout

    stopped = sd.run("--no-pager", "stop", UNIT)
    assert stopped.returncode == 0, stopped.stderr
    assert _until(lambda: not pid_alive(pid), 10), f"PID {pid} survived stop"
    assert _until(lambda: not _answers(port), 5), "port still open after stop"
    inactive = sd.run("--no-pager", "is-active", UNIT)
    assert (inactive.returncode, inactive.stdout.strip()) == (3, "inactive")
    assert sd.show(UNIT)["MainPID"] == "0"


@pytest.mark.integration
def test_a_service_that_exits_at_once_fails_start(systemd_sandbox: SystemdSandbox,
                                                  tmp_path: Path) -> None:
    sd = systemd_sandbox
    name = "abssctl-crash.service"
    _write_unit(sd, name, tmp_path / "crash",
                "/usr/bin/python3 -c \"import sys; print('crashing on purpose'); sys.exit(3)\"")
    assert sd.run("enable", name).returncode == 0
    started = sd.run("--no-pager", "start", name)
    assert started.returncode == 1  # the replacement's rc when the process died during start
    props = sd.show(name)
    assert props["ActiveState"] == "failed"
    assert sd.run("is-active", name).returncode != 0
    assert "crashing on purpose" in sd.journal("-u", name, "--no-pager").stdout


@pytest.mark.integration
def test_journal_shim_tails_and_rejects_unknown_flags(systemd_sandbox: SystemdSandbox) -> None:
    sd = systemd_sandbox
    (sd.log_dir / "abssctl-x.service.log").write_text(
        "".join(f"line {i}\n" for i in range(10)), encoding="utf-8")
    tail = sd.journal("-u", "abssctl-x", "-n", "3", "--no-pager", "-o", "cat")
    assert tail.stdout.splitlines() == ["line 7", "line 8", "line 9"]
    iso = sd.journal("--unit=abssctl-x.service", "--lines=1", "-o", "short-iso",
                     "--since", "-5min")
    assert iso.stdout.rstrip().endswith("abssctl-x: line 9")
    assert iso.stdout[:4].isdigit()
    empty = sd.journal("-u", "abssctl-none", "--no-pager")
    assert (empty.returncode, empty.stdout.strip()) == (0, "-- No entries --")
    assert sd.journal("--grep", "x").returncode == 1


@pytest.mark.integration
def test_teardown_kills_a_recorded_pid_left_running(systemd_sandbox: SystemdSandbox,
                                                     tmp_path: Path) -> None:
    sd = systemd_sandbox
    name = "abssctl-sleeper.service"
    _write_unit(sd, name, tmp_path / "sleeper", "/usr/bin/sleep 300")
    assert sd.run("start", name).returncode == 0
    pid = sd.status_pids()[name]
    assert pid_alive(pid)
    (sd.unit_dir / name).unlink()  # now `stop` cannot find it: only the recorded PID is left
    sd.teardown()
    assert _until(lambda: not pid_alive(pid), 10)
