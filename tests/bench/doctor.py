#!/usr/bin/python3
"""Doctor budget (DESIGN.md §8): `doctor --json` with 50 instances in at most 2 s.

Usage: /usr/bin/python3 tests/bench/doctor.py [--runs 5] [--instances 50] [--why] [--keep]

Builds a sandbox host with the fake tools of tests/rig/fakes.py (systemctl reporting 50 active,
enabled units, nginx whose -T prints the 50 vhosts, node, npm, journalctl), a threaded loopback HTTP
responder (a child process) answering /health and /info on 50 ports, 50 registered instances with
their directories, config.json, unit and vhost rendered by abssctl itself (in-process, so nothing is
drifted), a recent backup each, and one shared system certificate made with openssl. Then it times
`abssctl --config CFG --json doctor` from source under this interpreter: the median of --runs after
one warm-up. It prints the figure, the doctor summary, anything not ok, and the slowest probes.
--why profiles the facts and every probe in-process, one at a time, and prints where the time goes.
Exits 1 when the median is over 2 s, 2 when the bench cannot run (or doctor finds the sandbox unclean,
which would make the figure meaningless).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

from benchlib import BenchError, load_fakes, need

REPO = Path(__file__).resolve().parents[2]
BUDGET_S = 2.0
TIMEOUT = 120
SERVER_VERSION = "26.8.1"
PACKAGE = "@actual-app/sync-server"

RESPONDER = r'''
import json, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
version, count = sys.argv[1], int(sys.argv[2])

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        if self.path == "/health":
            body = {"status": "UP"}
        elif self.path == "/info":
            body = {"build": {"name": "@actual-app/sync-server", "version": version}}
        else:
            self.send_error(404)
            return
        raw = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)
    def log_message(self, *args):
        pass

servers = []
for _ in range(count):
    s = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    s.daemon_threads = True
    servers.append(s)
    threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True).start()
print(json.dumps([s.server_address[1] for s in servers]), flush=True)
sys.stdin.read()          # until the bench closes our stdin
'''


def _abssctl() -> types.ModuleType:
    sys.path.insert(0, str(REPO))
    import abssctl
    return abssctl


def _write_json(path: Path, doc: object, mode: int = 0o640) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.chmod(path, mode)


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class Host:
    """The sandbox: fakes, config, registries, instances, units, vhosts, a certificate, backups."""

    def __init__(self, root: Path, count: int, python: str) -> None:
        self.fakes = load_fakes()
        self.root = root
        self.count = count
        self.python = python
        self.bin = root / "bin"
        self.state = root / "fake-state"
        self.paths = {k: root / v for k, v in self.fakes.PATH_KEYS.items()}
        self.config = root / "etc" / "abssctl" / "config.toml"
        self.cert = root / "etc" / "ssl" / "private" / "cert.pem"
        self.key = root / "etc" / "ssl" / "private" / "cert.key"
        self.responder: subprocess.Popen[str] | None = None
        self.ports: list[int] = []
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("ABSSCTL_", "PYTHON"))}
        self.env.update(PATH=f"{self.bin}{os.pathsep}{os.environ.get('PATH', os.defpath)}",
                        FAKE_LOG=str(root / "calls.jsonl"), FAKE_STATE=str(self.state),
                        FAKE_UNIT_DIR=str(self.paths["systemd_unit_dir"]),
                        FAKE_NGINX_SITES=str(self.paths["nginx_sites_enabled"]), NO_COLOR="1")

    # -- building ------------------------------------------------------------------------

    def build(self) -> None:
        self.state.mkdir(parents=True)
        for key in ("systemd_unit_dir", "nginx_sites_available", "nginx_sites_enabled"):
            self.paths[key].mkdir(parents=True)          # the system's own directories, not init's
        for tool in ("systemctl", "journalctl", "nginx", "node", "npm"):
            self.fakes.write_fake(self.bin / tool, tool, python=self.python)
        self._start_responder()
        self._write_config()
        self.abssctl("init")                           # directories with their §3.5 modes, empty registries
        self._make_cert()
        self._install_version()
        self._instances()

    def _start_responder(self) -> None:
        self.responder = subprocess.Popen([self.python, "-I", "-c", RESPONDER, SERVER_VERSION, str(self.count)],
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.responder.stdout is not None
        line = self.responder.stdout.readline()
        if not line:
            raise BenchError("the loopback responder did not start")
        self.ports = json.loads(line)

    def _write_config(self) -> None:
        b = self.bin
        https = _free_port()                # nothing listens: the served-certificate check is refused at once
        commands = {"systemctl": [f"{b}/systemctl"], "journalctl": [f"{b}/journalctl"],
                    "nginx": [f"{b}/nginx"], "nginx_reload": [f"{b}/nginx", "-s", "reload"],
                    "node": [f"{b}/node"], "npm": [f"{b}/npm"], "openssl": [need("openssl")],
                    "zstd": [shutil.which("zstd") or "/usr/bin/zstd"]}
        lines = ["# abssctl doctor bench (tests/bench/doctor.py)", "", "[paths]"]
        lines += [f"{k} = {json.dumps(str(v))}" for k, v in self.paths.items()]
        # one shared account (no per-instance users: the sandbox makes no system users), as the
        # first edition's hosts have; doctor's fs.user then has nothing to move over
        lines += ["", "[service]", 'user = "root"', 'group = "root"', 'user_prefix = ""', "",
                  "[ports]", f"base = {min(self.ports)}", f"max = {max(self.ports)}", "",
                  "[nginx]", f"http_port = {_free_port()}", f"https_port = {https}", "",
                  "[tls]", f"system_cert = {json.dumps(str(self.cert))}", f"system_key = {json.dumps(str(self.key))}",
                  "", "[commands]"]
        lines += [f"{k} = {json.dumps(v)}" for k, v in commands.items()]
        self.config.parent.mkdir(parents=True, exist_ok=True)
        self.config.write_text("\n".join(lines) + "\n", encoding="utf-8")

    def _make_cert(self) -> None:
        self.cert.parent.mkdir(parents=True, exist_ok=True)
        done = subprocess.run([need("openssl"), "req", "-x509", "-newkey", "ec", "-pkeyopt",
                               "ec_paramgen_curve:prime256v1", "-nodes", "-days", "365", "-subj",
                               "/CN=*.bench.example.org", "-addext",
                               "subjectAltName=DNS:*.bench.example.org,DNS:bench.example.org",
                               "-keyout", str(self.key), "-out", str(self.cert)],
                              capture_output=True, text=True, timeout=TIMEOUT, check=False)
        if done.returncode != 0:
            raise BenchError(f"openssl failed: {done.stderr.strip()}")
        os.chmod(self.key, 0o600)

    def _install_version(self) -> None:
        tree = self.paths["install_root"] / SERVER_VERSION
        pkg = tree / "node_modules" / "@actual-app" / "sync-server"
        _write_json(pkg / "package.json", {"name": PACKAGE, "version": SERVER_VERSION}, 0o644)
        (pkg / "build" / "bin").mkdir(parents=True)
        (pkg / "build" / "bin" / "actual-server.js").write_text("// bench\n", encoding="utf-8")
        (self.paths["install_root"] / "current").symlink_to(SERVER_VERSION)
        node = self.fakes.FAKE_NODE
        _write_json(self.paths["state_dir"] / "registry" / "versions.json", {
            "schema_version": 1, "package": PACKAGE, "current": SERVER_VERSION,
            "versions": {SERVER_VERSION: {
                "version": SERVER_VERSION, "path": str(tree), "installed_at": _now(), "source": "registry",
                "bin": "build/bin/actual-server.js", "integrity": "sha512-bench", "lockfile_sha256": "0" * 64,
                "size_bytes": 0, "node": {"version": node["version"], "abi": node["modules"], "arch": node["arch"],
                                          "libc": "glibc " + node["glibc"]},
                "engines_node": ">=20", "engines_ok": True, "native_modules": [], "migrations": []}}})

    def _instances(self) -> None:
        abssctl = _abssctl()
        os.environ.update(self.env)
        config, problems = abssctl.load_config(str(self.config), os.environ, {})
        if problems:
            raise BenchError(f"config problems: {problems}")
        import io
        out = abssctl.Output(json_mode=True, quiet=True, debug=False, color=False, stdout=io.StringIO(),
                             stderr=io.StringIO())
        ctx = abssctl.Context(config=config, out=out, dry_run=False, assume_yes=True, interactive=False,
                              lock_timeout=30.0, command="bench")
        versions = abssctl.Versions(ctx)
        instances, ports, units, backups = {}, {}, {}, {}
        pid = self.responder.pid if self.responder else 0
        now = _now()
        tls = {"source": "system", "cert": str(self.cert), "key": str(self.key), "chain": None}
        for i, port in enumerate(self.ports):
            name = f"bench{i:02d}"
            domain = f"{name}.bench.example.org"
            root = self.paths["instance_root"] / name
            for d, mode in ((root, 0o750), (root / "data", 0o750), (root / "data" / "server-files", 0o750),
                            (root / "data" / "user-files", 0o750)):
                d.mkdir()
                os.chmod(d, mode)
            (root / "config.json").write_bytes(abssctl.server_config(str(root), port))
            os.chmod(root / "config.json", 0o640)
            unit = self.paths["systemd_unit_dir"] / f"abssctl-{name}.service"
            unit.write_bytes(abssctl.render_unit(ctx, name, port, SERVER_VERSION, versions))
            vhost = self.paths["nginx_sites_available"] / f"abssctl-{name}.conf"
            vhost.write_bytes(abssctl.render_vhost(ctx, name, domain, port, tls))
            (self.paths["nginx_sites_enabled"] / vhost.name).symlink_to(vhost)
            for p in (unit, vhost):
                os.chmod(p, 0o644)
            instances[name] = {
                "name": name, "domain": domain, "port": port, "version": "current",
                "resolved_version": SERVER_VERSION, "data_version": SERVER_VERSION, "enabled": True,
                "pending_restart": False, "state": "ready", "tls": dict(tls), "paths": abssctl.instance_paths(ctx, name),
                "created_at": now, "updated_at": now, "last_backup_id": None, "last_restore": None}
            ports[str(port)] = {"instance": name, "reserved_at": now}
            units[unit.name] = {"ActiveState": "active", "SubState": "running", "MainPID": pid,
                                "UnitFileState": "enabled", "ExecMainStatus": 0}
            bid = f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{name}-{i:04x}"
            archive = self.paths["backup_root"] / name / f"{bid}.tar.zst"
            archive.parent.mkdir(mode=0o700)
            archive.write_bytes(b"")
            os.chmod(archive, 0o600)
            backups[bid] = {"id": bid, "instance": name, "created_at": now, "archive": f"{name}/{archive.name}",
                            "compression": "zstd", "size_bytes": 0, "sha256": "0" * 64,
                            "server_version": SERVER_VERSION, "reason": "manual", "message": None, "labels": [],
                            "files": 0, "data_bytes": 0, "status": "ok", "verified_at": None, "op_id": "bench"}
            instances[name]["last_backup_id"] = bid
        reg = self.paths["state_dir"] / "registry"
        _write_json(reg / "instances.json", {"schema_version": 1, "instances": instances})
        _write_json(reg / "ports.json", {"schema_version": 1, "ports": ports})
        _write_json(self.paths["backup_root"] / "backups.json", {"schema_version": 1, "backups": backups}, 0o600)
        units["nginx.service"] = {"ActiveState": "active", "SubState": "running", "MainPID": 1000,
                                  "UnitFileState": "enabled"}
        _write_json(self.state / "systemctl.json", {"units": units, "builtin": ["nginx.service"], "fail_start": [],
                                                    "next_pid": 4000, "daemon_reloads": 0, "reloads": {}})

    # -- running -------------------------------------------------------------------------

    def argv(self, *args: str) -> list[str]:
        return [self.python, str(REPO / "abssctl.py"), "--config", str(self.config), *args]

    def abssctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(self.argv(*args), env=self.env, capture_output=True, text=True, timeout=TIMEOUT,
                              check=False)
        if done.returncode != 0 and args[0] != "--json":
            raise BenchError(f"abssctl {' '.join(args)} exited {done.returncode}: {done.stderr.strip()}")
        return done

    def close(self) -> None:
        if self.responder is not None:
            assert self.responder.stdin is not None
            self.responder.stdin.close()
            try:
                self.responder.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.responder.kill()
                self.responder.wait(timeout=10)


def time_doctor(host: Host, runs: int) -> tuple[list[float], dict]:
    argv = host.argv("--json", "doctor")
    samples, doc = [], {}
    for i in range(runs + 1):
        t0 = time.perf_counter()
        done = subprocess.run(argv, env=host.env, capture_output=True, text=True, timeout=TIMEOUT, check=False)
        elapsed = time.perf_counter() - t0
        try:
            doc = json.loads(done.stdout)
        except ValueError:
            raise BenchError(f"doctor printed no JSON (rc {done.returncode}): {done.stderr.strip()[-2000:]}") from None
        if i:                                          # the first run is the warm-up
            samples.append(elapsed)
    return samples, doc


def why(host: Host, top: int = 12) -> None:
    """Facts and each probe in-process, one at a time, under cProfile."""
    import cProfile
    import io
    import pstats
    abssctl = _abssctl()
    os.environ.update(host.env)
    config, _problems = abssctl.load_config(str(host.config), os.environ, {})
    out = abssctl.Output(json_mode=True, quiet=True, debug=False, color=False, stdout=io.StringIO(),
                         stderr=io.StringIO())
    ctx = abssctl.Context(config=config, out=out, dry_run=False, assume_yes=True, interactive=False,
                          lock_timeout=30.0, command="doctor")
    jobs: list[tuple[str, object]] = [("Facts", lambda: abssctl.Facts(ctx))]
    facts = abssctl.Facts(ctx)
    jobs += [(f"{cat}:{fn.__name__}", (lambda fn=fn: fn(ctx, facts))) for cat, fn in abssctl.PROBES]
    timings = []
    for label, job in jobs:
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.runcall(job)
        timings.append((time.perf_counter() - t0, label, prof))
    print("\nin-process, serial (seconds):")
    for secs, label, _p in sorted(timings, key=lambda t: t[0], reverse=True):
        print(f"  {secs:7.3f}  {label}")
    for secs, label, prof in sorted(timings, key=lambda t: t[0], reverse=True)[:3]:
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
        print(f"\n--- {label} ({secs:.3f} s), by own time ---")
        print("\n".join(line for line in buf.getvalue().splitlines() if line.strip())[:4000])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--instances", type=int, default=50)
    parser.add_argument("--why", action="store_true", help="profile the facts and each probe in-process")
    parser.add_argument("--keep", action="store_true", help="keep the sandbox and print its path")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="abssctl-bench-doctor-"))
    host = Host(root, args.instances, sys.executable)
    try:
        host.build()
        samples, doc = time_doctor(host, args.runs)
        median = statistics.median(samples)
        s = doc.get("summary", {})
        print(f"doctor --json, {args.instances} instances, {sys.executable} {sys.version.split()[0]}, "
              f"{os.cpu_count()} CPUs")
        print(f"  median {median * 1000:.0f} ms of {len(samples)} runs after a warm-up "
              f"(min {min(samples) * 1000:.0f}, max {max(samples) * 1000:.0f}); budget {BUDGET_S * 1000:.0f} ms")
        print(f"  summary: {s.get('ok')} ok, {s.get('warn')} warn, {s.get('fail')} fail, exit {s.get('exit_code')},"
              f" doctor's own duration_ms {s.get('duration_ms')}")
        bad = [p for p in doc.get("probes", []) if p["status"] != "ok"]
        for p in bad[:20]:
            print(f"  NOT OK {p['status']:4} {p['id']:18} {p['target'] or '':24} {p['message']}")
        if bad:
            print(f"  ({len(bad)} findings not ok: the sandbox is not clean, so the figure is suspect)")
        per_probe: dict[str, int] = {}
        for p in doc.get("probes", []):
            per_probe[p["id"]] = max(per_probe.get(p["id"], 0), int(p["duration_ms"]))
        print("  slowest probes (duration_ms, per probe function, run in parallel):")
        for pid, ms in sorted(per_probe.items(), key=lambda kv: kv[1], reverse=True)[:8]:
            print(f"    {ms:6d}  {pid}")
        if args.why:
            why(host)
        if args.keep:
            print(f"sandbox kept: {root} (config {host.config})")
        if bad:
            print("bench cannot judge the budget: doctor does not call the sandbox clean", file=sys.stderr)
            return 2
        return 1 if median > BUDGET_S else 0
    except BenchError as exc:
        print(f"bench cannot run: {exc}", file=sys.stderr)
        return 2
    finally:
        host.close()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
