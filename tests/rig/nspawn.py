"""A real Debian 12 host booted with systemd as PID 1 (DESIGN.md §11.7), for the host tier.

- ``ensure_rootfs(cache)``: a ``debootstrap --variant=minbase`` bookworm tree under
  ``<cache>/host/rootfs``, built once into a temp dir beside it and renamed into place (an
  interrupted build never leaves a half rootfs), reused within a run and across runs on the same
  checkout; a stamp file names the debootstrap arguments, and a tree built with others is rebuilt.
- ``Guest``: a fresh copy of that tree (``cp -a --reflink=auto``) with its own hostname and
  machine-id, this machine's local CA certificates, and the checkout's tracked files (as they are in
  the work tree, so an uncommitted change is tested too) in ``/root/abssctl``; booted with
  ``systemd-nspawn --boot --register=no --keep-unit --console=passive``, entered with
  ``nsenter -t <its PID 1> -a`` and a clean environment, so nothing of this machine's (PATH,
  NODE_EXTRA_CA_CERTS, npm config) reaches the guest: it is a host as it comes.
- ``ports_held(ports)``: who listens on 80/443 here (the guest shares this machine's network, so its
  nginx needs them free).
- ``readme_run_command(readme)``: the README's run command, read from README.md, never copied.

Every wait is bounded; the only processes stopped are the nspawn process this module started (by
PID) and the process group of a guest command it started that overran its timeout.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DEBOOTSTRAP_ARGS", "Guest", "GuestResult", "ReadmeCommand", "ensure_rootfs", "ports_held",
           "readme_run_command", "remove_stale_guests"]

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
INCLUDE = "systemd,systemd-sysv,dbus,python3,ca-certificates"
DEBOOTSTRAP_ARGS = ["--variant=minbase", f"--include={INCLUDE}", SUITE]
STAMP = ".abssctl-rootfs"          # inside the rootfs: the debootstrap arguments it was built with
CLEAN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"   # root's, as Debian sets it
BOOT_TIMEOUT = 180.0
POWEROFF_TIMEOUT = 120.0
DEBOOTSTRAP_TIMEOUT = 1200.0
HOST_CA_DIR = Path("/usr/local/share/ca-certificates")


# -- the cached rootfs --------------------------------------------------------------------------------

def _stamp_text() -> str:
    return " ".join(DEBOOTSTRAP_ARGS + [MIRROR]) + "\n"


def ensure_rootfs(cache: Path) -> tuple[Path, float]:
    """<cache>/host/rootfs, built when missing or built with other arguments. Returns (path, seconds
    spent building: 0 when reused). Concurrent runs on one checkout take turns through a lock file."""
    base = cache / "host"
    base.mkdir(parents=True, exist_ok=True)
    rootfs = base / "rootfs"
    with open(base / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        stamp = rootfs / STAMP
        if stamp.is_file() and stamp.read_text() == _stamp_text():
            return rootfs, 0.0
        for left in [*base.glob("rootfs.build-*"), *base.glob("rootfs.old-*")]:
            shutil.rmtree(left, ignore_errors=True)      # an interrupted build's (we hold the lock)
        started = time.monotonic()
        tmp = Path(tempfile.mkdtemp(prefix="rootfs.build-", dir=base))
        os.chmod(tmp, 0o755)             # it becomes the guest's /: mkdtemp's 0700 hangs dbus at boot
        log = base / "debootstrap.log"
        try:
            with open(log, "w") as out:
                proc = subprocess.run(["debootstrap", *DEBOOTSTRAP_ARGS, str(tmp), MIRROR], stdout=out,
                                      stderr=subprocess.STDOUT, timeout=DEBOOTSTRAP_TIMEOUT)
            if proc.returncode != 0:
                tail = log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"debootstrap exited {proc.returncode} (log {log}):\n{tail}")
            (tmp / STAMP).write_text(_stamp_text())
            if rootfs.exists():          # built with other arguments: move it aside, then drop it
                old = Path(tempfile.mkdtemp(prefix="rootfs.old-", dir=base))
                os.rename(rootfs, old / "rootfs")
                shutil.rmtree(old)
            os.rename(tmp, rootfs)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return rootfs, time.monotonic() - started


# -- who holds a port -----------------------------------------------------------------------------

def ports_held(ports: tuple[int, ...]) -> dict[int, str]:
    """port -> 'pid N (comm)' (or 'an unknown process') for each of PORTS that something listens on."""
    inodes: dict[int, set[int]] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if len(cols) > 9 and cols[3] == "0A":
                port = int(cols[1].rsplit(":", 1)[1], 16)
                if port in ports:
                    inodes.setdefault(port, set()).add(int(cols[9]))
    if not inodes:
        return {}
    owners: dict[int, str] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                owners.setdefault(int(target[8:-1]), f"pid {pid} ({comm})")
    found = {}
    for port, nodes in inodes.items():
        holders = sorted({owners[n] for n in nodes if n in owners})
        found[port] = ", ".join(holders) or "an unknown process (another network namespace's, or gone)"
    return found


# -- the README's run command ---------------------------------------------------------------------

@dataclass
class ReadmeCommand:
    line: str            # verbatim, to be run with bash -c
    name: str            # quickstart NAME
    domain: str          # quickstart ... --domain D


def readme_run_command(readme: Path) -> ReadmeCommand:
    """The first 4-space-indented code line after the paragraph starting with "Run it:" in the
    section "## The two commands", with the instance name and domain of its quickstart."""
    lines = readme.read_text(encoding="utf-8").splitlines()
    try:
        start = lines.index("## The two commands")
    except ValueError:
        raise AssertionError(f"{readme} has no '## The two commands' section") from None
    section = []
    for line in lines[start + 1:]:
        if line.startswith("## "):
            break
        section.append(line)
    run_at = next((i for i, line in enumerate(section) if line.startswith("Run it:")), None)
    assert run_at is not None, f"{readme}: no paragraph starting with 'Run it:' in '## The two commands'"
    code = next((line[4:] for line in section[run_at + 1:] if line.startswith("    ") and line.strip()), None)
    assert code is not None, f"{readme}: no indented code line after 'Run it:'"
    words = shlex.split(code)
    try:
        at = words.index("quickstart")
        name = words[at + 1]
        domain = words[words.index("--domain", at) + 1]
    except (ValueError, IndexError):
        raise AssertionError(f"{readme}: the run command has no 'quickstart NAME --domain D': {code}") from None
    return ReadmeCommand(code, name, domain)


# -- the guest ------------------------------------------------------------------------------------

@dataclass
class GuestResult:
    rc: int
    stdout: str
    stderr: str
    seconds: float
    command: str

    def describe(self, tail: int = 6000) -> str:
        return (f"guest$ {self.command}\nrc={self.rc} after {self.seconds:.1f} s\n"
                f"--- stdout (last {tail} chars) ---\n{self.stdout[-tail:]}\n"
                f"--- stderr (last {tail} chars) ---\n{self.stderr[-tail:]}")


def _children(pid: int) -> list[int]:
    kids = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2:].split()[1]) == pid:
            kids.append(int(entry))
    return kids


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _pid_ns(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return ""


def _tracked_files(repo: Path) -> list[str]:
    """The checkout's tracked files that exist in the work tree (git ls-files)."""
    proc = subprocess.run(["git", "-C", str(repo), "ls-files", "-z"], capture_output=True, timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"git ls-files in {repo} failed: {proc.stderr.decode(errors='replace')}")
    return [p for p in proc.stdout.decode().split("\0") if p and os.path.lexists(repo / p)]


class Guest:
    """One booted copy of the cached rootfs. ``run()`` a command in it; ``reboot()``; ``destroy()``."""

    def __init__(self, rootfs: Path, workdir: Path, repo: Path, hostname: str = "abssctl-host") -> None:
        self.base = rootfs
        self.workdir = workdir
        self.dir = workdir / hostname        # nspawn names the machine after the directory
        self.repo = repo
        self.hostname = hostname
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid1 = 0
        self.boots = 0
        self.log_path = workdir / "nspawn.log"
        self._lock = open(workdir / ".lock", "w")       # held while this guest lives: see remove_stale_guests
        fcntl.flock(self._lock, fcntl.LOCK_EX)

    # -- preparing the copy -------------------------------------------------------------------

    def prepare(self) -> None:
        """The copy, its hostname and machine-id, the host's CA certs, the checkout in /root/abssctl."""
        subprocess.run(["cp", "-a", "--reflink=auto", str(self.base), str(self.dir)], check=True, timeout=600)
        (self.dir / STAMP).unlink(missing_ok=True)
        (self.dir / "etc/hostname").write_text(self.hostname + "\n")
        machine_id = uuid.uuid4().hex + "\n"
        (self.dir / "etc/machine-id").write_text(machine_id)
        if (self.dir / "var/lib/dbus/machine-id").is_file():     # debootstrap leaves a copy there
            (self.dir / "var/lib/dbus/machine-id").write_text(machine_id)
        ca_dir = self.dir / HOST_CA_DIR.relative_to("/")
        ca_dir.mkdir(parents=True, exist_ok=True)
        for crt in sorted(HOST_CA_DIR.glob("*.crt")) if HOST_CA_DIR.is_dir() else []:
            shutil.copyfile(crt, ca_dir / crt.name)
        dest = self.dir / "root/abssctl"
        for rel in _tracked_files(self.repo):
            src, dst = self.repo / rel, dest / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.is_symlink():
                os.symlink(os.readlink(src), dst)
            else:
                shutil.copy2(src, dst)

    # -- booting ------------------------------------------------------------------------------

    def boot(self) -> str:
        """Start systemd-nspawn, find the container's PID 1, wait (bounded) for the system to be up.
        Returns the state `systemctl is-system-running --wait` printed ('running')."""
        assert self.proc is None, "the guest is already running"
        self.boots += 1
        log = open(self.log_path, "ab")
        log.write(f"\n===== boot {self.boots} =====\n".encode())
        log.flush()
        self.proc = subprocess.Popen(
            ["systemd-nspawn", "--boot", "--register=no", "--keep-unit", "--console=passive", "-D", str(self.dir)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + BOOT_TIMEOUT
        while not self.pid1:
            if self.proc.poll() is not None:
                raise RuntimeError(f"systemd-nspawn exited {self.proc.returncode} while booting:\n{self.log_tail()}")
            kids = _children(self.proc.pid)
            for kid in kids:
                try:
                    comm = Path(f"/proc/{kid}/comm").read_text().strip()
                except OSError:
                    continue
                if comm == "systemd":
                    self.pid1 = kid
            if not self.pid1:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no systemd under systemd-nspawn (pid {self.proc.pid}) within "
                                       f"{BOOT_TIMEOUT:.0f} s:\n{self.log_tail()}")
                time.sleep(0.2)
        state = ""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                jobs = self.run(["systemctl", "list-jobs", "--no-pager"], timeout=20, check_alive=False)
                raise RuntimeError(f"the guest did not finish booting within {BOOT_TIMEOUT:.0f} s "
                                   f"(is-system-running: {state!r}); systemctl list-jobs:\n{jobs.stdout}"
                                   f"{jobs.stderr}\n{self.log_tail()}")
            res = self.run(["systemctl", "is-system-running", "--wait"], timeout=max(left, 1.0), check_alive=False)
            state = res.stdout.strip() or res.stderr.strip()
            if state in ("running", "degraded"):
                break
            time.sleep(0.5)          # dbus not up yet, or 'starting' cut short
        if state == "degraded":
            failed = self.run(["systemctl", "--failed", "--no-legend", "--plain"], timeout=30)
            raise RuntimeError(f"the guest booted degraded; systemctl --failed:\n{failed.stdout}{failed.stderr}")
        return state

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no nspawn log)"

    # -- commands -----------------------------------------------------------------------------

    def run(self, cmd: str | list[str], timeout: float = 600.0, cwd: str = "/root",
            check_alive: bool = True) -> GuestResult:
        """CMD (a bash -c string, or an argv) in the guest, in CWD, with a clean environment; on timeout
        the command's process group is killed and rc is -9."""
        if check_alive:
            assert self.proc is not None and self.proc.poll() is None, "the guest is not running"
        argv = ["bash", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        shown = cmd if isinstance(cmd, str) else shlex.join(cmd)
        full = ["nsenter", "-t", str(self.pid1), "-a", "/usr/bin/env", "-i", f"PATH={CLEAN_PATH}",
                "HOME=/root", "LANG=C.UTF-8", "USER=root", "LOGNAME=root", "/bin/sh", "-c",
                'cd "$0" && exec "$@"', cwd, *argv]
        started = time.monotonic()
        proc = subprocess.Popen(full, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)         # nsenter's session: it and what it forked
            out, err = proc.communicate(timeout=30)
            rc = -9
            err += f"\n(killed after the {timeout:.0f} s timeout)".encode()
        return GuestResult(rc, out.decode(errors="replace"), err.decode(errors="replace"),
                           time.monotonic() - started, shown)

    def ok(self, cmd: str | list[str], timeout: float = 600.0, cwd: str = "/root") -> GuestResult:
        res = self.run(cmd, timeout=timeout, cwd=cwd)
        assert res.rc == 0, res.describe()
        return res

    # -- stopping -----------------------------------------------------------------------------

    def poweroff(self, timeout: float = POWEROFF_TIMEOUT) -> int | None:
        """systemctl poweroff, then wait (bounded) for nspawn to exit; if it hangs, SIGTERM then SIGKILL
        that one PID. Returns nspawn's exit code (None when it had to be killed)."""
        if self.proc is None:
            return None
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            if self.pid1:                # no PID 1 found yet: nothing to ask, go straight to signals
                self.run(["systemctl", "poweroff"], timeout=30, check_alive=False)
                try:
                    rc = proc.wait(timeout=timeout)
                    self.pid1 = 0
                    return rc
                except subprocess.TimeoutExpired:
                    pass
            for sig in (signal.SIGTERM, signal.SIGKILL):   # SIGTERM: nspawn powers the container off
                if proc.poll() is None:
                    proc.send_signal(sig)
                    try:
                        proc.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        continue
            ns = _pid_ns(self.pid1) if self.pid1 else ""
            if ns and ns != _pid_ns(os.getpid()) and _comm(self.pid1) == "systemd":
                # nspawn killed: the container's PID 1 (nspawn's child) may live on; killing a PID
                # namespace's init ends everything in it.
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid1, signal.SIGKILL)
            self.pid1 = 0
            return None
        self.pid1 = 0
        return proc.returncode

    def reboot(self) -> tuple[int | None, str]:
        """Power off, wait for nspawn to exit, boot the same directory again."""
        rc = self.poweroff()
        self.pid1 = 0
        assert rc == 0, f"systemd-nspawn exited {rc} at poweroff:\n{self.log_tail()}"
        return rc, self.boot()

    def destroy(self) -> None:
        """Power off (or kill our nspawn) and remove the workdir with the copy (the nspawn log is kept as
        last-nspawn.log beside the workdir), unless something is still mounted in the copy."""
        try:
            self.poweroff()
        finally:
            mounts = _mounts_under(self.dir)
            if mounts:
                raise RuntimeError(f"not removing {self.dir}: still mounted there: {mounts}")
            shutil.rmtree(self.dir, ignore_errors=True)
            with contextlib.suppress(OSError):
                shutil.copyfile(self.log_path, self.workdir.parent / "last-nspawn.log")
            shutil.rmtree(self.workdir, ignore_errors=True)
            self._lock.close()


def _mounts_under(path: Path) -> list[str]:
    rows = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    return [m for m in rows if m == str(path) or m.startswith(str(path) + "/")]


def remove_stale_guests(guests: Path, min_age: float = 600.0) -> list[Path]:
    """Remove the workdirs under GUESTS that no living Guest holds (a run killed before its teardown
    leaves a rootfs copy of a gigabyte or more): their lock is free, nothing is mounted there, and a
    dir without a lock file is older than MIN_AGE (it may be one being set up right now)."""
    removed = []
    for work in sorted(guests.glob("guest-*")):
        lock_path = work / ".lock"
        if not lock_path.exists():
            if time.time() - work.stat().st_mtime < min_age:
                continue
            if not _mounts_under(work):
                shutil.rmtree(work, ignore_errors=True)
                removed.append(work)
            continue
        with open(lock_path) as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue                                  # a living guest's
            if not _mounts_under(work):
                shutil.rmtree(work, ignore_errors=True)
                removed.append(work)
    return removed
