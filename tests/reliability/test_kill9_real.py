"""kill -9 against the real components (DESIGN P2): real nginx, the systemctl replacement and real
npm (the abssctl_host rig). After each kill the *real* `nginx -t` passes; the next mutating command
recovers the journal; a re-run converges and nginx still passes `-t`. The boundaries are the ones
around the vhost: just before it goes in, right after, and at the end; plus the last boundary of a
rename with its own TLS, past its point of no return: the old certificate has already been deleted,
so recovery finishes the rename instead of rolling it back, and a re-run finds the old name gone."""
from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest

from reliability.rigs import MATRIX, journals, run_child

pytestmark = pytest.mark.reliability


def real_problems(h: Any) -> list[str]:
    out = []
    t = h.nginx.test()
    if t.returncode != 0:
        out.append(f"real nginx -t fails: {t.stderr.strip()[-300:]}")
    insts = h.registry_doc("instances")["instances"]
    ports = h.registry_doc("ports")["ports"]
    for port, res in ports.items():
        if res["instance"] not in insts or insts[res["instance"]]["port"] != int(port):
            out.append(f"port {port} -> {res['instance']} is not that instance's port")
    for name, e in insts.items():
        for key in ("root", "config", "unit", "vhost"):
            if not Path(e["paths"][key]).exists():
                out.append(f"{name}: {key} missing")
    enabled = sorted(p.name for p in h.nginx.sites_enabled.iterdir())
    if enabled != sorted(f"abssctl-{n}.conf" for n in insts):
        out.append(f"enabled vhosts {enabled} != registered {sorted(insts)}")
    return out


def kill_and_converge(h: Any, command: str, argv: list[str], k: int, gone_ok: bool = False) -> tuple[str, list[str]]:
    proc, note = run_child(h, "kill", k, ["--json", "-q", *argv])
    if proc.returncode != -signal.SIGKILL:
        return "?", [f"not killed: rc {proc.returncode}: {proc.stderr[-300:]}"]
    step = (note or {}).get("step", "?")
    problems = []
    t = h.nginx.test()
    if t.returncode != 0:
        problems.append(f"right after the kill, real nginx -t fails: {t.stderr.strip()[-300:]}")
    if len(journals(h)) != 1:
        problems.append("no journal left")
    rec = h.run("--json", "init")
    if rec.rc != 0:
        problems.append(f"recovery by init exits {rec.rc}: {rec.err.strip()[-400:]}")
    else:
        problems += [f"after recovery: {p}" for p in real_problems(h)]
    again = h.run("--json", *argv)
    gone = again.rc == 2 and json.loads(again.out or "{}").get("error", {}).get("kind") == "NotFound"
    if again.rc != 0 and not (gone_ok and gone):
        problems.append(f"re-run exits {again.rc}: {again.err.strip()[-400:]}")
    problems += real_problems(h)
    return step, problems


def test_kill_9_around_vhost_changes_keeps_real_nginx_passing(abssctl_host) -> None:
    """One host (its setup costs seconds): creates k8, k9, k10 are killed at their own boundary each,
    then the instance of the last one is renamed and killed at the rename's last boundary."""
    h = abssctl_host
    failures = []
    for k in (8, 9, 10):
        argv = ["instance", "create", f"k{k}", "--domain", f"k{k}.example.test", "--tls", "self-signed"]
        step, problems = kill_and_converge(h, "instance create", argv, k)
        MATRIX.add("kill -9 (real nginx)", "instance create", f"{k:2d} {'after' if k else 'before'} {step}",
                   "ok: real nginx -t passes, recovered, converged" if not problems else "FAIL: " + "; ".join(problems))
        failures += [f"create k={k}: {p}" for p in problems]
    argv = ["instance", "rename", "k10", "renamed"]
    steps = len(json.loads(h.run("--json", "--dry-run", *argv).out)["plan"])
    step, problems = kill_and_converge(h, "instance rename", argv, steps, gone_ok=True)
    names = sorted(h.registry_doc("instances")["instances"])
    if "renamed" not in names or "k10" in names:
        problems.append(f"the rename was not finished: instances {names}")
    MATRIX.add("kill -9 (real nginx)", "instance rename", f"{steps:2d} after {step}",
               "ok: real nginx -t passes, recovered, converged" if not problems else "FAIL: " + "; ".join(problems))
    failures += [f"rename k={steps}: {p}" for p in problems]
    assert failures == [], "\n".join(failures)
