"""A real nginx confined to tmp_path: the `real_nginx` fixture (DESIGN.md §7(b))."""
from __future__ import annotations

import errno
import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

__all__ = ["real_nginx", "NginxSandbox", "free_port", "pid_alive"]

NGINX = "/usr/sbin/nginx"
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0

# Everything nginx would otherwise write under /var/lib/nginx, /var/log/nginx or /run goes into the
# sandbox: the compiled-in access log and temp paths are absolute, so -p alone does not move them.
# The master runs as root here and workers would default to nobody, who cannot enter pytest's 0700
# tmp dirs, hence `user root`.
CONF = """\
# abssctl test sandbox nginx; started with -p {prefix} -c {conf}
{user}
worker_processes 1;
daemon on;
pid {prefix}/nginx.pid;
lock_file {prefix}/nginx.lock;
error_log {prefix}/error.log warn;

events {{
    worker_connections 128;
}}

http {{
    default_type application/octet-stream;
    access_log {prefix}/access.log;
    client_body_temp_path {prefix}/temp/client_body;
    proxy_temp_path {prefix}/temp/proxy;
    fastcgi_temp_path {prefix}/temp/fastcgi;
    uwsgi_temp_path {prefix}/temp/uwsgi;
    scgi_temp_path {prefix}/temp/scgi;
    server_names_hash_bucket_size 128;
    include {prefix}/sites-enabled/*;
}}
"""


def pid_alive(pid: int) -> bool:
    """True while PID exists and is not a zombie (PID 1 here reaps orphans only every so often)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


# Test ports come from below the kernel's ephemeral range (net.ipv4.ip_local_port_range), so no
# outgoing connection can be given one between the pick and the bind. That gap is long here: the
# sandbox nginx binds its ports only at the reload that publishes the first vhost, after a whole
# `instance create`. Ports already handed out in this process are not handed out again.
LOW_PORT = 10000
_handed_out: set[int] = set()


def _ephemeral_floor() -> int:
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text(encoding="ascii")
        return int(text.split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(port: int) -> bool:
    """PORT is free on the IPv4 wildcard, and on [::] when the host has IPv6."""
    families = [(socket.AF_INET, "0.0.0.0")] + ([(socket.AF_INET6, "::")] if socket.has_ipv6 else [])
    for family, address in families:
        try:
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind((address, port))
        except OSError as exc:
            if family == socket.AF_INET or exc.errno == errno.EADDRINUSE:
                return False
    return True


def free_port(span: int = 1) -> int:
    """A TCP port (the first of SPAN in a row) free now, below the ephemeral range, and not handed
    out before in this process."""
    top = _ephemeral_floor() - span
    if top <= LOW_PORT:  # an ephemeral range that starts low: any high port will do
        top = 65535 - span
    for _ in range(200):
        base = random.randrange(LOW_PORT, top)
        ports = range(base, base + span)
        if _handed_out.isdisjoint(ports) and all(_bindable(port) for port in ports):
            _handed_out.update(ports)
            return base
    raise RuntimeError(f"no {span} free TCP port(s) in a row found below {top + span} in 200 tries")


def _children(pid: int) -> list[int]:
    """Direct children of PID (nginx workers of a master)."""
    kids: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text(encoding="ascii", errors="replace")
        except OSError:
            continue
        if int(stat.rpartition(")")[2].split()[1]) == pid:
            kids.append(int(entry.name))
    return kids


def _wait_gone(pids: list[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(pid_alive(p) for p in pids):
            return True
        time.sleep(0.05)
    return not any(pid_alive(p) for p in pids)


class NginxSandbox:
    """A running sandbox nginx: paths, ports and the argv abssctl's [commands] should carry."""

    __slots__ = ("prefix", "conf", "sites_available", "sites_enabled", "error_log", "http_port",
                 "https_port", "command", "reload_command", "_master")

    def __init__(self, prefix: Path) -> None:
        self.prefix = prefix
        self.conf = prefix / "nginx.conf"
        self.sites_available = prefix / "sites-available"
        self.sites_enabled = prefix / "sites-enabled"
        self.error_log = prefix / "error.log"
        self.http_port = free_port()
        self.https_port = free_port()
        while self.https_port == self.http_port:
            self.https_port = free_port()
        self.command = [NGINX, "-p", str(prefix), "-e", str(self.error_log), "-c", str(self.conf)]
        self.reload_command = [*self.command, "-s", "reload"]
        self._master = 0

    def write_conf(self) -> None:
        """Create the tree and the main nginx.conf."""
        for sub in ("sites-available", "sites-enabled", "temp", "logs"):
            (self.prefix / sub).mkdir(parents=True, exist_ok=True)
        user = "user root;" if os.geteuid() == 0 else "# not root: workers keep our uid"
        self.conf.write_text(CONF.format(prefix=self.prefix, conf=self.conf, user=user),
                             encoding="utf-8")

    def start(self) -> None:
        """Start the daemonised master and wait (bounded) for its pid file."""
        proc = self.run(timeout=START_TIMEOUT)
        if proc.returncode != 0:
            raise RuntimeError(f"sandbox nginx failed to start (rc {proc.returncode}):\n"
                               f"{proc.stdout}{proc.stderr}{self.read_error_log()}")
        pid_file = self.prefix / "nginx.pid"
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            text = pid_file.read_text(encoding="ascii") if pid_file.exists() else ""
            if text.strip().isdigit() and pid_alive(int(text)):
                self._master = int(text)
            # the pid file comes before the workers: ready means a worker exists
            if self._master and self.worker_pids():
                return
            time.sleep(0.05)
        raise RuntimeError(f"sandbox nginx had no live master and worker within {START_TIMEOUT}s"
                           f" (master {self._master or 'none'}):\n{self.read_error_log()}")

    def run(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """Run `nginx <sandbox flags> ARGS` and capture its output."""
        argv = [*self.command, *args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False,
                              stdin=subprocess.DEVNULL)

    def _pid_from_file(self) -> int:
        try:
            text = (self.prefix / "nginx.pid").read_text(encoding="ascii").strip()
        except OSError:
            return 0
        return int(text) if text.isdigit() else 0

    def pid(self) -> int:
        """The master PID this fixture started."""
        return self._master

    def test(self) -> subprocess.CompletedProcess[str]:
        """`nginx -t` against the sandbox config."""
        return self.run("-t")

    def reload(self, settle: float = 15.0) -> subprocess.CompletedProcess[str]:
        """`nginx -s reload`, then wait (bounded by ``settle``) until the old workers are gone, so that
        every later connection meets the new configuration (old workers may accept for a moment)."""
        old = self.worker_pids()
        done = self.run("-s", "reload")
        if done.returncode == 0:
            deadline = time.monotonic() + settle
            while time.monotonic() < deadline:
                now = self.worker_pids()
                if now and not set(now) & set(old):
                    break
                time.sleep(0.05)
        return done

    def worker_pids(self) -> list[int]:
        """The master's current worker processes."""
        return _children(self._master) if self._master else []

    def read_error_log(self) -> str:
        """The sandbox error log, for failure messages."""
        try:
            return self.error_log.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        """Graceful quit of the master we started, then TERM and KILL, each wait bounded."""
        master = self._master or self._pid_from_file()  # a start that timed out still counts
        if not master or not pid_alive(master):
            return
        self._master = master
        workers = self.worker_pids()
        for sig, wait in ((signal.SIGQUIT, STOP_TIMEOUT), (signal.SIGTERM, 5.0),
                          (signal.SIGKILL, 5.0)):
            try:
                os.kill(master, sig)
            except ProcessLookupError:
                pass
            if _wait_gone([master], wait):
                break
        # workers normally leave with the master; one left behind after a KILL is ours too
        for pid in workers:
            if pid_alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        _wait_gone(workers, 5.0)
        self._master = 0


@pytest.fixture
def real_nginx(tmp_path: Path) -> Iterator[NginxSandbox]:
    """A real nginx running from tmp_path/nginx on free high ports; stopped by PID afterwards."""
    if not os.access(NGINX, os.X_OK):
        pytest.skip(f"{NGINX} not found (apt-get install nginx-light)")
    sandbox = NginxSandbox(tmp_path / "nginx")
    sandbox.write_conf()
    try:
        sandbox.start()
        yield sandbox
    finally:
        sandbox.stop()
