"""The host tier's pure parts (tests/rig/nspawn.py), checked without booting anything: the README's run
command is found where the host tier looks for it, and the port check names a listener's holder."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from rig.nspawn import Guest, ports_held, readme_run_command, remove_stale_guests

REPO = Path(__file__).resolve().parents[2]

README = """# x

## The two commands

Run it: on a fresh host
as root:

    first && abssctl quickstart fam --domain fam.example.net --yes

    not this one

Test it:

    tests/run

## Next
"""


def test_the_readme_run_command_is_found_and_parsed(tmp_path: Path) -> None:
    path = tmp_path / "README.md"
    path.write_text(README)
    got = readme_run_command(path)
    assert (got.line, got.name, got.domain) == (
        "first && abssctl quickstart fam --domain fam.example.net --yes", "fam", "fam.example.net")


def test_the_real_readme_has_a_quickstart_run_command() -> None:
    got = readme_run_command(REPO / "README.md")
    assert " quickstart " in f" {got.line} " and got.name and "." in got.domain, got


@pytest.mark.parametrize("text", [README.replace("## The two commands", "## Two"),
                                  README.replace("Run it:", "Use it:"),
                                  README.replace("quickstart fam", "init fam")])
def test_a_readme_without_the_run_command_is_an_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "README.md"
    path.write_text(text)
    with pytest.raises(AssertionError):
        readme_run_command(path)


def test_ports_held_names_the_holder() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        held = ports_held((port,))
        assert held.get(port, "").startswith(f"pid {os.getpid()} "), held
    assert port not in ports_held((port,))


def test_remove_stale_guests_keeps_living_and_fresh_ones(tmp_path: Path) -> None:
    guests = tmp_path / "guests"
    (guests / "guest-live").mkdir(parents=True)
    live = Guest(tmp_path / "no-rootfs", guests / "guest-live", REPO)     # holds guest-live/.lock
    (guests / "guest-dead" / "abssctl-host" / "etc").mkdir(parents=True)
    (guests / "guest-dead" / ".lock").write_text("")
    (guests / "guest-new").mkdir()
    (guests / "guest-old").mkdir()
    os.utime(guests / "guest-old", (1, 1))
    removed = remove_stale_guests(guests)
    assert sorted(p.name for p in removed) == ["guest-dead", "guest-old"]
    assert sorted(p.name for p in guests.iterdir()) == ["guest-live", "guest-new"]
    live.destroy()                                                       # never booted: just removes
    assert sorted(p.name for p in guests.iterdir()) == ["guest-new"]
