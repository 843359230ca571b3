"""Running unattended (DESIGN §11.4) against the real rig: the retention policy, backup schedule run,
copies to a small tmpfs that fills up, a restore from a copy, restore tests, auto-upgrade that rolls
back and is not retried, and the notify command. The systemctl replacement runs no timers, so the
service's command (backup schedule run) is run directly; the host tier runs the real timers."""
from __future__ import annotations

import calendar
import datetime
import json
import os
import random
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

import abssctl

pytestmark = pytest.mark.integration
DAY = 86400


# -- the retention policy, against a separately written reference --------------------------

def reference_keep(rows, policy, now):
    """restic forget as documented, written plainly: walk newest to oldest; keep-last takes the
    first N; each keep-<period> N keeps a row when its period differs from the previous kept row's
    period for that rule, until N periods are taken. Then the three protections."""
    rows = sorted(rows, key=lambda r: (r["created_at"], r["id"]), reverse=True)
    keep = set(r["id"] for r in rows[:policy["keep_last"]])

    def period(ts, kind):
        d = datetime.datetime.utcfromtimestamp(ts)
        if kind == "daily":
            return d.strftime("%Y-%m-%d")
        if kind == "weekly":
            iso = d.isocalendar()
            return f"{iso[0]}-W{iso[1]:02d}"
        return d.strftime("%Y-%m")
    for kind in ("daily", "weekly", "monthly"):
        taken, last = 0, None
        for r in rows:
            if taken == policy[f"keep_{kind}"]:
                break
            p = period(r["created_at"], kind)
            if p != last:
                keep.add(r["id"])
                taken += 1
                last = p
    for r in rows:
        if r["verified"]:
            keep.add(r["id"])
            break
    for r in rows:
        if "keep" in r["labels"] or (r["reason"] in ("pre-switch", "pre-restore") and now - r["created_at"] < 14 * DAY):
            keep.add(r["id"])
    return keep


def gen_rows(seed: int, start: str, days: int, per_day: tuple[int, int]):
    rnd = random.Random(seed)
    t0 = calendar.timegm(time.strptime(start, "%Y-%m-%d"))
    rows = []
    for d in range(days):
        if rnd.random() < 0.25:
            continue                                    # some days have no backup
        for _ in range(rnd.randint(*per_day)):
            ts = t0 + d * DAY + rnd.randint(0, DAY - 1)
            rows.append({"id": f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime(ts))}-a-{rnd.randrange(65536):04x}",
                         "created_at": float(ts), "labels": ["keep"] if rnd.random() < 0.03 else [],
                         "reason": rnd.choice(["manual", "manual", "pre-switch", "pre-restore"]),
                         "verified": rnd.random() < 0.3})
    return rows


CASES = [  # (start, days, per-day range, policy)
    ("2025-12-20", 30, (1, 3), {"keep_last": 2, "keep_daily": 7, "keep_weekly": 4, "keep_monthly": 3}),
    ("2026-12-24", 20, (0, 2), {"keep_last": 0, "keep_daily": 3, "keep_weekly": 2, "keep_monthly": 0}),
    ("2020-12-25", 14, (1, 4), {"keep_last": 1, "keep_daily": 0, "keep_weekly": 3, "keep_monthly": 0}),  # ISO 2020-W53
    ("2024-10-01", 200, (0, 2), {"keep_last": 3, "keep_daily": 5, "keep_weekly": 6, "keep_monthly": 6}),
    ("2015-12-28", 400, (1, 1), {"keep_last": 0, "keep_daily": 0, "keep_weekly": 0, "keep_monthly": 14}),
    ("2026-02-20", 15, (2, 5), {"keep_last": 0, "keep_daily": 0, "keep_weekly": 0, "keep_monthly": 0}),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_retention_matches_the_reference_across_year_boundaries(case: int) -> None:
    start, days, per_day, policy = CASES[case]
    for seed in range(5):
        rows = gen_rows(seed * 31 + case, start, days, per_day)
        now = max(r["created_at"] for r in rows) + 3 * DAY
        got = abssctl.retention(rows, policy, now)
        assert set(got) == reference_keep(rows, policy, now), (case, seed)
        newest_verified = max((r for r in rows if r["verified"]), key=lambda r: r["created_at"], default=None)
        if newest_verified:
            assert "newest-verified" in got[newest_verified["id"]]


def test_retention_keeps_one_per_iso_week_over_new_year() -> None:
    # 2020-12-28 (Mon) .. 2021-01-10: ISO weeks 2020-W53 and 2021-W01; the newest of each stays.
    base = calendar.timegm((2020, 12, 28, 12, 0, 0))
    rows = [{"id": f"r{d:02d}", "created_at": float(base + d * DAY), "labels": [], "reason": "manual",
             "verified": False} for d in range(14)]
    got = abssctl.retention(rows, {"keep_last": 0, "keep_daily": 0, "keep_weekly": 2, "keep_monthly": 0},
                            base + 20 * DAY)
    assert sorted(got) == ["r06", "r13"]       # Sun 2021-01-03 (W53) and Sun 2021-01-10 (W01)


# -- the rig --------------------------------------------------------------------------------

def seed(data: Path, blob: bytes | None = None) -> None:
    con = sqlite3.connect(data / "server-files" / "account.sqlite")
    con.execute("CREATE TABLE IF NOT EXISTS files (id TEXT PRIMARY KEY, deleted BOOLEAN DEFAULT FALSE)")
    con.execute("INSERT OR IGNORE INTO files (id) VALUES ('abc')")
    con.execute("INSERT OR IGNORE INTO files (id, deleted) VALUES ('gone', TRUE)")
    con.commit()
    con.close()
    (data / "user-files" / "file-abc.blob").write_bytes(blob if blob is not None else os.urandom(300_000))


@pytest.fixture
def sched(abssctl_host):
    h = abssctl_host
    analyze = h.root / "systemd-analyze"
    log = h.root / "analyze.log"
    analyze.write_text(f"""#!/bin/sh
echo "$*" >> {log}
case "$1" in
  calendar) case "$2" in bogus*) echo "Failed to parse calendar specification '$2'" >&2; exit 1;; esac
            echo "  Original form: $2"; echo "    Next elapse: Mon 2026-12-07 00:00:00 UTC";;
  verify) [ -e {h.root}/VERIFY-FAILS ] && {{ echo "bad unit" >&2; exit 1; }}; exit 0;;
esac
""")
    analyze.chmod(0o755)
    out = h.root / "notified.txt"
    # The systemctl replacement runs no timers: starting or stopping one is accepted and noted here.
    ctl = h.root / "systemctl-timers"
    ctl.write_text(f"""#!/bin/sh
for a in "$@"; do case "$a" in *.timer) case "$*" in *" start "*|*" stop "*) echo "$*" >> {h.root}/timers.log; exit 0;;
esac;; esac; done
exec {" ".join(h.settings["commands"]["systemctl"])} "$@"
""")
    ctl.chmod(0o755)
    h.configure("commands", systemd_analyze=[str(analyze)], systemctl=[str(ctl)])
    h.configure("notify", command=["/bin/sh", "-c", f'cat > {out}; echo "$ABSSCTL_UNIT $ABSSCTL_RESULT" >> {out}'])
    h.ok("instance", "create", "alice", "--domain", "alice.example.test", "--tls", "self-signed")
    data = h.paths["instance_root"] / "alice" / "data"
    seed(data)
    return h, data, log, out


def test_enable_show_run_disable(sched) -> None:
    h, _data, log, _out = sched
    got = h.run("--json", "backup", "schedule", "enable", "--calendar", "bogus spec")
    assert got.rc == 2 and "not a systemd calendar" in got.doc["error"]["message"], got
    assert not (h.paths["systemd_unit_dir"] / "abssctl-backup.timer").exists()
    doc = h.ok("backup", "schedule", "enable", "--calendar", "*-*-* 03:00", "--keep-last", "2", "--keep-daily", "0",
               "--keep-weekly", "0", "--keep-monthly", "0", "--restore-test", "never")
    assert doc["schedule"]["next"].startswith("Mon 2026-12-07")
    unit_dir = h.paths["systemd_unit_dir"]
    service = (unit_dir / "abssctl-backup.service").read_text()
    assert f"--config {h.config} --json --yes backup schedule run" in service
    assert "OnFailure=abssctl-notify@%n.service" in service and "Type=oneshot" in service
    timer = (unit_dir / "abssctl-backup.timer").read_text()
    assert "OnCalendar=*-*-* 03:00" in timer and "Persistent=true" in timer and "RandomizedDelaySec=30min" in timer
    assert (unit_dir / "abssctl-notify@.service").exists()
    assert any(line.startswith("verify ") and "abssctl-backup.timer" in line for line in log.read_text().splitlines())
    text = h.config.read_text()
    assert 'schedule = "*-*-* 03:00"' in text and "keep_last = 2" in text
    # the command the service runs: three runs, keep-last 2 leaves two, each deep-verified
    ids = []
    for _ in range(3):
        run = h.ok("backup", "schedule", "run")["run"]
        assert run["result"] == "ok" and len(run["backups"]) == 1 and run["verified"] == [run["backups"][0]["id"]]
        ids.append(run["backups"][0]["id"])
        time.sleep(1.1)
    listed = [b["id"] for b in h.ok("backup", "list")["backups"]]
    assert listed == [ids[2], ids[1]]
    assert all("scheduled" in b["labels"] and b.get("verified_at") for b in h.ok("backup", "list")["backups"])
    show = h.ok("backup", "schedule", "show")["schedule"]
    assert show["enabled"] and show["last_run"]["result"] == "ok" and show["policy"]["keep_last"] == 2
    doctor = h.run("--json", "doctor", "--only", "unattended").doc
    schedule = [f for f in doctor["probes"] if f["id"] == "unattended.schedule"]
    assert schedule and schedule[0]["status"] == "ok"
    # prune --policy by hand, with keep-last 1 in the config
    text = h.config.read_text().replace("keep_last = 2", "keep_last = 1")
    h.config.write_text(text)
    pruned = h.ok("--yes", "backup", "prune", "--policy")
    assert pruned["removed"] == [ids[1]]
    # a unit systemd-analyze rejects is not enabled, and the files written are undone
    h.ok("backup", "schedule", "disable")
    assert not (unit_dir / "abssctl-backup.timer").exists()
    (h.root / "VERIFY-FAILS").write_text("1")
    got = h.run("--json", "backup", "schedule", "enable")
    assert got.rc == 4 and "systemd-analyze verify" in got.doc["error"]["message"], got
    assert not (unit_dir / "abssctl-backup.service").exists()


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "usb"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], check=True, timeout=30)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False, timeout=30)


def test_copy_to_a_disk_that_fills_up_then_restore_from_the_copy(sched, small_disk) -> None:
    import socket
    h, data, _log, _out = sched
    h.ok("backup", "schedule", "enable", "--copy-to", str(small_disk), "--restore-test", "never", "--no-verify")
    first = h.ok("backup", "schedule", "run")["run"]
    bid = first["backups"][0]["id"]
    dest = small_disk / socket.gethostname() / "alice"
    copy = next(dest.glob(f"{bid}.tar*"))
    assert first["copies"][bid] == str(copy) and (dest / f"{bid}.sha256").exists()
    assert not list(dest.glob(".*abssctl-tmp*"))
    rows = {b["id"]: b for b in h.ok("backup", "list", "--copies")["backups"]}
    assert rows[bid]["copy_state"] == "verified"
    # fill the disk to within 100 KB, then the next run's copy fails; its local backup stays
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    (small_disk / "filler").write_bytes(b"\0" * max(0, free - 100_000))
    time.sleep(1.1)
    got = h.run("--json", "backup", "schedule", "run")
    assert got.rc == 3, got
    assert "no space left" in got.doc["error"]["message"] and "local backup is kept" in got.doc["error"]["message"]
    second = got.doc["run"]["backups"][0]["id"]
    rows = {b["id"]: b for b in h.ok("backup", "list", "--copies")["backups"]}
    assert rows[second]["copy_state"] == "none" and rows[bid]["copy_state"] == "verified"
    assert os.path.isfile(h.paths["backup_root"] / "alice" / os.path.basename(rows[second]["archive"]))
    assert not list(dest.glob(".*abssctl-tmp*")) and not list(dest.glob(f"{second}*"))
    assert h.ok("backup", "schedule", "show")["schedule"]["last_run"]["result"] == "failed"
    # the local archive of the first goes; restore takes the copy
    local = h.paths["backup_root"] / "alice" / os.path.basename(rows[bid]["archive"])
    local.unlink()
    (data / "user-files" / "file-abc.blob").write_bytes(b"changed")
    doc = h.ok("--yes", "backup", "restore", bid)
    assert doc["restore"]["backup_id"] == bid
    assert len((data / "user-files" / "file-abc.blob").read_bytes()) == 300_000


def test_restore_test_passes_on_a_good_backup_and_fails_without_a_blob(sched) -> None:
    h, data, _log, _out = sched
    good = h.ok("backup", "create", "alice")["backup"]["id"]
    doc = h.ok("backup", "verify", good, "--restore-test")
    assert doc["restore_test"]["health"] == "UP" and doc["restore_test"]["user_files"] == 1
    assert doc["restore_test"]["missing_blobs"] == []
    (data / "user-files" / "file-abc.blob").unlink()
    bad = h.ok("backup", "create", "alice")["backup"]["id"]
    got = h.run("--json", "backup", "verify", bad, "--restore-test")
    assert got.rc == 4 and "abc" in got.doc["error"]["message"] and "no blob" in got.doc["error"]["message"], got
    assert not list(h.paths["install_root"].glob(".smoke-restore-test-*"))
    entries = h.ok("backup", "list")["backups"]
    assert {b["id"]: b["restore_test"]["result"] for b in entries} == {good: "ok", bad: "failed"}


def test_auto_upgrade_rolls_back_marks_the_version_and_does_not_retry(sched) -> None:
    h, data, _log, out = sched
    h.ok("version", "install", "1.1.0")        # installed before its crash is armed (the install smoke-starts it)
    marker = h.arm_crash_after_migrate("1.1.0")
    h.ok("version", "auto-upgrade", "enable", "--to", "minor")
    assert "version upgrade --auto" in (h.paths["systemd_unit_dir"] / "abssctl-upgrade.service").read_text()
    marker.write_text("1")
    got = h.run("--json", "--yes", "version", "upgrade", "--auto")
    assert got.rc == 4 and got.doc["error"]["kind"] == "HealthGateFailed", got
    assert h.registry_doc("versions")["current"] == "1.0.0"
    show = h.ok("version", "auto-upgrade", "show")["auto_upgrade"]
    assert list(show["blocked"]) == ["1.1.0"] and show["last_run"]["result"] == "rolled-back"
    text = h.run("version", "auto-upgrade", "show").out
    assert "1.1.0 is never tried again automatically" in text
    status = h.ok("instance", "status", "alice")["instances"][0]
    assert status["info_version"] == "1.0.0" and status["health"] == "UP"
    # the next unattended run does not retry it, even with the crash gone
    marker.unlink()
    again = h.ok("--yes", "version", "upgrade", "--auto")["upgrade"]
    assert again["result"] == "up-to-date" and again["skipped"] == ["1.1.0"]
    assert h.registry_doc("versions")["current"] == "1.0.0"
    # by hand (without --auto) it goes
    done = h.ok("--yes", "version", "upgrade")["upgrade"]
    assert done["result"] == "upgraded" and h.registry_doc("versions")["current"] == "1.1.0"
    # the notify unit's command gets the summary on stdin and the unit and result in its env
    h.ok("notify", "abssctl-upgrade.service")
    lines = out.read_text().splitlines()
    assert "abssctl-upgrade.service failed" in lines[0] and "upgraded 1.0.0 -> 1.1.0" in lines[0]
    assert lines[-1].startswith("abssctl-upgrade.service ")


def test_notify_without_a_command_warns_and_doctor_says_journal_only(sched) -> None:
    h, _data, _log, _out = sched
    h.configure("notify", command=[])
    def notify_findings():
        return [f for f in h.run("--json", "doctor", "--only", "unattended").doc["probes"]
                if f["id"] == "unattended.notify"]
    assert notify_findings() == []               # nothing runs unattended: nothing to be told about
    h.ok("backup", "schedule", "enable")
    got = h.run("notify", "abssctl-backup.service")
    assert got.rc == 0 and "only reaches the journal" in got.err
    [notify] = notify_findings()
    assert notify["status"] == "warn" and "journal" in notify["message"]
