"""Ctrl-C at every step boundary (DESIGN §5.2, P4).

Before the point of no return (every reversible step): SIGINT to the child from an observer exits
130 after the undo, and the tree equals the starting tree, modulo the ops log, lock files and `.prev`
registry copies (and the runtime files and safety backups rigs.rollback_problems() names); the units
the fake systemd runs are as they were.

Past it (the cleanup steps of rename, delete --purge-data and restore, DESIGN §2.3 Plan): the change
already stands, so the interrupt waits for the cleanup, the command says so and exits 0, and the
state is the completed one: consistent registries, no leftovers, and what the scenario must produce.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from reliability.rigs import (RHost, boundary_matrix, consistency_problems, rhost,  # noqa: F401
                              rollback_problems, run_child)
from reliability.scenarios import SCENARIOS, Scenario

pytestmark = pytest.mark.reliability


def _json_doc(stdout: str, problems: list[str]) -> dict | None:
    try:
        return json.loads(stdout)
    except ValueError:
        problems.append(f"stdout is not one JSON document: {stdout[:200]!r}")
        return None


def interrupt_matrix(h: RHost, sc: Scenario) -> list[str]:
    def probe(ctx: dict, argv: list[str], k: int, before: dict, committed: bool) -> tuple[list[str], str]:
        proc, note = run_child(h.sb, "int", k, ["--json", "-q", *argv])
        problems = []
        if "Traceback" in proc.stderr:
            problems.append("traceback on stderr")
        if committed:
            want_rc, want_result = 0, "ok"
            doc = _json_doc(proc.stdout, problems)
            if proc.returncode != 0:
                problems.append(f"exit {proc.returncode}, not 0: {proc.stderr.strip()[-500:]}")
            elif doc is not None:
                if doc.get("ok") is not True:
                    problems.append(f"JSON is not ok: {doc}")
                if "after the point of no return" not in proc.stderr:
                    problems.append("the command did not say the interrupt came past the point of no return")
                problems += consistency_problems(h.sb, kept_dirs=sc.kept_dirs, kept_aside=sc.kept_aside)
                problems += sc.verify(h, ctx, SimpleNamespace(rc=proc.returncode, doc=doc))
        else:
            want_rc, want_result = 130, "interrupted"
            if proc.returncode != 130:
                problems.append(f"exit {proc.returncode}, not 130: {proc.stderr.strip()[-500:]}")
            else:
                doc = _json_doc(proc.stdout, problems)
                if doc is not None and doc.get("error", {}).get("kind") != "Interrupted":
                    problems.append(f"JSON error kind {doc.get('error')}")
            problems += rollback_problems(h.sb, before, sc.kept_aside)
        log = Path(h.sb.paths["log_dir"]) / "operations.jsonl"
        records = [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []
        if not records or records[-1].get("result") != want_result or records[-1].get("exit_code") != want_rc:
            problems.append(f"ops log does not record result {want_result}: {records[-1:]}")
        return problems, ("ok: cleanup finished, exit 0, completed state" if committed
                          else "ok: exit 130, tree as before")
    return boundary_matrix(h, sc, "Ctrl-C", probe)


@pytest.mark.parametrize("command", list(SCENARIOS))
def test_ctrl_c_at_every_step_boundary_rolls_back_or_finishes(rhost: RHost, command: str) -> None:
    failures = interrupt_matrix(rhost, SCENARIOS[command])
    assert not failures, f"{command}:\n" + "\n".join(failures)
