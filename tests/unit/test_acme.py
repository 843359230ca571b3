"""§11.2 without a CA: certbot's argv, its failures read into plain words, bad input refused."""
from __future__ import annotations

import pytest

import abssctl

from .test_instances import backends, prepare  # noqa: F401 (fixture)


@pytest.fixture
def host(sandbox, backends):  # noqa: F811
    return prepare(sandbox)

FAILED_AUTH = """Requesting a certificate for two.example.test

Certbot failed to authenticate some domains (authenticator: webroot). The Certificate Authority reported these problems:
  Domain: two.example.test
  Type:   connection
  Detail: 203.0.113.9: Fetching http://two.example.test/.well-known/acme-challenge/x: Timeout during connect

Hint: The Certificate Authority failed to download the temporary challenge files created by Certbot.
Saving debug log to /var/log/letsencrypt/letsencrypt.log
Some challenges have failed.
Ask for help or search for solutions at https://community.letsencrypt.org. See the logfile x.
"""
RATE = """Saving debug log to /var/log/letsencrypt/letsencrypt.log
An unexpected error occurred:
Error creating new order :: too many certificates (5) already issued for this exact set of domains in the last 168 hours: a.example.org, retry after 2026-12-07T10:00:00Z
Ask for help or search for solutions at https://community.letsencrypt.org.
"""


def test_certonly_argv_is_exact() -> None:
    bot = abssctl.Certbot(None, "/etc/letsencrypt", "/var/lib/abssctl/acme")   # type: ignore[arg-type]
    assert bot.certonly_args("a.example.org", "", "", False, "/usr/local/bin/abssctl tls deploy-hook") == [
        "certonly", "--webroot", "-w", "/var/lib/abssctl/acme", "-d", "a.example.org", "--non-interactive",
        "--agree-tos", "--register-unsafely-without-email", "--config-dir", "/etc/letsencrypt",
        "--deploy-hook", "/usr/local/bin/abssctl tls deploy-hook"]
    args = bot.certonly_args("a.example.org", "me@example.org", "https://ca.example/dir", True, "h")
    assert args[8:14] == ["--email", "me@example.org", "--server", "https://ca.example/dir", "--staging",
                          "--config-dir"]


def test_failure_text_in_plain_words() -> None:
    reason, kinds = abssctl.certbot_failure(FAILED_AUTH)
    assert reason == ("two.example.test: connection: 203.0.113.9: Fetching http://two.example.test/.well-known/"
                      "acme-challenge/x: Timeout during connect") and kinds == {"connection"}
    reason, kinds = abssctl.certbot_failure(RATE)
    assert reason.startswith("Error creating new order :: too many certificates") and kinds == {"rateLimited"}
    assert abssctl.certbot_failure("Saving debug log to x\nsomething odd\n")[0] == "something odd"


def test_bad_email_or_server_exits_2_and_changes_nothing(host) -> None:
    res = host.run("--json", "instance", "create", "alice", "--domain", "alice.example.org", "--tls", "self-signed")
    assert res.rc == 0, res
    before = host.tree()
    for extra, word in ((["--email", "not an email"], "invalid email"),
                        (["--server", "http://ca.example/dir"], "invalid ACME server URL"),
                        (["--server", "https://ca.example/dir x"], "invalid ACME server URL")):
        got = host.run("tls", "acme", "alice", *extra)
        assert got.rc == 2 and word in got.err, (extra, got.err)
    assert host.tree() == before


def test_deploy_hook_is_this_abssctl_with_its_config(host) -> None:
    cfg, _ = abssctl.load_config(str(host.config), {}, {})
    ctx = type("C", (), {"config": cfg})()
    hook = abssctl.deploy_hook_command(ctx)   # type: ignore[arg-type]
    assert hook.endswith(f"abssctl.py --config {host.config} tls deploy-hook"), hook
    assert hook.split()[0].startswith("/")


def test_the_renew_hook_fix_adds_only_a_missing_hook_under_renewalparams(host, tmp_path) -> None:
    cfg, _ = abssctl.load_config(str(host.config), {}, {})
    ctx = type("C", (), {"config": cfg, "op_id": "t"})()
    conf = tmp_path / "a.example.org.conf"
    text = "version = 2.1.0\narchive_dir = /x\n\n[renewalparams]\nauthenticator = webroot\n[[webroot_map]]\n"
    conf.write_text(text)
    command = abssctl.deploy_hook_command(ctx)   # type: ignore[arg-type]
    fix = abssctl._renew_hook_fix(ctx, str(conf), text, command)   # type: ignore[arg-type]
    plan = abssctl.Plan("doctor --fix")
    fix(plan)
    plan.steps[0].do()
    lines = conf.read_text().splitlines()
    at = lines.index("[renewalparams]")
    assert lines[at + 1] == f"renew_hook = {command}", lines
    assert conf.read_text().replace(lines[at + 1] + "\n", "") == text
    assert abssctl._renew_hook_fix(ctx, str(conf), "version = 2.1.0\n", command) is None   # type: ignore[arg-type]


def test_acme_flags_on_create_and_quickstart_need_tls_acme_and_are_checked_first(host) -> None:
    before = host.tree()
    for argv in (["instance", "create", "alice", "--domain", "alice.example.org", "--email", "a@example.org"],
                 ["instance", "create", "alice", "--domain", "alice.example.org", "--tls", "self-signed", "--staging"],
                 ["quickstart", "alice", "--domain", "alice.example.org", "--server", "https://ca.example/dir"]):
        got = host.run("--json", *argv)
        assert got.rc == 2 and "go with --tls acme" in got.doc["error"]["message"], (argv, got)
    for argv in (["instance", "create", "alice", "--domain", "alice.example.org"],
                 ["quickstart", "alice", "--domain", "alice.example.org"]):
        got = host.run("--json", "--yes", *argv, "--tls", "acme", "--email", "not an email")
        assert got.rc == 2 and "invalid email" in got.doc["error"]["message"], (argv, got)
    assert host.tree() == before


def test_quickstart_dry_run_carries_the_acme_flags_to_its_create_step(host) -> None:
    res = host.run("--json", "--dry-run", "quickstart", "alice", "--domain", "alice.example.org", "--tls", "acme",
                   "--email", "me@example.org", "--staging")
    assert res.rc == 0, res
    create = next(c for c in res.doc["then"] if c.startswith("abssctl instance create"))
    assert create.endswith("--tls acme --email me@example.org --staging"), create
