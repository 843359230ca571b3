"""Ctrl-C at every step boundary (DESIGN §5.2, P4): SIGINT to the child from an observer exits 130
after the undo, and the tree equals the starting tree, modulo the ops log, lock files and `.prev`
registry copies (and the runtime files and safety backups rigs.rollback_problems() names); the
units the fake systemd runs are as they were."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from reliability.rigs import MATRIX, RHost, rhost, rollback_problems, run_child, snapshot_state, steps_of  # noqa: F401
from reliability.scenarios import SCENARIOS, Scenario

pytestmark = pytest.mark.reliability


def interrupt_matrix(h: RHost, sc: Scenario) -> list[str]:
    ctx: dict = {}
    sc.setup(h, ctx)
    h.save()
    argv = ["--json", "-q", *sc.argv(ctx)]
    steps = steps_of(h.sb, argv)
    failures = []
    for k in range(len(steps) + 1):
        h.restore()
        before = snapshot_state(h.sb)
        point = f"{k:2d} {'before ' + steps[0] if k == 0 else 'after ' + steps[k - 1]}"
        proc, note = run_child(h.sb, "int", k, argv)
        problems = []
        if proc.returncode != 130:
            problems.append(f"exit {proc.returncode}, not 130: {proc.stderr.strip()[-500:]}")
        else:
            try:
                doc = json.loads(proc.stdout)
                if doc.get("error", {}).get("kind") != "Interrupted":
                    problems.append(f"JSON error kind {doc.get('error')}")
            except ValueError:
                problems.append(f"stdout is not one JSON document: {proc.stdout[:200]!r}")
            if "Traceback" in proc.stderr:
                problems.append("traceback on stderr")
        problems += rollback_problems(h.sb, before, sc.kept_aside)
        log = Path(h.sb.paths["log_dir"]) / "operations.jsonl"
        records = [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []
        if not records or records[-1].get("result") != "interrupted" or records[-1].get("exit_code") != 130:
            problems.append(f"ops log does not record the interruption: {records[-1:]}")
        outcome = "ok: exit 130, tree as before" if not problems else "FAIL: " + "; ".join(problems)
        MATRIX.add("Ctrl-C", sc.command, point, outcome)
        if problems:
            failures.append(f"{point}: {'; '.join(problems)}")
    return failures


@pytest.mark.parametrize("command", list(SCENARIOS))
def test_ctrl_c_at_every_step_boundary_exits_130_and_restores_the_tree(rhost: RHost, command: str) -> None:
    failures = interrupt_matrix(rhost, SCENARIOS[command])
    assert not failures, f"{command}:\n" + "\n".join(failures)
