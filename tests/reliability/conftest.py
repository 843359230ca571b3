"""Reliability tier wiring: the kill -9 / Ctrl-C matrices the tests collect are printed at the end
of the run (each module marks its tests `reliability` itself)."""
from __future__ import annotations

import pytest

from reliability.rigs import MATRIX


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if not MATRIX.rows:
        return
    tr = terminalreporter
    for kind in sorted({r[0] for r in MATRIX.rows}):
        rows = [r for r in MATRIX.rows if r[0] == kind]
        tr.section(f"{kind} matrix (command x step boundary -> outcome)")
        width = max(len(r[1]) for r in rows)
        swidth = max(len(r[2]) for r in rows)
        for _kind, command, point, outcome in rows:
            tr.write_line(f"{command:<{width}}  {point:<{swidth}}  {outcome}")
        bad = [r for r in rows if not r[3].startswith("ok")]
        tr.write_line(f"{kind}: {len(rows)} points, {len(rows) - len(bad)} ok, {len(bad)} not ok")


# Known abssctl bugs this tier found and that are not fixed yet. Each case still runs and must fail
# (strict): when the bug is fixed, the xfail turns red and its entry here is removed.
KNOWN_BUGS = {
    "test_ctrl_c_at_every_step_boundary_exits_130_and_restores_the_tree[instance rename]":
        "no commit point: an interrupt after the irreversible tls.delete step still rolls back",
    "test_ctrl_c_at_every_step_boundary_exits_130_and_restores_the_tree[instance delete]":
        "no commit point: an interrupt after purge.delete still rolls back",
    "test_ctrl_c_at_every_step_boundary_exits_130_and_restores_the_tree[backup create]":
        "no commit point: an interrupt after the archive is indexed rolls nothing back but exits 130",
    "test_ctrl_c_at_every_step_boundary_exits_130_and_restores_the_tree[backup restore]":
        "no commit point: an interrupt after restore.cleanup reverts the registry but not the data",
    "test_kill_9_at_every_step_boundary_then_a_rerun_converges[instance rename]":
        "no commit point: recovery after tls.delete restores a vhost naming deleted files",
    "test_kill_9_at_every_step_boundary_then_a_rerun_converges[instance delete]":
        "no commit point: recovery after purge.delete cannot bring the data back",
    "test_kill_9_at_every_step_boundary_then_a_rerun_converges[backup create]":
        "no commit point: a completed backup survives its own rollback",
    "test_kill_9_at_every_step_boundary_then_a_rerun_converges[backup restore]":
        "no commit point: recovery after restore.cleanup reverts only the registry",
    "test_kill_9_inside_the_archive_write_leaves_nothing_behind_after_recovery":
        "the backup's temp archive and snapshot dir are not journaled, so recovery leaves them",
    "test_kill_9_around_vhost_changes_keeps_real_nginx_passing":
        "no commit point: rename recovery after tls.delete leaves nginx failing -t",
    "test_init_after_a_change_of_service_group_re_owns_every_registry":
        "init fixes the group of registry/ but not of the registry files",
    "test_no_private_key_bytes_enter_an_intent_journal":
        "tls install journals the key snapshots (0600, root-only, but still key bytes on disk)",
}


def pytest_collection_modifyitems(config, items):
    import pytest
    for item in items:
        reason = KNOWN_BUGS.get(item.name)
        if reason:
            item.add_marker(pytest.mark.xfail(strict=True, reason="abssctl bug: " + reason))
