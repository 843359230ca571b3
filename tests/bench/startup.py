#!/usr/bin/python3
"""Start-up budget (DESIGN.md §8, first row): abssctl.pyz --version and --json instance list.

Usage: /usr/bin/python3 tests/bench/startup.py [--runs 30] [--why] [--python /usr/bin/python3]

Builds the archive into a temporary directory, registers 50 instances in a sandbox state_dir, and
prints the median wall time of each command (after one warm-up) beside the baseline
`python3 -I -c 'import argparse, json, subprocess, tarfile, string'` from the same run. The same
commands from source are shown for information. Exits 1 when an archive figure exceeds 60 ms or
1.5x the baseline, 2 when the bench itself cannot run. --why adds `-X importtime` for the list
command: the 15 imports with the most self time, and what it imports beyond a bare interpreter.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import BenchError, build_pyz

REPO = Path(__file__).resolve().parents[2]
INSTANCES = 50
BUDGET_MS = 60.0
BUDGET_RATIO = 1.5
TIMEOUT = 60
BASELINE_IMPORTS = "import argparse, json, subprocess, tarfile, string"
PATH_KEYS = ("state_dir", "log_dir", "run_dir", "install_root", "instance_root", "backup_root",
             "templates_dir", "tls_dir", "systemd_unit_dir", "nginx_sites_available",
             "nginx_sites_enabled")
SERVER_VERSION = "26.8.1"
STAMP = "2026-11-26T10:02:11Z"


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("ABSSCTL_", "PYTHON"))}


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, env=_env(), capture_output=True, text=True, timeout=TIMEOUT,
                              check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BenchError(f"{' '.join(argv)}: {exc}") from None


# ============================================================================
# Fixtures: the archive and a sandbox with 50 instances
# ============================================================================

def _instance(name: str, port: int, paths: dict[str, Path]) -> dict[str, object]:
    """One registry entry in the shape of DESIGN.md §3.6."""
    root = paths["instance_root"] / name
    return {
        "name": name, "domain": f"{name}.budget.example.org", "port": port,
        "version": "current", "resolved_version": SERVER_VERSION, "data_version": SERVER_VERSION,
        "enabled": True, "pending_restart": False,
        "tls": {"source": "system", "cert": "/etc/ssl/private/cert.pem",
                "key": "/etc/ssl/private/cert.key", "chain": None},
        "paths": {"root": str(root), "data": str(root / "data"),
                  "config": str(root / "config.json"),
                  "unit": str(paths["systemd_unit_dir"] / f"abssctl-{name}.service"),
                  "vhost": str(paths["nginx_sites_available"] / f"abssctl-{name}.conf")},
        "created_at": STAMP, "updated_at": STAMP,
        "last_backup_id": f"20261126-101500-{name}-3f9a", "last_restore": None,
    }


def _write_json(path: Path, doc: object) -> None:
    path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def make_sandbox(root: Path) -> Path:
    """config.toml pointing every [paths] key under root, and a registry of 50 instances."""
    paths = {key: root / key for key in PATH_KEYS}
    for path in paths.values():
        path.mkdir(parents=True)
    registry = paths["state_dir"] / "registry"
    registry.mkdir(mode=0o750)
    names = [f"inst{i:02d}" for i in range(INSTANCES)]
    entries = {n: _instance(n, 5006 + i, paths) for i, n in enumerate(names)}
    _write_json(registry / "instances.json", {"schema_version": 1, "instances": entries})
    ports = {str(e["port"]): {"instance": n, "reserved_at": STAMP} for n, e in entries.items()}
    _write_json(registry / "ports.json", {"schema_version": 1, "ports": ports})
    cfg = root / "config.toml"
    cfg.write_text("[paths]\n" + "".join(f'{k} = "{p}"\n' for k, p in paths.items()),
                   encoding="utf-8")
    return cfg


def check_list(argv: list[str]) -> None:
    """The list command must work and see all 50 instances, or its timing means nothing."""
    proc = _run(argv)
    try:
        doc = json.loads(proc.stdout)
    except ValueError:
        doc = {}
    if proc.returncode != 0 or doc.get("ok") is not True or len(doc.get("instances", ())) != INSTANCES:
        raise BenchError(f"{' '.join(argv)} exited {proc.returncode} without listing "
                         f"{INSTANCES} instances: {proc.stdout[:300]!r} {proc.stderr[-300:]!r}")


# ============================================================================
# Measurement
# ============================================================================

def median_ms(argv: list[str], runs: int) -> float:
    """Median wall time of `runs` runs after one warm-up; any failing run aborts the bench."""
    times = []
    for i in range(runs + 1):
        start = time.perf_counter()
        proc = subprocess.run(argv, env=_env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, timeout=TIMEOUT, check=False)
        elapsed = time.perf_counter() - start
        if proc.returncode != 0:
            raise BenchError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr[-300:]!r}")
        if i:
            times.append(elapsed * 1000)
    return statistics.median(times)


def commands(python: str, pyz: Path, cfg: Path) -> list[tuple[str, list[str], bool]]:
    """(label, argv, is it under budget) for every figure, baseline first."""
    listing = ["--config", str(cfg), "--json", "instance", "list"]
    source = [python, str(REPO / "abssctl.py")]
    return [
        ("baseline: python3 -I -c 'import ...'", [python, "-I", "-c", BASELINE_IMPORTS], False),
        ("abssctl.pyz --version", [str(pyz), "--version"], True),
        ("abssctl.pyz --json instance list (50)", [str(pyz), *listing], True),
        ("source: abssctl.py --version", [*source, "--version"], False),
        ("source: abssctl.py --json instance list", [*source, *listing], False),
    ]


def measure(rows: list[tuple[str, list[str], bool]], runs: int) -> list[str]:
    """Print the table; return the budget failures."""
    baseline = median_ms(rows[0][1], runs)
    print(f"{'command':42} {'median ms':>10} {'x baseline':>11}  budget")
    failures = []
    for label, argv, budgeted in rows:
        ms = baseline if argv is rows[0][1] else median_ms(argv, runs)
        ratio = ms / baseline
        verdict = "-"
        if budgeted:
            ok = ms <= BUDGET_MS and ratio <= BUDGET_RATIO
            verdict = "ok" if ok else "OVER"
            if not ok:
                failures.append(f"{label}: {ms:.1f} ms, {ratio:.2f}x the baseline "
                                f"(budget {BUDGET_MS:.0f} ms and {BUDGET_RATIO}x)")
        print(f"{label:42} {ms:10.1f} {ratio:11.2f}  {verdict}")
    return failures


# ============================================================================
# --why: -X importtime
# ============================================================================

def import_times(argv: list[str]) -> dict[str, tuple[int, int]]:
    """{module: (self us, cumulative us)} from one `-X importtime` run."""
    proc = _run([argv[0], "-X", "importtime", *argv[1:]])
    found = {}
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        own, cumulative, name = line[len("import time:"):].split("|", 2)
        found[name.strip()] = (int(own), int(cumulative))
    return found


def why(python: str, pyz: Path, cfg: Path, runs: int = 5) -> None:
    """The list command's 15 costliest imports (median self time) and its extra modules."""
    argv = [python, str(pyz), "--config", str(cfg), "--json", "instance", "list"]
    samples = [import_times(argv) for _ in range(runs)]
    bare = import_times([python, "-c", "pass"])
    names = set(samples[0])
    own = {n: statistics.median(s[n][0] for s in samples if n in s) for n in names}
    cumulative = {n: statistics.median(s[n][1] for s in samples if n in s) for n in names}
    print(f"\n-X importtime, {' '.join(argv[1:])} (median of {runs}):")
    print(f"{'module':32} {'self us':>9} {'cumul. us':>10}")
    for name in sorted(names, key=lambda n: -own[n])[:15]:
        print(f"{name:32} {own[name]:9.0f} {cumulative[name]:10.0f}")
    extra = sorted(n for n in names - set(bare) if "." not in n)
    print(f"top-level modules beyond a bare interpreter ({len(extra)}): {', '.join(extra)}")


# ============================================================================
# main
# ============================================================================

def main(argv: list[str] | None = None) -> int:
    """Run the bench; 0 within budget, 1 over budget, 2 when it cannot run."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=30, help="timed runs per command (default 30)")
    p.add_argument("--why", action="store_true", help="add -X importtime diagnostics")
    p.add_argument("--python", default="/usr/bin/python3", help="target interpreter")
    args = p.parse_args(argv)
    if args.runs < 1:
        p.error("--runs must be at least 1")
    try:
        with tempfile.TemporaryDirectory(prefix="abssctl-bench-") as tmp:
            pyz = build_pyz(args.python, Path(tmp, "abssctl.pyz"))
            cfg = make_sandbox(Path(tmp, "sandbox"))
            rows = commands(args.python, pyz, cfg)
            check_list(rows[2][1])
            print(f"{args.python} ({_run([args.python, '--version']).stdout.strip()}), "
                  f"{args.runs} runs per command, median after one warm-up\n")
            failures = measure(rows, args.runs)
            if args.why:
                why(args.python, pyz, cfg)
    except BenchError as exc:
        print(f"startup bench: {exc}", file=sys.stderr)
        return 2
    for failure in failures:
        print(f"OVER BUDGET: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
