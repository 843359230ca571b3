"""Many hosts (issue 21): the Ansible playbook in tests/fleet/ drives abssctl on two real Debian 12 guests.

Two copies of the cached rootfs are booted with systemd-nspawn (tests/rig/nspawn.py). They share this
machine's network, so nothing of theirs may collide with each other or with the README host tier's guest
(which owns 80/443): each host gets its own nginx ports and instance port range through the inventory's
``abssctl_config``, and its own sshd on a loopback port. This machine's Debian ``ansible-core`` runs
``ansible-playbook`` against both over ssh, with a key made for the run and a throwaway known_hosts.
Runs of this module take turns through /tmp/abssctl-fleet.lock (not the README tier's lock: they
share no port).

What the harness does that the playbook does not (the test machine, not the fleet, needs it): sshd on
its port, and nginx installed ahead of abssctl without Debian's default site, which would listen on
port 80 of this machine (on a real host it is harmless and abssctl's vhosts live beside it).

In order, each step needing the ones before:
1. the first run brings both hosts up: each instance answers /health through its host's nginx port
   (HTTPS, SNI) and /info names its inventory version;
2. a second run reports changed=0 on every host (PLAY RECAP);
3. ``--check`` with an upgrade pending shows abssctl's plans (its ``--dry-run`` output: the new
   version's install, backups that are not due) and changes nothing on either host: the managed trees
   are byte-identical before and after, the ops log and the instances' data included;
4. a rolling upgrade (inventory versions raised; the new version staged on both hosts first) where the
   second host's new version cannot start: its switch fails the health gate and rolls back, the play
   stops there (ansible-playbook fails, the second host's recap has failed=1); the first host serves
   the new version, the second the old one.

How the second host's switch is made to fail, deterministically: after the staging run, the new
version's server entry script on that host gets ``process.exit(3)`` as its first statement. The unit
then exits at every start (systemd restarts it, on-failure), the gate never sees /health UP and gives
up after that host's ``[health] timeout`` (30 s, from the inventory), and the rollback starts the old,
intact version. Nothing about timing decides it.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from rig.https_client import HttpReply, HttpsClient
from rig.nspawn import Guest, ensure_rootfs, ports_held, remove_stale_guests

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("ABSSCTL_TEST_CACHE") or REPO / ".cache" / "abssctl-test")
PLAYBOOK = REPO / "tests" / "fleet" / "site.yml"
LOCK = Path("/tmp/abssctl-fleet.lock")
LOCK_WAIT = 3000.0
OLD, NEW = "26.8.1", "26.9.0"            # as in test_readme_host.py: two current releases
PLAYBOOK_TIMEOUT = 2400.0
TOOLS = {"systemd-nspawn": "systemd-container", "nsenter": "util-linux", "ansible-playbook": "ansible-core",
         "ssh": "openssh-client", "ssh-keygen": "openssh-client"}
HOSTS: dict[str, dict[str, Any]] = {
    "fleet-one": {"ssh": 2221, "config": {"nginx": {"http_port": 18080, "https_port": 18443},
                                          "ports": {"base": 15006, "max": 15099}},
                  "instances": [("alpha", "alpha.fleet.test"), ("bravo", "bravo.fleet.test")]},
    "fleet-two": {"ssh": 2222, "config": {"nginx": {"http_port": 28080, "https_port": 28443},
                                          "ports": {"base": 25006, "max": 25099}, "health": {"timeout": 30}},
                  "instances": [("charlie", "charlie.fleet.test")]},
}
RECAP = re.compile(r"^(\S+)\s+:\s+ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)\s+skipped=(\d+)"
                   r"\s+rescued=(\d+)\s+ignored=(\d+)\s*$")
TREES = ["/etc/abssctl", "/srv/abssctl", "/var/lib/abssctl", "/var/log/abssctl", "/etc/nginx/sites-available",
         "/etc/nginx/sites-enabled", "/etc/systemd/system", "/usr/local/bin/abssctl"]
# {path: [mode, sha256 | link target | "dir"]} of TREES, lock files left out (their holder notes are not state).
TREE_SCRIPT = r"""
import hashlib, json, os, stat, sys
out = {}
def one(p):
    st = os.lstat(p)
    if stat.S_ISLNK(st.st_mode):
        out[p] = [st.st_mode, "-> " + os.readlink(p)]
    elif stat.S_ISDIR(st.st_mode):
        out[p] = [st.st_mode, "dir"]
    else:
        with open(p, "rb") as f:
            out[p] = [st.st_mode, hashlib.sha256(f.read()).hexdigest()]
for top in sys.argv[1:]:
    if not os.path.lexists(top):
        continue
    one(top)
    for d, dirs, files in os.walk(top):
        dirs.sort()
        for n in sorted(dirs + files):
            if not n.endswith(".lock"):
                one(os.path.join(d, n))
print(json.dumps(out, sort_keys=True))
"""
# The new version's server entry, found through the version's package.json, gets process.exit(3) first.
BREAK_SCRIPT = r"""
import json, os, sys
pkg = os.path.realpath(os.path.join(sys.argv[1], "node_modules", "@actual-app", "sync-server"))
meta = json.load(open(os.path.join(pkg, "package.json")))
bins = meta["bin"] if isinstance(meta["bin"], dict) else {"x": meta["bin"]}
for rel in sorted(set(bins.values())):
    path = os.path.join(pkg, rel)
    lines = open(path).read().split("\n")
    at = 1 if lines and lines[0].startswith("#!") else 0
    lines.insert(at, "process.exit(3);")
    open(path, "w").write("\n".join(lines))
    print(path)
"""


class Fleet:
    """Two booted guests, the run's ssh key and inventory, and ansible-playbook against them."""

    def __init__(self, guests: dict[str, Guest], work: Path) -> None:
        self.guests = guests
        self.work = work
        self.passed: set[str] = set()
        self.recaps: list[tuple[str, list[str]]] = []     # (what ran, its PLAY RECAP lines), in order
        self.key = work / "id_ed25519"
        self.known_hosts = work / "known_hosts"

    def after(self, *steps: str) -> None:
        missing = [s for s in steps if s not in self.passed]
        if missing:
            pytest.fail(f"not run: it needs the earlier step(s) {', '.join(missing)}, which did not pass",
                        pytrace=False)

    def inventory(self, version: str) -> Path:
        """The fleet's inventory (format: tests/fleet/inventory.example.yml) with every instance on VERSION,
        plus how to reach each guest. JSON is YAML, which ansible's inventory reads."""
        hosts = {}
        for name, spec in HOSTS.items():
            hosts[name] = {
                "ansible_host": "127.0.0.1", "ansible_port": spec["ssh"], "ansible_user": "root",
                "ansible_python_interpreter": "/usr/bin/python3",
                "ansible_ssh_private_key_file": str(self.key),
                "ansible_ssh_common_args": f"-o StrictHostKeyChecking=no -o UserKnownHostsFile={self.known_hosts}",
                "abssctl_config": spec["config"],
                "abssctl_instances": [{"name": n, "domain": d, "version": version, "tls": "self-signed"}
                                      for n, d in spec["instances"]]}
        doc = {"all": {"children": {"fleet": {"hosts": hosts, "vars": {"abssctl_backup_max_age": "24h"}}}}}
        path = self.work / f"inventory-{version}.yml"
        path.write_text(json.dumps(doc, indent=2) + "\n")
        return path

    def playbook(self, label: str, version: str, *extra: str) -> tuple[int, str, dict[str, dict[str, int]]]:
        """ansible-playbook -i <inventory on VERSION> tests/fleet/site.yml EXTRA: (rc, output, recap); the
        output goes to $ABSSCTL_TEST_CACHE/fleet-playbook-N.log, the recap lines to self.recaps as LABEL."""
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.work), "LANG": "C.UTF-8",
               "ANSIBLE_HOME": str(self.work / "ansible"), "ANSIBLE_LOCAL_TEMP": str(self.work / "ansible-tmp"),
               "ANSIBLE_SSH_CONTROL_PATH_DIR": str(self.work / "cp"), "ANSIBLE_NOCOLOR": "1",
               "ANSIBLE_RETRY_FILES_ENABLED": "0", "ANSIBLE_HOST_KEY_CHECKING": "False",
               "ANSIBLE_CONFIG": str(self.work / "ansible.cfg"), "ANSIBLE_FORKS": "5"}
        argv = ["ansible-playbook", "-i", str(self.inventory(version)), str(PLAYBOOK), *extra]
        started = time.monotonic()
        try:
            proc = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=PLAYBOOK_TIMEOUT)
            rc, out = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as exc:
            rc, out = -9, f"{exc.stdout or ''}{exc.stderr or ''}\n(killed after {PLAYBOOK_TIMEOUT:.0f} s)"
        log = CACHE / f"fleet-playbook-{len(self.recaps) + 1}.log"
        log.write_text(f"# {label}\n$ {' '.join(argv)}\nrc={rc} after {time.monotonic() - started:.0f} s\n{out}")
        recap, lines = parse_recap(out)
        self.recaps.append((f"{label}: ansible-playbook -i <inventory, every instance on {version}> "
                            f"tests/fleet/site.yml {' '.join(extra)}".rstrip() + f"  (rc={rc})", lines))
        return rc, out, recap

    def tree(self, host: str) -> dict[str, list[Any]]:
        res = self.guests[host].ok(["python3", "-c", TREE_SCRIPT, *TREES], timeout=300)
        return json.loads(res.stdout)


def parse_recap(out: str) -> tuple[dict[str, dict[str, int]], list[str]]:
    """The PLAY RECAP lines: {host: {ok, changed, unreachable, failed, ...}} and the lines verbatim."""
    lines = out.splitlines()
    at = max((i for i, line in enumerate(lines) if line.startswith("PLAY RECAP")), default=None)
    assert at is not None, f"no PLAY RECAP in the playbook's output:\n{out[-6000:]}"
    recap, verbatim = {}, []
    for line in lines[at + 1:]:
        m = RECAP.match(line)
        if m:
            keys = ("ok", "changed", "unreachable", "failed", "skipped", "rescued", "ignored")
            recap[m.group(1)] = dict(zip(keys, map(int, m.groups()[1:])))
            verbatim.append(line.rstrip())
    return recap, verbatim


def _refuse(message: str) -> None:
    if os.environ.get("ABSSCTL_TEST_STRICT") == "1":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def _prepare_guest(guest: Guest, ssh_port: int, pubkey: str) -> None:
    """update-ca-certificates; sshd on 127.0.0.1:PORT only (22 never opened: the config is there before the
    package starts it); nginx installed while nothing may start, its default site (port 80) removed, then
    started with no server of its own."""
    guest.ok("update-ca-certificates", timeout=120)
    guest.ok(f"mkdir -p /etc/ssh/sshd_config.d /root/.ssh && chmod 700 /root/.ssh && "
             f"printf 'Port {ssh_port}\\nListenAddress 127.0.0.1\\n' > /etc/ssh/sshd_config.d/fleet.conf && "
             f"printf '%s\\n' '{pubkey}' > /root/.ssh/authorized_keys && chmod 600 /root/.ssh/authorized_keys && "
             "printf '#!/bin/sh\\nexit 101\\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d")
    guest.ok("apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "
             "openssh-server nginx-light", timeout=900)
    guest.ok("rm -f /usr/sbin/policy-rc.d /etc/nginx/sites-enabled/default && systemctl restart ssh && "
             "systemctl restart nginx")


def _lock() -> Any:
    handle = open(LOCK, "w")
    deadline = time.monotonic() + LOCK_WAIT
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return handle
        except OSError:
            if time.monotonic() > deadline:
                handle.close()
                pytest.fail(f"{LOCK} still held after {LOCK_WAIT:.0f} s (another fleet run)", pytrace=False)
            time.sleep(2)


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    if os.geteuid() != 0:
        pytest.skip("not root: no systemd-nspawn (the fleet scenario boots two Debian 12 guests as root)")
    missing = [f"{tool} (apt-get install {pkg})" for tool, pkg in TOOLS.items() if not shutil.which(tool)]
    if missing:
        _refuse("missing: " + ", ".join(missing))
    lock = _lock()
    guests: dict[str, Guest] = {}
    work = Path(tempfile.mkdtemp(prefix="fleet-", dir="/tmp"))      # short: ssh's ControlPath lives here
    try:
        ports = tuple(p for spec in HOSTS.values() for p in (spec["ssh"], spec["config"]["nginx"]["http_port"],
                                                              spec["config"]["nginx"]["https_port"]))
        held = ports_held(ports)
        if held:
            _refuse("the fleet's guests need these ports of this machine, but "
                    + "; ".join(f"port {p} is held by {who}" for p, who in sorted(held.items())))
        built = subprocess.run(["python3", "build_zipapp.py"], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert built.returncode == 0, f"build_zipapp.py: {built.stdout}{built.stderr}"
        base, _seconds = ensure_rootfs(CACHE)
        pool = CACHE / "host" / "guests"
        pool.mkdir(parents=True, exist_ok=True)
        remove_stale_guests(pool)
        fl = Fleet(guests, work)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "abssctl-fleet-test", "-f", str(fl.key)],
                       check=True, timeout=60)
        (work / "ansible.cfg").write_text("[defaults]\nstdout_callback = default\n")
        pubkey = (work / "id_ed25519.pub").read_text().strip()
        for name in HOSTS:
            guests[name] = Guest(base, Path(tempfile.mkdtemp(prefix="guest-", dir=pool)), REPO, hostname=name)
            guests[name].prepare()
            guests[name].boot()
        for name, spec in HOSTS.items():
            _prepare_guest(guests[name], spec["ssh"], pubkey)
        for name, guest in guests.items():      # nothing of a guest's nginx listens yet (80/443 are not ours)
            listens = guest.ok("nginx -T 2>/dev/null | grep -E '^\\s*listen' || true").stdout.strip()
            assert not listens, f"{name}'s nginx listens before abssctl configured it: {listens}"
        yield fl
    finally:
        for guest in guests.values():
            try:
                guest.destroy()
            except Exception as exc:                 # the other guest still gets its teardown
                print(f"teardown of {guest.hostname}: {exc}")
        shutil.rmtree(work, ignore_errors=True)
        lock.close()


# -- helpers ----------------------------------------------------------------------------------------

def _client(host: str) -> HttpsClient:
    return HttpsClient("127.0.0.1", HOSTS[host]["config"]["nginx"]["https_port"])


def _serves(host: str, domain: str, version: str, seconds: float = 60.0) -> None:
    """DOMAIN answers /health UP and /info VERSION through HOST's nginx (HTTPS with SNI)."""
    client = _client(host)
    got = client.health(domain, seconds)
    port = HOSTS[host]["config"]["nginx"]["https_port"]
    assert isinstance(got, HttpReply) and got.status == 200 and got.json() == {"status": "UP"}, (
        f"/health of {domain} through {host}'s nginx (127.0.0.1:{port}): "
        f"{got if isinstance(got, str) else got.describe()}")
    info = client.https(domain, "/info")
    assert info.status == 200 and info.json()["build"]["version"] == version, (
        f"{domain} on {host} should run {version}: {info.describe()}")


def _registry(fl: Fleet, host: str) -> dict[str, Any]:
    res = fl.guests[host].ok(["abssctl", "--json", "instance", "list"], timeout=120)
    return {row["name"]: row for row in json.loads(res.stdout)["instances"]}


def _recap_text(fl: Fleet) -> str:
    """The last run's recap lines."""
    return "\n".join(fl.recaps[-1][1]) if fl.recaps else "(no run)"


# -- the scenario -------------------------------------------------------------------------------------

def test_first_run_brings_up_both_hosts(fleet: Fleet) -> None:
    fl = fleet
    rc, out, recap = fl.playbook("first run", OLD)
    assert rc == 0, f"the first run failed (rc={rc}):\n{out[-8000:]}"
    assert set(recap) == set(HOSTS), f"recap hosts {sorted(recap)}:\n{_recap_text(fl)}"
    for host, row in recap.items():
        assert row["failed"] == 0 and row["unreachable"] == 0 and row["changed"] > 0, (host, row)
    for host, spec in HOSTS.items():
        assert set(_registry(fl, host)) == {n for n, _d in spec["instances"]}, host
        for _name, domain in spec["instances"]:
            _serves(host, domain, OLD)
    for host in HOSTS:       # the zipapp on each host is the controller's, byte for byte
        got = fl.guests[host].ok(["sha256sum", "/usr/local/bin/abssctl"]).stdout.split()[0]
        assert got == hashlib.sha256((REPO / "dist" / "abssctl.pyz").read_bytes()).hexdigest(), host
    fl.passed.add("first")


def test_second_run_changes_nothing(fleet: Fleet) -> None:
    fl = fleet
    fl.after("first")
    rc, out, recap = fl.playbook("second run", OLD)
    assert rc == 0, f"the second run failed (rc={rc}):\n{out[-8000:]}"
    assert set(recap) == set(HOSTS) and all(row["changed"] == 0 and row["failed"] == 0 for row in recap.values()), (
        f"a second run must report changed=0 on every host:\n{_recap_text(fl)}\n{out[-8000:]}")
    fl.passed.add("second")


def test_check_mode_with_an_upgrade_pending_changes_nothing(fleet: Fleet) -> None:
    fl = fleet
    fl.after("first")
    before = {host: fl.tree(host) for host in HOSTS}
    for host, tree in before.items():      # the snapshot sees what abssctl manages, the ops log included
        assert "/var/log/abssctl/operations.jsonl" in tree and "/var/lib/abssctl/registry/instances.json" in tree \
            and any(p.startswith("/etc/nginx/sites-enabled/") for p in tree), sorted(tree)[:50]
    rc, out, recap = fl.playbook("check mode, an upgrade pending", NEW, "--check")
    assert rc == 0, f"the check-mode run failed (rc={rc}):\n{out[-8000:]}"
    assert set(recap) == set(HOSTS) and all(row["changed"] == 0 and row["failed"] == 0 for row in recap.values()), (
        f"check mode reports changes:\n{_recap_text(fl)}")
    plans = out[out.index("abssctl's plans"):] if "abssctl's plans" in out else ""
    for host in HOSTS:     # each host's plan for the new version, as abssctl --dry-run printed it
        assert f"ok: [{host}] => (item=version install {NEW})" in plans, f"no plan for {host}:\n{out[-8000:]}"
    assert f'"npm install @actual-app/sync-server@{NEW}' in plans and "newest backup is recent" in plans, plans[:6000]
    assert all(f'"{name} -> {NEW}",' in plans for spec in HOSTS.values() for name, _d in spec["instances"]) and \
        f"{NEW} is not installed here yet" in plans, plans[:6000]
    for host in HOSTS:
        after = fl.tree(host)
        changed = sorted(p for p in set(before[host]) | set(after) if before[host].get(p) != after.get(p))
        assert not changed, f"--check changed {host}: {changed[:40]}"
        assert all(row["resolved_version"] == OLD for row in _registry(fl, host).values()), host
    fl.passed.add("check")


def test_rolling_upgrade_stops_at_the_host_whose_switch_rolled_back(fleet: Fleet) -> None:
    fl = fleet
    fl.after("first")
    rc, out, recap = fl.playbook("staging the new version", NEW, "--tags", "stage")
    assert rc == 0 and all(row["changed"] > 0 for row in recap.values()), (
        f"staging {NEW} on both hosts (rc={rc}):\n{out[-8000:]}")
    broken = fl.guests["fleet-two"].ok(["python3", "-c", BREAK_SCRIPT, f"/srv/abssctl/versions/{NEW}"])
    assert broken.stdout.strip(), broken.describe()
    rc, out, recap = fl.playbook("rolling upgrade, fleet-two broken", NEW)
    assert rc != 0, f"the roll-out should fail at fleet-two:\n{out[-8000:]}"
    failed = [line for line in out.splitlines() if line.startswith(("failed:", "fatal:"))]
    assert len(failed) == 1 and failed[0].startswith("failed: [fleet-two] (item=charlie -> ") and \
        '"rc": 4' in failed[0] and "HealthGateFailed" in failed[0], "\n".join(failed) or out[-8000:]
    assert "NO MORE HOSTS LEFT" in out, out[-8000:]
    assert recap["fleet-one"]["failed"] == 0 and recap["fleet-one"]["changed"] > 0, _recap_text(fl)
    assert recap["fleet-two"]["failed"] == 1, _recap_text(fl)
    for name, domain in HOSTS["fleet-one"]["instances"]:
        _serves("fleet-one", domain, NEW)
        assert _registry(fl, "fleet-one")[name]["resolved_version"] == NEW
    for name, domain in HOSTS["fleet-two"]["instances"]:
        _serves("fleet-two", domain, OLD, seconds=120)
        assert _registry(fl, "fleet-two")[name]["resolved_version"] == OLD
    fl.passed.add("upgrade")


def test_closing_note_quotes_the_recaps(fleet: Fleet) -> None:
    """The three recaps the issue asks for, written to the cache for the closing note."""
    fl = fleet
    fl.after("first", "second", "check")
    note = CACHE / "fleet-recaps.txt"
    text = []
    for title, lines in fl.recaps:
        text += [title, *lines, ""]
    note.write_text("\n".join(text))
    print("\n" + "\n".join(text))
    assert len(fl.recaps) >= 3
