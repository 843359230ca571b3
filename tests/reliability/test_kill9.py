"""kill -9 at every step boundary (DESIGN §7 Reliability, P4): after each kill no state or config
file is half-written, nginx -t passes, a journal is left. Before the point of no return the next
mutating command (`init` here; doctor --fix does the same) rolls the journal back to the starting
state, and a re-run of the same command then converges to consistent registries, with no orphan or
corrupt backup. Past it (a cleanup step of rename, delete --purge-data or restore), the recovery
finishes the cleanup instead: the state is the completed one, and a re-run is a no-op or exits 2
NotFound (the old name is gone).

Boundary 0 is "before the first step" (the journal exists, nothing was done); boundary k is "after
step k". Two extra rows kill *inside* a step, through a tool that SIGKILLs its parent: zstd during
the archive write of `backup create`, npm during `npm install` of `version install`.
"""
from __future__ import annotations

import signal
import textwrap
from pathlib import Path

import pytest

from reliability.rigs import (MATRIX, RHost, boundary_matrix, consistency_problems,  # noqa: F401
                              problems_after_kill, registry, rhost, rollback_problems, run_child,
                              snapshot_state, steps_of)
from reliability.scenarios import SCENARIOS, Scenario, seed, alice_data

pytestmark = pytest.mark.reliability


def converge(h: RHost, sc: Scenario, ctx: dict, argv: list[str]) -> list[str]:
    res = h.run("--json", *argv)
    if res.rc != 0 or not isinstance(res.doc, dict):
        return [f"re-run exits {res.rc}: {res.err.strip()[-600:]}"]
    problems = consistency_problems(h.sb, kept_dirs=sc.kept_dirs, kept_aside=sc.kept_aside)
    return problems + sc.verify(h, ctx, res)


def recover(h: RHost, before: dict, sc: Scenario) -> list[str]:
    """`init` (idempotent, mutating) recovers the dead journal; the state is then the starting one."""
    res = h.run("--json", "init")
    if res.rc != 0:
        return [f"recovery by init exits {res.rc}: {res.err.strip()[-600:]}"]
    if "recover: rolling back" not in res.err:
        return ["init did not say it rolled back the dead journal"]
    return [f"after recovery: {p}" for p in rollback_problems(h.sb, before, sc.kept_aside)]


def finish(h: RHost, sc: Scenario, ctx: dict, argv: list[str]) -> list[str]:
    """Past the point of no return: `init` finishes the cleanup; the state is the completed one, and a
    re-run changes nothing or finds its target gone."""
    res = h.run("--json", "init")
    if res.rc != 0:
        return [f"recovery by init exits {res.rc}: {res.err.strip()[-600:]}"]
    if "recover: finishing" not in res.err:
        return ["init did not say it finished the dead journal's cleanup"]
    problems = [f"after recovery: {p}" for p in
                consistency_problems(h.sb, kept_dirs=sc.kept_dirs, kept_aside=sc.kept_aside) + sc.verify(h, ctx, None)]
    again = h.run("--json", *argv)
    if again.rc != 0 and not (again.rc == 2 and (again.doc or {}).get("error", {}).get("kind") == "NotFound"):
        problems.append(f"re-run exits {again.rc}: {again.err.strip()[-600:]}")
    return problems + consistency_problems(h.sb, kept_dirs=sc.kept_dirs, kept_aside=sc.kept_aside)


def kill_matrix(h: RHost, sc: Scenario) -> list[str]:
    def probe(ctx: dict, argv: list[str], k: int, before: dict, committed: bool) -> tuple[list[str], str]:
        proc, note = run_child(h.sb, "kill", k, ["--json", "-q", *argv])
        if proc.returncode != -signal.SIGKILL:
            problems = [f"child was not killed (rc {proc.returncode}; the re-built plan differs?): "
                        f"{proc.stderr.strip()[-400:]}"]
        else:
            problems = problems_after_kill(h.sb, k, sc.command)
            if committed:
                problems += finish(h, sc, ctx, argv)
            else:
                problems += recover(h, before, sc)
                problems += converge(h, sc, ctx, argv)
        return problems, ("ok: journal left, recovery finished the cleanup, state complete" if committed
                          else "ok: journal left, recovery restored the start, re-run converged")
    return boundary_matrix(h, sc, "kill -9", probe)


@pytest.mark.parametrize("command", list(SCENARIOS))
def test_kill_9_at_every_step_boundary_then_a_rerun_converges(rhost: RHost, command: str) -> None:
    failures = kill_matrix(rhost, SCENARIOS[command])
    assert not failures, f"{command}:\n" + "\n".join(failures)


# -- inside a step ------------------------------------------------------------------------------

KILL_PARENT = """#!{python} -S
import os, signal, sys
{body}
os.kill(os.getppid(), signal.SIGKILL)
sys.exit(1)
"""


def test_kill_9_inside_the_archive_write_leaves_nothing_behind_after_recovery(rhost: RHost) -> None:
    h = rhost
    sc = SCENARIOS["backup create"]
    ctx: dict = {}
    sc.setup(h, ctx)
    (alice_data(h) / "user-files" / "big.blob").write_bytes(b"\x17" * 3_000_000)
    killer = h.root / "bin" / "zstd-killer"
    killer.write_text(KILL_PARENT.format(python="/usr/bin/python3",
                                         body="sys.stdin.buffer.read(1 << 20)"))
    killer.chmod(0o755)
    real = h.sb.commands["zstd"]
    before = snapshot_state(h.sb)
    h.sb.configure("commands", zstd=[str(killer)])
    argv = ["backup", "create", "alice", "-m", "killed", "--compression", "zstd"]
    proc, _note = run_child(h.sb, "none", -1, ["--json", "-q", *argv])
    h.sb.configure("commands", zstd=real)
    problems = [] if proc.returncode == -signal.SIGKILL else [f"not killed: rc {proc.returncode} {proc.stderr[-300:]}"]
    partial = [p for p in (h.root / "srv/abssctl/backups/alice").iterdir() if ".abssctl-tmp-" in p.name]
    if not partial:
        problems.append("the kill came too late: no partial archive to recover from")
    problems += problems_after_kill(h.sb, 1, "backup create")
    problems += recover(h, before, sc)
    problems += converge(h, sc, ctx, argv)
    MATRIX.add("kill -9", "backup create", " - inside backup.write (zstd)",
               "ok: partial archive removed by recovery" if not problems else "FAIL: " + "; ".join(problems))
    assert not problems, problems


def test_kill_9_inside_npm_install_leaves_no_staging_dir(rhost: RHost) -> None:
    h = rhost
    sc = SCENARIOS["version install"]
    fake_npm = h.sb.commands["npm"][0]
    killer = h.root / "bin" / "npm-killer"
    killer.write_text(KILL_PARENT.format(python="/usr/bin/python3", body=textwrap.dedent(f"""
        if "install" not in sys.argv:
            os.execv({fake_npm!r}, [{fake_npm!r}, *sys.argv[1:]])
        prefix = sys.argv[sys.argv.index("--prefix") + 1]
        os.makedirs(os.path.join(prefix, "node_modules", "half-installed"), exist_ok=True)
        """)))
    killer.chmod(0o755)
    before = snapshot_state(h.sb)
    h.sb.configure("commands", npm=[str(killer)])
    argv = ["version", "install", "26.8.1"]
    proc, _note = run_child(h.sb, "none", -1, ["--json", "-q", *argv])
    h.sb.configure("commands", npm=[fake_npm])
    problems = [] if proc.returncode == -signal.SIGKILL else [f"not killed: rc {proc.returncode} {proc.stderr[-300:]}"]
    staging = [p.name for p in (h.root / "srv/abssctl/versions").iterdir() if p.name.startswith(".staging-")]
    if not staging:
        problems.append("no staging dir: the kill did not land inside npm install")
    problems += problems_after_kill(h.sb, 3, "version install")
    problems += recover(h, before, sc)
    problems += converge(h, sc, {}, argv)
    MATRIX.add("kill -9", "version install", " - inside npm.install",
               "ok: staging dir removed by recovery" if not problems else "FAIL: " + "; ".join(problems))
    assert not problems, problems


def test_delete_purge_data_with_its_final_backup_succeeds(rhost: RHost) -> None:
    """DESIGN §4.5.5: with --purge-data, delete first takes a final pre-delete backup, then removes
    the instance dir. Found here: the backup step runs after the instance was unregistered."""
    h = rhost
    h.ok("instance", "create", "alice", "--domain", "alice.example.org")
    res = h.run("--json", "--yes", "instance", "delete", "alice", "--purge-data")
    assert res.rc == 0, f"rc={res.rc}\n{res.out}\n{res.err}"
    reasons = [b["reason"] for b in registry(h.sb, "backups")["backups"].values()]
    assert reasons == ["pre-delete"], reasons


@pytest.mark.parametrize("after", ["current.swap", "alice.stop", "alice.backup", "unit.write"])
def test_kill_9_of_a_switch_then_doctor_fix_converges(rhost: RHost, after: str) -> None:
    """Issue 7: kill -9 of `version switch` after the pre-switch backup, after the swap of current,
    and mid-restart (alice stopped; her unit re-rendered for the new version). `doctor --fix` rolls
    the journal back to the starting state (current and alice on 25.6.0, alice running); a re-run
    of the switch then converges."""
    h = rhost
    sc = SCENARIOS["version switch"]
    ctx: dict = {}
    sc.setup(h, ctx)
    h.save()
    argv = sc.argv(ctx)
    steps = steps_of(h.sb, ["--json", "-q", *argv])
    ids = [s for s, _cleanup in steps]
    assert after in ids, ids
    h.restore()
    before = snapshot_state(h.sb)
    k = ids.index(after) + 1
    proc, _note = run_child(h.sb, "kill", k, ["--json", "-q", *argv])
    problems = [] if proc.returncode == -signal.SIGKILL else [f"not killed: rc {proc.returncode} {proc.stderr[-300:]}"]
    problems += problems_after_kill(h.sb, k, sc.command)
    diagnosis = h.run("--json", "doctor", "--only", "state")
    journal = [p for p in (diagnosis.doc or {}).get("probes", []) if p["id"] == "state.journal"]
    if not journal or journal[0]["status"] != "fail" or "rolls it back" not in journal[0]["hint"]:
        problems.append(f"doctor does not report the dead journal: {journal}")
    fixed = h.run("--json", "--yes", "doctor", "--fix")
    if "recover: rolling back version switch" not in fixed.err:
        problems.append(f"doctor --fix did not roll the switch back: rc {fixed.rc} {fixed.err[-400:]}")
    problems += [f"after doctor --fix: {p}" for p in rollback_problems(h.sb, before, sc.kept_aside)]
    problems += converge(h, sc, ctx, argv)
    MATRIX.add("kill -9", "version switch", f"{k:2d} after {after} (doctor --fix)",
               "ok: doctor --fix restored the start, re-run converged" if not problems
               else "FAIL: " + "; ".join(problems))
    assert not problems, problems
