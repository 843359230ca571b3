"""Shared machinery of the reliability tier.

- `RHost`: the unit tier's prepared fake host (init, 25.6.0 current, a system certificate, the
  `Backends` stand-in for systemd's exec) that can be saved once and restored *in place* (same
  absolute paths, so registries, units and vhosts stay valid) before each kill or Ctrl-C scenario.
  Restoring costs a `cp -a`; preparing a host costs a second or more.
- `run_child()`: abssctl in a `/usr/bin/python3 -c` child with an observer in `STEP_OBSERVERS`
  that, at a chosen step boundary, SIGKILLs or SIGINTs itself, or pauses until told to go.
- `problems_after_kill()` / `consistency_problems()`: what must hold after a kill and after the
  converging re-run.
- `MATRIX`: rows printed by conftest.py's terminal summary.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from rig.fakes import Sandbox
from unit.test_instances import Backends, prepare

ROOT = Path(__file__).resolve().parents[2]
PY = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
ABSSCTL = str(ROOT / "abssctl.py")
NOTES = Path(tempfile.gettempdir())        # the children's notes live outside every sandbox tree
TEMP_MARKERS = (".abssctl-tmp-", ".staging-", ".trash-", ".smoke-", ".current-")
UNIT_RE = re.compile(r"^abssctl-(.+)\.service$")
VHOST_RE = re.compile(r"^abssctl-(.+)\.conf$")
ARCHIVE_RE = re.compile(r"^(\d{8}-\d{6}-[a-z][a-z0-9-]*-[0-9a-f]{4})\.tar(\.zst|\.gz)?$")


class Matrix:
    """(kind, command, point, outcome) rows for the terminal summary."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, str]] = []

    def add(self, kind: str, command: str, point: str, outcome: str) -> None:
        self.rows.append((kind, command, point, outcome))


MATRIX = Matrix()


def show(res: Any) -> str:
    return f"argv={getattr(res, 'argv', '')}\nrc={res.rc}\nstdout={res.out[-3000:]}\nstderr={res.err[-3000:]}"


# ----------------------------------------------------------------------------------------------
# A host that can be restored in place
# ----------------------------------------------------------------------------------------------

class RHost:
    """A prepared fake host plus its Backends, with save()/restore() of the whole tree."""

    def __init__(self, sandbox: Sandbox, template: Path) -> None:
        self.sb = sandbox
        self.template = template
        self.backends = Backends(sandbox)
        prepare(sandbox)
        sandbox.knob("nginx", check_certs=True)     # nginx -t also fails on a missing cert or key
        self.saved = False

    @property
    def root(self) -> Path:
        return self.sb.root

    def run(self, *argv: Any, input: str = "") -> Any:
        return self.sb.run(*argv, input=input)

    def ok(self, *argv: Any) -> Any:
        res = self.sb.run("--json", *argv)
        assert res.rc == 0, show(res)
        return res.doc

    def save(self) -> None:
        """Snapshot the tree (with the backends stopped, so no server writes meanwhile)."""
        self.backends.close()
        if self.template.exists():
            shutil.rmtree(self.template)
        self.template.mkdir(parents=True)
        subprocess.run(["cp", "-a", f"{self.root}/.", str(self.template)], check=True)
        self.backends = Backends(self.sb)
        self.saved = True

    def restore(self) -> None:
        """Put the saved tree back at the same absolute paths; restart the backends."""
        assert self.saved
        self.backends.close()
        for child in self.root.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
        subprocess.run(["cp", "-a", f"{self.template}/.", str(self.root)], check=True)
        self.backends = Backends(self.sb)
        self.wait_backends()

    def wait_backends(self, seconds: float = 5) -> None:
        """Every unit the fake systemctl calls active has its server answering /health."""
        import abssctl
        insts = registry(self.sb, "instances").get("instances", {})
        deadline = time.monotonic() + seconds
        for name, entry in insts.items():
            unit = f"abssctl-{name}.service"
            if self.sb.systemctl_units().get(unit, {}).get("ActiveState") != "active":
                continue
            while time.monotonic() < deadline:
                try:
                    abssctl.http_get_json(int(entry["port"]), "/health", timeout=0.5)
                    break
                except OSError:
                    time.sleep(0.02)

    def close(self) -> None:
        self.backends.close()


@pytest.fixture
def rhost(sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory):
    h = RHost(sandbox, tmp_path_factory.mktemp("template") / "tree")
    yield h
    h.close()


def registry(sb: Any, name: str) -> dict[str, Any]:
    path = Path(sb.paths["state_dir"]) / "registry" / f"{name}.json"
    if name == "backups":
        path = Path(sb.paths["backup_root"]) / "backups.json"
    if not path.exists():
        return {}
    return json.loads(path.read_text())


# ----------------------------------------------------------------------------------------------
# abssctl in a child process with a step-boundary observer
# ----------------------------------------------------------------------------------------------

CHILD = r'''
import json, os, signal, sys, time
sys.path.insert(0, ROOT)
import abssctl
mode, k, note = sys.argv[1], int(sys.argv[2]), sys.argv[3]
argv = sys.argv[4:]
state = {"after": 0, "fired": False, "seen": []}


def observer(step, phase):
    if phase == "after":
        state["after"] += 1
    state["seen"].append([step.id, phase, step.cleanup is not None])
    if state["fired"] or mode == "count":
        return
    if (k == 0 and phase == "before") or (k > 0 and phase == "after" and state["after"] == k):
        state["fired"] = True
        with open(note, "w") as f:
            json.dump({"step": step.id, "phase": phase, "k": k, "pid": os.getpid()}, f)
        if mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif mode == "int":
            os.kill(os.getpid(), signal.SIGINT)
        elif mode == "pause":
            deadline = time.monotonic() + 60
            while not os.path.exists(note + ".go") and time.monotonic() < deadline:
                time.sleep(0.02)


abssctl.STEP_OBSERVERS.append(observer)
rc = abssctl.main(argv)
if mode == "count":
    with open(note, "w") as f:
        json.dump(state["seen"], f)
sys.exit(rc)
'''.replace("ROOT", repr(str(ROOT)))


def child_argv(mode: str, k: int, note: Path, config: Path, argv: list[str]) -> list[str]:
    return [PY, "-c", CHILD, mode, str(k), str(note), "--config", str(config), *argv]


def run_child(sb: Any, mode: str, k: int, argv: list[str], timeout: float = 120) -> tuple[
        subprocess.CompletedProcess, dict[str, Any] | list | None]:
    """Run abssctl ARGV in a child that acts at boundary k; returns the process and the note."""
    note = NOTES / f"note-{os.getpid()}-{time.monotonic_ns()}"
    try:
        proc = subprocess.run(child_argv(mode, k, note, sb.config, list(map(str, argv))),
                              capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        doc = json.loads(note.read_text()) if note.exists() else None
    finally:
        note.unlink(missing_ok=True)
    return proc, doc


def start_paused(sb: Any, k: int, argv: list[str]) -> tuple[subprocess.Popen, Path]:
    """Start abssctl ARGV in a child that pauses at boundary k (holding its locks) until released."""
    note = NOTES / f"pause-{os.getpid()}-{time.monotonic_ns()}"
    proc = subprocess.Popen(child_argv("pause", k, note, sb.config, list(map(str, argv))),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not note.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            out, err = proc.communicate(timeout=10)
            raise AssertionError(f"paused child never reached boundary {k}: rc={proc.returncode}\n{out}\n{err}")
        time.sleep(0.02)
    return proc, note


def release(proc: subprocess.Popen, note: Path, timeout: float = 60) -> tuple[int, str, str]:
    Path(str(note) + ".go").write_text("go")
    out, err = proc.communicate(timeout=timeout)
    note.unlink(missing_ok=True)
    Path(str(note) + ".go").unlink(missing_ok=True)
    return proc.returncode, out, err


def cli(config: Path, *argv: Any, env: dict[str, str] | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess:
    """`/usr/bin/python3 abssctl.py --config CFG ARGV` as a plain subprocess."""
    return subprocess.run([PY, ABSSCTL, "--config", str(config), *map(str, argv)], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL, env=env)


def steps_of(sb: Any, argv: list[str]) -> list[tuple[str, bool]]:
    """(step id, past the point of no return?) for each step a full run of ARGV goes through (a child
    run with a counting observer). A cleanup step runs after the change stands (DESIGN §2.3 Plan)."""
    proc, seen = run_child(sb, "count", 0, argv)
    assert proc.returncode == 0, f"baseline run failed: rc={proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return [(s, cleanup) for s, phase, cleanup in (seen or []) if phase == "after"]


def committed_at(steps: list[tuple[str, bool]], k: int) -> bool:
    """Whether boundary k ("after step k") lies past the point of no return."""
    return k > 0 and steps[k - 1][1]


def point_name(steps: list[tuple[str, bool]], k: int) -> str:
    return f"{k:2d} {'before ' + steps[0][0] if k == 0 else 'after ' + steps[k - 1][0]}"


def boundary_matrix(h: RHost, sc: Any, label: str,
                    probe: Callable[[dict, list[str], int, dict[str, Any], bool], tuple[list[str], str]]) -> list[str]:
    """Scenario SC's command once per step boundary k (0 = before the first step), each time from the
    saved start: probe(ctx, argv, k, before, committed) runs it there and returns its problems and the
    outcome to record when there are none. Every row goes to MATRIX under LABEL; returns the failures
    as "point: problems" lines."""
    ctx: dict = {}
    sc.setup(h, ctx)
    h.save()
    argv = sc.argv(ctx)
    steps = steps_of(h.sb, ["--json", "-q", *argv])
    assert steps, f"{sc.command} ran no steps"
    failures = []
    for k in range(len(steps) + 1):
        h.restore()
        before = snapshot_state(h.sb)
        point = point_name(steps, k)
        problems, outcome = probe(ctx, argv, k, before, committed_at(steps, k))
        MATRIX.add(label, sc.command, point, "FAIL: " + "; ".join(problems) if problems else outcome)
        if problems:
            failures.append(f"{point}: {'; '.join(problems)}")
    return failures


# ----------------------------------------------------------------------------------------------
# What must hold
# ----------------------------------------------------------------------------------------------

def walk(root: Path, skip_top: tuple[str, ...] = ("fake-state", "bin")) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        base = Path(dirpath)
        if base == root:
            dirnames[:] = [d for d in dirnames if d not in skip_top]
        dirnames[:] = [d for d in dirnames if d != "node_modules"]
        found += [base / d for d in dirnames] + [base / f for f in filenames]
    return found


def leftovers(root: Path) -> list[str]:
    """Temp, staging, trash and aside paths anywhere in the sandbox."""
    return sorted(str(p.relative_to(root)) for p in walk(root)
                  if p.name.startswith(TEMP_MARKERS) or ".abssctl-tmp-" in p.name
                  or p.name.startswith(("data.pre-restore-", "data.failed-")))


def unparsable_files(root: Path) -> list[str]:
    """State and config files that do not parse (half-written), plus half-written temp files."""
    bad = []
    for p in walk(root):
        if p.is_symlink() or not p.is_file():
            continue
        rel = str(p.relative_to(root))
        if ".abssctl-tmp-" in p.name and not p.name.endswith(".tar.zst") and ".tar" not in p.name:
            bad.append(f"{rel}: a temp file left at a step boundary")
            continue
        if p.name.endswith((".json", ".json.prev")):
            try:
                json.loads(p.read_bytes())
            except ValueError as exc:
                bad.append(f"{rel}: {exc}")
        elif UNIT_RE.match(p.name) and "systemd" in rel:
            text = p.read_text(errors="replace")
            if not (text.startswith("# Managed by abssctl") and "[Install]" in text and
                    text.rstrip().endswith("WantedBy=multi-user.target")):
                bad.append(f"{rel}: truncated unit")
        elif VHOST_RE.match(p.name) and "nginx" in rel:
            text = p.read_text(errors="replace")
            if not text.startswith("# Managed by abssctl") or text.count("{") != text.count("}"):
                bad.append(f"{rel}: truncated vhost")
    return bad


def fake_nginx_test(sb: Any) -> subprocess.CompletedProcess:
    return subprocess.run([str(sb.bin / "nginx"), "-t"], capture_output=True, text=True, timeout=30)


def journals(sb: Any) -> list[dict[str, Any]]:
    jdir = Path(sb.paths["state_dir"]) / "journal"
    if not jdir.is_dir():
        return []
    return [json.loads(p.read_text()) for p in sorted(jdir.iterdir()) if p.suffix == ".json"]


def problems_after_kill(sb: Any, k: int, command: str) -> list[str]:
    """Right after a kill at boundary k: files parse, nginx -t passes, one journal is left."""
    out = unparsable_files(Path(sb.root))
    t = fake_nginx_test(sb)
    if t.returncode != 0:
        out.append(f"nginx -t fails after the kill: {t.stderr.strip()}")
    try:
        left = journals(sb)
    except ValueError as exc:
        return out + [f"journal does not parse: {exc}"]
    if len(left) != 1:
        out.append(f"expected one journal, found {len(left)}")
    elif left[0].get("command") != command or len(left[0].get("done", [])) < k:
        out.append(f"journal does not record {k} started steps of {command}: "
                   f"{left[0].get('command')} {len(left[0].get('done', []))}")
    cur = Path(sb.paths["install_root"]) / "current"
    if os.path.lexists(cur) and not cur.resolve().is_dir():
        out.append(f"current points at nothing: {os.readlink(cur)}")
    return out


def consistency_problems(sb: Any, *, kept_dirs: tuple[str, ...] = (), kept_aside: tuple[str, ...] = (),
                         check_backups: bool = True) -> list[str]:
    """Registries agree with each other and with the files, systemd and nginx (DESIGN §3.6)."""
    out: list[str] = []
    root = Path(sb.root)
    insts = registry(sb, "instances").get("instances", {})
    ports = registry(sb, "ports").get("ports", {})
    for port, res in ports.items():
        owner = res.get("instance")
        if owner not in insts:
            out.append(f"port {port} is reserved for unregistered {owner!r}")
        elif int(insts[owner]["port"]) != int(port):
            out.append(f"port {port} is reserved for {owner}, which is on {insts[owner]['port']}")
    units = sb.systemctl_units()
    udir, avail, enabled = (Path(sb.paths[k]) for k in ("systemd_unit_dir", "nginx_sites_available",
                                                        "nginx_sites_enabled"))
    for name, e in insts.items():
        if str(e.get("port")) not in ports:
            out.append(f"{name}: port {e.get('port')} not reserved")
        if e.get("state") == "provisioning":
            out.append(f"{name}: registry state {e.get('state')}")
        p = e.get("paths", {})
        for key in ("root", "data", "config", "unit", "vhost"):
            if not p.get(key) or not os.path.exists(p[key]):
                out.append(f"{name}: {key} {p.get(key)} missing")
        try:
            cfg = json.loads(Path(p.get("config", "/nonexistent")).read_text())
            want = {"port": e.get("port"), "dataDir": p.get("data"), "serverFiles": f"{p.get('data')}/server-files",
                    "userFiles": f"{p.get('data')}/user-files"}
            wrong = {k: cfg.get(k) for k in want if cfg.get(k) != want[k]}
            if wrong:
                out.append(f"{name}: config.json disagrees with the registry: {wrong}")
        except (OSError, ValueError) as exc:
            out.append(f"{name}: config.json: {exc}")
        link = enabled / f"abssctl-{name}.conf"
        if not link.is_symlink() or not link.exists():
            out.append(f"{name}: vhost not enabled")
        tls = e.get("tls") or {}
        for key in ("cert", "key"):
            if tls.get(key) and not os.path.exists(tls[key]):
                out.append(f"{name}: tls {key} {tls[key]} missing")
        u = units.get(f"abssctl-{name}.service", {})
        if u.get("ActiveState") != "active" or u.get("UnitFileState") != "enabled":
            out.append(f"{name}: unit is {u.get('ActiveState')}/{u.get('UnitFileState')}")
    for d, rx in ((udir, UNIT_RE), (avail, VHOST_RE), (enabled, VHOST_RE)):
        for f in sorted(d.iterdir()) if d.is_dir() else []:
            m = rx.match(f.name)
            if m and m.group(1) not in insts:
                out.append(f"orphan {f.relative_to(root)}")
    for unit, rec in units.items():
        m = UNIT_RE.match(unit)
        if m and m.group(1) not in insts and (rec.get("ActiveState") == "active" or
                                              rec.get("UnitFileState") == "enabled"):
            out.append(f"unregistered {unit} is {rec.get('ActiveState')}/{rec.get('UnitFileState')}")
    iroot = Path(sb.paths["instance_root"])
    for d in sorted(iroot.iterdir()) if iroot.is_dir() else []:
        if d.name not in insts and d.name not in kept_dirs and not d.name.startswith("."):
            out.append(f"orphan instance dir {d.name}")
    tls_dir = Path(sb.paths["tls_dir"])
    for d in sorted(tls_dir.iterdir()) if tls_dir.is_dir() else []:
        if d.name not in insts and d.name not in kept_dirs:
            out.append(f"orphan tls dir {d.name}")
    vers = registry(sb, "versions")
    cur = Path(sb.paths["install_root"]) / "current"
    if vers.get("current") != (os.readlink(cur) if cur.is_symlink() else None):
        out.append(f"versions.json current {vers.get('current')} != symlink "
                   f"{os.readlink(cur) if cur.is_symlink() else None}")
    for v, e in (vers.get("versions") or {}).items():
        if not os.path.isdir(e.get("path", "")):
            out.append(f"version {v}: tree missing")
    for d in Path(sb.paths["install_root"]).iterdir():
        if d.name != "current" and not d.name.startswith(".") and d.name not in (vers.get("versions") or {}):
            out.append(f"unregistered version tree {d.name}")
    if journals(sb):
        out.append(f"journals left: {[j.get('op_id') for j in journals(sb)]}")
    out += [f"leftover {p}" for p in leftovers(root) if not Path(p).name.startswith(kept_aside or ("\0",))]
    if check_backups:
        out += backup_problems(sb)
    t = fake_nginx_test(sb)
    if t.returncode != 0:
        out.append(f"nginx -t fails: {t.stderr.strip()}")
    return out


def backup_problems(sb: Any) -> list[str]:
    """Every archive is indexed and ok (no orphan registered as corrupt); verify --all passes."""
    out = []
    broot = Path(sb.paths["backup_root"])
    index = registry(sb, "backups").get("backups", {})
    for bid, e in index.items():
        if e.get("status") not in ("ok", "adopted"):
            out.append(f"backup {bid} has status {e.get('status')}")
        if not (broot / str(e.get("archive"))).is_file():
            out.append(f"backup {bid}: archive {e.get('archive')} missing")
    for d in sorted(broot.iterdir()) if broot.is_dir() else []:
        if not d.is_dir():
            continue
        for f in sorted(d.iterdir()):
            m = ARCHIVE_RE.match(f.name)
            if m and m.group(1) not in index:
                out.append(f"orphan archive {d.name}/{f.name}")
    if index:
        res = sb.run("--json", "backup", "verify", "--all")
        if res.rc != 0:
            out.append(f"backup verify --all exits {res.rc}: {res.out[-500:]}")
    return out


SAFETY_REASONS = ("pre-restore", "pre-switch", "pre-set-version", "pre-delete")


def snapshot_state(sb: Any) -> dict[str, Any]:
    """What rollback_problems() compares against: the tree, registries and unit states."""
    return {"tree": sb.tree(), "instances": registry(sb, "instances"), "backups": registry(sb, "backups"),
            "units": unit_states(sb), "dbs": db_rows(Path(sb.root))}


def db_rows(root: Path) -> dict[str, str]:
    """rows digest of every instance database: a restored snapshot is the same data in other bytes
    (DESIGN §4.8.1 turns a WAL database into a self-contained DELETE-mode file)."""
    import hashlib
    import sqlite3
    out = {}
    for p in walk(root):
        if p.name.endswith(".sqlite") and "instances" in p.parts and p.is_file():
            con = sqlite3.connect(f"file:{p}?mode=ro", uri=True)
            try:
                rows = []
                for (table,) in con.execute("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name"):
                    rows += [table, *map(repr, con.execute(f"SELECT * FROM {table}"))]
            except sqlite3.DatabaseError as exc:
                rows = [f"unreadable: {exc}"]
            finally:
                con.close()
            out[str(p.relative_to(root))] = hashlib.sha256("\n".join(rows).encode()).hexdigest()
    return out


def unit_states(sb: Any) -> dict[str, tuple]:
    """abssctl units as (active?, enabled?); the fake's memory of a unit it never ran counts as neither."""
    return {u: (r.get("ActiveState") or "inactive", r.get("UnitFileState") or "disabled")
            for u, r in sb.systemctl_units().items() if u.startswith("abssctl-")
            and ((r.get("ActiveState") or "inactive"), (r.get("UnitFileState") or "disabled")) != ("inactive", "disabled")}


def rollback_problems(sb: Any, before: dict[str, Any], kept_aside: tuple[str, ...] = ()) -> list[str]:
    """The state equals `before`, modulo bookkeeping, what the server and SQLite write at runtime
    (`.migrate` on each start, `-wal`/`-shm` beside a database a snapshot opened), safety backups
    (pre-restore, pre-switch: additive, registered and verified by consistency_problems) and what
    DESIGN says is kept aside (`kept_aside` name prefixes)."""
    after = snapshot_state(sb)
    index = after["backups"].get("backups", {})
    safety = {b for b, e in index.items() if b not in before["backups"].get("backups", {})
              and e.get("reason") in SAFETY_REASONS}

    def allowed(rel: str) -> bool:
        parts = rel.split("/")
        name = parts[-1]
        if name.endswith((".sqlite-wal", ".sqlite-shm")) or (name == ".migrate" and "instances" in parts):
            return True
        if name.endswith(".sqlite") and rel in before["dbs"] and before["dbs"][rel] == after["dbs"].get(rel):
            return True
        if any(p.startswith(kept_aside) for p in parts) and kept_aside:
            return True
        if rel.startswith("srv/abssctl/backups/"):
            if rel == "srv/abssctl/backups/backups.json" or len(parts) == 4:
                return True                          # compared as documents below / a new instance dir
            return name.rsplit(".", 2)[0].split(".tar")[0] in safety
        return rel == "var/lib/abssctl/registry/instances.json"      # compared as a document below
    out = []
    changed = [p for p in tree_diff(before["tree"], after["tree"]) if not allowed(p)]
    if changed:
        out.append(f"tree changed: {changed[:8]}{' …' if len(changed) > 8 else ''}")

    def strip(doc: dict[str, Any]) -> dict[str, Any]:
        return {n: {k: v for k, v in e.items() if k != "last_backup_id"}
                for n, e in (doc.get("instances") or {}).items()}
    if strip(before["instances"]) != strip(after["instances"]):
        out.append(f"instances.json changed: {strip(before['instances'])} -> {strip(after['instances'])}")
    kept = {b: e for b, e in index.items() if b not in safety}
    if kept != before["backups"].get("backups", {}):
        out.append(f"backup index changed: {sorted(set(kept) ^ set(before['backups'].get('backups', {})))}")
    if after["units"] != before["units"]:
        out.append(f"units changed: {before['units']} -> {after['units']}")
    return out


def bookkeeping(rel: str) -> bool:
    """What a command that reached its locks may leave even when it undid everything."""
    return (rel.startswith("var/log/abssctl/") or
            (rel.startswith("run/abssctl/") and rel.endswith(".lock")) or
            rel.endswith(".json.prev") or rel == "run/abssctl" or rel == "var/log/abssctl"
            or rel == "var/lib/abssctl/journal")


def tree_diff(before: dict, after: dict) -> list[str]:
    return sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k) and not bookkeeping(k))


def signal_name(rc: int) -> str:
    try:
        return signal.Signals(-rc).name if rc < 0 else str(rc)
    except ValueError:
        return str(rc)


class SharedRHost:
    """One RHost for a whole module: built and set up once, restored in place when a test marks it
    dirty (a refused command changes nothing, so most tests need no restore)."""

    def __init__(self, factory: pytest.TempPathFactory, setup: Any) -> None:
        self.factory = factory
        self.setup = setup
        self.h: RHost | None = None
        self.mp: pytest.MonkeyPatch | None = None
        self.ctx: dict[str, Any] = {}
        self.dirty = False

    def get(self) -> RHost:
        if self.h is None:
            self.mp = pytest.MonkeyPatch()
            sb = Sandbox(self.factory.mktemp("shared"), self.mp)
            self.h = RHost(sb, self.factory.mktemp("shared-template") / "tree")
            self.setup(self.h, self.ctx)
            self.h.save()
        elif self.dirty:
            self.h.restore()
        self.dirty = True          # until the test says otherwise
        return self.h

    def close(self) -> None:
        if self.h is not None:
            self.h.close()
        if self.mp is not None:
            self.mp.undo()
