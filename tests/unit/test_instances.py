"""§4.5-§4.7 instances and TLS against the fakes: bad input changes nothing, plans, argv, rollback.

The fake systemctl only remembers unit state; it runs nothing. A real systemd would exec the unit's
ExecStart, so the `backends` helper does exactly that: it watches the fake's state file and, for
every `abssctl-*.service` that is active, runs the unit's ExecStart (the fake node, which serves
/health and /info like the sync server) with the unit's Environment= and WorkingDirectory=, and
stops it when the unit stops. The health gate then talks to a real loopback listener.
"""
from __future__ import annotations

import json
import os
import shlex
import socket
import stat
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest

import abssctl
from rig.fakes import Sandbox

PACKAGE = "@actual-app/sync-server"
VERSION = "25.6.0"
SPAN = 100                         # [ports] base..max holds SPAN ports, picked per test
BOB = "bob"
BOB_DOMAIN = "bob.example.org"


def show(res: Any) -> str:
    return f"argv={res.argv}\nrc={res.rc}\nstdout={res.out}\nstderr={res.err}"


# ----------------------------------------------------------------------------------------------
# A stand-in for systemd's exec of ExecStart
# ----------------------------------------------------------------------------------------------

class Backends:
    """Run each active abssctl unit's ExecStart (the fake node server); stop it when it stops."""

    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox
        self.procs: dict[str, tuple[Any, subprocess.Popen]] = {}
        self.spawned: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="fake-systemd-exec", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._sync()
            except (OSError, ValueError):
                pass
            self._stop.wait(0.02)

    def _units(self) -> dict[str, dict[str, Any]]:
        path = self.sandbox.state / "systemctl.json"
        return json.loads(path.read_text(encoding="utf-8")).get("units", {})

    def _sync(self) -> None:
        units = self._units()
        for unit, rec in units.items():
            if not unit.startswith("abssctl-"):
                continue
            active = rec.get("ActiveState") == "active"
            have = self.procs.get(unit)
            if active and (have is None or have[0] != rec.get("MainPID") or have[1].poll() is not None):
                self._kill(unit)
                proc = self._spawn(unit)
                if proc is not None:
                    self.procs[unit] = (rec.get("MainPID"), proc)
            elif not active and have is not None:
                self._kill(unit)
        for unit in [u for u in self.procs if u not in units]:
            self._kill(unit)

    def _spawn(self, unit: str) -> subprocess.Popen | None:
        path = self.sandbox.paths["systemd_unit_dir"] / unit
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError:
            return None
        env = dict(os.environ)
        cwd, argv = None, None
        for line in lines:
            if line.startswith("Environment="):
                key, _, value = line[len("Environment="):].partition("=")
                env[key] = value
            elif line.startswith("WorkingDirectory="):
                cwd = line[len("WorkingDirectory="):]
            elif line.startswith("ExecStart="):
                argv = shlex.split(line[len("ExecStart="):])
        if not argv:
            return None
        self.spawned.append(unit)
        return subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def _kill(self, unit: str) -> None:
        have = self.procs.pop(unit, None)
        if have is None:
            return
        proc = have[1]
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)

    def running(self, unit: str) -> bool:
        have = self.procs.get(unit)
        return have is not None and have[1].poll() is None

    def wait_stopped(self, unit: str, seconds: float = 5) -> bool:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if not self.running(unit):
                return True
            time.sleep(0.02)
        return False

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for unit in list(self.procs):
            self._kill(unit)


@pytest.fixture
def backends(sandbox: Sandbox):
    b = Backends(sandbox)
    yield b
    b.close()


# ----------------------------------------------------------------------------------------------
# The prepared host
# ----------------------------------------------------------------------------------------------

def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def pick_port_range() -> int:
    """A base below the ephemeral range whose ports are free. A port a test server closed stays in
    TIME-WAIT for a minute, and abssctl's bind probe (rightly or not) counts that as in use, so
    every test gets a fresh range instead of sharing one."""
    import random
    for _ in range(200):
        base = random.randrange(10000, 32000 - SPAN, SPAN)
        if all(_bindable(p) for p in range(base, base + 60)):
            return base
    pytest.skip("no free loopback port range")


def prepare(sandbox: Sandbox) -> Sandbox:
    """init, the host's unit and sites dirs, 25.6.0 installed and current, a system certificate."""
    # tmp_path is 0700 root: the smoke start (run as the service user) must be able to read it
    sandbox.configure("service", user="root", group="root")
    sandbox.base = pick_port_range()          # type: ignore[attr-defined]
    sandbox.top = sandbox.base + SPAN - 1     # type: ignore[attr-defined]
    sandbox.configure("ports", base=sandbox.base, max=sandbox.top)
    res = sandbox.run("--json", "init")
    assert res.rc == 0, show(res)
    sandbox.make_host_dirs()
    res = sandbox.run("--json", "version", "install", VERSION, "--set-current")
    assert res.rc == 0 and res.doc["version"]["current"] is True, show(res)
    sandbox.make_system_cert("example.org", days=400)
    sandbox.clear_calls()
    return sandbox


@pytest.fixture
def host(sandbox: Sandbox, backends: Backends) -> Sandbox:
    return prepare(sandbox)


@pytest.fixture
def host_with_bob(host: Sandbox) -> Sandbox:
    """The prepared host plus one running instance, bob, on the lowest port."""
    res = host.run("--json", "instance", "create", BOB, "--domain", BOB_DOMAIN)
    assert res.rc == 0, show(res)
    assert res.doc["instance"]["port"] == host.base and res.doc["instance"]["health"] == "UP", show(res)
    host.clear_calls()
    return host


def registry(sandbox: Sandbox, name: str) -> dict[str, Any]:
    return json.loads((sandbox.paths["state_dir"] / "registry" / f"{name}.json").read_text())


def tree_diff(before: dict, after: dict) -> list[str]:
    return sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))


def bookkeeping(path: str) -> bool:
    """What a command that reached its locks may leave behind even when it rolled back."""
    return (path.startswith("var/log/abssctl/") or
            (path.startswith("run/abssctl/") and path.endswith(".lock")) or
            (path.startswith("var/lib/abssctl/registry/") and path.endswith(".json.prev")))


# ----------------------------------------------------------------------------------------------
# Bad input: exit 2, a message and a hint, nothing written
# ----------------------------------------------------------------------------------------------

LONG_DOMAIN = ".".join(["a" * 63] * 3 + ["b" * 62])          # 254 characters
assert len(LONG_DOMAIN) == 254
LABEL_64 = "a" * 64 + ".example.org"
MISSING = "/nonexistent/abssctl-test/cert.pem"


def _listen_in_range(sandbox: Sandbox, stack: list) -> None:
    """Something that is not an instance accepts connections on base + 50."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", sandbox.base + 50))
    sock.listen(1)
    stack.append(sock)


SETUPS: dict[str, Callable[[Sandbox, list], None]] = {"listen": _listen_in_range}

# (id, argv after --json, expected kind or None for "any UsageError", setup)
C = "instance"
BAD: list[tuple[str, list[str], str | None, str | None]] = [
    # -- names ---------------------------------------------------------------------------------
    ("name-unicode", [C, "create", "ålice", "--domain", "alice.example.org"], None, None),
    ("name-upper", [C, "create", "Alice", "--domain", "alice.example.org"], None, None),
    ("name-semicolon", [C, "start", "a;rm"], None, None),
    ("name-dollar-paren", [C, "stop", "$(x)"], None, None),
    ("name-slash", [C, "show", "a/b"], None, None),
    ("name-dotdot", [C, "status", "../x"], None, None),
    ("name-inner-newline", [C, "logs", "a\nb"], None, None),
    ("name-trailing-newline", [C, "create", "alice\n", "--domain", "alice.example.org"], None, None),
    ("name-trailing-newline-env", [C, "env", "bob\n"], None, None),
    ("name-leading-digit", [C, "delete", "1abc", "--yes"], None, None),
    ("name-trailing-hyphen", [C, "set-port", "abc-", "{BASE+5}"], None, None),
    ("name-33-chars", [C, "rename", BOB, "a" * 33], None, None),
    ("name-reserved-current", [C, "rename", BOB, "current"], None, None),
    ("name-reserved-all", [C, "create", "all", "--domain", "all.example.org"], None, None),
    ("name-reserved-backups", [C, "set-domain", "backups", "x.example.org"], None, None),
    ("name-reserved-versions", ["tls", "verify", "versions"], None, None),
    ("name-reserved-default", ["tls", "install", "default", "--cert", MISSING, "--key", MISSING],
     None, None),
    ("name-unicode-tls-self-signed", ["tls", "self-signed", "ålice"], None, None),
    ("name-upper-quickstart", ["quickstart", "Alice", "--domain", "alice.example.org"], None, None),
    # -- domains -------------------------------------------------------------------------------
    ("domain-port", [C, "create", "alice", "--domain", "a.example.org:443"], None, None),
    ("domain-path", [C, "create", "alice", "--domain", "a.example.org/x"], None, None),
    ("domain-wildcard", [C, "create", "alice", "--domain", "*.example.org"], None, None),
    ("domain-single-label", [C, "create", "alice", "--domain", "localhost"], None, None),
    ("domain-digit-tld", [C, "set-domain", BOB, "a.123"], None, None),
    ("domain-254-chars", [C, "set-domain", BOB, LONG_DOMAIN], None, None),
    ("domain-label-64", [C, "create", "alice", "--domain", LABEL_64], None, None),
    ("domain-leading-hyphen", [C, "set-domain", BOB, "-a.example.org"], None, None),
    ("domain-trailing-hyphen", [C, "create", "alice", "--domain", "a-.example.org"], None, None),
    ("domain-underscore", [C, "set-fqdn", BOB, "a_b.example.org"], None, None),
    ("domain-trailing-newline", [C, "create", "alice", "--domain", "alice.example.org\n"], None, None),
    ("domain-quickstart-wildcard", ["quickstart", "alice", "--domain", "*.example.org"], None, None),
    ("domain-taken", [C, "create", "alice", "--domain", BOB_DOMAIN], "Conflict", None),
    ("domain-taken-case", [C, "create", "alice", "--domain", "BOB.Example.org."], "Conflict", None),
    # -- ports ---------------------------------------------------------------------------------
    ("port-text", [C, "set-port", BOB, "80x"], None, None),
    ("port-1", [C, "set-port", BOB, "1"], None, None),
    ("port-70000", [C, "create", "alice", "--domain", "alice.example.org", "--port", "70000"],
     None, None),
    ("port-below-base", [C, "create", "alice", "--domain", "alice.example.org", "--port",
                         "{BASE-1}"], None, None),
    ("port-above-max", [C, "set-port", BOB, "{TOP+1}"], None, None),
    ("port-negative", [C, "set-port", BOB, "-5"], None, None),
    ("port-of-bob", [C, "create", "alice", "--domain", "alice.example.org", "--port", "{BASE}"],
     "Conflict", None),
    ("port-listening", [C, "create", "alice", "--domain", "alice.example.org", "--port",
                        "{BASE+50}"], "Conflict", "listen"),
    ("set-port-listening", [C, "set-port", BOB, "{BASE+50}"], "Conflict", "listen"),
    # -- versions ------------------------------------------------------------------------------
    ("version-caret", [C, "create", "alice", "--domain", "alice.example.org", "--version", "^26"],
     None, None),
    ("version-latest", [C, "create", "alice", "--domain", "alice.example.org", "--version",
                        "latest"], None, None),
    ("version-dotdot", [C, "create", "alice", "--domain", "alice.example.org", "--version",
                        "../26.8.1"], None, None),
    ("version-v-prefix", [C, "create", "alice", "--domain", "alice.example.org", "--version",
                          "v26.8.1"], None, None),
    ("version-not-installed", [C, "create", "alice", "--domain", "alice.example.org", "--version",
                               "26.8.1"], None, None),
    ("version-quickstart-range", ["quickstart", "alice", "--domain", "alice.example.org",
                                  "--version", "^26"], None, None),
    # -- targets -------------------------------------------------------------------------------
    ("missing-start", [C, "start", "ghost"], "NotFound", None),
    ("missing-delete", [C, "delete", "ghost", "--yes"], "NotFound", None),
    ("missing-show", [C, "show", "ghost"], "NotFound", None),
    ("missing-status", [C, "status", "ghost"], "NotFound", None),
    ("missing-logs", [C, "logs", "ghost"], "NotFound", None),
    ("missing-env", [C, "env", "ghost"], "NotFound", None),
    ("missing-set-port", [C, "set-port", "ghost", "{BASE+5}"], "NotFound", None),
    ("missing-rename", [C, "rename", "ghost", "ghost2"], "NotFound", None),
    ("missing-tls-self-signed", ["tls", "self-signed", "ghost"], "NotFound", None),
    ("duplicate-other-domain", [C, "create", BOB, "--domain", "bob2.example.org"],
     "AlreadyExists", None),
    ("duplicate-other-port", [C, "create", BOB, "--domain", BOB_DOMAIN, "--port", "{BASE+1}"],
     "AlreadyExists", None),
    ("rename-onto-itself", [C, "rename", BOB, BOB], "AlreadyExists", None),
    # -- TLS -----------------------------------------------------------------------------------
    ("tls-custom-no-files", [C, "create", "alice", "--domain", "alice.example.org", "--tls",
                             "custom"], None, None),
    ("tls-cert-without-custom", [C, "create", "alice", "--domain", "alice.example.org", "--cert",
                                 "{cert}", "--key", "{key}"], None, None),
    ("tls-custom-missing-file", [C, "create", "alice", "--domain", "alice.example.org", "--tls",
                                 "custom", "--cert", MISSING, "--key", "{key}"], None, None),
    ("tls-install-missing-file", ["tls", "install", BOB, "--cert", MISSING, "--key", "{key}"],
     None, None),
    ("tls-verify-missing-file", ["tls", "verify", "--cert", "{cert}", "--key", MISSING], None, None),
    ("tls-verify-nothing", ["tls", "verify"], None, None),
    ("tls-days-0", ["tls", "self-signed", BOB, "--days", "0"], None, None),
    ("tls-days-3651", ["tls", "self-signed", BOB, "--days", "3651"], None, None),
    # -- flags and prompts ---------------------------------------------------------------------
    ("logs-follow-json", [C, "logs", BOB, "-f"], None, None),
    ("logs-n-0", [C, "logs", BOB, "-n", "0"], None, None),
    ("delete-needs-yes", [C, "delete", BOB], "NeedsConfirmation", None),
    ("delete-purge-needs-yes", [C, "delete", BOB, "--purge-data", "--no-backup"],
     "NeedsConfirmation", None),
]


def _fill(argv: list[str], sandbox: Sandbox) -> list[str]:
    b, t = sandbox.base, sandbox.top          # type: ignore[attr-defined]
    words = {"{cert}": sandbox.settings["tls"]["system_cert"], "{key}": sandbox.settings["tls"]["system_key"],
             "{BASE}": str(b), "{BASE+1}": str(b + 1), "{BASE+5}": str(b + 5), "{BASE+50}": str(b + 50),
             "{BASE-1}": str(b - 1), "{TOP+1}": str(t + 1)}
    return [words.get(a, a) for a in argv]


class SharedHost:
    """One prepared host with bob for the whole matrix: a refused command changes nothing, so the
    next case can reuse it. A case that did change something (a bug) gets it rebuilt, so one
    failure never leaks into the next case."""

    def __init__(self, factory: pytest.TempPathFactory) -> None:
        self.factory = factory
        self.sandbox: Sandbox | None = None
        self.backends: Backends | None = None
        self.mp: pytest.MonkeyPatch | None = None
        self.dirty = True

    def get(self) -> Sandbox:
        if self.dirty or self.sandbox is None:
            self.close()
            self.mp = pytest.MonkeyPatch()
            self.sandbox = Sandbox(self.factory.mktemp("host"), self.mp)
            self.backends = Backends(self.sandbox)
            prepare(self.sandbox)
            res = self.sandbox.run("--json", "instance", "create", BOB, "--domain", BOB_DOMAIN)
            assert res.rc == 0 and res.doc["instance"]["health"] == "UP", show(res)
            self.dirty = False
        self.sandbox.clear_calls()
        return self.sandbox

    def close(self) -> None:
        if self.backends is not None:
            self.backends.close()
        if self.mp is not None:
            self.mp.undo()
        self.sandbox = self.backends = self.mp = None


@pytest.fixture(scope="module")
def shared_host(tmp_path_factory: pytest.TempPathFactory):
    shared = SharedHost(tmp_path_factory)
    yield shared
    shared.close()


@pytest.mark.parametrize("argv,kind,setup", [pytest.param(a, k, s, id=i) for i, a, k, s in BAD])
def test_bad_input_exits_2_says_what_to_do_and_changes_nothing(shared_host: SharedHost, argv: list[str],
                                                               kind: str | None, setup: str | None) -> None:
    sandbox = shared_host.get()
    held: list = []
    if setup:
        SETUPS[setup](sandbox, held)
    try:
        before, units = sandbox.tree(), sandbox.systemctl_units()
        shared_host.dirty = True
        res = sandbox.run("--json", *_fill(argv, sandbox))
        after = sandbox.tree()
        shared_host.dirty = after != before or sandbox.systemctl_units() != units
    finally:
        for sock in held:
            sock.close()
    assert "Traceback" not in res.err, show(res)
    assert res.rc == 2, show(res)
    assert isinstance(res.doc, dict) and res.doc["ok"] is False, show(res)
    err = res.doc["error"]
    assert err["kind"] == (kind or "UsageError"), show(res)
    assert tree_diff(before, after) == [], show(res)
    assert (err.get("message") or "").strip(), show(res)
    assert (err.get("hint") or "").strip(), f"no hint (DESIGN §5.2: every error says what to do next)\n{show(res)}"


def test_bad_input_matrix_is_big_enough() -> None:
    assert len(BAD) >= 30
    assert len({i for i, *_ in BAD}) == len(BAD)


def test_delete_without_yes_and_without_a_terminal_needs_confirmation(host_with_bob: Sandbox) -> None:
    before = host_with_bob.tree()
    res = host_with_bob.run("instance", "delete", BOB)          # text mode; stdin is not a TTY
    assert res.rc == 2, show(res)
    assert "Traceback" not in res.err
    assert "--yes" in res.err, show(res)
    assert host_with_bob.tree() == before


def test_dry_run_of_bad_input_still_exits_2(host_with_bob: Sandbox) -> None:
    before = host_with_bob.tree()
    res = host_with_bob.run("--json", "--dry-run", "instance", "create", "alice", "--domain", "*.example.org")
    assert res.rc == 2 and res.doc["ok"] is False, show(res)
    assert host_with_bob.tree() == before


# ----------------------------------------------------------------------------------------------
# Plans and the argv the fakes see
# ----------------------------------------------------------------------------------------------

CREATE_STEPS = ["registry.ports", "registry.instances", "fs.dirs", "config.write", "unit.write",
                "systemctl.enable", "systemctl.start", "nginx.commit", "registry.instances"]


@pytest.mark.parametrize("tls,steps", [
    ("system", CREATE_STEPS),
    ("self-signed", CREATE_STEPS[:4] + ["tls.write"] + CREATE_STEPS[4:]),
])
def test_dry_run_create_lists_the_design_steps_in_order_and_changes_nothing(host: Sandbox, tls: str,
                                                                            steps: list[str]) -> None:
    before = host.tree()
    res = host.run("--json", "--dry-run", "instance", "create", "alice", "--domain", "alice.example.org",
                   "--tls", tls)
    assert res.rc == 0, show(res)
    assert res.doc["ok"] is True and res.doc["dry_run"] is True and res.doc["changed"] is False
    assert [s["step"] for s in res.doc["plan"]] == steps, show(res)
    assert all(set(s) >= {"step", "summary", "target", "undo"} for s in res.doc["plan"])
    assert host.tree() == before
    mutating = {"start", "stop", "enable", "disable", "daemon-reload", "restart"}
    assert not [c for c in host.calls("systemctl") if mutating & set(c)], host.calls()
    assert all(c == ["nginx", "-t"] for c in host.calls("nginx")), host.calls()
    assert host.systemctl_units().get("abssctl-alice.service") is None


def test_create_calls_systemctl_then_publishes_nginx_last(host: Sandbox, backends: Backends) -> None:
    res = host.run("--json", "instance", "create", "alice", "--domain", "alice.example.org")
    assert res.rc == 0, show(res)
    unit = "abssctl-alice.service"
    sysctl = host.calls("systemctl")
    assert sysctl[:3] == [["systemctl", "--no-pager", "daemon-reload"],
                          ["systemctl", "--no-pager", "enable", unit],
                          ["systemctl", "--no-pager", "start", unit]], sysctl
    polls = sysctl[3:]
    assert len(polls) >= 2 and all(c[:3] == ["systemctl", "--no-pager", "show"] and unit in c
                                   for c in polls), sysctl
    calls = host.calls()
    start_at = calls.index(["systemctl", "--no-pager", "start", unit])
    reloads = [n for n, c in enumerate(calls) if c == ["nginx", "-s", "reload"]]
    assert len(reloads) == 1 and reloads[0] > start_at, calls
    assert calls[reloads[0] - 1] == ["nginx", "-t"], calls                 # test, then reload
    doc = res.doc
    assert doc["changed"] is True and doc["op_id"] and doc["warnings"] == [], show(res)
    inst = doc["instance"]
    assert inst == {**inst, "name": "alice", "domain": "alice.example.org", "port": host.base,
                    "version": "current", "resolved_version": VERSION, "enabled": True, "active": True,
                    "health": "UP", "url": "https://alice.example.org/", "tls": {"source": "system"},
                    "unit": unit}
    entry = registry(host, "instances")["instances"]["alice"]
    assert entry["resolved_version"] == entry["data_version"] == VERSION and entry["enabled"] is True
    assert registry(host, "ports")["ports"][str(host.base)]["instance"] == "alice"
    assert host.systemctl_units()[unit]["UnitFileState"] == "enabled"
    root = host.paths["instance_root"] / "alice"
    assert stat.S_IMODE(root.stat().st_mode) == 0o750
    for sub in ("data", "data/server-files", "data/user-files"):
        assert stat.S_IMODE((root / sub).stat().st_mode) == 0o750, sub
    assert stat.S_IMODE((root / "config.json").stat().st_mode) == 0o640
    link = host.paths["nginx_sites_enabled"] / "abssctl-alice.conf"
    vhost = host.paths["nginx_sites_available"] / "abssctl-alice.conf"
    assert link.is_symlink() and os.readlink(link) == str(vhost)
    assert stat.S_IMODE(vhost.stat().st_mode) == 0o644
    assert stat.S_IMODE((host.paths["systemd_unit_dir"] / unit).stat().st_mode) == 0o644
    assert list((host.paths["state_dir"] / "journal").iterdir()) == []


def _assert_rolled_back(host: Sandbox, before: dict, res: Any, unit: str) -> None:
    assert "Traceback" not in res.err
    changed = tree_diff(before, host.tree())
    assert [p for p in changed if not bookkeeping(p)] == [], show(res)
    assert host.systemctl_units().get(unit, {}).get("ActiveState") != "active"
    assert host.systemctl_units().get(unit, {}).get("UnitFileState") != "enabled"
    last = json.loads((host.paths["log_dir"] / "operations.jsonl").read_text().splitlines()[-1])
    assert last["command"] == "instance create" and last["result"] == "rolled-back", last
    assert last["exit_code"] == res.rc and last["changed"] is False


def test_a_failed_systemctl_start_rolls_everything_back(host: Sandbox) -> None:
    unit = "abssctl-alice.service"
    host.systemctl_fail_start(unit)
    before = host.tree()
    res = host.run("--json", "instance", "create", "alice", "--domain", "alice.example.org")
    assert res.rc == 4, show(res)
    # a unit that dies at start fails the health gate (with the journal lines attached)
    assert res.doc["ok"] is False and res.doc["error"]["kind"] == "HealthGateFailed", show(res)
    assert res.doc["error"]["details"]["unit"]["ActiveState"] == "failed", show(res)
    _assert_rolled_back(host, before, res, unit)
    sysctl = host.calls("systemctl")
    start = sysctl.index(["systemctl", "--no-pager", "start", unit])
    undo = [c for c in sysctl[start + 1:] if "show" not in c]
    assert undo[-2:] == [["systemctl", "--no-pager", "disable", unit],
                         ["systemctl", "--no-pager", "daemon-reload"]], sysctl
    assert ["nginx", "-s", "reload"] not in host.calls("nginx")     # the vhost never went in


def test_a_failing_nginx_test_rolls_everything_back(host: Sandbox, backends: Backends) -> None:
    unit = "abssctl-alice.service"
    override = host.paths["templates_dir"] / "nginx-vhost.conf"
    text = (Path(abssctl.__file__).parent / "templates" / "nginx-vhost.conf").read_text()
    override.write_text(text.replace("    client_max_body_size", "    BROKEN;\n    client_max_body_size"))
    override.chmod(0o644)
    before = host.tree()
    res = host.run("--json", "instance", "create", "alice", "--domain", "alice.example.org")
    assert res.rc == 4, show(res)
    assert res.doc["error"]["kind"] == "ProviderError", show(res)
    assert "BROKEN" in json.dumps(res.doc["error"]), show(res)
    assert backends.wait_stopped(unit)
    _assert_rolled_back(host, before, res, unit)
    calls = host.calls()
    assert ["systemctl", "--no-pager", "stop", unit] in calls, calls
    # the restored configuration was tested again
    first_t_fail = max(n for n, c in enumerate(calls) if c == ["nginx", "-t"])
    assert first_t_fail > calls.index(["systemctl", "--no-pager", "start", unit])


UNIT_TEXT = """\
[Unit]
Description=Actual Budget sync server (abssctl instance {NAME})
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
User={USER}
Group={GROUP}
WorkingDirectory={PACKAGE_DIR}
Environment=NODE_ENV=production
Environment=ACTUAL_PORT={PORT}
Environment=ACTUAL_HOSTNAME=127.0.0.1
Environment=ACTUAL_DATA_DIR={DATA_DIR}
ExecStart={NODE} {BIN} --config {CONFIG}
Restart=on-failure
RestartSec=5
TimeoutStopSec=30
UMask=0077
# Hardening (DESIGN 11.5). MemoryDenyWriteExecute stays off: V8's JIT needs writable executable memory.
NoNewPrivileges=yes
CapabilityBoundingSet=
AmbientCapabilities=
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
PrivateMounts=yes
DevicePolicy=closed
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
ProtectProc=invisible
ProcSubset=pid
KeyringMode=private
RemoveIPC=yes
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@privileged
SystemCallErrorNumber=EPERM
ReadWritePaths={DATA_DIR}

[Install]
WantedBy=multi-user.target
"""


def test_rendered_unit_config_and_vhost_follow_the_design(host: Sandbox) -> None:
    res = host.run("--json", "instance", "create", "alice", "--domain", "alice.example.org")
    assert res.rc == 0, show(res)
    root = host.paths["instance_root"] / "alice"
    pkg = os.path.realpath(host.paths["install_root"] / VERSION / "node_modules" / PACKAGE)
    unit = (host.paths["systemd_unit_dir"] / "abssctl-alice.service").read_text()
    header, _, body = unit.partition("\n")
    assert header == f"# Managed by abssctl {abssctl.__version__} (template: builtin); changes are overwritten"
    assert body == UNIT_TEXT.format(NAME="alice", USER="root", GROUP="root", PACKAGE_DIR=pkg, PORT=host.base,
                                    DATA_DIR=root / "data", NODE=host.bin / "node",
                                    BIN=f"{pkg}/build/bin/actual-server.js", CONFIG=root / "config.json")
    assert "/current/" not in unit and f"/versions/{VERSION}/" in unit
    cfg = json.loads((root / "config.json").read_text())
    data = str(root / "data")
    assert cfg == {"dataDir": data, "serverFiles": f"{data}/server-files", "userFiles": f"{data}/user-files",
                   "port": host.base, "hostname": "127.0.0.1", "trustedProxies": ["127.0.0.0/8", "::1/128"],
                   "upload": {"fileSizeSyncLimitMB": 20, "syncEncryptedFileSizeLimitMB": 50,
                              "fileSizeLimitMB": 20}, "loginMethod": "password"}
    assert not data.startswith(str(host.paths["install_root"]))
    vhost = (host.paths["nginx_sites_available"] / "abssctl-alice.conf").read_text()
    assert vhost.startswith(f"# Managed by abssctl {abssctl.__version__} (template: builtin)")
    code = [line.strip() for line in vhost.splitlines() if line.strip() and not line.strip().startswith("#")]
    cert, key = host.settings["tls"]["system_cert"], host.settings["tls"]["system_key"]
    webroot = host.paths["acme_webroot"]
    for want in ("listen 80;", "listen 443 ssl;", "server_name alice.example.org;",
                 "return 301 https://$host$request_uri;", "location ^~ /.well-known/acme-challenge/ {",
                 f"root {webroot};", "default_type text/plain;", f"ssl_certificate {cert};",
                 f"ssl_certificate_key {key};", "client_max_body_size 50M;", "location / {",
                 f"proxy_pass http://127.0.0.1:{host.base};", "proxy_http_version 1.1;",
                 "proxy_set_header Host $host;", "proxy_set_header X-Real-IP $remote_addr;",
                 "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;",
                 "proxy_set_header X-Forwarded-Proto $scheme;", "proxy_set_header X-Forwarded-Host $host;"):
        assert want in code, (want, vhost)
    assert code.count("server_name alice.example.org;") == 2
    assert not [line for line in code if "Cross-Origin" in line or line.startswith("add_header")], vhost
    assert not [line for line in code if line.startswith(("access_log", "error_log"))], vhost
    for loc in ("/metrics", "/info"):
        start = code.index(f"location = {loc} {{")
        block = code[start:code.index("}", start) + 1]
        assert block[1:4] == ["allow 127.0.0.1;", "allow ::1;", "deny all;"], block
        assert f"proxy_pass http://127.0.0.1:{host.base};" in block, block


def test_vhost_with_another_https_port_and_without_block_internal(host: Sandbox) -> None:
    host.configure("nginx", https_port=8443, block_internal=False)
    res = host.run("--json", "instance", "create", "alice", "--domain", "alice.example.org", "--no-start")
    assert res.rc == 0, show(res)
    vhost = (host.paths["nginx_sites_available"] / "abssctl-alice.conf").read_text()
    assert "return 301 https://$host:8443$request_uri;" in vhost
    assert "listen 8443 ssl;" in vhost
    assert "location = /metrics" not in vhost and "location = /info" not in vhost
    assert res.doc["instance"]["url"] == "https://alice.example.org:8443/"
    assert ["systemctl", "--no-pager", "start", "abssctl-alice.service"] not in host.calls("systemctl")


def test_create_twice_with_identical_arguments_changes_nothing(host: Sandbox) -> None:
    argv = ("--json", "instance", "create", "alice", "--domain", "alice.example.org")
    assert host.run(*argv).rc == 0
    regs = {n: registry(host, n) for n in ("instances", "ports")}
    before = host.tree()
    host.clear_calls()
    res = host.run(*argv)
    assert res.rc == 0, show(res)
    assert res.doc["changed"] is False, show(res)
    assert {n: registry(host, n) for n in ("instances", "ports")} == regs
    assert [p for p in tree_diff(before, host.tree()) if not bookkeeping(p)] == []
    mutating = {"start", "stop", "enable", "disable", "daemon-reload", "restart"}
    assert not [c for c in host.calls("systemctl") if mutating & set(c)], host.calls()
    assert ["nginx", "-s", "reload"] not in host.calls("nginx")


def test_lifecycle_no_ops_report_changed_false(host_with_bob: Sandbox, backends: Backends) -> None:
    h = host_with_bob
    unit = f"abssctl-{BOB}.service"

    def life(verb: str) -> dict[str, Any]:
        res = h.run("--json", "instance", verb, BOB)
        assert res.rc == 0, show(res)
        return res.doc

    assert life("start")["changed"] is False
    assert life("enable")["changed"] is False
    assert life("stop")["changed"] is True
    assert backends.wait_stopped(unit)
    assert h.systemctl_units()[unit]["ActiveState"] == "inactive"
    assert life("stop")["changed"] is False
    started = life("start")
    assert started["changed"] is True and started["instance"]["health"] == "UP"
    assert life("disable")["changed"] is True
    assert h.systemctl_units()[unit]["UnitFileState"] == "disabled"
    assert registry(h, "instances")["instances"][BOB]["enabled"] is False
    assert life("disable")["changed"] is False
    assert life("enable")["changed"] is True
    assert registry(h, "instances")["instances"][BOB]["enabled"] is True


def test_delete_keeps_the_data_says_where_and_blocks_a_new_create(host_with_bob: Sandbox) -> None:
    h = host_with_bob
    root = h.paths["instance_root"] / BOB
    (root / "data" / "server-files" / "account.sqlite").write_bytes(b"precious")
    res = h.run("--json", "--yes", "instance", "delete", BOB)
    assert res.rc == 0 and res.doc["changed"] is True, show(res)
    assert str(root) in res.doc["kept"], show(res)
    assert (root / "data" / "server-files" / "account.sqlite").read_bytes() == b"precious"
    assert not (h.paths["systemd_unit_dir"] / f"abssctl-{BOB}.service").exists()
    assert not os.path.lexists(h.paths["nginx_sites_enabled"] / f"abssctl-{BOB}.conf")
    assert not (h.paths["nginx_sites_available"] / f"abssctl-{BOB}.conf").exists()
    assert BOB not in registry(h, "instances")["instances"]
    assert registry(h, "ports")["ports"] == {}
    sysctl = [c for c in h.calls("systemctl") if "show" not in c]
    assert sysctl == [["systemctl", "--no-pager", "stop", f"abssctl-{BOB}.service"],
                      ["systemctl", "--no-pager", "disable", f"abssctl-{BOB}.service"],
                      ["systemctl", "--no-pager", "daemon-reload"]], sysctl
    text = h.run("--yes", "instance", "delete", BOB)
    assert text.rc == 2 and "Traceback" not in text.err, show(text)     # gone now: NotFound
    # DESIGN §4.5.1 check 1: a leftover directory exits 2 with a hint that names `init --discover`.
    before = h.tree()
    again = h.run("--json", "instance", "create", BOB, "--domain", BOB_DOMAIN)
    assert again.rc == 2 and again.doc["error"]["kind"] == "AlreadyExists", show(again)
    assert h.tree() == before
    assert "init --discover" in (again.doc["error"]["hint"] or ""), show(again)
    assert "move it aside" in (again.doc["error"]["hint"] or ""), show(again)


def test_delete_says_where_the_data_stays_in_text_mode(host_with_bob: Sandbox) -> None:
    res = host_with_bob.run("--yes", "instance", "delete", BOB)
    assert res.rc == 0, show(res)
    assert str(host_with_bob.paths["instance_root"] / BOB) in res.out + res.err, show(res)


def test_delete_purge_data_removes_the_instance_dir(host: Sandbox) -> None:
    res = host.run("--json", "instance", "create", "alice", "--domain", "alice.example.org",
                   "--tls", "self-signed")
    assert res.rc == 0, show(res)
    assert (host.paths["tls_dir"] / "alice" / "privkey.pem").exists()
    res = host.run("--json", "--yes", "instance", "delete", "alice", "--purge-data", "--no-backup")
    assert res.rc == 0 and res.doc["changed"] is True, show(res)
    assert not (host.paths["instance_root"] / "alice").exists()
    assert not (host.paths["tls_dir"] / "alice").exists()
    leftovers = [p for p in host.tree() if ".trash-" in p or ".abssctl-tmp-" in p]
    assert leftovers == []
    assert registry(host, "instances")["instances"] == {} and registry(host, "ports")["ports"] == {}
    # and now the name is free again
    res = host.run("--json", "instance", "create", "alice", "--domain", "alice.example.org")
    assert res.rc == 0, show(res)


def test_rename_moves_registry_port_dirs_unit_vhost_and_tls(host: Sandbox, backends: Backends) -> None:
    res = host.run("--json", "instance", "create", "alice", "--domain", "alice.example.org",
                   "--tls", "self-signed")
    assert res.rc == 0, show(res)
    old_cfg = json.loads((host.paths["instance_root"] / "alice" / "config.json").read_text())
    res = host.run("--json", "instance", "rename", "alice", "alicia")
    assert res.rc == 0 and res.doc["changed"] is True, show(res)
    assert res.doc["instance"]["name"] == "alicia" and res.doc["instance"]["health"] == "UP", show(res)
    insts = registry(host, "instances")["instances"]
    assert list(insts) == ["alicia"], insts
    entry = insts["alicia"]
    assert entry["name"] == "alicia" and entry["domain"] == "alice.example.org" and entry["port"] == host.base
    assert entry["paths"]["root"] == str(host.paths["instance_root"] / "alicia")
    assert entry["tls"]["cert"] == str(host.paths["tls_dir"] / "alicia" / "fullchain.pem")
    assert registry(host, "ports")["ports"][str(host.base)]["instance"] == "alicia"
    assert not (host.paths["instance_root"] / "alice").exists()
    cfg = json.loads((host.paths["instance_root"] / "alicia" / "config.json").read_text())
    assert cfg["dataDir"] == str(host.paths["instance_root"] / "alicia" / "data")
    assert cfg["port"] == old_cfg["port"]
    assert not (host.paths["systemd_unit_dir"] / "abssctl-alice.service").exists()
    unit = (host.paths["systemd_unit_dir"] / "abssctl-alicia.service").read_text()
    assert f"ACTUAL_DATA_DIR={host.paths['instance_root'] / 'alicia' / 'data'}" in unit
    assert not os.path.lexists(host.paths["nginx_sites_enabled"] / "abssctl-alice.conf")
    assert not (host.paths["nginx_sites_available"] / "abssctl-alice.conf").exists()
    vhost = (host.paths["nginx_sites_available"] / "abssctl-alicia.conf").read_text()
    assert "server_name alice.example.org;" in vhost and str(host.paths["tls_dir"] / "alicia") in vhost
    assert (host.paths["tls_dir"] / "alicia" / "privkey.pem").exists()
    assert not (host.paths["tls_dir"] / "alice").exists()
    assert [p for p in host.tree() if ".trash-" in p or ".abssctl-tmp-" in p] == []
    units = host.systemctl_units()
    assert units["abssctl-alicia.service"]["ActiveState"] == "active"
    assert units["abssctl-alicia.service"]["UnitFileState"] == "enabled"
    assert units.get("abssctl-alice.service", {}).get("ActiveState") != "active"
    assert host.run("--json", "instance", "show", "alice").doc["error"]["kind"] == "NotFound"
