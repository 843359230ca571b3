"""tests/fleet (issue 21): every abssctl task of the role follows the one pattern that makes Ansible's
changed, failed and check mode mean what abssctl says; the plays roll upgrades one host at a time."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

FLEET = Path(__file__).resolve().parents[2] / "tests" / "fleet"
TASK_FILES = sorted((FLEET / "roles" / "abssctl" / "tasks").glob("*.yml"))


def _tasks(path: Path) -> list[str]:
    """The top-level task blocks of a task file (each starts with '- name:' in column 0)."""
    text = path.read_text(encoding="utf-8")
    return [b for b in re.split(r"(?m)^(?=- name: )", text) if b.startswith("- name: ")]


def _command_tasks() -> list[tuple[str, str]]:
    return [(f"{p.name}: {b.splitlines()[0][8:]}", b) for p in TASK_FILES for b in _tasks(p)
            if "ansible.builtin.command:" in b]


def test_the_role_has_the_abssctl_tasks() -> None:
    names = " | ".join(n for n, _b in _command_tasks())
    for what in ("quickstart", "version', 'install", "backup', 'create", "set-version"):
        assert any(what in b for _n, b in _command_tasks()), f"no task runs {what}: {names}"


@pytest.mark.parametrize("name,block", [pytest.param(n, b, id=n) for n, b in _command_tasks()])
def test_every_abssctl_task_reads_json_exit_code_and_runs_in_check_mode(name: str, block: str) -> None:
    argv = re.search(r"argv: \"\{\{ (\[abssctl_bin, '--json'|abssctl_argv \+)", block)
    assert argv, f"{name}: argv must start with abssctl_argv (abssctl --json [--dry-run]) or [abssctl_bin, '--json'"
    assert "check_mode: false" in block, f"{name}: must run in check mode too (check_mode: false)"
    reg = re.search(r"register: (\w+)", block)
    assert reg, f"{name}: must register its result"
    var = reg.group(1)
    assert re.search(rf"failed_when: {var}\.rc != 0\s*$", block, re.M), f"{name}: failed_when must read the exit code"
    changed = re.search(r"changed_when: (.+)$", block, re.M)
    assert changed, f"{name}: needs changed_when"
    mutating = argv.group(1).startswith("abssctl_argv")
    if mutating:                 # mutating commands: abssctl's own "changed"; --dry-run comes with abssctl_argv
        assert changed.group(1) == f'(({var}.stdout or "{{}}") | from_json).changed | default(false)', name
    else:                        # read commands have no "changed" and never change anything
        assert changed.group(1) == "false", name


def test_abssctl_argv_adds_dry_run_in_check_mode() -> None:
    defaults = (FLEET / "roles" / "abssctl" / "defaults" / "main.yml").read_text(encoding="utf-8")
    assert "abssctl_argv: \"{{ [abssctl_bin, '--json'] + (['--dry-run'] if ansible_check_mode else []) }}\"" in defaults


def test_the_upgrade_play_rolls_one_host_at_a_time_and_stops_at_a_failure() -> None:
    site = (FLEET / "site.yml").read_text(encoding="utf-8")
    plays = [b for b in re.split(r"(?m)^(?=- name: )", site) if b.startswith("- name: ")]
    upgrade = [b for b in plays if "tasks_from: upgrade" in b]
    assert len(upgrade) == 1 and "serial: 1" in upgrade[0] and "max_fail_percentage: 0" in upgrade[0], site
    assert plays.index(upgrade[0]) == len(plays) - 1, "the roll-out comes after every host is deployed and staged"


@pytest.mark.skipif(not shutil.which("ansible-playbook"), reason="ansible-playbook not installed (ansible-core)")
def test_the_playbook_parses(tmp_path: Path) -> None:
    proc = subprocess.run(["ansible-playbook", "--syntax-check", "-i", str(FLEET / "inventory.example.yml"),
                           str(FLEET / "site.yml")], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "ANSIBLE_HOME": str(tmp_path), "LANG": "C.UTF-8"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
