"""Let's Encrypt's own test ACME server on loopback: Debian's `pebble`, with `pebble-challtestsrv` as
the DNS server that answers 127.0.0.1 for every name, validating HTTP-01 against the sandbox nginx.

certbot (Debian's, real) reaches pebble through `[commands] certbot` = `env REQUESTS_CA_BUNDLE=<the
listener CA> certbot --work-dir … --logs-dir …`; abssctl adds `--config-dir <letsencrypt_dir>` itself.
Both servers are started here and stopped by PID; every wait is bounded."""
from __future__ import annotations

import json
import os
import shutil
import signal
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from rig.nginx_sandbox import free_port

__all__ = ["pebble", "acme_host", "Pebble", "listener_cert_argv", "pebble_config", "served_steadily"]

PEBBLE = "/usr/bin/pebble"
CHALLTESTSRV = "/usr/bin/pebble-challtestsrv"
CERTBOT = "/usr/bin/certbot"
START_TIMEOUT = 20.0


def listener_cert_argv(key: str, cert: str) -> list[str]:
    """openssl's argv for pebble's listener: a 30-day self-signed EC pair for 127.0.0.1 and localhost."""
    return ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-days", "30", "-subj", "/CN=pebble test listener", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-keyout", key, "-out", cert]


def pebble_config(*, port: int, mgmt_port: int, http_port: int, tls_port: int, cert: str, key: str) -> dict[str, Any]:
    """pebble.json: the ACME and management listeners on loopback, HTTP-01 validated on http_port."""
    return {"pebble": {"listenAddress": f"127.0.0.1:{port}", "managementListenAddress": f"127.0.0.1:{mgmt_port}",
                       "certificate": cert, "privateKey": key, "httpPort": http_port, "tlsPort": tls_port,
                       "ocspResponderURL": "", "externalAccountBindingRequired": False}}


def served_steadily(served: Callable[[], bytes | None], domain: str, want: bytes, seconds: float) -> float:
    """Seconds until served() (the DER nginx serves for DOMAIN) is WANT 5 times in a row (a reload is
    asynchronous: old workers may answer for a moment); AssertionError after SECONDS."""
    import hashlib
    start = time.monotonic()
    first, streak = 0.0, 0
    while time.monotonic() - start < seconds:
        if served() == want:
            first = first or time.monotonic() - start
            streak += 1
            if streak == 5:
                return first
        else:
            first, streak = 0.0, 0
        time.sleep(0.05)
    raise AssertionError(f"{domain}: nginx did not serve sha256 {hashlib.sha256(want).hexdigest()} within "
                         f"{seconds:.0f} s (it serves {hashlib.sha256(served() or b'').hexdigest()})")


class Pebble:
    """A running pebble: its directory URL, the CA that signs its listener, and its issuing CA."""

    def __init__(self, root: Path, http_port: int) -> None:
        self.root = root
        self.http_port = http_port
        ports: list[int] = []
        while len(ports) < 5:
            port = free_port()
            if port not in ports and port != http_port:
                ports.append(port)
        self.port, self.mgmt_port, self.dns_port, self.dns_mgmt_port, self.tls_port = ports
        self.listener_cert = root / "listener.pem"
        self.listener_key = root / "listener.key"
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def directory(self) -> str:
        return f"https://127.0.0.1:{self.port}/dir"

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        subprocess.run(listener_cert_argv(str(self.listener_key), str(self.listener_cert)), check=True,
                       capture_output=True, timeout=30)
        config = pebble_config(port=self.port, mgmt_port=self.mgmt_port, http_port=self.http_port,
                               tls_port=self.tls_port, cert=str(self.listener_cert), key=str(self.listener_key))
        (self.root / "pebble.json").write_text(json.dumps(config))
        env = dict(os.environ, PEBBLE_VA_NOSLEEP="1", PEBBLE_WFE_NONCEREJECT="0", PEBBLE_AUTHZREUSE="0")
        self._spawn([CHALLTESTSRV, "-defaultIPv4", "127.0.0.1", "-defaultIPv6", "", "-dns01",
                     f"127.0.0.1:{self.dns_port}", "-http01", "", "-https01", "", "-tlsalpn01", "",
                     "-management", f"127.0.0.1:{self.dns_mgmt_port}"], "dns.log", env)
        self._spawn([PEBBLE, "-config", str(self.root / "pebble.json"), "-dnsserver",
                     f"127.0.0.1:{self.dns_port}"], "pebble.log", env)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            try:
                self.get(self.directory)
                return
            except OSError:
                if any(p.poll() is not None for p in self.procs):
                    break
                time.sleep(0.1)
        raise RuntimeError("pebble did not answer within the bound:\n" + self.logs())

    def _spawn(self, argv: list[str], log: str, env: dict[str, str]) -> None:
        out = open(self.root / log, "wb")
        self.procs.append(subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                           env=env, cwd=self.root))
        out.close()

    def get(self, url: str) -> bytes:
        context = ssl.create_default_context(cafile=str(self.listener_cert))
        with urllib.request.urlopen(url, context=context, timeout=5) as resp:
            return resp.read()

    def issuer_pems(self) -> list[str]:
        """pebble's issuing intermediate and its root (management API), as PEM text."""
        base = f"https://127.0.0.1:{self.mgmt_port}"
        return [self.get(f"{base}/intermediates/0").decode(), self.get(f"{base}/roots/0").decode()]

    def logs(self) -> str:
        return "\n".join((self.root / n).read_text(errors="replace") for n in ("dns.log", "pebble.log")
                         if (self.root / n).exists())

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


@pytest.fixture
def pebble(tmp_path: Path, real_nginx: Any) -> Iterator[Pebble]:
    """pebble + its DNS on free loopback ports, validating through the sandbox nginx's HTTP port."""
    for tool in (PEBBLE, CHALLTESTSRV, CERTBOT):
        if not os.access(tool, os.X_OK):
            pytest.skip(f"{tool} not found (apt-get install pebble certbot)")
    server = Pebble(tmp_path / "pebble", real_nginx.http_port)
    try:
        server.start()
        yield server
    finally:
        server.stop()


def certbot_prefix(server: Pebble, tmp_path: Path) -> list[str]:
    """certbot trusting pebble's listener, its work and logs dirs in the sandbox (outside Host.tree)."""
    return [shutil.which("env") or "/usr/bin/env", f"REQUESTS_CA_BUNDLE={server.listener_cert}", CERTBOT,
            "--work-dir", str(tmp_path / "certbot-work"), "--logs-dir", str(tmp_path / "certbot-logs")]


@pytest.fixture
def acme_host(abssctl_host: Any, pebble: Pebble, tmp_path: Path) -> Iterator[Any]:
    """abssctl_host whose [commands] certbot and [tls] acme_server point at pebble."""
    abssctl_host.configure("commands", certbot=certbot_prefix(pebble, tmp_path))
    abssctl_host.configure("tls", acme_server=pebble.directory)
    abssctl_host.pebble = pebble
    abssctl_host.certbot = certbot_prefix(pebble, tmp_path)
    yield abssctl_host
