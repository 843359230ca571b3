"""The real_nginx rig: a vhost in the sandbox is tested, reloaded and served on loopback."""
from __future__ import annotations

import http.client
import time

import pytest

from rig.nginx_sandbox import NginxSandbox, pid_alive

BODY = "abssctl rig says hello"


def _vhost(port: int, body: str) -> str:
    return ("server {\n"
            f"    listen 127.0.0.1:{port};\n"
            "    server_name rig.test;\n"
            f"    location / {{ default_type text/plain; return 200 \"{body}\\n\"; }}\n"
            "}\n")


def _enable(nginx: NginxSandbox, name: str, text: str) -> None:
    (nginx.sites_available / name).write_text(text, encoding="utf-8")
    (nginx.sites_enabled / name).symlink_to(nginx.sites_available / name)


def _get(port: int, deadline: float) -> tuple[int, str]:
    """GET / on 127.0.0.1:PORT, retried until DEADLINE (a reload brings workers up async)."""
    last: Exception | None = None
    while time.monotonic() < deadline:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            conn.request("GET", "/", headers={"Host": "rig.test"})
            resp = conn.getresponse()
            return resp.status, resp.read().decode()
        except OSError as exc:
            last = exc
            time.sleep(0.1)
        finally:
            conn.close()
    raise AssertionError(f"nothing answered on 127.0.0.1:{port}: {last}")


@pytest.mark.integration
def test_sandbox_nginx_serves_an_enabled_vhost(real_nginx: NginxSandbox) -> None:
    master = real_nginx.pid()
    assert pid_alive(master)
    assert real_nginx.command[-2:] == ["-c", str(real_nginx.conf)]
    assert real_nginx.reload_command == [*real_nginx.command, "-s", "reload"]
    assert real_nginx.http_port != real_nginx.https_port

    _enable(real_nginx, "rig.conf", _vhost(real_nginx.http_port, BODY))
    checked = real_nginx.test()
    assert checked.returncode == 0, checked.stderr
    assert "test is successful" in checked.stderr
    reloaded = real_nginx.reload()
    assert reloaded.returncode == 0, reloaded.stderr

    status, body = _get(real_nginx.http_port, time.monotonic() + 10)
    assert (status, body) == (200, BODY + "\n")
    assert real_nginx.pid() == master and pid_alive(master)  # a reload keeps the master


@pytest.mark.integration
def test_broken_vhost_fails_the_config_test(real_nginx: NginxSandbox) -> None:
    _enable(real_nginx, "good.conf", _vhost(real_nginx.http_port, BODY))
    assert real_nginx.test().returncode == 0
    _enable(real_nginx, "broken.conf", "server { listen 127.0.0.1:1; BROKEN here; }\n")
    checked = real_nginx.test()
    assert checked.returncode != 0
    assert "broken.conf" in checked.stderr and "BROKEN" in checked.stderr
    # `-s reload` parses the config first, so a broken one is refused and the master lives on
    assert real_nginx.reload().returncode != 0
    assert pid_alive(real_nginx.pid())


@pytest.mark.integration
def test_teardown_stops_only_our_master(real_nginx: NginxSandbox) -> None:
    master = real_nginx.pid()
    workers = real_nginx.worker_pids()
    assert workers, "a running master has at least one worker"
    real_nginx.stop()
    assert not pid_alive(master)
    assert not any(pid_alive(pid) for pid in workers)
    assert real_nginx.pid() == 0
