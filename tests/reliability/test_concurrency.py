"""Concurrency (DESIGN §3.8, §4.0 step 5, §10.6): separate `/usr/bin/python3 abssctl.py` processes
run in parallel (at most 4 at once) against one fake host. Holders are made deterministic with a
child that pauses at a step boundary while it holds its locks."""
from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from reliability.rigs import (RHost, cli, consistency_problems, registry, release, rhost,  # noqa: F401
                              start_paused)

pytestmark = pytest.mark.reliability
PARALLEL = 4


def parallel(config: Any, argvs: list[list[str]]) -> list[Any]:
    with ThreadPoolExecutor(max_workers=PARALLEL) as pool:
        return list(pool.map(lambda a: cli(config, *a), argvs))


def doc_of(proc: Any) -> dict[str, Any]:
    try:
        return json.loads(proc.stdout)
    except ValueError:
        raise AssertionError(f"stdout is not one JSON document: rc={proc.returncode}\n{proc.stdout}\n{proc.stderr}")


def test_parallel_creates_of_distinct_names_all_succeed_on_distinct_ports(rhost: RHost) -> None:
    names = [f"c{i}" for i in range(PARALLEL)]
    got = parallel(rhost.sb.config, [["--json", "instance", "create", n, "--domain", f"{n}.example.org"]
                                     for n in names])
    for proc in got:
        assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
        assert "Traceback" not in proc.stderr
    ports = [doc_of(p)["instance"]["port"] for p in got]
    assert len(set(ports)) == PARALLEL, ports
    insts = registry(rhost.sb, "instances")["instances"]
    assert sorted(insts) == names and {e["port"] for e in insts.values()} == set(ports)
    assert consistency_problems(rhost.sb) == []


def test_parallel_identical_creates_of_one_name_change_it_once(rhost: RHost) -> None:
    """§10.6: create with identical arguments is a no-op, so every process exits 0 and exactly one
    reports changed: true."""
    argv = ["--json", "instance", "create", "same", "--domain", "same.example.org"]
    got = parallel(rhost.sb.config, [argv] * PARALLEL)
    rcs = [p.returncode for p in got]
    assert rcs == [0] * PARALLEL, [(p.returncode, p.stdout[-400:], p.stderr[-400:]) for p in got]
    assert sorted(doc_of(p)["changed"] for p in got) == [False] * (PARALLEL - 1) + [True]
    assert consistency_problems(rhost.sb) == []


def test_parallel_creates_of_one_name_with_different_domains_let_exactly_one_win(rhost: RHost) -> None:
    got = parallel(rhost.sb.config, [["--json", "instance", "create", "dup", "--domain", f"d{i}.example.org"]
                                     for i in range(PARALLEL)])
    winners = [p for p in got if p.returncode == 0]
    losers = [p for p in got if p.returncode != 0]
    assert len(winners) == 1, [(p.returncode, p.stdout[-300:]) for p in got]
    for p in losers:
        d = doc_of(p)
        assert p.returncode in (2, 3) and "Traceback" not in p.stderr, p.stderr
        text = json.dumps(d["error"]).lower()
        assert "exist" in text or "pid" in text or "state changed" in text, d
    domain = doc_of(winners[0])["instance"]["domain"]
    assert registry(rhost.sb, "instances")["instances"]["dup"]["domain"] == domain
    assert consistency_problems(rhost.sb) == []


def test_a_create_that_waited_for_the_winner_rechecks_and_refuses_different_settings(rhost: RHost) -> None:
    """§4.0 step 5: after the locks, re-check; the state moved while waiting -> exit 2. Deterministic:
    the winner pauses after its first step, holding the instance lock, while the others wait."""
    winner, note = start_paused(rhost.sb, 1, ["--json", "instance", "create", "dup", "--domain", "d0.example.org"])
    with ThreadPoolExecutor(max_workers=PARALLEL - 1) as pool:
        waiting = [pool.submit(cli, rhost.sb.config, "--json", "instance", "create", "dup", "--domain",
                               f"d{i}.example.org") for i in range(1, PARALLEL)]
        time.sleep(1.0)                               # they have validated and now wait for the lock
        assert not any(f.done() for f in waiting), [f.result().stdout for f in waiting if f.done()]
        rc, out, err = release(winner, note)
        assert rc == 0, f"{out}\n{err}"
        got = [f.result() for f in waiting]
    for p in got:
        d = doc_of(p)
        assert p.returncode == 2 and d["error"]["kind"] in ("AlreadyExists", "Conflict"), \
            (p.returncode, d, "DESIGN §4.0 step 5 / §10.6: a create with other settings must not exit 0")
    assert registry(rhost.sb, "instances")["instances"]["dup"]["domain"] == "d0.example.org"


def _alice_with_backups(h: RHost, n: int) -> list[str]:
    h.ok("instance", "create", "alice", "--domain", "alice.example.org")
    return [h.ok("backup", "create", "alice")["backup"]["id"] for _ in range(n)]


def test_backup_create_during_a_restore_times_out_cleanly_or_waits(rhost: RHost) -> None:
    h = rhost
    [bid] = _alice_with_backups(h, 1)
    index_before = registry(h.sb, "backups")
    restore, note = start_paused(h.sb, 1, ["--json", "--yes", "backup", "restore", bid])
    try:
        now = cli(h.sb.config, "--json", "--lock-timeout", "0", "backup", "create", "alice")
        assert now.returncode == 3, now.stdout + now.stderr
        d = doc_of(now)
        assert d["error"]["kind"] == "LockTimeout", d
        assert f"pid {restore.pid}" in d["error"]["message"], d
        assert d["error"]["details"]["holder"]["pid"] == restore.pid, d
        assert "Traceback" not in now.stderr
        assert registry(h.sb, "backups") == index_before           # the refused backup wrote nothing
        with ThreadPoolExecutor(max_workers=1) as pool:
            later = pool.submit(cli, h.sb.config, "--json", "--lock-timeout", "60", "backup", "create", "alice")
            time.sleep(1.6)
            assert not later.done(), later.result().stdout
            rc, out, err = release(restore, note)
            assert rc == 0, f"{out}\n{err}"
            waited = later.result()
        assert waited.returncode == 0, waited.stdout + waited.stderr
        assert f"waiting for lock held by pid {restore.pid}" in waited.stderr, waited.stderr
    finally:
        if restore.poll() is None:
            release(restore, note)
    reasons = sorted(b["reason"] for b in registry(h.sb, "backups")["backups"].values())
    assert reasons == ["manual", "manual", "pre-restore"], reasons
    assert consistency_problems(h.sb) == []


def test_lock_timeout_0_against_an_exclusive_global_holder_names_its_pid(rhost: RHost) -> None:
    h = rhost
    _alice_with_backups(h, 2)
    holder, note = start_paused(h.sb, 0, ["--json", "--yes", "backup", "prune", "--keep", "1"])
    try:
        for argv in (["instance", "create", "bob", "--domain", "bob.example.org"],
                     ["backup", "create", "alice"], ["instance", "stop", "alice"]):
            got = cli(h.sb.config, "--json", "--lock-timeout", "0", *argv)
            d = doc_of(got)
            assert got.returncode == 3 and d["error"]["kind"] == "LockTimeout", (argv, d)
            assert f"pid {holder.pid}" in d["error"]["message"] and "backup prune" in d["error"]["message"], d
            assert d["error"]["hint"], d
    finally:
        rc, out, err = release(holder, note)
    assert rc == 0, f"{out}\n{err}"
    assert "bob" not in registry(h.sb, "instances")["instances"]


def test_shared_holders_coexist_and_block_an_exclusive_one(rhost: RHost) -> None:
    h = rhost
    _alice_with_backups(h, 2)
    holder, note = start_paused(h.sb, 0, ["--json", "backup", "create", "alice"])
    try:
        other = cli(h.sb.config, "--json", "--lock-timeout", "0", "instance", "stop", "carol")
        assert other.returncode == 2 and doc_of(other)["error"]["kind"] == "NotFound"   # shared + shared
        # instance create takes the global lock exclusively (a deviation from DESIGN §3.8: two creates
        # must not both pick "the lowest free port"), so it waits for the shared holder.
        create = cli(h.sb.config, "--json", "--lock-timeout", "0", "instance", "create", "bob", "--domain",
                     "bob.example.org")
        assert create.returncode == 3 and doc_of(create)["error"]["kind"] == "LockTimeout", create.stdout
        same = cli(h.sb.config, "--json", "--lock-timeout", "0", "instance", "stop", "alice")
        assert same.returncode == 3 and doc_of(same)["error"]["kind"] == "LockTimeout"
        excl = cli(h.sb.config, "--json", "--lock-timeout", "0", "--yes", "backup", "prune", "--keep", "1")
        assert excl.returncode == 3 and doc_of(excl)["error"]["kind"] == "LockTimeout", excl.stdout
    finally:
        rc, out, err = release(holder, note)
    assert rc == 0, f"{out}\n{err}"
    assert len(registry(h.sb, "backups")["backups"]) == 3
    assert consistency_problems(h.sb) == []
