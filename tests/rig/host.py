"""A whole host in tmp_path for the integration tier: real nginx, the systemctl replacement, real npm
against the local registry fixture, real openssl, and abssctl run in-process against it."""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

__all__ = ["abssctl_host", "Host", "HostRun", "MANAGED_NODE", "host_npm_env", "sqlite_writer"]


class HostRun:
    """One abssctl.main() call: rc, stdout, stderr, and the parsed JSON document if any."""

    def __init__(self, rc: int, out: str, err: str) -> None:
        self.rc, self.out, self.err = rc, out, err
        try:
            self.doc: Any = json.loads(out)
        except ValueError:
            self.doc = None

    def __repr__(self) -> str:
        return f"HostRun(rc={self.rc}, err={self.err[-6000:]!r}, out={self.out[-500:]!r})"


MANAGED_NODE = {"runtime": "managed", "default_major": 20}     # Host(..., node=MANAGED_NODE)


class Host:
    """Paths, config and helpers of one sandboxed host. ``node`` is its [node] section (default
    runtime = "system", so [commands] node/npm run the servers); MANAGED_NODE fetches runtimes."""

    def __init__(self, root: Path, nginx: Any, systemd: Any, registry: Any, npm_cache: Path,
                 node: dict[str, Any] | None = None) -> None:
        self.root = root
        self.nginx = nginx
        self.systemd = systemd
        self.registry = registry
        self.npm_cache = npm_cache
        self.config = root / "etc" / "abssctl" / "config.toml"
        self.paths = {
            "install_root": root / "srv/versions", "instance_root": root / "srv/instances",
            "backup_root": root / "srv/backups", "state_dir": root / "var/lib/abssctl",
            "log_dir": root / "var/log/abssctl", "run_dir": root / "run/abssctl",
            "templates_dir": root / "etc/abssctl/templates", "tls_dir": root / "etc/abssctl/tls",
            "runtime_root": root / "srv/runtimes", "letsencrypt_dir": root / "etc/letsencrypt",
            "acme_webroot": root / "var/lib/abssctl/acme",
            "systemd_unit_dir": systemd.unit_dir, "nginx_sites_available": nginx.sites_available,
            "nginx_sites_enabled": nginx.sites_enabled,
        }
        self.settings: dict[str, dict[str, Any]] = {
            "paths": {k: str(v) for k, v in self.paths.items()},
            "service": {"user": "root", "group": "root", "user_prefix": ""},
            "ports": {"base": 0, "max": 0},
            "nginx": {"http_port": nginx.http_port, "https_port": nginx.https_port},
            "npm": {"registry": registry.url, "allow_scripts": ["fake-native"]},
            "tls": {"system_cert": str(root / "etc/ssl/cert.pem"), "system_key": str(root / "etc/ssl/cert.key")},
            "health": {"timeout": 20, "interval": 0.1},
            "node": dict(node or {"runtime": "system"}),
            "commands": {"systemctl": systemd.command, "journalctl": systemd.journalctl_command,
                         "nginx": nginx.command, "nginx_reload": nginx.reload_command,
                         "node": ["/usr/bin/node"], "npm": [shutil.which("npm") or "/usr/bin/npm"],
                         "openssl": [shutil.which("openssl") or "/usr/bin/openssl"],
                         "zstd": [shutil.which("zstd") or "/usr/bin/zstd"]},
        }
        from rig.nginx_sandbox import free_port
        base = free_port(span=41)
        self.settings["ports"] = {"base": base, "max": base + 40}
        self.write_config()

    def write_config(self) -> None:
        lines = []
        for section, values in self.settings.items():
            lines.append(f"[{section}]")
            lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
        self.config.parent.mkdir(parents=True, exist_ok=True)
        self.config.write_text("\n".join(lines) + "\n")

    def configure(self, section: str, **values: Any) -> None:
        self.settings.setdefault(section, {}).update(values)
        self.write_config()

    def arm_crash_after_migrate(self, version: str) -> Path:
        """[commands] node becomes a wrapper of the real node that, while the returned marker file
        exists and ``version`` starts, tells the fake server to crash right after migrating (as a real
        server would that dies after its one-way migrations); [health] timeout drops to 8 s."""
        wrapper = self.root / "node-wrapper"
        marker = self.root / "FAIL-NEW-VERSION"
        wrapper.write_text(f"""#!/bin/sh
case "$*" in *"/{version}/"*) [ -e {marker} ] && touch "$ACTUAL_DATA_DIR/CRASH_AFTER_MIGRATE";; esac
exec /usr/bin/node "$@"
""")
        wrapper.chmod(0o755)
        self.configure("commands", node=[str(wrapper)])
        self.configure("health", timeout=8)
        return marker

    def run(self, *argv: Any) -> HostRun:
        import abssctl
        out, err = io.StringIO(), io.StringIO()
        saved = sys.stdin
        sys.stdin = io.StringIO("")
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                rc = abssctl.main(["--config", str(self.config), *map(str, argv)])
        finally:
            sys.stdin = saved
        return HostRun(rc, out.getvalue(), err.getvalue())

    def ok(self, *argv: Any) -> Any:
        got = self.run("--json", *argv)
        assert got.rc == 0, got
        return got.doc

    def registry_doc(self, name: str) -> dict[str, Any]:
        return json.loads((self.paths["state_dir"] / "registry" / f"{name}.json").read_text())

    def tree(self) -> dict[str, tuple[int, int, str]]:
        """{path: (mode, size, sha256|link)} of the managed paths (not nginx's or systemd's own files)."""
        import hashlib
        import stat
        snap = {}
        roots = [self.root / "srv", self.root / "var", self.root / "etc", self.nginx.sites_available,
                 self.nginx.sites_enabled, self.systemd.unit_dir]
        for top in roots:
            for dirpath, dirnames, filenames in os.walk(top):
                dirnames.sort()
                for name in sorted(dirnames + filenames):
                    path = Path(dirpath) / name
                    if path.name.endswith(".lock") or "log" in path.parts[-2:]:
                        continue
                    st = path.lstat()
                    if stat.S_ISLNK(st.st_mode):
                        snap[str(path)] = (st.st_mode, 0, os.readlink(path))
                    elif stat.S_ISREG(st.st_mode):
                        snap[str(path)] = (st.st_mode, st.st_size, hashlib.sha256(path.read_bytes()).hexdigest())
                    else:
                        snap[str(path)] = (st.st_mode, 0, "")
        return snap


@contextlib.contextmanager
def sqlite_writer(db: Path, insert: str, most: int) -> Iterator[list[int]]:
    """A thread that commits ``insert`` into ``db`` over and over (at most ``most`` times) while the
    with-block runs, e.g. a hot snapshot; yields [commits so far]. It starts 0.1 s before the block."""
    import sqlite3
    import threading
    import time
    stop, written = threading.Event(), [0]

    def writer() -> None:
        con = sqlite3.connect(db, timeout=10)
        while not stop.is_set() and written[0] < most:
            con.execute(insert)
            con.commit()
            written[0] += 1
        con.close()
    thread = threading.Thread(target=writer)
    thread.start()
    try:
        time.sleep(0.1)
        yield written
    finally:
        stop.set()
        thread.join(timeout=30)


def host_npm_env(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The environment a Host runs in: npm's cache shared by the run (returned), no retries, no update
    notifier, and no ABSSCTL_* variable of the caller's."""
    cache = tmp_path_factory.getbasetemp() / "npm-cache"
    cache.mkdir(exist_ok=True)
    monkeypatch.setenv("npm_config_cache", str(cache))
    monkeypatch.setenv("npm_config_fetch_retries", "0")
    monkeypatch.setenv("npm_config_update_notifier", "false")
    for name in [n for n in os.environ if n.startswith("ABSSCTL_")]:
        monkeypatch.delenv(name)
    return cache


@pytest.fixture
def abssctl_host(tmp_path: Path, real_nginx: Any, systemd_sandbox: Any, npm_registry: Any,
                 tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Iterator[Host]:
    """A host with init run and the fake server 1.0.0 installed as current."""
    cache = host_npm_env(tmp_path_factory, monkeypatch)
    root = tmp_path / "host"
    host = Host(root, real_nginx, systemd_sandbox, npm_registry, cache)
    assert host.run("init").rc == 0
    got = host.run("--json", "version", "install", "1.0.0", "--set-current")
    assert got.rc == 0, got
    yield host
