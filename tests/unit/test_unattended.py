"""§8i pieces that need no host: the config writer, how far an upgrade may go, ExecStart words,
the retention protections, and the parser's rules for the schedule verbs."""
from __future__ import annotations

import calendar

import pytest

import abssctl

DAY = 86400


def test_config_writer_replaces_inserts_and_appends() -> None:
    text = "# top\n[backups]\nkeep = 10\nschedule = \"daily\"\n\n[health]\ntimeout = 5\n"
    got = abssctl.set_config_keys(text, "backups", {"schedule": "weekly", "keep_last": 3})
    assert got == "# top\n[backups]\nkeep_last = 3\nkeep = 10\nschedule = \"weekly\"\n\n[health]\ntimeout = 5\n"
    got = abssctl.set_config_keys(got, "notify", {"command": ["mail", "-s", "x", "root"]})
    assert got.endswith('\n[notify]\ncommand = ["mail", "-s", "x", "root"]\n')
    assert abssctl._simple_toml(got) == {"backups": {"keep_last": 3, "keep": 10, "schedule": "weekly"},
                                         "health": {"timeout": 5}, "notify": {"command": ["mail", "-s", "x", "root"]}}
    # the commented template's "# key = default" lines stay comments
    template = "[backups]\n# keep_last = 7\n"
    assert abssctl.set_config_keys(template, "backups", {"keep_last": 2}) == "[backups]\nkeep_last = 2\n# keep_last = 7\n"


@pytest.mark.parametrize("current,candidate,to,ok", [
    ("26.8.1", "26.8.2", "patch", True), ("26.8.1", "26.9.0", "patch", False),
    ("26.8.1", "26.9.0", "minor", True), ("26.8.1", "27.0.0", "minor", False),
    ("26.8.1", "27.0.0", "latest", True), ("26.8.1", "26.8.1", "latest", False),
    ("26.8.1", "26.7.0", "latest", False), ("26.8.1", "26.9.0-nightly.1", "latest", False),
])
def test_how_far_an_upgrade_goes(current: str, candidate: str, to: str, ok: bool) -> None:
    assert abssctl._allowed(current, candidate, to) is ok


def test_execstart_words() -> None:
    assert abssctl._systemd_word("/usr/local/bin/abssctl") == "/usr/local/bin/abssctl"
    assert abssctl._systemd_word("/etc/my conf.toml") == '"/etc/my conf.toml"'
    assert abssctl._systemd_word("/etc/100%.toml") == "/etc/100%%.toml"


def row(rid: str, ts: float, **kw) -> dict:
    return {"id": rid, "created_at": ts, "labels": kw.get("labels", []), "reason": kw.get("reason", "manual"),
            "verified": kw.get("verified", False)}


def test_protections_hold_whatever_the_counts() -> None:
    now = float(calendar.timegm((2027, 1, 20, 12, 0, 0)))
    rows = [row("keep-me", now - 300 * DAY, labels=["keep"]),
            row("old-safety", now - 15 * DAY, reason="pre-switch"),
            row("young-safety", now - 13 * DAY, reason="pre-restore"),
            row("verified-old", now - 40 * DAY, verified=True),
            row("verified-older", now - 50 * DAY, verified=True),
            row("newest", now - 1 * DAY)]
    nothing = {"keep_last": 0, "keep_daily": 0, "keep_weekly": 0, "keep_monthly": 0}
    kept = abssctl.retention(rows, nothing, now)
    assert sorted(kept) == ["keep-me", "verified-old", "young-safety"]
    assert kept["verified-old"] == ["newest-verified"] and kept["young-safety"] == ["pre-restore"]
    kept = abssctl.retention(rows, dict(nothing, keep_last=1), now)
    assert "newest" in kept and "old-safety" not in kept


def test_monthly_buckets_cross_the_year() -> None:
    ts = [calendar.timegm((y, m, d, 9, 0, 0)) for y, m, d in
          [(2026, 11, 3), (2026, 11, 29), (2026, 12, 1), (2026, 12, 31), (2027, 1, 1), (2027, 1, 2)]]
    rows = [row(f"r{i}", float(t)) for i, t in enumerate(ts)]
    kept = abssctl.retention(rows, {"keep_last": 0, "keep_daily": 0, "keep_weekly": 0, "keep_monthly": 3},
                             float(ts[-1]))
    assert sorted(kept) == ["r1", "r3", "r5"]      # the newest of Nov, Dec and Jan


@pytest.mark.parametrize("argv,needle", [
    (["backup", "schedule", "show", "--calendar", "daily"], "--calendar goes with backup schedule enable"),
    (["backup", "schedule", "run", "--keep-last", "2"], "--keep-last goes with"),
    (["backup", "schedule", "enable", "--keep-daily", "-1"], "--keep-daily"),
    (["version", "auto-upgrade", "show", "--to", "minor"], "go with version auto-upgrade enable"),
    (["backup", "prune", "--policy", "--keep", "3"], "not allowed with"),
    (["backup", "verify", "--all", "--restore-test"], "--restore-test takes one backup ID"),
])
def test_parser_rules(sandbox, argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert abssctl.main(argv) == 2
    assert needle in capsys.readouterr().err
