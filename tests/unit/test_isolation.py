"""DESIGN §11.5 against the fakes: the user name an instance makes is checked before anything changes;
[service] user_prefix is validated like an account name."""
from __future__ import annotations

import pytest

from rig.fakes import Sandbox


@pytest.mark.parametrize("argv", [["instance", "create", "n" * 26, "--domain", "long.example.org"],
                                  ["instance", "import", "n" * 26, "--from", "/nonexistent"]])
def test_too_long_a_user_name_exits_2_with_the_rule_and_changes_nothing(sandbox: Sandbox, argv: list[str]) -> None:
    sandbox.configure("service", user_prefix="actual-")
    before = sandbox.tree()
    res = sandbox.run("--json", *argv)
    assert res.rc == 2, res.err
    assert res.doc["error"]["kind"] == "UsageError"
    message = res.doc["error"]["message"]
    assert "actual-" + "n" * 26 in message and "useradd allows at most 32" in message
    assert "at most 25 characters" in res.doc["error"]["hint"]
    assert sandbox.tree() == before
    assert sandbox.calls("useradd") == [] and sandbox.calls("groupadd") == []


def test_a_name_that_fits_is_not_refused_for_its_length(sandbox: Sandbox) -> None:
    sandbox.configure("service", user_prefix="actual-")
    res = sandbox.run("--json", "instance", "create", "n" * 25, "--domain", "fits.example.org")
    assert "useradd allows" not in res.err


@pytest.mark.parametrize("prefix", ["Bad!", "-x", "a" * 25])
def test_user_prefix_must_be_an_account_name_prefix(sandbox: Sandbox, prefix: str) -> None:
    sandbox.configure("service", user_prefix=prefix)
    res = sandbox.run("--json", "config", "check")
    assert res.rc == 2 and "service.user_prefix" in res.err, res.err
