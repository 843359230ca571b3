"""The host tier (DESIGN.md §11.7): a real Debian 12 booted with systemd as PID 1, as it comes.

``readme_host`` (module scope) is one booted guest (tests/rig/nspawn.py) for the whole module, whose
tests run in file order on it, each needing the ones before (``HostTier.after``):

- refuses to start when 80 or 443 are in use on this machine (the guest shares its network, so its
  nginx needs them): a failure under ``ABSSCTL_TEST_STRICT=1``, a skip otherwise, naming the holder;
- ensures the cached rootfs (``$ABSSCTL_TEST_CACHE/host/rootfs``), copies it, puts the checkout in
  ``/root/abssctl``, boots it and runs ``update-ca-certificates`` in it;
- at the end (also when a test failed) powers the guest off, kills only the nspawn PID it started if
  that hangs, and removes the copy.

The phases' times, the README command's time, the runtime abssctl chose and doctor's summary line
are written to ``$ABSSCTL_TEST_CACHE/host-report.txt`` and printed at the end of the run.

Developer knob, never set by tests/run (refused under ABSSCTL_TEST_STRICT=1):
``ABSSCTL_TEST_HOST_BASE=DIR`` boots a copy of DIR instead of the cached debootstrap tree, e.g. a
tree prepared by hand with node 22 + npm 10 and ``/etc/abssctl/config.toml``, to try the checks
against a real server before abssctl can set up a bare host itself.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from rig.e2e import PhaseTimings
from rig.https_client import HttpsClient
from rig.nspawn import (Guest, GuestResult, ReadmeCommand, ensure_rootfs, ports_held, readme_run_command,
                        remove_stale_guests)

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("ABSSCTL_TEST_CACHE") or REPO / ".cache" / "abssctl-test")
REPORT = CACHE / "host-report.txt"
TOOLS = {"systemd-nspawn": "systemd-container", "nsenter": "util-linux", "debootstrap": "debootstrap",
         "git": "git", "openssl": "openssl"}

_REPORT: dict[str, str] = {}
_PHASES = PhaseTimings()


class HostTier:
    """The booted guest, an HTTPS client for its nginx, the README command, and what was measured."""

    def __init__(self, guest: Guest, cmd: ReadmeCommand) -> None:
        self.guest = guest
        self.cmd = cmd
        self.client = HttpsClient("127.0.0.1", 443)
        self.passed: set[str] = set()
        self.memo: dict[str, Any] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        try:
            with _PHASES.phase(name):
                yield
        finally:
            _write_report()

    def note(self, key: str, value: str) -> None:
        _REPORT[key] = value
        _write_report()

    def after(self, *steps: str) -> None:
        """Fail at once (not skip: a strict run must go red) when an earlier step did not pass."""
        missing = [s for s in steps if s not in self.passed]
        if missing:
            pytest.fail(f"not run: it needs the earlier step(s) {', '.join(missing)}, which did not pass",
                        pytrace=False)

    def abssctl(self, *args: str, timeout: float = 900.0) -> GuestResult:
        return self.guest.run(["abssctl", *args], timeout=timeout)

    def ok(self, *args: str, timeout: float = 900.0) -> GuestResult:
        """abssctl ARGS must exit 0."""
        res = self.abssctl(*args, timeout=timeout)
        assert res.rc == 0, res.describe()
        return res

    def json(self, *args: str, timeout: float = 900.0) -> dict[str, Any]:
        """abssctl --json ARGS must exit 0 with an ok envelope; returns it."""
        res = self.abssctl("--json", *args, timeout=timeout)
        try:
            doc = json.loads(res.stdout)
        except ValueError:
            doc = None
        assert res.rc == 0 and isinstance(doc, dict) and doc.get("ok") is True, res.describe()
        return doc


def _write_report() -> None:
    lines = ["abssctl host tier (Debian 12 under systemd-nspawn, systemd as PID 1)"]
    lines += [f"{key}: {value}" for key, value in _REPORT.items()]
    if _PHASES.phases:
        lines.append("phases:")
        lines += [f"  {seconds:8.1f} s  {name}" for name, seconds in _PHASES.phases.items()]
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text("\n".join(lines) + "\n", encoding="utf-8")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print the host tier's report (nothing when the tier did not run)."""
    if not (_REPORT or _PHASES.phases) or not REPORT.is_file():
        return
    terminalreporter.section("host tier report")
    for line in REPORT.read_text(encoding="utf-8").splitlines():
        terminalreporter.write_line(line)


def _refuse(message: str) -> None:
    if os.environ.get("ABSSCTL_TEST_STRICT") == "1":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="module")
def readme_host() -> Iterator[HostTier]:
    if os.geteuid() != 0:
        pytest.skip("not root: no systemd-nspawn (the host tier boots a Debian 12 guest as root)")
    missing = [f"{tool} (apt-get install {pkg})" for tool, pkg in TOOLS.items() if not shutil.which(tool)]
    if missing:
        pytest.skip("missing: " + ", ".join(missing))
    held = ports_held((80, 443))
    if held:
        _refuse("the guest's nginx needs ports 80 and 443 of this machine, but "
                + "; ".join(f"port {p} is held by {who}" for p, who in sorted(held.items())))
    cmd = readme_run_command(REPO / "README.md")
    _REPORT.clear()
    _PHASES.phases.clear()
    REPORT.unlink(missing_ok=True)
    base_override = os.environ.get("ABSSCTL_TEST_HOST_BASE")
    if base_override:
        if os.environ.get("ABSSCTL_TEST_STRICT") == "1":
            pytest.fail("ABSSCTL_TEST_HOST_BASE is a developer knob; a strict run boots the debootstrap tree",
                        pytrace=False)
        base = Path(base_override)
        _REPORT["base"] = f"{base} (ABSSCTL_TEST_HOST_BASE: NOT a bare debootstrap host)"
    else:
        start = time.monotonic()
        base, built = ensure_rootfs(CACHE)
        _PHASES.phases["rootfs (debootstrap)" if built else "rootfs (cached)"] = round(time.monotonic() - start, 1)
        _REPORT["base"] = f"{base} (debootstrap --variant=minbase bookworm)"
    # Not under pytest's basetemp: a concurrent pytest run prunes old basetemps, and the copy is big.
    guests = CACHE / "host" / "guests"
    guests.mkdir(parents=True, exist_ok=True)
    remove_stale_guests(guests)
    guest = Guest(base, Path(tempfile.mkdtemp(prefix="guest-", dir=guests)), REPO)
    tier = HostTier(guest, cmd)
    try:
        with tier.phase("copy the rootfs and the checkout"):
            guest.prepare()
        with tier.phase("first boot"):
            guest.boot()
        with tier.phase("update-ca-certificates"):
            guest.ok("update-ca-certificates", timeout=120)
        yield tier
    finally:
        with tier.phase("poweroff and remove the copy"):
            guest.destroy()
