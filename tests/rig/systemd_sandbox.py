"""The systemctl replacement run against tmp_path: the `systemd_sandbox` fixture (DESIGN.md §7(b)).

What gdraheim/docker-systemctl-replacement (Debian 12's `systemctl` 1.4.4181) does under
`--root=SANDBOX`, found by experiment on this kind of machine:

- Unit files are looked up in SANDBOX/etc/systemd/system (and the other standard dirs, all under
  SANDBOX); `enable` makes SANDBOX/etc/systemd/system/multi-user.target.wants/<unit> links.
- `WorkingDirectory=/x` and `EnvironmentFile=/x` are read as SANDBOX/x, but `ExecStart=` is
  execve'd exactly as written (the first word must be an absolute path). Units carry absolute paths
  that are already inside the sandbox, and the sandbox lives under /tmp, so the link
  SANDBOX/tmp -> /tmp makes SANDBOX/<abs path> and <abs path> the same directory.
- MainPID lives in SANDBOX/var/run/<unit>.status ("MainPID=1234"); `stop` deletes the file, a
  failed start leaves it with the dead PID. Locks go to SANDBOX/var/run/systemd/<unit>.lock.
- The service's stdout and stderr are appended to SANDBOX/var/log/journal/<unit>.log by the
  replacement itself, so units need no redirection; the journalctl shim below reads that file.
- `start` sleeps 0.5 s after the fork and exits 1 when the process has already exited, whatever its
  exit code (even 0); a missing unit also gives 1. `show` then says ActiveState=failed.
- `is-active` answers "unknown" (rc 3) for a unit that is not enabled, even while it runs:
  enable units before asking.
- `show -p` takes ONE property: `-p A,B` prints nothing and a repeated `-p` keeps only the last.
  Plain `show UNIT` prints every property (Id, MainPID, SubState, ActiveState, ...).
- Services inherit the caller's environment (unlike systemd) and are detached with setsid, so
  each MainPID leads its own process group; once stopped they linger as zombies of PID 1 for a
  few seconds here, hence `pid_alive` treats a zombie as gone.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

__all__ = ["systemd_sandbox", "SystemdSandbox", "systemctl_script", "JOURNALCTL_SHIM"]

PYTHON = "/usr/bin/python3"
REPO = Path(__file__).resolve().parents[2]
RUN_TIMEOUT = 120.0
KILL_WAIT = 5.0

# The journalctl shim: the subset of journalctl abssctl uses, reading the replacement's logs.
JOURNALCTL_SHIM = '''#!/usr/bin/python3
"""journalctl shim for the systemctl-replacement sandbox: prints SANDBOX/var/log/journal/<unit>.log.

Supports -u/--unit (repeatable), -n/--lines N|all, --no-pager, -o/--output short|short-iso|cat,
-q, --no-hostname, -b, --since/--until (accepted, not applied: the log has no timestamps) and
-f/--follow (bounded by ABSSCTL_JOURNAL_FOLLOW_SECONDS, default 30). Anything else exits 1.
"""
import datetime, os, socket, sys, time

LOG_DIR = {log_dir!r}


def fail(msg):
    sys.stderr.write("journalctl (abssctl test shim): " + msg + "\\n")
    sys.exit(1)


def parse(argv):
    units, lines, output, follow = [], None, "short", False
    i = 0
    while i < len(argv):
        arg = argv[i]
        key, eq, val = arg.partition("=")
        takes = key in ("-u", "--unit", "-n", "--lines", "-o", "--output", "--since", "--until")
        if takes and not eq:
            if i + 1 >= len(argv):
                fail("option " + key + " needs a value")
            i, val = i + 1, argv[i + 1]
        if key in ("-u", "--unit"):
            units.append(val if "." in val else val + ".service")
        elif key in ("-n", "--lines"):
            if val != "all" and not val.isdigit():
                fail("bad line count " + val)
            lines = None if val == "all" else int(val)
        elif key in ("-o", "--output"):
            if val not in ("short", "short-iso", "cat"):
                fail("unsupported output " + val)
            output = val
        elif key in ("-f", "--follow"):
            follow = True
        elif key in ("--since", "--until", "--no-pager", "-q", "--quiet", "--no-hostname", "-b"):
            pass
        else:
            fail("unsupported argument " + arg)
        i += 1
    return units, lines, output, follow


def render(unit, line, output):
    # the log has no per-line times: every line gets the log file's mtime, in journalctl's formats
    if output == "cat":
        return line
    try:
        mtime = os.stat(os.path.join(LOG_DIR, unit + ".log")).st_mtime
    except OSError:
        mtime = time.time()
    stamp = datetime.datetime.fromtimestamp(mtime).astimezone()
    fmt = "%Y-%m-%dT%H:%M:%S%z" if output == "short-iso" else "%b %d %H:%M:%S"
    name = unit.rsplit(".", 1)[0]
    return stamp.strftime(fmt) + " " + socket.gethostname() + " " + name + ": " + line


def main():
    units, lines, output, follow = parse(sys.argv[1:])
    if not units:
        units = sorted(n[:-4] for n in os.listdir(LOG_DIR) if n.endswith(".log"))
    records, offsets = [], {{}}
    for unit in units:
        path = os.path.join(LOG_DIR, unit + ".log")
        try:
            with open(path, encoding="utf-8", errors="replace") as fh:
                text = fh.read()
        except FileNotFoundError:
            text = ""
        offsets[unit] = len(text.encode("utf-8"))
        records += [(unit, line) for line in text.splitlines()]
    if lines is not None:
        records = records[-lines:] if lines else []
    if not records and not follow:
        print("-- No entries --")
    for unit, line in records:
        print(render(unit, line, output))
    if follow:
        sys.stdout.flush()
        deadline = time.monotonic() + float(os.environ.get("ABSSCTL_JOURNAL_FOLLOW_SECONDS", "30"))
        while time.monotonic() < deadline:
            for unit in units:
                path = os.path.join(LOG_DIR, unit + ".log")
                try:
                    with open(path, "rb") as fh:
                        fh.seek(offsets[unit])
                        chunk = fh.read()
                except FileNotFoundError:
                    continue
                offsets[unit] += len(chunk)
                for line in chunk.decode("utf-8", "replace").splitlines():
                    print(render(unit, line, output), flush=True)
            time.sleep(0.2)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (KeyboardInterrupt, BrokenPipeError):
        sys.exit(0)
'''


def _cache_dir() -> Path:
    return Path(os.environ.get("ABSSCTL_TEST_CACHE") or REPO / ".cache" / "abssctl-test")


def systemctl_script() -> Path | None:
    """The unpacked replacement script (the real file behind any symlink), or None."""
    root = _cache_dir() / "systemctl"
    for rel in ("usr/bin/systemctl", "usr/bin/systemctl3.py", "usr/share/systemctl/systemctl3.py",
                "usr/bin/systemctl.py"):
        path = root / rel
        if path.is_file():
            return path.resolve()
    found = sorted(root.glob("**/systemctl*.py")) if root.is_dir() else []
    return found[0].resolve() if found else None


def _boot_ticks_now() -> int:
    """Now, in the clock ticks since boot that /proc/PID/stat uses for start times."""
    uptime = float(Path("/proc/uptime").read_text(encoding="ascii").split()[0])
    return int(uptime * os.sysconf("SC_CLK_TCK"))


def _proc_stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    return text.rpartition(")")[2].split()  # fields from "state" (field 3) on


def pid_alive(pid: int) -> bool:
    """True while PID exists and is not a zombie."""
    fields = _proc_stat(pid)
    return fields is not None and fields[0] != "Z"


class SystemdSandbox:
    """A sandbox root for the systemctl replacement, plus a journalctl shim reading its logs."""

    __slots__ = ("root", "unit_dir", "run_dir", "log_dir", "script", "command",
                 "journalctl_command", "_born")

    def __init__(self, root: Path, script: Path) -> None:
        self.root = root
        self.unit_dir = root / "etc" / "systemd" / "system"
        self.run_dir = root / "var" / "run"
        self.log_dir = root / "var" / "log" / "journal"
        self.script = script
        self.command = [PYTHON, str(script), "--root=" + str(root)]
        shim = root / "bin" / "journalctl"
        self.journalctl_command = [PYTHON, str(shim)]
        self._born = _boot_ticks_now()

    def create(self) -> None:
        """Lay out the tree, the /tmp link (see the module docstring) and the journalctl shim."""
        for path in (self.unit_dir, self.run_dir, self.log_dir, self.root / "bin"):
            path.mkdir(parents=True, exist_ok=True)
        real = self.root.resolve()
        top = Path("/" + real.parts[1]) if len(real.parts) > 1 else Path("/")
        if top == Path("/tmp"):
            (self.root / "tmp").symlink_to("/tmp")
        else:  # a basetemp outside /tmp: link its top-level dir instead
            (self.root / top.name).symlink_to(top)
        shim = Path(self.journalctl_command[1])
        shim.write_text(JOURNALCTL_SHIM.format(log_dir=str(self.log_dir)), encoding="utf-8")
        shim.chmod(0o755)

    def run(self, *args: str, timeout: float = RUN_TIMEOUT) -> subprocess.CompletedProcess[str]:
        """Run the replacement with ARGS; output captured as text, never raises on rc."""
        return subprocess.run([*self.command, *args], capture_output=True, text=True,
                              timeout=timeout, check=False, stdin=subprocess.DEVNULL, cwd="/")

    def journal(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """Run the journalctl shim with ARGS."""
        return subprocess.run([*self.journalctl_command, *args], capture_output=True, text=True,
                              timeout=timeout, check=False, stdin=subprocess.DEVNULL)

    def show(self, unit: str) -> dict[str, str]:
        """`show UNIT` as a dict (plain show: `-p` takes one property only, see module doc)."""
        out = self.run("show", unit).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def status_pids(self) -> dict[str, int]:
        """Unit -> MainPID from SANDBOX/var/run/*.status."""
        pids: dict[str, int] = {}
        for status in sorted(self.run_dir.glob("*.status")):
            for line in status.read_text(encoding="utf-8", errors="replace").splitlines():
                key, _, val = line.partition("=")
                if key.strip() == "MainPID" and val.strip().isdigit() and int(val) > 0:
                    pids[status.name[:-len(".status")]] = int(val)
        return pids

    def _ours(self, pid: int) -> bool:
        """A recorded PID is ours only if it is alive and started after this sandbox was made."""
        fields = _proc_stat(pid)
        return fields is not None and fields[0] != "Z" and int(fields[19]) >= self._born

    def teardown(self) -> None:
        """Stop every unit with a recorded PID, then kill what is left of those PIDs, bounded."""
        recorded = self.status_pids()
        for unit in recorded:
            try:
                self.run("stop", unit, timeout=60.0)
            except subprocess.TimeoutExpired:
                pass
        left = [pid for pid in recorded.values() if self._ours(pid)]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in left:
                try:  # services are setsid'd: the recorded PID leads its own group
                    if os.getpgid(pid) == pid:
                        os.killpg(pid, sig)
                    else:
                        os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + KILL_WAIT
            while left and time.monotonic() < deadline:
                left = [pid for pid in left if pid_alive(pid)]
                time.sleep(0.05)
            if not left:
                return
        sys.stderr.write(f"systemd_sandbox: PIDs still alive after KILL: {left}\n")


@pytest.fixture
def systemd_sandbox(tmp_path: Path) -> Iterator[SystemdSandbox]:
    """The systemctl replacement with --root=tmp_path/sd; its units are stopped afterwards."""
    script = systemctl_script()
    if script is None:
        pytest.skip(f"systemctl replacement not unpacked under {_cache_dir()}/systemctl "
                    "(tests/run fetches it with apt-get download systemctl)")
    if not os.access(PYTHON, os.X_OK):
        pytest.skip(f"{PYTHON} not found")
    sandbox = SystemdSandbox(tmp_path / "sd", script)
    sandbox.create()
    try:
        yield sandbox
    finally:
        sandbox.teardown()
