"""§8a: plans, undo on failure and Ctrl-C, the intent journal and recovery after kill -9."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import abssctl

ROOT = Path(__file__).resolve().parents[2]


def make_ctx(sandbox) -> abssctl.Context:
    cfg, problems = abssctl.load_config(str(sandbox.config), {}, {})
    assert problems == []
    out = abssctl.Output(json_mode=True, quiet=True, debug=False, color=False,
                         stdout=open(os.devnull, "w"), stderr=open(os.devnull, "w"))
    return abssctl.Context(config=cfg, out=out, dry_run=False, assume_yes=True, interactive=False,
                           lock_timeout=5, command="test")


def touch_plan(tmp: Path, fail_at: int | None, exc: BaseException | None = None) -> abssctl.Plan:
    plan = abssctl.Plan("test")
    for n in range(3):
        path = tmp / f"f{n}"

        def do(p: Path = path, n: int = n) -> None:
            p.write_text("x")
            if n == fail_at:
                raise exc or abssctl.ProviderError("step failed")
        plan.add("fs.write", f"write {path}", str(path), do, abssctl.UndoAction("remove_path", path=str(path)))
    return plan


def test_failure_undoes_every_started_step_in_reverse(sandbox, tmp_path: Path) -> None:
    ctx = make_ctx(sandbox)
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(abssctl.ProviderError):
        abssctl.apply(ctx, touch_plan(work, fail_at=1), {})
    assert list(work.iterdir()) == []             # f1 was half-done and still undone
    assert os.listdir(ctx.paths.journal_dir) == []


def test_ctrl_c_undoes_and_reraises(sandbox, tmp_path: Path) -> None:
    ctx = make_ctx(sandbox)
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(KeyboardInterrupt):
        abssctl.apply(ctx, touch_plan(work, fail_at=2, exc=KeyboardInterrupt()), {})
    assert list(work.iterdir()) == []


def test_success_leaves_no_journal_and_reports_steps(sandbox, tmp_path: Path) -> None:
    ctx = make_ctx(sandbox)
    work = tmp_path / "work"
    work.mkdir()
    steps = abssctl.apply(ctx, touch_plan(work, fail_at=None), {})
    assert [s["step"] for s in steps] == ["fs.write"] * 3
    assert sorted(p.name for p in work.iterdir()) == ["f0", "f1", "f2"]
    assert os.listdir(ctx.paths.journal_dir) == []


def test_observers_see_every_step_boundary(sandbox, tmp_path: Path, monkeypatch) -> None:
    seen: list[tuple[str, str]] = []
    monkeypatch.setattr(abssctl, "STEP_OBSERVERS", [lambda step, phase: seen.append((step.target[-2:], phase))])
    ctx = make_ctx(sandbox)
    work = tmp_path / "work"
    work.mkdir()
    abssctl.apply(ctx, touch_plan(work, fail_at=None), {})
    assert seen == [("f0", "before"), ("f0", "after"), ("f1", "before"), ("f1", "after"),
                    ("f2", "before"), ("f2", "after")]


def test_a_failing_undo_is_reported_and_the_cause_kept(sandbox, tmp_path: Path) -> None:
    ctx = make_ctx(sandbox)
    plan = abssctl.Plan("test")
    plan.add("x.one", "one", "t", lambda: None, abssctl.UndoAction("no_such_kind"))

    def fail() -> None:
        raise abssctl.ProviderError("second failed")
    plan.add("x.two", "two", "t", fail, None)
    with pytest.raises(abssctl.ProviderError) as err:
        abssctl.apply(ctx, plan, {})
    assert "undo failed for: no_such_kind" in " ".join(getattr(err.value, "__notes__", []))


KILLER = """
import os, sys
sys.path.insert(0, {root!r})
import abssctl
def observer(step, phase):
    if phase == "after":
        observer.count += 1
        if observer.count == {k}:
            os.kill(os.getpid(), 9)
observer.count = 0
abssctl.STEP_OBSERVERS.append(observer)
sys.exit(abssctl.main(["--config", {config!r}, "-q", "init"]))
"""


@pytest.mark.parametrize("k", [1, 5, 12, 17])
def test_kill_9_mid_init_is_rolled_back_by_the_next_run(sandbox, k: int) -> None:
    clean = sandbox.tree()
    proc = subprocess.run([sys.executable, "-c", KILLER.format(root=str(ROOT), k=k, config=str(sandbox.config))],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL
    journal_dir = sandbox.paths["state_dir"] / "journal"
    journals = list(journal_dir.iterdir())
    assert len(journals) == 1
    doc = json.loads(journals[0].read_text())
    assert doc["command"] == "init" and len(doc["done"]) == k
    got = sandbox.run("--json", "init")
    assert got.rc == 0, got.err
    assert "recover: rolling back init" in got.err
    assert list(journal_dir.iterdir()) == []
    # the converged tree equals what one clean init gives
    fresh = sandbox.tree()
    logs = {p for p in fresh if p.startswith("var/log/") or p.endswith(".lock") or p.endswith(".prev")}
    assert {p for p in fresh if p not in logs and p not in clean}
    assert sandbox.run("--json", "init").doc["changed"] is False


def test_sigterm_during_apply_undoes_and_exits_130(sandbox) -> None:
    script = KILLER.replace("os.kill(os.getpid(), 9)", "os.kill(os.getpid(), 15)")
    before = sandbox.tree()
    proc = subprocess.run([sys.executable, "-c", script.format(root=str(ROOT), k=3, config=str(sandbox.config))],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 130, proc.stderr
    assert "rolling back, please wait" in proc.stderr
    after = sandbox.tree()
    new = {p for p in after if p not in before}
    # only the lock, the (emptied) journal dir and the log remain: every created path was undone
    assert all(p.startswith(("run", "var")) for p in new), new
    assert not [p for p in new if "registry" in p or p.startswith("srv")]
    records = [json.loads(x) for x in (sandbox.paths["log_dir"] / "operations.jsonl").read_text().splitlines()]
    assert records[-1]["result"] == "interrupted" and records[-1]["exit_code"] == 130


def trash_plan(tmp: Path) -> abssctl.Plan:
    """A reversible change, then a cleanup past the point of no return (two trash dirs to delete)."""
    plan = abssctl.Plan("test")
    made = tmp / "made"
    trashes = [tmp / ".trash-a-op", tmp / ".trash-b-op"]
    for t in trashes:
        t.mkdir()
        (t / "content").write_text("old")
    plan.cleanup("trash.delete", "delete the trash", str(tmp),
                 abssctl.UndoAction("remove_tree", paths=[str(t) for t in trashes]))
    plan.add("fs.write", "make a file", str(made), lambda: made.write_text("new"),   # added after the cleanup,
             abssctl.UndoAction("remove_path", path=str(made)))                       # runs before it
    return plan


def test_cleanup_steps_run_last_and_the_plan_says_they_have_no_undo(sandbox, tmp_path: Path) -> None:
    ctx = make_ctx(sandbox)
    work = tmp_path / "work"
    work.mkdir()
    plan = trash_plan(work)
    assert [s["step"] for s in plan.as_list()] == ["fs.write", "trash.delete"]
    assert plan.as_list()[1]["cleanup"] is True and "cleanup" not in plan.as_list()[0]
    assert "no undo: past the point of no return" in plan.text()[2]
    steps = abssctl.apply(ctx, plan, {})
    assert [(s["step"], s["status"]) for s in steps] == [("fs.write", "done"), ("trash.delete", "done")]
    assert sorted(p.name for p in work.iterdir()) == ["made"]


def test_ctrl_c_past_the_point_of_no_return_finishes_instead_of_undoing(sandbox, tmp_path: Path,
                                                                          monkeypatch) -> None:
    def interrupt(step, phase):
        if step.id == "trash.delete" and phase == "before":
            os.kill(os.getpid(), signal.SIGINT)
    monkeypatch.setattr(abssctl, "STEP_OBSERVERS", [interrupt])
    ctx = make_ctx(sandbox)
    work = tmp_path / "work"
    work.mkdir()
    abssctl.apply(ctx, trash_plan(work), {})                # no KeyboardInterrupt escapes
    assert sorted(p.name for p in work.iterdir()) == ["made"]
    assert os.listdir(ctx.paths.journal_dir) == []


KILL_AT_CLEANUP = """
import os, sys
sys.path.insert(0, {root!r})
import abssctl
from pathlib import Path
sys.path.insert(0, {tests!r})
from unit.test_plan import make_ctx, trash_plan
class Sb: config = {config!r}
def observer(step, phase):
    if step.id == "trash.delete" and phase == "before":
        os.kill(os.getpid(), 9)
abssctl.STEP_OBSERVERS.append(observer)
abssctl.apply(make_ctx(Sb), trash_plan(Path({tmp!r})), {{}})
"""


def test_kill_9_past_the_point_of_no_return_is_finished_by_recovery(sandbox, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    proc = subprocess.run([sys.executable, "-c", KILL_AT_CLEANUP.format(
        root=str(ROOT), tests=str(ROOT / "tests"), config=str(sandbox.config), tmp=str(work))],
        capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert sorted(p.name for p in work.iterdir()) == [".trash-a-op", ".trash-b-op", "made"]
    [journal] = list((sandbox.paths["state_dir"] / "journal").iterdir())
    assert json.loads(journal.read_text())["cleanup"][0]["kind"] == "remove_tree"
    got = sandbox.run("--json", "init")
    assert got.rc == 0, got.err
    assert "recover: finishing test" in got.err
    assert sorted(p.name for p in work.iterdir()) == ["made"]       # finished, not rolled back
    assert not journal.exists()
