"""A tiny HTTPS client for one (host, port): each request sends SNI and Host = the domain asked for,
like ``curl -k --resolve DOMAIN:PORT:HOST``. The certificate is not verified (it is self-signed);
``served_cert``/``served_sans`` tell what was presented.

It has the ``https``/``https_json`` methods the server-API helpers of tests/rig/e2e_host.py call
(``bootstrap_and_login``, ``user_files``, ``upload_user_file``, ``download_user_file``), so they work
against any nginx: the host tier passes an ``HttpsClient`` for 127.0.0.1:443, the E2E tier its
``E2EHost``, which speaks through one for its sandbox nginx. Only the given host is spoken to (the
tiers give loopback); every wait is bounded.
"""
from __future__ import annotations

import contextlib
import http.client
import json
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass
from typing import Any, Callable

__all__ = ["HttpReply", "HttpsClient"]

HTTP_TIMEOUT = 30.0


@dataclass
class HttpReply:
    status: int
    headers: dict[str, list[str]]      # lower-cased names, every value kept (repeats count)
    body: bytes
    error: str = ""                     # an OSError while sending, when the reply came anyway

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError:
            return None

    def describe(self) -> str:
        return f"HTTP {self.status} {self.headers} {self.body[:600]!r} {self.error}"


class HttpsClient:
    """Requests to one (host, port). ``tls=False`` speaks plain HTTP, for a server's own loopback
    port (the E2E tier's hand-started server), with the same methods."""

    def __init__(self, host: str, port: int, *, tls: bool = True) -> None:
        self.host = host
        self.port = port
        self.tls = tls

    def _tls(self, domain: str, timeout: float) -> ssl.SSLSocket:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        raw = socket.create_connection((self.host, self.port), timeout=timeout)
        return ctx.wrap_socket(raw, server_hostname=domain)

    def https(self, domain: str, path: str, method: str = "GET", body: bytes | None = None,
              headers: dict[str, str] | None = None, timeout: float = HTTP_TIMEOUT) -> HttpReply:
        with contextlib.ExitStack() as stack:
            if self.tls:
                conn = http.client.HTTPConnection(domain, timeout=timeout)
                conn.sock = stack.enter_context(self._tls(domain, timeout))
            else:
                conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
                stack.callback(conn.close)
            sent_error = ""
            try:
                conn.request(method, path, body=body,
                             headers={**({"Host": domain} if domain else {}), **(headers or {})})
            except OSError as exc:      # an early reply (a 413, say) can cut the upload short
                sent_error = f"while sending: {exc!r}"
            resp = conn.getresponse()
            got: dict[str, list[str]] = {}
            for key, value in resp.getheaders():
                got.setdefault(key.lower(), []).append(value)
            return HttpReply(resp.status, got, resp.read(), sent_error)

    def https_json(self, domain: str, path: str, payload: Any = None, token: str | None = None,
                   headers: dict[str, str] | None = None) -> HttpReply:
        extra = dict(headers or {})
        if token:
            extra["x-actual-token"] = token
        if payload is None:
            return self.https(domain, path, headers=extra)
        extra["Content-Type"] = "application/json"
        return self.https(domain, path, "POST", json.dumps(payload).encode(), extra)

    def eventually(self, probe: Callable[[], HttpReply], want: Callable[[HttpReply], bool],
                   seconds: float = 20.0) -> HttpReply | str:
        """Poll PROBE until WANT holds (nginx -s reload returns before new workers serve)."""
        deadline = time.monotonic() + seconds
        last: HttpReply | str = "never answered"
        while True:
            try:
                last = probe()
                if want(last):
                    return last
            except OSError as exc:
                last = f"{exc!r}"
            if time.monotonic() > deadline:
                return last
            time.sleep(0.2)

    def health(self, domain: str, seconds: float = 20.0) -> HttpReply | str:
        """GET /health until it says UP (bounded); the last reply, or why nothing answered."""
        return self.eventually(lambda: self.https(domain, "/health"),
                               lambda r: r.status == 200 and r.json() == {"status": "UP"}, seconds)

    def served_cert(self, domain: str, timeout: float = HTTP_TIMEOUT) -> bytes:
        """DER of the certificate presented for SNI DOMAIN."""
        with self._tls(domain, timeout) as tls:
            return tls.getpeercert(binary_form=True) or b""

    def served_sans(self, domain: str) -> list[str]:
        """The DNS names in the subjectAltName of the certificate presented for DOMAIN (openssl x509)."""
        der = self.served_cert(domain)
        proc = subprocess.run(["openssl", "x509", "-inform", "DER", "-noout", "-ext", "subjectAltName"],
                              input=der, capture_output=True, timeout=30)
        text = proc.stdout.decode(errors="replace")
        return [part.strip()[4:] for line in text.splitlines()[1:] for part in line.split(",")
                if part.strip().startswith("DNS:")]
