"""abssctl's providers against the real components: nginx transactions and systemd units."""
from __future__ import annotations

import http.client
import json
import os
import time
from pathlib import Path

import pytest

import abssctl

pytestmark = pytest.mark.integration


def context(tmp_path: Path, commands: dict[str, list[str]]) -> abssctl.Context:
    cfg_file = tmp_path / "config.toml"
    lines = ["[paths]"] + [f'{k} = "{tmp_path / k}"' for k in abssctl.CONFIG_SCHEMA["paths"]]
    lines += ["[commands]"] + [f"{k} = {json.dumps(v)}" for k, v in commands.items()]
    cfg_file.write_text("\n".join(lines) + "\n")
    cfg, problems = abssctl.load_config(str(cfg_file), {}, {})
    assert problems == []
    out = abssctl.Output(json_mode=True, quiet=True, debug=False, color=False,
                         stdout=open(os.devnull, "w"), stderr=open(os.devnull, "w"))
    return abssctl.Context(config=cfg, out=out, dry_run=False, assume_yes=True, interactive=False,
                           lock_timeout=5, command="test")


def fetch(port: int, host: str) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/", headers={"Host": host})
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def vhost(port: int, host: str, body: str, extra: str = "") -> bytes:
    return (f"server {{\n    listen 127.0.0.1:{port};\n    server_name {host};\n{extra}"
            f"    location / {{ return 200 \"{body}\\n\"; }}\n}}\n").encode()


def test_nginx_transaction_applies_then_rolls_back_a_broken_vhost(real_nginx, tmp_path: Path) -> None:
    ctx = context(tmp_path, {"nginx": real_nginx.command, "nginx_reload": real_nginx.reload_command})
    nginx = abssctl.Nginx(ctx.runner)
    avail, link = real_nginx.sites_available / "abssctl-a.conf", real_nginx.sites_enabled / "abssctl-a.conf"
    lock = str(tmp_path / "nginx.lock")
    with nginx.transaction("op1", lock) as tx:
        tx.write(str(avail), vhost(real_nginx.http_port, "a.example.test", "first"))
        tx.link(str(link), str(avail))
    assert tx.changed
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:            # reload returns before the new workers listen
        try:
            if fetch(real_nginx.http_port, "a.example.test") == (200, "first\n"):
                break
        except OSError:
            pass
        time.sleep(0.1)
    assert fetch(real_nginx.http_port, "a.example.test") == (200, "first\n")

    good = avail.read_bytes()
    with pytest.raises(abssctl.ProviderError) as err:
        with nginx.transaction("op2", lock) as tx:
            tx.write(str(avail), vhost(real_nginx.http_port, "a.example.test", "second", "    bogus_directive on;\n"))
    assert "previous configuration is back" in err.value.message
    assert "bogus_directive" in " ".join(err.value.details["stderr"])
    assert avail.read_bytes() == good
    assert real_nginx.test().returncode == 0
    assert fetch(real_nginx.http_port, "a.example.test") == (200, "first\n")
    assert [p.name for p in real_nginx.sites_available.iterdir()] == ["abssctl-a.conf"]   # no temp files


def test_nginx_transaction_without_a_difference_neither_tests_nor_reloads(real_nginx, tmp_path: Path) -> None:
    ctx = context(tmp_path, {"nginx": real_nginx.command, "nginx_reload": ["/bin/false"]})
    nginx = abssctl.Nginx(ctx.runner)
    avail = real_nginx.sites_available / "abssctl-b.conf"
    avail.write_bytes(vhost(real_nginx.http_port, "b.example.test", "same"))
    with nginx.transaction("op3", str(tmp_path / "nginx.lock")) as tx:
        tx.write(str(avail), avail.read_bytes())      # reload would fail (/bin/false) if it ran
    assert tx.changed is False


def test_nginx_transaction_refuses_when_nginx_already_fails(real_nginx, tmp_path: Path) -> None:
    ctx = context(tmp_path, {"nginx": real_nginx.command, "nginx_reload": real_nginx.reload_command})
    foreign = real_nginx.sites_enabled / "foreign.conf"
    foreign.write_text("this is not nginx syntax\n")
    nginx = abssctl.Nginx(ctx.runner)
    avail = real_nginx.sites_available / "abssctl-c.conf"
    with pytest.raises(abssctl.ProviderError) as err:
        with nginx.transaction("op4", str(tmp_path / "nginx.lock")) as tx:
            tx.write(str(avail), vhost(real_nginx.http_port, "c.example.test", "c"))
    assert err.value.message.startswith("nginx was already failing before any change")
    assert not avail.exists()


def test_systemd_provider_starts_shows_and_stops_a_real_process(systemd_sandbox, tmp_path: Path) -> None:
    from rig.nginx_sandbox import free_port, pid_alive
    ctx = context(tmp_path, {"systemctl": systemd_sandbox.command})
    sd = abssctl.Systemd(ctx.runner)
    port = free_port()
    unit = "abssctl-demo.service"
    (systemd_sandbox.unit_dir / unit).write_text(
        f"[Unit]\nDescription=demo\n[Service]\nType=simple\nWorkingDirectory={tmp_path}\n"
        f"ExecStart=/usr/bin/python3 -m http.server {port} --bind 127.0.0.1\n"
        "[Install]\nWantedBy=multi-user.target\n")
    sd.daemon_reload()
    ctx.runner.run("systemctl", ["--no-pager", "enable", unit], mutating=True)
    ctx.runner.run("systemctl", ["--no-pager", "start", unit], mutating=True)
    props = ("ActiveState", "SubState", "MainPID", "UnitFileState")
    state = sd.show([unit, "abssctl-nope.service"], props)
    assert state[unit]["ActiveState"] == "active" and state[unit]["UnitFileState"] == "enabled"
    pid = int(state[unit]["MainPID"])
    assert pid > 0 and pid_alive(pid)
    assert state["abssctl-nope.service"]["ActiveState"] in ("inactive", "")
    deadline = time.monotonic() + 10
    while not abssctl.port_listening("127.0.0.1", port) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert abssctl.port_listening("127.0.0.1", port)
    ctx.runner.run("systemctl", ["--no-pager", "stop", unit], mutating=True)
    deadline = time.monotonic() + 10
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not pid_alive(pid)
    assert sd.show([unit], props)[unit]["ActiveState"] != "active"


def test_systemd_start_of_a_dying_unit_is_a_provider_error(systemd_sandbox, tmp_path: Path) -> None:
    ctx = context(tmp_path, {"systemctl": systemd_sandbox.command})
    sd = abssctl.Systemd(ctx.runner)
    unit = "abssctl-dies.service"
    (systemd_sandbox.unit_dir / unit).write_text(
        "[Service]\nType=simple\nExecStart=/bin/false\n[Install]\nWantedBy=multi-user.target\n")
    ctx.runner.run("systemctl", ["--no-pager", "enable", unit], mutating=True)
    with pytest.raises(abssctl.ProviderError) as err:
        ctx.runner.run("systemctl", ["--no-pager", "start", unit], mutating=True)
    assert err.value.exit_code == 4 and "start" in err.value.message
