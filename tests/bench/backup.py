#!/usr/bin/python3
"""Backup budgets (DESIGN.md §8, rows 2, 3 and 5): backup create / restore against tar | zstd.

Usage: /usr/bin/python3 tests/bench/backup.py [--size-mib 1024] [--runs 5] [--warmup 2] [--keep]
                                              [--python /usr/bin/python3] [--abssctl PATH]

It measures what admins run: this checkout built into abssctl.pyz (build_zipapp.py, for --python)
in the sandbox, unless --abssctl names an abssctl.py or .pyz. (Run as a source file, abssctl.py is
compiled afresh on every start, about 0.15 s that no installed copy pays.)

Builds a sandbox host under /var/tmp (a real disk, not tmpfs) with fake systemctl, journalctl,
nginx and node on a private PATH, a config.toml pointing every [paths] key inside it, and ONE
instance `bench` registered directly in the registries, with an installed-looking version so its
unit renders. Its data dir is DESIGN's mix scaled to --size-mib: 900/1024 of it blobs in
user-files/ (half os.urandom, half word text; 2-48 MiB each) and 120/1024 in three SQLite files
(server-files/account.sqlite and two user-files/group-*.sqlite), filled with rows through sqlite3.

In the same run, each figure the median of --runs timed runs after --warmup untimed rounds of each
(the two sides alternate who goes first; the disk is synced between steps, outside the timings).
Each side deletes its own previous output (out, the archive, the extract dir, the replaced data)
just before its next run, so neither writes into pages the other has just freed: on a VM that hands
free memory back to its host those are still backed and cheap to fill, pages freed seconds ago are
not, and the order of the steps would decide who gets them. The first rounds in a fresh sandbox pay
for that memory on both sides, abssctl's (which keeps the new archive beside the snapshots, the
staged data beside the data it replaces) for a round longer: hence two warm-up rounds.

Beside each wall time it shows the CPU seconds (user + system) of the command and the children it
waited for, which other work on the machine disturbs less. It prints the load average before it
starts and, at the end, the CPU time that everything else (other processes, kernel threads such as
writeback, and the hypervisor's steal) took while it ran; figures taken at a starting load of 0.5
or more, or with others using 10% of the cpus or more, are flagged as noisy:

    baseline create   tar -cf - -C INSTANCE data | zstd -T0 -q > out
    abssctl create    abssctl --config CFG --json backup create bench --compression zstd
    baseline restore  zstd -d -T0 -q -c ARCHIVE | tar -xf - -C tmp   (ARCHIVE: abssctl's own)
    abssctl restore   abssctl --config CFG --json --yes backup restore ID --no-pre-backup
    borg create       borg create --compression zstd,3 REPO::N data   (a fresh unencrypted repo each round)
    borg restore      borg extract REPO::N                             (into an empty dir)
    restic backup     restic -r REPO backup data                       (a fresh repo each round)
    restic restore    restic -r REPO restore latest --target DIR

borg and restic (Debian packages borgbackup and restic) run after abssctl's rounds, on the same data
dir, median of --runs after one warm-up; each ratio is printed against tar|zstd and against abssctl.
Their repo init is outside the timings. Without them installed the bench says so and skips them.

The unit is stopped (the fake systemctl reports it inactive), so restore neither stops nor starts
nor gates. Peak RSS is taken at --size-mib and at 100 MiB: of the abssctl process itself (VmHWM,
polled from /proc), which is budgeted, and of its process tree (ru_maxrss, from /usr/bin/time -v
when installed, else os.wait4), which is only shown: it is zstd -T0's buffers, not abssctl's.
abssctl must do more than the baselines: DESIGN §4.8 hashes every member (sha256, for the manifest)
and the whole archive (for the sidecar), on create and again on restore. The bench times those two
sha256 passes on their own, in this process, over the same data and archive (the best of three),
and prints a floor per figure: the baseline's cpu seconds plus the hashes', spread over every cpu
with none idle. No implementation of the same work is faster than that floor on this machine; it
shows how much of abssctl's distance to its baseline is that required work, and how much its own.

Exits 1 when create exceeds 1.25x its baseline, restore 1.35x (issue 18, DESIGN §8 rebased), or abssctl's peak RSS at the two
sizes differs by 10 MiB or more; 2 when the bench cannot run. --keep leaves the sandbox in place
and caches the generated data in /var/tmp/abssctl-bench-cache/data-<size>MiB for the next run.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

from benchlib import BenchError, build_pyz, load_fakes, need

REPO = Path(__file__).resolve().parents[2]
CREATE_RATIO = 1.25
RESTORE_RATIO = 1.35
RSS_FLAT_MIB = 10.0
NOISY_LOAD = 0.5
NOISY_SHARE = 0.10
SMALL_MIB = 100
MIB = 1 << 20
TIMEOUT = 1800
BASE = Path("/var/tmp")
CACHE = BASE / "abssctl-bench-cache"
NAME = "bench"
PORT = 5006
SERVER_VERSION = "26.8.1"
PACKAGE = "@actual-app/sync-server"
STAMP = "2026-11-26T10:02:11Z"
MIGRATIONS = ["1632571489012-remove-cache.js", "1722717601000-reports-uuid.js",
              "1722804019000-create-dashboard.js", "1754400000000-fake-26-8.js"]
BLOB_SIZES_MIB = (2, 5, 12, 3, 20, 8, 32, 4, 48, 16)      # cycled: "a few MiB to tens of MiB"
SQLITE_SPLIT = (("server-files/account.sqlite", 1), ("user-files/group-5f0c1a.sqlite", 2),
                ("user-files/group-9b7e24.sqlite", 3))
TIME_V = "/usr/bin/time"


def _write_json(path: Path, doc: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


# ============================================================================
# The data dir: DESIGN's 1 GiB mix, scaled
# ============================================================================

def _text_pool(rng: random.Random, size: int = 8 * MIB) -> bytes:
    """Word salad: compresses about 3x with zstd -3, unlike a repeated string (which is free)."""
    vocab = [bytes(rng.choices(b"abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 11)))
             for _ in range(4000)]
    vocab += [b"budget", b"payee", b"transaction", b"category", b"2026-11-26", b"EUR", b"\n"]
    out = bytearray()
    while len(out) < size:
        out += b" ".join(rng.choices(vocab, k=20000)) + b"\n"
    return bytes(out[:size])


def _write_blob(path: Path, size: int, chunk: Callable[[int], bytes]) -> None:
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(MIB, left)
            f.write(chunk(n))
            left -= n


def _fill_sqlite(path: Path, target: int, rng: random.Random, pool: bytes) -> None:
    """A database shaped like Actual's (messages_binary) of about ``target`` bytes, journal DELETE."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path)
    try:
        db.execute("PRAGMA journal_mode=DELETE")
        db.execute("CREATE TABLE messages_binary (timestamp TEXT PRIMARY KEY, is_encrypted BOOLEAN, "
                   "content bytea)")
        db.execute("CREATE TABLE messages_merkles (id INTEGER PRIMARY KEY, merkle TEXT)")
        row = 0
        while path.stat().st_size < target:
            batch = []
            for _ in range(4000):
                n = rng.randint(200, 1400)
                if row % 2:
                    content = os.urandom(n)
                else:
                    at = rng.randrange(len(pool) - n)
                    content = pool[at:at + n]
                batch.append((f"2026-11-26T10:{row // 60000 % 60:02d}:{row % 60000 / 1000:06.3f}Z-"
                              f"{row:012d}-{rng.getrandbits(64):016x}", row % 2, content))
                row += 1
            db.executemany("INSERT INTO messages_binary VALUES (?, ?, ?)", batch)
            db.execute("INSERT INTO messages_merkles (merkle) VALUES (?)", (json.dumps({"row": row}),))
            db.commit()
    finally:
        db.close()


def generate_data(data: Path, size_mib: int) -> None:
    """Write the data dir: .migrate, 3 SQLite files and the blobs, totalling about size_mib MiB."""
    rng = random.Random(size_mib)
    pool = _text_pool(rng)
    blobs_total = size_mib * MIB * 900 // 1024
    sqlite_total = size_mib * MIB * 120 // 1024
    (data / "server-files").mkdir(parents=True)
    (data / "user-files").mkdir()
    migrate = {"lastRun": 1764151331000,
               "migrations": [{"title": t, "timestamp": int(t.split("-")[0])} for t in MIGRATIONS]}
    _write_json(data / ".migrate", migrate)
    parts = sum(w for _, w in SQLITE_SPLIT)
    for rel, weight in SQLITE_SPLIT:
        _fill_sqlite(data / rel, sqlite_total * weight // parts, rng, pool)

    def text_chunk(n: int) -> bytes:
        at = rng.randrange(len(pool) - n)
        return pool[at:at + n]
    done = {"random": 0, "text": 0}
    i = 0
    while sum(done.values()) < blobs_total:
        size = min(BLOB_SIZES_MIB[i % len(BLOB_SIZES_MIB)] * MIB, blobs_total - sum(done.values()))
        kind = "random" if done["random"] <= done["text"] else "text"
        name = f"file-{hashlib.sha1(f'{size_mib}-{i}'.encode()).hexdigest()[:8]}-{kind}.blob"
        _write_blob(data / "user-files" / name, size, os.urandom if kind == "random" else text_chunk)
        done[kind] += size
        i += 1


def cached_data(size_mib: int, scratch: Path, keep: bool) -> Path:
    """A generated data dir: from the --keep cache if there is one, else made now."""
    if keep:
        home = CACHE / f"data-{size_mib}MiB"
        if (home / "complete").is_file() and (home / "data").is_dir():
            print(f"data: reusing {home / 'data'}", flush=True)
            return home / "data"
        _rmtree(home)
        home.mkdir(parents=True)
    else:
        home = scratch / f"data-{size_mib}MiB"
        home.mkdir()
    start = time.monotonic()
    generate_data(home / "data", size_mib)
    (home / "complete").write_text("ok\n", encoding="utf-8")
    print(f"data: generated {size_mib} MiB in {home / 'data'} ({time.monotonic() - start:.0f} s)",
          flush=True)
    return home / "data"


def link_tree(src: Path, dst: Path) -> None:
    """cp -al: the instance's data dir as hard links to the generated files (no copy, no writes)."""
    for root, dirs, files in os.walk(src):
        rel = Path(root).relative_to(src)
        (dst / rel).mkdir(mode=0o750, exist_ok=True)
        for name in files:
            os.link(Path(root, name), dst / rel / name)


def tree_listing(top: Path) -> dict[str, int]:
    out = {}
    for root, _dirs, files in os.walk(top):
        for name in files:
            path = Path(root, name)
            out[path.relative_to(top).as_posix()] = path.stat().st_size
    return out


def blob_digests(top: Path) -> dict[str, str]:
    out = {}
    for path in sorted((top / "user-files").glob("*.blob")):
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(MIB):
                h.update(chunk)
        out[path.name] = h.hexdigest()
    return out


# ============================================================================
# The sandbox host with one instance
# ============================================================================

class Host:
    """One sandboxed host: fakes on PATH, config.toml, registries, instance `bench`."""

    def __init__(self, root: Path, data_src: Path, python: str, program: Path) -> None:
        fakes = load_fakes()
        self.root = root
        self.python = python
        self.program = program
        self.bin = root / "bin"
        self.state = root / "fake-state"
        self.paths = {k: root / v for k, v in fakes.PATH_KEYS.items()}
        self.config = root / "etc" / "abssctl" / "config.toml"
        self.work = root / "work"
        for path in [*self.paths.values(), self.state, self.work]:
            path.mkdir(parents=True, exist_ok=True)
        for tool in ("systemctl", "journalctl", "nginx", "node"):
            fakes.write_fake(self.bin / tool, tool, python=python)
        _write_json(self.state / "systemctl.json", {
            "units": {"nginx.service": {"ActiveState": "active", "SubState": "running", "MainPID": 1000,
                                        "UnitFileState": "enabled"}},
            "builtin": ["nginx.service"], "fail_start": [], "next_pid": 4000, "daemon_reloads": 0,
            "reloads": {}})
        self.zstd = need("zstd")
        self.tar = need("tar")
        self._write_config()
        self._install_version()
        self._register()
        self.instance = self.paths["instance_root"] / NAME
        self._lay_out_instance(data_src)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("ABSSCTL_", "PYTHON"))}
        self.env.update(PATH=f"{self.bin}{os.pathsep}{os.environ.get('PATH', os.defpath)}",
                        FAKE_LOG=str(root / "calls.jsonl"), FAKE_STATE=str(self.state),
                        FAKE_UNIT_DIR=str(self.paths["systemd_unit_dir"]),
                        FAKE_NGINX_SITES=str(self.paths["nginx_sites_enabled"]), NO_COLOR="1")

    def _write_config(self) -> None:
        b = self.bin
        commands = {"systemctl": [f"{b}/systemctl"], "journalctl": [f"{b}/journalctl"],
                    "nginx": [f"{b}/nginx"], "nginx_reload": [f"{b}/nginx", "-s", "reload"],
                    "node": [f"{b}/node"], "zstd": [self.zstd]}
        lines = ["# abssctl backup bench (tests/bench/backup.py)", "", "[paths]"]
        lines += [f"{k} = {json.dumps(str(v))}" for k, v in self.paths.items()]
        lines += ["", "[service]", 'user = "root"', 'group = "root"', "", "[commands]"]
        lines += [f"{k} = {json.dumps(v)}" for k, v in commands.items()]
        lines += ["", "[health]", "timeout = 5", "interval = 0.05", ""]
        self.config.parent.mkdir(parents=True, exist_ok=True)
        self.config.write_text("\n".join(lines), encoding="utf-8")

    def _install_version(self) -> None:
        """What Versions.state_of() calls installed: the tree, its package.json, a registry entry."""
        tree = self.paths["install_root"] / SERVER_VERSION
        pkg = tree / "node_modules" / "@actual-app" / "sync-server"
        _write_json(pkg / "package.json", {"name": PACKAGE, "version": SERVER_VERSION})
        (pkg / "build" / "bin").mkdir(parents=True)
        (pkg / "build" / "bin" / "actual-server.js").write_text("// bench\n", encoding="utf-8")
        (self.paths["install_root"] / "current").symlink_to(SERVER_VERSION)
        registry = self.paths["state_dir"] / "registry"
        registry.mkdir(mode=0o750)
        _write_json(registry / "versions.json", {
            "schema_version": 1, "package": PACKAGE, "current": SERVER_VERSION,
            "versions": {SERVER_VERSION: {
                "version": SERVER_VERSION, "path": str(tree), "installed_at": STAMP, "source": "registry",
                "bin": "build/bin/actual-server.js", "integrity": "sha512-bench", "lockfile_sha256": "0" * 64,
                "size_bytes": 0, "node": {"version": "v20.20.2", "abi": "115", "arch": "x64",
                                          "libc": "glibc 2.36"},
                "engines_node": ">=20", "engines_ok": True, "native_modules": [],
                "migrations": MIGRATIONS}}})

    def _register(self) -> None:
        """instances.json and ports.json, in the shape of DESIGN.md §3.6."""
        root = self.paths["instance_root"] / NAME
        entry = {
            "name": NAME, "domain": f"{NAME}.budget.example.org", "port": PORT,
            "version": "current", "resolved_version": SERVER_VERSION, "data_version": SERVER_VERSION,
            "enabled": True, "pending_restart": False,
            "tls": {"source": "system", "cert": str(self.root / "etc/ssl/private/cert.pem"),
                    "key": str(self.root / "etc/ssl/private/cert.key"), "chain": None},
            "paths": {"root": str(root), "data": str(root / "data"), "config": str(root / "config.json"),
                      "unit": str(self.paths["systemd_unit_dir"] / f"abssctl-{NAME}.service"),
                      "vhost": str(self.paths["nginx_sites_available"] / f"abssctl-{NAME}.conf")},
            "created_at": STAMP, "updated_at": STAMP, "last_backup_id": None, "last_restore": None,
        }
        registry = self.paths["state_dir"] / "registry"
        _write_json(registry / "instances.json", {"schema_version": 1, "instances": {NAME: entry}})
        _write_json(registry / "ports.json",
                    {"schema_version": 1, "ports": {str(PORT): {"instance": NAME, "reserved_at": STAMP}}})

    def _lay_out_instance(self, data_src: Path) -> None:
        root = self.instance
        root.mkdir(mode=0o750)
        data = root / "data"
        _write_json(root / "config.json", {
            "dataDir": str(data), "serverFiles": str(data / "server-files"),
            "userFiles": str(data / "user-files"), "port": PORT, "hostname": "127.0.0.1",
            "loginMethod": "password"})
        link_tree(data_src, data)
        unit = self.paths["systemd_unit_dir"] / f"abssctl-{NAME}.service"
        pkg = self.paths["install_root"] / SERVER_VERSION / "node_modules/@actual-app/sync-server"
        unit.write_text(f"[Unit]\nDescription=Actual Budget sync server ({NAME})\n\n[Service]\n"
                        f"User=root\nGroup=root\nWorkingDirectory={pkg}\n"
                        f"ExecStart={self.bin}/node {pkg}/build/bin/actual-server.js "
                        f"--config {root}/config.json\n\n[Install]\nWantedBy=multi-user.target\n",
                        encoding="utf-8")
        vhost = self.paths["nginx_sites_available"] / f"abssctl-{NAME}.conf"
        vhost.write_text(f"server {{\n    listen 443 ssl;\n    server_name {NAME}.budget.example.org;\n"
                         f"    location / {{ proxy_pass http://127.0.0.1:{PORT}; }}\n}}\n", encoding="utf-8")

    # -- commands --------------------------------------------------------------------------------

    def abssctl(self, *args: str) -> list[str]:
        return [self.python, str(self.program), "--config", str(self.config), "--json", *args]

    def create_argv(self) -> list[str]:
        return self.abssctl("backup", "create", NAME, "--compression", "zstd")

    def restore_argv(self, backup_id: str) -> list[str]:
        return self.abssctl("--yes", "backup", "restore", backup_id, "--no-pre-backup")

    def clean_after_restore(self) -> None:
        """restore --no-pre-backup keeps the old data as data.pre-restore-<op>: drop it (untimed)."""
        for path in self.instance.iterdir():
            if path.name.startswith(("data.pre-restore-", ".abssctl-tmp-", ".trash-")):
                _rmtree(path)


# ============================================================================
# Running and timing
# ============================================================================

class Child:
    """One finished child: wall seconds, peak RSS (KiB) of its tree, VmHWM of itself, output."""

    def __init__(self, seconds: float, tree_kib: int, own_kib: int, stdout: str, stderr: str) -> None:
        self.seconds, self.tree_kib, self.own_kib = seconds, tree_kib, own_kib
        self.stdout, self.stderr = stdout, stderr

    def doc(self) -> dict[str, Any]:
        try:
            doc = json.loads(self.stdout)
        except ValueError:
            doc = {}
        return doc if isinstance(doc, dict) else {}


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children", encoding="ascii") as f:
            return [int(p) for p in f.read().split()]
    except (OSError, ValueError):
        return []


def _vm_hwm(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def run_child(argv: list[str], env: dict[str, str], work: Path) -> Child:
    """Run argv (under /usr/bin/time -v when installed), wait4 it; fail the bench if it fails."""
    timev = os.access(TIME_V, os.X_OK)
    report = work / "time-v.txt"
    full = [TIME_V, "-v", "-o", str(report), *argv] if timev else argv
    with open(work / "child.out", "w+b") as out, open(work / "child.err", "w+b") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(full, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        own = {"kib": 0}
        done = threading.Event()

        def poll() -> None:             # VmHWM of the python process itself (not zstd, not time)
            target = None
            while not done.is_set():
                if target is None:
                    target = (_children(proc.pid) or [None])[0] if timev else proc.pid
                if target is not None:
                    own["kib"] = max(own["kib"], _vm_hwm(target))
                done.wait(0.05)
        watcher = threading.Thread(target=poll, daemon=True)
        watcher.start()
        try:
            _pid, status, usage = os.wait4(proc.pid, 0)
        except ChildProcessError as exc:
            raise BenchError(f"wait4: {exc}") from None
        seconds = time.perf_counter() - start
        done.set()
        watcher.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode(errors="replace")
        stderr = err.read().decode(errors="replace")
    tree_kib = usage.ru_maxrss
    if timev:
        text = report.read_text(encoding="utf-8", errors="replace")
        for line in text.splitlines():
            if "Maximum resident set size" in line:
                tree_kib = int(line.rsplit(":", 1)[1])
            if "Exit status:" in line:
                proc.returncode = int(line.rsplit(":", 1)[1])
    if proc.returncode != 0:
        raise BenchError(f"{' '.join(argv)} exited {proc.returncode}:\n{stdout[-800:]}\n{stderr[-800:]}")
    return Child(seconds, tree_kib, own["kib"], stdout, stderr)


def pipeline(left: list[str], right: list[str], *, stdout: Any = None) -> float:
    """`left | right` with two Popen objects; wall seconds; fails the bench on any non-zero exit."""
    start = time.perf_counter()
    p1 = subprocess.Popen(left, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p2 = subprocess.Popen(right, stdin=p1.stdout, stdout=stdout, stderr=subprocess.PIPE)
    assert p1.stdout is not None
    p1.stdout.close()
    try:
        err2 = p2.communicate(timeout=TIMEOUT)[1]
        err1 = p1.communicate(timeout=60)[1]
    except subprocess.TimeoutExpired:
        p1.kill()
        p2.kill()
        raise BenchError(f"{' '.join(left)} | {' '.join(right)} timed out") from None
    seconds = time.perf_counter() - start
    if p1.returncode or p2.returncode:
        raise BenchError(f"{' '.join(left)} | {' '.join(right)} exited {p1.returncode}/{p2.returncode}: "
                         f"{err1[-300:]!r} {err2[-300:]!r}")
    return seconds


class Bench:
    """The four figures on one host, plus RSS samples of every abssctl run."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.out = host.work / "baseline.tar.zst"
        self.extract = host.work / "baseline-extract"
        self.backup_id = ""
        self.archive = Path()
        self.rss: dict[str, list[tuple[int, int]]] = {"create": [], "restore": []}
        self.cpu: dict[str, list[float]] = {}

    def baseline_create(self) -> tuple[float, float]:
        """(pipeline seconds, seconds including an fsync of out like abssctl's)."""
        self.out.unlink(missing_ok=True)
        with open(self.out, "wb") as sink:
            seconds = pipeline([self.host.tar, "-cf", "-", "-C", str(self.host.instance), "data"],
                               [self.host.zstd, "-T0", "-q"], stdout=sink)
            start = time.perf_counter()
            os.fsync(sink.fileno())
            synced = seconds + time.perf_counter() - start
        return seconds, synced

    def abssctl_create(self) -> float:
        # Its previous archive goes just before the run, as the baseline's out does (see the top).
        if self.archive != Path():
            self.archive.unlink(missing_ok=True)
            self.archive.with_name(self.archive.name.split(".tar")[0] + ".sha256").unlink(missing_ok=True)
        child = run_child(self.host.create_argv(), self.host.env, self.host.work)
        backup = child.doc().get("backup") or {}
        if child.doc().get("ok") is not True or not backup.get("id"):
            raise BenchError(f"backup create gave no backup: {child.stdout[-500:]!r}")
        self.backup_id, self.archive = backup["id"], Path(backup["archive"])
        self.rss["create"].append((child.tree_kib, child.own_kib))
        return child.seconds

    def baseline_restore(self) -> float:
        _rmtree(self.extract)               # its own last output, just before the run
        self.extract.mkdir()
        seconds = pipeline([self.host.zstd, "-d", "-T0", "-q", "-c", str(self.archive)],
                           [self.host.tar, "-xf", "-", "-C", str(self.extract)])
        return seconds

    def abssctl_restore(self) -> float:
        self.host.clean_after_restore()     # its own last output (the data it replaced), likewise
        child = run_child(self.host.restore_argv(self.backup_id), self.host.env, self.host.work)
        doc = child.doc()
        if doc.get("ok") is not True or (doc.get("restore") or {}).get("backup_id") != self.backup_id:
            raise BenchError(f"backup restore did not restore {self.backup_id}: {child.stdout[-500:]!r}")
        if (doc.get("restore") or {}).get("health") is not None:
            raise BenchError("backup restore started and gated the unit; the bench expects it stopped")
        self.rss["restore"].append((child.tree_kib, child.own_kib))
        return child.seconds

    def settle(self) -> None:
        """Between steps, outside the timings: flush the disk. (Each side deletes its own previous
        output just before its next run; see the top.)"""
        os.sync()


def children_cpu() -> float:
    """CPU seconds (user + system) of every child this process has waited for, and theirs."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed_pairs(bench: Bench, runs: int, warmup: int, first: Callable[[], Any], second: Callable[[], Any],
                label: str, after_warmup: Callable[[], None] | None = None) -> tuple[list[Any], list[float]]:
    """`warmup` untimed rounds of each, then `runs` timed rounds, alternating who goes first. The CPU
    seconds of each timed run go to bench.cpu["<label> baseline"] and bench.cpu["<label> abssctl"];
    ``after_warmup`` runs once, after the first abssctl run."""
    a_times: list[Any] = []
    b_times: list[float] = []
    cpu = {id(a_times): bench.cpu.setdefault(f"{label} baseline", []),
           id(b_times): bench.cpu.setdefault(f"{label} abssctl", [])}
    for i in range(warmup + runs):
        order = [(first, a_times), (second, b_times)]
        if i % 2:
            order.reverse()
        got: dict[int, Any] = {}
        spent: dict[int, float] = {}
        for fn, sink in order:
            before = children_cpu()
            got[id(sink)] = fn()
            spent[id(sink)] = children_cpu() - before
            if not i and fn == second and after_warmup is not None:
                after_warmup()
            bench.settle()
            if i >= warmup:
                sink.append(got[id(sink)])
                cpu[id(sink)].append(spent[id(sink)])
        print(f"  {label} round {i}{' (warm-up)' if i < warmup else ''}: "
              f"baseline {_first(got[id(a_times)]) * 1000:.0f} ms (cpu {spent[id(a_times)]:.2f} s), "
              f"abssctl {got[id(b_times)] * 1000:.0f} ms (cpu {spent[id(b_times)]:.2f} s)", flush=True)
    return a_times, b_times


def _first(value: Any) -> float:
    return value[0] if isinstance(value, tuple) else value


def check_restored(host: Host, data_src: Path, want_blobs: dict[str, str]) -> None:
    """After the warm-up restore the live data must be the generated data (blobs byte for byte)."""
    live = host.instance / "data"
    if tree_listing(live).keys() != tree_listing(data_src).keys():
        raise BenchError(f"restored tree {live} does not list the same files as {data_src}")
    if blob_digests(live) != want_blobs:
        raise BenchError(f"restored blobs under {live} differ from the generated ones")


# ============================================================================
# main
# ============================================================================

def _mib(kib: int) -> float:
    return kib / 1024


def rss_probe(size_mib: int, scratch: Path, keep: bool, python: str, program: Path) -> dict[str, tuple[int, int]]:
    """Peak RSS of one create and one restore at another size (its own host)."""
    data = cached_data(size_mib, scratch, keep)
    host = Host(scratch / f"host-{size_mib}MiB", data, python, program)
    bench = Bench(host)
    bench.abssctl_create()
    bench.settle()
    bench.abssctl_restore()
    bench.settle()
    return {k: max(v) for k, v in bench.rss.items()}


def hash_seconds(data: Path, archive: Path) -> float:
    """CPU seconds of one sha256 pass over every file of DATA plus one over ARCHIVE, read in 1 MiB
    chunks as abssctl reads them (the best of three, so a busy moment does not count)."""
    files = sorted(p for p in data.rglob("*") if p.is_file()) + [archive]
    best = float("inf")
    view = memoryview(bytearray(MIB))
    for _ in range(3):
        start = time.process_time()
        for path in files:
            sha = hashlib.sha256()
            with open(path, "rb", buffering=0) as f:
                while n := f.readinto(view):
                    sha.update(view[:n])
        best = min(best, time.process_time() - start)
    return best


def main(argv: list[str] | None = None) -> int:
    """Run the bench; 0 within budget, 1 over budget, 2 when it cannot run."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mib", type=int, default=1024, help="data dir size in MiB (default 1024)")
    p.add_argument("--runs", type=int, default=5, help="timed runs per figure (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds before them (default 2)")
    p.add_argument("--keep", action="store_true",
                   help=f"keep the sandbox and cache the generated data under {CACHE}")
    p.add_argument("--python", default="/usr/bin/python3", help="target interpreter")
    p.add_argument("--abssctl", type=Path, default=None, metavar="PATH",
                   help="the abssctl.py or .pyz to measure (default: this checkout, built into a .pyz)")
    args = p.parse_args(argv)
    if args.runs < 1 or args.warmup < 1:
        p.error("--runs and --warmup must be at least 1")
    if args.size_mib < 10:
        p.error("--size-mib must be at least 10")
    scratch: Path | None = None
    peers: dict[str, tuple[float, float]] = {}
    try:
        need = (args.size_mib + SMALL_MIB) * MIB * 5
        if shutil.disk_usage(BASE).free < need:
            raise BenchError(f"{BASE} needs about {need >> 30} GiB free")
        scratch = Path(tempfile.mkdtemp(prefix="abssctl-bench-backup-", dir=BASE))
        fs = subprocess.run(["df", "--output=fstype", str(scratch)], capture_output=True, text=True,
                            check=False).stdout.split()[-1:]
        if fs == ["tmpfs"]:
            raise BenchError(f"{BASE} is tmpfs; the bench needs a real disk")
        data = cached_data(args.size_mib, scratch, args.keep)
        program = args.abssctl.resolve() if args.abssctl else build_pyz(args.python, scratch / "abssctl.pyz")
        host = Host(scratch / "host", data, args.python, program)
        bench = Bench(host)
        version = subprocess.run([args.python, "--version"], capture_output=True, text=True).stdout.strip()
        load_start = os.getloadavg()
        machine_start = Machine()
        print(f"measuring {program}")
        print(f"{args.python} ({version}),"
              f" {os.cpu_count()} cpus, {args.size_mib} MiB data dir on {fs[0] if fs else '?'} "
              f"({len(tree_listing(data))} files), median of {args.runs} after {args.warmup} warm-up rounds; "
              f"load average {_loads(load_start)}\n", flush=True)
        want_blobs = blob_digests(data)
        os.sync()
        base_c, abs_c = timed_pairs(bench, args.runs, args.warmup, bench.baseline_create, bench.abssctl_create,
                                    "create")
        archive_size = bench.archive.stat().st_size
        hashes = hash_seconds(data, bench.archive)
        base_r, abs_r = timed_pairs(bench, args.runs, args.warmup, bench.baseline_restore, bench.abssctl_restore,
                                    "restore", after_warmup=lambda: check_restored(host, data, want_blobs))
        full_rss = {k: max(v) for k, v in bench.rss.items()}
        peers = peer_rounds(host, args.runs)
        if args.size_mib != SMALL_MIB:
            small_rss = rss_probe(SMALL_MIB, scratch, args.keep, args.python, program)
        else:
            small_rss = full_rss
    except BenchError as exc:
        print(f"backup bench: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"backup bench: {exc}", file=sys.stderr)
        return 2
    finally:
        if scratch is not None:
            if args.keep:
                print(f"\nkept: {scratch}")
            else:
                _rmtree(scratch)

    failures = report(args, base_c, abs_c, base_r, abs_r, archive_size, full_rss, small_rss, bench.cpu, hashes)
    if peers:
        print_peers(peers, statistics.median(c[0] for c in base_c), statistics.median(abs_c),
                    statistics.median(base_r), statistics.median(abs_r))
    seconds, others, steal = Machine().others_since(machine_start)
    share = (others + steal) / max(0.001, seconds * (os.cpu_count() or 1))
    print(f"\nload average before the bench {_loads(load_start)}; during its {seconds:.0f} s, everything else "
          f"used {others:.1f} cpu-s and the hypervisor stole {steal:.1f} ({share:.0%} of the cpus)")
    if load_start[0] >= NOISY_LOAD or share >= NOISY_SHARE:
        print(f"NOTE: other work shared the cpus (starting load >= {NOISY_LOAD} or others >= {NOISY_SHARE:.0%}): "
              "the wall-time ratios above are noisy; rerun on an idle machine before trusting them")
    for failure in failures:
        print(f"OVER BUDGET: {failure}", file=sys.stderr)
    return 1 if failures else 0


def _timed(argv: list[str], env: dict[str, str], cwd: Path) -> float:
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    seconds = time.perf_counter() - start
    if done.returncode not in (0, 1 if argv[0].endswith("borg") else 0):   # borg 1: warnings only
        raise BenchError(f"{argv[0]} exited {done.returncode}: {done.stderr[-500:]}")
    return seconds


def peer_rounds(host: Host, runs: int) -> dict[str, tuple[float, float]]:
    """{tool: (median create s, median restore s)} of borg and restic on the instance's data dir."""
    out: dict[str, tuple[float, float]] = {}
    work = host.root / "peers"
    env = dict(os.environ, BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes", BORG_RELOCATED_REPO_ACCESS_IS_OK="yes",
               BORG_BASE_DIR=str(work / "borg-home"), RESTIC_PASSWORD="bench",
               RESTIC_CACHE_DIR=str(work / "restic-cache"), XDG_CACHE_HOME=str(work / "cache"))
    for tool in ("borg", "restic"):
        exe = shutil.which(tool)
        if exe is None:
            print(f"  {tool}: not installed (apt-get install {'borgbackup' if tool == 'borg' else tool}); skipped")
            continue
        creates, restores = [], []
        for i in range(runs + 1):
            _rmtree(work)
            work.mkdir(parents=True)
            repo, target = work / "repo", work / "restored"
            target.mkdir()
            if tool == "borg":
                subprocess.run([exe, "init", "-e", "none", str(repo)], env=env, check=True, capture_output=True,
                               timeout=TIMEOUT)
                os.sync()
                c = _timed([exe, "create", "--compression", "zstd,3", f"{repo}::r{i}", "data"], env, host.instance)
                os.sync()
                r = _timed([exe, "extract", f"{repo}::r{i}"], env, target)
            else:
                subprocess.run([exe, "-r", str(repo), "init"], env=env, check=True, capture_output=True,
                               timeout=TIMEOUT)
                os.sync()
                c = _timed([exe, "-r", str(repo), "backup", "-q", "data"], env, host.instance)
                os.sync()
                r = _timed([exe, "-r", str(repo), "restore", "latest", "-q", "--target", str(target)], env, work)
            os.sync()
            print(f"  {tool} round {i}{' (warm-up)' if not i else ''}: create {c * 1000:.0f} ms, "
                  f"restore {r * 1000:.0f} ms", flush=True)
            if i:
                creates.append(c)
                restores.append(r)
        out[tool] = (statistics.median(creates), statistics.median(restores))
    _rmtree(work)
    return out


def print_peers(peers: dict[str, tuple[float, float]], base_c: float, abs_c: float, base_r: float,
                abs_r: float) -> None:
    print(f"\n{'peer':28} {'median ms':>10} {'x tar|zstd':>11} {'x abssctl':>10}")
    print(f"{'abssctl create':28} {abs_c * 1000:10.0f} {abs_c / base_c:11.2f} {1.0:10.2f}")
    for tool, (c, _r) in peers.items():
        print(f"{tool + ' create':28} {c * 1000:10.0f} {c / base_c:11.2f} {c / abs_c:10.2f}")
    print(f"{'abssctl restore':28} {abs_r * 1000:10.0f} {abs_r / base_r:11.2f} {1.0:10.2f}")
    for tool, (_c, r) in peers.items():
        print(f"{tool + ' restore':28} {r * 1000:10.0f} {r / base_r:11.2f} {r / abs_r:10.2f}")
    print("targets (issue 18): create <= 1.25x tar|zstd and faster than borg and restic; restore <= 1.35x "
          "zstd -d|tar -x and faster than both")


def _loads(load: tuple[float, float, float]) -> str:
    return " ".join(f"{x:.2f}" for x in load)


class Machine:
    """A reading of the machine's busy and steal time (/proc/stat) and of this bench's own CPU time."""

    def __init__(self) -> None:
        self.at = time.monotonic()
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        tick = os.sysconf("SC_CLK_TCK")
        # user nice system idle iowait irq softirq steal ...
        self.busy = (fields[0] + fields[1] + fields[2] + fields[5] + fields[6]) / tick
        self.steal = fields[7] / tick if len(fields) > 7 else 0.0
        own = resource.getrusage(resource.RUSAGE_SELF)
        self.own = own.ru_utime + own.ru_stime + children_cpu()

    def others_since(self, start: Machine) -> tuple[float, float, float]:
        """(wall seconds, cpu-s used by everything but this bench and its children, steal cpu-s)."""
        others = (self.busy - start.busy) - (self.own - start.own)
        return self.at - start.at, max(0.0, others), self.steal - start.steal


def report(args: argparse.Namespace, base_c: list[tuple[float, float]], abs_c: list[float],
           base_r: list[float], abs_r: list[float], archive_size: int,
           full_rss: dict[str, tuple[int, int]], small_rss: dict[str, tuple[int, int]],
           cpu: dict[str, list[float]], hashes: float) -> list[str]:
    """Print the tables; return the budget failures."""
    failures = []
    bc = statistics.median(c[0] for c in base_c) * 1000
    bcs = statistics.median(c[1] for c in base_c) * 1000
    ac = statistics.median(abs_c) * 1000
    br = statistics.median(base_r) * 1000
    ar = statistics.median(abs_r) * 1000
    def cpu_s(key: str) -> str:
        return f"{statistics.median(cpu[key]):.2f}" if cpu.get(key) else "-"

    def floor(key: str, wall: float) -> float:
        """ms: the baseline's cpu plus both hashes over every cpu, never under the baseline itself."""
        return max(wall, (statistics.median(cpu[key]) + hashes) / (os.cpu_count() or 1) * 1000)
    fc, fr = floor("create baseline", bc), floor("restore baseline", br)
    fc_cpu = f"{statistics.median(cpu['create baseline']) + hashes:.2f}"
    fr_cpu = f"{statistics.median(cpu['restore baseline']) + hashes:.2f}"
    rows = [
        ("baseline: tar -cf - | zstd -T0 -q > out", bc, bc, None, cpu_s("create baseline")),
        ("  (baseline + fsync(out), as abssctl does)", bcs, bc, None, ""),
        ("  floor: + both sha256 passes, no cpu idle", fc, bc, None, fc_cpu),
        ("abssctl backup create --compression zstd", ac, bc, CREATE_RATIO, cpu_s("create abssctl")),
        ("baseline: zstd -d -T0 -c ARCHIVE | tar -x", br, br, None, cpu_s("restore baseline")),
        ("  floor: + both sha256 passes, no cpu idle", fr, br, None, fr_cpu),
        ("abssctl --yes backup restore --no-pre-backup", ar, br, RESTORE_RATIO, cpu_s("restore abssctl")),
    ]
    print(f"\n{'command':46} {'median ms':>10} {'x baseline':>11}  {'budget':17} {'cpu s':>6}")
    for label, ms, base, budget, cpu_text in rows:
        ratio = ms / base
        verdict = "-"
        if budget is not None:
            verdict = f"ok (<= {budget:.2f}x)" if ratio <= budget else f"OVER ({budget:.2f}x)"
            if ratio > budget:
                failures.append(f"{label.strip()}: {ms:.0f} ms, {ratio:.2f}x the baseline (budget {budget}x)")
        print(f"{label:46} {ms:10.0f} {ratio:11.2f}  {verdict:17} {cpu_text:>6}")
    print(f"abssctl against the floor: create {ac / fc:.2f}x, restore {ar / fr:.2f}x (the sha256 passes alone: "
          f"{hashes:.2f} cpu-s on one cpu, members and archive)")
    mib = args.size_mib * MIB / MIB
    print(f"\nthroughput: baseline create {mib / bc * 1000:.0f} MiB/s, abssctl create {mib / ac * 1000:.0f} "
          f"MiB/s; baseline restore {mib / br * 1000:.0f} MiB/s, abssctl restore {mib / ar * 1000:.0f} MiB/s; "
          f"archive {archive_size / MIB:.0f} MiB")
    print(f"all runs (ms): baseline create {[round(c[0] * 1000) for c in base_c]}, abssctl create "
          f"{[round(t * 1000) for t in abs_c]}, baseline restore {[round(t * 1000) for t in base_r]}, "
          f"abssctl restore {[round(t * 1000) for t in abs_r]}")
    how = "/usr/bin/time -v" if os.access(TIME_V, os.X_OK) else "os.wait4 ru_maxrss"
    print(f"\npeak RSS, MiB. Budgeted: abssctl's own process (VmHWM, polled every 50 ms). For information:"
          f"\nthe process tree ({how}), which is zstd -T0's own buffers (60-80 MiB, varying with how fast"
          f"\ninput arrives), not abssctl's.")
    print(f"{'command':10} {f'own {SMALL_MIB} MiB':>14} {f'own {args.size_mib} MiB':>14} {'diff':>7}   "
          f"{'tree small':>10} {'tree full':>10}  budget")
    for what in ("create", "restore"):
        small, full = small_rss[what], full_rss[what]
        diff = _mib(full[1]) - _mib(small[1])
        ok = abs(diff) < RSS_FLAT_MIB and small[1] > 0 and full[1] > 0
        print(f"{what:10} {_mib(small[1]):14.1f} {_mib(full[1]):14.1f} {diff:7.1f}   "
              f"{_mib(small[0]):10.1f} {_mib(full[0]):10.1f}  "
              f"{'ok' if ok else 'OVER'} (< {RSS_FLAT_MIB:.0f} MiB apart)")
        if not ok:
            failures.append(f"peak RSS of backup {what}: {_mib(small[1]):.1f} MiB at {SMALL_MIB} MiB, "
                            f"{_mib(full[1]):.1f} MiB at {args.size_mib} MiB (process tree "
                            f"{_mib(small[0]):.1f} / {_mib(full[0]):.1f}); budget < {RSS_FLAT_MIB:.0f} MiB apart")
    return failures


if __name__ == "__main__":
    sys.exit(main())
