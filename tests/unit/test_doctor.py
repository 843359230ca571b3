"""§4.10 probe runner: each probe has its own time limit, and doctor does not wait past it."""
from __future__ import annotations

import threading

import abssctl
from unit.test_plan import make_ctx


def test_a_probe_past_its_time_limit_fails_and_doctor_does_not_wait_for_it(sandbox, monkeypatch) -> None:
    release, finished = threading.Event(), threading.Event()

    def probe_slow(ctx, facts):
        release.wait(30)                      # bounded: the test releases it at the end
        finished.set()
        return [abssctl.Finding("disk.slow", None, "ok", "too late to count")]
    probe_slow.timeout = 0.3

    def probe_quick(ctx, facts):
        return [abssctl.Finding("disk.quick", None, "ok", "in time")]
    probe_quick.timeout = 5.0

    monkeypatch.setattr(abssctl, "PROBES", [("disk", probe_slow), ("disk", probe_quick)])
    try:
        found = abssctl.run_probes(make_ctx(sandbox), (), ())
        assert not finished.is_set(), "run_probes waited for the probe past its limit"
        got = [(f.id, f.target, f.status) for f in found]
        assert got == [("disk.timeout", "slow", "fail"), ("disk.quick", None, "ok")], got
        assert "0.3s" in found[0].message and found[0].hint
    finally:
        release.set()
