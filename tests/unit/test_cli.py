"""§9/§10: the parser, global flags in every position, exit codes, --json envelopes, pipes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import abssctl

ROOT = Path(__file__).resolve().parents[2]


def every_command() -> list[list[str]]:
    root = abssctl.build_parser(None)
    return [[g, v] if v else [g] for g, v, _p in abssctl._command_table(root)]


@pytest.mark.parametrize("words", [[]] + every_command(), ids=lambda w: " ".join(w) or "root")
def test_every_help_renders(words: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert abssctl.main([*words, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: abssctl")
    if words:
        assert " ".join(words) in out.splitlines()[0]


def test_version_from_source(capsys: pytest.CaptureFixture[str]) -> None:
    assert abssctl.main(["--version"]) == 0
    assert capsys.readouterr().out == f"abssctl {abssctl.__version__} (source)\n"
    assert abssctl.main(["-V"]) == 0


@pytest.mark.parametrize("position", ["before", "after"])
@pytest.mark.parametrize("words", [["config", "show"], ["ports", "list"], ["instance", "list"],
                                   ["history"], ["config", "path"]])
def test_json_in_any_position(sandbox, words: list[str], position: str) -> None:
    argv = ["--json", *words] if position == "before" else [*words, "--json"]
    got = sandbox.run(*argv)
    assert got.rc == 0, got.err
    assert got.doc is not None and got.doc["ok"] is True
    assert got.out.count("\n") >= 1 and json.loads(got.out) == got.doc


@pytest.mark.parametrize("flag", ["--dry-run", "-y", "--yes", "--debug", "-q", "--quiet", "--no-color",
                                  "--lock-timeout=5"])
@pytest.mark.parametrize("position", ["before", "after"])
def test_each_global_flag_in_each_position(sandbox, flag: str, position: str) -> None:
    argv = [flag, "--json", "ports", "list"] if position == "before" else ["ports", "list", "--json", flag]
    got = sandbox.run(*argv)
    assert got.rc == 0, got.err
    assert got.doc["ok"] is True and got.doc["range"] == {"base": 5006, "max": 5999}


def test_global_flag_values_reach_the_context(sandbox) -> None:
    got = sandbox.run("config", "show", "--json", "--lock-timeout", "7")
    assert got.doc["config"]["locks"]["timeout"] == 7.0
    assert got.doc["sources"]["locks.timeout"] == "flag:--lock-timeout"


@pytest.mark.parametrize("argv", [["bogus"], ["config", "nosuch"], ["ports", "list", "--nosuch"],
                                  ["history", "-n", "0"], ["history", "-n", "x"],
                                  ["instance", "show", "Bad_Name"], ["--lock-timeout", "-1", "ports", "list"],
                                  ["--lock-timeout", "99999", "ports", "list"], ["completion", "tcsh"], []])
def test_usage_errors_exit_2_with_a_json_error(sandbox, argv: list[str]) -> None:
    got = sandbox.run("--json", *argv)
    assert got.rc == 2
    assert got.doc["ok"] is False and got.doc["error"]["kind"] == "UsageError"
    assert "Traceback" not in got.err and got.err.startswith("abssctl: error:")


def test_not_found_is_exit_2(sandbox) -> None:
    got = sandbox.run("--json", "instance", "show", "alice")
    assert (got.rc, got.doc["error"]["kind"]) == (2, "NotFound")


def test_internal_error_exits_70_without_traceback(sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(ctx: object) -> None:
        raise ZeroDivisionError("bug")
    monkeypatch.setattr(abssctl, "op_ports_list", boom)
    got = sandbox.run("ports", "list")
    assert got.rc == 70
    assert "internal error; rerun with --debug and report it" in got.err and "Traceback" not in got.err
    got = sandbox.run("ports", "list", "--debug")
    assert got.rc == 70 and "Traceback" in got.err and "ZeroDivisionError" in got.err


def test_keyboard_interrupt_exits_130(sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(ctx: object) -> None:
        raise KeyboardInterrupt
    monkeypatch.setattr(abssctl, "op_ports_list", interrupted)
    got = sandbox.run("--json", "ports", "list")
    assert got.rc == 130 and got.doc["error"]["kind"] == "Interrupted"


def test_nothing_ever_exits_1(sandbox) -> None:
    for argv in (["config", "show"], ["nope"], ["--config", "/nonexistent.toml", "config", "show"]):
        assert sandbox.run(*argv).rc != 1


def test_closed_stdout_keeps_the_exit_code(sandbox) -> None:
    """`abssctl man | head -1`: the reader goes away; no traceback, exit 0."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(f"{sys.executable} {ROOT / 'abssctl.py'} --config {sandbox.config} man | head -1; "
                          "echo \"rc=${PIPESTATUS[0]}\"", shell=True, executable="/bin/bash",
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.stdout.splitlines()[0].startswith(".TH ABSSCTL 1")
    assert proc.stdout.strip().endswith("rc=0")
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr


def test_completion_scripts_name_every_command(sandbox) -> None:
    for shell in ("bash", "zsh", "fish"):
        got = sandbox.run("completion", shell)
        assert got.rc == 0
        for words in every_command():
            for word in words:
                assert word in got.out, (shell, word)
    bash = sandbox.run("completion", "bash").out
    proc = subprocess.run(["bash", "-n"], input=bash, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


def test_bash_completion_completes_verbs_and_names(sandbox, tmp_path: Path) -> None:
    script = tmp_path / "abssctl.bash"
    script.write_text(sandbox.run("completion", "bash").out)
    probe = f"""source {script}
COMP_WORDS=(abssctl config s); COMP_CWORD=2; _abssctl; echo "${{COMPREPLY[*]}}"
COMP_WORDS=(abssctl por); COMP_CWORD=1; _abssctl; echo "${{COMPREPLY[*]}}"
"""
    proc = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, timeout=30)
    assert proc.stdout.splitlines() == ["show", "ports"]


def test_man_page_covers_every_command_and_exit_status(sandbox) -> None:
    page = sandbox.run("man").out
    assert page.startswith(".TH ABSSCTL 1")
    for section in ("NAME", "SYNOPSIS", "DESCRIPTION", "GLOBAL OPTIONS", "COMMANDS", "EXIT STATUS",
                    "ENVIRONMENT", "FILES", "SEE ALSO"):
        assert f".SH {section}" in page
    for words in every_command():
        assert ".SS abssctl " + " ".join(words).replace("-", "\\-") in page
    man = subprocess.run(["man", "-l", "-"], input=page, capture_output=True, text=True, timeout=30) \
        if os.path.exists("/usr/bin/man") else None
    if man is not None:
        assert man.returncode == 0, man.stderr


def test_help_lists_exactly_the_working_groups(capsys: pytest.CaptureFixture[str]) -> None:
    abssctl.main(["--help"])
    out = capsys.readouterr().out
    for group in abssctl.GROUPS:
        assert f"    {group}" in out
    assert "__complete" not in out


def test_complete_lists_registered_names(sandbox) -> None:
    assert sandbox.run("init").rc == 0
    reg = sandbox.paths["state_dir"] / "registry" / "instances.json"
    doc = json.loads(reg.read_text())
    doc["instances"] = {"bob": {"name": "bob"}, "alice": {"name": "alice"}}
    reg.write_text(json.dumps(doc))
    got = sandbox.run("__complete", "instances")
    assert got.out.splitlines() == ["alice", "bob"]
