"""Shared pytest wiring: the rig fixtures live in tests/rig/ and are imported here."""
from __future__ import annotations

import os

import pytest

from rig.fakes import *  # noqa: F401,F403  (sandbox fixture, fake tools on PATH)
from rig.nginx_sandbox import *  # noqa: F401,F403  (real_nginx fixture)
from rig.systemd_sandbox import *  # noqa: F401,F403  (systemd_sandbox fixture)
from rig.npm_registry import *  # noqa: F401,F403  (npm_registry fixture)
from rig.e2e import *  # noqa: F401,F403  (node22, real server versions built once per run)
from rig.host import *  # noqa: F401,F403  (abssctl_host: real nginx + systemctl + npm registry)
from rig.acme import *  # noqa: F401,F403  (pebble, acme_host: a loopback ACME server for certbot)


@pytest.fixture(autouse=True)
def _keep_umask():
    """abssctl.main() sets umask 027 for mutating commands; in-process tests must not leak it."""
    old = os.umask(0o022)
    os.umask(old)
    yield
    os.umask(old)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--update-golden", action="store_true",
                     help="rewrite tests/golden/ from the current templates")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Under tests/run as root (ABSSCTL_TEST_STRICT=1) a skipped test fails the run."""
    if os.environ.get("ABSSCTL_TEST_STRICT") != "1":
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = len(reporter.stats.get("skipped", [])) if reporter else 0
    if skipped and session.exitstatus == 0:
        reporter.write_line(f"abssctl tests: {skipped} skipped test(s) fail a strict run "
                            "(a component the tier needs is missing)", red=True)
        session.exitstatus = 1
