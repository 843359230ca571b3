#!/usr/bin/python3
"""abssctl: run several Actual Budget sync servers on one Debian host, one safe command at a time.

abssctl installs ``@actual-app/sync-server`` versions side by side and gives every instance its own
port, data directory, systemd unit and nginx HTTPS vhost. It is one file, standard library only.

Sections (``grep -n '^# [0-9]' abssctl.py``):
    0   header
    1   constants and errors
    2   output and utilities
    3   paths and configuration
    4   files, locks, state
    5   process runner
    6   templates
    7a  provider: systemd            7b  provider: nginx            7c  providers: npm, node
    7d  provider: TLS
    8a  plans, steps, undo           8b  operations: host and state  8c  operations: versions
    8d  operations: instances, TLS, quickstart          8e  operations: backups
    8f  operations: version switch and set-version
    8g  operations: doctor                              8h  operations: support bundle, discovery
    8i  operations: running unattended (schedules, retention, copies, auto-upgrade, notify)
    9   CLI wiring
    10  main

Exit codes:
    0    ok (dry runs and no-ops included)
    2    bad input: usage, validation, not found, already exists, declined, needs --yes
    3    host: missing tool, permission, disk, lock timeout, corrupt state, checksum mismatch
    4    a provider failed: npm, systemd, nginx, openssl, tar/zstd, the health gate
    70   internal error (a bug; rerun with --debug and report it)
    130  interrupted (Ctrl-C, SIGTERM, SIGHUP), after the undo has run
"""
# SPDX-License-Identifier: MIT

# ============================================================================
# 0. Header
# ============================================================================

from __future__ import annotations

import argparse
import enum
import json
import os
import re
import sys

__version__ = "0.1.0"

if sys.version_info < (3, 11):  # pragma: no cover - the zipapp's __main__ gates older ones first
    sys.exit("abssctl needs Python 3.11 or newer, not " + sys.version.split()[0])

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
    from typing import Any, NoReturn

__all__ = ["main", "__version__", "TEMPLATE_NAMES", "STEP_OBSERVERS", "AbssctlError", "ExitCode"]

# ============================================================================
# 1. Constants and errors
# ============================================================================

class ExitCode(enum.IntEnum):
    """Process exit statuses; nothing exits 1."""

    OK = 0
    USAGE = 2         # bad input, not found, already exists, declined, would prompt without --yes
    HOST = 3          # the host is not as needed: tool, permission, disk, lock timeout, corrupt state
    PROVIDER = 4      # what we drive failed: npm, systemd, nginx, openssl, tar, the health gate
    INTERNAL = 70     # a bug (sysexits EX_SOFTWARE), so scripts never mistake it for a provider failure
    INTERRUPTED = 130


class AbssctlError(Exception):
    """A failure we planned for: a message, an optional hint and JSON details; no traceback."""

    exit_code = ExitCode.PROVIDER

    def __init__(self, message: str, *, hint: str | None = None, why: str | None = None,
                 details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.details = dict(details or {})
        self.data: dict[str, Any] = {}          # command fields a failure still reports (switch's instances)
        if why:
            self.details["why"] = why

    @property
    def kind(self) -> str:
        return type(self).__name__


class UsageError(AbssctlError):
    """Bad input: a flag, a name, a value."""

    exit_code = ExitCode.USAGE


class NotFound(UsageError):
    """The named target does not exist."""


class AlreadyExists(UsageError):
    """The target exists with different settings."""


class Conflict(UsageError):
    """The state changed while we waited, or two things claim one resource."""


class Declined(UsageError):
    """The user answered no."""


class NeedsConfirmation(UsageError):
    """We would prompt, but there is no terminal and no --yes."""


class HostError(AbssctlError):
    """The host is not as needed."""

    exit_code = ExitCode.HOST


class MissingTool(HostError):
    """A program we drive is not installed."""


class PermissionDenied(HostError):
    """We may not read or write where we must."""


class DiskFull(HostError):
    """Not enough free space."""


class LockTimeout(HostError):
    """Another abssctl holds a lock we need."""


class CorruptState(HostError):
    """A state file cannot be trusted."""


class ChecksumMismatch(HostError):
    """An archive or file does not match its recorded checksum."""


class Incompatible(HostError):
    """A bundle was built for another node ABI, arch or libc."""


class ProviderError(AbssctlError):
    """npm, systemctl, nginx, openssl or tar failed."""

    exit_code = ExitCode.PROVIDER


class HealthGateFailed(ProviderError):
    """An instance did not become healthy in time."""


class Interrupted(AbssctlError):
    """Ctrl-C, SIGTERM or SIGHUP (raised by main() and the signal handlers)."""

    exit_code = ExitCode.INTERRUPTED


class InternalError(AbssctlError):
    """Any unexpected exception: a bug."""

    exit_code = ExitCode.INTERNAL


class LazyRegex:
    """A pattern compiled on first use: compiling them all at import costs milliseconds of start-up."""

    __slots__ = ("pattern", "flags", "_compiled")

    def __init__(self, pattern: str, flags: int = 0) -> None:
        self.pattern = pattern
        self.flags = flags
        self._compiled: re.Pattern[str] | None = None

    def _rx(self) -> re.Pattern[str]:
        if self._compiled is None:
            self._compiled = re.compile(self.pattern, self.flags)
        return self._compiled

    def match(self, text: str) -> re.Match[str] | None:
        return self._rx().match(text)

    def search(self, text: str) -> re.Match[str] | None:
        return self._rx().search(text)


NAME_RE = LazyRegex(r"^[a-z][a-z0-9-]{0,31}\Z")
RESERVED_NAMES = frozenset({"current", "versions", "backups", "all", "default"})
ACCOUNT_RE = LazyRegex(r"^[a-z_][a-z0-9_-]{0,31}\Z")
LABEL_RE = LazyRegex(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")
SEMVER_RE = LazyRegex(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?\Z")
BACKUP_ID_RE = LazyRegex(r"^\d{8}-\d{6}-[a-z][a-z0-9-]{0,31}-[0-9a-f]{4}\Z")
SAFE_PATH_RE = LazyRegex(r"^/[A-Za-z0-9._/+-]+\Z")
MAX_VERSION_LEN = 64

REGISTRY_SCHEMA = 1
OPSLOG_SCHEMA = 1
JOURNAL_SCHEMA = 1
REGISTRY_FILES = ("instances", "ports", "versions", "runtimes")
SECRET_KEY_RE = LazyRegex(r"password|secret|token|key_material", re.IGNORECASE)


def unit_name(name: str) -> str:
    """The systemd unit of an instance."""
    return f"abssctl-{name}.service"


def vhost_name(name: str) -> str:
    """The nginx vhost file name of an instance."""
    return f"abssctl-{name}.conf"


def instance_lock_name(name: str) -> str:
    """The lock file of an instance, in run_dir."""
    return f"instance-{name}.lock"


# ============================================================================
# 2. Output and utilities
# ============================================================================


class Result:
    """What a handler hands to emit(): JSON fields, text lines, warnings and the change flag."""

    __slots__ = ("data", "text", "warnings", "changed", "ok", "error")

    def __init__(self, data: dict[str, Any] | None = None, text: Sequence[str] = (), *,
                 warnings: Sequence[str] = (), changed: bool | None = None) -> None:
        self.data = dict(data or {})
        self.text = list(text)
        self.warnings = list(warnings)
        self.changed = changed
        self.ok = True
        self.error: AbssctlError | None = None


class Output:
    """The only writer to stdout and stderr: results, progress, warnings, prompts."""

    PROGRESS_EVERY = 2.0

    def __init__(self, *, json_mode: bool, quiet: bool, debug: bool, color: bool,
                 stdout: Any, stderr: Any) -> None:
        self.json = json_mode
        self.quiet = quiet
        self.debug = debug
        self.color = color
        self.stdout = stdout
        self.stderr = stderr
        self.warnings: list[str] = []
        self._last_tick = 0.0

    def _paint(self, text: str, code: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.color else text

    def progress(self, message: str, *, tick: bool = False, always: bool = False) -> None:
        """A progress line on stderr; ``tick`` lines are rate-limited to one every 2 s."""
        if self.quiet and not always:
            return
        if tick:
            import time
            now = time.monotonic()
            if now - self._last_tick < self.PROGRESS_EVERY:
                return
            self._last_tick = now
        print(f"abssctl: {message}", file=self.stderr, flush=True)

    def warn(self, message: str) -> None:
        """A warning: printed on stderr now and carried in the JSON document."""
        if message not in self.warnings:
            self.warnings.append(message)
            print(f"abssctl: {self._paint('warning', '33')}: {message}", file=self.stderr, flush=True)

    def debug_line(self, message: str) -> None:
        if self.debug:
            print(f"abssctl: debug: {message}", file=self.stderr, flush=True)

    def ask(self, question: str, choices: str) -> str:
        """Print a prompt on stderr and read one answer line from stdin."""
        print(question, file=self.stderr)
        print(choices + " ", end="", file=self.stderr, flush=True)
        line = sys.stdin.readline()
        return line.strip()

    def write_json(self, doc: dict[str, Any]) -> None:
        json.dump(doc, self.stdout, sort_keys=True, indent=2)
        self.stdout.write("\n")
        self.stdout.flush()

    def write_lines(self, lines: Iterable[str]) -> None:
        for line in lines:
            print(line, file=self.stdout)
        self.stdout.flush()

    def error(self, exc: AbssctlError) -> None:
        print(f"abssctl: {self._paint('error', '31')}: {exc.message}", file=self.stderr)
        why = exc.details.get("why")
        if why:
            print(f"  why: {why}", file=self.stderr)
        if exc.hint:
            print(f"  hint: {exc.hint}", file=self.stderr)
        self.stderr.flush()


def emit(out: Output, result: Result) -> None:
    """Render a Result: one JSON document, or text lines, on stdout."""
    if out.json:
        doc: dict[str, Any] = {"ok": result.ok, **result.data}
        warnings = sorted(set(out.warnings) | set(result.warnings))
        if result.changed is not None or warnings:
            doc["warnings"] = warnings
        if result.changed is not None:
            doc["changed"] = result.changed
        if result.error is not None:
            doc["error"] = error_doc(result.error)
        out.write_json(doc)
        return
    for warning in result.warnings:
        out.warn(warning)
    out.write_lines(result.text)


def error_doc(exc: AbssctlError) -> dict[str, Any]:
    """The ``error`` object of the JSON envelope."""
    return {"kind": exc.kind, "message": exc.message, "hint": exc.hint,
            "details": _jsonable(exc.details)}


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """Left-aligned text columns; empty values show as '-'."""
    cells = [[("-" if c in (None, "") else str(c)) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*headers).rstrip()] + [fmt.format(*r).rstrip() for r in cells]


def utc_now() -> float:
    import time
    return time.time()


def rfc3339(ts: float, *, millis: bool = False) -> str:
    """UTC RFC 3339 with a ``Z``."""
    import time
    base = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts))
    if millis:
        base += f".{int(ts * 1000) % 1000:03d}"
    return base + "Z"


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def elapsed(seconds: float) -> str:
    """``[2m41s]``-style elapsed time."""
    s = int(seconds)
    return f"{s // 60}m{s % 60:02d}s"


# -- validators -----------------------------------------------------------------

def validate_name(value: str) -> str:
    """An instance name: ^[a-z][a-z0-9-]{0,31}$, no trailing '-', not reserved."""
    if not NAME_RE.match(value) or value.endswith("-"):
        raise UsageError(f"invalid instance name {value!r}",
                         hint="use 1-32 characters: a-z first, then a-z, 0-9 or '-', not ending in '-'")
    if value in RESERVED_NAMES:
        raise UsageError(f"instance name {value!r} is reserved",
                         hint="reserved names: " + ", ".join(sorted(RESERVED_NAMES)))
    return value


def validate_account(value: str, what: str) -> str:
    """A Unix user or group name."""
    if not ACCOUNT_RE.match(value):
        raise UsageError(f"invalid {what} name {value!r}",
                         hint="use 1-32 characters from a-z, 0-9, '_' and '-', starting with a letter or '_'")
    return value


def validate_fqdn(value: str) -> str:
    """An RFC 1123 host name, lower-cased, one trailing dot stripped."""
    domain = value.lower()
    if domain.endswith("."):
        domain = domain[:-1]
    labels = domain.split(".")
    ok = (0 < len(domain) <= 253 and len(labels) >= 2
          and all(LABEL_RE.match(label) for label in labels) and not labels[-1].isdigit())
    if not ok:
        raise UsageError(f"invalid domain {value!r}",
                         hint="give a fully qualified name such as budget.example.org "
                              "(letters, digits and '-', no port, path or wildcard; IDNs in xn-- form)")
    return domain


def validate_port(value: str | int, base: int = 1, top: int = 65535) -> int:
    """A TCP port within [base, top]."""
    try:
        port = int(value, 10) if isinstance(value, str) else int(value)
    except ValueError:
        raise UsageError(f"invalid port {value!r}", hint=f"give a number from {base} to {top}") from None
    if not base <= port <= top:
        raise UsageError(f"port {port} is outside {base}-{top}",
                         hint="pick a port inside [ports] base..max, or change that range")
    return port


def validate_version(value: str, *, allow_latest: bool = True) -> str:
    """A strict SemVer 2.0.0 version (no 'v', range, tag or +build), or 'latest'."""
    if allow_latest and value == "latest":
        return value
    if len(value) > MAX_VERSION_LEN or not SEMVER_RE.match(value):
        raise UsageError(f"invalid version {value!r}",
                         hint="give an exact version such as 26.9.0 or 26.9.0-nightly.20261120"
                              + (", or latest" if allow_latest else ""))
    return value


def semver_key(version: str) -> tuple[Any, ...]:
    """A sort key giving SemVer precedence: numeric parts, then prereleases before the release."""
    m = SEMVER_RE.match(version)
    if not m:
        return (-1, -1, -1, ())
    major, minor, patch, pre = m.groups()
    if pre is None:
        pre_key: tuple[Any, ...] = ((2, ""),)     # a release sorts after all its prereleases
    else:
        pre_key = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in pre.split("."))
        pre_key = ((1, pre_key),)
    return (int(major), int(minor), int(patch), pre_key)


def validate_backup_id(value: str) -> str:
    """A backup id: YYYYMMDD-HHMMSS-<name>-<4 hex>."""
    if not BACKUP_ID_RE.match(value):
        raise UsageError(f"invalid backup id {value!r}",
                         hint="ids look like 20261126-101500-alice-3f9a; see abssctl backup list")
    return value


def bounded_int(value: str, what: str, low: int, high: int) -> int:
    """An integer flag value within [low, high]."""
    try:
        n = int(value, 10)
    except ValueError:
        raise UsageError(f"{what} must be a whole number, not {value!r}") from None
    if not low <= n <= high:
        raise UsageError(f"{what} must be between {low} and {high}, not {n}")
    return n


def redact_args(args: Mapping[str, Any]) -> dict[str, Any]:
    """Replace the values of secret-looking keys with '<redacted>'."""
    return {k: ("<redacted>" if SECRET_KEY_RE.search(k) else v) for k, v in args.items()}


# ============================================================================
# 3. Paths and configuration
# ============================================================================

DEFAULT_CONFIG = "/etc/abssctl/config.toml"

# section -> key -> (type, default, comment). Types: path, str, int, float, bool, list, argv, size.
CONFIG_SCHEMA: dict[str, dict[str, tuple[str, Any, str]]] = {
    "paths": {
        "install_root": ("path", "/srv/abssctl/versions", "server versions, one tree each"),
        "instance_root": ("path", "/srv/abssctl/instances", "one directory per instance"),
        "backup_root": ("path", "/srv/abssctl/backups", "backup archives and their index"),
        "state_dir": ("path", "/var/lib/abssctl", "registries and intent journals"),
        "log_dir": ("path", "/var/log/abssctl", "operations.jsonl and abssctl.log"),
        "run_dir": ("path", "/run/abssctl", "lock files"),
        "templates_dir": ("path", "/etc/abssctl/templates", "template overrides"),
        "tls_dir": ("path", "/etc/abssctl/tls", "per-instance certificates and keys"),
        "runtime_root": ("path", "/srv/abssctl/runtimes", "managed Node runtimes, one tree each"),
        "letsencrypt_dir": ("path", "/etc/letsencrypt", "certbot's config dir: tls auto looks in live/<domain>/"),
        "acme_webroot": ("path", "/var/lib/abssctl/acme", "every vhost serves /.well-known/acme-challenge/ "
                         "from here (world-readable)"),
        "systemd_unit_dir": ("path", "/etc/systemd/system", "where units are written"),
        "nginx_sites_available": ("path", "/etc/nginx/sites-available", "where vhosts are written"),
        "nginx_sites_enabled": ("path", "/etc/nginx/sites-enabled", "where vhosts are enabled"),
    },
    "service": {
        "user": ("str", "actual-sync", "the shared unprivileged user: runs the smoke start of version install "
                 "and old-style instances (until doctor --fix moves them to their own users)"),
        "group": ("str", "actual-sync", "the shared group; registries are readable by it"),
        "user_prefix": ("str", "actual-", "each instance runs as its own system user and group, this prefix plus "
                        "its name (actual-alice); empty: every instance runs as the shared user"),
        "bank_sync": ("bool", True, "false: the units may reach only localhost (IPAddressDeny=any, "
                      "IPAddressAllow=localhost); bank sync needs the internet"),
    },
    "ports": {
        "base": ("int", 5006, "lowest port handed to an instance"),
        "max": ("int", 5999, "highest port handed to an instance"),
        "bind": ("str", "127.0.0.1", "address the servers listen on"),
    },
    "nginx": {
        "http_port": ("int", 80, "port of the redirect to HTTPS"),
        "https_port": ("int", 443, "port of the HTTPS vhosts"),
        "client_max_body_size": ("size", "50M", "must cover the server's 50 MB sync upload limit"),
        "server_name_suffix": ("str", "", "instances default to <name>.<suffix>"),
        "block_internal": ("bool", True, "deny /metrics and /info except from loopback"),
    },
    "npm": {
        "package": ("str", "@actual-app/sync-server", "the npm package of the server"),
        "registry": ("str", "", "empty: npm's own configuration"),
        "allow_scripts": ("list", ["better-sqlite3", "bcrypt", "argon2"],
                          "native modules whose install scripts must run"),
    },
    "node": {
        "runtime": ("str", "managed", "managed: abssctl brings the node each version needs; system: [commands] node"),
        "package": ("str", "node-linux-{arch}", "npm package of a managed runtime ({arch}: x64 or arm64)"),
        "default_major": ("int", 22, "node major for a version that declares no engines.node"),
    },
    "tls": {
        "default_source": ("str", "auto", "auto (a certbot lineage, else the system pair when it covers the "
                           "domain, else self-signed), system, self-signed or custom"),
        "system_cert": ("path", "/etc/ssl/private/cert.pem", "the host certificate (TurnKey layout)"),
        "system_key": ("path", "/etc/ssl/private/cert.key", "the host key"),
        "acme_email": ("str", "", "tls acme: the account email certbot registers (empty: none)"),
        "acme_server": ("str", "", "tls acme: the ACME directory URL (empty: certbot's default, Let's Encrypt)"),
    },
    "backups": {
        "compression": ("str", "auto", "auto, zstd, gzip or none"),
        "keep": ("int", 10, "backups kept per instance by prune"),
        "schedule": ("str", "daily", "OnCalendar= of abssctl-backup.timer (backup schedule enable --calendar)"),
        "keep_last": ("int", 7, "retention policy: the newest N backups of each instance"),
        "keep_daily": ("int", 7, "retention policy: the newest backup of each of the last N days (UTC)"),
        "keep_weekly": ("int", 4, "retention policy: the newest backup of each of the last N ISO weeks"),
        "keep_monthly": ("int", 6, "retention policy: the newest backup of each of the last N months"),
        "verify": ("bool", True, "backup schedule run verifies each new backup (--deep)"),
        "copy_to": ("str", "", "empty, or a mounted disk or share: copies go to <dir>/<hostname>/<instance>/"),
        "restore_test": ("str", "weekly", "never, daily or weekly: how often the schedule runs a restore test"),
    },
    "upgrade": {
        "calendar": ("str", "weekly", "OnCalendar= of abssctl-upgrade.timer"),
        "to": ("str", "minor", "how far version upgrade --auto goes: patch, minor or latest"),
    },
    "notify": {
        "command": ("list", [], "argv run when a scheduled service fails; it gets a summary on stdin"),
    },
    "health": {
        "timeout": ("float", 90.0, "seconds the health gate waits"),
        "interval": ("float", 0.5, "seconds between health polls"),
    },
    "locks": {
        "timeout": ("float", 30.0, "seconds to wait for a lock"),
    },
    "commands": {
        "systemctl": ("argv", ["systemctl"], "argv prefix"),
        "journalctl": ("argv", ["journalctl"], "argv prefix"),
        "nginx": ("argv", ["nginx"], "argv prefix"),
        "nginx_reload": ("argv", ["systemctl", "reload", "nginx"], "full argv"),
        "node": ("argv", ["node"], "argv prefix"),
        "npm": ("argv", ["npm"], "argv prefix"),
        "openssl": ("argv", ["openssl"], "argv prefix"),
        "zstd": ("argv", ["zstd"], "argv prefix"),
        "useradd": ("argv", ["useradd"], "argv prefix"),
        "groupadd": ("argv", ["groupadd"], "argv prefix"),
        "usermod": ("argv", ["usermod"], "argv prefix; instance rename renames the instance's user"),
        "groupmod": ("argv", ["groupmod"], "argv prefix; instance rename renames the instance's group"),
        "userdel": ("argv", ["userdel"], "argv prefix; instance delete removes the instance's user"),
        "groupdel": ("argv", ["groupdel"], "argv prefix; instance delete removes the instance's group"),
        "apt_get": ("argv", ["apt-get"], "argv prefix; quickstart installs missing Debian packages with it"),
        "certbot": ("argv", ["certbot"], "argv prefix; tls acme runs certbot certonly --webroot with it"),
        "systemd_analyze": ("argv", ["systemd-analyze"], "argv prefix; checks calendars and units before enabling "
                            "them, and doctor reports each unit's exposure"),
    },
}

CHOICES = {
    ("tls", "default_source"): ("auto", "system", "self-signed", "custom"),
    ("backups", "compression"): ("auto", "zstd", "gzip", "none"),
    ("node", "runtime"): ("managed", "system"),
    ("backups", "restore_test"): ("never", "daily", "weekly"),
    ("upgrade", "to"): ("patch", "minor", "latest"),
}
SIZE_RE = LazyRegex(r"^[1-9][0-9]{0,5}[kKmMgG]?\Z")
RANGES = {
    ("ports", "base"): (1, 65535), ("ports", "max"): (1, 65535),
    ("nginx", "http_port"): (1, 65535), ("nginx", "https_port"): (1, 65535),
    ("backups", "keep"): (1, 1000), ("health", "timeout"): (1, 3600),
    ("health", "interval"): (0.01, 60), ("locks", "timeout"): (0, 86400),
    ("node", "default_major"): (18, 98),
    ("backups", "keep_last"): (0, 1000), ("backups", "keep_daily"): (0, 1000),
    ("backups", "keep_weekly"): (0, 1000), ("backups", "keep_monthly"): (0, 1000),
}


class Config:
    """The effective configuration: values[section][key] and where each came from."""

    __slots__ = ("path", "path_exists", "values", "sources", "unknown")

    def __init__(self, path: str, path_exists: bool, values: dict[str, dict[str, Any]],
                 sources: dict[str, str], unknown: list[str]) -> None:
        self.path = path
        self.path_exists = path_exists
        self.values = values
        self.sources = sources
        self.unknown = unknown

    def get(self, section: str, key: str) -> Any:
        return self.values[section][key]

    def command(self, name: str) -> list[str]:
        return list(self.values["commands"][name])


class ConfigProblem:
    """One invalid value: its key, source and what is wrong."""

    __slots__ = ("key", "source", "message")

    def __init__(self, key: str, source: str, message: str) -> None:
        self.key, self.source, self.message = key, source, message

    def __str__(self) -> str:
        return f"{self.key} ({self.source}): {self.message}"


def _coerce(section: str, key: str, kind: str, raw: Any, from_env: bool) -> Any:
    """Type one value by the schema; raise ValueError with a reason."""
    if kind in ("path", "str", "size"):
        if not isinstance(raw, str):
            raise ValueError(f"expected a string, got {type(raw).__name__}")
        if kind == "path" and not SAFE_PATH_RE.match(raw):
            raise ValueError(f"{raw!r} is not an absolute path made of A-Z a-z 0-9 . _ / + -")
        if kind == "path" and ("/../" in raw + "/" or "/./" in raw + "/"):
            raise ValueError(f"{raw!r} must not contain '.' or '..' components")
        if kind == "size" and not SIZE_RE.match(raw):
            raise ValueError(f"{raw!r} is not an nginx size such as 50M")
        choices = CHOICES.get((section, key))
        if choices and raw not in choices:
            raise ValueError(f"{raw!r} is not one of {', '.join(choices)}")
        return raw
    if kind == "bool":
        if from_env and isinstance(raw, str) and raw.lower() in ("1", "true", "yes", "on", "0", "false",
                                                                 "no", "off"):
            return raw.lower() in ("1", "true", "yes", "on")
        if not isinstance(raw, bool):
            raise ValueError(f"expected true or false, got {raw!r}")
        return raw
    if kind in ("int", "float"):
        value: float
        if from_env and isinstance(raw, str):
            try:
                value = int(raw, 10) if kind == "int" else float(raw)
            except ValueError:
                raise ValueError(f"expected a number, got {raw!r}") from None
        elif isinstance(raw, bool) or not isinstance(raw, (int, float)) or (
                kind == "int" and not isinstance(raw, int)):
            raise ValueError(f"expected {'an integer' if kind == 'int' else 'a number'}, got {raw!r}")
        else:
            value = raw
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"expected a finite number, got {raw!r}")
        low, high = RANGES.get((section, key), (float("-inf"), float("inf")))
        if not low <= value <= high:
            raise ValueError(f"{value} is outside {low}-{high}")
        return float(value) if kind == "float" else int(value)
    if kind in ("list", "argv"):
        if from_env and isinstance(raw, str):
            text = raw.strip()
            if text.startswith("["):
                try:
                    raw = json.loads(text)
                except ValueError:
                    raise ValueError("is not a valid JSON array") from None
            else:
                raw = [w for w in re.split(r"[,\s]+", text) if w]
        if not isinstance(raw, list) or not all(isinstance(w, str) and w for w in raw):
            raise ValueError("expected a list of non-empty strings")
        if kind == "argv" and not raw:
            raise ValueError("expected at least the program name")
        if any("\n" in w or "\0" in w for w in raw):
            raise ValueError("must not contain newlines or NUL")
        return list(raw)
    raise ValueError(f"unknown type {kind}")  # pragma: no cover - schema bug


SIMPLE_TOML_VALUE = LazyRegex(r'^(?:"[^"\\\x00-\x1f]*"|-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?|true|false|'
                               r'\[\s*(?:"[^"\\\x00-\x1f]*"\s*(?:,\s*"[^"\\\x00-\x1f]*"\s*)*,?)?\])\Z')


def _simple_toml(text: str) -> dict[str, Any] | None:
    """The plain subset abssctl writes (sections, key = string/number/bool/list of strings, comments)
    without importing tomllib, which costs ~9 ms of every start. None: let tomllib read it."""
    doc: dict[str, Any] = {}
    table: dict[str, Any] = doc
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            name = line[1:-1] if line.endswith("]") else ""
            if not re.match(r"^[a-z_]+$", name) or name in doc:
                return None
            table = doc[name] = {}
            continue
        key, sep, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not re.match(r"^[a-z_]+$", key) or key in table or not SIMPLE_TOML_VALUE.match(value):
            return None
        table[key] = json.loads(value)        # each accepted form means the same in TOML and JSON
    return doc


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except PermissionError:
        raise PermissionDenied(f"cannot read {path}: permission denied") from None
    except IsADirectoryError:
        raise UsageError(f"config file {path} is a directory") from None
    except UnicodeDecodeError:
        raise UsageError(f"cannot parse {path}: not UTF-8 text") from None
    try:
        simple = _simple_toml(text)
    except ValueError:
        simple = None
    if simple is not None:
        return simple
    import tomllib
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"cannot parse {path}: {exc}", hint="fix the TOML syntax, then run abssctl config check") from None


def load_config(path_flag: str | None, environ: Mapping[str, str], flags: Mapping[str, Any], *,
                may_be_missing: bool = False) -> tuple[Config, list[ConfigProblem]]:
    """Defaults, then the file, then ABSSCTL_* env, then flags: the one place precedence lives."""
    path = path_flag or environ.get("ABSSCTL_CONFIG") or DEFAULT_CONFIG
    explicit = bool(path_flag or environ.get("ABSSCTL_CONFIG"))
    values = {s: {k: (list(v[1]) if isinstance(v[1], list) else v[1]) for k, v in keys.items()}
              for s, keys in CONFIG_SCHEMA.items()}
    sources = {f"{s}.{k}": "default" for s, keys in CONFIG_SCHEMA.items() for k in keys}
    problems: list[ConfigProblem] = []
    unknown: list[str] = []
    exists = os.path.exists(path)
    if not exists and explicit and not may_be_missing:
        raise UsageError(f"config file {path} does not exist",
                         hint="pass an existing file with --config, or run abssctl init to write one")
    if exists:
        doc = _read_toml(path)
        for section, keys in doc.items():
            if section not in CONFIG_SCHEMA or not isinstance(keys, dict):
                unknown.append(f"{section} (in {path})")
                continue
            for key, raw in keys.items():
                _apply_value(values, sources, problems, unknown, section, key, raw, f"file:{path}", False)
    for name in sorted(environ):
        if not name.startswith("ABSSCTL_") or name == "ABSSCTL_CONFIG":
            continue
        section, sep, key = name[len("ABSSCTL_"):].lower().partition("__")
        if not sep:
            unknown.append(f"{name} (environment)")
            continue
        _apply_value(values, sources, problems, unknown, section, key, environ[name], f"env:{name}", True)
    for dotted, raw in flags.items():
        section, key = dotted.split(".")
        flag = "--" + key.replace("_", "-") if section != "locks" else "--lock-timeout"
        _apply_value(values, sources, problems, unknown, section, key, raw, f"flag:{flag}", False)
    _cross_check(values, sources, problems)
    return Config(path, exists, values, sources, unknown), problems


def _apply_value(values: dict[str, dict[str, Any]], sources: dict[str, str], problems: list[ConfigProblem],
                 unknown: list[str], section: str, key: str, raw: Any, source: str, from_env: bool) -> None:
    spec = CONFIG_SCHEMA.get(section, {}).get(key)
    if spec is None:
        where = source.partition(":")[2] if source.startswith("env:") else f"{section}.{key} in {source[5:]}"
        unknown.append(where if source.startswith("env:") else where)
        return
    try:
        values[section][key] = _coerce(section, key, spec[0], raw, from_env)
        sources[f"{section}.{key}"] = source
    except ValueError as exc:
        problems.append(ConfigProblem(f"{section}.{key}", source, str(exc)))


def _cross_check(values: dict[str, dict[str, Any]], sources: dict[str, str],
                 problems: list[ConfigProblem]) -> None:
    ports = values["ports"]
    if ports["base"] > ports["max"]:
        problems.append(ConfigProblem("ports.base", sources["ports.base"],
                                      f"{ports['base']} is above ports.max ({ports['max']})"))
    for key in ("user", "group"):
        if not ACCOUNT_RE.match(values["service"][key]):
            problems.append(ConfigProblem(f"service.{key}", sources[f"service.{key}"],
                                          f"{values['service'][key]!r} is not a valid account name"))
    prefix = values["service"]["user_prefix"]
    if prefix and not (ACCOUNT_RE.match(prefix) and len(prefix) <= 24):
        problems.append(ConfigProblem("service.user_prefix", sources["service.user_prefix"],
                                      f"{prefix!r} must be empty or 1-24 characters of a valid account name"))
    if not re.match(r"^[0-9a-fA-F:.]+\Z", values["ports"]["bind"]):
        problems.append(ConfigProblem("ports.bind", sources["ports.bind"], "must be an IP address"))


def config_error(problems: Sequence[ConfigProblem]) -> UsageError:
    """One UsageError naming every invalid key and its source."""
    first = problems[0]
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return UsageError(f"invalid configuration: {first}{more}",
                      hint="fix the value, then run abssctl config check",
                      details={"problems": [{"key": p.key, "source": p.source, "message": p.message}
                                            for p in problems]})


class Paths:
    """Every host path abssctl uses, derived from [paths]."""

    def __init__(self, config: Config) -> None:
        p = config.values["paths"]
        self.config_file = config.path
        self.config_dir = os.path.dirname(config.path)
        self.install_root = p["install_root"]
        self.instance_root = p["instance_root"]
        self.backup_root = p["backup_root"]
        self.state_dir = p["state_dir"]
        self.log_dir = p["log_dir"]
        self.run_dir = p["run_dir"]
        self.templates_dir = p["templates_dir"]
        self.tls_dir = p["tls_dir"]
        self.letsencrypt_dir = p["letsencrypt_dir"]
        self.acme_webroot = p["acme_webroot"]
        self.unit_dir = p["systemd_unit_dir"]
        self.sites_available = p["nginx_sites_available"]
        self.sites_enabled = p["nginx_sites_enabled"]
        self.registry_dir = os.path.join(self.state_dir, "registry")
        self.journal_dir = os.path.join(self.state_dir, "journal")
        self.backup_index = os.path.join(self.backup_root, "backups.json")
        self.oplog = os.path.join(self.log_dir, "operations.jsonl")
        self.textlog = os.path.join(self.log_dir, "abssctl.log")
        self.current = os.path.join(self.install_root, "current")
        self.runtime_root = p["runtime_root"]

    def registry(self, name: str) -> str:
        return os.path.join(self.registry_dir, f"{name}.json")

    def lock(self, name: str) -> str:
        return os.path.join(self.run_dir, name)

    def instance_dir(self, name: str) -> str:
        return os.path.join(self.instance_root, name)

    def unit_file(self, name: str) -> str:
        return os.path.join(self.unit_dir, unit_name(name))

    def vhost_file(self, name: str) -> str:
        return os.path.join(self.sites_available, vhost_name(name))

    def vhost_link(self, name: str) -> str:
        return os.path.join(self.sites_enabled, vhost_name(name))


def config_template(config: Config) -> str:
    """A commented config.toml listing every key with its default."""
    lines = ["# abssctl configuration. Every key is shown with its built-in default, commented out.",
             "# Precedence: command-line flags > ABSSCTL_<SECTION>__<KEY> environment > this file >",
             "# defaults. Check changes with: abssctl config check", ""]
    for section, keys in CONFIG_SCHEMA.items():
        lines.append(f"[{section}]")
        for key, (_kind, default, comment) in keys.items():
            lines.append(f"# {comment}")
            lines.append(f"# {key} = {_toml_value(default)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value)


# ============================================================================
# 4. Files, locks, state
# ============================================================================


def fsync_dir(path: str) -> None:
    """Make a rename or create inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_dir(path: str, mode: int) -> None:
    """Create ``path`` (mode ``mode``) and any missing parents (0755), whatever the umask."""
    if os.path.isdir(path):
        return
    parent = os.path.dirname(path)
    if parent and parent != path:
        ensure_dir(parent, 0o755)
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        if not os.path.isdir(path):
            raise
        return
    os.chmod(path, mode)


def atomic_write(path: str, data: bytes, *, mode: int = 0o644, uid: int = -1, gid: int = -1,
                 tag: str = "") -> None:
    """Write ``data`` so readers see the old file or the new one, never half of either."""
    directory, base = os.path.split(path)
    tmp = os.path.join(directory, f".abssctl-tmp-{tag or os.getpid()}-{base}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        try:
            os.fchmod(fd, mode)
            if uid != -1 or gid != -1:
                os.fchown(fd, uid, gid)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(directory)


def swap_symlink(link: str, target: str, tag: str) -> None:
    """Point ``link`` at ``target`` atomically: a symlink under a temp name, then rename over."""
    tmp = os.path.join(os.path.dirname(link), f".abssctl-tmp-{tag}-{os.path.basename(link)}")
    if os.path.lexists(tmp):
        os.unlink(tmp)
    os.symlink(target, tmp)
    os.replace(tmp, link)
    fsync_dir(os.path.dirname(link))


def snapshot(path: str) -> dict[str, Any] | None:
    """A journal-safe picture of one path: None (absent), a symlink target, or base64 bytes + mode."""
    import base64
    if os.path.islink(path):
        return {"link": os.readlink(path)}
    if not os.path.isfile(path):
        return None
    st = os.stat(path)
    with open(path, "rb") as f:
        data = f.read()
    return {"b64": base64.b64encode(data).decode(), "mode": st.st_mode & 0o7777, "uid": st.st_uid,
            "gid": st.st_gid}


def snapshot_restore(path: str, snap: Mapping[str, Any] | None, tag: str) -> None:
    """Put a path back as ``snapshot()`` saw it."""
    import base64
    if snap is None:
        if os.path.lexists(path):
            os.unlink(path)
        return
    if "link" in snap:
        swap_symlink(path, snap["link"], tag)
        return
    atomic_write(path, base64.b64decode(snap["b64"]), mode=int(snap.get("mode", 0o644)),
                 uid=int(snap.get("uid", -1)), gid=int(snap.get("gid", -1)), tag=tag)


def read_json_file(path: str) -> Any:
    """Parse a JSON file; a missing file reads as None; bad JSON raises CorruptState."""
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        return None
    except PermissionError:
        raise PermissionDenied(f"cannot read {path}: permission denied",
                               hint="run as root, or as a member of the service group") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptState(f"{path} is not valid JSON ({exc})",
                           hint=f"restore it from {path}.prev, or run abssctl init --rebuild-state") from None


def pid_alive(pid: int) -> bool:
    """True when a process with this PID exists on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class LockHolder:
    """What a lock file says about the process that took it."""

    __slots__ = ("pid", "command", "op_id", "mode", "acquired_at", "host")

    def __init__(self, doc: Mapping[str, Any]) -> None:
        self.pid = int(doc.get("pid") or 0)
        self.command = str(doc.get("command") or "?")
        self.op_id = str(doc.get("op_id") or "")
        self.mode = str(doc.get("mode") or "")
        self.acquired_at = float(doc.get("acquired_at") or 0.0)
        self.host = str(doc.get("host") or "")

    def describe(self, now: float) -> str:
        if not pid_alive(self.pid):
            return "an unknown process (the recorded holder is gone)"
        return f"pid {self.pid} ({self.command}, {int(max(0, now - self.acquired_at))} s)"


def read_lock_holder(path: str) -> LockHolder | None:
    """The metadata inside a lock file, or None."""
    try:
        with open(path, "rb") as f:
            raw = f.read(4096)
        doc = json.loads(raw) if raw.strip() else None
    except (OSError, ValueError):
        return None
    return LockHolder(doc) if isinstance(doc, dict) else None


def lock_state(path: str) -> str:
    """free, held, stale (metadata names a dead PID, flock free) or held-unknown."""
    import fcntl
    holder = read_lock_holder(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return "free"
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return "held" if holder and pid_alive(holder.pid) else "held-unknown"
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
    return "stale" if holder and holder.pid and not pid_alive(holder.pid) else "free"


class FileLock:
    """An flock on a file that is never deleted (deleting it would let a waiter lock a dead inode)."""

    def __init__(self, path: str, *, shared: bool = False) -> None:
        self.path = path
        self.shared = shared
        self.fd: int | None = None

    def acquire(self, timeout: float, meta: Mapping[str, Any], on_wait: Callable[[str], None]) -> float:
        """Take the lock within ``timeout`` seconds; returns the seconds waited."""
        import fcntl
        import random
        import time
        ensure_dir(os.path.dirname(self.path), 0o755)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        started = time.monotonic()
        delay, told = 0.05, False
        flag = (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB
        while True:
            try:
                fcntl.flock(fd, flag)
                break
            except BlockingIOError:
                waited = time.monotonic() - started
                holder = read_lock_holder(self.path)
                who = holder.describe(time.time()) if holder else "an unknown process"
                if waited >= timeout:
                    os.close(fd)
                    raise LockTimeout(f"{self.path} is held by {who}",
                                      hint="wait for it to finish, or raise --lock-timeout",
                                      details={"lock": self.path, "holder": holder and {
                                          "pid": holder.pid, "command": holder.command,
                                          "op_id": holder.op_id}}) from None
                if waited >= 1.0 and not told:
                    on_wait(f"waiting for lock held by {who}")
                    told = True
                time.sleep(min(delay * (0.75 + random.random() / 2), max(0.0, timeout - waited)))
                delay = min(delay * 2, 0.5)
        self.fd = fd
        if not self.shared:
            self._note(meta)
        return time.monotonic() - started

    def _note(self, meta: Mapping[str, Any]) -> None:
        assert self.fd is not None
        data = json.dumps(dict(meta), sort_keys=True).encode() + b"\n"
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)

    def release(self) -> None:
        if self.fd is not None:
            if not self.shared:
                os.ftruncate(self.fd, 0)    # a clean release leaves no holder; only a crash leaves a stale note
            os.close(self.fd)       # closing drops the flock; the file stays
            self.fd = None


class Registry:
    """One JSON document with schema_version, edited under a short flock and written atomically."""

    def __init__(self, path: str, key: str, *, lock_path: str, gid: Callable[[], int],
                 mode: int = 0o640) -> None:
        self.path = path
        self.key = key
        self.lock_path = lock_path
        self._gid = gid
        self.mode = mode

    def empty(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"schema_version": REGISTRY_SCHEMA, self.key: {}}
        if self.key == "versions":
            doc.update({"package": None, "current": None})
        return doc

    def load(self) -> dict[str, Any]:
        """The document; a missing file reads as empty."""
        doc = read_json_file(self.path)
        if doc is None:
            return self.empty()
        hint = f"restore it from {self.path}.prev, or run abssctl init --rebuild-state"
        if not isinstance(doc, dict) or not isinstance(doc.get(self.key), dict):
            raise CorruptState(f"{self.path} does not hold a {self.key} registry", hint=hint)
        schema = doc.get("schema_version")
        if not isinstance(schema, int) or schema > REGISTRY_SCHEMA or schema < 1:
            raise CorruptState(f"{self.path} has schema_version {schema!r}; this abssctl reads "
                               f"{REGISTRY_SCHEMA}", hint="upgrade abssctl, or " + hint)
        return doc

    def save(self, doc: dict[str, Any], tag: str = "") -> None:
        """Write atomically, keeping the previous version as <file>.prev."""
        data = (json.dumps(doc, sort_keys=True, indent=2) + "\n").encode()
        gid = self._gid()
        ensure_dir(os.path.dirname(self.path), 0o750 if self.mode == 0o640 else 0o700)
        if os.path.exists(self.path):
            with open(self.path, "rb") as f:
                atomic_write(self.path + ".prev", f.read(), mode=self.mode, gid=gid, tag=tag)
        atomic_write(self.path, data, mode=self.mode, gid=gid, tag=tag)

    def edit(self, tag: str = "") -> Iterator[dict[str, Any]]:
        """``with registry.edit() as doc:`` reads, lets the caller mutate, then saves."""
        import contextlib

        @contextlib.contextmanager
        def _edit() -> Iterator[dict[str, Any]]:
            lock = FileLock(self.lock_path)
            lock.acquire(10.0, {"pid": os.getpid(), "command": "registry edit"}, lambda _m: None)
            try:
                doc = self.load()
                before = json.dumps(doc, sort_keys=True)
                yield doc
                if json.dumps(doc, sort_keys=True) != before:
                    self.save(doc, tag)
            finally:
                lock.release()
        return _edit()


class OpsLog:
    """operations.jsonl (one JSON line per mutating command) and abssctl.log (the same, as text)."""

    def __init__(self, jsonl: str, text: str) -> None:
        self.jsonl = jsonl
        self.text = text

    def append(self, record: Mapping[str, Any]) -> None:
        ensure_dir(os.path.dirname(self.jsonl), 0o750)
        line = json.dumps(record, sort_keys=True) + "\n"
        self._append(self.jsonl, line)
        message = record.get("error") or {}
        summary = message.get("message") if isinstance(message, dict) else None
        level = "INFO" if record.get("result") == "ok" else "ERROR"
        self._append(self.text, f"{record['ts']} {record['op_id']} {level} {record['command']}: "
                                f"{summary or record.get('result')}\n")

    @staticmethod
    def _append(path: str, line: str) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o640)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)

    def read(self) -> list[dict[str, Any]]:
        """Every record, oldest first; lines that do not parse are skipped."""
        try:
            with open(self.jsonl, "rb") as f:
                raw = f.read().splitlines()
        except FileNotFoundError:
            return []
        except PermissionError:
            raise PermissionDenied(f"cannot read {self.jsonl}: permission denied",
                                   hint="the operations log is root-only; run as root") from None
        records = []
        for line in raw:
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if isinstance(doc, dict):
                records.append(doc)
        return records


class Journal:
    """The intent file of one operation: its plan and the undo of every step started."""

    def __init__(self, path: str, doc: dict[str, Any]) -> None:
        self.path = path
        self.doc = doc

    def write(self) -> None:
        ensure_dir(os.path.dirname(self.path), 0o700)
        data = json.dumps(self.doc, sort_keys=True).encode()
        atomic_write(self.path, data, mode=0o600, tag=self.doc.get("op_id", ""))

    def delete(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def list_journals(journal_dir: str) -> list[tuple[str, dict[str, Any] | None]]:
    """(path, document or None if unreadable) for every journal file."""
    try:
        names = sorted(os.listdir(journal_dir))
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = []
    for name in names:
        if name.endswith(".json") and not name.startswith("."):
            path = os.path.join(journal_dir, name)
            try:
                doc = read_json_file(path)
            except CorruptState:
                doc = None
            found.append((path, doc if isinstance(doc, dict) else None))
    return found


CHUNK = 1 << 20
TEMP_MARKERS = (".staging-", ".smoke-", ".trash-", ".abssctl-tmp-")


def sha256_file(path: str) -> str:
    """The sha256 of a file, read in 1 MiB chunks."""
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def read_sidecar(path: str) -> str | None:
    """The sha256 recorded in a ``<file>.sha256``-style sidecar, or None when there is none."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            words = f.read().split()
    except FileNotFoundError:
        return None
    return words[0] if words else ""


def write_sidecar(path: str, target: str, digest: str, mode: int, tag: str) -> None:
    atomic_write(path, f"{digest}  {os.path.basename(target)}\n".encode(), mode=mode, tag=tag)


def remove_tree(path: str) -> None:
    """Delete a temp, staging or trash tree abssctl made; refuses anything not named like one."""
    import shutil
    if not os.path.basename(path).startswith(TEMP_MARKERS):
        raise InternalError(f"refusing to delete {path}: not an abssctl temporary path")
    if os.path.islink(path) or os.path.isfile(path):
        os.unlink(path)
    elif os.path.isdir(path):
        shutil.rmtree(path)


def disk_free(path: str) -> int:
    """Free bytes on the filesystem holding ``path`` (or its nearest existing parent)."""
    import shutil
    probe = path
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    return shutil.disk_usage(probe).free


def tree_size(path: str) -> int:
    """Bytes under ``path`` (lstat sizes; links not followed)."""
    total = 0
    for root, dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except FileNotFoundError:
                pass
    return total


def _member_problem(name: str, prefix: str) -> str | None:
    if not name or len(name.encode()) > 4096 or "\0" in name or "\n" in name:
        return "has an empty, oversized or control-character name"
    if name.startswith("/"):
        return "is an absolute path"
    parts = name.rstrip("/").split("/")
    if any(p in ("", ".", "..") for p in parts):
        return "has an empty, '.' or '..' component"
    if not (name.rstrip("/") + "/").startswith(prefix):
        return f"is outside the expected top-level {prefix!r}"
    return None


class ExtractReport:
    """What safe_extract wrote: file count, bytes, and the sha256 of each file (relative path)."""

    __slots__ = ("files", "bytes", "sums")

    def __init__(self) -> None:
        self.files = 0
        self.bytes = 0
        self.sums: dict[str, str] = {}


def safe_extract(tar: Any, dest: str, *, prefix: str, expected: Mapping[str, str] | None,
                 max_bytes: int, allow_symlinks: bool, skip: Sequence[str] = (), dir_mode: int = 0o755,
                 file_mode: int = 0o644, uid: int = -1, gid: int = -1, source: Any = None) -> ExtractReport:
    """Write a tar stream's members under ``dest`` ourselves, refusing anything unsafe (DESIGN §6.3).

    ``prefix`` (e.g. ``tree/``) is stripped; ``expected`` maps relative paths to sha256 and every
    one must arrive intact; members named in ``skip`` (already read headers) are passed over once.
    Archive modes and owners are ignored; ours are ``dir_mode``/``file_mode`` and ``uid``/``gid``.
    Directories stay root's until every member is written, then go to ``uid``/``gid`` deepest first:
    an owner of a directory root still writes under could swap it for a symlink and steer root's next
    file out of the tree (O_NOFOLLOW guards the last component only). ``dest`` itself is the
    caller's to hand over, last. ``tar`` may be any iterable of members of ``source`` (default:
    ``tar`` itself). Raises CorruptState.
    """
    import tarfile
    source = tar if source is None else source
    created: list[str] = []

    def make_dirs(path: str) -> None:
        missing = []
        while not os.path.isdir(path) and len(path) > len(dest):
            missing.append(path)
            path = os.path.dirname(path)
        for d in reversed(missing):
            os.mkdir(d, dir_mode)
            os.chmod(d, dir_mode)
            created.append(d)

    data_filter = getattr(tarfile, "data_filter", None)     # 3.11.4+; Debian 12 has 3.11.2
    seen: set[str] = set()
    links: list[tuple[str, str]] = []
    report = ExtractReport()

    def bad(member: Any, why: str) -> NoReturn:
        raise CorruptState(f"archive member {member.name!r} {why}; nothing was installed",
                           hint="the archive is damaged or hostile; use another copy")

    for member in tar:
        if member.name in skip and member.name not in seen:
            seen.add(member.name)
            continue
        problem = _member_problem(member.name, prefix)
        if problem:
            bad(member, problem)
        if data_filter is not None:
            try:
                data_filter(member, dest)
            except tarfile.FilterError as exc:
                bad(member, f"is refused by tarfile's data filter ({exc})")
        rel = member.name.rstrip("/")[len(prefix):]
        if rel in seen:
            bad(member, "appears twice")
        seen.add(rel)
        target = os.path.join(dest, rel) if rel else dest
        if member.isdir():
            make_dirs(target)
        elif member.isreg() and not member.issparse() and member.type != tarfile.CONTTYPE:
            if report.bytes + member.size > max_bytes:
                bad(member, f"would exceed the space allowed ({human_bytes(max_bytes)})")
            make_dirs(os.path.dirname(target))
            digest = _write_member(source, member, target, file_mode, uid, gid)
            if expected is not None and rel not in expected:
                bad(member, "is not listed in the checksums")
            if expected is not None and expected[rel] != digest:
                raise ChecksumMismatch(f"archive member {member.name!r} does not match its recorded sha256; "
                                       "nothing was installed", hint="the archive was modified or damaged; "
                                       "use another copy")
            report.files += 1
            report.bytes += member.size
            report.sums[rel] = digest
        elif member.issym() and allow_symlinks:
            resolved = os.path.normpath(os.path.join(os.path.dirname(target), member.linkname))
            if member.linkname.startswith("/") or not (resolved + "/").startswith(dest.rstrip("/") + "/"):
                bad(member, f"is a symlink pointing outside the tree ({member.linkname})")
            links.append((target, member.linkname))
        else:
            bad(member, "is a link, device, FIFO or sparse file, which archives may not hold")
    for target, linkname in links:                # last, so no file is ever written through one
        make_dirs(os.path.dirname(target))
        os.symlink(linkname, target)
    if uid != -1 or gid != -1:
        for d in sorted(created, key=lambda p: p.count("/"), reverse=True):
            os.chown(d, uid, gid, follow_symlinks=False)
    if expected is not None and set(expected) - set(report.sums):
        missing = sorted(set(expected) - set(report.sums))
        raise CorruptState(f"archive is missing {len(missing)} file(s), e.g. {missing[0]}",
                           hint="the archive is truncated or damaged; use another copy")
    return report


def _write_member(tar: Any, member: Any, target: str, mode: int, uid: int, gid: int) -> str:
    import hashlib
    h = hashlib.sha256()
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        tar.fileobj.seek(member.offset_data)
        if tar.fileobj.copy_to(fd, member.size, h.update) != member.size:
            raise CorruptState(f"archive member {member.name!r} is truncated")
        if uid != -1 or gid != -1:
            os.fchown(fd, uid, gid)
        executable = mode == 0o644 and member.mode & 0o100    # package trees keep their bin scripts
        os.fchmod(fd, 0o755 if executable else mode)
    finally:
        os.close(fd)
    return h.hexdigest()


def write_all(fd: int, data: Any) -> None:
    """os.write until every byte is out: a short write must not drop data."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


FILE_SLICE = 32 << 10


def write_file(fd: int, data: Any) -> None:
    """write_all for a regular file, in 32 KiB writes. The page cache sizes a file's folios by the
    write (large folios, Linux 6.x ext4): up to 32 KiB (order 3) they come from the per-cpu lists of
    recently freed pages, larger ones from the buddy lists, which on a VM that hands free memory back
    to its host (free page reporting) hold pages the host must fault in again. On the 2-core bench
    VM, restoring 1 GiB after its free memory had sat for 5 s took 4.0-4.3 s in 1 MiB writes and
    1.6-4.1 s (median 2.5) in 32 KiB ones, tar -x 1.0-4.0 s; into memory just freed, 1.7 s either
    way. tar(1) writes 10 KiB at a time."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view[:FILE_SLICE]):]


def widen_pipe(fd: int) -> None:
    """Ask for a 1 MiB pipe buffer (F_SETPIPE_SZ) so each hop moves a whole chunk, not 64 KiB."""
    import fcntl
    try:
        fcntl.fcntl(fd, 1031, CHUNK)
    except OSError:
        pass


class ForwardReader:
    """A pipe or stream shaped as tarfile's plain (non-stream) TarFile wants it: read, tell, and seek
    forwards only. Member data goes through ``copy_to`` and one reused buffer, copied once; tarfile's
    own stream mode would copy each chunk three more times."""

    def __init__(self, read_into: Callable[[memoryview], int]) -> None:
        self._read_into = read_into
        self._buf = bytearray(CHUNK)
        self.pos = 0

    def readinto(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        got = 0
        while got < len(view):
            n = self._read_into(view[got:])
            if not n:
                break
            got += n
        self.pos += got
        return got

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            parts = []
            while chunk := self.read(CHUNK):
                parts.append(chunk)
            return b"".join(parts)
        buf = bytearray(n)
        return bytes(buf[:self.readinto(buf)])

    def tell(self) -> int:
        return self.pos

    def seekable(self) -> bool:
        return False

    def seek(self, pos: int, whence: int = 0) -> int:
        if whence != 0 or pos < self.pos:
            raise OSError("a streamed archive cannot seek backwards")
        view = memoryview(self._buf)
        while self.pos < pos and self.readinto(view[:min(CHUNK, pos - self.pos)]):
            pass
        return self.pos

    def copy_to(self, fd: int, size: int, on_chunk: Callable[[Any], Any]) -> int:
        """Copy the next ``size`` bytes to ``fd``, passing each chunk to ``on_chunk``; returns bytes copied."""
        view = memoryview(self._buf)
        left = size
        while left:
            n = self.readinto(view[:min(left, CHUNK)])
            if not n:
                break
            on_chunk(view[:n])
            write_file(fd, view[:n])
            left -= n
        return size - left


def open_tar_reader(read_into: Callable[[memoryview], int]) -> Any:
    """A plain TarFile over a ForwardReader (raises tarfile.ReadError on a non-tar stream)."""
    import tarfile
    return tarfile.TarFile(fileobj=ForwardReader(read_into), mode="r")


def fd_reader(fd: int) -> Callable[[memoryview], int]:
    return lambda view: os.readv(fd, [view])


class TarWriter:
    """A stream tar writer with tarfile's PAX headers and padding that copies member data through one
    reused buffer into ``write`` (tarfile's own stream mode copies every chunk several times)."""

    def __init__(self, write: Callable[[Any], Any]) -> None:
        self._write = write
        self._buf = bytearray(CHUNK)
        self.offset = 0

    def _out(self, data: Any) -> None:
        self._write(data)
        self.offset += len(data)

    def addfile(self, info: Any, fileobj: Any = None, on_chunk: Callable[[Any], Any] | None = None) -> None:
        """Write ``info``'s header, then ``info.size`` bytes of ``fileobj``; OSError if it runs short."""
        import tarfile
        self._out(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
        if fileobj is None or not info.size:
            return
        view = memoryview(self._buf)
        left = info.size
        while left:
            n = fileobj.readinto(view[:min(left, CHUNK)])
            if not n:
                raise OSError(f"{info.name} shrank while it was archived")
            if on_chunk is not None:
                on_chunk(view[:n])
            self._out(view[:n])
            left -= n
        if info.size % 512:
            self._out(bytes(512 - info.size % 512))

    def close(self) -> None:
        """The two zero blocks that end an archive, padded to a whole 10 KiB record as tar(1) does."""
        self._out(bytes(1024))
        if self.offset % 10240:
            self._out(bytes(10240 - self.offset % 10240))


# ============================================================================
# 5. Process runner
# ============================================================================

TIMEOUTS = {"certbot": 300.0, "systemctl": 60.0, "nginx": 30.0, "nginx_reload": 30.0, "openssl": 30.0,
            "journalctl": 30.0, "npm": 60.0, "node": 60.0, "zstd": 60.0,
            "useradd": 60.0, "groupadd": 60.0, "usermod": 60.0, "groupmod": 60.0, "userdel": 60.0,
            "groupdel": 60.0, "systemd_analyze": 20.0, "apt_get": 600.0}
PINNED_ENV = {"LC_ALL": "C", "LANG": "C", "PAGER": "cat", "SYSTEMD_PAGER": "",
              "SYSTEMD_COLORS": "0", "NO_COLOR": "1"}

INSTALL_HINTS = {
    "nginx": "apt-get install nginx-light", "openssl": "apt-get install openssl",
    "zstd": "apt-get install zstd", "npm": "apt-get install npm (or install Node.js with npm)",
    "node": "apt-get install nodejs", "systemctl": "abssctl needs systemd (apt-get install systemd)",
    "journalctl": "apt-get install systemd", "useradd": "apt-get install passwd",
    "groupadd": "apt-get install passwd", "usermod": "apt-get install passwd",
    "groupmod": "apt-get install passwd", "userdel": "apt-get install passwd", "groupdel": "apt-get install passwd",
    "systemd_analyze": "apt-get install systemd",
    "apt_get": "this host has no apt-get: install the packages with its own package manager",
    "certbot": "apt-get install certbot",
}


class Completed:
    """The outcome of one child process."""

    __slots__ = ("argv", "returncode", "stdout", "stderr")

    def __init__(self, argv: Sequence[str], returncode: int, stdout: str, stderr: str) -> None:
        self.argv = tuple(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr


def _tail(text: str, n: int = 20) -> list[str]:
    return [line for line in text.splitlines() if line.strip()][-n:]


def describe_exit(argv: Sequence[str], rc: int) -> str:
    import shlex
    cmd = shlex.join(argv)
    if rc < 0:
        import signal
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = f"signal {-rc}"
        return f"{cmd} was killed by {name}"
    if rc == 127:
        return f"{cmd} exited 127 (a program it runs was not found)"
    return f"{cmd} exited {rc}"


class Runner:
    """Every child process goes through here: pinned env, timeouts, error mapping, dry runs."""

    def __init__(self, config: Config, out: Output, *, dry_run: bool) -> None:
        self.commands = config.values["commands"]
        self.out = out
        self.dry_run = dry_run
        self.recorded: list[list[str]] = []

    def with_commands(self, **commands: Sequence[str]) -> Runner:
        """A copy of this Runner whose ``[commands]`` entries are replaced (a managed runtime's node/npm)."""
        import copy
        other = copy.copy(self)
        other.commands = dict(self.commands, **{k: list(v) for k, v in commands.items()})
        return other

    def argv(self, tool: str, *args: str) -> list[str]:
        """The configured prefix for ``tool`` followed by ``args``."""
        return [*self.commands[tool], *args]

    def _env(self, extra: Mapping[str, str] | None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ABSSCTL_")}
        env.update(PINNED_ENV)
        env.update(extra or {})
        return env

    def _resolve(self, tool: str, argv: Sequence[str]) -> str:
        import shutil
        exe = argv[0] if "/" in argv[0] else shutil.which(argv[0])
        if exe is None or not os.path.exists(exe):
            raise MissingTool(f"{argv[0]} is not installed (needed for {tool})",
                              hint=INSTALL_HINTS.get(tool, f"install {argv[0]}"),
                              details={"tool": tool, "argv0": argv[0]})
        return exe

    def available(self, tool: str) -> bool:
        """True when the configured program for ``tool`` exists."""
        try:
            self._resolve(tool, self.commands[tool])
        except MissingTool:
            return False
        return True

    def run(self, tool: str, args: Sequence[str], *, mutating: bool, timeout: float | None = None,
            check: bool = True, input: str | None = None, cwd: str | None = None,
            user: str | None = None, umask: int | None = None,
            env_extra: Mapping[str, str] | None = None) -> Completed:
        """Run ``[commands] tool`` + args and return its output; raise on failure."""
        import shlex
        import subprocess
        argv = self.argv(tool, *args)
        exe = self._resolve(tool, argv)
        self.out.debug_line("run: " + shlex.join(argv))
        if mutating and self.dry_run:
            self.recorded.append(argv)
            return Completed(argv, 0, "", "")
        limit = timeout if timeout is not None else TIMEOUTS.get(tool, 60.0)
        try:
            proc = subprocess.run([exe, *argv[1:]], input=input, capture_output=True, text=True,
                                  timeout=limit, env=self._env(env_extra), cwd=cwd, check=False,
                                  user=user, umask=-1 if umask is None else umask,
                                  stdin=None if input is not None else subprocess.DEVNULL,
                                  errors="replace")
        except subprocess.TimeoutExpired:
            raise ProviderError(f"{shlex.join(argv)}: no answer in {limit:.0f} s",
                                details={"argv": argv, "timeout": limit}) from None
        except PermissionError as exc:
            raise PermissionDenied(f"cannot run {exe}: {exc.strerror}") from None
        except OSError as exc:
            raise HostError(f"cannot run {exe}: {exc.strerror or exc}") from None
        done = Completed(argv, proc.returncode, proc.stdout, proc.stderr)
        if check and done.returncode != 0:
            raise ProviderError(describe_exit(argv, done.returncode),
                                details={"argv": argv, "rc": done.returncode,
                                         "stderr": _tail(done.stderr) or _tail(done.stdout)})
        return done


    def popen(self, tool: str, args: Sequence[str], *, cwd: str | None = None, user: str | None = None,
              umask: int | None = None, env_extra: Mapping[str, str] | None = None,
              stdin: Any = None, stdout: Any = None, stderr: Any = None, text: bool = False,
              new_session: bool = True) -> Any:
        """Start a child that dies with us (PR_SET_PDEATHSIG), in its own process group by default.

        ``stdin``/``stdout``/``stderr`` take files, fds, or the words "pipe" and (stderr) "stdout", so
        callers outside this section never need the subprocess module.
        """
        import shlex
        import subprocess
        argv = self.argv(tool, *args)
        exe = self._resolve(tool, argv)
        self.out.debug_line("start: " + shlex.join(argv))
        special = {"pipe": subprocess.PIPE, "stdout": subprocess.STDOUT, None: None}
        stdout, stderr = special.get(stdout, stdout), special.get(stderr, stderr)
        stdin = subprocess.DEVNULL if stdin is None else special.get(stdin, stdin)
        try:
            return subprocess.Popen([exe, *argv[1:]], cwd=cwd, user=user, env=self._env(env_extra),
                                    umask=-1 if umask is None else umask,
                                    stdin=stdin,
                                    stdout=stdout, stderr=stderr, text=text, start_new_session=new_session,
                                    preexec_fn=_die_with_parent, errors="replace" if text else None)
        except PermissionError as exc:
            raise PermissionDenied(f"cannot run {exe}: {exc.strerror}") from None
        except OSError as exc:
            raise HostError(f"cannot run {exe}: {exc.strerror or exc}") from None

    def stream(self, tool: str, args: Sequence[str], *, timeout: float, on_idle: Callable[[str], None],
               cwd: str | None = None, umask: int | None = None,
               env_extra: Mapping[str, str] | None = None) -> Completed:
        """Run a long child, calling ``on_idle(last_line)`` about once a second; raise on failure."""
        import queue
        import threading
        import time
        argv = self.argv(tool, *args)
        if self.dry_run:
            self.recorded.append(argv)
            return Completed(argv, 0, "", "")
        proc = self.popen(tool, args, cwd=cwd, umask=umask, env_extra=env_extra,
                          stdout="pipe", stderr="stdout", text=True)
        lines: queue.Queue[str | None] = queue.Queue()

        def pump() -> None:
            for line in proc.stdout:
                lines.put(line.rstrip("\n"))
            lines.put(None)
        threading.Thread(target=pump, daemon=True).start()
        seen: list[str] = []
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    line = lines.get(timeout=1.0)
                except queue.Empty:
                    line = ""
                if line is None:
                    break
                if line:
                    seen.append(line)
                    del seen[:-200]
                on_idle(seen[-1] if seen else "")
                if time.monotonic() > deadline:
                    raise ProviderError(f"{' '.join(argv[:3])}: no result in {timeout:.0f} s",
                                        details={"argv": argv, "stderr": _tail("\n".join(seen))})
            rc = proc.wait(timeout=30)
        finally:
            stop_process(proc)
        done = Completed(argv, rc, "\n".join(seen), "")
        if rc != 0:
            raise ProviderError(describe_exit(argv, rc), details={"argv": argv, "rc": rc,
                                                                  "stderr": _tail(done.stdout)})
        return done


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux to SIGKILL it when abssctl dies (even by kill -9)."""
    import ctypes
    import signal
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def stop_process(proc: Any, grace: float = 10.0) -> None:
    """SIGTERM a child's process group, then SIGKILL after ``grace`` seconds; only our own child."""
    import signal
    import subprocess
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


# ============================================================================
# 6. Templates
# ============================================================================

TEMPLATE_NAMES = ("nginx-vhost.conf", "systemd-unit.service", "abssctl-backup.service", "abssctl-backup.timer",
                  "abssctl-upgrade.service", "abssctl-upgrade.timer", "abssctl-notify@.service")


def _read_resource(rel: str) -> bytes:
    """A file shipped beside this module, from a checkout or from inside abssctl.pyz."""
    # No abspath(): inside a .pyz the zipimporter compares against its own un-normalised path.
    path = os.path.join(os.path.dirname(__file__), rel)
    loader = getattr(__spec__, "loader", None)      # __spec__ is None when run as a script
    if loader is not None and hasattr(loader, "get_data"):
        return loader.get_data(path)
    with open(path, "rb") as f:
        return f.read()


def _template_class() -> type:
    import string

    class StrictTemplate(string.Template):
        """Only ``${UPPER_SNAKE}`` is a placeholder, so nginx's $host and systemd's $VAR pass through."""

        delimiter = "$"
        pattern = r"""
            \$(?:
              (?P<escaped>\$(?=\{))           |  # $${X} writes a literal ${X}
              \{(?P<braced>[A-Z][A-Z0-9_]*)\} |
              (?P<named>(?!))                 |  # bare $name is never a placeholder
              (?P<invalid>(?!))
            )
        """
    return StrictTemplate


def template_source(templates_dir: str, name: str) -> tuple[str, str]:
    """(text, origin) of a template: the admin's override if present, else the built-in one."""
    override = os.path.join(templates_dir, name)
    try:
        st = os.lstat(override)
    except (FileNotFoundError, NotADirectoryError):
        return _read_resource(f"templates/{name}").decode("utf-8"), "builtin"
    import stat
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"template override {override} is not a regular file")
    if st.st_uid != 0 and st.st_uid != os.geteuid():
        raise UsageError(f"template override {override} is not owned by root",
                         hint=f"chown root:root {override}")
    if st.st_mode & 0o022:
        raise UsageError(f"template override {override} is group- or world-writable",
                         hint=f"chmod 0644 {override}")
    try:
        with open(override, encoding="utf-8") as f:
            return f.read(), override
    except UnicodeDecodeError:
        raise UsageError(f"template override {override} is not UTF-8 text") from None


def render(templates_dir: str, name: str, values: Mapping[str, str]) -> str:
    """Fill a template strictly; an unknown placeholder names the file."""
    text, origin = template_source(templates_dir, name)
    try:
        body = _template_class()(text).substitute(values)
    except KeyError as exc:
        raise UsageError(f"template {origin} uses unknown placeholder ${{{exc.args[0]}}}",
                         hint="known placeholders: " + ", ".join(sorted(values))) from None
    except ValueError as exc:
        raise UsageError(f"template {origin} is malformed: {exc}") from None
    return f"# Managed by abssctl {__version__} (template: {origin}); changes are overwritten\n{body}"


def sample_values(name: str) -> dict[str, str]:
    """A mapping every shipped template renders against (config check uses it on overrides)."""
    if name.startswith("abssctl-"):
        return {"ABSSCTL": "/usr/local/bin/abssctl --config /etc/abssctl/config.toml", "CALENDAR": "daily"}
    if name == "systemd-unit.service":
        return {"NAME": "sample", "USER": "actual-sample", "GROUP": "actual-sample", "NETWORK": "",
                "PACKAGE_DIR": "/srv/abssctl/versions/1.0.0/node_modules/@actual-app/sync-server",
                "PORT": "5006", "DATA_DIR": "/srv/abssctl/instances/sample/data",
                "NODE": "/usr/bin/node", "BIN": "/srv/abssctl/versions/1.0.0/node_modules/"
                "@actual-app/sync-server/build/bin/actual-server.js",
                "CONFIG": "/srv/abssctl/instances/sample/config.json"}
    return {"NAME": "sample", "DOMAIN": "sample.example.org", "PORT": "5006",
            "LISTEN_HTTP": "    listen 80;", "LISTEN_HTTPS": "    listen 443 ssl;",
            "HTTPS_PORT_SUFFIX": "", "CERT": "/etc/ssl/private/cert.pem",
            "KEY": "/etc/ssl/private/cert.key", "CLIENT_MAX_BODY_SIZE": "50M", "INTERNAL_BLOCK": "",
            "ACME_WEBROOT": "/var/lib/abssctl/acme"}


# ============================================================================
# 7a. Providers: systemd
# ============================================================================


class Systemd:
    """systemctl and journalctl, through the Runner; returns data, never prints."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner

    def _ctl(self, *args: str, mutating: bool, check: bool = True) -> Completed:
        return self.runner.run("systemctl", ["--no-pager", *args], mutating=mutating, check=check)

    def daemon_reload(self) -> None:
        self._ctl("daemon-reload", mutating=True)

    def show(self, units: Sequence[str], props: Sequence[str]) -> dict[str, dict[str, str]]:
        """``systemctl show`` for several units in one call: unit -> {property: value}.

        Plain ``show`` (every property, blocks keyed by ``Id=``) rather than ``-p A,B``: the
        systemctl replacement used on containers and in the tests honours one ``-p`` only.
        """
        if not units:
            return {}
        done = self._ctl("show", *units, mutating=False, check=False)
        result: dict[str, dict[str, str]] = {}
        for block in re.split(r"\n\s*\n", done.stdout.strip("\n")):
            fields = dict(line.partition("=")[::2] for line in block.splitlines() if "=" in line)
            if fields.get("Id") in units:
                result[fields["Id"]] = {p: fields.get(p, "") for p in props}
        for unit in units:
            result.setdefault(unit, {p: "" for p in props})
        return result


# ============================================================================
# 7b. Providers: nginx
# ============================================================================


class NginxTransaction:
    """Test, snapshot, write, test, reload; on failure restore, test, reload, raise (certbot's pattern).

    Used as ``with nginx.transaction(tag) as tx: tx.write(...); tx.link(...); tx.remove(...)``.
    The files are changed inside the block; the test and reload happen when it ends. If nothing
    differs from the snapshot, neither runs and ``tx.changed`` stays False.
    """

    def __init__(self, nginx: Nginx, tag: str, lock_path: str) -> None:
        self.nginx = nginx
        self.tag = tag
        self.lock = FileLock(lock_path)
        self.snapshot: dict[str, dict[str, Any] | None] = {}
        self.changed = False
        self.precheck_error: ProviderError | None = None
        self.force = False          # test and reload even when no file differs (a renewed certificate)
        self.repairs: list[str] = []   # files whose failing nginx -t this transaction mends (a refused pair)

    def __enter__(self) -> NginxTransaction:
        self.lock.acquire(30.0, {"pid": os.getpid(), "command": "nginx transaction",
                                 "op_id": self.tag}, lambda _m: None)
        try:
            self.nginx.test()
        except ProviderError as exc:
            self.precheck_error = exc     # allowed only if a file we rewrite is the failing one
        return self

    def _remember(self, path: str) -> None:
        if path not in self.snapshot:
            self.snapshot[path] = snapshot(path)

    def write(self, path: str, data: bytes) -> None:
        """Put a file in place (temp name, rename)."""
        self._remember(path)
        atomic_write(path, data, mode=0o644, tag=self.tag)

    def link(self, link: str, target: str) -> None:
        """Point ``link`` at ``target`` (an absolute symlink made under a temp name, then renamed)."""
        self._remember(link)
        swap_symlink(link, target, self.tag)

    def remove(self, path: str) -> None:
        self._remember(path)
        if os.path.lexists(path):
            os.unlink(path)

    def _differs(self) -> bool:
        """Content or link target changed (nginx does not care about a mode)."""
        def seen(snap: Mapping[str, Any] | None) -> Any:
            return None if snap is None else (snap.get("link"), snap.get("b64"))
        return any(seen(snapshot(path)) != seen(before) for path, before in self.snapshot.items())

    def restore(self) -> None:
        """Put every touched path back as it was."""
        for path, before in self.snapshot.items():
            snapshot_restore(path, before, self.tag)

    def _precheck_blames_us(self) -> bool:
        assert self.precheck_error is not None
        text = "\n".join(self.precheck_error.details.get("stderr", []))
        return any(path in text or os.path.realpath(path) in text for path in [*self.snapshot, *self.repairs])

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if exc_type is not None:
                self.restore()
                return
            if self.precheck_error is not None and not self._precheck_blames_us():
                self.restore()
                raise ProviderError("nginx was already failing before any change: "
                                    + self.precheck_error.message,
                                    hint="fix the nginx configuration (nginx -t), then re-run",
                                    details=self.precheck_error.details)
            if not self._differs() and not self.force:
                return
            self._commit()
        finally:
            self.lock.release()

    def _commit(self) -> None:
        try:
            self.nginx.test()
        except ProviderError as exc:
            self.restore()
            self._recover_or_raise(exc)
        self.nginx.reload()
        self.changed = True

    def _recover_or_raise(self, exc: ProviderError) -> NoReturn:
        lines = exc.details.get("stderr", [])
        try:
            self.nginx.test()
            self.nginx.reload()
        except ProviderError:
            raise ProviderError("nginx rejected the change, and the restored configuration still "
                                "fails nginx -t", hint="restore these files by hand: "
                                + ", ".join(sorted(self.snapshot)),
                                details={"stderr": lines, "files": sorted(self.snapshot)}) from None
        raise ProviderError("nginx rejected the change; the previous configuration is back: "
                            + (lines[0] if lines else exc.message),
                            hint="see the nginx error above", details={"stderr": lines})


class Nginx:
    """nginx -t, -T and reload through the Runner, and the transaction around vhost edits."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner

    def test(self) -> Completed:
        return self.runner.run("nginx", ["-t"], mutating=False)

    def reload(self) -> None:
        self.runner.run("nginx_reload", [], mutating=True)

    def transaction(self, tag: str, lock_path: str) -> NginxTransaction:
        return NginxTransaction(self, tag, lock_path)


# ============================================================================
# 7c. Providers: npm and node
# ============================================================================

UNREACHABLE_RE = LazyRegex(r"ECONNREFUSED|ENOTFOUND|EAI_AGAIN|ETIMEDOUT|ECONNRESET|ENETUNREACH|"
                           r"EHOSTUNREACH|network|socket hang up|request to .* failed", re.IGNORECASE)
NOT_FOUND_RE = LazyRegex(r"E404|ETARGET|No match found|is not in this registry", re.IGNORECASE)

NODE_FACTS_JS = ("JSON.stringify({version: process.version, modules: process.versions.modules, "
                 "arch: process.arch, platform: process.platform, glibc: (process.report && "
                 "process.report.getReport().header.glibcVersionRuntime) || null})")

# Loads every native module named in argv[1] and *uses* better-sqlite3: a bare require() loads its
# binding lazily and misses a Node ABI mismatch; opening a database does not.
NATIVE_CHECK_JS = """
const out = {};
for (const name of JSON.parse(process.argv[1])) {
  try {
    const mod = require(name);
    if (name === 'better-sqlite3') { const db = new mod(':memory:'); db.prepare('select 1').get(); db.close(); }
    out[name] = 'ok';
  } catch (e) { out[name] = String((e && e.message) || e).split('\\n')[0]; }
}
console.log(JSON.stringify(out));
"""


class NodeInfo:
    """What the configured node is: version, ABI, arch, platform, glibc, and where its headers are."""

    __slots__ = ("version", "abi", "arch", "platform", "glibc", "exe", "headers")

    def __init__(self, facts: Mapping[str, Any], exe: str) -> None:
        self.version = str(facts.get("version") or "")
        self.abi = str(facts.get("modules") or "")
        self.arch = str(facts.get("arch") or "")
        self.platform = str(facts.get("platform") or "")
        self.glibc = facts.get("glibc") or host_glibc()
        self.exe = exe
        prefix = os.path.dirname(os.path.dirname(os.path.realpath(exe)))
        headers = os.path.join(prefix, "include", "node")
        self.headers = prefix if os.path.isfile(os.path.join(headers, "node_version.h")) else None

    def as_dict(self) -> dict[str, str]:
        return {"version": self.version, "abi": self.abi, "arch": self.arch,
                "libc": f"glibc {self.glibc}" if self.glibc else "unknown"}


def host_glibc() -> str | None:
    """The C library version of this host (``2.36``), or None when it is not glibc."""
    try:
        text = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (ValueError, OSError):
        return None
    return text.split()[-1] if text.startswith("glibc") else None


class Node:
    """The configured node binary, through the Runner."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner

    def info(self) -> NodeInfo:
        import shutil
        argv0 = self.runner.commands["node"][0]
        exe = argv0 if "/" in argv0 else (shutil.which(argv0) or argv0)
        done = self.runner.run("node", ["-p", NODE_FACTS_JS], mutating=False)
        try:
            facts = json.loads(done.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise ProviderError("node did not report its version and ABI",
                                details={"stdout": _tail(done.stdout)}) from None
        return NodeInfo(facts, exe)

    def check_native(self, package_dir: str, names: Sequence[str],
                     built_by: Callable[[], str] | None = None) -> dict[str, str]:
        """Load (and use) each native module from the package dir: name -> 'ok' or the error.

        ``built_by()`` names the npm that built them (path and version), for the message when node dies.
        """
        if not names:
            return {}
        done = self.runner.run("node", ["-e", NATIVE_CHECK_JS, json.dumps(list(names))], mutating=False,
                               cwd=package_dir, check=False)
        try:
            result = json.loads(done.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            result = None
        if not isinstance(result, dict):
            raise self._native_crash(done, names, built_by)
        return {str(k): str(v) for k, v in result.items()}

    def _native_crash(self, done: Completed, names: Sequence[str],
                      built_by: Callable[[], str] | None) -> ProviderError:
        """node died (or printed nothing) loading native modules: say how, with which node and npm."""
        import signal
        exe = self.runner.commands["node"][0]
        version = self.runner.run("node", ["--version"], mutating=False, check=False).stdout.strip() or "?"
        modules = ", ".join(names)
        npm = built_by() if built_by is not None else "an unknown npm"
        if done.returncode < 0:
            try:
                how = f"node was killed by {signal.Signals(-done.returncode).name}"
            except ValueError:
                how = f"node was killed by signal {-done.returncode}"
        elif done.returncode != 0:
            how = f"node exited {done.returncode} without a result"
        else:
            how = "node printed no result"
        return ProviderError(
            f"{how} loading {modules} (node {exe} {version}; built by {npm}): "
            "most likely a native module built by an npm/node-gyp whose node headers do not match this node",
            hint='rebuild with the runtime\'s own npm: set [node] runtime = "managed" and install the version '
                 "again (abssctl version uninstall VER, then abssctl version install VER)",
            details={"rc": done.returncode, "modules": list(names), "node": {"path": exe, "version": version},
                     "npm": npm, "stderr": _tail(done.stderr)})

    def bin_version(self, package_dir: str, bin_path: str) -> str:
        done = self.runner.run("node", [bin_path, "--version"], mutating=False, cwd=package_dir, check=False)
        return done.stdout.strip().splitlines()[-1].strip() if done.stdout.strip() else ""


class Npm:
    """npm view and npm install through the Runner; honours npm's own config plus [npm] registry."""

    def __init__(self, runner: Runner, config: Config) -> None:
        self.runner = runner
        self.package = config.get("npm", "package")
        self.registry = config.get("npm", "registry")

    def _registry_args(self) -> list[str]:
        return ["--registry", self.registry] if self.registry else []

    def view(self, spec: str, fields: Sequence[str]) -> Any:
        """``npm view SPEC FIELDS --json``; NotFound for an unknown version, exit 4 if unreachable."""
        done = self.runner.run("npm", ["view", spec, *fields, "--json", *self._registry_args()],
                               mutating=False, check=False)
        text = done.stderr + "\n" + done.stdout
        if done.returncode != 0:
            if NOT_FOUND_RE.search(text):
                raise NotFound(f"{spec} is not in the npm registry",
                               hint=f"see abssctl version list --remote for the versions of {self.package}")
            if UNREACHABLE_RE.search(text):
                raise ProviderError("cannot reach the npm registry",
                                    hint="check the network or [npm] registry; on an air-gapped host use "
                                         "abssctl version import FILE", details={"stderr": _tail(text)})
            raise ProviderError(describe_exit(done.argv, done.returncode), details={"stderr": _tail(text)})
        if not done.stdout.strip():
            return None
        try:
            return json.loads(done.stdout)
        except ValueError:
            raise ProviderError("npm view printed something that is not JSON",
                                details={"stdout": _tail(done.stdout)}) from None

    def remote_versions(self) -> list[str]:
        found = self.view(self.package, ["versions"])
        found = found if isinstance(found, list) else [found] if found else []
        return sorted((v for v in found if isinstance(v, str) and SEMVER_RE.match(v)), key=semver_key)

    def latest(self) -> str:
        tag = self.view(self.package, ["dist-tags.latest"])
        if not isinstance(tag, str) or not SEMVER_RE.match(tag):
            raise ProviderError(f"npm has no usable 'latest' tag for {self.package}")
        return tag

    def pack(self, spec: str, dest: str) -> dict[str, Any]:
        """``npm pack SPEC --pack-destination DEST --json``: the tarball's path, integrity and size.

        npm fetches through its own config (registry, proxy, cafile) and checks the integrity itself;
        the sha512 of the file is checked again against what npm reports.
        """
        import base64
        import hashlib
        done = self.runner.run("npm", ["pack", spec, "--pack-destination", dest, "--json",
                                       *self._registry_args()], mutating=False, check=False, timeout=1800)
        text = done.stderr + "\n" + done.stdout
        hint = ("check the network and npm's configuration (npm config get registry); on an air-gapped "
                "host import a bundle that carries its runtime (abssctl version import FILE)")
        if done.returncode != 0:
            why = "is not in the npm registry" if NOT_FOUND_RE.search(text) else \
                "could not be fetched (the registry is unreachable)" if UNREACHABLE_RE.search(text) else \
                f"could not be fetched ({describe_exit(done.argv, done.returncode)})"
            raise ProviderError(f"{spec} {why}", hint=hint, details={"stderr": _tail(text)})
        try:
            found = json.loads(done.stdout)
        except ValueError:
            found = None
        first = found[0] if isinstance(found, list) and found else found
        if not isinstance(first, dict) or not isinstance(first.get("filename"), str):
            raise ProviderError(f"npm pack {spec} did not report the tarball it wrote",
                                hint=hint, details={"stdout": _tail(done.stdout)})
        path = os.path.join(dest, os.path.basename(first["filename"]))
        integrity = str(first.get("integrity") or "")
        h = hashlib.sha512()
        try:
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(CHUNK), b""):
                    h.update(chunk)
        except OSError as exc:
            raise ProviderError(f"npm pack {spec} wrote no readable tarball ({exc.strerror})", hint=hint) from None
        if integrity != "sha512-" + base64.b64encode(h.digest()).decode():
            raise ProviderError(f"{os.path.basename(path)} does not match the integrity npm reported "
                                   f"({integrity or 'none'})", hint="clear npm's cache (npm cache clean "
                                   "--force) and try again")
        return {"path": path, "integrity": integrity, "size": os.path.getsize(path)}

    def install(self, prefix: str, node: NodeInfo, on_idle: Callable[[str], None],
                env_extra: Mapping[str, str] | None = None) -> None:
        """``npm install --prefix`` with umask 022, node's headers as nodedir and node first on PATH."""
        env = {"PATH": os.path.dirname(node.exe) + os.pathsep + os.environ.get("PATH", os.defpath)}
        env.update(env_extra or {})
        if node.headers:
            env["npm_config_nodedir"] = node.headers       # node-gyp never downloads headers
        self.runner.stream("npm", ["install", "--prefix", prefix, "--omit=dev", "--no-audit", "--no-fund",
                                   "--loglevel=warn", *self._registry_args()],
                           timeout=1800, on_idle=on_idle, cwd=prefix, umask=0o022, env_extra=env)


def engines_satisfied(version: str, spec: str) -> bool | None:
    """Does a node version (``v20.20.2``) satisfy an engines range? None when the range is unreadable."""
    have = _version_tuple(version.lstrip("v"))
    if have is None:
        return None
    results = []
    for alternative in spec.split("||"):
        ok = _range_ok(have, alternative.strip())
        if ok is None:
            return None
        results.append(ok)
    return any(results) if results else None


def _version_tuple(text: str) -> tuple[int, int, int] | None:
    m = re.match(r"^\s*v?(\d+)(?:\.(\d+|x|\*))?(?:\.(\d+|x|\*))?", text)
    if not m:
        return None
    return tuple(int(p) if p and p.isdigit() else 0 for p in m.groups())  # type: ignore[return-value]


def _range_ok(have: tuple[int, int, int], text: str) -> bool | None:
    if text in ("", "*", "x", "latest"):
        return True
    tokens = re.findall(r"(>=|<=|>|<|=|\^|~)?\s*v?(\d+(?:\.(?:\d+|x|\*))?(?:\.(?:\d+|x|\*))?)", text)
    if not tokens:
        return None
    for op, ver in tokens:
        parts = ver.split(".")
        want = _version_tuple(ver)
        if want is None:
            return None
        exact = len(parts)
        if op in ("", "=") and (exact < 3 or any(p in ("x", "*") for p in parts)):
            fixed = [i for i, p in enumerate(parts) if p.isdigit()]
            if any(have[i] != want[i] for i in fixed):
                return False
            continue
        if op == "^":
            upper = (want[0] + 1, 0, 0) if want[0] else (0, want[1] + 1, 0)
            if not (want <= have < upper):
                return False
        elif op == "~":
            upper = (want[0], want[1] + 1, 0) if exact >= 2 else (want[0] + 1, 0, 0)
            if not (want <= have < upper):
                return False
        elif not {">=": have >= want, "<=": have <= want, ">": have > want, "<": have < want,
                  "=": have == want, "": have == want}[op]:
            return False
    return True


# --- 7c.2 Managed runtimes ---

RUNTIME_ARCHES = {"x86_64": "x64", "amd64": "x64", "aarch64": "arm64", "arm64": "arm64"}
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
NPM_CLI = os.path.join("lib", "npm", "bin", "npm-cli.js")
NPM_RANGE = ">=10"                    # the npm releases a runtime's builder is chosen from


def managed_runtime(config: Config) -> bool:
    """True when abssctl brings the node each version needs (``[node] runtime = "managed"``)."""
    return config.get("node", "runtime") == "managed"


def runtime_arch() -> str:
    """The node-linux-<arch> name of this machine: x64 or arm64."""
    machine = os.uname().machine
    arch = RUNTIME_ARCHES.get(machine)
    if arch is None:
        raise Incompatible(f"there is no managed node runtime for this machine ({machine}); abssctl knows "
                           "x86_64 and aarch64", hint='install node yourself and set [node] runtime = "system"')
    return arch


def runtime_package(config: Config, arch: str) -> str:
    return str(config.get("node", "package")).replace("{arch}", arch)


def runtime_commands(rt_dir: str) -> dict[str, list[str]]:
    """``[commands]`` node and npm of the runtime in ``rt_dir``."""
    node = os.path.join(rt_dir, "bin", "node")
    return {"node": [node], "npm": [node, os.path.join(rt_dir, NPM_CLI)]}


def runtime_env(rt_dir: str) -> dict[str, str]:
    """What the runtime's npm needs: its own headers for node-gyp, and the host's CA store (an
    official node build trusts only its bundled CAs, so a local CA would stop the install)."""
    env = {"npm_config_nodedir": rt_dir,
           "PATH": os.path.join(rt_dir, "bin") + os.pathsep + os.environ.get("PATH", os.defpath)}
    if "NODE_EXTRA_CA_CERTS" not in os.environ and os.path.isfile(CA_BUNDLE):
        env["NODE_EXTRA_CA_CERTS"] = CA_BUNDLE
    return env


def _major(version: str) -> int:
    return int(version.split(".")[0])


def choose_node(available: Iterable[str], engines: str | None, default_major: int,
                installed: Iterable[str] = (), refresh: bool = False) -> tuple[str, bool]:
    """The node release for a server's ``engines.node`` and whether it is already installed (§11.1).

    Among the stable releases that satisfy the range: the lowest even major (an LTS line), then the
    newest release in it; an installed one of that major that satisfies the range wins unless
    ``refresh``. No range (or one we cannot read) means the newest of ``default_major``.
    """
    spec = engines if engines and engines_satisfied("v0.0.0", engines) is not None else None

    def fits(v: str) -> bool:
        return engines_satisfied(v, spec) is True if spec else _major(v) == default_major
    stable = sorted({v for v in available if isinstance(v, str) and SEMVER_RE.match(v) and "-" not in v},
                    key=semver_key)
    candidates = [v for v in stable if fits(v)]
    if not candidates:
        wanted = f'engines.node "{spec}"' if spec else f"node {default_major}"
        raise NotFound(f"no node release in the registry satisfies {wanted}",
                       hint='check [node] package and default_major, or use [node] runtime = "system"')
    majors = sorted({_major(v) for v in candidates})
    major = ([m for m in majors if m % 2 == 0] or majors)[0]
    newest = [v for v in candidates if _major(v) == major][-1]
    mine = sorted((v for v in set(installed) if SEMVER_RE.match(v) and _major(v) == major and fits(v)),
                  key=semver_key)
    if mine and not refresh:
        return mine[-1], True
    return newest, newest in mine


def choose_npm(releases: Any, node_version: str) -> str:
    """The newest stable npm whose own ``engines.node`` the runtime's node satisfies."""
    if isinstance(releases, (dict, str)):          # npm prints one object (or string) for one match
        releases = [releases]
    best: str | None = None
    for rel in releases if isinstance(releases, list) else []:
        rel = {"version": rel} if isinstance(rel, str) else rel
        version = rel.get("version") if isinstance(rel, dict) else None
        if not isinstance(version, str) or not SEMVER_RE.match(version) or "-" in version:
            continue
        engines = rel.get("engines")
        spec = engines.get("node") if isinstance(engines, dict) else None
        if spec and engines_satisfied(node_version, str(spec)) is not True:
            continue
        if best is None or semver_key(version) > semver_key(best):
            best = version
    if best is None:
        raise ProviderError(f"no npm release in the registry supports node {node_version}",
                            hint="check npm's registry configuration (npm config get registry)")
    return best


class Runtime:
    """One managed node runtime: chosen (to fetch or unpack) or installed; ``node`` once it runs."""

    def __init__(self, root: str, version: str, arch: str, package: str, *, npm_version: str | None = None,
                 installed: bool = False) -> None:
        self.root = root
        self.version = version
        self.arch = arch
        self.package = package
        self.npm_version = npm_version
        self.installed = installed
        self.node: NodeInfo | None = None
        self.expect_abi: str | None = None
        self.record: dict[str, Any] = {}

    @property
    def id(self) -> str:
        return f"node-{self.version}"

    @property
    def dir(self) -> str:
        return os.path.join(self.root, self.id)

    def runner(self, base: Runner) -> Runner:
        return base.with_commands(**runtime_commands(self.dir))

    def built_by(self) -> str:
        return f"{os.path.join(self.dir, 'lib', 'npm')} (npm {self.npm_version or '?'})"


# ============================================================================
# 7d. Providers: TLS (ssl and openssl)
# ============================================================================

class CertInfo:
    """What openssl says about a certificate file (never the key)."""

    __slots__ = ("subject", "issuer", "not_after", "fingerprint", "san", "not_before")

    def __init__(self, subject: str, issuer: str, not_after: float, fingerprint: str, san: list[str],
                 not_before: float | None = None) -> None:
        self.subject = subject
        self.issuer = issuer
        self.not_after = not_after
        self.fingerprint = fingerprint
        self.san = san
        self.not_before = not_before

    def covers(self, domain: str) -> bool:
        """Does a SAN (or a one-label wildcard) cover ``domain``?"""
        for name in self.san:
            if name == domain or (name.startswith("*.") and domain.split(".", 1)[-1] == name[2:]
                                  and domain.count(".") == name.count(".")):
                return True
        return False


def pem_blocks(path: str) -> list[str]:
    """The PEM block types in a file (CERTIFICATE, PRIVATE KEY, ...), read without printing them."""
    with open(path, "rb") as f:
        text = f.read(1 << 20).decode("ascii", "replace")
    return [m.group(1) for m in re.finditer(r"-----BEGIN ([A-Z0-9 ]+)-----", text)]


class Tls:
    """Certificate inspection through openssl, key matching through ssl, self-signed generation."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner

    def inspect(self, cert: str) -> CertInfo:
        import calendar
        import time
        done = self.runner.run("openssl", ["x509", "-in", cert, "-noout", "-startdate", "-enddate", "-subject",
                                           "-issuer", "-fingerprint", "-sha256", "-ext", "subjectAltName"],
                               mutating=False, check=False)
        if done.returncode != 0:
            raise UsageError(f"{cert} is not a readable PEM certificate",
                             details={"stderr": _tail(done.stderr)})
        fields: dict[str, str] = {}
        san: list[str] = []
        for line in done.stdout.splitlines():
            key, sep, value = line.partition("=")
            if line.startswith("    ") and "DNS:" in line:
                san += [p.strip()[4:].lower() for p in line.split(",") if p.strip().startswith("DNS:")]
            elif sep:
                fields[key.strip()] = value.strip()
        def when(key: str) -> float | None:
            try:
                return float(calendar.timegm(time.strptime(fields.get(key, ""), "%b %d %H:%M:%S %Y %Z")))
            except ValueError:
                return None
        not_after = when("notAfter")
        if not_after is None:
            raise UsageError(f"cannot read the expiry date of {cert}")
        fingerprint = next((v for k, v in fields.items() if k.endswith("Fingerprint")), "")
        return CertInfo(fields.get("subject", ""), fields.get("issuer", ""), not_after, fingerprint, san,
                        when("notBefore"))

    @staticmethod
    def check_pair(cert: str, key: str, chain: str | None = None) -> None:
        """The key matches the certificate (ssl.load_cert_chain); a mismatch or an encrypted key exits 2."""
        import ssl
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(cert, key, password=lambda: b"")
            if chain:
                context.load_verify_locations(chain)
        except ssl.SSLError as exc:
            reason = "the key does not match the certificate" if "mismatch" in str(exc).lower() \
                else f"the key or certificate cannot be loaded ({exc.reason or exc})"
            raise UsageError(f"{cert} / {key}: {reason}",
                             hint="give the key that belongs to this certificate, unencrypted") from None
        except OSError as exc:
            raise UsageError(f"cannot read {exc.filename or cert}: {exc.strerror}") from None

    def self_signed(self, domain: str, days: int, key_path: str, cert_path: str) -> None:
        """A P-256 key and a certificate for ``domain``, written under umask 077."""
        self.runner.run("openssl", ["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                                    "-nodes", "-days", str(days), "-subj", f"/CN={domain}",
                                    "-addext", f"subjectAltName=DNS:{domain}", "-keyout", key_path,
                                    "-out", cert_path], mutating=True, umask=0o077)


EMAIL_RE = LazyRegex(r"^[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63})+\Z")
ACME_URL_RE = LazyRegex(r"^https://[A-Za-z0-9.-]+(?::[0-9]{1,5})?(?:/[A-Za-z0-9._~%/+-]*)?\Z")
ISSUING_ENV = "_ABSSCTL_ISSUING"    # set for certbot by tls acme: the deploy hook it runs leaves the work to us


class Certbot:
    """certbot certonly --webroot for one domain (§11.2); its failures are read into plain words.

    certbot is the ACME client: abssctl never speaks ACME itself, it only asks and reads the result."""

    def __init__(self, runner: Runner, config_dir: str, webroot: str) -> None:
        self.runner, self.config_dir, self.webroot = runner, config_dir, webroot

    def certonly_args(self, domain: str, email: str, server: str, staging: bool, hook: str) -> list[str]:
        args = ["certonly", "--webroot", "-w", self.webroot, "-d", domain, "--non-interactive", "--agree-tos"]
        args += ["--email", email] if email else ["--register-unsafely-without-email"]
        args += ["--server", server] if server else []
        args += ["--staging"] if staging else []
        return args + ["--config-dir", self.config_dir, "--deploy-hook", hook]

    def certonly(self, domain: str, email: str, server: str, staging: bool, hook: str, op_id: str) -> None:
        """Ask for a certificate; a refusal raises ProviderError with certbot's reason and a hint."""
        done = self.runner.run("certbot", self.certonly_args(domain, email, server, staging, hook), mutating=True,
                               check=False, umask=0o022, env_extra={ISSUING_ENV: op_id})
        if done.returncode == 0:
            return
        reason, kinds = certbot_failure(done.stdout + "\n" + done.stderr)
        if kinds & {"connection", "unauthorized", "dns", "incorrectResponse", "caa"}:
            hint = (f"check that {domain}'s DNS (A/AAAA records) points at this host and that port 80 is reachable "
                    f"from the internet (firewall, router port forwarding); certbot then fetches "
                    f"http://{domain}/.well-known/acme-challenge/… from {self.webroot}. Then re-run")
        elif kinds & {"rateLimited"}:
            hint = "the CA's rate limit applies: wait (see the time in the message), or test with --staging"
        else:
            hint = "read certbot's log (/var/log/letsencrypt/letsencrypt.log, or its --logs-dir), fix it, then re-run"
        raise ProviderError(f"certbot could not get a certificate for {domain}: {reason}", hint=hint,
                            details={"argv": list(done.argv), "rc": done.returncode, "kinds": sorted(kinds),
                                     "stderr": _tail(done.stdout + "\n" + done.stderr)})


CERTBOT_NOISE = ("Saving debug log", "Ask for help", "Requesting a certificate", "Hint:", "Some challenges have failed",
                 "- - - -", "The Certificate Authority reported", "Certbot failed to authenticate")


def certbot_failure(text: str) -> tuple[str, set[str]]:
    """(certbot's reason in one line, the ACME problem types it named) from its output: each
    Domain/Type/Detail block of "Certbot failed to authenticate", else "An unexpected error occurred:"
    and what follows, else its last meaningful line."""
    lines = [line.strip() for line in text.splitlines()]
    problems, kinds, domain, kind = [], set(), "", ""
    for line in lines:
        if line.startswith("Domain:"):
            domain = line[7:].strip()
        elif line.startswith("Type:"):
            kind = line[5:].strip()
            kinds.add(kind)
        elif line.startswith("Detail:"):
            problems.append(f"{domain or 'the CA'}: {kind + ': ' if kind else ''}{line[7:].strip()}")
            domain = kind = ""
    if problems:
        return "; ".join(problems), kinds
    for i, line in enumerate(lines):
        if line.startswith("An unexpected error occurred"):
            rest = " ".join(x for x in lines[i + 1:] if x and not x.startswith(CERTBOT_NOISE))
            if rest:
                for acme, word in (("rateLimited", "too many"), ("rateLimited", "rate limit")):
                    if word in rest.lower():
                        kinds.add(acme)
                return rest, kinds
    meaningful = [x for x in lines if x and not x.startswith(CERTBOT_NOISE)]
    return (meaningful[-1] if meaningful else "certbot failed without saying why"), kinds


# ============================================================================
# 8a. Operations: context, plans, steps, undo
# ============================================================================

STEP_OBSERVERS: list[Callable[[Step, str], None]] = []   # test hook: (step, "before"|"after")


class UndoAction:
    """How to reverse one step, as data, so it can be journaled and replayed by another process."""

    __slots__ = ("kind", "args")

    def __init__(self, kind: str, **args: Any) -> None:
        self.kind = kind
        self.args = args

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "args": self.args}

    def describe(self) -> str:
        target = self.args.get("path") or self.args.get("paths") or self.args.get("argv") or ""
        return f"{self.kind} {target if isinstance(target, str) else ' '.join(target)}".strip()


class Step:
    """One planned change: an id, a summary, a target, the action and its undo. A cleanup step has
    no undo: its action is data (``cleanup``), so recovery can finish it in another process."""

    __slots__ = ("id", "summary", "target", "do", "undo", "cleanup")

    def __init__(self, step_id: str, summary: str, target: str, do: Callable[[], None],
                 undo: UndoAction | None, cleanup: UndoAction | None = None) -> None:
        self.id = step_id
        self.summary = summary
        self.target = target
        self.do = do
        self.undo = undo
        self.cleanup = cleanup

    def as_dict(self) -> dict[str, Any]:
        doc = {"step": self.id, "summary": self.summary, "target": self.target,
               "undo": self.undo.describe() if self.undo else None}
        if self.cleanup:
            doc["cleanup"] = True
        return doc


class Plan:
    """A title and the ordered steps of one operation: reversible steps, then cleanup steps.

    The first cleanup step is the point of no return: everything before it is undone on failure,
    Ctrl-C or (through the journal) kill -9; from it on the change stands, and what is left to do
    is finished instead, by this process or by the recovery of its journal."""

    def __init__(self, title: str) -> None:
        self.title = title
        self._changes: list[Step] = []
        self._cleanups: list[Step] = []

    @property
    def steps(self) -> list[Step]:
        return self._changes + self._cleanups

    def add(self, step_id: str, summary: str, target: str, do: Callable[[], None],
            undo: UndoAction | None = None) -> None:
        self._changes.append(Step(step_id, summary, target, do, undo))

    def cleanup(self, step_id: str, summary: str, target: str, action: UndoAction) -> None:
        """A step past the point of no return (it runs after every change, whenever it was added);
        its action must be idempotent: run_undo runs it, here or in recovery."""
        self._cleanups.append(Step(step_id, summary, target, lambda: None, None, action))

    def as_list(self) -> list[dict[str, Any]]:
        return [s.as_dict() for s in self.steps]

    def text(self) -> list[str]:
        if not self.steps:
            return [f"{self.title}: nothing to do"]
        lines = [f"{self.title}:"]
        for n, s in enumerate(self.steps, 1):
            undo = f"  (undo: {s.undo.describe()})" if s.undo else "  (no undo: past the point of no return)" \
                if s.cleanup else ""
            lines.append(f"  {n}. {s.summary}{undo}")
        return lines


class Context:
    """Everything an operation needs, built once in main(); read-only but for locks and journal."""

    def __init__(self, *, config: Config, out: Output, dry_run: bool, assume_yes: bool,
                 interactive: bool, lock_timeout: float, command: str) -> None:
        self.config = config
        self.paths = Paths(config)
        self.out = out
        self.runner = Runner(config, out, dry_run=dry_run)
        self.dry_run = dry_run
        self.assume_yes = assume_yes
        self.interactive = interactive
        self.quiet = out.quiet
        self.debug = out.debug
        self.lock_timeout = lock_timeout
        self.command = command
        self.op_id = new_op_id()
        self.locks: list[FileLock] = []
        self.lock_wait_ms = 0
        self.journal: Journal | None = None
        self.oplog = OpsLog(self.paths.oplog, self.paths.textlog)
        self.started = utc_now()

    def service_gid(self) -> int:
        """The gid of the service group, or root's when it does not exist yet."""
        import grp
        try:
            return grp.getgrnam(self.config.get("service", "group")).gr_gid
        except KeyError:
            return 0

    def registry(self, name: str) -> Registry:
        if name == "backups":
            return Registry(self.paths.backup_index, "backups", lock_path=self.paths.lock("backups.lock"),
                            gid=lambda: 0, mode=0o600)
        return Registry(self.paths.registry(name), name, lock_path=self.paths.lock("registry.lock"),
                        gid=self.service_gid)

    def lock_meta(self, mode: str) -> dict[str, Any]:
        import socket
        return {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                "op_id": self.op_id, "mode": mode, "acquired_at": utc_now()}

    def take_locks(self, global_mode: str, instances: Sequence[str] = ()) -> None:
        """Global lock, then instance locks sorted by name (the global order, §3.8)."""
        wanted = [(self.paths.lock("abssctl.lock"), global_mode == "shared")]
        wanted += [(self.paths.lock(instance_lock_name(n)), False) for n in sorted(set(instances))]
        for path, shared in wanted:
            lock = FileLock(path, shared=shared)
            waited = lock.acquire(self.lock_timeout, self.lock_meta("shared" if shared else "exclusive"),
                                  self.out.progress)
            self.lock_wait_ms += int(waited * 1000)
            self.locks.append(lock)

    def release_locks(self) -> None:
        for lock in reversed(self.locks):
            lock.release()
        self.locks.clear()


def new_op_id() -> str:
    """``20261126T101500Z-7c1e9a0b``: UTC time and 8 random hex digits."""
    import time
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + os.urandom(4).hex()


# -- the undo interpreter --------------------------------------------------------

def _undo_remove_path(ctx: Context, args: Mapping[str, Any]) -> None:
    path = args["path"]
    if args.get("dir"):
        try:
            os.rmdir(path)          # only if empty: never delete what someone else put there
        except (FileNotFoundError, OSError):
            pass
        return
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _undo_restore_mode(ctx: Context, args: Mapping[str, Any]) -> None:
    path = args["path"]
    if os.path.lexists(path):
        os.chmod(path, args["mode"])
        if os.geteuid() == 0:
            os.chown(path, args["uid"], args["gid"])


def _undo_rename(ctx: Context, args: Mapping[str, Any]) -> None:
    if os.path.lexists(args["src"]) and not os.path.lexists(args["dst"]):
        os.rename(args["src"], args["dst"])


def _undo_remove_tree(ctx: Context, args: Mapping[str, Any]) -> None:
    for path in args.get("paths") or [args["path"]]:
        remove_tree(path)


def _journal_registry(args: Mapping[str, Any]) -> Registry:
    gid = os.stat(args["file"]).st_gid if os.path.exists(args["file"]) else 0
    return Registry(args["file"], args["key"], lock_path=args["lock"], gid=lambda: gid,
                    mode=int(args.get("mode", 0o640)))


def _undo_registry_remove(ctx: Context, args: Mapping[str, Any]) -> None:
    with _journal_registry(args).edit() as doc:
        doc[args["key"]].pop(args["name"], None)


def _undo_registry_put(ctx: Context, args: Mapping[str, Any]) -> None:
    with _journal_registry(args).edit() as doc:
        doc[args["key"]][args["name"]] = args["entry"]


def _undo_registry_fields(ctx: Context, args: Mapping[str, Any]) -> None:
    with _journal_registry(args).edit() as doc:
        doc.update(args["fields"])


def _undo_swap_current(ctx: Context, args: Mapping[str, Any]) -> None:
    link, target = args["path"], args.get("target")
    if target is None:
        if os.path.islink(link):
            os.unlink(link)
        return
    swap_symlink(link, target, args.get("tag", "undo"))


def _undo_discard_dir(ctx: Context, args: Mapping[str, Any]) -> None:
    """A directory this operation created, or one it is done with: move it to a trash name, then
    delete that, so a kill half-way leaves a name doctor recognises, never a half-deleted original."""
    path = args["path"]
    if not os.path.isdir(path):
        return
    trash = os.path.join(os.path.dirname(path), f".trash-{os.path.basename(path)}-{ctx.op_id}")
    os.rename(path, trash)
    remove_tree(trash)


def _undo_restore_file(ctx: Context, args: Mapping[str, Any]) -> None:
    snapshot_restore(args["path"], args.get("snapshot"), ctx.op_id)


def _undo_unit_remove(ctx: Context, args: Mapping[str, Any]) -> None:
    snapshot_restore(args["path"], args.get("snapshot"), ctx.op_id)
    Systemd(ctx.runner).daemon_reload()


def _undo_systemctl(ctx: Context, args: Mapping[str, Any]) -> None:
    ctx.runner.run("systemctl", ["--no-pager", args["verb"], args["unit"]], mutating=True)


def _undo_nginx_restore(ctx: Context, args: Mapping[str, Any]) -> None:
    nginx = Nginx(ctx.runner)
    for path, snap in args["files"].items():
        snapshot_restore(path, snap, ctx.op_id)
    nginx.test()
    nginx.reload()


UNDO_HANDLERS: dict[str, Callable[[Context, Mapping[str, Any]], None]] = {
    "data_swap": lambda ctx, args: _undo_data_swap(ctx, args),
    "start_gate": lambda ctx, args: _undo_start_gate(ctx, args),
    "restore_data": lambda ctx, args: _undo_restore_data(ctx, args),
    "discard_dir": _undo_discard_dir,
    "discard_backup": lambda ctx, args: _undo_discard_backup(ctx, args),
    "tls_restore": lambda ctx, args: _undo_tls_restore(ctx, args),
    "restore_file": _undo_restore_file,
    "unit_remove": _undo_unit_remove,
    "systemctl": _undo_systemctl,
    "nginx_restore": _undo_nginx_restore,
    "remove_path": _undo_remove_path,
    "remove_tree": _undo_remove_tree,
    "restore_mode": _undo_restore_mode,
    "rename": _undo_rename,
    "registry_remove": _undo_registry_remove,
    "registry_put": _undo_registry_put,
    "registry_fields": _undo_registry_fields,
    "swap_current": _undo_swap_current,
    "layout": lambda ctx, args: _undo_layout(ctx, args),
    "account": lambda ctx, args: _undo_account(ctx, args),
}


def http_get(port: int, path: str, headers: Mapping[str, str], timeout: float = 2.0) -> tuple[int, bytes]:
    """GET http://127.0.0.1:PORT/PATH; (status, the first MiB of the body). Raises OSError when down
    (and http.client.HTTPException on a garbled answer)."""
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers=dict(headers))
        resp = conn.getresponse()
        return resp.status, resp.read(1 << 20)
    finally:
        conn.close()


def http_get_json(port: int, path: str, timeout: float = 2.0) -> tuple[int, Any]:
    """GET http://127.0.0.1:PORT/PATH; (status, parsed JSON or None). Raises OSError when down."""
    status, body = http_get(port, path, {"Accept": "application/json"}, timeout)
    try:
        return status, json.loads(body)
    except ValueError:
        return status, None


def free_loopback_port() -> int:
    """A TCP port nothing listens on now, from the kernel's ephemeral range."""
    import socket
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_undo(ctx: Context, action: Mapping[str, Any]) -> None:
    """Carry out one journaled undo action."""
    handler = UNDO_HANDLERS.get(action.get("kind", ""))
    if handler is None:
        raise InternalError(f"unknown undo action {action.get('kind')!r}")
    handler(ctx, action.get("args") or {})


def _undo_all(ctx: Context, actions: Sequence[Mapping[str, Any]]) -> list[str]:
    """Run undos in reverse with SIGINT ignored; return what failed, for manual recovery."""
    import signal
    failed: list[str] = []
    if not actions:
        return failed
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if _main_thread() else None
    try:
        ctx.out.progress("rolling back, please wait", always=True)   # even under -q: a user waits
        for action in reversed(actions):
            try:
                run_undo(ctx, action)
            except Exception as exc:  # noqa: BLE001 - collect, report, keep undoing
                args = action.get("args") or {}           # never the snapshots: they may hold key bytes
                where = args.get("path") or args.get("name") or args.get("unit") or ""
                failed.append(f"{action.get('kind')} {where}: {exc}")
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    return failed


def _main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


class _Terminated(BaseException):
    """SIGTERM or SIGHUP arrived during apply()."""


def _raise_terminated(signum: int, _frame: Any) -> NoReturn:
    raise _Terminated(signum)


def apply(ctx: Context, plan: Plan, targets: Mapping[str, Any],
          record: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Run the steps; journal each undo before its step; on any failure before the point of no
    return undo in reverse; past it, finish the cleanup steps whatever happens."""
    import signal
    import time
    journal = Journal(os.path.join(ctx.paths.journal_dir, f"{ctx.op_id}.json"), {
        "schema_version": JOURNAL_SCHEMA, "op_id": ctx.op_id, "pid": os.getpid(),
        "command": ctx.command, "targets": dict(targets), "plan": plan.as_list(), "done": [],
        "started_at": rfc3339(ctx.started)})
    ctx.journal = journal
    journal.write()
    handlers = {}
    if _main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            handlers[sig] = signal.signal(sig, _raise_terminated)
    record = [] if record is None else record        # the caller's list still holds the steps after a failure
    cleanups = [s for s in plan.steps if s.cleanup]
    try:
        for step in (s for s in plan.steps if not s.cleanup):
            for observer in STEP_OBSERVERS:
                observer(step, "before")
            journal.doc["done"].append({"step": step.id, "undo": step.undo.as_dict() if step.undo else None})
            journal.write()
            record.append({"step": step.id, "status": "started", "ms": 0})
            ctx.out.progress(step.summary)
            t0 = time.monotonic()
            step.do()
            record[-1].update(status="done", ms=int((time.monotonic() - t0) * 1000))
            for observer in STEP_OBSERVERS:
                observer(step, "after")
        if cleanups:
            # The point of no return: from here a failure, Ctrl-C or recovery finishes the cleanup.
            journal.doc["cleanup"] = [s.cleanup.as_dict() for s in cleanups]
            journal.write()
    except BaseException as exc:
        for entry in record:
            entry["status"] = "undone" if entry["status"] == "done" else "failed"
        failed = _undo_all(ctx, [d["undo"] for d in journal.doc["done"] if d["undo"]])
        journal.delete()
        ctx.journal = None
        if failed:
            exc.add_note("undo failed for: " + "; ".join(failed))
        raise
    finally:
        for sig, old in handlers.items():
            signal.signal(sig, old)
    if cleanups:
        _finish_cleanup(ctx, journal, cleanups, record)
    journal.delete()
    ctx.journal = None
    return record


def _finish_cleanup(ctx: Context, journal: Journal, steps: Sequence[Step], record: list[dict[str, Any]]) -> None:
    """Run the cleanup steps with Ctrl-C, SIGTERM and SIGHUP held off: the change already stands, so
    an interrupt only waits for them. A cleanup that fails becomes a warning (what it leaves behind
    carries the op id; doctor reports it and --fix removes it)."""
    import signal
    import time
    seen: list[int] = []

    def hold(signum: int, _frame: Any) -> None:
        if not seen:
            ctx.out.progress("past the point of no return: finishing the cleanup, please wait", always=True)
        seen.append(signum)
    previous = {sig: signal.signal(sig, hold) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)} \
        if _main_thread() else {}
    try:
        for step in steps:
            for observer in STEP_OBSERVERS:
                observer(step, "before")
            journal.doc["done"].append({"step": step.id, "undo": None})
            journal.write()
            record.append({"step": step.id, "status": "started", "ms": 0})
            ctx.out.progress(step.summary)
            t0 = time.monotonic()
            try:
                run_undo(ctx, step.cleanup.as_dict())
                record[-1].update(status="done", ms=int((time.monotonic() - t0) * 1000))
            except OSError as exc:
                record[-1]["status"] = "failed"
                ctx.out.warn(f"{step.summary}: {exc}; abssctl doctor --fix finishes it")
            for observer in STEP_OBSERVERS:
                observer(step, "after")
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
    if seen:
        ctx.out.warn("the interrupt came after the point of no return; the operation was completed")


def recover_journals(ctx: Context) -> list[str]:
    """Settle every journal whose process is dead (after kill -9): roll it back, or, past its point
    of no return, finish its cleanup. Returns their op ids."""
    recovered = []
    for path, doc in list_journals(ctx.paths.journal_dir):
        if doc is None or pid_alive(int(doc.get("pid") or 0)) and doc.get("pid") != os.getpid():
            continue
        if "cleanup" in doc:
            ctx.out.progress(f"recover: finishing {doc.get('command')} ({doc.get('op_id')}), which had passed "
                             "its point of no return when its process died")
            failed = []
            for action in doc["cleanup"]:
                try:
                    run_undo(ctx, action)
                except OSError as exc:
                    failed.append(f"{action.get('kind')} {(action.get('args') or {}).get('path', '')}: {exc}")
        else:
            ctx.out.progress(f"recover: rolling back {doc.get('command')} ({doc.get('op_id')}) "
                             "left by a process that died")
            failed = _undo_all(ctx, [d["undo"] for d in doc.get("done", []) if d.get("undo")])
        if failed:
            raise HostError(f"could not settle the interrupted operation {doc.get('op_id')}",
                            hint="recover by hand: " + "; ".join(failed), details={"journal": path})
        os.unlink(path)
        recovered.append(str(doc.get("op_id")))
    return recovered


def recover_before_validation(ctx: Context) -> None:
    """Roll back dead journals before a mutating command judges the state they left half-changed."""
    try:
        dead = [doc for _p, doc in list_journals(ctx.paths.journal_dir)
                if doc and not pid_alive(int(doc.get("pid") or 0))]
    except OSError:
        return
    if not dead:
        return
    ctx.take_locks("exclusive")
    try:
        recover_journals(ctx)
    finally:
        ctx.release_locks()


# -- the mutating-command skeleton (§4.0) -----------------------------------------

class Mutation:
    """What a mutating command declares: its plan builder, locks, prompt and log fields."""

    def __init__(self, *, title: str, build: Callable[[], Plan], global_mode: str = "shared",
                 instances: Sequence[str] = (), target: Mapping[str, Any] | None = None,
                 args: Mapping[str, Any] | None = None, confirm: Callable[[Plan], None] | None = None,
                 finish: Callable[[Plan], dict[str, Any]] | None = None,
                 outcome: Callable[[dict[str, Any]], list[str]] | None = None) -> None:
        self.title = title
        self.build = build
        self.global_mode = global_mode
        self.instances = list(instances)
        self.target = dict(target or {})
        self.args = dict(args or {})
        self.confirm = confirm
        self.finish = finish
        self.outcome = outcome                  # (finish's fields) -> the lines a person reads at the end
        self.log_extra: dict[str, Any] = {}     # fields steps add to the ops-log record (backup ids, ...)


def confirm(ctx: Context, question: str, choices: str = "[y] yes   [N] no", *, default_yes: bool = False) -> None:
    """Ask before a risky step whose safe path is the default; --yes accepts it."""
    if ctx.assume_yes:
        return
    if not ctx.interactive:
        raise NeedsConfirmation(f"{question.splitlines()[0]} (needs confirmation)",
                                hint="re-run with --yes to accept, or run it in a terminal")
    ask_yes(ctx, question, choices, default_yes=default_yes)


def ask_yes(ctx: Context, question: str, choices: str = "[y] yes   [N] no", *, default_yes: bool = False) -> None:
    """Prompt on the terminal; anything but y/yes (or, with ``default_yes``, an empty answer) declines."""
    answer = ctx.out.ask(question, choices).strip().lower()
    if answer not in ("y", "yes") and not (default_yes and answer == ""):
        raise Declined("declined; nothing was changed")


def run_mutation(ctx: Context, m: Mutation) -> Result:
    """Validate, plan, dry-run, prompt, lock, re-check, recover, apply, log (DESIGN §4.0)."""
    plan = m.build()
    if ctx.dry_run:
        return Result({"dry_run": True, "plan": plan.as_list()}, plan.text(), changed=False)
    if m.confirm and plan.steps:
        m.confirm(plan)
    steps: list[dict[str, Any]] = []
    error: BaseException | None = None
    try:
        ctx.take_locks(m.global_mode, m.instances)
        recover_journals(ctx)
        plan = m.build()                      # re-check now that nothing else can move
        if plan.steps:
            apply(ctx, plan, m.target, steps)
        extra = m.finish(plan) if m.finish else {}
    except BaseException as exc:
        error = exc
        raise
    finally:
        if ctx.locks:
            _log_operation(ctx, m, plan, steps, error)
        ctx.release_locks()
    changed = bool(plan.steps)
    # The progress lines have already shown each step: a person reads the outcome, not the plan again
    # (the plan stays in --dry-run, and in --json's steps).
    if not changed:
        text = [f"{m.title}: already up to date; nothing changed"]
    else:
        text = m.outcome(extra) if m.outcome else [f"{plan.title}: done"]
    return Result({"op_id": ctx.op_id, "duration_ms": int((utc_now() - ctx.started) * 1000),
                   "steps": steps, **extra}, text, changed=changed)


def _log_operation(ctx: Context, m: Mutation, plan: Plan, steps: list[dict[str, Any]],
                   error: BaseException | None) -> None:
    import pwd
    if error is None:
        result, code, err = "ok", 0, None
    elif isinstance(error, (KeyboardInterrupt, _Terminated, Interrupted)):
        result, code, err = "interrupted", 130, {"kind": "Interrupted", "message": "interrupted"}
    else:
        exc = error if isinstance(error, AbssctlError) else (
            _host_error(error) if isinstance(error, OSError) else InternalError(type(error).__name__))
        result = "rolled-back" if ctx.journal is None and plan.steps else "error"
        code, err = int(exc.exit_code), {"kind": exc.kind, "message": exc.message}
    uid = os.getuid()
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    record = {"schema_version": OPSLOG_SCHEMA, "ts": rfc3339(ctx.started, millis=True),
              "op_id": ctx.op_id, "command": ctx.command, "args": redact_args(m.args),
              "target": m.target, "actor": {"uid": uid, "user": user,
                                            "sudo_user": os.environ.get("SUDO_USER")},
              "result": result, "exit_code": code, "changed": bool(plan.steps) and error is None,
              "duration_ms": int((utc_now() - ctx.started) * 1000), "lock_wait_ms": ctx.lock_wait_ms,
              "steps": steps, "error": err, "abssctl_version": __version__, **m.log_extra}
    try:
        ctx.oplog.append(record)
    except OSError as exc:
        ctx.out.warn(f"could not write the operations log {ctx.paths.oplog}: {exc.strerror}")


# ============================================================================
# 8b. Operations: host and state (init, config, ports, history, instance list/show)
# ============================================================================

# (attribute of Paths, owner, mode) for every directory init manages (DESIGN §3.5).
# Owners: "root" is root:root; "group" is root:<service group>.
INIT_DIRS = (
    ("config_dir", "root", 0o755), ("templates_dir", "root", 0o755), ("tls_dir", "root", 0o700),
    ("install_root", "root", 0o755), ("runtime_root", "root", 0o755), ("instance_root", "root", 0o755),
    ("state_dir", "root", 0o755), ("registry_dir", "group", 0o750), ("journal_dir", "root", 0o700),
    ("backup_root", "root", 0o700), ("log_dir", "root", 0o750), ("run_dir", "root", 0o755),
    ("acme_webroot", "root", 0o755),
)


def _lookup_ids(user: str, group: str) -> tuple[int | None, int | None]:
    import grp
    import pwd
    try:
        uid: int | None = pwd.getpwnam(user).pw_uid
    except KeyError:
        uid = None
    try:
        gid: int | None = grp.getgrnam(group).gr_gid
    except KeyError:
        gid = None
    return uid, gid


def _nearest_existing(path: str) -> str:
    while not os.path.lexists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def check_writable(paths: Iterable[str]) -> None:
    """Every path must be creatable or writable: else exit 3 naming it (before any change)."""
    for path in paths:
        anchor = _nearest_existing(path)
        if anchor != path and not os.path.isdir(anchor):
            raise HostError(f"cannot create {path}: {anchor} is not a directory",
                            hint="point the [paths] key at a directory, or remove the file")
        if not os.access(anchor if anchor != path else path, os.W_OK):
            raise PermissionDenied(f"cannot write {anchor}",
                                   why="abssctl init needs to create or fix this path",
                                   hint="run as root, or point [paths] into a writable directory")


class InitPlanner:
    """Builds init's plan from what is on disk now; each call sees the current state."""

    def __init__(self, ctx: Context, allow_create_user: bool) -> None:
        self.ctx = ctx
        self.allow_create_user = allow_create_user
        self.user = validate_account(ctx.config.get("service", "user"), "user")
        self.group = validate_account(ctx.config.get("service", "group"), "group")
        self.as_root = os.geteuid() == 0

    def managed_paths(self) -> list[str]:
        return [getattr(self.ctx.paths, attr) for attr, _o, _m in INIT_DIRS]

    def build(self) -> Plan:
        plan = Plan("init")
        uid, gid = _lookup_ids(self.user, self.group)
        self._accounts(plan, uid, gid)
        planned: set[str] = set()
        for attr, owner, mode in INIT_DIRS:
            self._directory(plan, getattr(self.ctx.paths, attr), owner, mode, planned)
        self._files(plan)
        return plan

    def needs_user(self) -> bool:
        return _lookup_ids(self.user, self.group)[0] is None

    def _accounts(self, plan: Plan, uid: int | None, gid: int | None) -> None:
        runner = self.ctx.runner
        if gid is None:
            plan.add("accounts.group", f"create system group {self.group}", self.group,
                     lambda: runner.run("groupadd", ["--system", self.group], mutating=True))
        if uid is None:
            argv = ["--system", "--gid", self.group, "--no-create-home", "--home-dir", "/nonexistent",
                    "--shell", "/usr/sbin/nologin", self.user]
            plan.add("accounts.user", f"create system user {self.user} (no login, no home)", self.user,
                     lambda: runner.run("useradd", argv, mutating=True))

    def _owner(self, owner: str) -> tuple[int, int]:
        return 0, (self.ctx.service_gid() if owner == "group" else 0)

    def _directory(self, plan: Plan, path: str, owner: str, mode: int, planned: set[str]) -> None:
        missing = []
        probe = path
        while not os.path.lexists(probe) and probe not in planned:
            missing.append(probe)
            probe = os.path.dirname(probe)
        for parent in reversed(missing[1:]):       # parents outside the table: plain 0755
            planned.add(parent)
            plan.add("fs.mkdir", f"create {parent}", parent,
                     lambda p=parent: ensure_dir(p, 0o755), UndoAction("remove_path", path=parent, dir=True))
        if missing:
            planned.add(path)
            plan.add("fs.mkdir", f"create {path} ({owner_label(owner, self.group)}, {mode:04o})", path,
                     lambda: self._make_dir(path, owner, mode), UndoAction("remove_path", path=path, dir=True))
            return
        if path in planned:
            return
        if not os.path.isdir(path) or os.path.islink(path):
            raise HostError(f"{path} exists but is not a directory",
                            hint="move it away or point the [paths] key elsewhere, then re-run init")
        self._fix_existing(plan, path, owner, mode)

    def _fix_existing(self, plan: Plan, path: str, owner: str, mode: int) -> None:
        """A step that sets owner and mode of an existing path, if they differ from §3.5."""
        st = os.lstat(path)
        want_uid, want_gid = self._owner(owner)
        wrong_owner = self.as_root and (st.st_uid, st.st_gid) != (want_uid, want_gid)
        if (st.st_mode & 0o7777) != mode or wrong_owner:
            plan.add("fs.fix", f"set {path} to {owner_label(owner, self.group)} {mode:04o} "
                               f"(was {st.st_mode & 0o7777:04o})", path,
                     lambda: self._fix(path, owner, mode),
                     UndoAction("restore_mode", path=path, mode=st.st_mode & 0o7777,
                                uid=st.st_uid, gid=st.st_gid))

    def _make_dir(self, path: str, owner: str, mode: int) -> None:
        ensure_dir(path, mode)           # the journal may have created state_dir/journal already
        self._fix(path, owner, mode)

    def _fix(self, path: str, owner: str, mode: int) -> None:
        if self.as_root:
            os.chown(path, *self._owner(owner), follow_symlinks=False)
        os.chmod(path, mode)

    def _files(self, plan: Plan) -> None:
        paths = self.ctx.paths
        tag = self.ctx.op_id
        if not os.path.exists(paths.config_file):
            text = config_template(self.ctx.config).encode()
            plan.add("config.write", f"write a commented default {paths.config_file}", paths.config_file,
                     lambda: atomic_write(paths.config_file, text, mode=0o644, tag=tag),
                     UndoAction("remove_path", path=paths.config_file))
        for name in REGISTRY_FILES + ("backups",):
            reg = self.ctx.registry(name)
            if os.path.isfile(reg.path) and not os.path.islink(reg.path):
                for path in (reg.path, reg.path + ".prev"):
                    if os.path.isfile(path) and not os.path.islink(path):
                        self._fix_existing(plan, path, "root" if name == "backups" else "group", reg.mode)
                continue
            if os.path.lexists(reg.path):
                continue
            plan.add("registry.create", f"create an empty {name} registry {reg.path}", reg.path,
                     lambda r=reg: r.save(r.empty(), tag), UndoAction("remove_path", path=reg.path))


def owner_label(owner: str, group: str) -> str:
    return "root:root" if owner == "root" else f"root:{group}"


def op_init(ctx: Context, *, allow_create_user: bool) -> Result:
    """Create the service account, directories, default config and empty registries (idempotent)."""
    planner = InitPlanner(ctx, allow_create_user)
    check_writable(planner.managed_paths() + [ctx.paths.config_file])

    def ask(_plan: Plan) -> None:
        # The prompt's default is "no", so --yes alone does not create an account.
        if planner.needs_user() and not allow_create_user:
            if not ctx.interactive or ctx.assume_yes:
                raise NeedsConfirmation(f"init would create the system user {planner.user}",
                                        hint="re-run with --allow-create-user, or create the user yourself")
            ask_yes(ctx, f"Create the system user '{planner.user}' (group '{planner.group}', no login, "
                         "no home)?\nEvery sync server runs as this user.")

    def finish(_plan: Plan) -> dict[str, Any]:
        return {"service": {"user": planner.user, "group": planner.group},
                "paths": {attr: getattr(ctx.paths, attr) for attr, _o, _m in INIT_DIRS}}

    result = run_mutation(ctx, Mutation(title="init", build=planner.build, global_mode="exclusive",
                                        target={"kind": "host"},
                                        args={"allow_create_user": allow_create_user},
                                        confirm=ask, finish=finish, outcome=lambda _x: [
                                            f"the host is ready for abssctl: service user {planner.user}, "
                                            f"config {ctx.paths.config_file}, state in {ctx.paths.state_dir}",
                                            "next: abssctl version install latest --set-current, then "
                                            "abssctl instance create NAME --domain FQDN"]))
    return result


# -- config ------------------------------------------------------------------------

def op_init_discover(ctx: Context) -> Result:
    """init --discover: a read-only report of what is on the host compared with the registries."""
    found = discover(ctx)
    text = table(("NAME", "REGISTERED", "PORT", "DOMAIN", "VERSION", "ISSUES"),
                 [(s["name"], "yes" if s["registered"] else "no", s["port"], s["domain"], s["version"],
                   "; ".join(s["issues"])) for s in found["instances"]]) if found["instances"] else ["no instances found"]
    text += [f"version {v['version']}: {'registered' if v['registered'] else 'NOT registered'}"
             for v in found["versions"]]
    return Result({"discovered": found}, text)


def op_init_rebuild(ctx: Context) -> Result:
    """init --rebuild-state: registries rewritten from discovery, the old ones copied aside first."""
    found = discover(ctx)

    def build() -> Plan:
        plan = Plan("rebuild the registries")
        rebuild_plan(ctx, plan, discover(ctx))
        return plan
    result = run_mutation(ctx, Mutation(title="init --rebuild-state", build=build, global_mode="exclusive",
                                        target={"kind": "host"}, args={"rebuild_state": True},
                                        outcome=lambda _x: [
                                            f"rebuilt the registries in {ctx.paths.registry_dir} from what is "
                                            f"on the host; the old ones are in "
                                            f"{os.path.join(ctx.paths.registry_dir, 'backup-' + ctx.op_id)}",
                                            "next: abssctl instance list, and abssctl doctor"]))
    result.data["discovered"] = found
    return result


def op_config_show(ctx: Context) -> Result:
    cfg = ctx.config
    text = [f"# {cfg.path} ({'exists' if cfg.path_exists else 'missing: built-in defaults'})"]
    for section, keys in cfg.values.items():
        text.append(f"[{section}]")
        for key, value in keys.items():
            text.append(f"{key} = {_toml_value(value)}  # {cfg.sources[f'{section}.{key}']}")
        text.append("")
    return Result({"path": cfg.path, "exists": cfg.path_exists, "config": cfg.values,
                   "sources": cfg.sources, "unknown_keys": cfg.unknown}, text[:-1])


def op_config_path(ctx: Context) -> Result:
    return Result({"path": ctx.config.path, "exists": ctx.config.path_exists}, [ctx.config.path])


def op_config_check(ctx: Context, problems: Sequence[ConfigProblem]) -> Result:
    """Validate the file, the environment and every template override; exit 2 if anything is invalid."""
    found = list(problems)
    templates = {}
    for name in TEMPLATE_NAMES:
        try:
            text, origin = template_source(ctx.paths.templates_dir, name)
            render(ctx.paths.templates_dir, name, sample_values(name))
            templates[name] = origin
        except UsageError as exc:
            found.append(ConfigProblem(f"template {name}", ctx.paths.templates_dir, exc.message))
            templates[name] = "invalid"
    if found:
        err = config_error(found)
        err.details["templates"] = templates
        raise err
    text = [f"{ctx.config.path}: ok" if ctx.config.path_exists else "no config file: built-in defaults are valid"]
    text += [f"template {n}: {o}" for n, o in templates.items()]
    return Result({"path": ctx.config.path, "exists": ctx.config.path_exists, "valid": True,
                   "templates": templates, "unknown_keys": ctx.config.unknown}, text)


# -- ports ---------------------------------------------------------------------------

def port_listening(host: str, port: int, timeout: float = 0.3) -> bool:
    """True when something accepts TCP connections on host:port."""
    import socket
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def op_ports_list(ctx: Context) -> Result:
    reg = ctx.registry("ports").load()["ports"]
    bind = ctx.config.get("ports", "bind")
    ports = sorted(int(p) for p in reg if str(p).isdigit())
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(max_workers=min(16, max(1, len(ports)))) as pool:
        live = list(pool.map(lambda p: port_listening(bind, p), ports))
    rows = [{"port": p, "instance": reg[str(p)].get("instance"), "listening": up}
            for p, up in zip(ports, live)]
    base, top = ctx.config.get("ports", "base"), ctx.config.get("ports", "max")
    text = table(("PORT", "INSTANCE", "LISTENING"),
                 [(r["port"], r["instance"], "yes" if r["listening"] else "no") for r in rows])
    text.append(f"range {base}-{top}, {len(rows)} reserved")
    return Result({"ports": rows, "range": {"base": base, "max": top}}, text)


# -- history -------------------------------------------------------------------------

def op_history(ctx: Context, *, limit: int, instance: str | None) -> Result:
    records = ctx.oplog.read()
    if instance:
        records = [r for r in records if (r.get("target") or {}).get("name") == instance]
    records = list(reversed(records))[:limit]
    rows = []
    for r in records:
        target = r.get("target") or {}
        rows.append((r.get("ts"), r.get("op_id"), r.get("command"),
                     target.get("name") or target.get("kind"), r.get("result"), r.get("exit_code"),
                     f"{r.get('duration_ms', 0)} ms"))
    text = table(("TS", "OP ID", "COMMAND", "TARGET", "RESULT", "EXIT", "DURATION"), rows) if rows \
        else ["no operations recorded yet"]
    return Result({"operations": records}, text)


# -- instance list / show (registry reads only: the fast path) ----------------------

def instance_url(entry: Mapping[str, Any], https_port: int) -> str:
    suffix = "" if https_port == 443 else f":{https_port}"
    return f"https://{entry.get('domain')}{suffix}/"


def op_instance_list(ctx: Context) -> Result:
    instances = ctx.registry("instances").load()["instances"]
    https = ctx.config.get("nginx", "https_port")
    rows = []
    for name in sorted(instances):
        e = instances[name]
        tls = e.get("tls")
        rows.append({"name": name, "domain": e.get("domain"), "port": e.get("port"),
                     "version": e.get("version"), "resolved_version": e.get("resolved_version"),
                     "enabled": e.get("enabled"), "pending_restart": e.get("pending_restart", False),
                     "tls": tls.get("source") if isinstance(tls, dict) else tls,
                     "last_backup_id": e.get("last_backup_id"), "url": instance_url(e, https)})
    text = table(("NAME", "DOMAIN", "PORT", "VERSION", "ENABLED", "URL"),
                 [(r["name"], r["domain"], r["port"], r["resolved_version"] or r["version"],
                   "yes" if r["enabled"] else "no", r["url"]) for r in rows]) if rows \
        else ["no instances yet; create one with: abssctl instance create NAME --domain FQDN"]
    return Result({"instances": rows}, text)


def _redact_config(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: ("<redacted>" if SECRET_KEY_RE.search(k) else _redact_config(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact_config(v) for v in value]
    return value


def op_instance_show(ctx: Context, name: str) -> Result:
    instances = ctx.registry("instances").load()["instances"]
    if name not in instances:
        raise NotFound(f"no instance named {name!r}", hint="see abssctl instance list")
    entry = dict(instances[name])
    backups = [b for b in ctx.registry("backups").load()["backups"].values()
               if isinstance(b, dict) and b.get("instance") == name] if os.access(
        ctx.paths.backup_index, os.R_OK) else []
    newest = max(backups, key=lambda b: str(b.get("created_at")), default=None)
    config_path = (entry.get("paths") or {}).get("config") or os.path.join(
        ctx.paths.instance_dir(name), "config.json")
    try:
        server_config = _redact_config(read_json_file(config_path))
    except (PermissionDenied, CorruptState):
        server_config = None
    entry.update({"url": instance_url(entry, ctx.config.get("nginx", "https_port")),
                  "unit": unit_name(name), "config": server_config,
                  "backups": {"count": len(backups), "newest": newest and newest.get("id"),
                              "newest_at": newest and newest.get("created_at")}})
    text = [f"{k}: {json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v}"
            for k, v in sorted(entry.items())]
    return Result({"instance": entry}, text)


def op_complete(ctx: Context, what: str) -> Result:
    """Names for shell completion, one per line; reads registries only, never fails loudly."""
    try:
        if what == "instances":
            names = sorted(ctx.registry("instances").load()["instances"])
        elif what == "versions":
            names = sorted(ctx.registry("versions").load()["versions"], key=semver_key)
        else:
            names = sorted(ctx.registry("backups").load()["backups"])
    except AbssctlError:
        names = []
    return Result({"names": names}, names)


# ============================================================================
# 8c. Operations: server versions
# ============================================================================

MIN_INSTALL_FREE = 512 << 20
BUNDLE_KIND = "abssctl-version-bundle"
BUNDLE_SCHEMA = 1
BUNDLE_SCHEMA_RUNTIME = 2        # a bundle that carries its node runtime under runtime/ (§11.1)
BUNDLE_HEADERS = ("abssctl-bundle.json", "SHA256SUMS")
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
GZIP_MAGIC = b"\x1f\x8b"


class Versions:
    """Reads of the versions and instances registries shared by the version commands."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.package = ctx.config.get("npm", "package")
        self.registry = ctx.registry("versions")
        self.doc = self.registry.load()
        self.instances = ctx.registry("instances").load()["instances"]

    @property
    def current(self) -> str | None:
        return self.doc.get("current")

    def tree(self, version: str) -> str:
        return os.path.join(self.ctx.paths.install_root, version)

    def package_dir(self, version: str) -> str:
        return os.path.join(self.tree(version), "node_modules", *self.package.split("/"))

    def users_of(self, version: str) -> list[str]:
        """Instances bound to, or running, this version (``current`` counts for the current one)."""
        names = []
        for name, entry in sorted(self.instances.items()):
            binding = entry.get("version")
            if version in (binding, entry.get("resolved_version")) or (
                    binding == "current" and version == self.current):
                names.append(name)
        return names

    def following_current(self) -> list[str]:
        return sorted(n for n, e in self.instances.items() if e.get("version") == "current")

    def state_of(self, version: str) -> str:
        """installed, missing, broken (registry and disk disagree, or the tree is wrong)."""
        entry = self.doc["versions"].get(version)
        on_disk = os.path.isdir(self.tree(version))
        if entry is None and not on_disk:
            return "missing"
        if entry is None or not on_disk:
            return "broken"
        manifest = read_json_file(os.path.join(self.package_dir(version), "package.json"))
        return "installed" if isinstance(manifest, dict) and manifest.get("version") == version else "broken"

    def require_not_broken(self, version: str) -> str:
        state = self.state_of(version)
        if state == "broken":
            raise HostError(f"version {version} is half installed: {self.tree(version)} and the versions "
                            "registry disagree", hint=f"move {self.tree(version)} aside (or restore "
                            f"{self.registry.path}.prev), then install {version} again")
        return state


def _registry_args(reg: Registry) -> dict[str, Any]:
    return {"file": reg.path, "key": reg.key, "lock": reg.lock_path, "mode": reg.mode}


# -- managed runtimes (DESIGN §11.1) ----------------------------------------------------

RUNTIME_MAX_BYTES = 2 << 30
MIN_RUNTIME_FREE = 256 << 20


def runtime_of(ctx: Context, entry: Mapping[str, Any] | None) -> str | None:
    """The runtime dir a versions-registry entry runs on, or None (system node)."""
    rid = (entry or {}).get("runtime")
    return os.path.join(ctx.paths.runtime_root, str(rid)) if rid else None


def node_argv_for(ctx: Context, entry: Mapping[str, Any] | None) -> list[str]:
    """The node argv a version runs with: its managed runtime's, else ``[commands] node``."""
    rt_dir = runtime_of(ctx, entry)
    return runtime_commands(rt_dir)["node"] if rt_dir else ctx.config.command("node")


def runner_for(ctx: Context, entry: Mapping[str, Any] | None) -> Runner:
    """ctx.runner, with node and npm pointed at the version's runtime when it has one."""
    rt_dir = runtime_of(ctx, entry)
    return ctx.runner.with_commands(**runtime_commands(rt_dir)) if rt_dir else ctx.runner


def installed_runtimes(ctx: Context) -> dict[str, dict[str, Any]]:
    """runtimes.json entries whose tree is on disk."""
    doc = ctx.registry("runtimes").load()["runtimes"]
    return {rid: e for rid, e in doc.items()
            if isinstance(e, dict) and os.path.isfile(os.path.join(ctx.paths.runtime_root, rid, "bin", "node"))}


def plan_runtime(ctx: Context, npm: Npm, engines: str | None, *, refresh: bool) -> Runtime:
    """Choose the runtime for a server version: an installed one, or a release to fetch (§11.1)."""
    arch = runtime_arch()
    package = runtime_package(ctx.config, arch)
    have = {e.get("version"): rid for rid, e in installed_runtimes(ctx).items() if e.get("arch") == arch}
    found = npm.view(package, ["versions"])
    available = found if isinstance(found, list) else [found] if isinstance(found, str) else []
    version, reuse = choose_node(available, engines, int(ctx.config.get("node", "default_major")),
                                 [v for v in have if isinstance(v, str)], refresh)
    rt = Runtime(ctx.paths.runtime_root, version, arch, package)
    if reuse:
        entry = ctx.registry("runtimes").load()["runtimes"][rt.id]
        rt.installed = True
        rt.npm_version = (entry.get("npm") or {}).get("version")
        rt.node = Node(rt.runner(ctx.runner)).info()
        ctx.out.progress(f"using the installed runtime {rt.id} (npm {rt.npm_version})")
        return rt
    if os.path.lexists(rt.dir):
        raise HostError(f"{rt.dir} exists but is not recorded in runtimes.json",
                        hint=f"move {rt.dir} aside, then run the install again")
    rt.npm_version = choose_npm(npm.view(f"npm@{NPM_RANGE}", ["version", "engines"]), "v" + version)
    ctx.out.progress(f"node for engines.node {engines or '(none)'}: {package}@{version} with npm {rt.npm_version}")
    return rt


def _runtime_staging(ctx: Context, rt: Runtime) -> str:
    return os.path.join(rt.root, f".staging-{rt.id}-{ctx.op_id}")


def _new_staging(path: str) -> None:
    if os.path.lexists(path):
        raise Conflict(f"{path} already exists", hint="another install may be running")
    ensure_dir(os.path.dirname(path), 0o755)
    ensure_dir(path, 0o755)


def add_runtime_fetch_steps(ctx: Context, plan: Plan, rt: Runtime, npm: Npm) -> None:
    """npm pack the node package and npm, unpack both into a staging dir, verify, move, record."""
    pack = os.path.join(rt.root, f".staging-pack-{rt.id}-{ctx.op_id}")
    staging = _runtime_staging(ctx, rt)
    got: dict[str, dict[str, Any]] = {}

    def fetch() -> None:
        _new_staging(pack)
        for key, package, version in (("node", rt.package, rt.version), ("npm", "npm", rt.npm_version)):
            ctx.out.progress(f"fetching {key} {version} ({package})")
            got[key] = npm.pack(f"{package}@{version}", pack)
            ctx.out.progress(f"fetched {package}@{version} ({human_bytes(got[key]['size'])})")

    def unpack() -> None:
        _new_staging(staging)
        for key, sub in (("node", ""), ("npm", os.path.join("lib", "npm"))):
            dest = os.path.join(staging, sub) if sub else staging
            ensure_dir(os.path.dirname(dest), 0o755)
            ensure_dir(dest, 0o755)
            ctx.out.progress(f"unpacking {os.path.basename(got[key]['path'])} "
                             f"({human_bytes(got[key]['size'])})")
            tar, close = open_tar_stream(ctx, got[key]["path"])
            try:
                safe_extract(tar, dest, prefix="package/", expected=None, max_bytes=RUNTIME_MAX_BYTES,
                             allow_symlinks=True)
            except archive_errors() as exc:
                raise ProviderError(f"{os.path.basename(got[key]['path'])} is damaged ({exc})",
                                    hint="clear npm's cache (npm cache clean --force) and try again") from None
            finally:
                close()
        remove_tree(pack)
        rt.record.update(node={"package": rt.package, "integrity": got["node"]["integrity"]},
                         npm={"version": rt.npm_version, "integrity": got["npm"]["integrity"]})

    plan.add("runtime.fetch", f"npm pack {rt.package}@{rt.version} and npm@{rt.npm_version} into {pack}",
             pack, fetch, UndoAction("remove_tree", path=pack))
    plan.add("runtime.unpack", f"unpack node {rt.version} and npm {rt.npm_version} into {staging}", staging,
             unpack, UndoAction("remove_tree", path=staging))
    add_runtime_place_steps(ctx, plan, rt, staging)


def add_runtime_place_steps(ctx: Context, plan: Plan, rt: Runtime, staging: str) -> None:
    """Check a staged runtime (node --version, headers, npm, ABI), rename it into place, record it."""
    def verify() -> None:
        runner = ctx.runner.with_commands(**runtime_commands(staging))
        try:
            said = runner.run("node", ["--version"], mutating=False, check=False).stdout.strip()
            npm_said = runner.run("npm", ["--version"], mutating=False, check=False).stdout.strip()
            info = Node(runner).info()
        except HostError as exc:
            raise ProviderError(f"the unpacked node {rt.version} does not run: {exc.message}",
                                hint=f"[node] package ({rt.package}) must hold a node for this machine") from None
        if said != f"v{rt.version}":
            raise ProviderError(f"{rt.package}@{rt.version}: bin/node --version printed {said!r}, not v{rt.version}",
                                hint="[node] package must name a package whose bin/node is the release "
                                     "asked for; nothing was installed")
        if not os.path.isfile(os.path.join(staging, "include", "node", "node_version.h")):
            raise ProviderError(f"{rt.package}@{rt.version} has no include/node/node_version.h, so native "
                                "modules cannot build against it", hint="[node] package must name a package "
                                "with bin/node and include/node")
        if npm_said != rt.npm_version:
            raise ProviderError(f"the unpacked npm reports {npm_said!r}, not {rt.npm_version}",
                                hint="the npm package is damaged; clear npm's cache and try again")
        if rt.expect_abi and info.abi != rt.expect_abi:
            raise ProviderError(f"node {rt.version} reports ABI {info.abi}, not {rt.expect_abi}")
        rt.record.update(version=rt.version, arch=rt.arch, abi=info.abi, glibc=info.glibc,
                         size_bytes=tree_size(staging), installed_at=rfc3339(utc_now()))

    def place() -> None:
        os.rename(staging, rt.dir)
        rt.node = Node(rt.runner(ctx.runner)).info()
        rt.installed = True

    def record() -> None:
        with reg.edit(ctx.op_id) as doc:
            doc["runtimes"][rt.id] = dict(rt.record)

    reg = ctx.registry("runtimes")
    plan.add("runtime.verify", f"check node {rt.version}: --version, headers, npm {rt.npm_version}", staging, verify)
    plan.add("runtime.rename", f"move the runtime to {rt.dir}", rt.dir, place,
             UndoAction("rename", src=rt.dir, dst=staging))
    plan.add("runtime.record", f"record {rt.id} in {reg.path}", reg.path, record,
             UndoAction("registry_remove", name=rt.id, **_registry_args(reg)))


def _build_tool_warnings(ctx: Context, node: NodeInfo | None) -> None:
    import shutil
    missing = [tool for tool in ("make", "g++", "python3") if shutil.which(tool) is None]
    if node is not None and node.headers is None:
        missing.append(f"node headers (<prefix>/include/node for {node.exe})")
    if missing:
        ctx.out.warn("native modules may have to build from source, which needs: " + ", ".join(missing)
                     + " (apt-get install make g++ python3; headers come with the node package)")


def _engines_sentence(package: str, version: str, engines: str, node: NodeInfo) -> str:
    return f'{package} {version} declares engines.node "{engines}"; this host runs node {node.version}'


class Installer:
    """The shared tail of install and import: verify a staged tree, smoke-start it, record it."""

    def __init__(self, ctx: Context, versions: Versions, version: str, node: NodeInfo | None, source: str,
                 rt: Runtime | None = None) -> None:
        self.ctx = ctx
        self.versions = versions
        self.version = version
        self.node = node
        self.source = source
        self.rt = rt
        root = ctx.paths.install_root
        self.staging = os.path.join(root, f".staging-{version}-{ctx.op_id}")
        self.smoke_dir = os.path.join(root, f".smoke-{version}-{ctx.op_id}")
        self.result: dict[str, Any] = {}

    @property
    def runner(self) -> Runner:
        """The Runner whose node (and npm) this version builds and runs with."""
        return self.rt.runner(self.ctx.runner) if self.rt is not None else self.ctx.runner

    def node_now(self) -> NodeInfo:
        """The node facts, once known (a fetched runtime's arrive when it is in place)."""
        if self.node is None and self.rt is not None:
            self.node = self.rt.node
        assert self.node is not None
        return self.node

    def built_by(self) -> str:
        if self.rt is not None:
            return self.rt.built_by()
        if self.source.startswith("bundle:"):
            return "the npm of the host that exported the bundle"
        done = self.ctx.runner.run("npm", ["--version"], mutating=False, check=False)
        return f"{' '.join(self.ctx.config.command('npm'))} (npm {done.stdout.strip() or '?'})"

    @property
    def staged_package(self) -> str:
        return os.path.join(self.staging, "node_modules", *self.versions.package.split("/"))

    def add_verify_steps(self, plan: Plan) -> None:
        plan.add("verify", f"verify {self.versions.package} {self.version}: version, bin, native modules, "
                           "smoke start", self.staging, self.verify,
                 UndoAction("remove_tree", path=self.smoke_dir))
        dest = self.versions.tree(self.version)
        plan.add("tree.rename", f"move the verified tree to {dest}", dest,
                 lambda: os.rename(self.staging, dest), UndoAction("rename", src=dest, dst=self.staging))
        reg = self.versions.registry
        plan.add("registry.add", f"record {self.version} in {reg.path}", reg.path, self.record,
                 UndoAction("registry_remove", name=self.version, **_registry_args(reg)))

    def verify(self) -> None:
        import time
        pkg = self.staged_package
        manifest = read_json_file(os.path.join(pkg, "package.json"))
        if not isinstance(manifest, dict) or manifest.get("version") != self.version:
            got = manifest.get("version") if isinstance(manifest, dict) else None
            raise ProviderError(f"npm installed {self.versions.package} {got}, not {self.version}")
        bin_rel = _bin_of(manifest)
        bin_path = os.path.realpath(os.path.join(pkg, bin_rel))
        if not bin_path.startswith(os.path.realpath(pkg) + "/") or not os.path.isfile(bin_path):
            raise ProviderError(f"the package's bin {bin_rel!r} is missing or outside the package")
        self.node_now()
        node = Node(self.runner)
        names = [n for n in self.ctx.config.get("npm", "allow_scripts")
                 if os.path.isdir(os.path.join(self.staging, "node_modules", n))
                 or os.path.isdir(os.path.join(pkg, "node_modules", n))]
        natives = node.check_native(pkg, names, built_by=self.built_by)
        broken = {k: v for k, v in natives.items() if v != "ok"}
        if broken:
            raise ProviderError("native modules do not load with node " + self.node.version + ": "
                                + "; ".join(f"{k}: {v}" for k, v in sorted(broken.items())),
                                hint="install make, g++ and python3 so they can build from source, "
                                     "or use the node this version was built for")
        reported = node.bin_version(pkg, bin_path)
        if reported.lstrip("v") != self.version:
            raise ProviderError(f"{bin_rel} --version printed {reported!r}, expected v{self.version}")
        engines = str((manifest.get("engines") or {}).get("node") or "")
        engines_ok = engines_satisfied(self.node.version, engines) if engines else True
        if engines_ok is False:
            self.ctx.out.warn(_engines_sentence(self.versions.package, self.version, engines, self.node))
        started = time.monotonic()
        try:
            migrations, info_version = smoke_start(self.ctx, pkg, bin_path, self.version, self.smoke_dir,
                                                   runner=self.runner)
        except ProviderError as exc:
            if engines_ok is False:
                raise ProviderError(_engines_sentence(self.versions.package, self.version, engines, self.node)
                                    + "; the server did not start on it: " + exc.message,
                                    hint='use [node] runtime = "managed", or install a node that '
                                         "satisfies the engines range and point [commands] node at it",
                                    details=exc.details) from None
            raise
        remove_tree(self.smoke_dir)
        lock = read_json_file(os.path.join(self.staging, "package-lock.json")) or {}
        key = "node_modules/" + self.versions.package
        self.result = {
            "version": self.version, "path": self.versions.tree(self.version), "source": self.source,
            "bin": bin_rel, "integrity": ((lock.get("packages") or {}).get(key) or {}).get("integrity"),
            "lockfile_sha256": sha256_file(os.path.join(self.staging, "package-lock.json"))
            if os.path.exists(os.path.join(self.staging, "package-lock.json")) else None,
            "size_bytes": tree_size(self.staging), "node": self.node_now().as_dict(),
            "runtime": self.rt.id if self.rt is not None else None,
            "engines_node": engines or None, "engines_ok": engines_ok is not False,
            "native_modules": sorted(natives), "migrations": migrations,
            "installed_at": rfc3339(utc_now()),
            "smoke_start": {"health": "UP", "info_version": info_version,
                            "seconds": round(time.monotonic() - started, 1)},
            "native_status": natives,
        }

    def record(self) -> None:
        entry = {k: v for k, v in self.result.items() if k not in ("smoke_start", "native_status")}
        with self.versions.registry.edit(self.ctx.op_id) as doc:
            doc["package"] = self.versions.package
            doc["versions"][self.version] = entry

    def output(self) -> dict[str, Any]:
        r = dict(self.result)
        r["native_modules"] = r.pop("native_status", {})
        r.pop("migrations", None)
        r.pop("lockfile_sha256", None)
        r["current"] = self.versions.registry.load().get("current") == self.version
        return r


def _bin_of(manifest: Mapping[str, Any]) -> str:
    b = manifest.get("bin")
    if isinstance(b, dict):
        b = b.get("actual-server")
    if not isinstance(b, str):
        raise ProviderError("the installed package declares no actual-server bin")
    return os.path.normpath(b)               # "./build/bin/x.js" and "build/bin/x.js" are one path


def _service_user(ctx: Context, own: str | None = None) -> str | None:
    """Who a smoke start runs as: OWN (an instance's own user) if that account exists, else the service
    user, else nobody; None means 'as we are'."""
    import pwd
    for name in (own, ctx.config.get("service", "user"), "nobody"):
        if not name:
            continue
        try:
            uid = pwd.getpwnam(name).pw_uid
        except KeyError:
            continue
        return None if uid == os.geteuid() else name
    return None


def smoke_start(ctx: Context, pkg: str, bin_path: str, version: str, work: str,
                runner: Runner | None = None, user: str | None = None) -> tuple[list[str], str]:
    """Start the staged server on a free loopback port with throwaway data; wait for /health UP and
    /info = version; return the migration titles it recorded in .migrate. ``runner`` picks the node;
    ``user`` (an instance's own user) is tried before the service user (_service_user)."""
    import pwd
    runner = runner or ctx.runner
    user = _service_user(ctx, user)
    data = os.path.join(work, "data")
    for sub in ("", "server-files", "user-files"):
        ensure_dir(os.path.join(data, sub), 0o750)
    port = free_loopback_port()
    cfg_path = os.path.join(work, "config.json")
    cfg = {"dataDir": data, "serverFiles": os.path.join(data, "server-files"),
           "userFiles": os.path.join(data, "user-files"), "port": port, "hostname": "127.0.0.1"}
    atomic_write(cfg_path, json.dumps(cfg).encode(), mode=0o644, tag=ctx.op_id)
    if user is not None:
        pw = pwd.getpwnam(user)
        for root, dirs, files in os.walk(work):
            for name in [root] + [os.path.join(root, n) for n in dirs + files]:
                os.chown(name, pw.pw_uid, pw.pw_gid)
    log_path = os.path.join(work, "server.log")
    with open(log_path, "wb") as log:
        proc = runner.popen("node", [bin_path, "--config", cfg_path], cwd=pkg, user=user,
                                env_extra={"NODE_ENV": "production", "ACTUAL_PORT": str(port),
                                           "ACTUAL_HOSTNAME": "127.0.0.1", "ACTUAL_DATA_DIR": data},
                                stdout=log, stderr="stdout")
    try:
        info_version = _wait_healthy(ctx, proc, port, version, log_path)
    finally:
        stop_process(proc)
    state = read_json_file(os.path.join(data, ".migrate")) if os.path.exists(os.path.join(data, ".migrate")) \
        else None
    titles = [m.get("title") for m in (state or {}).get("migrations", []) if isinstance(m, dict)]
    return [t for t in titles if isinstance(t, str)], info_version


def _log_tail(path: str, n: int = 20) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 65536))
            return _tail(f.read().decode("utf-8", "replace"), n)
    except OSError:
        return []


def _wait_healthy(ctx: Context, proc: Any, port: int, version: str, log_path: str) -> str:
    import time
    timeout = float(ctx.config.get("health", "timeout"))
    interval = float(ctx.config.get("health", "interval"))
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    started = time.monotonic()
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ProviderError(f"the server exited with status {proc.returncode} during its smoke start",
                                details={"log": _log_tail(log_path)})
        try:
            status, health = http_get_json(port, "/health")
            if status == 200 and isinstance(health, dict) and health.get("status") == "UP":
                _status, info = http_get_json(port, "/info")
                got = ((info or {}).get("build") or {}).get("version") if isinstance(info, dict) else None
                if got == version:
                    return got
                if got is None:
                    ctx.out.warn(f"/info of {version} reports no build version; relying on --version")
                    return version
                last = f"/info reports version {got}"
            else:
                last = f"/health answered {status} {health}"
        except OSError as exc:
            last = f"/health: {exc.strerror or exc}"
        ctx.out.progress(f"[{elapsed(time.monotonic() - started)}] smoke start {version}: waiting ({last})",
                         tick=True)
        time.sleep(interval)
    raise ProviderError(f"the server did not become healthy within {timeout:.0f} s ({last})",
                        details={"log": _log_tail(log_path)})


def _install_checks(ctx: Context, versions: Versions, rt: Runtime | None = None, *,
                    need_npm: bool = True) -> NodeInfo | None:
    """Tools and space; the node facts (None while a managed runtime is still to be fetched)."""
    if need_npm and not ctx.runner.available("npm"):
        raise MissingTool("npm is not installed", hint=INSTALL_HINTS["npm"])
    node = Node(ctx.runner).info() if rt is None else rt.node
    _build_tool_warnings(ctx, node)
    root = ctx.paths.install_root
    check_writable([root] + ([ctx.paths.runtime_root] if rt is not None and not rt.installed else []))
    free = disk_free(root)
    if free < MIN_INSTALL_FREE:
        raise DiskFull(f"only {human_bytes(free)} free under {root}; a server version needs about 512 MiB",
                       hint="free some space, or point [paths] install_root at a larger filesystem")
    if rt is not None and not rt.installed:
        probe = ctx.paths.runtime_root if os.path.isdir(ctx.paths.runtime_root) else root
        if disk_free(probe) < MIN_RUNTIME_FREE:
            raise DiskFull(f"a node runtime needs about 256 MiB under {ctx.paths.runtime_root}",
                           hint="free some space, or point [paths] runtime_root at a larger filesystem")
    return node


def _resolve_version(ctx: Context, npm: Npm, requested: str) -> tuple[str, str | None]:
    """The exact version, confirmed by the registry; NotFound or ProviderError (exit 4)."""
    version = npm.latest() if requested == "latest" else requested
    found = npm.view(f"{npm.package}@{version}", ["version", "engines"])
    if isinstance(found, list):
        found = found[-1] if found else None
    if isinstance(found, str):                # npm prints a bare string when engines is absent
        found = {"version": found}
    if not isinstance(found, dict) or found.get("version") != version:
        raise NotFound(f"{npm.package}@{version} is not in the npm registry",
                       hint="see abssctl version list --remote")
    engines = found.get("engines")
    spec = engines.get("node") if isinstance(engines, dict) else None
    return version, str(spec) if spec else None


def _set_current_steps(ctx: Context, versions: Versions, plan: Plan, version: str) -> None:
    """install/import --set-current: only while no instance follows current (else: version switch)."""
    if versions.current == version and os.path.islink(ctx.paths.current):
        return
    followers = versions.following_current()
    if followers:
        raise UsageError(f"--set-current would move {', '.join(followers)} to {version} without a restart "
                         "or a backup", hint=f"install it, then run abssctl version switch {version}")
    _current_steps(ctx, versions, plan, version)


def _installed_output(ctx: Context, installer: Installer | None, version: str) -> dict[str, Any]:
    """The "version" field of install/import: fresh verification data, or the recorded entry."""
    if installer is not None and installer.result:
        return {"version": installer.output()}
    now = Versions(ctx)
    return {"version": dict(now.doc["versions"].get(version) or {}, current=now.current == version)}


def _installed_outcome(data: dict[str, Any]) -> list[str]:
    v = data.get("version") or {}
    lines = [f"installed server version {v.get('version')} in {v.get('path')}"
             + (", now current" if v.get("current") else "")]
    lines.append("next: abssctl instance create NAME --domain FQDN" if v.get("current")
                 else f"next: abssctl version switch {v.get('version')} (or instance set-version NAME "
                      f"{v.get('version')})")
    return lines


def op_version_install(ctx: Context, requested: str, *, set_current: bool,
                       refresh_runtime: bool = False) -> Result:
    """Install a server version from npm into its own tree, verified and smoke-started (§4.4.3);
    in managed mode with the node runtime its engines ask for (§11.1)."""
    versions = Versions(ctx)
    npm = Npm(ctx.runner, ctx.config)
    version, engines = _resolve_version(ctx, npm, validate_version(requested))
    state = versions.require_not_broken(version)
    installer = None
    if state == "missing":
        rt = plan_runtime(ctx, npm, engines, refresh=refresh_runtime) if managed_runtime(ctx.config) else None
        node = _install_checks(ctx, versions, rt)
        installer = Installer(ctx, versions, version, node, "registry", rt)

    def build() -> Plan:
        plan = Plan(f"install {npm.package} {version}")
        current = Versions(ctx)
        if current.state_of(version) == "missing":
            assert installer is not None
            if installer.rt is not None and not installer.rt.installed:
                add_runtime_fetch_steps(ctx, plan, installer.rt, npm)
            _staging_steps(ctx, plan, installer, npm, version)
            installer.add_verify_steps(plan)
        if set_current:
            _set_current_steps(ctx, current, plan, version)
        return plan

    return run_mutation(ctx, Mutation(title=f"install {version}", build=build,
                                      finish=lambda _p: _installed_output(ctx, installer, version),
                                      outcome=_installed_outcome,
                                      target={"kind": "version", "name": version},
                                      args={"version": requested, "set_current": set_current,
                                            "refresh_runtime": refresh_runtime}))


def _staging_steps(ctx: Context, plan: Plan, installer: Installer, npm: Npm, version: str) -> None:
    import time
    staging = installer.staging
    manifest = {"name": f"abssctl-server-{version}", "private": True,
                "dependencies": {npm.package: version},
                "allowScripts": {name: True for name in ctx.config.get("npm", "allow_scripts")}}
    def make_staging() -> None:
        if os.path.lexists(staging):
            raise Conflict(f"{staging} already exists", hint="another install may be running")
        ensure_dir(staging, 0o755)       # 0755 whatever the umask: the service user reads the tree

    plan.add("staging.mkdir", f"create {staging}", staging, make_staging,
             UndoAction("remove_tree", path=staging))
    plan.add("staging.package_json", "write the staging package.json (with allowScripts)", staging,
             lambda: atomic_write(os.path.join(staging, "package.json"),
                                  (json.dumps(manifest, indent=2) + "\n").encode(), mode=0o644, tag=ctx.op_id))
    started = time.monotonic()
    last = [started]

    def on_idle(line: str) -> None:
        now = time.monotonic()
        if now - last[0] < 5:                     # one line every 5 s is enough for a 3-minute job
            return
        last[0] = now
        doing = line.strip()[:80] if line.strip() and not line.strip().startswith(("npm warn", "}")) \
            else "installing"
        ctx.out.progress(f"[{elapsed(now - started)}] npm install {version}: {doing}")

    def install() -> None:
        rt = installer.rt
        if rt is None:
            npm.install(staging, installer.node_now(), on_idle)
        else:
            Npm(rt.runner(ctx.runner), ctx.config).install(staging, installer.node_now(), on_idle,
                                                           env_extra=runtime_env(rt.dir))
    with_npm = f" with {installer.rt.id}'s npm" if installer.rt is not None else ""
    plan.add("npm.install", f"npm install {npm.package}@{version}{with_npm} (about 1.5 min, plus native builds)",
             staging, install)


# -- list, check-updates, uninstall --------------------------------------------------

def op_version_list(ctx: Context, *, remote: bool, prerelease: bool) -> Result:
    versions = Versions(ctx)
    rows: dict[str, dict[str, Any]] = {}
    for ver, e in versions.doc["versions"].items():
        node = e.get("node") or {}
        rows[ver] = {"version": ver, "installed": True, "current": ver == versions.current,
                     "instances": versions.users_of(ver), "installed_at": e.get("installed_at"),
                     "size_bytes": e.get("size_bytes"), "node_abi": node.get("abi"), "runtime": e.get("runtime"),
                     "engines_node": e.get("engines_node"), "engines_ok": e.get("engines_ok"),
                     "source": e.get("source"), "state": versions.state_of(ver)}
    warnings = []
    if remote:
        try:
            for ver in Npm(ctx.runner, ctx.config).remote_versions():
                if ver not in rows and (prerelease or "-" not in ver):
                    rows[ver] = {"version": ver, "installed": False, "current": False, "instances": []}
        except AbssctlError as exc:
            warnings.append(f"could not read remote versions: {exc.message}; showing installed versions only")
    ordered = [rows[v] for v in sorted(rows, key=semver_key)]
    text = table(("VERSION", "CURRENT", "INSTALLED", "INSTANCES", "SIZE", "NODE", "NODE ABI", "ENGINES"),
                 [(r["version"], "*" if r["current"] else "", (r.get("installed_at") or "yes")
                   if r["installed"] else "no", ",".join(r["instances"]),
                   human_bytes(r["size_bytes"]) if r.get("size_bytes") else "",
                   (r.get("runtime") or "system") if r["installed"] else "", r.get("node_abi"),
                   ("ok" if r.get("engines_ok") else f"needs {r.get('engines_node')}") if r["installed"] else "")
                  for r in ordered]) if ordered else ["no versions installed; try: abssctl version install latest"]
    return Result({"package": versions.package, "current": versions.current, "versions": ordered}, text,
                  warnings=warnings)


def op_version_check_updates(ctx: Context) -> Result:
    versions = Versions(ctx)
    installed = sorted(versions.doc["versions"], key=semver_key)
    newest = installed[-1] if installed else None
    latest = None
    try:
        stable = [v for v in Npm(ctx.runner, ctx.config).remote_versions() if "-" not in v]
        latest = stable[-1] if stable else None
    except AbssctlError as exc:
        ctx.out.warn(f"could not ask the npm registry: {exc.message}")
    if latest is None:
        status, available = "unknown", None
    else:
        available = newest is None or semver_key(latest) > semver_key(newest)
        status = "update-available" if available else "up-to-date"
    text = [f"{versions.package}: current {versions.current or '-'}, newest installed {newest or '-'}, "
            f"latest stable {latest or 'unknown'}: {status}"]
    if available:
        text.append(f"install it with: abssctl version install {latest}")
    return Result({"package": versions.package, "current": versions.current, "newest_installed": newest,
                   "latest_stable": latest, "update_available": available, "status": status}, text)


def op_version_uninstall(ctx: Context, version: str) -> Result:
    versions = Versions(ctx)
    if versions.state_of(version) == "missing":
        raise NotFound(f"version {version} is not installed", hint="see abssctl version list")

    def build() -> Plan:
        now = Versions(ctx)
        if now.current == version:
            raise UsageError(f"{version} is the current version", hint="install another one with "
                             "--set-current first")
        users = now.users_of(version)
        if users:
            raise UsageError(f"{version} is used by instance(s): {', '.join(users)}",
                             hint="move them to another version first")
        plan = Plan(f"uninstall {version}")
        tree = now.tree(version)
        trash = os.path.join(ctx.paths.install_root, f".trash-{version}-{ctx.op_id}")
        reg = now.registry
        entry = now.doc["versions"].get(version)
        if os.path.isdir(tree):
            plan.add("tree.trash", f"move {tree} aside", tree, lambda: os.rename(tree, trash),
                     UndoAction("rename", src=trash, dst=tree))
        if entry is not None:
            def drop() -> None:
                with reg.edit(ctx.op_id) as doc:
                    doc["versions"].pop(version, None)
            plan.add("registry.remove", f"remove {version} from {reg.path}", reg.path, drop,
                     UndoAction("registry_put", name=version, entry=entry, **_registry_args(reg)))
        rt_trash = _runtime_unused_steps(ctx, now, plan, version, entry)
        plan.add("tree.delete", f"delete {trash} (no undo past this point)", trash,
                 lambda: remove_tree(trash) if os.path.lexists(trash) else None)
        if rt_trash:
            plan.add("runtime.delete", f"delete {rt_trash} (no undo past this point)", rt_trash,
                     lambda: remove_tree(rt_trash) if os.path.lexists(rt_trash) else None)
        return plan

    return run_mutation(ctx, Mutation(
        title=f"uninstall {version}", build=build, global_mode="exclusive",
        target={"kind": "version", "name": version}, args={"version": version},
        confirm=lambda _p: confirm(ctx, f"Uninstall server version {version} "
                                        f"({versions.tree(version)})?\nIt can be installed again later."),
        outcome=lambda _x: [f"uninstalled server version {version}; abssctl version install {version} "
                            "brings it back"]))


def _runtime_unused_steps(ctx: Context, versions: Versions, plan: Plan, version: str,
                          entry: Mapping[str, Any] | None) -> str | None:
    """Uninstall's steps for a runtime no other version uses: move it aside, forget it; its trash path."""
    rid = (entry or {}).get("runtime")
    if not rid or any(e.get("runtime") == rid for v, e in versions.doc["versions"].items() if v != version):
        return None
    reg = ctx.registry("runtimes")
    rt_dir = os.path.join(ctx.paths.runtime_root, str(rid))
    trash = os.path.join(ctx.paths.runtime_root, f".trash-{rid}-{ctx.op_id}")
    if os.path.isdir(rt_dir):
        plan.add("runtime.trash", f"move the runtime {rt_dir} aside (no version uses it any more)", rt_dir,
                 lambda: os.rename(rt_dir, trash), UndoAction("rename", src=trash, dst=rt_dir))
    recorded = reg.load()["runtimes"].get(str(rid))
    if recorded is not None:
        def drop() -> None:
            with reg.edit(ctx.op_id) as doc:
                doc["runtimes"].pop(str(rid), None)
        plan.add("runtime.unrecord", f"remove {rid} from {reg.path}", reg.path, drop,
                 UndoAction("registry_put", name=str(rid), entry=recorded, **_registry_args(reg)))
    return trash


# -- export / import -------------------------------------------------------------------

def _bundle_files(tree: str) -> tuple[list[tuple[str, str, int]], list[str], list[tuple[str, str]]]:
    """(files as (rel, sha256, size), dirs, symlinks as (rel, target)) of a version tree, sorted."""
    files, dirs, links = [], [], []
    for root, dnames, fnames in os.walk(tree):
        dnames.sort()
        rel_root = os.path.relpath(root, tree)
        for d in dnames:
            rel = os.path.normpath(os.path.join(rel_root, d))
            if os.path.islink(os.path.join(root, d)):
                links.append((rel, os.readlink(os.path.join(root, d))))
            else:
                dirs.append(rel)
        for name in sorted(fnames):
            path = os.path.join(root, name)
            rel = os.path.normpath(os.path.join(rel_root, name))
            if os.path.islink(path):
                links.append((rel, os.readlink(path)))
            elif os.path.isfile(path):
                files.append((rel, sha256_file(path), os.path.getsize(path)))
    return sorted(files), dirs, links


def _tar_bytes(tar: Any, name: str, data: bytes, mtime: int) -> None:
    import io
    import tarfile
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), mtime, 0o644
    tar.addfile(info, io.BytesIO(data))


Listing = tuple[list[tuple[str, str, int]], list[str], list[tuple[str, str]]]


def _write_bundle_tar(tar: Any, parts: Sequence[tuple[str, str, Listing]], manifest: bytes, sums: bytes,
                      mtime: int) -> None:
    """The header members, then each (member prefix, directory, listing) part: runtime/, tree/."""
    import tarfile
    _tar_bytes(tar, "abssctl-bundle.json", manifest, mtime)
    _tar_bytes(tar, "SHA256SUMS", sums, mtime)
    for prefix, tree, (files, dirs, links) in parts:
        for rel in dirs:
            info = tarfile.TarInfo(f"{prefix}{rel}")
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, mtime
            tar.addfile(info)
        for rel, _sha, size in files:
            path = os.path.join(tree, rel)
            info = tarfile.TarInfo(f"{prefix}{rel}")
            info.size, info.mtime = size, mtime
            info.mode = 0o755 if os.stat(path).st_mode & 0o100 else 0o644
            with open(path, "rb") as f:
                tar.addfile(info, f)
        for rel, target in links:
            info = tarfile.TarInfo(f"{prefix}{rel}")
            info.type, info.linkname, info.mtime, info.mode = tarfile.SYMTYPE, target, mtime, 0o777
            tar.addfile(info)


def write_tar_stream(ctx: Context, fd: int, compression: str, writer: Callable[[Any], None]) -> tuple[str, int]:
    """Feed a TarWriter to ``writer``; its bytes reach ``fd`` (opened read-write) through zstd, gzip or
    nothing. Returns the sha256 and size of what was written. zstd writes ``fd`` itself while a
    thread hashes behind it, so the compressed stream never passes through this process."""
    if compression != "zstd":
        sink = HashingWriter(fd)
        if compression == "gzip":
            import gzip
            with gzip.GzipFile(fileobj=sink, mode="wb", compresslevel=6, mtime=0) as gz:
                tar = TarWriter(gz.write)
                writer(tar)
                tar.close()
        else:
            tar = TarWriter(sink.write)
            writer(tar)
            tar.close()
        return sink.sha.hexdigest(), sink.size
    proc = ctx.runner.popen("zstd", ["-q", "-T0", "-c", "--no-sparse"], stdin="pipe", stdout=fd)
    into = proc.stdin.fileno()
    widen_pipe(into)
    follower = FileFollower(fd, proc)
    try:
        tar = TarWriter(lambda data: write_all(into, data))
        writer(tar)
        tar.close()
        proc.stdin.close()
        rc = proc.wait(timeout=600)
    except BrokenPipeError:
        rc = proc.wait(timeout=60)
        raise ProviderError(f"zstd exited {rc} while compressing") from None
    finally:
        stop_process(proc)
        follower.join()
    if rc != 0:
        raise ProviderError(f"zstd exited {rc} while compressing")
    return follower.result()


class FileFollower:
    """Hashes a file on a thread while a child process appends to it, until the child has exited and
    the end is reached. It also starts the writeback of what it has hashed (POSIX_FADV_DONTNEED), so
    the caller's final fsync has little left to wait for, and the archive does not crowd the cache."""

    def __init__(self, fd: int, proc: Any) -> None:
        import hashlib
        import threading
        self.fd = fd
        self.proc = proc
        self.sha = hashlib.sha256()
        self.size = 0
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        import time
        view = memoryview(bytearray(CHUNK))
        flushed = 0
        try:
            while True:
                exited = self.proc.poll() is not None     # read first, so a last append is not missed
                n = os.preadv(self.fd, [view], self.size)
                if n:
                    self.sha.update(view[:n])
                    self.size += n
                    if self.size - flushed >= 32 * CHUNK:
                        os.posix_fadvise(self.fd, flushed, self.size - flushed, os.POSIX_FADV_DONTNEED)
                        flushed = self.size
                elif exited:
                    return
                else:
                    time.sleep(0.02)
        except BaseException as exc:  # noqa: BLE001 - re-raised by result()
            self.error = exc

    def join(self) -> None:
        self.thread.join(timeout=600)

    def result(self) -> tuple[str, int]:
        if self.error is not None:
            raise self.error
        if self.thread.is_alive():
            raise ProviderError("hashing the archive did not finish")
        return self.sha.hexdigest(), self.size


def open_tar_stream(ctx: Context, path: str) -> tuple[Any, Callable[[], None]]:
    """A forward-only TarFile for a .tar, .tar.gz or .tar.zst file (by magic), and its closer."""
    with open(path, "rb") as f:
        magic = f.read(4)
    src = open(path, "rb")
    proc = None
    try:
        if magic == ZSTD_MAGIC:
            proc = ctx.runner.popen("zstd", ["-d", "-q", "-c"], stdin=src, stdout="pipe")
            widen_pipe(proc.stdout.fileno())
            tar = open_tar_reader(fd_reader(proc.stdout.fileno()))
        elif magic[:2] == GZIP_MAGIC:
            import gzip
            tar = open_tar_reader(gzip.GzipFile(fileobj=src, mode="rb").readinto)
        else:
            tar = open_tar_reader(src.readinto)
    except (OSError, *archive_errors()) as exc:
        src.close()
        if proc is not None:
            stop_process(proc, grace=2)
        raise CorruptState(f"{path} is not a readable archive ({exc})") from None

    def close() -> None:
        src.close()
        if proc is not None:
            stop_process(proc, grace=2)
    return tar, close


def _export_runtime_entry(ctx: Context, version: str, entry: Mapping[str, Any]) -> dict[str, Any] | None:
    """The runtimes.json entry of the runtime a version runs on (None: system node); HostError when
    that runtime is gone, since a bundle without it would not run on an air-gapped host."""
    rt_dir = runtime_of(ctx, entry)
    if rt_dir is None:
        return None
    rid = str(entry["runtime"])
    recorded = ctx.registry("runtimes").load()["runtimes"].get(rid)
    if not isinstance(recorded, dict) or not os.path.isfile(os.path.join(rt_dir, "bin", "node")):
        raise HostError(f"{version} runs on {rid}, but {rt_dir} is missing or not recorded in runtimes.json",
                        hint=f"abssctl version uninstall {version}, then abssctl version install {version} "
                             "(it fetches the runtime again), then export")
    return recorded


def _bundle_runtime_field(rid: str, rec: Mapping[str, Any] | None, listing: Listing) -> dict[str, Any]:
    """The manifest's ``runtime``: which node and npm the bundle carries under runtime/ (§11.1)."""
    rec = rec or {}
    return {"id": rid, "version": rec.get("version"), "abi": rec.get("abi"), "arch": rec.get("arch"),
            "glibc": rec.get("glibc"), "package": (rec.get("node") or {}).get("package"),
            "npm_version": (rec.get("npm") or {}).get("version"),
            "node_integrity": (rec.get("node") or {}).get("integrity"),
            "npm_integrity": (rec.get("npm") or {}).get("integrity"),
            "files": {"count": len(listing[0]), "bytes": sum(n for _r, _s, n in listing[0])}}


def op_version_export(ctx: Context, version: str, output: str) -> Result:
    """Write an air-gap bundle of an installed version: manifest, SHA256SUMS, then the tree."""
    versions = Versions(ctx)
    if versions.require_not_broken(version) == "missing":
        raise NotFound(f"version {version} is not installed", hint="see abssctl version list")
    entry = versions.doc["versions"][version]
    dest = os.path.abspath(output)
    if os.path.isdir(dest) or not os.path.isdir(os.path.dirname(dest)):
        raise UsageError(f"cannot write the bundle to {output}: give a file path in an existing directory")
    compression = "zstd" if ctx.runner.available("zstd") else "gzip"
    tree = versions.tree(version)
    rt_dir = runtime_of(ctx, entry)
    rt_entry = _export_runtime_entry(ctx, version, entry)
    result: dict[str, Any] = {}

    def write() -> None:
        ctx.out.progress(f"hashing {tree}")
        listing = _bundle_files(tree)
        parts: list[tuple[str, str, Listing]] = []
        lines = [(rel, sha) for rel, sha, _n in listing[0]]
        runtime = None
        if rt_dir is not None:
            ctx.out.progress(f"hashing {rt_dir}")
            rt_listing = _bundle_files(rt_dir)
            parts.append(("runtime/", rt_dir, rt_listing))
            lines += [(f"runtime/{rel}", sha) for rel, sha, _n in rt_listing[0]]
            runtime = _bundle_runtime_field(str(entry["runtime"]), rt_entry, rt_listing)
        parts.append(("tree/", tree, listing))
        sums = "".join(f"{sha}  {rel}\n" for rel, sha in sorted(lines)).encode()
        node = entry.get("node") or {}
        libc = str(node.get("libc") or "")
        import hashlib
        now = utc_now()
        manifest = {"schema_version": BUNDLE_SCHEMA if runtime is None else BUNDLE_SCHEMA_RUNTIME,
                    "kind": BUNDLE_KIND, "package": versions.package, "runtime": runtime,
                    "version": version, "created_at": rfc3339(now), "abssctl_version": __version__,
                    "node": {"version": node.get("version"), "abi": node.get("abi"), "arch": node.get("arch"),
                             "platform": "linux"},
                    "libc": {"family": libc.split()[0] if libc else None,
                             "version": libc.split()[-1] if libc else None},
                    "bin": entry.get("bin"), "integrity": entry.get("integrity"),
                    "engines_node": entry.get("engines_node"), "native_modules": entry.get("native_modules"),
                    "migrations": entry.get("migrations"),
                    "files": {"count": len(listing[0]), "bytes": sum(n for _r, _s, n in listing[0])},
                    "sums_sha256": hashlib.sha256(sums).hexdigest()}
        data = (json.dumps(manifest, sort_keys=True, indent=2) + "\n").encode()
        tmp = os.path.join(os.path.dirname(dest), f".abssctl-tmp-{ctx.op_id}-{os.path.basename(dest)}")
        ctx.out.progress(f"writing {dest} ({compression})")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        try:
            digest, _size = write_tar_stream(ctx, fd, compression,
                                             lambda tar: _write_bundle_tar(tar, parts, data, sums, int(now)))
            os.fchmod(fd, 0o644)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, dest)
        write_sidecar(dest + ".sha256", dest, digest, 0o644, ctx.op_id)
        result.update({"path": dest, "sha256": digest, "size_bytes": os.path.getsize(dest),
                       "version": version, "compression": compression})

    def build() -> Plan:
        plan = Plan(f"export {version}")
        tmp = os.path.join(os.path.dirname(dest), f".abssctl-tmp-{ctx.op_id}-{os.path.basename(dest)}")
        plan.add("bundle.write", f"write {dest} and {dest}.sha256", dest, write,
                 UndoAction("remove_path", path=tmp))
        return plan

    res = run_mutation(ctx, Mutation(title=f"export {version}", build=build,
                                     target={"kind": "version", "name": version},
                                     args={"version": version, "output": dest},
                                     finish=lambda _p: {"bundle": result}))
    if result:
        res.text = [f"wrote {result['path']} ({human_bytes(result['size_bytes'])})",
                    f"{result['sha256']}  {os.path.basename(result['path'])}"]
    return res


def read_bundle_header(ctx: Context, path: str) -> tuple[dict[str, Any], dict[str, str]]:
    """The bundle manifest and its SHA256SUMS (rel -> sha256), from the first two members."""
    import hashlib
    tar, close = open_tar_stream(ctx, path)
    try:
        members: list[tuple[str, bytes]] = []
        for member in tar:
            if not member.isreg() or member.size > 64 << 20:
                break
            members.append((member.name, tar.extractfile(member).read()))
            if len(members) == 2:
                break
    except Exception as exc:  # noqa: BLE001 - any read error means the same thing here
        raise CorruptState(f"{path} is not a readable abssctl bundle ({exc})") from None
    finally:
        close()
    if [n for n, _d in members] != ["abssctl-bundle.json", "SHA256SUMS"]:
        raise CorruptState(f"{path} is not an abssctl version bundle (its first members are "
                           f"{[n for n, _d in members]})", hint="create bundles with abssctl version export")
    try:
        manifest = json.loads(members[0][1])
    except ValueError:
        raise CorruptState(f"{path}: abssctl-bundle.json is not valid JSON") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != BUNDLE_KIND or \
            manifest.get("schema_version") not in (BUNDLE_SCHEMA, BUNDLE_SCHEMA_RUNTIME):
        raise CorruptState(f"{path} is not an abssctl version bundle of schema {BUNDLE_SCHEMA} or "
                           f"{BUNDLE_SCHEMA_RUNTIME}", hint="create bundles with abssctl version export "
                           "(a newer abssctl may have written this one)")
    if manifest.get("runtime") is not None and (manifest.get("schema_version") != BUNDLE_SCHEMA_RUNTIME
                                                or not isinstance(manifest["runtime"], dict)):
        raise CorruptState(f"{path}: abssctl-bundle.json has a malformed runtime field")
    sums_raw = members[1][1]
    if hashlib.sha256(sums_raw).hexdigest() != manifest.get("sums_sha256"):
        raise ChecksumMismatch(f"{path}: SHA256SUMS does not match the manifest's sums_sha256",
                               hint="the bundle was modified or damaged; export it again")
    sums: dict[str, str] = {}
    for line in sums_raw.decode("utf-8", "replace").splitlines():
        digest, _sep, rel = line.partition("  ")
        if not re.match(r"^[0-9a-f]{64}\Z", digest) or not rel:
            raise CorruptState(f"{path}: SHA256SUMS has a malformed line")
        sums[rel] = digest
    return manifest, sums


def check_bundle_fits(manifest: Mapping[str, Any], node: NodeInfo, package: str) -> None:
    """Node ABI, arch, platform and glibc of a bundle against this host; Incompatible (exit 3)."""
    version = manifest.get("version")
    want = manifest.get("node") or {}
    libc = manifest.get("libc") or {}
    if manifest.get("package") != package:
        raise Incompatible(f"the bundle holds {manifest.get('package')}, not {package}")
    if want.get("platform") not in (None, "linux"):
        raise Incompatible(f"bundle {version} was built for {want.get('platform')}, not linux")
    if str(want.get("abi")) != node.abi:
        raise Incompatible(f"bundle {version} was built for node ABI {want.get('abi')} (node {want.get('version')}); "
                           f"this host runs node {node.version} (ABI {node.abi})",
                           hint=f"build the bundle on a host with ABI {node.abi}, or install that node here "
                                "and point [commands] node at it")
    if want.get("arch") != node.arch:
        raise Incompatible(f"bundle {version} was built for {want.get('arch')}; this host is {node.arch}",
                           hint=f"export the bundle on a {node.arch} host")
    host = node.glibc
    if libc.get("family") not in (None, "glibc") or (host and libc.get("version") and
                                                     _version_tuple(host) < _version_tuple(str(libc["version"]))):
        raise Incompatible(f"bundle {version} needs {libc.get('family')} {libc.get('version')}; this host has "
                           f"glibc {host}", hint="export the bundle on a host with the same or an older glibc")


def _installed_runtime(ctx: Context, version: str, arch: str, package: str) -> Runtime:
    """An installed runtime, ready to run (its npm version from runtimes.json)."""
    rt = Runtime(ctx.paths.runtime_root, version, arch, package, installed=True)
    rt.npm_version = (ctx.registry("runtimes").load()["runtimes"][rt.id].get("npm") or {}).get("version")
    rt.node = Node(rt.runner(ctx.runner)).info()
    return rt


def _bundle_runtime(ctx: Context, manifest: Mapping[str, Any], digest: str) -> Runtime:
    """Managed mode: the runtime a bundle's version will run on (§11.1). The one the bundle carries,
    reused when it is installed already with the same ABI, else to be unpacked from the bundle; a
    bundle without one runs on an installed runtime of its node ABI."""
    want = manifest.get("node") or {}
    carried = manifest.get("runtime")
    arch = runtime_arch()
    package = runtime_package(ctx.config, arch)
    installed = installed_runtimes(ctx)
    if isinstance(carried, dict):
        rid, version, abi = str(carried.get("id")), str(carried.get("version")), str(carried.get("abi"))
        if not SEMVER_RE.match(version) or rid != f"node-{version}" or abi != str(want.get("abi")):
            raise CorruptState(f"the bundle's runtime field ({rid}, {version}, ABI {abi}) does not agree "
                               f"with its node (ABI {want.get('abi')})", hint="export the bundle again")
        if carried.get("arch") != arch:
            raise Incompatible(f"bundle {manifest.get('version')} carries node {version} for "
                               f"{carried.get('arch')}; this host is {arch}", hint=f"export the bundle on a {arch} host")
        have = installed.get(rid)
        if have is not None:
            if str(have.get("abi")) != abi:
                raise Incompatible(f"the installed {rid} reports ABI {have.get('abi')}; the bundle's {rid} has "
                                   f"ABI {abi}", hint=f"uninstall the versions that use {rid}, then import again")
            ctx.out.progress(f"using the installed runtime {rid}")
            return _installed_runtime(ctx, version, arch, package)
        rt = Runtime(ctx.paths.runtime_root, version, arch, str(carried.get("package") or package),
                     npm_version=str(carried.get("npm_version") or "") or None)
        if os.path.lexists(rt.dir):
            raise HostError(f"{rt.dir} exists but is not recorded in runtimes.json",
                            hint=f"move {rt.dir} aside, then run the import again")
        rt.expect_abi = abi
        rt.record.update(node={"package": rt.package, "integrity": carried.get("node_integrity")},
                         npm={"version": rt.npm_version, "integrity": carried.get("npm_integrity")},
                         source=f"bundle:{digest}")
        ctx.out.progress(f"the bundle carries {rid} (npm {rt.npm_version}); it is installed from the bundle")
        return rt
    fits = sorted((e.get("version") for e in installed.values()
                   if str(e.get("abi")) == str(want.get("abi")) and e.get("arch") == arch
                   and isinstance(e.get("version"), str)), key=semver_key)
    if not fits:
        raise Incompatible(f"bundle {manifest.get('version')} was built for node ABI {want.get('abi')} (node "
                           f"{want.get('version')}); no installed runtime has that ABI",
                           hint="install a version that uses such a node first (abssctl version install), "
                                "export the bundle again with a managed runtime (it then carries it), "
                                'or set [node] runtime = "system" with a matching [commands] node')
    return _installed_runtime(ctx, str(fits[-1]), arch, package)


def _planned_node(rt: Runtime) -> NodeInfo:
    """The node facts a runtime still to be unpacked will have (checked again once it runs)."""
    return NodeInfo({"version": f"v{rt.version}", "modules": rt.expect_abi, "arch": rt.arch,
                     "platform": "linux"}, os.path.join(rt.dir, "bin", "node"))


def _runtime_members(tar: Any) -> Iterator[Any]:
    """A bundle's runtime/ members: after the two header members, up to the first tree/ member."""
    for i, member in enumerate(tar):
        if i < len(BUNDLE_HEADERS):
            continue
        if member.name.startswith("tree/"):
            return
        yield member


def op_version_import(ctx: Context, path: str, *, expect_version: str | None = None,
                      set_current: bool = False) -> Result:
    """Install a version from an export bundle, checked against this host; no registry is contacted."""
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise UsageError(f"bundle {path} does not exist or is not a file")
    ctx.out.progress(f"checking {path}")
    digest = sha256_file(path)
    sidecar = path + ".sha256"
    recorded = read_sidecar(sidecar)
    if recorded is not None and recorded != digest:
        raise ChecksumMismatch(f"{path} does not match {sidecar}",
                               hint="the bundle was modified or damaged in transit; copy it again")
    manifest, sums = read_bundle_header(ctx, path)
    version = validate_version(str(manifest.get("version")), allow_latest=False)
    if expect_version and version != expect_version:
        raise UsageError(f"bundle {path} holds {version}, not {expect_version}")
    carried = manifest.get("runtime")
    rt_sums = {k[len("runtime/"):]: v for k, v in sums.items() if carried and k.startswith("runtime/")}
    tree_sums = {k: v for k, v in sums.items() if not (carried and k.startswith("runtime/"))}
    versions = Versions(ctx)
    state = versions.require_not_broken(version)
    rt = None
    if state == "missing":
        rt = _bundle_runtime(ctx, manifest, digest) if managed_runtime(ctx.config) else None
        node = _install_checks(ctx, versions, rt, need_npm=rt is None)
        fits = node if node is not None else _planned_node(rt) if rt is not None else None
        assert fits is not None
        check_bundle_fits(manifest, fits, versions.package)
    else:
        node = Node(runner_for(ctx, versions.doc["versions"].get(version))).info()
        check_bundle_fits(manifest, node, versions.package)
    installer = Installer(ctx, versions, version, node, f"bundle:{digest}", rt)
    total = int((manifest.get("files") or {}).get("bytes") or 0)
    rt_total = int(((carried or {}).get("files") or {}).get("bytes") or 0) if isinstance(carried, dict) else 0
    rt_staging = _runtime_staging(ctx, rt) if rt is not None else ""

    def extract_runtime() -> None:
        assert rt is not None
        _new_staging(rt_staging)
        if rt_total * 1.1 > disk_free(rt_staging):
            raise DiskFull(f"{rt.id} needs {human_bytes(rt_total)}; {rt.root} has less free",
                           hint="free some space, or point [paths] runtime_root at a larger filesystem")
        ctx.out.progress(f"extracting {rt.id} ({human_bytes(rt_total)})")
        tar, close = open_tar_stream(ctx, path)
        try:
            safe_extract(_runtime_members(tar), rt_staging, prefix="runtime/", expected=rt_sums,
                         max_bytes=min(rt_total, RUNTIME_MAX_BYTES), allow_symlinks=True, source=tar)
        except archive_errors() as exc:
            raise CorruptState(f"{path} is damaged or truncated ({exc})",
                               hint="copy the bundle again, or export it again") from None
        finally:
            close()

    def extract() -> None:
        if os.path.lexists(installer.staging):
            raise Conflict(f"{installer.staging} already exists", hint="another import may be running")
        ensure_dir(installer.staging, 0o755)
        if total * 1.1 > disk_free(installer.staging):
            raise DiskFull(f"the bundle needs {human_bytes(total)}; {ctx.paths.install_root} has less free")
        ctx.out.progress(f"extracting {version} ({human_bytes(total)})")
        tar, close = open_tar_stream(ctx, path)
        try:
            members = (m for m in tar if not (carried and m.name.startswith("runtime/")))
            safe_extract(members, installer.staging, prefix="tree/", expected=tree_sums, max_bytes=total,
                         allow_symlinks=True, skip=BUNDLE_HEADERS, source=tar)
        except archive_errors() as exc:
            raise CorruptState(f"{path} is damaged or truncated ({exc})",
                               hint="copy the bundle again, or export it again") from None
        finally:
            close()

    def build() -> Plan:
        plan = Plan(f"import {version}")
        if Versions(ctx).state_of(version) == "missing":
            if rt is not None and not rt.installed:
                plan.add("runtime.extract", f"extract and check {rt.id} from {path}", rt_staging,
                         extract_runtime, UndoAction("remove_tree", path=rt_staging))
                add_runtime_place_steps(ctx, plan, rt, rt_staging)
            plan.add("bundle.extract", f"extract and check {path}", installer.staging, extract,
                     UndoAction("remove_tree", path=installer.staging))
            installer.add_verify_steps(plan)
        if set_current:
            _set_current_steps(ctx, Versions(ctx), plan, version)
        return plan

    return run_mutation(ctx, Mutation(title=f"import {version}", build=build,
                                      finish=lambda _p: _installed_output(ctx, installer, version),
                                      outcome=_installed_outcome,
                                      target={"kind": "version", "name": version},
                                      args={"bundle": path, "set_current": set_current}))


# ============================================================================
# 8d. Operations: instances, TLS and quickstart
# ============================================================================

GATE_PROPS = ("ActiveState", "SubState", "MainPID", "ExecMainStatus", "NRestarts")
SERVER_UPLOAD = {"fileSizeSyncLimitMB": 20, "syncEncryptedFileSizeLimitMB": 50, "fileSizeLimitMB": 20}
TRUSTED_PROXIES = ["127.0.0.0/8", "::1/128"]


def health_gate(ctx: Context, name: str, port: int, expected: str) -> dict[str, Any]:
    """Poll the unit, /health and /info until two good polls in a row, or raise HealthGateFailed."""
    import time
    unit = unit_name(name)
    sd = Systemd(ctx.runner)
    timeout = float(ctx.config.get("health", "timeout"))
    interval = float(ctx.config.get("health", "interval"))
    started = time.monotonic()
    good, last = 0, {"health": None, "info_version": None}
    state: dict[str, str] = {}
    while time.monotonic() - started < timeout:
        state = sd.show([unit], GATE_PROPS)[unit]
        if state.get("ActiveState") in ("failed", "inactive"):
            _gate_failed(ctx, name, f"{unit} is {state.get('ActiveState')} (the server exited)", state, last)
        last = _probe_app(port)
        good = good + 1 if last["health"] == "UP" and last["info_version"] == expected else 0
        if good >= 2:
            return {"health": "UP", "info_version": last["info_version"],
                    "seconds": round(time.monotonic() - started, 1)}
        ctx.out.progress(f"[{elapsed(time.monotonic() - started)}] health gate {name}: "
                         f"health={last['health']} version={last['info_version']}", tick=True)
        time.sleep(interval)
    _gate_failed(ctx, name, f"{name} did not become healthy on {expected} within {timeout:.0f} s", state, last)


def start_and_gate(ctx: Context, name: str, port: int, version: str, verb: str = "start") -> dict[str, Any]:
    """systemctl start (or restart), then the gate; a unit that dies at once fails the gate too."""
    try:
        ctx.runner.run("systemctl", ["--no-pager", verb, unit_name(name)], mutating=True)
    except ProviderError as exc:
        state = Systemd(ctx.runner).show([unit_name(name)], GATE_PROPS)[unit_name(name)]
        _gate_failed(ctx, name, f"systemctl {verb} failed ({exc.message})", state, {})
    return health_gate(ctx, name, port, version)


def _probe_app(port: int) -> dict[str, Any]:
    result: dict[str, Any] = {"health": None, "info_version": None}
    try:
        status, health = http_get_json(port, "/health")
        result["health"] = health.get("status") if isinstance(health, dict) else f"HTTP {status}"
        _status, info = http_get_json(port, "/info")
        if isinstance(info, dict):
            result["info_version"] = (info.get("build") or {}).get("version")
    except OSError as exc:
        result["health"] = f"down ({exc.strerror or exc})"
    return result


def _gate_failed(ctx: Context, name: str, why: str, state: Mapping[str, str], last: Mapping[str, Any]) -> NoReturn:
    done = ctx.runner.run("journalctl", ["-u", unit_name(name), "-n", "50", "--no-pager", "-o", "short-iso"],
                          mutating=False, check=False) if ctx.runner.available("journalctl") else None
    lines = [redact_line(line) for line in _tail(done.stdout if done else "", 50)]
    raise HealthGateFailed(f"health gate failed for {name}: {why}",
                           hint=f"see abssctl instance logs {name}", details={
                               "unit": dict(state), "last": dict(last), "journal": lines})


def redact_line(line: str) -> str:
    """Mask values that follow secret-looking words in a log line."""
    return re.sub(r"(?i)(password|secret|token)(\W+)\S+", r"\1\2<redacted>", line)


def port_in_use(host: str, port: int) -> bool:
    """Something accepts connections on the port, or it cannot be bound."""
    import errno
    import socket
    if port_listening(host, port, timeout=0.3):
        return True
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as node binds: TIME-WAIT is free
        try:
            sock.bind((host, port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


def ipv6_available() -> bool:
    import socket
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


def systemd_hint(ctx: Context) -> None:
    """A host without systemd as PID 1 needs a replacement service manager: say so plainly."""
    if ctx.config.command("systemctl") == ["systemctl"] and not os.path.isdir("/run/systemd/system"):
        raise HostError("systemd is not running on this host (no /run/systemd/system), so instance units "
                        "cannot be started", hint="on a container or a machine without systemd, install "
                        "Debian's 'systemctl' package (a systemd-compatible service manager; it replaces "
                        "systemd) or point [commands] systemctl at such a tool")


class Instances:
    """The instances and ports registries plus what derives from them."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.registry = ctx.registry("instances")
        self.ports_registry = ctx.registry("ports")
        self.doc = self.registry.load()
        self.ports = self.ports_registry.load()["ports"]

    def get(self, name: str) -> dict[str, Any]:
        entry = self.doc["instances"].get(name)
        if entry is None:
            raise NotFound(f"no instance named {name!r}", hint="see abssctl instance list")
        return entry

    def domain_owner(self, domain: str) -> str | None:
        return next((n for n, e in self.doc["instances"].items() if e.get("domain") == domain), None)

    def free_port(self) -> int:
        cfg = self.ctx.config
        bind = cfg.get("ports", "bind")
        for port in range(cfg.get("ports", "base"), cfg.get("ports", "max") + 1):
            if str(port) not in self.ports and not port_in_use(bind, port):
                return port
        raise HostError(f"no free port in {cfg.get('ports', 'base')}-{cfg.get('ports', 'max')}",
                        hint="raise [ports] max, or delete an instance")

    def check_port(self, port: int, name: str) -> int:
        cfg = self.ctx.config
        port = validate_port(port, cfg.get("ports", "base"), cfg.get("ports", "max"))
        owner = (self.ports.get(str(port)) or {}).get("instance")
        if owner and owner != name:
            raise Conflict(f"port {port} is reserved by instance {owner!r}", hint="see abssctl ports list")
        if owner != name and port_in_use(cfg.get("ports", "bind"), port):
            raise Conflict(f"port {port} is in use", why=f"{cfg.get('ports', 'bind')}:{port} accepts connections "
                           "and no instance owns it", hint="pass another --port, or see abssctl ports list")
        return port


def instance_paths(ctx: Context, name: str) -> dict[str, str]:
    root = ctx.paths.instance_dir(name)
    return {"root": root, "data": os.path.join(root, "data"), "config": os.path.join(root, "config.json"),
            "unit": ctx.paths.unit_file(name), "vhost": ctx.paths.vhost_file(name)}


# --- 8d.0 Instance users: one system user per instance (DESIGN 11.5) ---

def instance_account(ctx: Context, name: str) -> str | None:
    """The user (and group) a new instance NAME gets: [service] user_prefix + NAME, within useradd's 32
    characters; None when the prefix is empty (every instance then runs as the shared [service] user)."""
    prefix = ctx.config.get("service", "user_prefix")
    if not prefix:
        return None
    account = prefix + name
    if len(account) > 32:
        raise UsageError(f"instance name {name!r} would make the system user {account!r}, {len(account)} "
                         "characters; useradd allows at most 32",
                         hint=f"use a name of at most {32 - len(prefix)} characters (the user is "
                              f"[service] user_prefix {prefix!r} plus the name)")
    return account


def run_as(ctx: Context, entry: Mapping[str, Any]) -> tuple[str, str]:
    """The user and group an instance's server runs as: its own, else (an old-style instance) the shared."""
    user = entry.get("user")
    if user:
        return str(user), str(user)
    return ctx.config.get("service", "user"), ctx.config.get("service", "group")


def account_ids(user: str, group: str) -> tuple[int, int]:
    """uid and gid of an existing account; HostError when either is missing."""
    uid, gid = _lookup_ids(user, group)
    if uid is None or gid is None:
        raise HostError(f"the system user {user} (group {group}) does not exist",
                        hint="run abssctl doctor --fix, or abssctl init --allow-create-user for the shared user")
    return uid, gid


def config_ids(ctx: Context, entry: Mapping[str, Any]) -> tuple[int, int]:
    """(uid, gid) for an instance's config.json: its own user's, or (-1: the writer, root) the shared group."""
    if entry.get("user"):
        return account_ids(*run_as(ctx, entry))
    return -1, ctx.service_gid()


def instance_layout(ctx: Context, name: str, own: bool, user: str, group: str) -> list[tuple[str, int, str, str]]:
    """(path, mode, owner, group) of an instance's tree. With its own user: root dir root:U 0750, config
    U:U 0640 (read-only to the server all the same: the unit makes only data/ writable), data U:U 0700."""
    paths = instance_paths(ctx, name)
    if own:
        return [(paths["root"], 0o750, "root", group), (paths["config"], 0o640, user, group),
                (paths["data"], 0o700, user, group)]
    return [(paths["root"], 0o750, "root", group), (paths["config"], 0o640, "root", group),
            (paths["data"], 0o750, user, group)]


def chown_tree(top: str, uid: int, gid: int) -> None:
    """Give ``top`` and everything under it (symlinks themselves, never their targets) to uid:gid."""
    if not os.path.lexists(top):
        return
    os.chown(top, uid, gid, follow_symlinks=False)
    for dirpath, dirs, files in os.walk(top):
        for n in dirs + files:
            os.chown(os.path.join(dirpath, n), uid, gid, follow_symlinks=False)


def apply_layout(ctx: Context, name: str, own: bool, user: str, group: str) -> None:
    """Owners and modes of instance_layout, with data/ given to its user all the way down."""
    import grp
    import pwd
    for path, mode, owner, grp_name in instance_layout(ctx, name, own, user, group):
        if not os.path.lexists(path):
            continue
        uid = 0 if owner == "root" else pwd.getpwnam(owner).pw_uid
        gid = grp.getgrnam(grp_name).gr_gid
        if path.endswith(os.sep + "data"):
            chown_tree(path, uid, gid)
        else:
            os.chown(path, uid, gid, follow_symlinks=False)
        os.chmod(path, mode)


def _undo_layout(ctx: Context, args: Mapping[str, Any]) -> None:
    """Put owners and modes back as they were recorded (the data tree as one owner)."""
    for path, (uid, gid, mode) in args["was"].items():
        if not os.path.lexists(path):
            continue
        if path.endswith(os.sep + "data"):
            chown_tree(path, uid, gid)
        else:
            os.chown(path, uid, gid, follow_symlinks=False)
        os.chmod(path, mode)


def layout_snapshot(ctx: Context, name: str) -> dict[str, list[int]]:
    paths = instance_paths(ctx, name)
    was = {}
    for key in ("root", "config", "data"):
        if os.path.lexists(paths[key]):
            st = os.lstat(paths[key])
            was[paths[key]] = [st.st_uid, st.st_gid, st.st_mode & 0o7777]
    return was


def layout_step(ctx: Context, plan: Plan, name: str, own: bool, user: str, group: str, summary: str) -> None:
    plan.add("fs.owner", summary, instance_paths(ctx, name)["root"],
             lambda: apply_layout(ctx, name, own, user, group),
             UndoAction("layout", was=layout_snapshot(ctx, name)))


def _undo_account(ctx: Context, args: Mapping[str, Any]) -> None:
    """Run the account commands that put a user and group back (or take them away)."""
    for tool, argv in args["runs"]:
        ctx.runner.run(tool, argv, mutating=True, check=False)


def account_create_step(ctx: Context, plan: Plan, user: str) -> None:
    """groupadd + useradd --system for an instance's user, when missing; undo removes what it made."""
    uid, gid = _lookup_ids(user, user)
    if uid is not None and gid is not None:
        return

    def do() -> None:
        now_uid, now_gid = _lookup_ids(user, user)
        if now_gid is None:
            ctx.runner.run("groupadd", ["--system", user], mutating=True)
        if now_uid is None:
            ctx.runner.run("useradd", ["--system", "--gid", user, "--no-create-home", "--home-dir", "/nonexistent",
                                       "--shell", "/usr/sbin/nologin", user], mutating=True)
    undo = ([["userdel", [user]]] if uid is None else []) + ([["groupdel", [user]]] if gid is None else [])
    plan.add("accounts.create", f"create system user and group {user} (no login, no home)", user, do,
             UndoAction("account", runs=undo))


def account_remove_step(ctx: Context, plan: Plan, user: str) -> None:
    """userdel + groupdel of an instance's user; undo recreates them with the same ids."""
    uid, gid = _lookup_ids(user, user)
    if uid is None and gid is None:
        return

    def do() -> None:
        now_uid, now_gid = _lookup_ids(user, user)
        if now_uid is not None:
            ctx.runner.run("userdel", [user], mutating=True)
        if _lookup_ids(user, user)[1] is not None:
            ctx.runner.run("groupdel", [user], mutating=True)
    undo = ([["groupadd", ["--system", "--gid", str(gid), user]]] if gid is not None else []) + \
        ([["useradd", ["--system", "--uid", str(uid), "--gid", user, "--no-create-home", "--home-dir",
                       "/nonexistent", "--shell", "/usr/sbin/nologin", user]]] if uid is not None else [])
    plan.add("accounts.remove", f"remove system user and group {user}", user, do, UndoAction("account", runs=undo))


def account_rename_step(ctx: Context, plan: Plan, old: str, new: str) -> None:
    """usermod -l / groupmod -n; ids stay, so every file keeps its owner. Undo renames back."""
    def do() -> None:
        if _lookup_ids(old, old)[0] is not None:
            ctx.runner.run("usermod", ["-l", new, old], mutating=True)
        if _lookup_ids(new, old)[1] is not None:
            ctx.runner.run("groupmod", ["-n", new, old], mutating=True)
    plan.add("accounts.rename", f"rename system user and group {old} to {new}", old, do,
             UndoAction("account", runs=[["usermod", ["-l", old, new]], ["groupmod", ["-n", old, new]]]))


def op_instance_own_user(ctx: Context, name: str) -> Result:
    """Move an old-style instance (the shared user) to its own user: create the user, stop, chown,
    record it, re-render the unit, start behind the gate if it ran. One journal: a kill -9 anywhere
    rolls back on the next command, and doctor --fix then runs it again."""
    want = instance_account(ctx, name)
    gate: dict[str, Any] = {}

    def build() -> Plan:
        plan = Plan(f"move {name} to its own user")
        insts = Instances(ctx)
        entry = insts.get(name)
        if entry.get("user") or not want:
            return plan                       # moved meanwhile: nothing to do
        account_create_step(ctx, plan, want)
        active = _is_active(_unit_state(ctx, name))
        if active:
            _systemctl_step(ctx, plan, "stop", unit_name(name), "start")
        layout_step(ctx, plan, name, True, want, want, f"give {ctx.paths.instance_dir(name)} to {want} "
                    "(data 0700, config 0640)")
        _registry_step(ctx, plan, insts.registry, name, dict(entry, user=want, updated_at=_now()),
                       f"record {want} as {name}'s user")
        version = str(entry["resolved_version"])
        _unit_step(ctx, plan, name, render_unit(ctx, name, int(entry["port"]), version, Versions(ctx),
                                                (want, want)), f"re-render {ctx.paths.unit_file(name)} (User={want})")
        if active:
            _start_and_gate_step(ctx, plan, name, int(entry["port"]), version, gate)
        return plan

    return run_mutation(ctx, Mutation(title=f"own user for {name}", build=build, instances=[name],
                                      global_mode="exclusive", target={"kind": "instance", "name": name},
                                      args={"name": name, "user": want},
                                      confirm=lambda plan: confirm(ctx, f"Move {name} to its own user {want}?\n" +
                                                                   "\n".join(f"  {s.summary}" for s in plan.steps)),
                                      outcome=lambda _x: [f"{name} runs as its own user {want}"]))


# --- 8d.1 Instance files: server config, unit, vhost and TLS sources ---

def server_config(root: str, port: int) -> bytes:
    """The server's config.json (§4.6.1); data lives under the instance, never under the package."""
    data = os.path.join(root, "data")
    doc = {"dataDir": data, "serverFiles": os.path.join(data, "server-files"),
           "userFiles": os.path.join(data, "user-files"), "port": port, "hostname": "127.0.0.1",
           "trustedProxies": TRUSTED_PROXIES, "upload": SERVER_UPLOAD, "loginMethod": "password"}
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()


def _version_entry(ctx: Context, versions: Versions, version: str) -> dict[str, Any]:
    entry = versions.doc["versions"].get(version)
    if entry is None or versions.state_of(version) != "installed":
        raise UsageError(f"version {version} is not installed (or does not verify)",
                         hint=f"run abssctl version install {version}")
    return entry


def resolve_binding(ctx: Context, versions: Versions, binding: str) -> str:
    """The exact version an instance bound to ``current`` or VER runs."""
    if binding == "current":
        if not versions.current:
            raise UsageError("no current version is set", hint="run abssctl version install VER --set-current")
        return versions.current
    validate_version(binding, allow_latest=False)
    return binding


def unit_account(ctx: Context, name: str) -> tuple[str, str]:
    """Who NAME's unit runs as: its registered user, else (not registered yet) the one create gives it."""
    entry = ctx.registry("instances").load()["instances"].get(name)
    if entry is not None:
        return run_as(ctx, entry)
    own = instance_account(ctx, name)
    return (own, own) if own else run_as(ctx, {})


def render_unit(ctx: Context, name: str, port: int, version: str, versions: Versions,
                account: tuple[str, str] | None = None) -> bytes:
    import shutil
    entry = _version_entry(ctx, versions, version)
    pkg = os.path.realpath(versions.package_dir(version))
    node = node_argv_for(ctx, entry)
    exe = node[0] if "/" in node[0] else (shutil.which(node[0]) or node[0])
    paths = instance_paths(ctx, name)
    user, group = account or unit_account(ctx, name)
    network = "" if ctx.config.get("service", "bank_sync") else \
        "# [service] bank_sync = false: loopback only\nIPAddressDeny=any\nIPAddressAllow=localhost\n"
    values = {"NAME": name, "USER": user, "GROUP": group, "NETWORK": network,
              "PACKAGE_DIR": pkg, "PORT": str(port), "DATA_DIR": paths["data"],
              "NODE": " ".join([os.path.abspath(exe), *node[1:]]), "BIN": os.path.join(pkg, entry["bin"]),
              "CONFIG": paths["config"]}
    return render(ctx.paths.templates_dir, "systemd-unit.service", values).encode()


def _proxy_block(port: int, indent: str) -> str:
    lines = [f"proxy_pass http://127.0.0.1:{port};", "proxy_http_version 1.1;",
             "proxy_set_header Host $host;", "proxy_set_header X-Real-IP $remote_addr;",
             "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;",
             "proxy_set_header X-Forwarded-Proto $scheme;", "proxy_set_header X-Forwarded-Host $host;"]
    return "\n".join(indent + line for line in lines)


def render_vhost(ctx: Context, name: str, domain: str, port: int, tls: Mapping[str, Any]) -> bytes:
    cfg = ctx.config
    http, https = cfg.get("nginx", "http_port"), cfg.get("nginx", "https_port")
    six = ipv6_available()
    listen_http = f"    listen {http};" + (f"\n    listen [::]:{http};" if six else "")
    listen_https = f"    listen {https} ssl;" + (f"\n    listen [::]:{https} ssl;" if six else "")
    internal = ""
    if cfg.get("nginx", "block_internal"):
        blocks = []
        for loc in ("/metrics", "/info"):
            blocks.append(f"    location = {loc} {{\n        allow 127.0.0.1;\n        allow ::1;\n"
                          f"        deny all;\n{_proxy_block(port, '        ')}\n    }}\n")
        internal = "\n" + "\n".join(blocks)
    values = {"NAME": name, "DOMAIN": domain, "PORT": str(port), "LISTEN_HTTP": listen_http,
              "LISTEN_HTTPS": listen_https, "HTTPS_PORT_SUFFIX": "" if https == 443 else f":{https}",
              "CERT": tls["cert"], "KEY": tls["key"], "CLIENT_MAX_BODY_SIZE": cfg.get("nginx", "client_max_body_size"),
              "INTERNAL_BLOCK": internal, "ACME_WEBROOT": ctx.paths.acme_webroot}
    return render(ctx.paths.templates_dir, "nginx-vhost.conf", values).encode()


def _tls_paths(ctx: Context, name: str) -> dict[str, str]:
    base = os.path.join(ctx.paths.tls_dir, name)
    return {"dir": base, "cert": os.path.join(base, "fullchain.pem"), "key": os.path.join(base, "privkey.pem")}


def check_system_tls(ctx: Context, domain: str | None = None) -> dict[str, Any]:
    """The system pair, verified; with ``domain``, it must also cover it (exit 2 if not)."""
    cert, key = ctx.config.get("tls", "system_cert"), ctx.config.get("tls", "system_key")
    for path in (cert, key):
        if not os.path.isfile(path):
            raise UsageError(f"the system certificate file {path} does not exist",
                             hint="pass --tls auto or --tls self-signed, or --tls custom --cert F --key F")
    Tls.check_pair(cert, key)
    if domain is not None and ctx.runner.available("openssl"):
        info = Tls(ctx.runner).inspect(cert)
        if not info.covers(domain):
            raise UsageError(f"the system certificate {cert} does not cover {domain} "
                             f"(it names {', '.join(info.san) or 'no DNS names'})",
                             hint="pass --tls auto (self-signed when nothing else covers it), or --tls custom "
                                  "--cert F --key F")
    return {"source": "system", "cert": cert, "key": key, "chain": None}


def letsencrypt_lineage(ctx: Context, domain: str) -> dict[str, str]:
    """certbot's files for ``domain``: <letsencrypt_dir>/live/<domain>/{fullchain,privkey}.pem."""
    live = os.path.join(ctx.paths.letsencrypt_dir, "live", domain)
    return {"dir": live, "cert": os.path.join(live, "fullchain.pem"), "key": os.path.join(live, "privkey.pem")}


def letsencrypt_tls(ctx: Context, domain: str) -> dict[str, Any]:
    """The registry's tls entry for a certbot lineage, served in place from live/."""
    lineage = letsencrypt_lineage(ctx, domain)
    return {"source": "letsencrypt", "cert": lineage["cert"], "key": lineage["key"], "chain": None,
            "lineage": lineage["dir"]}


def _pair_covers(ctx: Context, cert: str, key: str, domain: str) -> bool:
    """Both files exist, the key matches, and the certificate covers ``domain`` (quietly False if not)."""
    if not (os.path.isfile(cert) and os.path.isfile(key)):
        return False
    try:
        Tls.check_pair(cert, key)
        return Tls(ctx.runner).inspect(cert).covers(domain)
    except UsageError as exc:
        ctx.out.debug_line(f"tls auto: {cert} is not usable for {domain}: {exc.message}")
        return False


def choose_auto_tls(ctx: Context, domain: str) -> str:
    """§11.2 ``auto``: a certbot lineage that covers the domain, else the system pair that covers it,
    else self-signed (with a warning). Returns the source to record."""
    if not ctx.runner.available("openssl"):
        raise MissingTool("openssl is not installed (needed to check and make certificates)",
                          hint=INSTALL_HINTS["openssl"])
    lineage = letsencrypt_lineage(ctx, domain)
    if _pair_covers(ctx, lineage["cert"], lineage["key"], domain):
        return "letsencrypt"
    if _pair_covers(ctx, ctx.config.get("tls", "system_cert"), ctx.config.get("tls", "system_key"), domain):
        return "system"
    ctx.out.warn(f"no certificate on this host covers {domain} (none in {lineage['dir']}, and the system "
                 f"certificate {ctx.config.get('tls', 'system_cert')} does not): using a self-signed one, so "
                 "browsers will warn until their devices trust it. For a trusted one from Let's Encrypt (DNS of the "
                 "domain pointing here, port 80 reachable), run: abssctl tls acme NAME; for one you have: abssctl "
                 "tls install NAME --cert F --key F")
    return "self-signed"


def _write_key_and_cert(ctx: Context, tdir: str, key_data: bytes, cert_data: bytes) -> None:
    """privkey.pem created 0600 before any byte is written, fullchain.pem 0644; both by rename."""
    ensure_dir(ctx.paths.tls_dir, 0o700)
    ensure_dir(tdir, 0o700)
    for name, data, mode in (("privkey.pem", key_data, 0o600), ("fullchain.pem", cert_data, 0o644)):
        path = os.path.join(tdir, name)
        if os.path.exists(path):
            with open(path, "rb") as f:
                atomic_write(path + ".prev", f.read(), mode=mode, tag=ctx.op_id)
        atomic_write(path, data, mode=mode, tag=ctx.op_id)


def copy_private_dir(src: str, dst: str) -> None:
    """Copy a flat TLS directory keeping each file's mode and owner (keys stay 0600)."""
    import shutil
    os.mkdir(dst, 0o700)
    os.chmod(dst, os.stat(src).st_mode & 0o7777)
    for name in sorted(os.listdir(src)):
        path = os.path.join(src, name)
        if os.path.isfile(path) and not os.path.islink(path) and not name.startswith("."):
            st = os.stat(path)
            fd = os.open(os.path.join(dst, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                         st.st_mode & 0o600)
            with os.fdopen(fd, "wb") as out, open(path, "rb") as f:
                shutil.copyfileobj(f, out)
                os.fchmod(out.fileno(), st.st_mode & 0o7777)
                os.fsync(out.fileno())


def make_self_signed(ctx: Context, name: str, domain: str, days: int) -> None:
    tp = _tls_paths(ctx, name)
    ensure_dir(ctx.paths.tls_dir, 0o700)
    ensure_dir(tp["dir"], 0o700)
    work = os.path.join(tp["dir"], f".abssctl-tmp-{ctx.op_id}")
    ensure_dir(work, 0o700)
    try:
        key, cert = os.path.join(work, "k.pem"), os.path.join(work, "c.pem")
        Tls(ctx.runner).self_signed(domain, days, key, cert)
        with open(key, "rb") as f:
            key_data = f.read()
        with open(cert, "rb") as f:
            cert_data = f.read()
    finally:
        remove_tree(work)
    _write_key_and_cert(ctx, tp["dir"], key_data, cert_data)


# --- 8d.2 Instance create ---

class CreateRequest:
    """The validated arguments of instance create."""

    __slots__ = ("name", "domain", "port", "binding", "version", "tls", "cert", "key", "chain", "start")

    def __init__(self, name: str, domain: str, port: int, binding: str, version: str, tls: str,
                 cert: str | None, key: str | None, chain: str | None, start: bool) -> None:
        self.name, self.domain, self.port, self.binding, self.version = name, domain, port, binding, version
        self.tls, self.cert, self.key, self.chain, self.start = tls, cert, key, chain, start


def _tls_entry(ctx: Context, req: CreateRequest) -> dict[str, Any]:
    if req.tls == "system":
        return check_system_tls(ctx)
    if req.tls == "letsencrypt":
        return letsencrypt_tls(ctx, req.domain)
    tp = _tls_paths(ctx, req.name)
    return {"source": req.tls, "cert": tp["cert"], "key": tp["key"], "chain": None}


def _validate_create(ctx: Context, name: str, domain: str | None, port: int | None, binding: str,
                     tls: str | None, cert: str | None, key: str | None, chain: str | None,
                     start: bool) -> tuple[CreateRequest, dict[str, Any] | None]:
    """Every check of instance create (§4.5.1); returns the request and an identical existing entry."""
    insts = Instances(ctx)
    suffix = ctx.config.get("nginx", "server_name_suffix")
    if domain is None:
        if not suffix:
            raise UsageError("--domain is required", hint="pass --domain FQDN, or set [nginx] server_name_suffix")
        domain = validate_fqdn(f"{name}.{suffix}")
    existing = insts.doc["instances"].get(name)
    if existing is None:
        instance_account(ctx, name)            # the user name it makes fits useradd (exits 2 otherwise)
    if existing is not None:
        same = existing.get("domain") == domain and (port is None or existing.get("port") == port) and \
            existing.get("version") == binding
        if same:
            return CreateRequest(name, domain, existing["port"], binding, existing.get("resolved_version") or "",
                                 (existing.get("tls") or {}).get("source", "system"), cert, key, chain,
                                 start), existing
        raise AlreadyExists(f"instance {name!r} exists with other settings (domain {existing.get('domain')}, "
                            f"port {existing.get('port')}, version {existing.get('version')})",
                            hint=f"see abssctl instance show {name}")
    leftovers = [p for p in (ctx.paths.instance_dir(name), ctx.paths.unit_file(name), ctx.paths.vhost_file(name))
                 if os.path.lexists(p)]
    if leftovers:
        raise AlreadyExists(f"{leftovers[0]} exists but no instance {name!r} is registered",
                            hint="abssctl init --discover shows what is there (init --rebuild-state "
                                 "re-registers it); or move it aside, then create again")
    owner = insts.domain_owner(domain)
    if owner:
        raise Conflict(f"domain {domain} already belongs to instance {owner!r}",
                       hint="pick another --domain, or see abssctl instance list")
    port = insts.check_port(port, name) if port is not None else insts.free_port()
    versions = Versions(ctx)
    version = resolve_binding(ctx, versions, binding)
    _version_entry(ctx, versions, version)
    tls = tls or ctx.config.get("tls", "default_source")
    if tls == "auto" and not (cert or key):
        tls = choose_auto_tls(ctx, domain)
    if tls == "custom":
        if not (cert and key):
            raise UsageError("--tls custom needs --cert FILE and --key FILE",
                             hint="pass both, or use --tls system or --tls self-signed")
        verify_pair(ctx, cert, key, chain, domain)
    elif cert or key:
        raise UsageError("--cert and --key go with --tls custom", hint="add --tls custom, or drop --cert/--key")
    elif tls == "self-signed" and not ctx.runner.available("openssl"):
        raise MissingTool("openssl is not installed (needed for --tls self-signed)", hint=INSTALL_HINTS["openssl"])
    elif tls == "system":
        check_system_tls(ctx, domain)
    _host_checks(ctx)
    return CreateRequest(name, domain, port, binding, version, tls, cert, key, chain, start), None


def _host_checks(ctx: Context) -> None:
    import pwd
    try:
        pwd.getpwnam(ctx.config.get("service", "user"))
    except KeyError:
        raise HostError(f"the service user {ctx.config.get('service', 'user')} does not exist",
                        hint="run abssctl init --allow-create-user") from None
    for tool in ("nginx", "systemctl"):
        if not ctx.runner.available(tool):
            raise MissingTool(f"{tool} is not installed", hint=INSTALL_HINTS[tool])
    systemd_hint(ctx)
    for path in (ctx.paths.unit_dir, ctx.paths.sites_available, ctx.paths.sites_enabled):
        if not os.path.isdir(path):
            raise HostError(f"{path} does not exist", hint="install nginx and systemd, or fix [paths]")
    try:
        Nginx(ctx.runner).test()
    except ProviderError as exc:
        raise ProviderError("nginx -t fails before any change: " + exc.message,
                            hint="fix the nginx configuration first", details=exc.details) from None


def _nginx_publish_step(ctx: Context, plan: Plan, writes: Mapping[str, bytes], links: Mapping[str, str],
                        removes: Sequence[str], summary: str, target: str, reload: bool = False,
                        repairs: Sequence[str] = ()) -> None:
    """One nginx transaction as a step; its undo restores every touched path and reloads. With
    ``reload``, nginx is tested and reloaded even when no file changes (new certificate bytes)."""
    touched = list(writes) + list(links) + list(removes)
    before = {p: snapshot(p) for p in touched}

    def do() -> None:
        with Nginx(ctx.runner).transaction(ctx.op_id, ctx.paths.lock("nginx.lock")) as tx:
            tx.force = reload
            tx.repairs = list(repairs)
            for path, data in writes.items():
                tx.write(path, data)
            for link, dest in links.items():
                tx.link(link, dest)
            for path in removes:
                tx.remove(path)
    plan.add("nginx.commit", summary, target, do, UndoAction("nginx_restore", files=before))


def _unit_step(ctx: Context, plan: Plan, name: str, data: bytes | None, summary: str) -> None:
    path = ctx.paths.unit_file(name)
    before = snapshot(path)

    def do() -> None:
        if data is None:
            if os.path.lexists(path):
                os.unlink(path)
        else:
            atomic_write(path, data, mode=0o644, tag=ctx.op_id)
        Systemd(ctx.runner).daemon_reload()
    plan.add("unit.write" if data is not None else "unit.remove", summary, path, do,
             UndoAction("unit_remove", path=path, snapshot=before))


def _file_step(ctx: Context, plan: Plan, step_id: str, path: str, data: bytes, mode: int, gid: int,
               summary: str, uid: int = -1) -> None:
    before = snapshot(path)
    plan.add(step_id, summary, path, lambda: atomic_write(path, data, mode=mode, uid=uid, gid=gid, tag=ctx.op_id),
             UndoAction("restore_file", path=path, snapshot=before))


def _registry_step(ctx: Context, plan: Plan, reg: Registry, name: str, entry: dict[str, Any] | None,
                   summary: str) -> None:
    """Set (or, with None, drop) one registry entry; the undo puts the old one back."""
    old = reg.load()[reg.key].get(name)

    def do() -> None:
        with reg.edit(ctx.op_id) as doc:
            if entry is None:
                doc[reg.key].pop(name, None)
            else:
                doc[reg.key][name] = entry
    undo = UndoAction("registry_put", name=name, entry=old, **_registry_args(reg)) if old is not None \
        else UndoAction("registry_remove", name=name, **_registry_args(reg))
    plan.add(f"registry.{reg.key}", summary, reg.path, do, undo)


def _systemctl_step(ctx: Context, plan: Plan, verb: str, unit: str, undo_verb: str | None) -> None:
    plan.add(f"systemctl.{verb}", f"systemctl {verb} {unit}", unit,
             lambda: ctx.runner.run("systemctl", ["--no-pager", verb, unit], mutating=True),
             UndoAction("systemctl", verb=undo_verb, unit=unit) if undo_verb else None)


def _start_and_gate_step(ctx: Context, plan: Plan, name: str, port: int, version: str,
                         gate: dict[str, Any], verb: str = "start") -> None:
    unit = unit_name(name)

    def do() -> None:
        gate.update(start_and_gate(ctx, name, port, version, verb))
    plan.add(f"systemctl.{verb}", f"systemctl {verb} {unit}, then the health gate on {version}", unit, do,
             UndoAction("systemctl", verb="stop", unit=unit))


def _now() -> str:
    return rfc3339(utc_now())


def _instance_entry(ctx: Context, req: CreateRequest, tls: dict[str, Any], state: str) -> dict[str, Any]:
    now = _now()
    return {"name": req.name, "domain": req.domain, "port": req.port, "version": req.binding,
            "resolved_version": req.version, "data_version": None, "enabled": False,
            "pending_restart": False, "state": state, "tls": tls, "paths": instance_paths(ctx, req.name),
            "created_at": now, "updated_at": now, "last_backup_id": None, "last_restore": None,
            **({"user": instance_account(ctx, req.name)} if instance_account(ctx, req.name) else {})}


def op_instance_create(ctx: Context, name: str, *, domain: str | None, port: int | None, version: str,
                       tls: str | None, cert: str | None, key: str | None, chain: str | None,
                       start: bool, acme: Mapping[str, Any] | None = None) -> Result:
    """Reserve, provision, write config, TLS and unit, start behind the gate, then publish the vhost.
    ACME holds tls acme's --email/--staging/--server, which only --tls acme takes."""
    check_acme_flags(ctx, tls, acme)
    if tls == "acme":
        return _create_with_acme(ctx, name, domain=domain, port=port, version=version, start=start,
                                 acme=acme or {})
    req, same = _validate_create(ctx, name, domain, port, version, tls, cert, key, chain, start)
    gate: dict[str, Any] = {}

    auto_port = port is None

    def build() -> Plan:
        plan = Plan(f"create instance {name}")
        insts = Instances(ctx)
        existing = insts.doc["instances"].get(name)
        if existing is not None:             # someone created it while we waited for the lock
            if existing.get("domain") == req.domain and existing.get("version") == version and \
                    (auto_port or existing.get("port") == req.port):
                return plan                   # identical: nothing to do
            raise AlreadyExists(f"instance {name!r} was just created with other settings",
                                hint=f"see abssctl instance show {name}")
        if str(req.port) in insts.ports:      # re-checked under the exclusive lock
            if not auto_port:
                raise Conflict(f"port {req.port} was just reserved by {insts.ports[str(req.port)].get('instance')}",
                               hint="pass another --port, or see abssctl ports list")
            req.port = insts.free_port()
        _create_steps(ctx, plan, req, gate)
        return plan

    def finish(plan: Plan) -> dict[str, Any]:
        entry = Instances(ctx).doc["instances"].get(name) or {}
        return {"instance": _instance_summary(ctx, entry, gate)}

    if same is not None:
        ctx.out.debug_line(f"instance {name} exists with the same settings")
    # Exclusive: two creates choosing "the lowest free port" must not both choose it.
    return run_mutation(ctx, Mutation(title=f"create {name}", build=build, finish=finish, global_mode="exclusive",
                                      instances=[name], target={"kind": "instance", "name": name},
                                      args={"name": name, "domain": req.domain, "port": req.port,
                                            "version": version, "tls": req.tls, "start": start},
                                      outcome=lambda x: _created_outcome(x["instance"])))


def _create_with_acme(ctx: Context, name: str, *, domain: str | None, port: int | None, version: str,
                      start: bool, acme: Mapping[str, Any]) -> Result:
    """instance create --tls acme: create the instance on a self-signed certificate (its port-80
    server must answer the challenge before any certificate exists), then tls acme. A refused
    challenge leaves a working instance on self-signed and exits 4 saying so: the next try is
    `abssctl tls acme NAME`, not a whole new create."""
    acme_options(ctx, acme.get("email"), acme.get("server"))      # with no flags: [tls]'s defaults
    _require_certbot(ctx)
    created = op_instance_create(ctx, name, domain=domain, port=port, version=version, tls="self-signed",
                                 cert=None, key=None, chain=None, start=start)
    if (Instances(ctx).get(name).get("tls") or {}).get("source") == "letsencrypt":
        return created
    _next_op(ctx)
    try:
        got = op_tls_acme(ctx, name, acme.get("email"), bool(acme.get("staging")), acme.get("server"))
    except ProviderError as exc:
        raise ProviderError(f"{name} was created and is served with a self-signed certificate, but the Let's "
                            f"Encrypt step failed: {exc.message}",
                            hint=f"{exc.hint + '; ' if exc.hint else ''}then run: abssctl tls acme {name}",
                            details=exc.details) from None
    inst = _instance_summary(ctx, Instances(ctx).get(name), {"health": created.data["instance"].get("health")})
    return Result({**created.data, "instance": inst, "acme": got.data}, _created_outcome(inst), changed=True)


def _created_outcome(inst: Mapping[str, Any]) -> list[str]:
    name, url = inst.get("name"), inst.get("url")
    running = inst.get("health") == "UP"
    lines = [f"created {name}: {url} (port {inst.get('port')}, version {inst.get('resolved_version')}, "
             f"TLS {(inst.get('tls') or {}).get('source')}, {'running' if running else 'not started'})"]
    lines.append(f"next: open {url} and set the server password" if running
                 else f"next: abssctl instance start {name}")
    return lines


def _instance_summary(ctx: Context, entry: Mapping[str, Any], gate: Mapping[str, Any]) -> dict[str, Any]:
    return {"name": entry.get("name"), "domain": entry.get("domain"), "port": entry.get("port"),
            "version": entry.get("version"), "resolved_version": entry.get("resolved_version"),
            "enabled": entry.get("enabled"), "active": bool(gate) or None,
            "health": gate.get("health"), "url": instance_url(entry, ctx.config.get("nginx", "https_port")),
            "tls": {"source": (entry.get("tls") or {}).get("source")}, "unit": unit_name(str(entry.get("name")))}


def _create_steps(ctx: Context, plan: Plan, req: CreateRequest, gate: dict[str, Any],
                  data_steps: Callable[[Plan], None] | None = None) -> None:
    """The create plan; ``data_steps`` adds the steps that fill data/ once it exists (instance import)."""
    name = req.name
    insts = Instances(ctx)
    versions = Versions(ctx)
    own = instance_account(ctx, name)
    user, group = (own, own) if own else run_as(ctx, {})
    paths = instance_paths(ctx, name)
    tls = _tls_entry(ctx, req)
    if own:
        account_create_step(ctx, plan, own)
    _registry_step(ctx, plan, insts.ports_registry, str(req.port), {"instance": name, "reserved_at": _now()},
                   f"reserve port {req.port}")
    _registry_step(ctx, plan, insts.registry, name, _instance_entry(ctx, req, tls, "provisioning"),
                   f"register {name} as provisioning")

    def make_dirs() -> None:
        uid, gid = account_ids(user, group)
        ensure_dir(ctx.paths.instance_root, 0o755)
        os.mkdir(paths["root"], 0o750)
        os.chown(paths["root"], 0, gid)
        os.chmod(paths["root"], 0o750)
        for sub in ("data", "data/server-files", "data/user-files"):
            path = os.path.join(paths["root"], sub)
            os.mkdir(path, 0o700 if own else 0o750)
            os.chown(path, uid, gid)
            os.chmod(path, 0o700 if own else 0o750)
    plan.add("fs.dirs", f"create {paths['root']} and its data dirs (owner {user})", paths["root"], make_dirs,
             UndoAction("discard_dir", path=paths["root"]))
    if data_steps is not None:
        data_steps(plan)

    def write_config() -> None:
        uid, gid = account_ids(user, group)
        atomic_write(paths["config"], server_config(paths["root"], req.port), mode=0o640,
                     uid=uid if own else -1, gid=gid, tag=ctx.op_id)
    plan.add("config.write", f"write {paths['config']}", paths["config"], write_config,
             UndoAction("remove_path", path=paths["config"]))
    if req.tls not in ("system", "letsencrypt"):          # those files are served where they are
        tdir = _tls_paths(ctx, name)["dir"]
        if req.tls == "self-signed":
            do_tls = lambda: make_self_signed(ctx, name, req.domain, 825)  # noqa: E731
        else:
            do_tls = lambda: install_custom_files(ctx, name, req.cert or "", req.key or "", req.chain)  # noqa: E731
        plan.add("tls.write", f"write the {req.tls} certificate into {tdir}", tdir, do_tls,
                 UndoAction("discard_dir", path=tdir))
    _unit_step(ctx, plan, name, render_unit(ctx, name, req.port, req.version, versions, (user, group)),
               f"write {paths['unit']} and daemon-reload")
    _systemctl_step(ctx, plan, "enable", unit_name(name), "disable")
    if req.start:
        _start_and_gate_step(ctx, plan, name, req.port, req.version, gate)
    vhost = ctx.paths.vhost_file(name)
    _nginx_publish_step(ctx, plan, {vhost: render_vhost(ctx, name, req.domain, req.port, tls)},
                        {ctx.paths.vhost_link(name): vhost}, (), f"publish {vhost} (nginx -t, reload)", vhost)
    final = _instance_entry(ctx, req, tls, "ready")
    final.update({"enabled": True, "data_version": req.version if req.start else None})
    _registry_step(ctx, plan, insts.registry, name, final, f"mark {name} ready")


def install_custom_files(ctx: Context, name: str, cert: str, key: str, chain: str | None) -> None:
    """Copy a verified custom pair into <tls_dir>/NAME (key 0600, fullchain = cert + chain)."""
    with open(key, "rb") as f:
        key_data = f.read()
    with open(cert, "rb") as f:
        cert_data = f.read()
    if chain:
        with open(chain, "rb") as f:
            cert_data = cert_data.rstrip(b"\n") + b"\n" + f.read()
    _write_key_and_cert(ctx, _tls_paths(ctx, name)["dir"], key_data, cert_data)


# -- TLS verification ----------------------------------------------------------------

def verify_pair(ctx: Context, cert: str, key: str, chain: str | None, domain: str | None) -> dict[str, Any]:
    """§4.7 tls verify: files, modes, PEM blocks, key match, expiry, SAN; key material never shown."""
    import grp
    import stat
    import time
    for path in [cert, key] + ([chain] if chain else []):
        try:
            st = os.stat(path)
        except OSError:
            raise UsageError(f"{path} does not exist or cannot be read",
                             hint="check the path; abssctl reads certificate files, it never creates them") from None
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"{path} is not a regular file")
    warnings = []
    kst = os.stat(key)
    mode = kst.st_mode & 0o777
    try:
        ssl_cert_gid = grp.getgrnam("ssl-cert").gr_gid
    except KeyError:
        ssl_cert_gid = None
    if not (mode == 0o600 or (mode == 0o640 and kst.st_gid == ssl_cert_gid)):
        warnings.append(f"{key} has mode {mode:04o}; keys should be 0600 (or 0640 with group ssl-cert)")
    blocks = pem_blocks(cert)
    cert_has_key = any("PRIVATE KEY" in b for b in blocks)
    Tls.check_pair(cert, key, chain)
    info = Tls(ctx.runner).inspect(cert)
    days = (info.not_after - time.time()) / 86400
    if days < 0:
        raise UsageError(f"the certificate {cert} expired on {rfc3339(info.not_after)}", hint="renew it first")
    if days < 21:
        warnings.append(f"the certificate {cert} expires in {int(days)} days ({rfc3339(info.not_after)[:10]})")
    covers = info.covers(domain) if domain else None
    if covers is False:
        warnings.append(f"the certificate's names ({', '.join(info.san) or 'none'}) do not cover {domain}")
    for w in warnings:
        ctx.out.warn(w)
    return {"cert": cert, "key": key, "chain": chain, "subject": info.subject, "issuer": info.issuer,
            "not_after": rfc3339(info.not_after), "days_left": int(days), "san": info.san,
            "fingerprint_sha256": info.fingerprint, "key_mode": f"{mode:04o}",
            "cert_blocks": len([b for b in blocks if "CERTIFICATE" in b]), "cert_contains_key": cert_has_key,
            "covers_domain": covers}


# --- 8d.3 Running instances: lifecycle, status, changes, delete and TLS commands ---

# -- lifecycle -------------------------------------------------------------------------

def _unit_state(ctx: Context, name: str) -> dict[str, str]:
    return Systemd(ctx.runner).show([unit_name(name)], ("ActiveState", "SubState", "MainPID",
                                                        "UnitFileState"))[unit_name(name)]


def _is_active(state: Mapping[str, str]) -> bool:
    return state.get("ActiveState") in ("active", "activating", "reloading")


def op_instance_lifecycle(ctx: Context, name: str, verb: str) -> Result:
    """start, stop, restart, enable, disable: a systemctl call, the gate where it starts, the registry."""
    entry = Instances(ctx).get(name)
    if verb == "restart" and entry.get("pending_restart"):   # the switch left it for its next restart
        return op_instance_set_version(ctx, name, str(entry.get("version")), backup=True, message=None)
    gate: dict[str, Any] = {}

    def build() -> Plan:
        plan = Plan(f"{verb} {name}")
        current = Instances(ctx).get(name)
        state = _unit_state(ctx, name)
        active, enabled = _is_active(state), state.get("UnitFileState") == "enabled"
        unit = unit_name(name)
        port, version = int(current["port"]), str(current.get("resolved_version"))
        if verb == "start" and not active:
            _start_and_gate_step(ctx, plan, name, port, version, gate)
        elif verb == "restart":
            _start_and_gate_step(ctx, plan, name, port, version, gate, verb="restart")
        elif verb == "stop" and active:
            _systemctl_step(ctx, plan, "stop", unit, "start")
        elif verb == "enable" and not enabled:
            _systemctl_step(ctx, plan, "enable", unit, "disable")
        elif verb == "disable" and enabled:
            _systemctl_step(ctx, plan, "disable", unit, "enable")
        if plan.steps and verb in ("enable", "disable", "start", "restart"):
            updated = dict(current, updated_at=_now())
            if verb in ("enable", "disable"):
                updated["enabled"] = verb == "enable"
            if verb in ("start", "restart"):
                updated["data_version"] = version
            _registry_step(ctx, plan, Instances(ctx).registry, name, updated, f"record {name} {verb}ed")
        return plan

    done = {"start": "started", "stop": "stopped", "restart": "restarted", "enable": "enabled",
            "disable": "disabled"}.get(verb, verb)
    return run_mutation(ctx, Mutation(title=f"{verb} {name}", build=build, instances=[name],
                                      target={"kind": "instance", "name": name}, args={"name": name},
                                      finish=lambda _p: {"instance": _instance_summary(
                                          ctx, Instances(ctx).get(name), gate)},
                                      outcome=lambda x: [f"{name} {done}" + (
                                          f"; /health is {x['instance']['health']}" if x["instance"].get("health")
                                          else "") + f" (abssctl instance status {name} shows it)"]))


def op_instance_status(ctx: Context, name: str | None) -> Result:
    """Live state of one or every instance: unit, listening, /health, /info against the registry."""
    from concurrent.futures import ThreadPoolExecutor
    insts = Instances(ctx)
    names = [name] if name else sorted(insts.doc["instances"])
    if name:
        insts.get(name)
    units = Systemd(ctx.runner).show([unit_name(n) for n in names],
                                     ("ActiveState", "SubState", "MainPID", "ExecMainStatus", "UnitFileState"))
    bind = ctx.config.get("ports", "bind")

    def probe(n: str) -> dict[str, Any]:
        e = insts.doc["instances"][n]
        port = int(e.get("port") or 0)
        app = _probe_app(port) if port else {"health": None, "info_version": None}
        unit = units.get(unit_name(n), {})
        return {"name": n, "domain": e.get("domain"), "port": port, "unit": unit_name(n),
                "active_state": unit.get("ActiveState"), "sub_state": unit.get("SubState"),
                "main_pid": int(unit.get("MainPID") or 0), "enabled": unit.get("UnitFileState") == "enabled",
                "listening": port_listening(bind, port) if port else False, "health": app["health"],
                "info_version": app["info_version"], "resolved_version": e.get("resolved_version"),
                "version_ok": app["info_version"] == e.get("resolved_version")}
    with ThreadPoolExecutor(max_workers=min(8, max(1, len(names)))) as pool:
        rows = list(pool.map(probe, names))
    text = table(("NAME", "UNIT", "PORT", "LISTENING", "HEALTH", "VERSION"),
                 [(r["name"], f"{r['active_state']}/{r['sub_state']}", r["port"], "yes" if r["listening"] else "no",
                   r["health"], r["info_version"] or r["resolved_version"]) for r in rows]) if rows \
        else ["no instances yet"]
    return Result({"instances": rows}, text)


def op_instance_logs(ctx: Context, name: str, *, lines: int, since: str | None, follow: bool,
                     emit_line: Callable[[str], None]) -> Result:
    Instances(ctx).get(name)
    args = ["-u", unit_name(name), "--no-pager", "-o", "short-iso", "-n", str(lines)]
    if since:
        args += ["--since", since]
    if not follow:
        done = ctx.runner.run("journalctl", args, mutating=False)
        return Result({"lines": done.stdout.splitlines()}, done.stdout.splitlines())
    proc = ctx.runner.popen("journalctl", [*args, "-f"], stdout="pipe", text=True)
    try:
        for line in proc.stdout:
            emit_line(line.rstrip("\n"))
    except KeyboardInterrupt:
        pass
    finally:
        stop_process(proc, grace=2)
    return Result({}, [])


def op_instance_env(ctx: Context, name: str) -> Result:
    """The unit's Environment= lines and ExecStart argv, as the server sees them."""
    entry = Instances(ctx).get(name)
    path = (entry.get("paths") or {}).get("unit") or ctx.paths.unit_file(name)
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise HostError(f"{path} is missing", hint=f"re-create it: abssctl instance restart {name}") from None
    env = dict(line[len("Environment="):].split("=", 1) for line in lines if line.startswith("Environment=")
               and "=" in line[len("Environment="):])
    exec_line = next((line[len("ExecStart="):] for line in lines if line.startswith("ExecStart=")), "")
    cwd = next((line[len("WorkingDirectory="):] for line in lines if line.startswith("WorkingDirectory=")), None)
    text = [f"{k}={v}" for k, v in sorted(env.items())] + [f"# cwd {cwd}", f"# exec {exec_line}"]
    return Result({"environment": env, "exec": exec_line.split(), "working_directory": cwd}, text)


def op_instance_reset_password(ctx: Context, name: str) -> Result:
    """Run the server's own --reset-password with the instance's config, as the service user, on the TTY."""
    entry = Instances(ctx).get(name)
    if not ctx.interactive:
        raise UsageError("reset-password needs a terminal (the server reads the password in raw mode)",
                         hint="run it in an interactive shell, without --json")
    versions = Versions(ctx)
    version = str(entry.get("resolved_version"))
    pkg = os.path.realpath(versions.package_dir(version))
    vers = _version_entry(ctx, versions, version)
    paths = instance_paths(ctx, name)
    user = ctx.config.get("service", "user")
    proc = runner_for(ctx, vers).popen("node", [os.path.join(pkg, vers["bin"]), "--reset-password", "--config",
                                     paths["config"]], cwd=pkg, user=None if user == "root" else user,
                            env_extra={"ACTUAL_DATA_DIR": paths["data"], "NODE_ENV": "production"},
                            stdin=sys.stdin, stdout=sys.stdout, stderr=sys.stderr, new_session=False)
    rc = proc.wait()
    if rc != 0:
        raise ProviderError(f"the server's password reset exited {rc}")
    return Result({"instance": name, "reset": True}, [f"password of {name} reset"])


# -- changes -------------------------------------------------------------------------

def _restart_on_undo_step(ctx: Context, plan: Plan, name: str, was_active: bool) -> None:
    """First step of a change: a no-op whose undo (run last) restarts the server on restored files."""
    if was_active:
        plan.add("service.mark", f"remember that {name} was running", unit_name(name), lambda: None,
                 UndoAction("systemctl", verb="restart", unit=unit_name(name)))


def op_instance_set_port(ctx: Context, name: str, port: int) -> Result:
    gate: dict[str, Any] = {}

    def build() -> Plan:
        insts = Instances(ctx)
        entry = insts.get(name)
        plan = Plan(f"move {name} to port {port}")
        old = int(entry["port"])
        if old == port:
            return plan
        insts.check_port(port, name)
        active = _is_active(_unit_state(ctx, name))
        paths = instance_paths(ctx, name)
        version = str(entry["resolved_version"])
        _restart_on_undo_step(ctx, plan, name, active)
        _registry_step(ctx, plan, insts.ports_registry, str(port), {"instance": name, "reserved_at": _now()},
                       f"reserve port {port}")
        cuid, cgid = config_ids(ctx, entry)
        _file_step(ctx, plan, "config.write", paths["config"], server_config(paths["root"], port), 0o640,
                   cgid, f"set port {port} in {paths['config']}", cuid)
        _unit_step(ctx, plan, name, render_unit(ctx, name, port, version, Versions(ctx), run_as(ctx, entry)),
                   f"rewrite {paths['unit']} for port {port}")
        if active:
            _start_and_gate_step(ctx, plan, name, port, version, gate, verb="restart")
        vhost = ctx.paths.vhost_file(name)
        _nginx_publish_step(ctx, plan, {vhost: render_vhost(ctx, name, entry["domain"], port, entry["tls"])},
                            {}, (), f"point {vhost} at port {port}", vhost)
        _registry_step(ctx, plan, insts.registry, name, dict(entry, port=port, updated_at=_now()),
                       f"record port {port}")
        _registry_step(ctx, plan, insts.ports_registry, str(old), None, f"release port {old}")
        return plan

    Instances(ctx).get(name)
    return run_mutation(ctx, Mutation(title=f"set-port {name}", build=build, instances=[name],
                                      target={"kind": "instance", "name": name}, args={"name": name, "port": port},
                                      finish=lambda _p: {"instance": _instance_summary(
                                          ctx, Instances(ctx).get(name), gate)},
                                      outcome=lambda x: [f"{name} now listens on 127.0.0.1:{x['instance']['port']}, "
                                                         f"and nginx proxies {x['instance']['domain']} to it"]))


def _tls_files_step(ctx: Context, plan: Plan, name: str, summary: str, do: Callable[[], None]) -> None:
    """Replace an instance's key and certificate (and their .prev). Until the change stands the old
    files are kept aside as hard links in the 0700 TLS dir; the journal names them but never holds
    their bytes (§6.4: no key material in a file that outlives a kill -9)."""
    tp = _tls_paths(ctx, name)
    existed = {p: os.path.lexists(p) for p in (tp["key"], tp["cert"], tp["key"] + ".prev", tp["cert"] + ".prev")}
    aside = {p: os.path.join(tp["dir"], f".abssctl-tmp-{ctx.op_id}-{os.path.basename(p)}") for p in existed}

    def run() -> None:
        for path, was in existed.items():
            if was and not os.path.lexists(aside[path]):
                os.link(path, aside[path])
        do()
    plan.add("tls.write", summary, tp["dir"], run,
             UndoAction("tls_restore", files={p: {"aside": aside[p], "existed": was}
                                              for p, was in existed.items()}))
    plan.cleanup("tls.forget", f"drop the old key and certificate kept aside in {tp['dir']}", tp["dir"],
                 UndoAction("remove_tree", paths=list(aside.values())))


def _undo_tls_restore(ctx: Context, args: Mapping[str, Any]) -> None:
    """Put the old key and certificate back from their kept-aside links; nginx reloads them."""
    for path, how in args["files"].items():
        if os.path.lexists(how["aside"]):
            os.replace(how["aside"], path)
        elif not how["existed"] and os.path.lexists(path):
            os.unlink(path)
    nginx = Nginx(ctx.runner)
    nginx.test()
    nginx.reload()


def op_instance_set_domain(ctx: Context, name: str, domain: str) -> Result:
    def build() -> Plan:
        insts = Instances(ctx)
        entry = insts.get(name)
        plan = Plan(f"move {name} to {domain}")
        if entry["domain"] == domain:
            return plan
        owner = insts.domain_owner(domain)
        if owner:
            raise Conflict(f"domain {domain} already belongs to instance {owner!r}",
                           hint="pick another domain, or see abssctl instance list")
        tls = dict(entry["tls"])
        if tls.get("source") == "self-signed":
            _tls_files_step(ctx, plan, name, f"regenerate the self-signed certificate for {domain}",
                            lambda: make_self_signed(ctx, name, domain, 825))
        elif tls.get("source") == "letsencrypt":
            # The certificate for the new name comes first: if certbot is refused, nothing changed.
            email, server = acme_options(ctx, None, None)
            _require_certbot(ctx)
            _challenge_ready_step(ctx, plan, name, entry, extra_domain=domain)
            _issue_step(ctx, plan, domain, email, server, False)
            tls = letsencrypt_tls(ctx, domain)
        elif tls.get("source") == "custom" and not Tls(ctx.runner).inspect(tls["cert"]).covers(domain):
            ctx.out.warn(f"the {tls['source']} certificate of {name} does not cover {domain}; install one that does "
                         f"with abssctl tls install {name} --cert F --key F")
        vhost = ctx.paths.vhost_file(name)
        _nginx_publish_step(ctx, plan, {vhost: render_vhost(ctx, name, domain, int(entry["port"]), tls)}, {}, (),
                            f"serve {name} as {domain}", vhost)
        _registry_step(ctx, plan, insts.registry, name, dict(entry, domain=domain, tls=tls, updated_at=_now()),
                       f"record domain {domain}")
        return plan

    Instances(ctx).get(name)
    return run_mutation(ctx, Mutation(title=f"set-domain {name}", build=build, instances=[name],
                                      target={"kind": "instance", "name": name},
                                      args={"name": name, "domain": domain},
                                      finish=lambda _p: {"instance": _instance_summary(
                                          ctx, Instances(ctx).get(name), {})},
                                      outcome=lambda x: [f"{name} is now served as {x['instance']['url']}",
                                                         f"next: point {domain}'s DNS at this host, and tell its "
                                                         "users the new address"]))


def _rename_path_step(plan: Plan, step_id: str, src: str, dst: str, summary: str) -> None:
    if os.path.lexists(src):
        if os.path.lexists(dst):
            raise AlreadyExists(f"{dst} already exists", hint="move it aside first")
        plan.add(step_id, summary, dst, lambda: os.rename(src, dst), UndoAction("rename", src=dst, dst=src))


def op_instance_rename(ctx: Context, old: str, new: str) -> Result:
    """Stop, move dirs, unit, vhost, TLS, port, registry and backups to the new name, start, gate."""
    instance_account(ctx, new)                 # the user name it makes fits useradd (exits 2 otherwise)
    gate: dict[str, Any] = {}

    def build() -> Plan:
        insts = Instances(ctx)
        entry = insts.get(old)
        plan = Plan(f"rename {old} to {new}")
        if new in insts.doc["instances"]:
            raise AlreadyExists(f"instance {new!r} already exists", hint="pick a name no instance uses")
        for path in (ctx.paths.instance_dir(new), ctx.paths.unit_file(new), ctx.paths.vhost_file(new)):
            if os.path.lexists(path):
                raise AlreadyExists(f"{path} already exists", hint="move it aside first")
        state = _unit_state(ctx, old)
        active, enabled = _is_active(state), state.get("UnitFileState") == "enabled"
        if active:
            _systemctl_step(ctx, plan, "stop", unit_name(old), "start")
        if enabled:
            _systemctl_step(ctx, plan, "disable", unit_name(old), "enable")
        new_paths = instance_paths(ctx, new)
        moved_user = instance_account(ctx, new) if entry.get("user") else None
        if moved_user:
            if _lookup_ids(moved_user, moved_user) != (None, None):
                raise AlreadyExists(f"the system user or group {moved_user} already exists",
                                    hint=f"remove it (userdel {moved_user}), or pick another name")
            account_rename_step(ctx, plan, str(entry["user"]), moved_user)
        account = (moved_user, moved_user) if moved_user else run_as(ctx, entry)
        _rename_path_step(plan, "fs.rename", ctx.paths.instance_dir(old), new_paths["root"],
                          f"rename {ctx.paths.instance_dir(old)} to {new_paths['root']}")
        old_config = snapshot(os.path.join(ctx.paths.instance_dir(old), "config.json"))

        def write_config() -> None:
            cuid, cgid = account_ids(*account) if moved_user else (-1, ctx.service_gid())
            atomic_write(new_paths["config"], server_config(new_paths["root"], int(entry["port"])),
                         mode=0o640, uid=cuid, gid=cgid, tag=ctx.op_id)
        plan.add("config.write", f"rewrite {new_paths['config']}", new_paths["config"], write_config,
                 UndoAction("restore_file", path=new_paths["config"], snapshot=old_config))
        tls = dict(entry["tls"])
        tp_old, tp_new = _tls_paths(ctx, old), _tls_paths(ctx, new)
        own_tls = tls.get("source") in ("self-signed", "custom") and os.path.isdir(tp_old["dir"])
        if own_tls:
            # Copy now, retire the old copy after nginx stops using it: moving it first would break
            # the old vhost, and nginx -t, before the transaction could swap the vhosts.
            if os.path.lexists(tp_new["dir"]):
                raise AlreadyExists(f"{tp_new['dir']} already exists", hint="move it aside first")
            plan.add("tls.copy", f"copy {tp_old['dir']} to {tp_new['dir']}", tp_new["dir"],
                     lambda: copy_private_dir(tp_old["dir"], tp_new["dir"]),
                     UndoAction("discard_dir", path=tp_new["dir"]))
            tls.update(cert=tp_new["cert"], key=tp_new["key"])
        version = str(entry["resolved_version"])
        _unit_step(ctx, plan, new, render_unit(ctx, new, int(entry["port"]), version, Versions(ctx), account),
                   f"write {ctx.paths.unit_file(new)}")
        _unit_step(ctx, plan, old, None, f"remove {ctx.paths.unit_file(old)}")
        vhost_new = ctx.paths.vhost_file(new)
        _nginx_publish_step(ctx, plan, {vhost_new: render_vhost(ctx, new, entry["domain"], int(entry["port"]), tls)},
                            {ctx.paths.vhost_link(new): vhost_new},
                            (ctx.paths.vhost_link(old), ctx.paths.vhost_file(old)),
                            f"publish {vhost_new} and retire {ctx.paths.vhost_file(old)}", vhost_new)
        if own_tls:
            trash = os.path.join(ctx.paths.tls_dir, f".trash-{old}-{ctx.op_id}")
            _rename_path_step(plan, "tls.retire", tp_old["dir"], trash, f"move the old {tp_old['dir']} aside")
        _rename_path_step(plan, "backups.rename", os.path.join(ctx.paths.backup_root, old),
                          os.path.join(ctx.paths.backup_root, new), "move the backups directory")
        _backup_index_rename_step(ctx, plan, old, new)
        moved = dict(entry, name=new, tls=tls, paths=new_paths, updated_at=_now())
        if moved_user:
            moved["user"] = moved_user
        _registry_step(ctx, plan, insts.registry, new, moved, f"register {new}")
        _registry_step(ctx, plan, insts.registry, old, None, f"unregister {old}")
        _registry_step(ctx, plan, insts.ports_registry, str(entry["port"]),
                       {"instance": new, "reserved_at": _now()}, f"give port {entry['port']} to {new}")
        if enabled:
            _systemctl_step(ctx, plan, "enable", unit_name(new), "disable")
        if active:
            _start_and_gate_step(ctx, plan, new, int(entry["port"]), version, gate)
        if own_tls:
            plan.cleanup("tls.delete", f"delete the old TLS copy {trash}", trash,
                         UndoAction("remove_tree", path=trash))
        return plan

    Instances(ctx).get(old)
    return run_mutation(ctx, Mutation(title=f"rename {old}", build=build, instances=[old, new],
                                      target={"kind": "instance", "name": old}, args={"old": old, "new": new},
                                      finish=lambda _p: {"instance": _instance_summary(
                                          ctx, Instances(ctx).get(new), gate)},
                                      outcome=lambda x: [f"renamed {old} to {new} (unit {x['instance']['unit']}, "
                                                         f"still {x['instance']['url']})"]))


def _backup_index_rename_step(ctx: Context, plan: Plan, old: str, new: str) -> None:
    reg = ctx.registry("backups")
    if not os.path.exists(reg.path):
        return
    before = reg.load()
    if not any(b.get("instance") == old for b in before["backups"].values() if isinstance(b, dict)):
        return

    def do() -> None:
        with reg.edit(ctx.op_id) as doc:
            for b in doc["backups"].values():
                if isinstance(b, dict) and b.get("instance") == old:
                    b["instance"] = new
                    b["archive"] = str(b.get("archive", "")).replace(f"{old}/", f"{new}/", 1)
    plan.add("backups.index", f"point the backup index entries of {old} at {new}", reg.path, do,
             UndoAction("registry_fields", fields={"backups": before["backups"]}, **_registry_args(reg)))


def op_instance_delete(ctx: Context, name: str, *, purge_data: bool, no_backup: bool,
                       message: str | None = None) -> Result:
    """Stop, disable, unpublish, remove the unit, release the port, unregister; data kept unless purged."""
    entry = Instances(ctx).get(name)
    final: dict[str, Any] = {}

    def build() -> Plan:
        insts = Instances(ctx)
        current = insts.get(name)
        plan = Plan(f"delete {name}")
        state = _unit_state(ctx, name)
        unit = unit_name(name)
        if _is_active(state):
            _systemctl_step(ctx, plan, "stop", unit, "start")
        if purge_data and not no_backup:     # cold, and while the unit and vhost still exist to be saved
            backup_step(ctx, plan, "backup.pre-delete", f"take a final cold backup of {name}", name, final,
                        reason="pre-delete", message=message)
        if state.get("UnitFileState") == "enabled":
            _systemctl_step(ctx, plan, "disable", unit, "enable")
        _nginx_publish_step(ctx, plan, {}, {}, (ctx.paths.vhost_link(name), ctx.paths.vhost_file(name)),
                            f"unpublish {ctx.paths.vhost_file(name)}", ctx.paths.vhost_file(name))
        _unit_step(ctx, plan, name, None, f"remove {ctx.paths.unit_file(name)}")
        _registry_step(ctx, plan, insts.ports_registry, str(current["port"]), None,
                       f"release port {current['port']}")
        _registry_step(ctx, plan, insts.registry, name, None, f"unregister {name}")
        if purge_data:
            trashes = []
            for what, path in (("dir", ctx.paths.instance_dir(name)), ("tls", _tls_paths(ctx, name)["dir"])):
                trash = os.path.join(os.path.dirname(path), f".trash-{name}-{ctx.op_id}")
                if os.path.lexists(path):
                    trashes.append(trash)
                    _rename_path_step(plan, f"purge.{what}", path, trash, f"move {path} aside")
            plan.cleanup("purge.delete", "delete the moved-aside data", name,
                         UndoAction("remove_tree", paths=trashes))
        if current.get("user"):
            if not purge_data and os.path.isdir(ctx.paths.instance_dir(name)):
                # Kept data goes to root: a uid without a user owning it would confuse (and be reused).
                kept = ctx.paths.instance_dir(name)
                plan.add("fs.owner", f"give the kept {kept} to root (its user goes)", kept,
                         lambda: (chown_tree(kept, 0, 0), os.chmod(kept, 0o700)) and None,
                         UndoAction("layout", was=layout_snapshot(ctx, name)))
            account_remove_step(ctx, plan, str(current["user"]))
        return plan

    def ask(_plan: Plan) -> None:
        if purge_data and not no_backup:
            confirm(ctx, f"Delete instance '{name}' ({entry['domain']}, port {entry['port']}) and its data?\n"
                         f"A final backup is taken first: {os.path.join(ctx.paths.backup_root, name)}/<id>" + (
                             f"\nIts system user {entry['user']} is removed." if entry.get("user") else ""),
                    "[y] yes, back up then delete   [N] no")
            return
        if purge_data:
            question = (f"Delete instance '{name}' ({entry['domain']}, port {entry['port']}) AND its data, "
                        f"without a backup?\nType the instance name to confirm: ")
            if ctx.assume_yes:
                return
            if not ctx.interactive:
                raise NeedsConfirmation(f"deleting {name} with its data needs confirmation",
                                        hint="re-run with --yes, or in a terminal")
            if ctx.out.ask(question, "name:") != name:
                raise Declined("the name did not match; nothing was changed")
            return
        confirm(ctx, f"Delete instance '{name}' ({entry['domain']}, port {entry['port']})?\n"
                     f"Its data stays in {ctx.paths.instance_dir(name)} and its backups stay in "
                     f"{os.path.join(ctx.paths.backup_root, name)}." + (
                         f"\nIts system user {entry['user']} is removed; the kept data goes to root."
                         if entry.get("user") else ""))

    result = run_mutation(ctx, Mutation(title=f"delete {name}", build=build, instances=[name], confirm=ask,
                                        target={"kind": "instance", "name": name},
                                        args={"name": name, "purge_data": purge_data, "no_backup": no_backup},
                                        outcome=lambda _x: [f"deleted instance {name}: its unit, vhost and port "
                                                            "are gone" + (", and its data" if purge_data else "")]))
    if final:
        result.data["backup"] = _backup_output(ctx, final)
        result.text.append(f"final backup: {final['id']}")
    if result.changed and not purge_data:
        result.text.append(f"kept: {ctx.paths.instance_dir(name)} (data), {_tls_paths(ctx, name)['dir']} (TLS) "
                           f"and {os.path.join(ctx.paths.backup_root, name)} (backups)")
        result.data["kept"] = [ctx.paths.instance_dir(name), _tls_paths(ctx, name)["dir"]]
    return result


# -- TLS commands ------------------------------------------------------------------------

def op_tls_verify(ctx: Context, name: str | None, cert: str | None, key: str | None, chain: str | None) -> Result:
    domain = None
    if name:
        entry = Instances(ctx).get(name)
        tls = entry.get("tls") or {}
        cert, key, chain, domain = tls.get("cert"), tls.get("key"), tls.get("chain"), entry.get("domain")
    if not (cert and key):
        raise UsageError("give an instance NAME, or --cert FILE and --key FILE",
                         hint="e.g. abssctl tls verify alice, or abssctl tls verify --cert c.pem --key k.pem")
    info = verify_pair(ctx, cert, key, chain, domain)
    text = [f"{k}: {v}" for k, v in info.items()]
    return Result({"tls": info}, text)


def _retls(ctx: Context, name: str, source: str, prepare: Callable[[Plan, dict[str, Any]], None],
           reload: bool = False) -> Result:
    """Shared tail of tls install/use-system/self-signed/acme: new files, registry, nginx transaction."""
    def build() -> Plan:
        insts = Instances(ctx)
        entry = insts.get(name)
        plan = Plan(f"tls {source} for {name}")
        tls: dict[str, Any] = {"source": source, "chain": None}
        prepare(plan, tls)
        if tls == entry.get("tls") and source == "system":
            return Plan(f"tls {source} for {name}")
        vhost = ctx.paths.vhost_file(name)
        _nginx_publish_step(ctx, plan, {vhost: render_vhost(ctx, name, entry["domain"], int(entry["port"]), tls)},
                            {}, (), f"serve {name} with the {source} certificate", vhost, reload=reload)
        _registry_step(ctx, plan, insts.registry, name, dict(entry, tls=tls, updated_at=_now()),
                       f"record TLS source {source}")
        return plan

    Instances(ctx).get(name)
    return run_mutation(ctx, Mutation(title=f"tls {source} {name}", build=build, instances=[name],
                                      target={"kind": "instance", "name": name}, args={"name": name,
                                                                                      "source": source},
                                      outcome=lambda _x: [f"{name} is now served with the {source} certificate "
                                                          f"({(Instances(ctx).get(name).get('tls') or {}).get('cert')})",
                                                          f"check it with: abssctl tls verify {name}"]))


def op_tls_install(ctx: Context, name: str, cert: str, key: str, chain: str | None) -> Result:
    entry = Instances(ctx).get(name)
    verify_pair(ctx, cert, key, chain, entry.get("domain"))
    tp = _tls_paths(ctx, name)

    def prepare(plan: Plan, tls: dict[str, Any]) -> None:
        _tls_files_step(ctx, plan, name, f"install the certificate into {tp['dir']}",
                        lambda: install_custom_files(ctx, name, cert, key, chain))
        tls.update(cert=tp["cert"], key=tp["key"])
    return _retls(ctx, name, "custom", prepare)


def op_tls_use_system(ctx: Context, name: str) -> Result:
    system = check_system_tls(ctx)
    return _retls(ctx, name, "system", lambda plan, tls: tls.update(system))


def op_tls_self_signed(ctx: Context, name: str, days: int) -> Result:
    entry = Instances(ctx).get(name)
    if not ctx.runner.available("openssl"):
        raise MissingTool("openssl is not installed", hint=INSTALL_HINTS["openssl"])
    tp = _tls_paths(ctx, name)

    def prepare(plan: Plan, tls: dict[str, Any]) -> None:
        _tls_files_step(ctx, plan, name, f"generate a self-signed certificate for {entry['domain']} ({days} days)",
                        lambda: make_self_signed(ctx, name, entry["domain"], days))
        tls.update(cert=tp["cert"], key=tp["key"])
    result = _retls(ctx, name, "self-signed", prepare)
    result.warnings.append(f"browsers will not trust {entry['domain']} until its clients trust {tp['cert']}")
    return result


# --- 8d.4 Certificates through certbot ---

CHALLENGE_PATH = "/.well-known/acme-challenge/"


def check_acme_flags(ctx: Context, tls: str | None, acme: Mapping[str, Any] | None) -> None:
    """instance create's and quickstart's --email/--staging/--server (ACME, None when none was given):
    only with --tls acme, and valid; exit 2 before anything runs."""
    if acme is None:
        return
    if tls != "acme":
        raise UsageError("--email, --staging and --server go with --tls acme",
                         hint="add --tls acme, or leave them out")
    acme_options(ctx, acme.get("email"), acme.get("server"))


def acme_options(ctx: Context, email: str | None, server: str | None) -> tuple[str, str]:
    """The account email and ACME directory for tls acme: the flags, else [tls] acme_email/acme_server.
    Bad values exit 2 before anything runs."""
    email = ctx.config.get("tls", "acme_email") if email is None else email
    server = ctx.config.get("tls", "acme_server") if server is None else server
    if email and not EMAIL_RE.match(email):
        raise UsageError(f"invalid email {email!r}", hint="give an address such as admin@example.org (certbot "
                         "registers it with the CA for expiry notices), or none")
    if server and not ACME_URL_RE.match(server):
        raise UsageError(f"invalid ACME server URL {server!r}",
                         hint="give the https:// URL of an ACME directory, e.g. "
                              "https://acme-v02.api.letsencrypt.org/directory, or leave it out")
    return email, server


def abssctl_program() -> list[str]:
    """The argv that runs this abssctl again: the script or the .pyz, under this python when it is
    not executable itself."""
    import sys
    path = os.path.abspath(__file__)
    while path != "/" and not os.path.isfile(path):      # inside a zipapp: /x/abssctl.pyz/abssctl.py
        path = os.path.dirname(path)
    path = os.path.realpath(path)
    if os.access(path, os.X_OK):
        return [path]
    return [os.path.realpath(sys.executable) if sys.executable else "/usr/bin/python3", path]


def deploy_hook_command(ctx: Context) -> str:
    """What certbot runs (through a shell) after each issue and renewal: this abssctl, its config."""
    import shlex
    config = ["--config", os.path.abspath(ctx.config.path)] if ctx.config.path_exists else []
    return shlex.join([*abssctl_program(), *config, "tls", "deploy-hook"])


def check_lineage_pair(ctx: Context, cert: str, key: str, domains: Sequence[str]) -> CertInfo:
    """A pair certbot wrote is served only if the key matches, it is in date and covers every domain."""
    import time
    for path in (cert, key):
        if not os.path.isfile(path):
            raise UsageError(f"{path} does not exist")
    Tls.check_pair(cert, key)
    info = Tls(ctx.runner).inspect(cert)
    if info.not_after < time.time():
        raise UsageError(f"the certificate {cert} expired on {rfc3339(info.not_after)}")
    if info.not_before is not None and info.not_before > time.time() + 300:
        raise UsageError(f"the certificate {cert} is not valid before {rfc3339(info.not_before)}")
    missing = [d for d in domains if not info.covers(d)]
    if missing:
        raise UsageError(f"the certificate {cert} does not cover {', '.join(missing)} "
                         f"(it names {', '.join(info.san) or 'no DNS names'})")
    return info


def _certbot_leftovers(ctx: Context) -> dict[str, set[str]]:
    """The files in certbot's keys/ and csr/ (a failed certonly leaves a fresh, unused key there)."""
    out = {}
    for sub in ("keys", "csr"):
        where = os.path.join(ctx.paths.letsencrypt_dir, sub)
        out[where] = set(os.listdir(where)) if os.path.isdir(where) else set()
    return out


def _wait_challenge_served(ctx: Context, domain: str, seconds: float = 15.0) -> None:
    """Before the CA is asked: nginx answers DOMAIN's challenge path on port 80 here, three requests
    in a row (a reload returns before the new workers serve, and a validation that meets an old
    worker fails). A probe file in the webroot is fetched with Host: DOMAIN, then removed."""
    import http.client
    import secrets
    import time
    where = os.path.join(ctx.paths.acme_webroot, CHALLENGE_PATH.strip("/"))
    for path in (ctx.paths.acme_webroot, os.path.dirname(where), where):
        ensure_dir(path, 0o755)
    token = f"abssctl-probe-{ctx.op_id}"
    body = secrets.token_hex(16).encode()
    atomic_write(os.path.join(where, token), body, mode=0o644, tag=ctx.op_id)
    port = int(ctx.config.get("nginx", "http_port"))
    deadline = time.monotonic() + seconds
    streak, last = 0, "no answer yet"
    try:
        while True:
            try:
                status, got = http_get(port, f"{CHALLENGE_PATH.rstrip('/')}/{token}", {"Host": domain}, timeout=5)
                ok = status == 200 and got == body
                streak, last = (streak + 1, "served") if ok else (0, f"HTTP {status}")
            except (OSError, http.client.HTTPException) as exc:
                streak, last = 0, str(exc) or type(exc).__name__
            if streak >= 3:
                return
            if time.monotonic() > deadline:
                raise ProviderError(f"nginx does not serve the ACME challenge path of {domain} on port {port} "
                                    f"here ({last}), so the CA could not validate it",
                                    hint=f"check that nginx runs and that its port-80 server for {domain} has "
                                         f"the location {CHALLENGE_PATH} (abssctl doctor --fix re-renders it)")
            time.sleep(0.1)
    finally:
        try:
            os.unlink(os.path.join(where, token))
        except OSError:
            pass


def _issue_step(ctx: Context, plan: Plan, domain: str, email: str, server: str, staging: bool) -> None:
    """certbot certonly --webroot for ``domain``, then the new lineage verified. A refusal leaves
    nothing of its own behind (the unused key certbot wrote is removed); there is nothing to undo
    after success: the lineage is certbot's, and it stays valid for a later try."""
    certbot = Certbot(ctx.runner, ctx.paths.letsencrypt_dir, ctx.paths.acme_webroot)
    hook = deploy_hook_command(ctx)

    def do() -> None:
        _wait_challenge_served(ctx, domain)
        before = _certbot_leftovers(ctx)
        try:
            certbot.certonly(domain, email, server, staging, hook, ctx.op_id)
        except ProviderError:
            for where, names in _certbot_leftovers(ctx).items():
                for name in sorted(names - before[where]):
                    if re.match(r"^[0-9]{4}_(key|csr)-certbot\.pem\Z", name):
                        os.unlink(os.path.join(where, name))
            raise
        lineage = letsencrypt_lineage(ctx, domain)
        try:
            check_lineage_pair(ctx, lineage["cert"], lineage["key"], [domain])
        except UsageError as exc:
            raise ProviderError(f"certbot reported success, but its certificate is not usable: {exc.message}",
                                hint=f"look at {lineage['dir']} and certbot's log") from None
    plan.add("certbot.certonly", f"certbot certonly --webroot -w {ctx.paths.acme_webroot} -d {domain}"
             f"{' --staging' if staging else ''} (deploy hook: {hook})", domain, do)


def _challenge_ready_step(ctx: Context, plan: Plan, name: str, entry: Mapping[str, Any],
                          extra_domain: str | None = None) -> None:
    """Before certbot: the port-80 server of the vhost answers the challenge (an old vhost is
    re-rendered; with ``extra_domain`` it also answers for that name). Undone on failure."""
    vhost = ctx.paths.vhost_file(name)
    try:
        with open(vhost, "rb") as f:
            current = f.read()
    except OSError:
        current = b""
    if CHALLENGE_PATH.encode() in current and extra_domain is None:
        return
    served = f"{entry['domain']} {extra_domain}" if extra_domain else str(entry["domain"])
    _nginx_publish_step(ctx, plan, {vhost: render_vhost(ctx, name, served, int(entry["port"]), entry["tls"])}, {},
                        (), f"answer ACME challenges for {served} on port {ctx.config.get('nginx', 'http_port')}",
                        vhost)


def _require_certbot(ctx: Context) -> None:
    if not ctx.runner.available("certbot"):
        raise MissingTool("certbot is not installed (tls acme asks it for a Let's Encrypt certificate)",
                          hint=INSTALL_HINTS["certbot"])
    if not ctx.runner.available("openssl"):
        raise MissingTool("openssl is not installed (needed to check certificates)", hint=INSTALL_HINTS["openssl"])


def op_tls_acme(ctx: Context, name: str, email: str | None, staging: bool, server: str | None) -> Result:
    """§11.2: certbot certonly --webroot with the deploy hook, then the instance serves the lineage."""
    email, server = acme_options(ctx, email, server)
    entry = Instances(ctx).get(name)
    _require_certbot(ctx)
    domain = str(entry["domain"])

    def prepare(plan: Plan, tls: dict[str, Any]) -> None:
        _challenge_ready_step(ctx, plan, name, Instances(ctx).get(name))
        _issue_step(ctx, plan, domain, email, server, staging)
        tls.update(letsencrypt_tls(ctx, domain))
    return _retls(ctx, name, "letsencrypt", prepare, reload=True)


def _lineage_of(tls: Mapping[str, Any]) -> str | None:
    if tls.get("source") != "letsencrypt":
        return None
    return os.path.normpath(str(tls.get("lineage") or os.path.dirname(str(tls.get("cert") or ""))))


def _previous_archive_pair(ctx: Context, lineage: str, domains: Sequence[str]) -> dict[str, str] | None:
    """The newest earlier archive/<domain>/{fullchain,privkey}N.pem that still verifies: what nginx
    served before certbot moved live/ on (certbot keeps every version)."""
    link = os.path.join(lineage, "fullchain.pem")
    m = re.search(r"fullchain([0-9]+)\.pem\Z", os.readlink(link)) if os.path.islink(link) else None
    if not m:
        return None
    archive = os.path.dirname(os.path.realpath(link))
    for n in range(int(m.group(1)) - 1, 0, -1):
        cert, key = os.path.join(archive, f"fullchain{n}.pem"), os.path.join(archive, f"privkey{n}.pem")
        try:
            check_lineage_pair(ctx, cert, key, domains)
        except UsageError:
            continue
        return {"cert": cert, "key": key}
    return None


def op_tls_deploy_hook(ctx: Context) -> Result:
    """Run by certbot after a renewal (RENEWED_LINEAGE, RENEWED_DOMAINS): verify the new pair, then
    reload nginx through the transaction for every instance serving that lineage. A pair that does
    not verify is refused: those vhosts are pointed at the previous archive pair, so nginx -t passes
    and the old certificate stays served, and the hook exits 4."""
    if os.environ.get(ISSUING_ENV):
        return Result({"deploy_hook": {"skipped": True}}, ["called during abssctl tls acme (op "
                      f"{os.environ[ISSUING_ENV]}), which publishes the certificate itself"], changed=False)
    lineage = os.environ.get("RENEWED_LINEAGE", "")
    domains = os.environ.get("RENEWED_DOMAINS", "").split()
    if not lineage or not os.path.isabs(lineage):
        raise UsageError("RENEWED_LINEAGE is not set: tls deploy-hook is run by certbot after a renewal",
                         hint="certbot runs it; to publish a certificate by hand use abssctl tls acme NAME")
    lineage = os.path.normpath(lineage)
    users = sorted(n for n, e in Instances(ctx).doc["instances"].items() if _lineage_of(e.get("tls") or {}) == lineage)
    if not users:
        return Result({"deploy_hook": {"lineage": lineage, "instances": []}},
                      [f"no instance serves {lineage}; nothing to reload"], changed=False)
    live = {"cert": os.path.join(lineage, "fullchain.pem"), "key": os.path.join(lineage, "privkey.pem")}
    refused: str | None = None
    try:
        check_lineage_pair(ctx, live["cert"], live["key"], domains)
        serve = live
    except UsageError as exc:
        refused = exc.message
        previous = _previous_archive_pair(ctx, lineage, domains)
        if previous is None:
            raise ProviderError(f"refused the renewed certificate in {lineage}: {refused}; no earlier version in "
                                "its archive verifies, so nginx was not reloaded (it still serves what it loaded)",
                                hint=f"fix the lineage (certbot renew --force-renewal --cert-name "
                                     f"{os.path.basename(lineage)}), and do not reload nginx until then") from None
        serve = previous

    def build() -> Plan:
        insts = Instances(ctx)
        plan = Plan(f"deploy {lineage}")
        for name in users:
            entry = insts.get(name)
            tls = dict(entry["tls"], cert=serve["cert"], key=serve["key"], lineage=lineage)
            vhost = ctx.paths.vhost_file(name)
            _nginx_publish_step(ctx, plan, {vhost: render_vhost(ctx, name, entry["domain"], int(entry["port"]), tls)},
                                {}, (), f"serve {name} with {serve['cert']} (nginx -t, reload)", vhost, reload=True,
                                repairs=[live["cert"], live["key"], *map(os.path.realpath, live.values())])
            if tls != entry["tls"]:
                _registry_step(ctx, plan, insts.registry, name, dict(entry, tls=tls, updated_at=_now()),
                               f"record {serve['cert']} for {name}")
        return plan
    result = run_mutation(ctx, Mutation(title="tls deploy-hook", build=build, instances=users,
                                        target={"kind": "lineage", "path": lineage},
                                        args={"lineage": lineage, "domains": domains},
                                        outcome=lambda _x: [f"reloaded nginx for {', '.join(users)} with the renewed "
                                                            f"certificate in {lineage}"]))
    if refused:
        raise ProviderError(f"refused the renewed certificate in {lineage}: {refused}; {', '.join(users)} "
                            f"keep serving the previous one ({serve['cert']})",
                            hint=f"get a good certificate (certbot renew --force-renewal --cert-name "
                                 f"{os.path.basename(lineage)}); the next successful renewal serves live/ again",
                            details={"served": serve, "instances": users})
    return result


# --- 8d.5 Host packages (DESIGN 11.3) ---

# (what abssctl needs, the Debian package that brings it, how to look for it: "command" is a
# [commands] key resolved by the Runner, "path" a program on PATH, "ca" the CA bundle).
HOST_PACKAGES: tuple[tuple[str, str, str], ...] = (
    ("nginx", "nginx-light", "command"), ("npm", "npm", "command"), ("make", "make", "path"),
    ("g++", "g++", "path"), ("python3", "python3", "path"), ("openssl", "openssl", "command"),
    ("ca-certificates", "ca-certificates", "ca"), ("zstd", "zstd", "command"),
    ("node", "nodejs", "command"), ("certbot", "certbot", "path"),
)
# Tools needed only in some setups: (ctx, TLS source asked for) -> needed?
HOST_PACKAGE_WHEN: dict[str, Callable[[Context, str | None], bool]] = {
    "node": lambda ctx, tls: ctx.config.get("node", "runtime") == "system",
    "certbot": lambda ctx, tls: tls == "acme",
}
APT_TIMEOUTS = {"update": 600.0, "install": 1800.0}


def _host_tool_present(ctx: Context, tool: str, how: str) -> bool:
    import shutil
    if how == "command":
        return ctx.runner.available(tool)
    if how == "ca":
        return os.path.isfile(CA_BUNDLE) or shutil.which("update-ca-certificates") is not None
    return shutil.which(tool) is not None


def missing_host_packages(ctx: Context, tls: str | None = None) -> list[tuple[str, str]]:
    """(tool, Debian package) for every tool abssctl needs here and does not find."""
    return [(tool, pkg) for tool, pkg, how in HOST_PACKAGES
            if HOST_PACKAGE_WHEN.get(tool, lambda _c, _t: True)(ctx, tls) and not _host_tool_present(ctx, tool, how)]


def _apt_get(ctx: Context, verb: str, args: Sequence[str]) -> None:
    """apt-get VERB ARGS, non-interactive, its lines forwarded as progress (one every 5 s)."""
    import time
    started = time.monotonic()
    last = [started]

    def on_idle(line: str) -> None:
        now = time.monotonic()
        if now - last[0] < 5:
            return
        last[0] = now
        ctx.out.progress(f"[{elapsed(now - started)}] apt-get {verb}: {line.strip()[:80] or 'working'}")
    try:
        ctx.runner.stream("apt_get", [verb, *args], timeout=APT_TIMEOUTS[verb], on_idle=on_idle, umask=0o022,
                          env_extra={"DEBIAN_FRONTEND": "noninteractive"})
    except ProviderError as exc:
        tail = list(exc.details.get("stderr") or [])
        raise ProviderError(f"apt-get {verb} failed: {exc.message}",
                            hint="run apt-get update by hand and check the sources in /etc/apt/sources.list "
                                 "and /etc/apt/sources.list.d/, then re-run",
                            details={**exc.details, "why": " | ".join(tail[-3:]) or None}) from None


def op_host_packages(ctx: Context, tls: str | None = None) -> Result:
    """Install the Debian packages abssctl needs and the host lacks, after a prompt (default yes).

    Not a journaled mutation: it runs before init has made the state dirs, and there is nothing to
    undo (the packages stay installed; a later failure never removes them)."""
    missing = missing_host_packages(ctx, tls)
    pkgs = sorted({pkg for _tool, pkg in missing})
    data: dict[str, Any] = {"packages": {"missing": pkgs, "tools": [tool for tool, _pkg in missing]}}
    if not missing:
        return Result(data, [], changed=False)
    if not ctx.runner.available("apt_get"):
        raise MissingTool(f"this host lacks {', '.join(t for t, _p in missing)} and has no apt-get to install them",
                          hint="install these (Debian names) with the host's package manager, then re-run: "
                               + " ".join(pkgs), details={"packages": pkgs})
    install = ["-y", "--no-install-recommends", *pkgs]
    plan = Plan("host packages")

    def run_apt() -> None:
        _apt_get(ctx, "update", [])
        _apt_get(ctx, "install", install)
    plan.add("apt.install", f"install Debian packages: {' '.join(pkgs)} (apt-get update, then apt-get install "
             f"{' '.join(install)}; not undone: the packages stay installed)", "apt", run_apt)
    if ctx.dry_run:
        return Result({**data, "dry_run": True, "plan": plan.as_list()}, plan.text(), changed=False)
    confirm(ctx, f"Install these Debian packages: {' '.join(pkgs)}?", "[Y] yes   [n] no", default_yes=True)
    import time
    step = plan.steps[0]
    ctx.out.progress(step.summary)
    t0 = time.monotonic()
    step.do()
    record = [{"step": step.id, "status": "done", "ms": int((time.monotonic() - t0) * 1000)}]
    still = missing_host_packages(ctx, tls)
    if still:
        raise MissingTool(f"after apt-get install, still missing: {', '.join(t for t, _p in still)}",
                          hint="check the [commands] entries for them in the config file, or install "
                               + " ".join(sorted({p for _t, p in still})) + " by hand",
                          details={"missing": [t for t, _p in still]})
    data["packages"]["installed"] = pkgs
    return Result({**data, "steps": record}, [f"installed Debian packages: {' '.join(pkgs)}"], changed=True)


# --- 8d.6 Quickstart ---

def op_quickstart(ctx: Context, name: str, domain: str, version: str, tls: str | None = None,
                  acme: Mapping[str, Any] | None = None) -> Result:
    """Host packages, init, version install --set-current, instance create: each part idempotent,
    so a re-run resumes. ACME: tls acme's flags, as for instance create (checked before apt runs)."""
    check_acme_flags(ctx, tls, acme)
    if not ctx.runner.available("systemctl"):
        raise MissingTool("systemctl is not installed", hint=INSTALL_HINTS["systemctl"])
    systemd_hint(ctx)
    source = tls or ctx.config.get("tls", "default_source")
    packages = op_host_packages(ctx, source)
    if ctx.dry_run:
        follow = [f"abssctl init{' --allow-create-user' if ctx.assume_yes else ''}",
                  f"abssctl version install {version} --set-current",
                  f"abssctl instance create {name} --domain {domain} --version current --tls {source}"
                  + _acme_argv_text(acme),
                  f"abssctl instance start {name}"]
        text = (packages.text if packages.data.get("plan") else ["host packages: nothing to install"]) + \
            ["then, each with its own plan (dry-run them one by one to see it):"] + [f"  {c}" for c in follow]
        return Result({"dry_run": True, "plan": packages.data.get("plan", []), "packages": packages.data["packages"],
                       "then": follow}, text, changed=False)
    parts: dict[str, Any] = {}
    parts["init"] = op_init(ctx, allow_create_user=ctx.assume_yes).changed
    _next_op(ctx)
    installed = op_version_install(ctx, version, set_current=True)
    parts["version"] = installed.data.get("version", {}).get("version")
    _next_op(ctx)
    created = op_instance_create(ctx, name, domain=domain, port=None, version="current", tls=tls, cert=None,
                                 key=None, chain=None, start=True, acme=acme)
    _next_op(ctx)
    started = op_instance_lifecycle(ctx, name, "start")      # a no-op when it already runs
    inst = dict(created.data.get("instance", {}), health=(started.data.get("instance") or {}).get("health")
                or created.data.get("instance", {}).get("health"))
    url = inst.get("url")
    text = packages.text + [f"{name} is up: {url} (TLS: {(inst.get('tls') or {}).get('source')})",
                            f"next: open {url} and set the server password",
                            f"      abssctl instance status {name} shows its health; abssctl backup create {name} "
                            "takes a backup"]
    return Result({"instance": inst, "version": parts["version"], "init_changed": parts["init"], "url": url,
                   "packages": packages.data["packages"]}, text,
                  changed=bool(packages.changed or parts["init"] or installed.changed or created.changed
                               or started.changed))


def _acme_argv_text(acme: Mapping[str, Any] | None) -> str:
    """The --email/--staging/--server of a dry-run's follow-up command line."""
    import shlex
    acme = acme or {}
    return "".join([f" --email {shlex.quote(acme['email'])}" if acme.get("email") else "",
                    " --staging" if acme.get("staging") else "",
                    f" --server {shlex.quote(acme['server'])}" if acme.get("server") else ""])


def _next_op(ctx: Context) -> None:
    """Each quickstart part is its own operation in the log, with its own op id."""
    ctx.op_id = new_op_id()
    ctx.started = utc_now()


# ============================================================================
# 8e. Operations: backups and restore
# ============================================================================

SQLITE_NAMES = LazyRegex(r"^(server-files/account\.sqlite|user-files/group-[^/]*\.sqlite)\Z")
SQLITE_SIDE = (".sqlite-wal", ".sqlite-shm", ".sqlite-journal")
ARCHIVE_EXT = {"zstd": ".tar.zst", "gzip": ".tar.gz", "none": ".tar"}
MANIFEST_SCHEMA = 1


class BlobChanged(Exception):
    """A file changed while it was read: the archive restarts."""


class HashingWriter:
    """A write-only file object over an fd that hashes what passes through."""

    def __init__(self, fd: int) -> None:
        import hashlib
        self.fd = fd
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        write_file(self.fd, data)
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        pass


class HashingReader:
    """A read-only file object that hashes what is read."""

    def __init__(self, f: Any) -> None:
        import hashlib
        self.f = f
        self.sha = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n if n and n > 0 else CHUNK)
        self.sha.update(data)
        return data

    def readinto(self, b: Any) -> int:
        n = self.f.readinto(b)
        self.sha.update(memoryview(b)[:n])
        return n

    def drain(self) -> None:
        buf = bytearray(CHUNK)
        while self.readinto(buf):
            pass


def backup_sidecar(archive: str) -> str:
    """<id>.tar.zst -> <id>.sha256."""
    return archive.rsplit(".tar", 1)[0] + ".sha256"


def new_backup_id(name: str, now: float) -> str:
    import time
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime(now)) + f"-{name}-{os.urandom(2).hex()}"


def compression_for(ctx: Context, wanted: str) -> str:
    if wanted == "auto":
        return "zstd" if ctx.runner.available("zstd") else "gzip"
    if wanted == "zstd" and not ctx.runner.available("zstd"):
        raise MissingTool("zstd is not installed", hint="apt-get install zstd, or pass --compression gzip")
    return wanted


def data_files(data_dir: str) -> tuple[list[str], int]:
    """Relative paths under data/ in archive order (.migrate, server-files, user-files, rest) and bytes."""
    found: list[str] = []
    total = 0
    for root, dirs, files in os.walk(data_dir):
        dirs.sort()
        for name in sorted(files):
            rel = os.path.relpath(os.path.join(root, name), data_dir)
            if rel.endswith(SQLITE_SIDE) or os.path.islink(os.path.join(root, name)):
                continue
            found.append(rel)
            total += os.lstat(os.path.join(root, name)).st_size

    def order(rel: str) -> tuple[int, str]:
        top = rel.split("/", 1)[0]
        return ({".migrate": 0, "server-files": 1, "user-files": 2}.get(top, 3), rel)
    return sorted(found, key=order), total


def sqlite_snapshot(src: str, dst: str, uri: str | None = None) -> None:
    """A consistent copy of a live database through SQLite's online-backup API, as one file
    (``uri`` opens the source another read-only way: instance import's source_db_uri)."""
    import sqlite3
    source = sqlite3.connect(uri or f"file:{src}?mode=ro", uri=True, timeout=30)
    try:
        target = sqlite3.connect(dst)
        try:
            # The copy is a temp file that lives until it is archived, and the archive is fsynced:
            # its own six fdatasyncs only made the stream wait (27 ms -> 3-9 ms for account.sqlite).
            target.execute("PRAGMA synchronous=OFF")
            source.backup(target)
            target.execute("PRAGMA journal_mode=DELETE")
        finally:
            target.close()
    finally:
        source.close()


def sqlite_integrity(path: str) -> str:
    """PRAGMA integrity_check of a database file opened read-only: "ok", or its first finding."""
    import sqlite3
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return str(db.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        db.close()


def read_migrations(path: str) -> list[str]:
    doc = read_json_file(path) if os.path.exists(path) else None
    items = (doc or {}).get("migrations", []) if isinstance(doc, dict) else []
    return [m["title"] for m in items if isinstance(m, dict) and isinstance(m.get("title"), str)
            and m.get("timestamp") is not None]


class BackupWriter:
    """Writes one instance's archive: snapshots, the tar stream, hashes, manifest (DESIGN §4.8.1)."""

    def __init__(self, ctx: Context, name: str, entry: Mapping[str, Any], compression: str, reason: str,
                 message: str | None, labels: Sequence[str]) -> None:
        self.ctx = ctx
        self.name = name
        self.entry = entry
        self.compression = compression
        self.reason = reason
        self.message = message
        self.labels = list(labels)
        self.now = utc_now()
        self.id = new_backup_id(name, self.now)
        self.dir = os.path.join(ctx.paths.backup_root, name)
        self.archive = os.path.join(self.dir, self.id + ARCHIVE_EXT[compression])
        self.tmp = os.path.join(self.dir, f".{self.id}{ARCHIVE_EXT[compression]}.abssctl-tmp-{ctx.op_id}")
        self.snap_dir = os.path.join(self.dir, f".abssctl-tmp-{ctx.op_id}")
        self.data_dir = os.path.join(ctx.paths.instance_dir(name), "data")
        self.done = 0
        self.total = 0
        self.started = 0.0

    def run(self) -> dict[str, Any]:
        import time
        ensure_dir(self.ctx.paths.backup_root, 0o700)
        ensure_dir(self.dir, 0o700)
        files, self.total = data_files(self.data_dir)
        free = disk_free(self.dir)
        if free < 1.1 * self.total:
            raise DiskFull(f"backup of {self.name} needs about {human_bytes(int(self.total * 1.1))}; "
                           f"{self.ctx.paths.backup_root} has {human_bytes(free)} free",
                           hint="free some space, or prune old backups: abssctl backup prune")
        self.started = time.monotonic()
        try:
            for attempt in range(3):
                try:
                    result = self._attempt(files)
                    break
                except BlobChanged as exc:
                    if attempt == 2:
                        raise ProviderError(f"the instance kept rewriting {exc}; retry later") from None
                    self.ctx.out.progress(f"backup {self.name}: {exc} changed while it was read; restarting")
                    files, self.total = data_files(self.data_dir)
        finally:
            for path in (self.tmp, self.snap_dir):
                if os.path.lexists(path):
                    remove_tree(path) if os.path.isdir(path) else os.unlink(path)
        return result

    def _progress(self, n: int) -> None:
        import time
        self.done += n
        spent = max(0.001, time.monotonic() - self.started)
        self.ctx.out.progress(f"[{elapsed(spent)}] backup {self.name}: {human_bytes(self.done)} / "
                              f"{human_bytes(self.total)}, {human_bytes(int(self.done / spent))}/s", tick=True)

    def _snapshots(self, files: Sequence[str]) -> tuple[Any, dict[str, Any]]:
        """Start SQLite snapshots on a worker thread; returns the pool and rel -> future."""
        from concurrent.futures import ThreadPoolExecutor
        if os.path.isdir(self.snap_dir):
            remove_tree(self.snap_dir)
        ensure_dir(self.snap_dir, 0o700)
        pool = ThreadPoolExecutor(max_workers=1)
        futures = {}
        for rel in files:
            if SQLITE_NAMES.match(rel):
                dst = os.path.join(self.snap_dir, rel.replace("/", "__"))
                futures[rel] = pool.submit(sqlite_snapshot, os.path.join(self.data_dir, rel), dst)
        return pool, futures

    def _attempt(self, files: Sequence[str]) -> dict[str, Any]:
        self.done = 0
        pool, futures = self._snapshots(files)
        listing: list[dict[str, Any]] = []
        try:
            fd = os.open(self.tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            try:
                digest, size = write_tar_stream(self.ctx, fd, self.compression,
                                                lambda tar: self._write(tar, files, futures, listing))
                os.fsync(fd)
            finally:
                os.close(fd)
        finally:
            pool.shutdown(wait=True)
            self._give_back_side_files(files)
        os.replace(self.tmp, self.archive)
        write_sidecar(os.path.join(self.dir, self.id + ".sha256"), self.archive, digest, 0o600, self.ctx.op_id)
        fsync_dir(self.dir)
        return self._index_entry(digest, size, listing)

    def _give_back_side_files(self, files: Sequence[str]) -> None:
        """Opening a live database read-only can create -wal/-shm files as root: return them."""
        try:
            st = os.stat(self.data_dir)
        except FileNotFoundError:
            return
        for rel in files:
            if SQLITE_NAMES.match(rel):
                for side in ("-wal", "-shm"):
                    path = os.path.join(self.data_dir, rel + side)
                    if os.path.exists(path) and os.stat(path).st_uid != st.st_uid:
                        os.chown(path, st.st_uid, st.st_gid)

    def _write(self, tar: Any, files: Sequence[str], futures: Mapping[str, Any],
               listing: list[dict[str, Any]]) -> None:
        import tarfile
        mtime = int(self.now)
        for rel in files:
            live = os.path.join(self.data_dir, rel)
            kind = "file"
            if rel in futures:
                futures[rel].result()
                live = os.path.join(self.snap_dir, rel.replace("/", "__"))
                kind = "sqlite"
            listing.append(self._add_file(tar, f"{self.id}/data/{rel}", live, f"data/{rel}", kind, mtime))
        cfg = self.ctx.paths
        extras = [("config/config.json", os.path.join(cfg.instance_dir(self.name), "config.json")),
                  (f"config/{unit_name(self.name)}", cfg.unit_file(self.name)),
                  (f"config/{vhost_name(self.name)}", cfg.vhost_file(self.name))]
        for rel, path in extras:
            if os.path.isfile(path):
                listing.append(self._add_file(tar, f"{self.id}/{rel}", path, rel, "config", mtime))
        entry_json = (json.dumps(self.entry, sort_keys=True, indent=2) + "\n").encode()
        listing.append(self._add_bytes(tar, f"{self.id}/config/instance.json", "config/instance.json",
                                       entry_json, mtime))
        manifest = self._manifest(listing)
        info = tarfile.TarInfo(f"{self.id}/manifest.json")
        data = (json.dumps(manifest, sort_keys=True, indent=2) + "\n").encode()
        info.size, info.mtime, info.mode = len(data), mtime, 0o600
        import io
        tar.addfile(info, io.BytesIO(data))
        self.manifest = manifest

    def _add_file(self, tar: Any, arcname: str, path: str, rel: str, kind: str, mtime: int) -> dict[str, Any]:
        import tarfile
        import hashlib
        sha = hashlib.sha256()

        def seen(chunk: Any) -> None:
            sha.update(chunk)
            self._progress(len(chunk))
        with open(path, "rb", buffering=0) as f:
            before = os.fstat(f.fileno())
            info = tarfile.TarInfo(arcname)
            info.size, info.mtime, info.mode = before.st_size, mtime, 0o640
            try:
                tar.addfile(info, f, seen)
            except OSError:
                if os.fstat(f.fileno()).st_size < before.st_size:
                    raise BlobChanged(rel) from None
                raise
            after = os.fstat(f.fileno())
        if kind == "file" and (after.st_size != before.st_size or after.st_mtime_ns != before.st_mtime_ns):
            raise BlobChanged(rel)
        return {"path": rel, "size": before.st_size, "sha256": sha.hexdigest(), "kind": kind}

    def _add_bytes(self, tar: Any, arcname: str, rel: str, data: bytes, mtime: int) -> dict[str, Any]:
        import hashlib
        import io
        import tarfile
        info = tarfile.TarInfo(arcname)
        info.size, info.mtime, info.mode = len(data), mtime, 0o640
        tar.addfile(info, io.BytesIO(data))
        return {"path": rel, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "kind": "config"}

    def _manifest(self, listing: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        versions = Versions(self.ctx)
        version = str(self.entry.get("resolved_version") or "")
        node = ((versions.doc["versions"].get(version) or {}).get("node") or {})
        tls = dict(self.entry.get("tls") or {})
        cert = tls.get("cert")
        tls["cert_sha256"] = sha256_file(cert) if cert and os.path.isfile(cert) else None
        data_bytes = sum(f["size"] for f in listing if f["path"].startswith("data/"))
        return {"schema_version": MANIFEST_SCHEMA, "id": self.id, "instance": self.name,
                "created_at": rfc3339(self.now), "abssctl_version": __version__, "server_version": version,
                "version_binding": self.entry.get("version"), "node_abi": node.get("abi"),
                "migrations": read_migrations(os.path.join(self.data_dir, ".migrate")),
                "domain": self.entry.get("domain"), "port": self.entry.get("port"), "tls": tls,
                "reason": self.reason, "message": self.message, "labels": self.labels,
                "sqlite_method": "online-backup", "files": list(listing),
                "totals": {"files": len(listing), "bytes": data_bytes}}

    def _index_entry(self, digest: str, size: int, listing: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        m = self.manifest
        return {"id": self.id, "instance": self.name, "created_at": m["created_at"],
                "archive": os.path.relpath(self.archive, self.ctx.paths.backup_root),
                "compression": self.compression, "size_bytes": size, "sha256": digest,
                "server_version": m["server_version"], "reason": self.reason, "message": self.message,
                "labels": self.labels, "files": len(listing), "data_bytes": m["totals"]["bytes"],
                "migrations": m["migrations"], "domain": m["domain"], "port": m["port"],
                "status": "ok", "verified_at": None, "op_id": self.ctx.op_id}


def record_backup(ctx: Context, name: str, entry: Mapping[str, Any]) -> None:
    """Add the index entry (under backups.lock) and the instance's last_backup_id."""
    with ctx.registry("backups").edit(ctx.op_id) as doc:
        doc["backups"][entry["id"]] = dict(entry)
    reg = ctx.registry("instances")
    with reg.edit(ctx.op_id) as doc:
        if name in doc["instances"]:
            doc["instances"][name]["last_backup_id"] = entry["id"]


def backup_step(ctx: Context, plan: Plan, step_id: str, summary: str, name: str, made: dict[str, Any], *,
                reason: str, message: str | None = None, labels: Sequence[str] = (),
                compression: str = "auto", then: Callable[[dict[str, Any]], None] | None = None) -> None:
    """One backup of an instance as a plan step (backup create and every safety backup): ``made``
    gets its index entry, and ``then`` is called with it inside the step. The undo removes what the
    step left half-made (temp archive, snapshot dir, an archive not yet indexed) and a finished manual
    backup; a finished safety backup is kept, as the rollback of its operation may restore from it."""
    method = compression_for(ctx, compression)
    previous = (Instances(ctx).doc["instances"].get(name) or {}).get("last_backup_id")
    undo = UndoAction("discard_backup", instance=name, id=None, tmp=None, archive=None,
                      snap_dir=os.path.join(ctx.paths.backup_root, name, f".abssctl-tmp-{ctx.op_id}"),
                      keep=reason != "manual", last_backup_id=previous)

    def do() -> None:
        writer = BackupWriter(ctx, name, Instances(ctx).get(name), method, reason, message, labels)
        undo.args.update(id=writer.id, tmp=writer.tmp, archive=writer.archive)
        if ctx.journal is not None:
            ctx.journal.write()             # the names reach the journal before the files exist
        result = writer.run()
        record_backup(ctx, name, result)
        ctx.out.progress(f"backup {name}: {result['id']} ({human_bytes(result['size_bytes'])})")
        made.update(result)
        if then is not None:
            then(result)
    plan.add(step_id, summary, name, do, undo)


def _undo_discard_backup(ctx: Context, args: Mapping[str, Any]) -> None:
    """Undo of backup_step: temp files go; the archive, its sidecar and index entry go unless kept."""
    for path in (args.get("tmp"), args.get("snap_dir")):
        if path and os.path.isdir(path) and not os.path.islink(path):
            remove_tree(path)
        elif path and os.path.lexists(path):
            os.unlink(path)
    backup_id, archive = args.get("id"), args.get("archive")
    if not backup_id or not archive:
        return
    reg = ctx.registry("backups")
    if os.path.exists(reg.path) and backup_id in reg.load()["backups"]:
        if args.get("keep"):
            return
        with reg.edit(ctx.op_id) as doc:
            doc["backups"].pop(backup_id, None)
    insts = ctx.registry("instances")
    if (insts.load()["instances"].get(args["instance"]) or {}).get("last_backup_id") == backup_id:
        with insts.edit(ctx.op_id) as doc:
            doc["instances"][args["instance"]]["last_backup_id"] = args.get("last_backup_id")
    gone = [path for path in (archive, backup_sidecar(archive)) if os.path.lexists(path)]
    for path in gone:
        os.unlink(path)
    if gone:
        fsync_dir(os.path.dirname(archive))


def _backup_output(ctx: Context, entry: Mapping[str, Any]) -> dict[str, Any]:
    keys = ("id", "instance", "compression", "size_bytes", "sha256", "files", "data_bytes",
            "server_version", "reason", "created_at", "status", "message", "labels")
    out = {k: entry.get(k) for k in keys}
    out["archive"] = os.path.join(ctx.paths.backup_root, str(entry.get("archive")))
    return out


DURATION = LazyRegex(r"^([0-9]{1,6})([smhdw])\Z")
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str, flag: str) -> float:
    """'90s', '30m', '24h', '7d', '2w' -> seconds (at least 1); anything else is a UsageError."""
    m = DURATION.match(text.strip())
    if not m or int(m.group(1)) < 1:
        raise UsageError(f"{flag}: {text!r} is not a duration", hint="a whole number and a unit, one of s m h d w: "
                         "e.g. 90m, 24h or 7d")
    return float(int(m.group(1)) * DURATION_UNITS[m.group(2)])


def newest_good_backup(ctx: Context, name: str) -> dict[str, Any] | None:
    """NAME's newest backup whose archive the index calls good (ok or adopted), or None."""
    if not os.path.exists(ctx.paths.backup_index):
        return None
    index = ctx.registry("backups").load()["backups"]
    good = [b for b in index.values() if isinstance(b, dict) and b.get("instance") == name
            and b.get("status") in ("ok", "adopted")]
    return max(good, key=lambda b: str(b.get("created_at")), default=None)


def op_backup_create(ctx: Context, names: Sequence[str], *, message: str | None, labels: Sequence[str],
                     compression: str, if_older_than: float | None = None) -> Result:
    """Back up each instance in turn; one failure does not stop the others; exit is the worst. With
    IF_OLDER_THAN (seconds), an instance whose newest good backup is younger is left alone (changed
    false), so a configuration tool can run it every time."""
    import time
    insts = Instances(ctx)
    for name in names:
        insts.get(name)
    compression_for(ctx, compression)
    results: list[dict[str, Any]] = []
    worst: AbssctlError | None = None
    fresh: dict[str, dict[str, Any]] = {}
    if if_older_than is not None:
        for name in names:
            newest = newest_good_backup(ctx, name)
            if newest and time.time() - _parse_ts(str(newest.get("created_at"))) < if_older_than:
                fresh[name] = newest
    if fresh and len(fresh) == len(names):
        rows = [{"instance": n, "newest": b.get("id"), "newest_at": b.get("created_at")} for n, b in sorted(fresh.items())]
        data: dict[str, Any] = {"skipped": rows}
        if ctx.dry_run:
            data.update(dry_run=True, plan=[])
        return Result(data, [f"{r['instance']}: newest backup {r['newest']} ({r['newest_at']}) is recent enough; "
                             "nothing to do" for r in rows], changed=False)
    for name in names:
        if name in fresh:
            results.append({"ok": True, "skipped": True, "instance": name, "newest": fresh[name].get("id")})
            continue
        made: dict[str, Any] = {}

        def build(name: str = name, made: dict[str, Any] = made) -> Plan:
            plan = Plan(f"back up {name}")
            backup_step(ctx, plan, "backup.write",
                        f"snapshot and archive {name} into {ctx.paths.backup_root}/{name}/", name, made,
                        reason="manual", message=message, labels=labels, compression=compression)
            return plan
        try:
            res = run_mutation(ctx, Mutation(title=f"backup {name}", build=build, instances=[name],
                                             target={"kind": "instance", "name": name},
                                             args={"name": name, "message": message, "labels": list(labels)}))
            if ctx.dry_run:
                return res
            results.append({"ok": True, "backup": _backup_output(ctx, made)})
        except AbssctlError as exc:
            if len(names) == 1:
                raise
            worst = exc if worst is None or exc.exit_code > worst.exit_code else worst
            results.append({"ok": False, "instance": name, "error": error_doc(exc)})
        _next_op(ctx)
    if len(names) == 1:
        backup = results[0]["backup"]
        return Result({"backup": backup, "op_id": ctx.op_id}, [f"{backup['id']}: {backup['archive']} "
                                                              f"({human_bytes(backup['size_bytes'])})"],
                      changed=True)
    text = [f"{r['instance']}: recent enough ({r['newest']})" if r.get("skipped") else f"{r['backup']['id']}: ok"
            if r["ok"] else f"{r['instance']}: {r['error']['message']}" for r in results]
    result = Result({"results": results}, text, changed=any(r["ok"] and not r.get("skipped") for r in results))
    if worst is not None:
        result.ok = False
        result.error = worst
    return result


def op_backup_list(ctx: Context, instance: str | None, copies: bool = False) -> Result:
    index = ctx.registry("backups").load()["backups"]
    rows = [b for b in index.values() if isinstance(b, dict) and (instance is None or b.get("instance") == instance)]
    rows.sort(key=lambda b: (str(b.get("created_at")), str(b.get("id"))), reverse=True)
    if copies:                      # section 8i: verified, unverified, missing or none
        rows = [dict(b, copy_state=copy_state(b)) for b in rows]
    heads = ("ID", "INSTANCE", "CREATED", "SIZE", "REASON", "STATUS", "MESSAGE") + (("COPY",) if copies else ())
    text = table(heads, [(b.get("id"), b.get("instance"), b.get("created_at"), human_bytes(int(b.get("size_bytes") or 0)),
                          b.get("reason"), b.get("status"), b.get("message"))
                         + ((b["copy_state"],) if copies else ()) for b in rows]) if rows \
        else ["no backups yet; take one with: abssctl backup create NAME"]
    return Result({"backups": rows}, text)


# --- 8e.1 Reading archives back: scan, verify, show ---

def _backup_entry(ctx: Context, backup_id: str) -> dict[str, Any]:
    entry = ctx.registry("backups").load()["backups"].get(backup_id)
    if not isinstance(entry, dict):
        raise NotFound(f"no backup {backup_id}", hint="see abssctl backup list (or backup reconcile for copied files)")
    return entry


def archive_path(ctx: Context, entry: Mapping[str, Any]) -> str:
    """The absolute archive path of an index entry, kept under backup_root."""
    rel = str(entry.get("archive") or "")
    path = os.path.realpath(os.path.join(ctx.paths.backup_root, rel))
    if not path.startswith(os.path.realpath(ctx.paths.backup_root) + "/"):
        raise CorruptState(f"the index entry {entry.get('id')} points outside {ctx.paths.backup_root}")
    return path


class ArchiveScan:
    """One pass over an archive: its sha256, and every member hashed or extracted (DESIGN §4.8.3/§4.8.6)."""

    def __init__(self, ctx: Context, path: str) -> None:
        self.ctx = ctx
        self.path = path
        self.sha256 = ""
        self.manifest: dict[str, Any] | None = None

    def run(self, consume: Callable[[Any, Iterator[Any]], None]) -> None:
        """Hand ``consume(tar, members)`` every member but the manifest; the file is hashed on the way."""
        import threading
        with open(self.path, "rb", buffering=0) as raw:
            magic = raw.read(4)
            raw.seek(0)
            reader = HashingReader(raw)
            if magic != ZSTD_MAGIC:
                if magic[:2] == GZIP_MAGIC:
                    import gzip
                    self._consume(gzip.GzipFile(fileobj=reader, mode="rb").readinto, consume)
                else:
                    self._consume(reader.readinto, consume)
                reader.drain()
                self.sha256 = reader.sha.hexdigest()
                return
            proc = self.ctx.runner.popen("zstd", ["-d", "-q", "-c"], stdin="pipe", stdout="pipe")
            into, out = proc.stdin.fileno(), proc.stdout.fileno()
            widen_pipe(into)
            widen_pipe(out)

            def feed() -> None:
                view = memoryview(bytearray(CHUNK))
                try:
                    while n := reader.readinto(view):
                        write_all(into, view[:n])
                except OSError:
                    pass
                finally:
                    try:
                        proc.stdin.close()
                    except OSError:
                        pass
            feeder = threading.Thread(target=feed, daemon=True)
            feeder.start()
            try:
                self._consume(fd_reader(out), consume)
                drain = memoryview(bytearray(CHUNK))
                while os.readv(out, [drain]):
                    pass
                feeder.join(timeout=600)
                rc = proc.wait(timeout=60)
            finally:
                stop_process(proc, grace=2)
            if rc != 0:
                raise CorruptState(f"{self.path} does not decompress (zstd exited {rc})",
                                   hint="use another copy of this backup")
            self.sha256 = reader.sha.hexdigest()

    def _consume(self, read_into: Callable[[memoryview], int], consume: Callable[[Any, Iterator[Any]], None]) -> None:
        try:
            tar = open_tar_reader(read_into)
            consume(tar, self._members(tar))
        except archive_errors() as exc:
            raise CorruptState(f"{self.path} is damaged or truncated ({exc})",
                               hint="use another copy of this backup") from None

    def _members(self, tar: Any) -> Iterator[Any]:
        for member in tar:
            if member.name.endswith("/manifest.json") and member.name.count("/") == 1 and member.isreg():
                if member.size > (64 << 20):
                    raise CorruptState(f"{self.path}: manifest.json is implausibly large")
                try:
                    self.manifest = json.loads(tar.extractfile(member).read())
                except ValueError:
                    raise CorruptState(f"{self.path}: manifest.json is not valid JSON") from None
                continue
            yield member

    def check_manifest(self, got: Mapping[str, str], backup_id: str) -> None:
        m = self.manifest
        if not isinstance(m, dict) or m.get("id") != backup_id:
            raise CorruptState(f"{self.path} has no manifest for {backup_id} (truncated, or not an abssctl backup)")
        want = {f["path"]: f["sha256"] for f in m.get("files", []) if isinstance(f, dict)}
        if set(want) != set(got):
            missing = sorted(set(want) ^ set(got))
            raise CorruptState(f"{self.path}: members and manifest disagree (e.g. {missing[0]})")
        bad = sorted(p for p in want if want[p] != got[p])
        if bad:
            raise ChecksumMismatch(f"{self.path}: {bad[0]} does not match its manifest sha256",
                                   hint="the archive is damaged; use another backup")


def archive_errors() -> tuple[type, ...]:
    """What reading a damaged .tar, .tar.gz or .tar.zst stream can raise."""
    import gzip
    import tarfile
    import zlib
    return tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile


def verify_backup(ctx: Context, entry: dict[str, Any], deep: bool) -> dict[str, Any]:
    """Checks of one backup; raises ChecksumMismatch/CorruptState (exit 3) after noting the status."""
    path = archive_path(ctx, entry)
    checks: dict[str, Any] = {"archive_sha256": None, "manifest": None, "files": None, "sqlite": {}}
    if not os.path.isfile(path):
        _set_backup_status(ctx, entry["id"], "missing")
        raise HostError(f"the archive of {entry['id']} is missing: {path}",
                        hint="run abssctl backup reconcile --apply to mark it", details={"checks": checks})
    recorded = read_sidecar(backup_sidecar(path))
    scan = ArchiveScan(ctx, path)
    got: dict[str, str] = {}
    tmp = os.path.join(ctx.paths.backup_root, f".abssctl-tmp-{ctx.op_id}")
    try:
        if deep:
            ensure_dir(tmp, 0o700)
            got.update(extract_backup(scan, entry, tmp))
        else:
            digest = sha256_file(path)
            scan.sha256 = digest
        ok = scan.sha256 == entry.get("sha256") and recorded in (None, scan.sha256)
        checks["archive_sha256"] = "ok" if ok else "mismatch"
        if not ok:
            _set_backup_status(ctx, entry["id"], "corrupt")
            raise ChecksumMismatch(f"{entry['id']}: the archive sha256 does not match the index or sidecar",
                                   hint="the archive is damaged; use another backup", details={"checks": checks})
        if deep:
            scan.check_manifest(got, entry["id"])
            checks["manifest"] = checks["files"] = "ok"
            for rel in sorted(got):
                if rel.endswith(".sqlite"):
                    result = sqlite_integrity(os.path.join(tmp, rel))
                    checks["sqlite"][rel] = result
                    if result != "ok":
                        raise ChecksumMismatch(f"{entry['id']}: {rel} fails integrity_check ({result})")
            read_migrations(os.path.join(tmp, "data", ".migrate"))
    except (ChecksumMismatch, CorruptState) as exc:
        _set_backup_status(ctx, entry["id"], "corrupt")
        exc.details.setdefault("checks", checks)
        raise
    finally:
        if os.path.isdir(tmp):
            remove_tree(tmp)
    _set_backup_status(ctx, entry["id"], "ok" if entry.get("status") != "adopted" else "adopted",
                       verified=True)
    return {"id": entry["id"], "status": "ok", "checks": checks}


def extract_backup(scan: ArchiveScan, entry: Mapping[str, Any], dest: str, *, uid: int = -1,
                   gid: int = -1) -> dict[str, str]:
    """Stream-extract a backup into ``dest`` with safe_extract's rules; rel path -> sha256."""
    sums: dict[str, str] = {}
    limit = int(int(entry.get("data_bytes") or 0) * 1.1) + (64 << 20)

    def consume(tar: Any, members: Iterator[Any]) -> None:
        sums.update(safe_extract(members, dest, prefix=f"{entry['id']}/", expected=None, max_bytes=limit,
                                 allow_symlinks=False, source=tar, dir_mode=0o750, file_mode=0o640,
                                 uid=uid, gid=gid).sums)
    scan.run(consume)
    scan.check_manifest(sums, str(entry["id"]))
    return sums


def _set_backup_status(ctx: Context, backup_id: str, status: str, verified: bool = False) -> None:
    with ctx.registry("backups").edit(ctx.op_id) as doc:
        entry = doc["backups"].get(backup_id)
        if isinstance(entry, dict):
            entry["status"] = status
            if verified:
                entry["verified_at"] = _now()


def op_backup_show(ctx: Context, backup_id: str) -> Result:
    entry = _backup_entry(ctx, backup_id)
    path = archive_path(ctx, entry)
    summary = None
    if os.path.isfile(path):
        scan = ArchiveScan(ctx, path)
        scan.run(lambda tar, members: [None for _m in members] and None)
        m = scan.manifest or {}
        summary = {k: m.get(k) for k in ("server_version", "version_binding", "node_abi", "domain", "port",
                                         "migrations", "totals", "sqlite_method", "abssctl_version")}
        summary["files"] = [{"path": f.get("path"), "size": f.get("size"), "kind": f.get("kind")}
                            for f in m.get("files", []) if isinstance(f, dict)]
    out = dict(entry, archive=path, manifest=summary)
    text = [f"{k}: {v}" for k, v in sorted(entry.items()) if k != "migrations"]
    if summary:
        text.append(f"manifest: {summary['totals']} on {summary['server_version']}")
    return Result({"backup": out}, text)


def op_backup_verify(ctx: Context, backup_id: str | None, *, deep: bool) -> Result:
    index = ctx.registry("backups").load()["backups"]
    ids = [backup_id] if backup_id else sorted(index)
    if backup_id:
        _backup_entry(ctx, backup_id)
    results, worst = [], None
    for bid in ids:
        try:
            results.append(verify_backup(ctx, dict(index[bid]), deep))
        except AbssctlError as exc:
            results.append({"id": bid, "status": "missing" if "missing" in exc.message else "corrupt",
                            "checks": exc.details.get("checks"), "error": exc.message})
            worst = exc if worst is None or exc.exit_code > worst.exit_code else worst
    text = [f"{r['id']}: {r['status']}" + (f" ({r['error']})" if r.get("error") else "") for r in results]
    if worst is not None and len(ids) == 1:
        raise worst
    result = Result({"results": results}, text)
    if worst is not None:
        result.ok, result.error = False, worst
    return result


# --- 8e.2 Retention and the index: prune, reconcile, adopt ---

def op_backup_prune(ctx: Context, instance: str | None, *, keep: int | None, older_than: int | None) -> Result:
    """Drop old ok backups per instance; never the newest ok one, one labelled keep, or a journaled one."""
    import time
    if keep is None and older_than is None:
        keep = int(ctx.config.get("backups", "keep"))
    live = json.dumps([d for _p, d in list_journals(ctx.paths.journal_dir)])

    def doomed() -> list[dict[str, Any]]:
        index = ctx.registry("backups").load()["backups"]
        by_instance: dict[str, list[dict[str, Any]]] = {}
        for b in index.values():
            if isinstance(b, dict) and (instance is None or b.get("instance") == instance):
                by_instance.setdefault(str(b.get("instance")), []).append(b)
        gone = []
        for items in by_instance.values():
            ok = sorted((b for b in items if b.get("status") in ("ok", "adopted")),
                        key=lambda b: str(b.get("created_at")), reverse=True)
            protected = {ok[0]["id"]} if ok else set()
            for n, b in enumerate(ok):
                if b["id"] in protected or "keep" in (b.get("labels") or []) or b["id"] in live:
                    continue
                age_days = (time.time() - _parse_ts(str(b.get("created_at")))) / 86400
                if (keep is not None and n >= keep) or (older_than is not None and age_days > older_than):
                    gone.append(b)
        return sorted(gone, key=lambda b: str(b.get("created_at")))

    def build() -> Plan:
        plan = Plan("prune backups")
        for b in doomed():
            path = archive_path(ctx, b)
            sidecar = backup_sidecar(path)

            def drop(b: Mapping[str, Any] = b, path: str = path, sidecar: str = sidecar) -> None:
                with ctx.registry("backups").edit(ctx.op_id) as doc:
                    doc["backups"].pop(b["id"], None)
                for p in (path, sidecar):
                    if os.path.lexists(p):
                        os.unlink(p)
            plan.add("backup.remove", f"remove {b['id']} ({b.get('reason')}, {b.get('created_at')}, "
                                      f"{human_bytes(int(b.get('size_bytes') or 0))})", path, drop)
        return plan

    def ask(plan: Plan) -> None:
        confirm(ctx, "Remove these backups?\n" + "\n".join(f"  {s.summary}" for s in plan.steps))

    return run_mutation(ctx, Mutation(title="prune", build=build, global_mode="exclusive", confirm=ask,
                                      target={"kind": "backups", "name": instance},
                                      args={"instance": instance, "keep": keep, "older_than": older_than},
                                      outcome=lambda _x: [f"pruned old backups in {ctx.paths.backup_root}; "
                                                          "abssctl backup list shows what is kept"]))


def _parse_ts(text: str) -> float:
    import calendar
    import time
    try:
        return float(calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%SZ")))
    except ValueError:
        return 0.0


ARCHIVE_NAME_RE = LazyRegex(r"^(\d{8}-\d{6}-[a-z][a-z0-9-]{0,31}-[0-9a-f]{4})\.tar(\.zst|\.gz)?\Z")


def op_backup_reconcile(ctx: Context, *, apply_changes: bool) -> Result:
    """Report index entries without files, files without entries, and stale temp files; --apply fixes."""
    import time
    root = ctx.paths.backup_root
    index = ctx.registry("backups").load()["backups"]
    missing = sorted(b for b, e in index.items() if isinstance(e, dict) and e.get("status") != "missing"
                     and not os.path.isfile(archive_path(ctx, e)))
    orphans, leftovers = [], []
    live = json.dumps([d for _p, d in list_journals(ctx.paths.journal_dir)])
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        sub = os.path.join(root, name)
        if not os.path.isdir(sub) or name.startswith("."):
            if name.startswith(".abssctl-tmp-"):
                leftovers.append(sub)
            continue
        for fname in sorted(os.listdir(sub)):
            m = ARCHIVE_NAME_RE.match(fname)
            path = os.path.join(sub, fname)
            if m and m.group(1) not in index:
                orphans.append(path)
            elif ".abssctl-tmp-" in fname and time.time() - os.lstat(path).st_mtime > 3600 \
                    and fname.rsplit(".abssctl-tmp-", 1)[-1] not in live:
                leftovers.append(path)
    report = {"missing": missing, "orphans": orphans, "leftovers": leftovers}
    if not apply_changes:
        text = [f"missing: {len(missing)}", *[f"  {m}" for m in missing], f"orphans: {len(orphans)}",
                *[f"  {o}" for o in orphans], f"leftovers: {len(leftovers)}", *[f"  {x}" for x in leftovers]]
        if missing or orphans or leftovers:
            text.append("run abssctl backup reconcile --apply to fix these")
        return Result(report, text)

    def build() -> Plan:
        plan = Plan("reconcile backups")
        for bid in missing:
            plan.add("index.missing", f"mark {bid} missing", bid,
                     lambda bid=bid: _set_backup_status(ctx, bid, "missing"))
        for path in orphans:
            plan.add("index.adopt", f"adopt {path}", path, lambda path=path: adopt_archive(ctx, path))
        for path in leftovers:
            plan.add("fs.leftover", f"remove {path}", path, lambda path=path: remove_tree(path))
        return plan

    result = run_mutation(ctx, Mutation(title="reconcile", build=build, global_mode="exclusive",
                                        target={"kind": "backups"}, args={"apply": True},
                                        outcome=lambda _x: [f"the backup index {ctx.paths.backup_index} now matches "
                                                            "the files; abssctl backup list shows it"]))
    result.data.update(report)
    return result


def adopt_archive(ctx: Context, path: str) -> None:
    """Index a copied archive after checking every member against its manifest (adopted or corrupt)."""
    m = ARCHIVE_NAME_RE.match(os.path.basename(path))
    assert m is not None
    backup_id = m.group(1)
    scan = ArchiveScan(ctx, path)
    sums: dict[str, str] = {}
    status = "adopted"

    def consume(tar: Any, members: Iterator[Any]) -> None:
        import hashlib
        for member in members:
            if member.isreg():
                h = hashlib.sha256()
                src = tar.extractfile(member)
                while chunk := src.read(CHUNK):
                    h.update(chunk)
                sums[member.name[len(backup_id) + 1:]] = h.hexdigest()
    try:
        scan.run(consume)
        scan.check_manifest(sums, backup_id)
    except (CorruptState, ChecksumMismatch):
        status = "corrupt"
    sidecar = backup_sidecar(path)
    recorded = read_sidecar(sidecar)
    if recorded is None:
        write_sidecar(sidecar, path, scan.sha256, 0o600, ctx.op_id)
    elif recorded != scan.sha256:
        status = "corrupt"
    man = scan.manifest or {}
    name = os.path.basename(os.path.dirname(path))
    entry = {"id": backup_id, "instance": name, "created_at": man.get("created_at"),
             "archive": os.path.relpath(path, ctx.paths.backup_root),
             "compression": "zstd" if path.endswith(".zst") else "gzip" if path.endswith(".gz") else "none",
             "size_bytes": os.path.getsize(path), "sha256": scan.sha256, "server_version": man.get("server_version"),
             "reason": man.get("reason", "manual"), "message": man.get("message"), "labels": man.get("labels", []),
             "files": len(man.get("files", [])), "data_bytes": (man.get("totals") or {}).get("bytes"),
             "migrations": man.get("migrations", []), "domain": man.get("domain"), "port": man.get("port"),
             "status": status, "verified_at": _now(), "op_id": ctx.op_id}
    with ctx.registry("backups").edit(ctx.op_id) as doc:
        doc["backups"][backup_id] = entry


# --- 8e.3 Restore ---

def _check_restorable(ctx: Context, entry: Mapping[str, Any], version: str) -> None:
    """Every migration the backup's data went through must be known to the target version."""
    known = set((Versions(ctx).doc["versions"].get(version) or {}).get("migrations") or [])
    unknown = [t for t in entry.get("migrations") or [] if t not in known]
    if unknown:
        raise UsageError(f"backup {entry['id']} was taken on {entry.get('server_version')}; {entry['instance']} "
                         f"runs {version}, which cannot load data migrated by {entry.get('server_version')}",
                         hint=f"run abssctl instance set-version {entry['instance']} {entry.get('server_version')} "
                              "first, or pick an older backup", details={"unknown_migrations": unknown})


def _undo_data_swap(ctx: Context, args: Mapping[str, Any]) -> None:
    """Put the pre-restore data back; the restored copy goes to a trash name, then away."""
    live, aside, trash = args["live"], args["aside"], args["trash"]
    if os.path.isdir(aside):
        if os.path.isdir(live):
            os.rename(live, trash)
        os.rename(aside, live)
    if os.path.isdir(trash):
        remove_tree(trash)


def op_backup_restore(ctx: Context, backup_id: str, *, instance: str | None, pre_backup: bool,
                      message: str | None) -> Result:
    entry = _backup_entry(ctx, backup_id)
    target = instance or str(entry["instance"])
    archive = archive_path(ctx, entry)
    if not os.path.isfile(archive) and copy_archive_of(entry):
        ctx.out.progress(f"the local archive of {backup_id} is gone; restoring from its copy {entry['copy']['path']}")
        archive = copy_archive_of(entry) or archive
    if not os.path.isfile(archive):
        raise NotFound(f"the archive of {backup_id} is missing: {archive}", hint="run abssctl backup reconcile")
    insts = Instances(ctx)
    if target not in insts.doc["instances"]:
        if target != entry["instance"]:
            raise NotFound(f"no instance named {target!r}",
                           hint="to clone a backup into another name, create that instance first")
        _recreate_for_restore(ctx, entry)
        _next_op(ctx)
        insts = Instances(ctx)
    inst = insts.get(target)
    version = str(inst["resolved_version"])
    _check_restorable(ctx, entry, version)
    root = ctx.paths.instance_dir(target)
    need = int(int(entry.get("data_bytes") or 0) * 1.1)
    if disk_free(root) < need:
        raise DiskFull(f"restoring {backup_id} needs {human_bytes(need)} free under {root}")
    gate: dict[str, Any] = {}
    made: dict[str, Any] = {}

    def build() -> Plan:
        plan = Plan(f"restore {backup_id} into {target}")
        current = Instances(ctx).get(target)
        paths = instance_paths(ctx, target)
        staging = os.path.join(root, f".abssctl-tmp-{ctx.op_id}")
        live, aside = paths["data"], os.path.join(root, f"data.pre-restore-{ctx.op_id}")
        active = _is_active(_unit_state(ctx, target))
        own = bool(current.get("user"))

        def stage() -> None:
            uid, gid = account_ids(*run_as(ctx, current))
            ensure_dir(staging, 0o750)
            ctx.out.progress(f"verifying and staging {backup_id}")
            scan = ArchiveScan(ctx, archive)
            extract_backup(scan, entry, staging, uid=uid, gid=gid)
            os.chown(staging, uid, gid)          # only now: see safe_extract
            if own and os.path.isdir(os.path.join(staging, "data")):
                os.chmod(os.path.join(staging, "data"), 0o700)
            if scan.sha256 != entry.get("sha256"):
                raise ChecksumMismatch(f"{backup_id}: the archive sha256 does not match the index",
                                       hint="the archive is damaged; use another backup")
            if not os.path.isdir(os.path.join(staging, "data")):
                raise CorruptState(f"{backup_id} holds no data directory")
        plan.add("restore.stage", f"verify {archive} and stage it in {staging}", staging, stage,
                 UndoAction("remove_tree", path=staging))
        if active:
            _systemctl_step(ctx, plan, "stop", unit_name(target), "start")
        if pre_backup:
            backup_step(ctx, plan, "backup.pre-restore", f"take a cold pre-restore backup of {target}", target,
                        made, reason="pre-restore", message=message)
        trash = os.path.join(root, f".trash-data-{ctx.op_id}")

        def swap() -> None:
            os.rename(live, aside)
            os.rename(os.path.join(staging, "data"), live)
        plan.add("data.swap", f"move {live} aside to {aside} and the restored data in", live, swap,
                 UndoAction("data_swap", live=live, aside=aside, trash=trash))
        cuid, cgid = config_ids(ctx, current)
        _file_step(ctx, plan, "config.write", paths["config"], server_config(root, int(current["port"])), 0o640,
                   cgid, f"rewrite {paths['config']}", cuid)
        _unit_step(ctx, plan, target, render_unit(ctx, target, int(current["port"]), version, Versions(ctx),
                                                     run_as(ctx, current)),
                   f"rewrite {paths['unit']}")
        if active:
            _start_and_gate_step(ctx, plan, target, int(current["port"]), version, gate)
        _registry_step(ctx, plan, Instances(ctx).registry, target,
                       dict(current, data_version=entry.get("server_version") or version,
                            last_restore={"backup_id": backup_id, "at": _now()}, updated_at=_now()),
                       f"record the restore of {backup_id}")
        index = ctx.registry("backups")
        indexed = index.load()["backups"].get(backup_id)
        if indexed:
            _registry_step(ctx, plan, index, backup_id, dict(indexed, last_restored_at=_now()),
                           f"record the restore in the index entry of {backup_id}")
        plan.cleanup("restore.cleanup", f"remove the staging dir {staging}", staging,
                     UndoAction("remove_tree", path=staging))
        if pre_backup:        # the pre-restore backup holds the old data; without one it is kept
            plan.cleanup("restore.drop-old-data", f"delete the old data {aside}", aside,
                         UndoAction("discard_dir", path=aside))
        return plan

    def ask(_plan: Plan) -> None:
        way_back = "A pre-restore backup is taken first." if pre_backup else \
            f"No pre-restore backup: the current data is kept in {root}/data.pre-restore-<op id>."
        confirm(ctx, f"Restore backup {backup_id} ({entry.get('created_at')}, {entry.get('server_version')}) "
                     f"into '{target}'? Its current data is replaced.\n{way_back}",
                "[y] yes, restore   [N] no")

    result = run_mutation(ctx, Mutation(title=f"restore {target}", build=build, instances=[target], confirm=ask,
                                        target={"kind": "instance", "name": target},
                                        args={"backup_id": backup_id, "instance": target,
                                              "pre_backup": pre_backup},
                                        outcome=lambda _x: [f"restored {backup_id} into {target}" + (
                                            f"; /health is {gate['health']}" if gate.get("health") else "")
                                            + (f" (the data before it is backup {made['id']})" if made.get("id")
                                               else "")]))
    aside = os.path.join(root, f"data.pre-restore-{ctx.op_id}")
    result.data["restore"] = {"backup_id": backup_id, "instance": target, "health": gate.get("health"),
                              "pre_restore_backup": made.get("id"),
                              "kept": aside if os.path.isdir(aside) else None}
    if os.path.isdir(aside):
        result.text.append(f"the previous data is kept in {aside} (no pre-restore backup was taken)")
    if not gate and result.changed:
        result.text.append(f"{target} was stopped before the restore and stays stopped")
    return result


def _recreate_for_restore(ctx: Context, entry: Mapping[str, Any]) -> None:
    """An unregistered target named like the backup's instance is created first (DESIGN §4.8.6)."""
    name = str(entry["instance"])
    versions = Versions(ctx)
    version = entry.get("server_version")
    binding = version if version in versions.doc["versions"] else "current"
    port = entry.get("port")
    insts = Instances(ctx)
    if port is not None and (str(port) in insts.ports or port_in_use(ctx.config.get("ports", "bind"), int(port))):
        port = None
    domain = entry.get("domain")
    if domain and insts.domain_owner(str(domain)):
        raise Conflict(f"domain {domain} of backup {entry['id']} now belongs to {insts.domain_owner(str(domain))}")
    ctx.out.progress(f"recreating instance {name} for the restore")
    op_instance_create(ctx, name, domain=domain, port=port, version=str(binding), tls=None, cert=None, key=None,
                       chain=None, start=True)


# --- 8e.4 Import of existing servers (instance import: a data dir or another host's backup) ---
# DESIGN §11.6: `instance import` adopts an Actual server's data from a data dir (a Docker volume, a
# plain npm install's data dir, a copied dir) or from another host's abssctl backup, then it is an
# `instance create` with that data. The source is only ever read: SQLite files through the online-
# backup API on a read-only connection (source_db_uri), every other file copied and checked again
# against the source after the copy. Nothing outside DIR is read: a link that leads out is refused.

SQLITE_MAGIC = b"SQLite format 3\x00"
ACCOUNT_DB = "server-files/account.sqlite"
ACCOUNT_DB_MAX = 256 << 20          # an archive's account.sqlite is read into memory to list budgets
COPY_ATTEMPTS = 3


class ImportSource:
    """What instance import found: the data's files, its budgets and its migrations."""

    __slots__ = ("kind", "path", "root", "layout", "files", "budgets", "missing", "migrations", "skipped",
                 "manifest", "sha256", "origin_version")

    def __init__(self, kind: str, path: str) -> None:
        self.kind = kind                           # "dir" or "backup"
        self.path = path                           # as the user named it
        self.root = path                           # a dir's real path: nothing outside it is read
        self.layout: dict[str, str] = {}           # data, server_files, user_files (real paths)
        self.files: list[dict[str, Any]] = []      # {"rel" (under data/), "src", "size", "kind"}
        self.budgets: list[dict[str, Any]] = []
        self.missing: list[dict[str, Any]] = []    # budgets (not deleted) whose blob is not there
        self.migrations: list[str] = []
        self.skipped: list[str] = []               # what is in DIR but not server data
        self.manifest: dict[str, Any] = {}
        self.sha256 = ""                           # an archive's, from the checking pass
        self.origin_version: str | None = None     # a backup's server_version

    @property
    def size(self) -> int:
        return sum(int(f["size"]) for f in self.files)

    def report(self) -> dict[str, Any]:
        return {"source": self.path, "kind": self.kind, "files": len(self.files), "bytes": self.size,
                "budgets": self.budgets, "missing": [b["id"] for b in self.missing],
                "migrations": len(self.migrations), "newest_migration": max(self.migrations, default=None),
                "skipped": self.skipped, "server_version": self.origin_version,
                "sqlite_method": "online-backup" if self.kind == "dir" else "from the archive"}


def _inside(root: str, path: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _layout_from_config(root: str) -> dict[str, str]:
    """config.json's dataDir (and serverFiles/userFiles when set), relative paths against its dir."""
    cfg = os.path.join(root, "config.json")
    try:
        doc = read_json_file(cfg)
    except CorruptState as exc:
        raise UsageError(exc.message, hint="pass the data dir itself (the one holding server-files/)") from None
    data = doc.get("dataDir") if isinstance(doc, dict) else None
    if not isinstance(data, str) or not data:
        raise UsageError(f"{cfg} names no dataDir and {root} holds no {ACCOUNT_DB}",
                         hint="pass the server's data dir: the one holding server-files/account.sqlite")
    out = {"data": os.path.normpath(os.path.join(root, data))}
    for key, field, sub in (("server_files", "serverFiles", "server-files"), ("user_files", "userFiles", "user-files")):
        value = doc.get(field)
        out[key] = os.path.normpath(os.path.join(root, value)) if isinstance(value, str) and value \
            else os.path.join(out["data"], sub)
    return out


def locate_server_data(path: str) -> dict[str, str]:
    """DIR's data dir, server-files and user-files as real paths inside DIR (DIR itself, or what its
    config.json names); exit 2 when it is not a server's data dir or a path leads out of it."""
    if not os.path.isdir(path):
        raise UsageError(f"{path} is not a directory", hint="pass the server's data dir, e.g. "
                         "/var/lib/docker/volumes/<volume>/_data for the official Docker image")
    root = os.path.realpath(path)
    layout = {"data": root, "server_files": os.path.join(root, "server-files"),
              "user_files": os.path.join(root, "user-files")}
    if not os.path.lexists(os.path.join(root, ACCOUNT_DB)) and os.path.isfile(os.path.join(root, "config.json")):
        layout = _layout_from_config(root)
    for key in ("data", "server_files", "user_files"):
        real = os.path.realpath(layout[key])
        if not _inside(root, real):
            raise UsageError(f"{layout[key]} leads to {real}, outside {path}",
                             hint=f"import the data where it is: abssctl instance import NAME --from "
                                  f"{real if key == 'data' else os.path.dirname(real)}")
        layout[key] = real
    account = os.path.join(layout["server_files"], "account.sqlite")
    if not os.path.lexists(account):
        raise UsageError(f"{path} is not an Actual server data dir: {account} does not exist",
                         hint="pass the dir holding server-files/account.sqlite and user-files/ (for the "
                              "official Docker image its volume, e.g. /var/lib/docker/volumes/<volume>/_data), "
                              "or the dir whose config.json names that dataDir")
    if not os.path.isdir(layout["user_files"]):
        raise UsageError(f"{path} is not an Actual server data dir: {layout['user_files']} is not a directory",
                         hint="a server's data dir holds server-files/ and user-files/")
    return layout


def _source_entry(src: ImportSource, full: str, rel: str) -> dict[str, Any] | None:
    """One file of DIR as {"rel", "src", "size", "kind"}, following a link only inside DIR."""
    import stat
    st = os.lstat(full)
    real = full
    if stat.S_ISLNK(st.st_mode):
        real = os.path.realpath(full)
        if not _inside(src.root, real):
            raise UsageError(f"{full} is a symlink to {real}, outside {src.path}",
                             hint="abssctl reads nothing outside the dir it imports: copy what the link points "
                                  "to into place (or remove the link), then import again")
        try:
            st = os.stat(real)
        except OSError:
            raise UsageError(f"{full} is a symlink to {real}, which does not exist",
                             hint="remove the dangling link, then import again") from None
        if stat.S_ISDIR(st.st_mode):
            raise UsageError(f"{full} is a symlink to a directory ({real})",
                             hint="replace the link by the directory itself, then import again")
    if stat.S_ISDIR(st.st_mode):
        return None
    if not stat.S_ISREG(st.st_mode):
        src.skipped.append(rel)
        return None
    kind = "file"
    if rel.endswith(".sqlite"):
        with open(real, "rb") as f:
            kind = "sqlite" if f.read(16) == SQLITE_MAGIC else "file"
    return {"rel": rel, "src": real, "size": st.st_size, "kind": kind}


def _scan_tree(src: ImportSource, top: str, rel_top: str) -> None:
    for dirpath, dirnames, filenames in os.walk(top):     # a linked dir is listed, not entered
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            full = os.path.join(dirpath, name)
            rel = os.path.join(rel_top, os.path.relpath(full, top))
            if name.endswith(SQLITE_SIDE):                 # part of its database: read through it
                continue
            entry = _source_entry(src, full, rel)
            if entry is not None:
                src.files.append(entry)


def source_db_uri(path: str) -> str:
    """A read-only URI for a database abssctl must not change. A rollback-journal database (the
    server's own mode) opens ``mode=ro``, which takes shared locks and writes nothing. A WAL database
    with a -wal file is live or not checkpointed: ``mode=ro`` reads through the -wal and its -shm,
    which SQLite needs even to read (a reader may mark the -shm; a missing -shm is created, and its
    owner is then given back, see _give_back_side_files). A WAL database without a -wal holds
    everything in the main file: ``immutable=1`` reads it and creates no side file at all."""
    from urllib.parse import quote
    with open(path, "rb") as f:
        head = f.read(20)
    wal = len(head) == 20 and head[18] == 2 and head[19] == 2
    mode = "immutable=1" if wal and not os.path.exists(path + "-wal") else "mode=ro"
    return f"file:{quote(path)}?{mode}"


def _give_back_side_files(path: str, before: Sequence[str]) -> None:
    """-wal/-shm files SQLite made beside a source while reading it belong to the database's owner."""
    st = os.stat(path)
    for side in ("-wal", "-shm"):
        if side not in before and os.path.exists(path + side) and os.stat(path + side).st_uid != st.st_uid:
            os.chown(path + side, st.st_uid, st.st_gid)


def _side_files(path: str) -> list[str]:
    return [s for s in ("-wal", "-shm") if os.path.exists(path + s)]


def account_budgets(db: Any) -> list[dict[str, Any]]:
    """The ``files`` table of an account database: id, group_id, name, deleted (what the server has)."""
    cols = {row[1] for row in db.execute("PRAGMA table_info(files)")}
    pick = [c for c in ("id", "group_id", "name", "deleted") if c in cols]
    if "id" not in pick:
        return []
    rows = db.execute(f"SELECT {', '.join(pick)} FROM files ORDER BY rowid").fetchall()
    return [dict(zip(pick, row)) for row in rows]


def _integrity(db: Any) -> str:
    return str(db.execute("PRAGMA integrity_check").fetchone()[0])


def _match_budgets(src: ImportSource, rows: Sequence[Mapping[str, Any]]) -> None:
    present = {f["rel"]: f for f in src.files}
    for row in rows:
        fid, group = str(row.get("id")), row.get("group_id")
        blob, gdb = f"user-files/file-{fid}.blob", f"user-files/group-{group}.sqlite"
        budget = {"id": fid, "name": row.get("name"), "group_id": group, "deleted": bool(row.get("deleted")),
                  "blob": blob, "size": present[blob]["size"] if blob in present else None,
                  "group_db_size": present[gdb]["size"] if group and gdb in present else None}
        src.budgets.append(budget)
        if blob not in present and not budget["deleted"]:
            src.missing.append(budget)


def inspect_server_dir(path: str) -> ImportSource:
    """Read DIR without changing it: layout, files, .migrate, integrity of every database, budgets."""
    import sqlite3
    src = ImportSource("dir", os.path.abspath(path))
    src.layout = locate_server_data(path)
    src.root = os.path.realpath(path)
    migrate = os.path.join(src.layout["data"], ".migrate")
    if os.path.lexists(migrate):
        entry = _source_entry(src, migrate, ".migrate")
        if entry is not None:
            src.files.append(entry)
            try:
                src.migrations = read_migrations(entry["src"])
            except CorruptState as exc:
                raise UsageError(exc.message, hint="the server writes .migrate as JSON: is this a server's "
                                 "data dir?") from None
    _scan_tree(src, src.layout["server_files"], "server-files")
    _scan_tree(src, src.layout["user_files"], "user-files")
    known = {".migrate", os.path.basename(src.layout["server_files"]), os.path.basename(src.layout["user_files"])}
    src.skipped += sorted(n for n in os.listdir(src.layout["data"]) if n not in known)
    rows: list[dict[str, Any]] = []
    for f in src.files:
        if f["kind"] != "sqlite" and f["rel"] != ACCOUNT_DB:
            continue
        before = _side_files(f["src"])
        try:
            db = sqlite3.connect(source_db_uri(f["src"]), uri=True, timeout=30)
            try:
                result = _integrity(db)
                if result == "ok" and f["rel"] == ACCOUNT_DB:
                    rows = account_budgets(db)
            finally:
                db.close()
        except sqlite3.Error as exc:
            result = str(exc)
        finally:
            _give_back_side_files(f["src"], before)
        if result != "ok":
            raise UsageError(f"{f['src']} fails SQLite's integrity_check ({result[:200]})",
                             hint="nothing was imported; repair the database first (sqlite3 FILE '.recover'), "
                                  "or import a backup of it")
    _match_budgets(src, rows)
    return src


def inspect_backup_archive(ctx: Context, path: str) -> ImportSource:
    """One checking pass over another host's archive: its sha256 (and sidecar), every member against
    the manifest, and its account database's integrity and budgets (read into memory)."""
    import hashlib
    import sqlite3
    if not os.path.isfile(path):
        raise UsageError(f"{path} is not a file", hint="pass an abssctl backup archive (<id>.tar.zst, .tar.gz, .tar)")
    src = ImportSource("backup", os.path.abspath(path))
    scan = ArchiveScan(ctx, path)
    sums: dict[str, str] = {}
    seen: dict[str, Any] = {"prefix": None, "account": b""}

    def consume(tar: Any, members: Iterator[Any]) -> None:
        for member in members:
            top = member.name.split("/", 1)[0]
            seen["prefix"] = seen["prefix"] or top
            if top != seen["prefix"] or not member.isreg():
                raise CorruptState(f"{path}: {member.name} is not a file of backup {seen['prefix']}",
                                   hint="pass an abssctl backup archive")
            rel = member.name[len(top) + 1:]
            keep = rel == "data/" + ACCOUNT_DB and member.size <= ACCOUNT_DB_MAX
            sha, parts, f = hashlib.sha256(), [], tar.extractfile(member)
            while chunk := f.read(CHUNK):
                sha.update(chunk)
                if keep:
                    parts.append(chunk)
            sums[rel] = sha.hexdigest()
            if keep:
                seen["account"] = b"".join(parts)
    ctx.out.progress(f"checking {path}")
    scan.run(consume)
    if seen["prefix"] is None:
        raise CorruptState(f"{path} holds no backup", hint="pass an abssctl backup archive")
    scan.check_manifest(sums, str(seen["prefix"]))
    recorded = read_sidecar(backup_sidecar(path))
    if recorded not in (None, scan.sha256):
        raise ChecksumMismatch(f"{path} does not match its sidecar {backup_sidecar(path)}",
                               hint="the archive is damaged or was changed; copy it again")
    m = scan.manifest or {}
    if m.get("schema_version") != MANIFEST_SCHEMA:
        raise UsageError(f"{path} has manifest schema {m.get('schema_version')}; this abssctl reads "
                         f"{MANIFEST_SCHEMA}", hint="import it with the abssctl that made it, or a newer one")
    src.manifest, src.sha256 = m, scan.sha256
    src.origin_version = m.get("server_version")
    src.migrations = [t for t in m.get("migrations") or [] if isinstance(t, str)]
    src.files = [{"rel": f["path"][len("data/"):], "src": None, "size": int(f.get("size") or 0),
                  "kind": f.get("kind") or "file"} for f in m.get("files", [])
                 if isinstance(f, dict) and str(f.get("path", "")).startswith("data/")]
    if "data/" + ACCOUNT_DB not in sums:
        raise UsageError(f"backup {m.get('id')} holds no {ACCOUNT_DB}", hint="it is not a server's backup")
    if not seen["account"]:
        raise UsageError(f"the {ACCOUNT_DB} of backup {m.get('id')} is larger than "
                         f"{human_bytes(ACCOUNT_DB_MAX)}", hint="restore it with backup restore instead")
    db = sqlite3.connect(":memory:")
    try:
        db.deserialize(seen["account"])
        result = _integrity(db)
        rows = account_budgets(db) if result == "ok" else []
    except sqlite3.Error as exc:
        result = str(exc)
    finally:
        db.close()
    if result != "ok":
        raise ChecksumMismatch(f"{path}: its {ACCOUNT_DB} fails integrity_check ({result[:200]})",
                               hint="use another backup")
    _match_budgets(src, rows)
    return src


def import_version(ctx: Context, src: ImportSource, wanted: str | None) -> dict[str, Any]:
    """The data's minimum version (the lowest installed one whose migrations include every title the
    data has seen) and the one to run: --version, else the newest installed (as ``current`` if so)."""
    versions = Versions(ctx)
    installed = sorted((v for v in versions.doc["versions"] if versions.state_of(v) == "installed"),
                       key=semver_key)
    need = set(src.migrations)
    fits = [v for v in installed if need <= set(versions.doc["versions"][v].get("migrations") or [])]
    newest = max(need, default=None)
    if not fits:
        origin = f" (it was taken on {src.origin_version})" if src.origin_version else ""
        raise UsageError(f"the data has seen migration {newest}, which no installed version knows{origin}; "
                         f"installed: {', '.join(installed) or 'none'}",
                         hint=f"install the version it comes from, or a newer one: abssctl version install "
                              f"{src.origin_version or 'latest'}", details={"newest_migration": newest})
    minimum = fits[0]
    if wanted is None:
        version = fits[-1]
        binding = "current" if version == versions.current else version
    else:
        version = resolve_binding(ctx, versions, wanted)
        _version_entry(ctx, versions, version)
        binding = wanted
        if version not in fits:
            raise UsageError(f"--version {version} cannot load this data: it needs {minimum} or newer (it has "
                             f"seen migration {newest})", hint=f"pass --version {minimum} or newer, or leave "
                             "--version out", details={"minimum": minimum, "newest_migration": newest})
    return {"minimum": minimum, "version": version, "binding": binding, "newest_migration": newest}


def _mkdir_owned(path: str, uid: int, gid: int) -> None:
    if not os.path.isdir(path):
        os.mkdir(path, 0o750)
    os.chown(path, uid, gid)
    os.chmod(path, 0o750)


def _copy_once(src: str, dst: str) -> tuple[int, str]:
    import hashlib
    sha, size = hashlib.sha256(), 0
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as out, open(src, "rb", buffering=0) as f:
        while chunk := f.read(CHUNK):
            sha.update(chunk)
            out.write(chunk)
            size += len(chunk)
        out.flush()
        os.fsync(out.fileno())
    return size, sha.hexdigest()


def _copy_checked(ctx: Context, f: dict[str, Any], dst: str) -> None:
    """Copy a file; then its size and sha256 must match the source read again (a server rewriting
    it meanwhile makes the copy start over, at most COPY_ATTEMPTS times)."""
    for _attempt in range(COPY_ATTEMPTS):
        got = _copy_once(f["src"], dst)
        if got == (os.path.getsize(f["src"]), sha256_file(f["src"])):
            f["size"], f["sha256"] = got
            return
        os.unlink(dst)
        ctx.out.progress(f"import: {f['src']} changed while it was copied; copying it again")
    raise ProviderError(f"{f['src']} kept changing while it was copied; retry later",
                        hint="or stop the source server during the import")


def _snapshot_checked(f: dict[str, Any], dst: str) -> None:
    """The online-backup snapshot of a source database, which must pass integrity_check."""
    before = _side_files(f["src"])
    try:
        sqlite_snapshot(f["src"], dst, uri=source_db_uri(f["src"]))
    finally:
        _give_back_side_files(f["src"], before)
    result = sqlite_integrity(dst)
    if result != "ok":
        raise UsageError(f"the snapshot of {f['src']} fails integrity_check ({result[:200]})",
                         hint="repair the source database first (sqlite3 FILE '.recover')")
    f["size"], f["sha256"] = os.path.getsize(dst), sha256_file(dst)


def stage_dir_import(ctx: Context, src: ImportSource, staging: str, uid: int, gid: int) -> None:
    """Snapshot and copy DIR's data into ``staging``/data: account.sqlite first, so a budget that
    appears later is only an extra blob; one uploaded meanwhile has its blob fetched too."""
    import sqlite3
    data = os.path.join(staging, "data")
    for path in (staging, data, os.path.join(data, "server-files"), os.path.join(data, "user-files")):
        _mkdir_owned(path, uid, gid)
    todo = sorted(src.files, key=lambda f: (f["rel"] != ACCOUNT_DB, f["kind"] != "sqlite", f["rel"]))
    done = 0
    for f in todo:
        dst = os.path.join(data, f["rel"])
        parent = os.path.dirname(dst)
        if not os.path.isdir(parent):
            rel_parts = os.path.relpath(parent, data).split("/")
            for n in range(1, len(rel_parts) + 1):
                _mkdir_owned(os.path.join(data, *rel_parts[:n]), uid, gid)
        if f["kind"] == "sqlite":
            _snapshot_checked(f, dst)
        else:
            _copy_checked(ctx, f, dst)
        os.chown(dst, uid, gid)
        os.chmod(dst, 0o640)
        done += int(f["size"])
        ctx.out.progress(f"import: {human_bytes(done)} / {human_bytes(src.size)}", tick=True)
        if f["rel"] == ACCOUNT_DB:
            db = sqlite3.connect(f"file:{dst}?mode=ro", uri=True)
            try:
                rows = account_budgets(db)
            finally:
                db.close()
            listed = {x["rel"] for x in src.files}
            for row in rows:
                rel = f"user-files/file-{row.get('id')}.blob"
                live = os.path.join(src.layout["user_files"], rel.split("/", 1)[1])
                if rel not in listed and "/" not in str(row.get("id")) and os.path.isfile(live) \
                        and _inside(src.root, os.path.realpath(live)):
                    extra = {"rel": rel, "src": os.path.realpath(live), "size": os.path.getsize(live),
                             "kind": "file"}
                    src.files.append(extra)
                    todo.append(extra)


def stage_backup_import(ctx: Context, src: ImportSource, staging: str, uid: int, gid: int) -> None:
    """Extract the archive's data into ``staging`` with safe_extract's rules, checked again."""
    _mkdir_owned(staging, uid, gid)
    scan = ArchiveScan(ctx, src.path)
    entry = {"id": src.manifest["id"], "data_bytes": (src.manifest.get("totals") or {}).get("bytes") or src.size}
    ctx.out.progress(f"import: extracting {src.path}")
    sums = extract_backup(scan, entry, staging, uid=uid, gid=gid)
    if scan.sha256 != src.sha256:
        raise ChecksumMismatch(f"{src.path} changed since it was checked", hint="copy it again, then import")
    data = os.path.join(staging, "data")
    for path in (data, os.path.join(data, "server-files"), os.path.join(data, "user-files")):
        _mkdir_owned(path, uid, gid)
    for rel in sorted(sums):
        if rel.endswith(".sqlite"):
            result = sqlite_integrity(os.path.join(staging, rel))
            if result != "ok":
                raise ChecksumMismatch(f"{src.path}: {rel} fails integrity_check ({result[:200]})",
                                       hint="use another backup")


def _import_data_steps(ctx: Context, plan: Plan, name: str, src: ImportSource) -> None:
    """Stage the data beside the fresh data/ dir, then put it in place of that empty dir."""
    own = instance_account(ctx, name)
    user, group = (own, own) if own else run_as(ctx, {})
    paths = instance_paths(ctx, name)
    staging = os.path.join(paths["root"], f".abssctl-tmp-{ctx.op_id}")
    stage = stage_dir_import if src.kind == "dir" else stage_backup_import
    plan.add("import.stage", f"copy the data of {src.path} into {staging} (SQLite through the online-backup "
             "API, every file checked)" if src.kind == "dir" else f"verify {src.path} and stage its data in "
             f"{staging}", staging, lambda: stage(ctx, src, staging, *account_ids(user, group)),
             UndoAction("remove_tree", path=staging))

    def place() -> None:
        for sub in ("server-files", "user-files", ""):
            os.rmdir(os.path.join(paths["data"], sub))     # the empty dirs fs.dirs made
        os.rename(os.path.join(staging, "data"), paths["data"])
        if own:
            os.chmod(paths["data"], 0o700)
    plan.add("import.place", f"put the imported data in {paths['data']}", paths["data"], place,
             UndoAction("rename", src=paths["data"], dst=os.path.join(staging, "data")))
    plan.cleanup("import.cleanup", f"remove the staging dir {staging}", staging,
                 UndoAction("remove_tree", path=staging))


def _import_text(report: Mapping[str, Any]) -> list[str]:
    budgets = report["budgets"]
    lines = [f"{report['source']}: {len(budgets)} budget file(s), {report['files']} files, "
             f"{human_bytes(report['bytes'])}; newest migration {report['newest_migration'] or 'none'}, so "
             f"{report['minimum_version']} or newer; runs on {report['version']}"]
    for b in budgets:
        size = human_bytes(b["size"]) if b["size"] is not None else "MISSING"
        lines.append(f"  {b['name'] or '(no name)'}: file {b['id']}, group {b['group_id'] or '-'}, {size}"
                     + (" (deleted)" if b["deleted"] else ""))
    if report["skipped"]:
        lines.append(f"  not server data, left out: {', '.join(report['skipped'])}")
    return lines


def op_instance_import(ctx: Context, name: str, *, source_dir: str | None, backup_file: str | None,
                       domain: str | None, port: int | None, version: str | None, tls: str | None,
                       cert: str | None, key: str | None, chain: str | None, allow_missing: bool) -> Result:
    """An existing server's data (a dir or another host's backup) as a new instance (DESIGN §11.6)."""
    instance_account(ctx, name)                # the user name it makes fits useradd (exits 2 otherwise)
    if name in Instances(ctx).doc["instances"]:
        raise AlreadyExists(f"instance {name!r} exists already",
                            hint=f"import under another name (abssctl instance show {name} shows the one there)")
    src = inspect_server_dir(source_dir) if source_dir else inspect_backup_archive(ctx, str(backup_file))
    if src.missing and not allow_missing:
        named = ", ".join(f"{b['name'] or '(no name)'} ({b['blob']})" for b in src.missing[:10])
        raise UsageError(f"the account database lists {len(src.missing)} budget file(s) whose blob is missing: "
                         f"{named}", hint="find those files and put them back, or pass --allow-missing to import "
                         "the rest (those budgets will not download)",
                         details={"missing": [b["id"] for b in src.missing]})
    chosen = import_version(ctx, src, version)
    if domain is None and src.kind == "backup" and src.manifest.get("domain"):
        domain = validate_fqdn(str(src.manifest["domain"]))
    req, _same = _validate_create(ctx, name, domain, port, chosen["binding"], tls, cert, key, chain, True)
    need = int(src.size * 1.1)
    if disk_free(ctx.paths.instance_root) < need:
        raise DiskFull(f"importing needs {human_bytes(need)} free under {ctx.paths.instance_root}",
                       hint="free some space, then import again")
    report = dict(src.report(), minimum_version=chosen["minimum"], version=chosen["version"],
                  binding=chosen["binding"])
    for warning in [f"{b['blob']} is missing; budget {b['name'] or b['id']} will not download"
                    for b in src.missing]:
        ctx.out.warn(warning)
    gate: dict[str, Any] = {}

    def build() -> Plan:
        plan = Plan(f"import {src.path} as instance {name}")
        insts = Instances(ctx)
        if name in insts.doc["instances"]:
            raise AlreadyExists(f"instance {name!r} was just created", hint=f"see abssctl instance show {name}")
        if str(req.port) in insts.ports:
            if port is not None:
                raise Conflict(f"port {req.port} was just reserved by {insts.ports[str(req.port)].get('instance')}",
                               hint="pass another --port, or see abssctl ports list")
            req.port = insts.free_port()
        _create_steps(ctx, plan, req, gate, data_steps=lambda p: _import_data_steps(ctx, p, name, src))
        return plan

    def finish(_plan: Plan) -> dict[str, Any]:
        entry = Instances(ctx).doc["instances"].get(name) or {}
        return {"instance": _instance_summary(ctx, entry, gate), "import": report}

    def outcome(x: Mapping[str, Any]) -> list[str]:
        lines = [f"imported {src.path} into {name}"] + _import_text(report)[1:]
        lines += _created_outcome(x["instance"])[:1]
        return lines + [f"next: open {x['instance']['url']} and log in with the old server's password"]

    result = run_mutation(ctx, Mutation(title=f"import {name}", build=build, finish=finish, global_mode="exclusive",
                                        instances=[name], target={"kind": "instance", "name": name},
                                        args={"name": name, "from": source_dir, "from_backup": backup_file,
                                              "domain": req.domain, "port": req.port, "version": chosen["binding"],
                                              "tls": req.tls, "allow_missing": allow_missing}, outcome=outcome))
    if ctx.dry_run:
        result.data["import"] = report
        result.text = _import_text(report) + result.text
    return result


# ============================================================================
# 8f. Operations: switching versions with backups, gates and data rollback
# ============================================================================


def _undo_start_gate(ctx: Context, args: Mapping[str, Any]) -> None:
    """Start an instance again on its old version and require the health gate to pass."""
    start_and_gate(ctx, args["name"], int(args["port"]), args["version"])


def _undo_restore_data(ctx: Context, args: Mapping[str, Any]) -> None:
    """Put an instance's data back from its pre-switch backup; the migrated data is kept aside."""
    name, backup_id = args["name"], args.get("backup_id")
    if not backup_id:
        raise HostError(f"no pre-switch backup of {name} to restore from")
    entry = ctx.registry("backups").load()["backups"][backup_id]
    root = ctx.paths.instance_dir(name)
    live = os.path.join(root, "data")
    failed = os.path.join(root, f"data.failed-{args['what']}-{ctx.op_id}")
    staging = os.path.join(root, f".abssctl-tmp-{ctx.op_id}-restore")
    inst = Instances(ctx).doc["instances"].get(name) or {}
    uid, gid = account_ids(*run_as(ctx, inst))
    if os.path.isdir(staging):
        remove_tree(staging)
    ensure_dir(staging, 0o750)
    extract_backup(ArchiveScan(ctx, archive_path(ctx, entry)), entry, staging, uid=uid, gid=gid)
    if inst.get("user") and os.path.isdir(os.path.join(staging, "data")):
        os.chmod(os.path.join(staging, "data"), 0o700)
    if os.path.isdir(live) and not os.path.exists(failed):
        os.rename(live, failed)                 # kept, never deleted: it holds what the new version wrote
    os.rename(os.path.join(staging, "data"), live)
    remove_tree(staging)


class UpgradeTracker:
    """Per-instance outcome of a switch or set-version, for the report and the ops log."""

    def __init__(self, names: Sequence[str]) -> None:
        self.rows: dict[str, dict[str, Any]] = {
            n: {"name": n, "backup_id": None, "outcome": "untouched", "health": None, "info_version": None,
                "active": None} for n in names}

    def report(self) -> list[dict[str, Any]]:
        return [{k: v for k, v in self.rows[n].items() if k != "active"} for n in sorted(self.rows)]


def _check_data_loadable(ctx: Context, versions: Versions, names: Sequence[str], target: str) -> None:
    """Every title in an instance's .migrate must be known to the target version (no downgrade)."""
    known = set((versions.doc["versions"].get(target) or {}).get("migrations") or [])
    problems = []
    insts = Instances(ctx).doc["instances"]
    for name in names:
        titles = read_migrations(os.path.join(ctx.paths.instance_dir(name), "data", ".migrate"))
        unknown = [t for t in titles if t not in known]
        if unknown:
            problems.append(f"{name} (data migrated by {insts[name].get('data_version') or 'a newer version'})")
    if problems:
        raise UsageError(f"{target} cannot load the data of {', '.join(problems)}",
                         hint="the server's migrations are one-way: keep these instances on their version, or "
                              "restore a backup taken before they were migrated")


UPGRADE_PHASES = ("stop", "backup", "render", "start")


def _upgrade_steps(ctx: Context, plan: Plan, name: str, target: str, tracker: UpgradeTracker, *,
                   backup: bool, reason: str, label: str, message: str | None, m: Mutation,
                   phases: Sequence[str] = UPGRADE_PHASES) -> bool:
    """stop, cold backup, re-render, start and gate one instance (the given phases); every undo leads
    back to the old version with the old data. Returns whether the instance was running."""
    entry = Instances(ctx).get(name)
    old = str(entry.get("resolved_version"))
    port = int(entry["port"])
    row = tracker.rows[name]
    active = _is_active(_unit_state(ctx, name)) if row.get("active") is None else bool(row["active"])
    row["active"] = active
    unit = unit_name(name)
    if "stop" in phases and active:
        def stop() -> None:
            row["outcome"] = "rolled-back"      # from here on a failure rolls this instance back
            ctx.runner.run("systemctl", ["--no-pager", "stop", unit], mutating=True)
        # Undo runs last for this instance: start it on the old version once unit and data are back.
        plan.add(f"{name}.stop", f"stop {name} ({old})", unit, stop,
                 UndoAction("start_gate", name=name, port=port, version=old))
    if "backup" in phases and backup:
        protect = UndoAction("restore_data", name=name, backup_id=None, what=reason.replace("pre-", ""))

        def taken(made: dict[str, Any]) -> None:
            row["backup_id"] = protect.args["backup_id"] = made["id"]
            m.log_extra.setdefault("backup_ids", []).append(made["id"])
        backup_step(ctx, plan, f"{name}.backup", f"cold {reason} backup of {name} (label {label})", name, {},
                    reason=reason, message=message, labels=[label], then=taken)
        # A no-op whose undo puts the backed-up data back: recorded after the backup, so it knows the id.
        plan.add(f"{name}.protect", f"from here on {name}'s data may be migrated by {target}", name,
                 lambda: None, protect)
    if "render" in phases:
        _unit_step(ctx, plan, name, render_unit(ctx, name, port, target, Versions(ctx)),
                   f"re-render {ctx.paths.unit_file(name)} for {target}")
    if "start" in phases and active:
        def start() -> None:
            gate = start_and_gate(ctx, name, port, target)
            row.update(outcome="upgraded", health=gate.get("health"), info_version=gate.get("info_version"))
        plan.add(f"{name}.start", f"start {name} on {target}, then the health gate", unit, start,
                 UndoAction("systemctl", verb="stop", unit=unit))
    return active


def _record_versions_step(ctx: Context, plan: Plan, names: Sequence[str], target: str,
                          binding: str | None = None, pending: bool = False,
                          started: Sequence[str] = ()) -> None:
    """Registry: resolved_version (and data_version for those that passed a gate on it)."""
    insts = Instances(ctx)
    for name in names:
        entry = dict(insts.get(name))
        if pending:
            entry.update(pending_restart=True, updated_at=_now())
        else:
            entry.update(resolved_version=target, pending_restart=False, updated_at=_now())
            if name in started:
                entry["data_version"] = target  # a stopped instance migrates at its next start
            if binding is not None:
                entry["version"] = binding
        _registry_step(ctx, plan, insts.registry, name, entry, f"record {name} on {target}"
                       if not pending else f"mark {name} to change at its next restart")


def _moved_outcome(data: dict[str, Any]) -> list[str]:
    rows = data.get("instances") or []
    moved = ", ".join(f"{r['name']} ({r['outcome']})" for r in rows if r.get("outcome") != "untouched")
    inst = data.get("instance") or {}
    head = f"current is now {data['current']} (was {data.get('previous')})" if "current" in data \
        else f"{inst.get('name')} now runs {inst.get('resolved_version')} (bound to {inst.get('version')})"
    return [head + (f"; instances: {moved}" if moved else ""),
            "abssctl instance status shows their health; the pre-switch backups are in abssctl backup list"]


def op_version_switch(ctx: Context, version: str, *, restart: str, backup: bool, message: str | None) -> Result:
    """Point current at VER and move every instance that follows it, one gated instance at a time."""
    versions = Versions(ctx)
    if versions.require_not_broken(version) == "missing":
        raise NotFound(f"version {version} is not installed", hint=f"run abssctl version install {version}")
    followers = versions.following_current()
    _check_data_loadable(ctx, versions, followers, version)
    entry = versions.doc["versions"][version]
    if entry.get("engines_ok") is False:
        ctx.out.warn(_engines_sentence(versions.package, version, str(entry.get("engines_node")),
                                       Node(runner_for(ctx, entry)).info()))
    tracker = UpgradeTracker(followers)
    old = versions.current
    m = Mutation(title=f"switch to {version}", build=lambda: Plan(""), global_mode="exclusive",
                 instances=followers, target={"kind": "version", "name": version},
                 args={"version": version, "restart": restart, "backup": backup})

    def build() -> Plan:
        now = Versions(ctx)
        plan = Plan(f"switch current from {now.current} to {version}")
        pending = [n for n in now.following_current() if Instances(ctx).get(n).get("pending_restart")]
        moving = [n for n in now.following_current()
                  if Instances(ctx).get(n).get("resolved_version") != version or n in pending]
        if now.current == version and not moving:
            return plan
        if now.current != version:
            _current_steps(ctx, now, plan, version)
        if restart == "none":
            _record_versions_step(ctx, plan, moving, version, pending=True)
            return plan
        order = sorted(moving)
        label = f"switch:{now.current}->{version}"
        kw = {"backup": backup, "reason": "pre-switch", "label": label, "message": message, "m": m}
        if restart == "rolling":
            active = [n for n in order if _upgrade_steps(ctx, plan, n, version, tracker, **kw)]
        else:                               # all: stop all, back up each, start all, gate each
            for phase in UPGRADE_PHASES:
                active = [n for n in order if _upgrade_steps(ctx, plan, n, version, tracker, phases=(phase,),
                                                             **kw)]
        _record_versions_step(ctx, plan, order, version, started=active)
        return plan

    def ask(_plan: Plan) -> None:
        if not backup:
            confirm(ctx, f"Switch to {version} without pre-switch backups?\nIf the upgrade fails, the package "
                         "is rolled back but the data cannot be.")
    m.build, m.confirm, m.outcome = build, ask, _moved_outcome
    m.finish = lambda _p: {"instances": tracker.report(), "current": Versions(ctx).current, "previous": old}
    return _run_upgrade(ctx, m, tracker)


def _current_steps(ctx: Context, versions: Versions, plan: Plan, version: str) -> None:
    """Swap the current symlink atomically and record it; both undone together."""
    link = ctx.paths.current
    previous = os.readlink(link) if os.path.islink(link) else None
    reg = versions.registry
    plan.add("current.swap", f"point {link} at {version}", link, lambda: swap_symlink(link, version, ctx.op_id),
             UndoAction("swap_current", path=link, target=previous, tag=ctx.op_id))

    def set_current() -> None:
        with reg.edit(ctx.op_id) as doc:
            doc["current"] = version
    plan.add("registry.current", f"record {version} as current", reg.path, set_current,
             UndoAction("registry_fields", fields={"current": versions.current}, **_registry_args(reg)))


def _run_upgrade(ctx: Context, m: Mutation, tracker: UpgradeTracker) -> Result:
    try:
        result = run_mutation(ctx, m)
    except AbssctlError as exc:
        report = tracker.report()
        failed = " ".join(getattr(exc, "__notes__", []))
        for row in report:
            if row["outcome"] != "untouched" and row["name"] in failed:
                row["outcome"] = "rollback-failed"
        exc.data["instances"] = report
        if m.log_extra.get("backup_ids"):
            exc.details["backup_ids"] = m.log_extra["backup_ids"]
        raise
    return result


def op_instance_set_version(ctx: Context, name: str, binding: str, *, backup: bool, message: str | None) -> Result:
    """Move one instance to VER (or back to following current) with a cold backup, gate and rollback."""
    versions = Versions(ctx)
    Instances(ctx).get(name)
    target = resolve_binding(ctx, versions, binding)
    _version_entry(ctx, versions, target)
    _check_data_loadable(ctx, versions, [name], target)
    tracker = UpgradeTracker([name])
    m = Mutation(title=f"set-version {name}", build=lambda: Plan(""), instances=[name],
                 target={"kind": "instance", "name": name}, args={"name": name, "version": binding,
                                                                  "backup": backup})

    def build() -> Plan:
        current = Instances(ctx).get(name)
        plan = Plan(f"move {name} to {target}")
        if current.get("resolved_version") == target and current.get("version") == binding and \
                not current.get("pending_restart"):
            return plan
        if current.get("resolved_version") == target and not current.get("pending_restart"):
            _registry_step(ctx, plan, Instances(ctx).registry, name, dict(current, version=binding,
                                                                          updated_at=_now()),
                           f"bind {name} to {binding}")
            return plan
        active = _upgrade_steps(ctx, plan, name, target, tracker, backup=backup, reason="pre-set-version",
                                label=f"set-version:{current.get('resolved_version')}->{target}",
                                message=message, m=m)
        _record_versions_step(ctx, plan, [name], target, binding=binding, started=[name] if active else [])
        return plan

    def ask(_plan: Plan) -> None:
        if not backup:
            confirm(ctx, f"Move {name} to {target} without a pre-set-version backup?\nIf the upgrade fails, "
                         "the data cannot be rolled back.")
    m.build, m.confirm, m.outcome = build, ask, _moved_outcome
    m.finish = lambda _p: {"instances": tracker.report(), "instance": _instance_summary(
        ctx, Instances(ctx).get(name), tracker.rows[name])}
    return _run_upgrade(ctx, m, tracker)


# ============================================================================
# 8g. Operations: doctor (probe registry, facts gathered once, safe --fix)
# ============================================================================

DOCTOR_CATEGORIES = ("env", "config", "state", "fs", "ports", "systemd", "nginx", "tls", "app", "disk", "backups",
                     "unattended")
CATEGORY_CLASS = {"env": 3, "config": 3, "state": 3, "fs": 3, "ports": 4, "systemd": 4, "nginx": 4, "tls": 4,
                  "app": 4, "disk": 3, "backups": 3, "unattended": 3}


class Finding:
    """One probe result (DESIGN §4.10)."""

    __slots__ = ("id", "category", "target", "status", "message", "hint", "fix", "data", "duration_ms")

    def __init__(self, probe_id: str, target: str | None, status: str, message: str, *, hint: str | None = None,
                 fix: Callable[[Plan], None] | None = None, data: Mapping[str, Any] | None = None) -> None:
        self.id = probe_id
        self.category = probe_id.split(".", 1)[0]
        self.target = target
        self.status = status
        self.message = message
        self.hint = hint
        self.fix = fix
        self.data = dict(data or {})
        self.duration_ms = 0

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "category": self.category, "target": self.target, "status": self.status,
                "message": self.message, "hint": self.hint, "fixable": self.fix is not None,
                "exit_class": CATEGORY_CLASS[self.category], "duration_ms": self.duration_ms, "data": self.data}


class Facts:
    """What every probe may look at, gathered once: registries, units, nginx -T, listeners."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.errors: dict[str, str] = {}
        self.instances: dict[str, Any] = self._load("instances")
        self.ports: dict[str, Any] = self._load("ports")
        self.versions_doc = self._safe(lambda: ctx.registry("versions").load(), {"versions": {}, "current": None},
                                       "versions")
        self.backups: dict[str, Any] = self._safe(lambda: ctx.registry("backups").load()["backups"], {}, "backups")
        names = sorted(self.instances)
        self.units: dict[str, dict[str, str]] = {}
        if names and ctx.runner.available("systemctl"):
            self.units = self._safe(lambda: Systemd(ctx.runner).show(
                [unit_name(n) for n in names], ("ActiveState", "SubState", "MainPID", "UnitFileState",
                                                 "ExecMainStatus", "LoadState")), {}, "systemctl")
        self.nginx_ok: Completed | None = None
        self.nginx_dump = ""
        if ctx.runner.available("nginx"):
            done = ctx.runner.run("nginx", ["-T"], mutating=False, check=False)
            self.nginx_ok, self.nginx_dump = done, done.stdout
        self.listeners = listening_sockets()
        self.socket_pids = socket_pids() if any(self.listeners.get(int(e.get("port") or 0))
                                                for e in self.instances.values()) else {}
        import ssl
        self.tls_client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)    # one context: each costs ~25 ms
        self.tls_client.check_hostname, self.tls_client.verify_mode = False, ssl.CERT_NONE

    def _load(self, name: str) -> dict[str, Any]:
        return self._safe(lambda: self.ctx.registry(name).load()[name], {}, name)

    def _safe(self, fn: Callable[[], Any], default: Any, what: str) -> Any:
        try:
            return fn()
        except AbssctlError as exc:
            self.errors[what] = exc.message
            return default


def listening_sockets() -> dict[int, set[int]]:
    """TCP port -> inodes of listening sockets, from /proc/net/tcp{,6}."""
    found: dict[int, set[int]] = {}
    for table_path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table_path, encoding="ascii") as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if len(cols) > 9 and cols[3] == "0A":           # TCP_LISTEN
                found.setdefault(int(cols[1].rsplit(":", 1)[1], 16), set()).add(int(cols[9]))
    return found


def socket_pids() -> dict[int, int]:
    """socket inode -> the PID holding it: one walk of /proc/*/fd for the whole doctor run."""
    owners: dict[int, int] = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                owners.setdefault(int(target[8:-1]), int(pid))
    return owners


def _descendants(pid: int) -> set[int]:
    """pid and its children (the server may listen from a child of the unit's main process)."""
    found = {pid}
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children", encoding="ascii") as f:
                for child in f.read().split():
                    found |= _descendants(int(child))
    except OSError:
        pass
    return found


PROBES: list[tuple[str, Callable[[Context, Facts], list[Finding]]]] = []


def probe(category: str, timeout: float = 5.0) -> Callable[[Callable[[Context, Facts], list[Finding]]],
                                                            Callable[[Context, Facts], list[Finding]]]:
    """Register a probe function under a category, with the seconds it may take before it counts as failed."""
    def register(fn: Callable[[Context, Facts], list[Finding]]) -> Callable[[Context, Facts], list[Finding]]:
        fn.timeout = timeout  # type: ignore[attr-defined]
        PROBES.append((category, fn))
        return fn
    return register


def _each(names: Sequence[str], one: Callable[[str], list[Finding]]) -> list[Finding]:
    """``one(name)`` for every instance on a small pool (the network probes), findings in name order."""
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(max_workers=8) as pool:
        return [f for found in pool.map(one, names) for f in found]


def _ok(pid: str, target: str | None, message: str, **kw: Any) -> Finding:
    return Finding(pid, target, "ok", message, **kw)


@probe("env")
def probe_env_tools(ctx: Context, facts: Facts) -> list[Finding]:
    out = [_ok("env.python", None, f"python {sys.version.split()[0]}")]
    managed = managed_runtime(ctx.config)
    for tool, status in (("node", "fail"), ("nginx", "fail"), ("systemctl", "fail"), ("npm", "warn"),
                         ("openssl", "warn"), ("journalctl", "warn"), ("zstd", "warn")):
        if ctx.runner.available(tool):
            out.append(_ok("env.tool", tool, f"{tool} is installed"))
        elif tool == "node" and managed:
            out.append(_ok("env.tool", tool, 'no system node (not needed: [node] runtime = "managed")'))
        else:
            note = " (backups fall back to gzip)" if tool == "zstd" else ""
            out.append(Finding("env.tool", tool, status, f"{tool} is not installed{note}",
                               hint=INSTALL_HINTS.get(tool)))
    return out


@probe("env", timeout=30)
def probe_env_runtimes(ctx: Context, facts: Facts) -> list[Finding]:
    """Each version's managed runtime exists, runs and has the ABI its native modules were built for;
    runtimes no version uses are reported (DESIGN §11.1)."""
    versions = facts.versions_doc.get("versions", {})
    try:
        runtimes = ctx.registry("runtimes").load()["runtimes"]
    except AbssctlError as exc:
        return [Finding("env.runtime", None, "fail", exc.message, hint=exc.hint)]
    out: list[Finding] = []
    for ver, entry in sorted(versions.items()):
        rt_dir = runtime_of(ctx, entry)
        if rt_dir is None:
            continue
        rid = str(entry["runtime"])
        recorded = (entry.get("node") or {}).get("abi")
        again = f"abssctl version uninstall {ver}, then abssctl version install {ver} (it fetches {rid} again)"
        if not os.path.isfile(os.path.join(rt_dir, "bin", "node")):
            out.append(Finding("env.runtime", ver, "fail", f"{ver} runs on {rid}, but {rt_dir} is missing",
                               hint=again))
            continue
        try:
            node = Node(runner_for(ctx, entry)).info()
        except AbssctlError as exc:
            out.append(Finding("env.runtime", ver, "fail", f"{rid}/bin/node does not run: {exc.message}",
                               hint=again))
            continue
        if recorded and recorded != node.abi:
            out.append(Finding("env.runtime", ver, "fail", f"{ver} was built for node ABI {recorded}; {rid} "
                               f"reports ABI {node.abi}", hint=again))
        else:
            out.append(_ok("env.runtime", ver, f"{ver} runs on {rid} ({node.version}, ABI {node.abi})"))
    used = {str(e.get("runtime")) for e in versions.values() if isinstance(e, dict) and e.get("runtime")}
    for rid in sorted(set(runtimes) - used):
        out.append(Finding("env.runtime-unused", rid, "warn", f"runtime {rid} is used by no installed version",
                           hint="it is removed with the last version that used it; delete "
                                f"{os.path.join(ctx.paths.runtime_root, rid)} and its runtimes.json entry "
                                "by hand if it is left over"))
    return out


@probe("env", timeout=15)
def probe_env_node_abi(ctx: Context, facts: Facts) -> list[Finding]:
    versions = {v: e for v, e in facts.versions_doc.get("versions", {}).items()
                if not (isinstance(e, dict) and e.get("runtime"))}     # managed ones: probe_env_runtimes
    if not versions or not ctx.runner.available("node"):
        return []
    try:
        node = Node(ctx.runner).info()
    except AbssctlError as exc:
        return [Finding("env.node", None, "fail", f"node does not answer: {exc.message}")]
    out = []
    for ver, entry in sorted(versions.items()):
        recorded = (entry.get("node") or {}).get("abi")
        if recorded and recorded != node.abi:
            out.append(Finding("env.node-abi", ver, "fail", f"{ver} was built for node ABI {recorded}; node is "
                               f"{node.version} (ABI {node.abi}), so its native modules will not load",
                               hint=f"npm rebuild --prefix {os.path.join(ctx.paths.install_root, ver)}, or reinstall it"))
        else:
            out.append(_ok("env.node-abi", ver, f"{ver} matches node ABI {node.abi}"))
        engines = entry.get("engines_node")
        if engines and engines_satisfied(node.version, str(engines)) is False:
            out.append(Finding("env.engines", ver, "warn", _engines_sentence(
                ctx.config.get("npm", "package"), ver, str(engines), node)))
    return out


@probe("env")
def probe_env_accounts(ctx: Context, facts: Facts) -> list[Finding]:
    uid, gid = _lookup_ids(ctx.config.get("service", "user"), ctx.config.get("service", "group"))
    if uid is None or gid is None:
        return [Finding("env.accounts", None, "fail", "the service user or group does not exist",
                        hint="run abssctl init --allow-create-user")]
    return [_ok("env.accounts", None, "the service user and group exist")]


@probe("config")
def probe_config(ctx: Context, facts: Facts) -> list[Finding]:
    out = [_ok("config.file", ctx.config.path, "the configuration parses")]
    out += [Finding("config.unknown-key", key, "warn", f"unknown configuration key {key} is ignored",
                    hint="remove it, or fix its spelling") for key in ctx.config.unknown]
    for name in TEMPLATE_NAMES:
        try:
            render(ctx.paths.templates_dir, name, sample_values(name))
            out.append(_ok("config.template", name, f"template {name} renders"))
        except UsageError as exc:
            out.append(Finding("config.template", name, "fail", exc.message, hint=exc.hint))
    return out


@probe("state")
def probe_state(ctx: Context, facts: Facts) -> list[Finding]:
    out = [Finding("state.registry", what, "fail", message, hint="restore it from its .prev copy")
           for what, message in facts.errors.items() if what in ("instances", "ports", "versions", "backups")]
    for name, entry in sorted(facts.instances.items()):
        port = str(entry.get("port"))
        owner = (facts.ports.get(port) or {}).get("instance")
        if owner != name:
            reg = ctx.registry("ports")
            fix = (lambda plan, name=name, port=port: _registry_step(
                ctx, plan, reg, port, {"instance": name, "reserved_at": _now()}, f"reserve port {port} for {name}")) \
                if owner is None else None
            out.append(Finding("state.ports", name, "fail", f"port {port} of {name} is reserved by "
                               f"{owner or 'nobody'}", fix=fix))
        for what, path in (("unit", ctx.paths.unit_file(name)), ("vhost", ctx.paths.vhost_file(name)),
                           ("dir", ctx.paths.instance_dir(name))):
            if not os.path.lexists(path):
                out.append(Finding("state.drift", name, "fail", f"{name} is registered but its {what} {path} is "
                                   "missing", hint="abssctl doctor --fix re-renders units and vhosts; a missing "
                                   "directory needs a restore: abssctl backup restore"))
    for port, res in sorted(facts.ports.items()):
        if res.get("instance") not in facts.instances:
            out.append(Finding("state.ports", port, "warn", f"port {port} is reserved for {res.get('instance')}, "
                               "which is not registered"))
    for d, pattern in ((ctx.paths.unit_dir, "abssctl-"), (ctx.paths.sites_available, "abssctl-")):
        try:
            names = os.listdir(d)
        except OSError:
            continue
        for fname in sorted(names):
            if fname.startswith(pattern) and fname.endswith((".service", ".conf")):
                inst = fname[len(pattern):].rsplit(".", 1)[0]
                if inst not in facts.instances:
                    out.append(Finding("state.drift", inst, "warn", f"{os.path.join(d, fname)} belongs to no "
                                       "registered instance", hint="abssctl init --discover shows what is there; "
                                       "init --rebuild-state re-registers it (or remove it)"))
    link = ctx.paths.current
    current = facts.versions_doc.get("current")
    on_disk = os.readlink(link) if os.path.islink(link) else None
    if current != on_disk and (current or on_disk):
        out.append(Finding("state.current", None, "fail", f"{link} points at {on_disk}; the registry says {current}",
                           hint="abssctl version switch VER sets both"))
    out += _journal_findings(ctx)
    out += _lock_findings(ctx)
    out += _leftover_findings(ctx)
    if len(out) == 0:
        out.append(_ok("state.registry", None, "registries, units, vhosts and directories agree"))
    return out


def _journal_findings(ctx: Context) -> list[Finding]:
    out = []
    for path, doc in list_journals(ctx.paths.journal_dir):
        if doc and not pid_alive(int(doc.get("pid") or 0)):
            settle = "finishes its cleanup" if "cleanup" in doc else "rolls it back"
            out.append(Finding("state.journal", doc.get("op_id"), "fail",
                               f"{doc.get('command')} ({doc.get('op_id')}) was interrupted and left a journal",
                               hint=f"abssctl doctor --fix (or any mutating command) {settle}",
                               fix=lambda plan: plan.add("state.recover", "settle interrupted operations",
                                                         ctx.paths.journal_dir, lambda: recover_journals(ctx))))
    return out


def _lock_findings(ctx: Context) -> list[Finding]:
    out = []
    try:
        names = sorted(os.listdir(ctx.paths.run_dir))
    except OSError:
        return out
    for name in names:
        path = os.path.join(ctx.paths.run_dir, name)
        if name.endswith(".lock") and lock_state(path) == "stale":
            def clear(plan: Plan, path: str = path) -> None:
                plan.add("state.lock", f"clear the stale holder note in {path}", path,
                         lambda: _clear_lock_note(path))
            out.append(Finding("state.lock", name, "warn", f"{path} names a process that is gone (stale)", fix=clear))
    return out


def _clear_lock_note(path: str) -> None:
    lock = FileLock(path)
    lock.acquire(0, {}, lambda _m: None)
    try:
        assert lock.fd is not None
        os.ftruncate(lock.fd, 0)
    finally:
        lock.release()


def _leftover_findings(ctx: Context) -> list[Finding]:
    """Temp, staging, smoke and trash names (§3.5) over an hour old whose op id no journal holds, in
    every directory abssctl writes beside its targets."""
    import time
    journaled = {str((d or {}).get("op_id")) for _p, d in list_journals(ctx.paths.journal_dir)}
    p = ctx.paths
    roots = [p.install_root, p.instance_root, p.backup_root, p.tls_dir, p.state_dir, p.registry_dir,
             p.unit_dir, p.sites_available, p.sites_enabled]
    for top in (p.instance_root, p.backup_root, p.tls_dir):
        try:
            roots += [os.path.join(top, n) for n in sorted(os.listdir(top)) if NAME_RE.match(n)]
        except OSError:
            pass
    out = []
    for root in roots:
        try:
            names = os.listdir(root)
        except OSError:
            continue
        for name in sorted(names):
            path = os.path.join(root, name)
            if not name.startswith(TEMP_MARKERS) or time.time() - os.lstat(path).st_mtime < 3600:
                continue
            op = re.search(r"\d{8}T\d{6}Z-[0-9a-f]{8}", name)
            if op and op.group(0) in journaled:
                continue
            out.append(Finding("state.leftover", path, "warn", f"{path} is left over from an interrupted operation",
                               fix=lambda plan, path=path: plan.add("state.leftover", f"remove {path}", path,
                                                                    lambda: remove_tree(path))))
    return out


def _mode_finding(ctx: Context, path: str, mode: int, uid: int, gid: int, label: str) -> Finding | None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    as_root = os.geteuid() == 0
    wrong_owner = as_root and (st.st_uid, st.st_gid) != (uid, gid)
    if (st.st_mode & 0o7777) == mode and not wrong_owner:
        return None

    def fix(plan: Plan) -> None:
        def do() -> None:
            if as_root:
                os.chown(path, uid, gid, follow_symlinks=False)
            os.chmod(path, mode)
        plan.add("fs.mode", f"set {path} to {mode:04o} {label}", path, do,
                 UndoAction("restore_mode", path=path, mode=st.st_mode & 0o7777, uid=st.st_uid, gid=st.st_gid))
    return Finding("fs.mode", path, "fail", f"{path} is {st.st_mode & 0o7777:04o} {st.st_uid}:{st.st_gid}; "
                   f"it should be {mode:04o} {label}", fix=fix)


@probe("fs", timeout=20)
def probe_fs(ctx: Context, facts: Facts) -> list[Finding]:
    import pwd
    out: list[Finding] = []
    gid = ctx.service_gid()
    try:
        uid = pwd.getpwnam(ctx.config.get("service", "user")).pw_uid
    except KeyError:
        uid = 0
    for attr, owner, mode in INIT_DIRS:
        f = _mode_finding(ctx, getattr(ctx.paths, attr), mode, 0, gid if owner == "group" else 0,
                          owner_label(owner, ctx.config.get("service", "group")))
        if f:
            out.append(f)
    for name in sorted(facts.instances):
        root, tdir = ctx.paths.instance_dir(name), os.path.join(ctx.paths.tls_dir, name)
        entry = facts.instances[name]
        i_user, i_group = run_as(ctx, entry)
        iuid, igid = _lookup_ids(i_user, i_group)
        if iuid is None or igid is None:
            out.append(Finding("fs.owner", name, "fail", f"{name} runs as {i_user}, which does not exist",
                               hint="run abssctl doctor --fix (it recreates the user), or restore the account"))
            continue
        uid, gid = iuid, igid
        wanted = [(path, mode, 0 if owner == "root" else uid, gid, f"{owner}:{grp_name}")
                  for path, mode, owner, grp_name in instance_layout(ctx, name, bool(entry.get("user")),
                                                                      i_user, i_group)]
        wanted += [(tdir, 0o700, 0, 0, "root:root")]
        wanted += [(os.path.join(tdir, f + prev), mode, 0, 0, "root:root") for f, mode in
                   (("privkey.pem", 0o600), ("fullchain.pem", 0o644)) for prev in ("", ".prev")]
        for path, mode, u, g, label in wanted:
            f = _mode_finding(ctx, path, mode, u, g, label)
            if f:
                out.append(f)
        data = os.path.join(root, "data")
        rooted = []
        for dirpath, dirs, files in os.walk(data):
            for n in dirs + files:
                p = os.path.join(dirpath, n)
                if os.lstat(p).st_uid != uid:
                    rooted.append(p)
        if rooted and uid != 0:
            def chown_all(plan: Plan, rooted: list[str] = rooted, uid: int = uid, gid: int = gid) -> None:
                plan.add("fs.owner", f"give {len(rooted)} data file(s) back to the service user", rooted[0],
                         lambda: [os.chown(p, uid, gid, follow_symlinks=False) for p in rooted] and None)
            out.append(Finding("fs.data-owner", name, "fail", f"{len(rooted)} file(s) in {data} are not owned by "
                               "the service user (the server cannot write them)", fix=chown_all))
        cfg = read_json_file(os.path.join(root, "config.json")) if os.path.isfile(os.path.join(root, "config.json")) \
            else None
        for key in ("dataDir", "serverFiles", "userFiles"):
            value = str((cfg or {}).get(key) or "")
            if value and (value.startswith(ctx.paths.install_root + "/") or "/node_modules/" in value):
                out.append(Finding("fs.data-location", name, "fail", f"{name}'s {key} {value} is inside a package "
                                   "tree: an upgrade would replace it", hint="move the data and fix config.json"))
        for left in sorted(os.listdir(root)) if os.path.isdir(root) else []:
            if left.startswith(("data.pre-restore-", "data.failed-")):
                out.append(Finding("fs.data-aside", name, "warn", f"{os.path.join(root, left)} was kept by a restore "
                                   "or a failed upgrade", hint="delete it once you no longer need it"))
    return out or [_ok("fs.mode", None, "owners and modes are as they should be")]


@probe("fs", timeout=5)
def probe_users(ctx: Context, facts: Facts) -> list[Finding]:
    """Each instance runs as its own user (DESIGN 11.5); an old-style one (the shared user) is moved by
    --fix, one journal per instance (op_instance_own_user)."""
    if not ctx.config.get("service", "user_prefix"):
        return []
    out = []
    for name, entry in sorted(facts.instances.items()):
        user = entry.get("user")
        if user:
            out.append(_ok("fs.user", name, f"{name} runs as its own user {user}"))
            continue
        try:
            want = instance_account(ctx, name)
        except UsageError as exc:
            out.append(Finding("fs.user", name, "warn", f"{name} runs as the shared user: {exc.message}",
                               hint="rename it to a shorter name (abssctl instance rename), then doctor --fix"))
            continue
        out.append(Finding("fs.user", name, "warn", f"{name} runs as the shared user "
                           f"{ctx.config.get('service', 'user')}, so it could read the other instances' data",
                           hint=f"abssctl doctor --fix moves it to its own user {want} (stop, chown, re-render, "
                                "start behind the health gate)",
                           fix=lambda plan: None, data={"user": ctx.config.get("service", "user"), "wanted": want}))
    return out


def systemd_booted() -> bool:
    """systemd is PID 1 here (sd_booted's test): systemd-analyze security can ask it about units."""
    return os.path.isdir("/run/systemd/system")


EXPOSURE_RE = LazyRegex(r"Overall exposure level for \S+: ([0-9]+(?:\.[0-9]+)?) (\w+)")
EXPOSURE_MAX = 2.5


@probe("systemd", timeout=90)
def probe_exposure(ctx: Context, facts: Facts) -> list[Finding]:
    """systemd-analyze security per unit (slow-ish: one call each, on a small pool, 20 s each at most)."""
    if not facts.instances or not systemd_booted() or not ctx.runner.available("systemd_analyze"):
        return []

    def one(name: str) -> list[Finding]:
        unit = unit_name(name)
        try:
            res = ctx.runner.run("systemd_analyze", ["security", "--no-pager", unit], mutating=False, check=False)
        except AbssctlError as exc:
            return [Finding("systemd.exposure", name, "warn", f"systemd-analyze security {unit}: {exc.message}")]
        m = EXPOSURE_RE.search(res.stdout)
        if not m:
            return [Finding("systemd.exposure", name, "warn", f"systemd-analyze security {unit} printed no "
                            "exposure level", hint=f"run systemd-analyze security {unit}")]
        level = float(m.group(1))
        data = {"exposure": level, "label": m.group(2), "unit": unit}
        if level > EXPOSURE_MAX:
            return [Finding("systemd.exposure", name, "warn", f"{unit} has an exposure of {level} ({m.group(2)}), "
                            f"above {EXPOSURE_MAX}", hint="the unit is not the hardened one: abssctl doctor --fix "
                            "re-renders it", data=data)]
        return [_ok("systemd.exposure", name, f"{unit}: exposure {level} ({m.group(2)})", data=data)]
    return _each(sorted(facts.instances), one)


@probe("ports")
def probe_ports(ctx: Context, facts: Facts) -> list[Finding]:
    out = []
    base, top = ctx.config.get("ports", "base"), ctx.config.get("ports", "max")
    seen: dict[int, str] = {}
    for name, entry in sorted(facts.instances.items()):
        port = int(entry.get("port") or 0)
        if port in seen:
            out.append(Finding("ports.duplicate", name, "fail", f"{name} and {seen[port]} both use port {port}"))
        seen[port] = name
        if not base <= port <= top:
            out.append(Finding("ports.range", name, "warn", f"port {port} of {name} is outside {base}-{top}"))
        unit = facts.units.get(unit_name(name), {})
        active = unit.get("ActiveState") == "active"
        inodes = facts.listeners.get(port, set())
        if active and not inodes:
            out.append(Finding("ports.listening", name, "fail", f"{name} runs but nothing listens on {port}",
                               hint=f"see abssctl instance logs {name}"))
        elif inodes:
            main = int(unit.get("MainPID") or 0)
            owners = {facts.socket_pids[i] for i in inodes if i in facts.socket_pids}
            if main and owners and not owners & _descendants(main):
                out.append(Finding("ports.foreign", name, "fail", f"port {port} of {name} is held by pid "
                                   f"{sorted(owners)[0]}, not by its unit", hint="stop that process, or move "
                                   f"{name}: abssctl instance set-port"))
            elif not active:
                out.append(Finding("ports.foreign", name, "fail", f"{name} is stopped but something listens on {port}",
                                   hint=f"find it with ss -ltnp 'sport = :{port}'"))
    return out or [_ok("ports.listening", None, "every port is where it should be")]


@probe("systemd", timeout=10)
def probe_systemd(ctx: Context, facts: Facts) -> list[Finding]:
    out = []
    versions = Versions(ctx)
    for name, entry in sorted(facts.instances.items()):
        path = ctx.paths.unit_file(name)
        unit = facts.units.get(unit_name(name), {})
        try:
            fresh = render_unit(ctx, name, int(entry["port"]), str(entry.get("resolved_version")), versions,
                                run_as(ctx, entry))
        except AbssctlError as exc:
            out.append(Finding("systemd.unit", name, "fail", f"cannot render the unit of {name}: {exc.message}"))
            continue
        current = open(path, "rb").read() if os.path.isfile(path) else None
        if current != fresh:
            out.append(Finding("systemd.unit", name, "fail" if current is None else "warn",
                               f"{path} is {'missing' if current is None else 'not what abssctl would write'}",
                               fix=lambda plan, name=name, fresh=fresh: _unit_step(
                                   ctx, plan, name, fresh, f"re-render {ctx.paths.unit_file(name)}")))
        enabled = unit.get("UnitFileState") == "enabled"
        if bool(entry.get("enabled")) != enabled and current is not None:
            verb = "enable" if entry.get("enabled") else "disable"
            out.append(Finding("systemd.enabled", name, "warn", f"{unit_name(name)} should be {verb}d",
                               fix=lambda plan, verb=verb, name=name: _systemctl_step(
                                   ctx, plan, verb, unit_name(name), None)))
        state = unit.get("ActiveState")
        if state == "failed":
            out.append(Finding("systemd.failed", name, "fail", f"{unit_name(name)} has failed",
                               hint=f"see abssctl instance logs {name}",
                               fix=lambda plan, name=name, entry=entry: _start_and_gate_step(
                                   ctx, plan, name, int(entry["port"]), str(entry["resolved_version"]), {},
                                   verb="restart")))
        elif state != "active" and entry.get("enabled"):
            out.append(Finding("systemd.inactive", name, "warn", f"{name} is enabled but {state or 'not running'}",
                               hint=f"abssctl instance start {name}"))
        out += _config_findings(ctx, name, entry, state == "active" or bool(entry.get("enabled")))
    return out or [_ok("systemd.unit", None, "units match, are enabled as registered, and run")]


def _config_findings(ctx: Context, name: str, entry: Mapping[str, Any], restart: bool) -> list[Finding]:
    """config.json (the --config of ExecStart) against a fresh render; --fix re-renders it atomically,
    keeping the file's mode and group (fs.mode judges those), then restarts the instance behind the
    health gate when it runs or should (the server reads the file only at start)."""
    config, port = os.path.join(ctx.paths.instance_dir(name), "config.json"), int(entry["port"])
    fresh = server_config(ctx.paths.instance_dir(name), port)
    current, mode, gid, broken = None, 0o640, ctx.service_gid(), True
    try:
        with open(config, "rb") as f:
            current = f.read()
            st = os.fstat(f.fileno())
        mode, gid = st.st_mode & 0o7777, st.st_gid
        broken = not isinstance(json.loads(current), dict)
    except (OSError, ValueError):
        pass
    if current == fresh:
        return []
    def fix(plan: Plan) -> None:
        _file_step(ctx, plan, "config.write", config, fresh, mode, gid, f"re-render {config}")
        if restart:
            _start_and_gate_step(ctx, plan, name, port, str(entry["resolved_version"]), {}, verb="restart")
    usable = os.path.isdir(ctx.paths.instance_dir(name)) and not os.path.isdir(config)
    if broken:
        return [Finding("systemd.config", name, "fail", f"{config} is missing or not JSON: the server exits 0 and "
                        "systemd never restarts it", hint="abssctl doctor --fix re-renders it",
                        fix=fix if usable else None)]
    return [Finding("systemd.config", name, "warn", f"{config} is not what abssctl would write",
                    hint="abssctl doctor --fix re-renders it and restarts the instance", fix=fix if usable else None)]


def parse_nginx_dump(text: str) -> dict[str, str]:
    """nginx -T output -> {file path: contents}."""
    files: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("# configuration file ") and line.endswith(":"):
            current = line[len("# configuration file "):-1]
            files[current] = ""
        elif current is not None:
            files[current] += line + "\n"
    return files


def _size_bytes(text: str) -> int:
    m = re.match(r"^(\d+)([kKmMgG]?)$", text.strip())
    if not m:
        return 0
    return int(m.group(1)) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m.group(2).lower()]


def _directives(text: str) -> list[tuple[list[str], str, str]]:
    """(enclosing block names, directive, first argument) of each simple directive in nginx text."""
    stack: list[str] = []
    found = []
    for m in re.finditer(r"([^{};]*)([{};])", re.sub(r"#[^\n]*", "", text)):
        words, ch = m.group(1).split(), m.group(2)
        if ch == "{":
            stack.append(words[0] if words else "")
        elif ch == "}":
            stack = stack[:-1]
        elif len(words) > 1:
            found.append((list(stack), words[0], words[1]))
    return found


def _vhost_body_limit(files: Mapping[str, str], vhost: str, text: str) -> tuple[str, str] | None:
    """The client_max_body_size our vhost sets itself (its includes followed), and the file it is in."""
    import fnmatch
    found = None
    for _blocks, word, arg in _directives(text):
        if word == "client_max_body_size":
            found = (arg, vhost)
        elif word == "include":
            for path, body in files.items():
                if fnmatch.fnmatch(path, arg) or fnmatch.fnmatch(path, "*/" + arg):
                    found = next(((a, path) for _b, w, a in reversed(_directives(body))
                                  if w == "client_max_body_size"), found)
    return found


@probe("nginx", timeout=15)
def probe_nginx(ctx: Context, facts: Facts) -> list[Finding]:
    out = []
    if facts.nginx_ok is None:
        return [Finding("nginx.test", None, "fail", "nginx is not installed", hint=INSTALL_HINTS["nginx"])]
    try:
        ctx.runner.run("nginx", ["-t"], mutating=False, timeout=12)
        out.append(_ok("nginx.test", None, "nginx -t passes"))
    except ProviderError as exc:
        out.append(Finding("nginx.test", None, "fail", "nginx -t fails: " + " ".join(exc.details.get("stderr", [])[:2])))
    files = parse_nginx_dump(facts.nginx_dump)
    need = max(SERVER_UPLOAD.values())                  # MB: what the server accepts (§4.6.1)
    outside = "\n".join(text for path, text in files.items() if not os.path.basename(path).startswith("abssctl-"))
    names_seen: dict[str, str] = {}
    reported: set[tuple[str, str]] = set()
    for path, text in files.items():
        for m in re.finditer(r"server_name\s+([^;]+);", text):
            for server in m.group(1).split():
                if server in names_seen and names_seen[server] != path and (server, path) not in reported:
                    reported.add((server, path))            # once per file, not per server block
                    out.append(Finding("nginx.server-name", server, "warn", f"{server} is served by {path} and "
                                       f"{names_seen[server]}"))
                names_seen.setdefault(server, path)
    http_level = None                                   # the last http-level one applies where a server sets none
    for path, body in files.items():
        if not os.path.basename(path).startswith("abssctl-"):
            http_level = next(((a, path) for blocks, w, a in reversed(_directives(body)) if w ==
                               "client_max_body_size" and set(blocks) <= {"http"}), http_level)
    for name, entry in sorted(facts.instances.items()):
        vhost, link = ctx.paths.vhost_file(name), ctx.paths.vhost_link(name)
        try:
            fresh = render_vhost(ctx, name, entry["domain"], int(entry["port"]), entry["tls"])
        except AbssctlError as exc:
            out.append(Finding("nginx.vhost", name, "fail", f"cannot render the vhost of {name}: {exc.message}"))
            continue
        current = open(vhost, "rb").read() if os.path.isfile(vhost) else None
        if current != fresh or os.path.realpath(link) != os.path.realpath(vhost) or not os.path.lexists(link):
            out.append(Finding("nginx.vhost", name, "fail" if current is None else "warn",
                               f"{vhost} is {'missing' if current is None else 'not what abssctl would write'} "
                               "or not enabled", fix=lambda plan, name=name, vhost=vhost, link=link, fresh=fresh:
                               _nginx_publish_step(ctx, plan, {vhost: fresh}, {link: vhost}, (),
                                                   f"re-render {vhost}", vhost)))
        text = (current or b"").decode("utf-8", "replace")
        size, source = _vhost_body_limit(files, vhost, text) or http_level or ("1m", "")
        if 0 < _size_bytes(size) < need << 20:          # 0 is nginx's "no limit"
            hint = (f"set [nginx] client_max_body_size = \"{need}M\" in {ctx.config.path}, then abssctl doctor "
                    "--fix" if source == vhost else f"remove the override in {source} or raise it to {need}M"
                    if source else f"nginx's default is 1m: set client_max_body_size {need}M")
            out.append(Finding("nginx.body-size", name, "fail", f"client_max_body_size is {size} for "
                               f"{entry['domain']}; sync uploads up to {need}M will get 413", hint=hint,
                               data={"effective": size, "required": f"{need}M"}))
        if re.search(r"add_header\s+Cross-Origin-(Opener|Embedder)-Policy", text + outside, re.IGNORECASE):
            out.append(Finding("nginx.coop", name, "fail", "an add_header Cross-Origin-* applies to "
                               f"{entry['domain']}: the server sends these itself, and doubled headers break the app",
                               hint="remove the add_header lines"))
    return out


def _through_nginx(context: Any, port: int, domain: str, path: str | None = None) -> tuple[bytes | None,
                                                                                         list[str]]:
    """(the certificate nginx serves for ``domain`` over loopback with SNI, the lower-cased header names of
    its answer to ``GET path`` with that Host); (None, []) when it does not answer within 1 s + 3 s."""
    import socket
    import time
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as raw, \
                context.wrap_socket(raw, server_hostname=domain) as tls:
            deadline = time.monotonic() + 3
            tls.settimeout(3)
            cert, head = tls.getpeercert(binary_form=True), b""
            if path:
                tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {domain}\r\nConnection: close\r\n\r\n".encode())
                while b"\r\n\r\n" not in head and len(head) < 1 << 16 and time.monotonic() < deadline:
                    chunk = tls.recv(4096)
                    if not chunk:
                        break
                    head += chunk
            lines = head.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")[1:]
            return cert, [line.split(":", 1)[0].strip().lower() for line in lines if ":" in line]
    except OSError:
        return None, []


@probe("nginx", timeout=10)
def probe_nginx_live(ctx: Context, facts: Facts) -> list[Finding]:
    """A real request through the vhost: the server's COOP and COEP headers arrive exactly once."""
    https = int(ctx.config.get("nginx", "https_port"))
    wanted = ("cross-origin-opener-policy", "cross-origin-embedder-policy")

    def one(name: str) -> list[Finding]:
        domain = str(facts.instances[name].get("domain"))
        if facts.units.get(unit_name(name), {}).get("ActiveState") != "active":
            return []
        # "/" (the web app) is where the server sends COOP and COEP; /health and /info carry neither.
        served, heads = _through_nginx(facts.tls_client, https, domain, "/")
        counts = {h: heads.count(h) for h in wanted}
        where = f"https://{domain}/ through nginx on 127.0.0.1:{https}"
        if served is None or not heads:
            return [Finding("nginx.live", name, "warn", f"{where} did not answer within 4 s")]
        if max(counts.values()) > 1:
            return [Finding("nginx.live", name, "fail", f"{where} sends " + " and ".join(
                f"{n} {h}" for h, n in counts.items() if n > 1) + " headers: doubled, they break the web app",
                hint="remove add_header Cross-Origin-* lines that apply to it", data=counts)]
        if min(counts.values()) == 0:
            return [Finding("nginx.live", name, "warn", f"{where} lacks " + " and ".join(
                h for h, n in counts.items() if n == 0) + ": the web app needs both (SharedArrayBuffer)",
                hint="look for proxy_hide_header lines that apply to it", data=counts)]
        return [_ok("nginx.live", name, f"{where} sends one COOP and one COEP header", data=counts)]
    return _each(sorted(facts.instances), one) if facts.nginx_ok is not None and https in facts.listeners else []


@probe("tls", timeout=20)
def probe_tls(ctx: Context, facts: Facts) -> list[Finding]:
    import time
    out = []
    seen: dict[tuple[str, str], tuple[CertInfo | None, str | None]] = {}
    for name, entry in sorted(facts.instances.items()):
        tls = entry.get("tls") or {}
        cert, key = str(tls.get("cert") or ""), str(tls.get("key") or "")
        pair = (cert, key)
        if pair not in seen:
            try:
                Tls.check_pair(cert, key)
                seen[pair] = (Tls(ctx.runner).inspect(cert), None)
            except AbssctlError as exc:
                seen[pair] = (None, exc.message)
        info, problem = seen[pair]
        if problem:
            out.append(Finding("tls.pair", name, "fail", problem, hint=f"abssctl tls verify {name}"))
            continue
        assert info is not None
        days = (info.not_after - time.time()) / 86400
        if days < 0:
            out.append(Finding("tls.expiry", name, "fail", f"the certificate of {entry['domain']} expired "
                               f"{rfc3339(info.not_after)[:10]}", data={"not_after": rfc3339(info.not_after)}))
        elif days < 21:
            out.append(Finding("tls.expiry", name, "warn", f"certificate for {entry['domain']} expires in {int(days)} "
                               f"days ({rfc3339(info.not_after)[:10]})", hint=f"renew it, then run: abssctl tls install "
                               f"{name} --cert … --key …", data={"not_after": rfc3339(info.not_after)}))
        if not info.covers(str(entry.get("domain"))):
            out.append(Finding("tls.san", name, "warn", f"the certificate does not name {entry['domain']}"))
        mode = os.stat(key).st_mode & 0o777 if os.path.exists(key) else 0
        if mode & 0o037:
            out.append(Finding("tls.key-mode", name, "warn", f"{key} is {mode:04o}; keys should be 0600"))
    return out or [_ok("tls.pair", None, "certificates match their keys and are valid")]


@probe("tls", timeout=10)
def probe_tls_served(ctx: Context, facts: Facts) -> list[Finding]:
    """The certificate nginx serves equals the file (a renewal written in place needs a reload)."""
    import ssl
    https = int(ctx.config.get("nginx", "https_port"))

    def one(name: str) -> list[Finding]:
        entry = facts.instances[name]
        cert = str((entry.get("tls") or {}).get("cert") or "")
        served = _through_nginx(facts.tls_client, https, str(entry.get("domain")))[0]
        if served is None or not os.path.isfile(cert):
            return []
        blocks = re.findall(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----",
                            open(cert, encoding="ascii", errors="replace").read(), re.S)
        if blocks and ssl.PEM_cert_to_DER_cert(blocks[0]) != served:
            return [Finding("tls.served", name, "warn", f"nginx serves an older certificate for {entry['domain']} "
                            f"than {cert}", hint="abssctl doctor --fix reloads nginx",
                            fix=lambda plan: plan.add("nginx.reload", "reload nginx", "nginx",
                                                      lambda: Nginx(ctx.runner).reload()))]
        return [_ok("tls.served", name, f"nginx serves {cert} for {entry['domain']}")]
    return _each(sorted(facts.instances), one) if https in facts.listeners else []


def _renew_hook_fix(ctx: Context, conf: str, text: str, command: str) -> Callable[[Plan], None] | None:
    """doctor --fix for a renewal conf that runs no hook at all: add abssctl's deploy hook under
    [renewalparams], where certbot records --deploy-hook itself. None (a hint only) when the conf has no
    such section, or COMMAND holds a character certbot's conf syntax would read otherwise."""
    lines = text.splitlines(keepends=True)
    at = next((i for i, line in enumerate(lines) if line.strip() == "[renewalparams]"), None)
    if at is None or re.search(r"[\"'#,]", command):
        return None
    lines[at] = lines[at].rstrip("\r\n") + "\n"
    data = "".join([*lines[:at + 1], f"renew_hook = {command}\n", *lines[at + 1:]]).encode()
    st = os.stat(conf)
    return lambda plan: _file_step(ctx, plan, "tls.renew-hook", conf, data, st.st_mode & 0o7777, st.st_gid,
                                   f"add abssctl's deploy hook to {conf}", uid=st.st_uid)


@probe("tls", timeout=10)
def probe_tls_renewal(ctx: Context, facts: Facts) -> list[Finding]:
    """Instances on a certbot lineage: its renewal conf runs abssctl's deploy hook, and certbot.timer
    is enabled (certbot renews; the hook makes nginx serve the result)."""
    users = {n: _lineage_of(e.get("tls") or {}) for n, e in sorted(facts.instances.items())}
    users = {n: lineage for n, lineage in users.items() if lineage}
    if not users:
        return []
    out = []
    for name, lineage in users.items():
        cert = os.path.normpath(str(facts.instances[name]["tls"].get("cert") or ""))
        if cert != os.path.join(lineage, "fullchain.pem"):     # left there by a refused renewal
            out.append(Finding("tls.pinned", name, "warn", f"{name} is served from {cert}, not from {lineage}: "
                               "tls deploy-hook refused a renewed pair, so renewals do not reach it",
                               hint=f"certbot renew --force-renewal --cert-name {os.path.basename(lineage)}; "
                                    "the deploy hook serves the lineage again once its pair verifies"))
        conf = os.path.join(ctx.paths.letsencrypt_dir, "renewal", os.path.basename(lineage) + ".conf")
        try:
            with open(conf, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError:
            text = ""
        hook = next((line.split("=", 1)[1].strip() for line in text.splitlines()
                     if re.match(r"^\s*(renew_hook|deploy_hook)\s*=", line)), "")
        if "tls deploy-hook" in hook:
            out.append(_ok("tls.deploy-hook", name, f"{conf} runs the deploy hook: {hook}"))
            continue
        command = deploy_hook_command(ctx)
        fix = None if hook else _renew_hook_fix(ctx, conf, text, command)
        why = f"{conf if text else 'no renewal conf ' + conf} does not run abssctl's deploy hook" + \
            (f" (it runs {hook})" if hook else "")
        out.append(Finding("tls.deploy-hook", name, "warn", f"{why}: after a renewal nginx keeps serving the old "
                           "certificate until it is reloaded", fix=fix, hint=(
                               "abssctl doctor --fix adds it" if fix else f"run: abssctl tls acme {name} --server "
                               "<the lineage's server> after certbot renew --force-renewal, or add")
                           + f" under [renewalparams]: renew_hook = {command}"))
    if ctx.runner.available("systemctl"):
        done = ctx.runner.run("systemctl", ["is-enabled", "certbot.timer"], mutating=False, check=False, timeout=8)
        state = done.stdout.strip() or "not found"
        if state == "enabled":
            out.append(_ok("tls.renewal-timer", None, "certbot.timer is enabled"))
        else:
            missing = state == "not found"      # Debian's certbot package ships the timer
            out.append(Finding("tls.renewal-timer", None, "warn", f"certbot.timer is {state}, so certificates of "
                               f"{', '.join(users)} are not renewed", hint="apt-get install certbot (its package "
                               "ships the timer)" if missing else "systemctl enable --now certbot.timer "
                               "(doctor --fix does it)", fix=None if missing else lambda plan: plan.add(
                                   "systemctl.enable", "systemctl enable --now certbot.timer", "certbot.timer",
                                   lambda: ctx.runner.run("systemctl", ["enable", "--now", "certbot.timer"],
                                                          mutating=True))))
    return out


@probe("app", timeout=10)
def probe_app(ctx: Context, facts: Facts) -> list[Finding]:
    names = sorted(facts.instances)

    def one(name: str) -> list[Finding]:
        entry = facts.instances[name]
        found = []
        unit = facts.units.get(unit_name(name), {})
        if unit.get("ActiveState") == "active":
            app = _probe_app(int(entry["port"]))
            if app["health"] != "UP":
                found.append(Finding("app.health", name, "fail", f"/health of {name} answers {app['health']}"))
            elif app["info_version"] != entry.get("resolved_version"):
                found.append(Finding("app.version", name, "warn" if entry.get("pending_restart") else "fail",
                                     f"{name} runs {app['info_version']}, the registry says "
                                     f"{entry.get('resolved_version')}"))
            else:
                found.append(_ok("app.health", name, f"{name} is UP on {app['info_version']}"))
        cfg = read_json_file(os.path.join(ctx.paths.instance_dir(name), "config.json")) \
            if os.path.isfile(os.path.join(ctx.paths.instance_dir(name), "config.json")) else {}
        proxies = (cfg or {}).get("trustedProxies") or []
        if not any(p.startswith("127.") for p in proxies) or not any(p.startswith("::1") for p in proxies):
            found.append(Finding("app.proxies", name, "warn", "trustedProxies does not cover 127.0.0.1 and ::1: "
                                 "every user shares one rate-limit bucket"))
        if (cfg or {}).get("hostname") not in (None, "127.0.0.1"):
            found.append(Finding("app.hostname", name, "fail", f"{name} listens on {cfg.get('hostname')}: it is "
                                 "reachable without TLS", hint="abssctl doctor --fix re-renders its config.json"))
        return found
    return _each(names, one)


@probe("disk")
def probe_disk(ctx: Context, facts: Facts) -> list[Finding]:
    out = []
    for label, path in (("install_root", ctx.paths.install_root), ("instance_root", ctx.paths.instance_root),
                        ("backup_root", ctx.paths.backup_root), ("state_dir", ctx.paths.state_dir)):
        probe_path = _nearest_existing(path)
        st = os.statvfs(probe_path)
        free = st.f_bavail / st.f_blocks if st.f_blocks else 1
        inodes = st.f_favail / st.f_files if st.f_files else 1
        worst = min(free, inodes)
        status = "fail" if worst < 0.05 else "warn" if worst < 0.10 else "ok"
        out.append(Finding("disk.free", label, status, f"{path}: {free:.0%} space and {inodes:.0%} inodes free"))
    return out


@probe("backups")
def probe_backups(ctx: Context, facts: Facts) -> list[Finding]:
    import time
    out = []
    for name in sorted(facts.instances):
        mine = [b for b in facts.backups.values() if isinstance(b, dict) and b.get("instance") == name]
        ok = [b for b in mine if b.get("status") in ("ok", "adopted")]
        newest = max((str(b.get("created_at")) for b in ok), default=None)
        if newest is None:
            out.append(Finding("backups.age", name, "warn", f"{name} has no backup", hint=f"abssctl backup create {name}"))
        elif time.time() - _parse_ts(newest) > 7 * 86400:
            out.append(Finding("backups.age", name, "warn", f"the newest backup of {name} is from {newest}",
                               hint=f"abssctl backup create {name}"))
        if any(b.get("status") == "corrupt" for b in mine):
            out.append(Finding("backups.verify", name, "fail", f"a backup of {name} failed verification",
                               hint="abssctl backup verify --all; take a new backup"))
    missing = [b for b in facts.backups.values() if isinstance(b, dict) and b.get("status") != "missing"
               and not os.path.isfile(os.path.join(ctx.paths.backup_root, str(b.get("archive"))))]
    if missing:
        out.append(Finding("backups.index", None, "warn", f"{len(missing)} indexed backup(s) have no archive",
                           hint="abssctl backup reconcile"))
    return out or [_ok("backups.age", None, "every instance has a recent, verified backup")]


def run_probes(ctx: Context, only: Sequence[str], exclude: Sequence[str]) -> list[Finding]:
    """Gather the facts once, then run the selected probes, eight at a time, each on a daemon thread
    with its own time limit (counted from its start): a probe past it is a failed finding, and doctor
    goes on without waiting for it."""
    import threading
    import time
    facts = Facts(ctx)
    chosen = [(c, fn) for c, fn in PROBES if (not only or c in only) and c not in exclude]
    slots = threading.BoundedSemaphore(8)
    runs: list[dict[str, Any]] = [{"done": threading.Event()} for _ in chosen]

    def work(run: dict[str, Any], category: str, fn: Callable[[Context, Facts], list[Finding]]) -> None:
        with slots:
            run["t0"] = time.monotonic()
            try:
                run["found"] = fn(ctx, facts)
            except AbssctlError as exc:
                run["found"] = [Finding(f"{category}.probe", fn.__name__[6:], "fail", exc.message, hint=exc.hint)]
            except BaseException as exc:        # a bug: re-raised below, on the main thread
                run["error"] = exc
            run["ms"] = int((time.monotonic() - run["t0"]) * 1000)
            run["done"].set()

    for run, (category, fn) in zip(runs, chosen):
        threading.Thread(target=work, args=(run, category, fn), name=fn.__name__, daemon=True).start()
    findings: list[Finding] = []
    for run, (category, fn) in zip(runs, chosen):
        limit = float(getattr(fn, "timeout", 5.0))
        while not run["done"].wait(0.02 if "t0" not in run else max(0.0, run["t0"] + limit - time.monotonic())):
            if "t0" in run and time.monotonic() >= run["t0"] + limit:
                break
        if not run["done"].is_set():
            found, ms = [Finding(f"{category}.timeout", fn.__name__[6:], "fail", f"{fn.__name__} timed out "
                                 f"after {limit:g}s", hint="run abssctl --debug doctor --only " + category)], \
                int(limit * 1000)
        elif "error" in run:
            raise run["error"]
        else:
            found, ms = run["found"], run["ms"]
        for f in found:
            f.duration_ms = ms
        findings += found
    return findings


def _doctor_doc(findings: Sequence[Finding], started: float) -> tuple[dict[str, Any], int]:
    counts = {s: sum(1 for f in findings if f.status == s) for s in ("ok", "warn", "fail", "skip")}
    fails = [CATEGORY_CLASS[f.category] for f in findings if f.status == "fail"]
    code = max(fails) if fails else 0
    return {"summary": {**counts, "exit_code": code, "duration_ms": int((utc_now() - started) * 1000)},
            "probes": [f.as_dict() for f in findings]}, code


def _move_to_own_users(ctx: Context, findings: Sequence[Finding]) -> bool:
    """doctor --fix: each old-style instance moves to its own user in a mutation (and journal) of its own."""
    changed = False
    for f in findings:
        if f.id == "fs.user" and f.fix and f.status != "ok" and f.target:
            ctx.op_id, ctx.started, ctx.journal = new_op_id(), utc_now(), None
            ctx.command = "doctor --fix"
            changed = bool(op_instance_own_user(ctx, f.target).changed) or changed
    return changed


def op_doctor(ctx: Context, *, only: Sequence[str], exclude: Sequence[str], fix: bool) -> Result:
    """Probe everything, report the worst failure as the exit code; --fix repairs only what is safe."""
    for cat in list(only) + list(exclude):
        if cat not in DOCTOR_CATEGORIES:
            raise UsageError(f"unknown doctor category {cat!r}", hint="categories: " + ", ".join(DOCTOR_CATEGORIES))
    if only and exclude:
        raise UsageError("give --only or --exclude, not both")
    started = utc_now()
    findings = run_probes(ctx, only, exclude)
    changed = False
    if fix and any(f.fix for f in findings if f.status != "ok"):
        def build() -> Plan:
            plan = Plan("doctor --fix")
            for f in run_probes(ctx, only, exclude):
                if f.fix and f.status != "ok" and f.id != "fs.user":
                    f.fix(plan)
            return plan
        # run_mutation rolls dead journals back before it re-plans, so the plan no longer holds that
        # repair: a journal that is gone afterwards is a change too (in the result and the ops log).
        dead = [p for p, d in list_journals(ctx.paths.journal_dir) if d and not pid_alive(int(d.get("pid") or 0))]
        m = Mutation(title="doctor --fix", build=build, global_mode="exclusive", target={"kind": "host"},
                     args={"only": list(only), "exclude": list(exclude)},
                     confirm=lambda plan: confirm(ctx, "Apply these repairs?\n" + "\n".join(
                         f"  {s.summary}" for s in plan.steps)))

        def finish(plan: Plan) -> dict[str, Any]:
            gone = [os.path.basename(p)[:-5] for p in dead if not os.path.exists(p)]
            if gone:
                m.log_extra.update(changed=True, recovered=gone)
            return {"recovered": gone}
        m.finish = finish
        ctx.command = "doctor --fix"
        res = run_mutation(ctx, m)
        changed = bool(res.changed) or bool(res.data.get("recovered"))
        if ctx.dry_run:
            return res
        changed = _move_to_own_users(ctx, run_probes(ctx, only, exclude)) or changed
        findings = run_probes(ctx, only, exclude)
    doc, code = _doctor_doc(findings, started)
    doc["changed"] = changed
    text = [f"{f.status.upper():4}  {f.id:18} {f.target or '':24} {f.message}" + (f"\n      hint: {f.hint}"
                                                                                  if f.hint else "")
            for f in findings if f.status != "ok" or ctx.out.debug]
    s = doc["summary"]
    text.append(f"{s['ok']} ok, {s['warn']} warn, {s['fail']} fail in {s['duration_ms']} ms")
    result = Result(doc, text)
    if code:
        result.ok = False
        exc = (HostError if code == 3 else ProviderError)(f"{s['fail']} probe(s) failed", hint="see probes[].hint")
        result.error = exc
    return result


# ============================================================================
# 8h. Operations: support bundle and discovery
# ============================================================================

SECRET_WORDS = r"password|passwd|secret|token|client_secret|api[_-]?key|authorization|ssl_password_file"
BUNDLE_CAP = 50 << 20


class Redactor:
    """Removes secrets always; with de-identification also domains, IPs and user names (stable tags)."""

    def __init__(self, deidentify: bool, domains: Sequence[str], users: Sequence[str]) -> None:
        self.deidentify = deidentify
        self.counts = {"secrets": 0, "keys": 0, "identities": 0}
        self.tags: dict[str, str] = {}
        self.domains = sorted({d for d in domains if d}, key=len, reverse=True)
        self.users = sorted({u for u in users if u and u != "root"}, key=len, reverse=True)

    def _tag(self, value: str, kind: str) -> str:
        if value not in self.tags:
            self.tags[value] = f"<{kind}-{sum(1 for t in self.tags.values() if t.startswith('<' + kind)) + 1}>"
        self.counts["identities"] += 1
        return self.tags[value]

    def text(self, text: str) -> str:
        text, n = re.subn(r"-----BEGIN ([A-Z ]*)PRIVATE KEY-----.*?-----END \1PRIVATE KEY-----",
                          "<private key removed>", text, flags=re.S)
        self.counts["keys"] += n
        text, n = re.subn(rf'(?i)("[^"]*(?:{SECRET_WORDS})[^"]*"\s*:\s*)("(?:[^"\\]|\\.)*"|[^,}}\s]+)',
                          r'\1"<redacted>"', text)
        self.counts["secrets"] += n
        text, n = re.subn(rf"(?im)^(\s*\S*(?:{SECRET_WORDS})\S*\s+)[^;\n]+;", r"\1<redacted>;", text)
        self.counts["secrets"] += n
        text, n = re.subn(rf"(?i)((?:{SECRET_WORDS})\s*[=:]\s*)\S+", r"\1<redacted>", text)
        self.counts["secrets"] += n
        text, n = re.subn(rf"(?im)^(\s*\S+\s+[\"']?\S*(?:{SECRET_WORDS})\S*[\"']?\s+)[^;\n]+;",
                          r"\1<redacted>;", text)       # proxy_set_header Authorization "Bearer …";
        self.counts["secrets"] += n
        if self.deidentify:
            for domain in self.domains:
                text = text.replace(domain, self._tag(domain, "domain"))
            text = re.sub(r"\b(?!127\.0\.0\.1\b)(?:\d{1,3}\.){3}\d{1,3}\b", lambda m: self._tag(m.group(0), "ip"), text)
            for user in self.users:
                text = re.sub(rf"\b{re.escape(user)}\b", lambda m: self._tag(m.group(0), "user"), text)
        return text

    def json(self, doc: Any) -> Any:
        """Drop secret-keyed values and openId sections, then redact the text."""
        def walk(value: Any) -> Any:
            if isinstance(value, dict):
                out = {}
                for k, v in value.items():
                    if k.lower() in ("openid", "openid_config") or re.search(SECRET_WORDS, k, re.I):
                        out[k] = "<redacted>"
                        self.counts["secrets"] += 1
                    elif k == "https" and isinstance(v, dict) and "key" in v:
                        out[k] = dict(v, key="<redacted>")
                        self.counts["secrets"] += 1
                    else:
                        out[k] = walk(v)
                return out
            if isinstance(value, list):
                return [walk(v) for v in value]
            return value
        return json.loads(self.text(json.dumps(walk(doc), sort_keys=True, indent=2)))


def _tail_file(path: str, lines: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 4 << 20))
            return "\n".join(f.read().decode("utf-8", "replace").splitlines()[-lines:]) + "\n"
    except OSError:
        return ""


def _tool_versions(ctx: Context) -> str:
    import platform
    lines = [version_line(), f"python {sys.version.split()[0]}"]
    try:
        lines.append("BUILD-INFO " + _read_resource("BUILD-INFO.json").decode())
    except OSError:
        lines.append("BUILD-INFO: (running from source)")
    runners = [("", ctx.runner)]
    try:
        for rid in sorted(installed_runtimes(ctx)):
            runners.append((f"{rid} ", ctx.runner.with_commands(
                **runtime_commands(os.path.join(ctx.paths.runtime_root, rid)))))
    except AbssctlError:
        pass
    for label, runner in runners:
        for tool, args in (("node", ["--version"]), ("npm", ["--version"]), ("nginx", ["-v"]),
                           ("openssl", ["version"]), ("zstd", ["--version"])):
            if label and tool not in ("node", "npm"):
                continue
            if runner.available(tool):
                done = runner.run(tool, args, mutating=False, check=False)
                text = (done.stdout or done.stderr).strip()
                lines.append(f"{label}{tool}: {text.splitlines()[0] if text else '?'}")
            else:
                lines.append(f"{label}{tool}: not installed")
    try:
        lines.append(open("/etc/os-release", encoding="utf-8").read())
    except OSError:
        pass
    lines.append(f"kernel {platform.release()} {platform.machine()}, glibc {host_glibc()}")
    return "\n".join(lines) + "\n"


def op_support_bundle(ctx: Context, output: str | None, *, redact: bool) -> Result:
    """A tar.gz a maintainer can read: doctor, config, registries, units, vhosts, logs; no secrets or data."""
    import io
    import socket
    import tarfile
    import time
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    dest = os.path.abspath(output or f"abssctl-support-{socket.gethostname()}-{stamp}.tar.gz")
    if os.path.isdir(dest) or not os.path.isdir(os.path.dirname(dest)):
        raise UsageError(f"cannot write {dest}: give a file path in an existing directory")
    facts = Facts(ctx)
    domains = [str(e.get("domain")) for e in facts.instances.values()]
    accounts = {name: run_as(ctx, e) for name, e in facts.instances.items()}
    red = Redactor(redact, domains, [ctx.config.get("service", "user"), os.environ.get("SUDO_USER", "")] +
                   [u for u, _g in accounts.values()])
    members: dict[str, bytes] = {}

    def add_text(name: str, text: str) -> None:
        members[name] = red.text(text).encode()

    def add_json(name: str, doc: Any) -> None:
        members[name] = (json.dumps(red.json(doc), sort_keys=True, indent=2) + "\n").encode()

    findings = run_probes(ctx, (), ())
    add_json("doctor.json", _doctor_doc(findings, utc_now())[0])
    add_json("config/effective.json", {"config": ctx.config.values, "sources": ctx.config.sources})
    if ctx.config.path_exists:
        add_text("config/config.toml", open(ctx.config.path, encoding="utf-8", errors="replace").read())
    for name in REGISTRY_FILES:
        add_json(f"registry/{name}.json", ctx.registry(name).load() if name not in facts.errors else {})
    add_json("registry/backups.json", {"backups": facts.backups})
    users = {}
    for name, (user, group) in sorted(accounts.items()):
        uid, gid = _lookup_ids(user, group)
        data = os.path.join(ctx.paths.instance_dir(name), "data")
        st = os.lstat(data) if os.path.lexists(data) else None
        owned = {"uid": st.st_uid, "gid": st.st_gid, "mode": f"{st.st_mode & 0o7777:04o}"} if st else None
        users[name] = {"user": user, "group": group, "uid": uid, "gid": gid,
                       "own": bool(facts.instances[name].get("user")), "data": owned}
    add_json("users.json", {"users": users})
    for name in sorted(facts.instances):
        cfg = os.path.join(ctx.paths.instance_dir(name), "config.json")
        if os.path.isfile(cfg):
            add_json(f"instances/{name}/config.json", read_json_file(cfg))
        for label, path in (("unit", ctx.paths.unit_file(name)), ("vhost", ctx.paths.vhost_file(name))):
            if os.path.isfile(path):
                add_text(f"instances/{name}/{os.path.basename(path)}", open(path, encoding="utf-8",
                                                                            errors="replace").read())
        cert = str((facts.instances[name].get("tls") or {}).get("cert") or "")
        if cert and os.path.isfile(cert) and ctx.runner.available("openssl"):
            try:                                # metadata only: the file itself may hold a key (TurnKey)
                info = Tls(ctx.runner).inspect(cert)
                meta = {"path": cert, "subject": info.subject, "issuer": info.issuer, "san": info.san,
                        "not_after": rfc3339(info.not_after), "fingerprint_sha256": info.fingerprint}
            except AbssctlError as exc:
                meta = {"path": cert, "error": exc.message}
            add_json(f"instances/{name}/certificate.json", meta)
        if ctx.runner.available("journalctl"):
            done = ctx.runner.run("journalctl", ["-u", unit_name(name), "-n", "500", "--no-pager", "-o", "short-iso"],
                                  mutating=False, check=False)
            add_text(f"instances/{name}/journal.txt", done.stdout)
    add_text("nginx/nginx-T.txt", facts.nginx_dump)
    add_text("versions.txt", _tool_versions(ctx))
    add_text("logs/operations.jsonl", _tail_file(ctx.paths.oplog, 1000))
    add_text("logs/abssctl.log", _tail_file(ctx.paths.textlog, 1000))
    if sum(len(v) for v in members.values()) > BUNDLE_CAP:
        for name in [n for n in members if n.startswith(("logs/", "instances/")) and n.endswith((".txt", ".log", ".jsonl"))]:
            members[name] = b"\n".join(members[name].splitlines()[-100:]) + b"\n"
    manifest = {"schema_version": 1, "created_at": rfc3339(utc_now()), "abssctl_version": __version__,
                "redacted": redact, "redactions": red.counts,
                "members": {n: len(d) for n, d in sorted(members.items())}}
    members["manifest.json"] = (json.dumps(manifest, sort_keys=True, indent=2) + "\n").encode()
    total = sum(len(v) for v in members.values())
    if total > BUNDLE_CAP:
        raise HostError(f"the support bundle would be {human_bytes(total)}, over the {human_bytes(BUNDLE_CAP)} cap",
                        hint="trim the logs in the log dir, then try again")
    tmp = os.path.join(os.path.dirname(dest), f".abssctl-tmp-{ctx.op_id}-{os.path.basename(dest)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            sink = HashingWriter(f.fileno())
            with tarfile.open(fileobj=sink, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
                for name in ["manifest.json"] + sorted(n for n in members if n != "manifest.json"):
                    info = tarfile.TarInfo(name)
                    info.size, info.mode, info.mtime = len(members[name]), 0o600, int(utc_now())
                    tar.addfile(info, io.BytesIO(members[name]))
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise
    digest = sha256_file(dest)
    write_sidecar(dest + ".sha256", dest, digest, 0o600, ctx.op_id)
    return Result({"bundle": {"path": dest, "sha256": digest, "size_bytes": os.path.getsize(dest),
                              "members": len(members), "redactions": red.counts, "redacted": redact}},
                  [f"wrote {dest} ({human_bytes(os.path.getsize(dest))}, {len(members)} files)", f"{digest}  "
                   f"{os.path.basename(dest)}"])


def discover(ctx: Context) -> dict[str, Any]:
    """What is on the host: abssctl units, vhosts, instance dirs and version trees, against the registries."""
    insts = Instances(ctx)
    found: dict[str, dict[str, Any]] = {}

    def slot(name: str) -> dict[str, Any]:
        return found.setdefault(name, {"name": name, "unit": None, "vhost": None, "root": None, "port": None,
                                       "domain": None, "version": None, "tls": None,
                                       "registered": name in insts.doc["instances"], "issues": []})
    for fname in sorted(os.listdir(ctx.paths.unit_dir)) if os.path.isdir(ctx.paths.unit_dir) else []:
        m = re.match(r"^abssctl-([a-z][a-z0-9-]{0,31})\.service\Z", fname)
        if not m:
            continue
        s = slot(m.group(1))
        s["unit"] = os.path.join(ctx.paths.unit_dir, fname)
        text = open(s["unit"], encoding="utf-8", errors="replace").read()
        port = re.search(r"^Environment=ACTUAL_PORT=(\d+)", text, re.M)
        ver = re.search(re.escape(ctx.paths.install_root) + r"/([^/\s]+)/node_modules/", text)
        s["port"] = int(port.group(1)) if port else s["port"]
        s["version"] = ver.group(1) if ver else None
    for fname in sorted(os.listdir(ctx.paths.sites_available)) if os.path.isdir(ctx.paths.sites_available) else []:
        m = re.match(r"^abssctl-([a-z][a-z0-9-]{0,31})\.conf\Z", fname)
        if not m:
            continue
        s = slot(m.group(1))
        s["vhost"] = os.path.join(ctx.paths.sites_available, fname)
        text = open(s["vhost"], encoding="utf-8", errors="replace").read()
        domain = re.search(r"server_name\s+([^;\s]+)", text)
        proxy = re.search(r"proxy_pass\s+http://127\.0\.0\.1:(\d+)", text)
        cert = re.search(r"ssl_certificate\s+([^;\s]+);", text)
        key = re.search(r"ssl_certificate_key\s+([^;\s]+);", text)
        s["domain"] = domain.group(1) if domain else None
        if proxy:
            if s["port"] and s["port"] != int(proxy.group(1)):
                s["issues"].append(f"the unit says port {s['port']}, the vhost {proxy.group(1)}")
            s["port"] = s["port"] or int(proxy.group(1))
        if cert and key:
            s["tls"] = {"cert": cert.group(1), "key": key.group(1)}
    for name in sorted(os.listdir(ctx.paths.instance_root)) if os.path.isdir(ctx.paths.instance_root) else []:
        cfg = os.path.join(ctx.paths.instance_root, name, "config.json")
        if NAME_RE.match(name) and os.path.isfile(cfg):
            s = slot(name)
            s["root"] = os.path.join(ctx.paths.instance_root, name)
            try:
                s["port"] = s["port"] or int((read_json_file(cfg) or {}).get("port") or 0) or None
            except (CorruptState, ValueError, TypeError):
                s["issues"].append(f"{cfg} is not valid JSON")
    for s in found.values():
        for what in ("unit", "vhost", "root"):
            if s[what] is None:
                s["issues"].append(f"no {what}")
    versions = []
    pkg = ctx.config.get("npm", "package")
    for ver in sorted(os.listdir(ctx.paths.install_root), key=semver_key) if os.path.isdir(ctx.paths.install_root) else []:
        manifest = os.path.join(ctx.paths.install_root, ver, "node_modules", *pkg.split("/"), "package.json")
        if SEMVER_RE.match(ver) and os.path.isfile(manifest):
            versions.append({"version": ver, "registered": ver in Versions(ctx).doc["versions"],
                             "path": os.path.join(ctx.paths.install_root, ver)})
    return {"instances": [found[n] for n in sorted(found)], "versions": versions,
            "current": os.readlink(ctx.paths.current) if os.path.islink(ctx.paths.current) else None}


def _discovered_tls(ctx: Context, s: Mapping[str, Any]) -> dict[str, Any]:
    """The TLS source of a found vhost: files under <tls_dir>/<name>/ are abssctl's self-signed pair when
    the certificate is what ``tls self-signed`` makes (self-issued, CN and only SAN the domain), else custom."""
    tls = {**(s["tls"] or {}), "chain": None}
    if not tls.get("cert", "").startswith(os.path.join(ctx.paths.tls_dir, s["name"]) + "/"):
        return {"source": "system", **tls}
    try:
        info = Tls(ctx.runner).inspect(tls["cert"])
        own = info.subject == info.issuer and info.subject.replace(" ", "") == f"CN={s['domain']}" \
            and info.san == [str(s["domain"]).lower()]
    except AbssctlError:
        own = False
    return {"source": "self-signed" if own else "custom", **tls}


def rebuild_plan(ctx: Context, plan: Plan, found: Mapping[str, Any]) -> None:
    """Registries written from what discover() found, after copying the old ones aside."""
    ports: dict[int, str] = {}
    domains: dict[str, str] = {}
    conflicts = []
    for s in found["instances"]:
        if s["port"] in ports:
            conflicts.append(f"port {s['port']}: {ports[s['port']]} and {s['name']}")
        if s["domain"] in domains:
            conflicts.append(f"domain {s['domain']}: {domains[s['domain']]} and {s['name']}")
        ports[s["port"]], domains[s["domain"]] = s["name"], s["name"]
    if conflicts:
        raise Conflict("cannot rebuild the registries: " + "; ".join(conflicts),
                       hint="fix the units or vhosts so each port and domain belongs to one instance")
    old_versions = Versions(ctx).doc
    old_insts = Instances(ctx).doc["instances"]
    try:                                 # the copy Registry.save keeps: the binding survives a lost file
        kept = (read_json_file(ctx.paths.registry("instances") + ".prev") or {}).get("instances") or {}
    except CorruptState:
        kept = {}
    now = _now()
    instances, port_doc = {}, {}
    for s in found["instances"]:
        if not (s["unit"] and s["root"] and s["port"]):
            continue
        prior = old_insts.get(s["name"], {})
        was = prior or kept.get(s["name"]) or {}
        binding = was.get("version") if was.get("version") in (s["version"], "current") else None
        if binding == "current" and s["version"] != found["current"] or binding is None:
            binding = "current" if s["version"] == found["current"] else s["version"]
        tls = prior.get("tls") or _discovered_tls(ctx, s)
        instances[s["name"]] = {**prior, "name": s["name"], "domain": s["domain"], "port": s["port"],
                                "version": binding, "resolved_version": s["version"],
                                "data_version": prior.get("data_version", s["version"]),
                                "enabled": prior.get("enabled", True), "pending_restart": False, "state": "ready",
                                "tls": tls, "paths": instance_paths(ctx, s["name"]),
                                "created_at": prior.get("created_at", now), "updated_at": now,
                                "last_backup_id": prior.get("last_backup_id"), "last_restore": prior.get("last_restore")}
        port_doc[str(s["port"])] = {"instance": s["name"], "reserved_at": now}
    versions = {v["version"]: old_versions["versions"].get(v["version"]) or {
        "version": v["version"], "path": v["path"], "installed_at": now, "source": "discovered",
        "bin": "build/bin/actual-server.js", "migrations": []} for v in found["versions"]}
    backup_dir = os.path.join(ctx.paths.registry_dir, f"backup-{ctx.op_id}")

    def save_old() -> None:
        ensure_dir(backup_dir, 0o750)
        for name in REGISTRY_FILES:
            src = ctx.paths.registry(name)
            if os.path.exists(src):
                with open(src, "rb") as f:
                    atomic_write(os.path.join(backup_dir, f"{name}.json"), f.read(), mode=0o640, tag=ctx.op_id)
    plan.add("registry.backup", f"copy the registries to {backup_dir}", backup_dir, save_old)
    docs = {"instances": {"schema_version": REGISTRY_SCHEMA, "instances": instances},
            "ports": {"schema_version": REGISTRY_SCHEMA, "ports": port_doc},
            "versions": {"schema_version": REGISTRY_SCHEMA, "package": ctx.config.get("npm", "package"),
                         "current": found["current"], "versions": versions}}
    for name, doc in docs.items():
        reg = ctx.registry(name)
        before = snapshot(reg.path)
        plan.add("registry.rebuild", f"rewrite {reg.path} ({len(doc[name])} entries)", reg.path,
                 lambda reg=reg, doc=doc: reg.save(doc, ctx.op_id), UndoAction("restore_file", path=reg.path,
                                                                               snapshot=before))


# ============================================================================
# 8i. Operations: running unattended (schedules, retention, copies, auto-upgrade, notify)
# ============================================================================
#
# Timers are systemd's (DESIGN §11.4): abssctl writes abssctl-backup.service/.timer,
# abssctl-upgrade.service/.timer and abssctl-notify@.service, checks them with systemd-analyze,
# and enables the timers. What a run did is kept in the "unattended" registry, which show and
# doctor read. Retention days, weeks and months are UTC; weeks are ISO weeks (Monday first).

BACKUP_UNITS = ("abssctl-backup.service", "abssctl-backup.timer")
UPGRADE_UNITS = ("abssctl-upgrade.service", "abssctl-upgrade.timer")
NOTIFY_UNIT = "abssctl-notify@.service"
SAFETY_DAYS = 14
SAFETY_REASONS = ("pre-switch", "pre-restore")
RESTORE_TEST_DAYS = {"never": None, "daily": 1, "weekly": 7}


# -- the retention policy: a pure function over rows ------------------------------------

def _buckets(ts: float) -> dict[str, tuple[int, ...]]:
    """The UTC day, ISO week and month a timestamp falls in."""
    import datetime
    d = datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).date()
    year, week, _day = d.isocalendar()
    return {"daily": (d.year, d.month, d.day), "weekly": (year, week), "monthly": (d.year, d.month)}


def retention(rows: Sequence[Mapping[str, Any]], policy: Mapping[str, int], now: float) -> dict[str, list[str]]:
    """restic forget's rules, per the rows of one instance: ``rows`` carry id, created_at (epoch
    seconds), labels, reason and verified. Keep the newest keep_last; for keep_daily/weekly/monthly
    N, the newest backup of each of the newest N days/weeks/months that have one. Never drop the
    newest verified row, one labelled keep, or a pre-switch/pre-restore row younger than 14 days.
    Returns id -> why it is kept; every id not in it goes."""
    ordered = sorted(rows, key=lambda r: (float(r["created_at"]), str(r["id"])), reverse=True)
    kept: dict[str, list[str]] = {}
    for row in ordered[:max(0, int(policy.get("keep_last", 0)))]:
        kept.setdefault(str(row["id"]), []).append("last")
    for period in ("daily", "weekly", "monthly"):
        wanted = max(0, int(policy.get(f"keep_{period}", 0)))
        seen: list[tuple[int, ...]] = []
        for row in ordered:
            if len(seen) >= wanted:
                break
            bucket = _buckets(float(row["created_at"]))[period]
            if bucket not in seen:
                seen.append(bucket)
                kept.setdefault(str(row["id"]), []).append(period)
    verified = [r for r in ordered if r.get("verified")]
    if verified:
        kept.setdefault(str(verified[0]["id"]), []).append("newest-verified")
    for row in ordered:
        if "keep" in (row.get("labels") or []):
            kept.setdefault(str(row["id"]), []).append("label-keep")
        if row.get("reason") in SAFETY_REASONS and now - float(row["created_at"]) < SAFETY_DAYS * 86400:
            kept.setdefault(str(row["id"]), []).append(str(row["reason"]))
    return kept


def retention_policy(ctx: Context) -> dict[str, int]:
    return {k: int(ctx.config.get("backups", k)) for k in ("keep_last", "keep_daily", "keep_weekly", "keep_monthly")}


def _row_of(entry: Mapping[str, Any], verified: bool | None = None) -> dict[str, Any]:
    return {"id": entry["id"], "created_at": _parse_ts(str(entry.get("created_at"))) or _id_time(str(entry["id"])),
            "labels": list(entry.get("labels") or []), "reason": entry.get("reason"),
            "verified": bool(entry.get("verified_at")) if verified is None else verified}


def _id_time(backup_id: str) -> float:
    """The UTC time a backup id names (YYYYMMDD-HHMMSS-...)."""
    import calendar
    import time
    try:
        return float(calendar.timegm(time.strptime(backup_id[:15], "%Y%m%d-%H%M%S")))
    except ValueError:
        return 0.0


def policy_doomed(ctx: Context, instance: str | None, policy: Mapping[str, int]) -> list[dict[str, Any]]:
    """Index entries the policy removes: usable (ok/adopted) backups outside the kept set, never one
    a live journal names. Corrupt and missing entries are left for verify/reconcile to report."""
    live = json.dumps([d for _p, d in list_journals(ctx.paths.journal_dir)])
    index = ctx.registry("backups").load()["backups"]
    by_instance: dict[str, list[dict[str, Any]]] = {}
    for b in index.values():
        if isinstance(b, dict) and b.get("status") in ("ok", "adopted") and instance in (None, b.get("instance")):
            by_instance.setdefault(str(b.get("instance")), []).append(b)
    now = utc_now()
    gone = []
    for items in by_instance.values():
        kept = retention([_row_of(b) for b in items], policy, now)
        gone += [b for b in items if b["id"] not in kept and b["id"] not in live]
    return sorted(gone, key=lambda b: str(b.get("created_at")))


def _remove_backup_steps(ctx: Context, plan: Plan, doomed: Sequence[Mapping[str, Any]]) -> None:
    for b in doomed:
        path = archive_path(ctx, b)

        def drop(b: Mapping[str, Any] = b, path: str = path) -> None:
            with ctx.registry("backups").edit(ctx.op_id) as doc:
                doc["backups"].pop(b["id"], None)
            for p in (path, backup_sidecar(path)):
                if os.path.lexists(p):
                    os.unlink(p)
        plan.add("backup.remove", f"remove {b['id']} ({b.get('reason')}, {b.get('created_at')}, "
                                  f"{human_bytes(int(b.get('size_bytes') or 0))})", path, drop)


def op_backup_prune_policy(ctx: Context, instance: str | None, *, ask: bool = True) -> Result:
    """backup prune --policy: the schedule's retention policy applied by hand (lists, then asks)."""
    policy = retention_policy(ctx)
    removed: list[str] = []

    def build() -> Plan:
        plan = Plan("prune backups by the retention policy")
        doomed = policy_doomed(ctx, instance, policy)
        removed[:] = [b["id"] for b in doomed]
        _remove_backup_steps(ctx, plan, doomed)
        return plan

    def confirm_it(plan: Plan) -> None:
        if ask:
            confirm(ctx, "Remove these backups?\n" + "\n".join(f"  {s.summary}" for s in plan.steps))

    res = run_mutation(ctx, Mutation(title="prune", build=build, global_mode="exclusive", confirm=confirm_it,
                                     target={"kind": "backups", "name": instance},
                                     args={"instance": instance, "policy": policy},
                                     outcome=lambda _x: [f"the retention policy ({_policy_text(policy)}) removed "
                                                         f"{len(removed)} backup(s)"]))
    res.data.update(policy=policy, removed=list(removed))
    return res


def _policy_text(policy: Mapping[str, int]) -> str:
    return ", ".join(f"{k.replace('_', '-')} {v}" for k, v in policy.items())


# -- copies to another disk --------------------------------------------------------------

def copy_dir(copy_to: str, instance: str) -> str:
    import socket
    return os.path.join(copy_to, socket.gethostname(), instance)


def _check_copy_to(path: str) -> str:
    if not path.startswith("/") or "/../" in path + "/" or "\n" in path:
        raise UsageError(f"--copy-to {path!r} must be an absolute path", hint="give the mount point of a disk or share")
    if not os.path.isdir(path):
        raise HostError(f"--copy-to {path} is not a directory", hint="mount the disk or share there first")
    return os.path.normpath(path)


def copy_backup(ctx: Context, entry: Mapping[str, Any], copy_to: str) -> dict[str, Any]:
    """Copy an archive and its sidecar to DIR/<hostname>/<instance>/ under a temp name, fsync,
    rename, then read the copy back and check its sha256. A failure removes what it wrote and
    raises (DiskFull when the destination filled up); the local backup is never touched."""
    import errno
    import hashlib
    src = archive_path(ctx, entry)
    dest_dir = copy_dir(copy_to, str(entry["instance"]))
    final = os.path.join(dest_dir, os.path.basename(src))
    tmp = os.path.join(dest_dir, f".{os.path.basename(src)}.abssctl-tmp-{ctx.op_id}")
    sidecar = backup_sidecar(final)
    try:
        ensure_dir(dest_dir, 0o700)
        sha = hashlib.sha256()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with open(src, "rb") as r, os.fdopen(fd, "wb") as w:
            while True:
                chunk = r.read(1 << 20)
                if not chunk:
                    break
                sha.update(chunk)
                w.write(chunk)
            w.flush()
            os.fsync(w.fileno())
        if sha.hexdigest() != entry.get("sha256"):
            raise ChecksumMismatch(f"{entry['id']}: the local archive does not match its index sha256; not copied",
                                   hint=f"abssctl backup verify {entry['id']}")
        os.rename(tmp, final)
        atomic_write(sidecar, f"{entry['sha256']}  {os.path.basename(final)}\n".encode(), mode=0o600,
                     tag=ctx.op_id)
        fsync_dir(dest_dir)
        if sha256_file(final) != entry["sha256"]:
            raise ChecksumMismatch(f"the copy of {entry['id']} in {dest_dir} does not match its sha256",
                                   hint=f"check the disk at {copy_to}")
    except (OSError, ChecksumMismatch) as exc:
        for path in (tmp, final, sidecar):
            try:
                os.unlink(path)
            except OSError:
                pass
        if isinstance(exc, ChecksumMismatch):
            raise
        if exc.errno == errno.ENOSPC:
            raise DiskFull(f"copying {entry['id']} to {dest_dir} failed: no space left on {copy_to}; "
                           "the local backup is kept", hint=f"free space on {copy_to} or lower the keep-* "
                           "counts (abssctl backup schedule enable ...)") from None
        raise HostError(f"copying {entry['id']} to {dest_dir} failed: {exc.strerror or exc}; the local backup "
                        "is kept", hint=f"check that {copy_to} is mounted and writable") from None
    done = {"path": final, "verified_at": _now(), "sha256": entry["sha256"]}
    with ctx.registry("backups").edit(ctx.op_id) as doc:
        if isinstance(doc["backups"].get(entry["id"]), dict):
            doc["backups"][entry["id"]]["copy"] = done
    return done


def copy_state(entry: Mapping[str, Any]) -> str:
    """verified (the copy exists with the archive's size), missing (recorded but gone), or none."""
    copy = entry.get("copy")
    if not isinstance(copy, dict) or not copy.get("path"):
        return "none"
    try:
        size = os.path.getsize(str(copy["path"]))
    except OSError:
        return "missing"
    return "verified" if copy.get("verified_at") and size == int(entry.get("size_bytes") or -1) else "unverified"


def copy_archive_of(entry: Mapping[str, Any]) -> str | None:
    """The copy restore takes when the local archive is gone."""
    return str(entry["copy"]["path"]) if copy_state(entry) in ("verified", "unverified") else None


def prune_copies(ctx: Context, copy_to: str, instance: str, policy: Mapping[str, int]) -> list[str]:
    """The same policy over the archives in DIR/<hostname>/<instance>/; returns the ids removed."""
    dest_dir = copy_dir(copy_to, instance)
    if not os.path.isdir(dest_dir):
        return []
    index = ctx.registry("backups").load()["backups"]
    files: dict[str, str] = {}
    for name in os.listdir(dest_dir):
        bid = name.split(".tar", 1)[0]
        if BACKUP_ID_RE.match(bid) and ".tar" in name and not name.endswith(".sha256"):
            files[bid] = os.path.join(dest_dir, name)
    rows = []
    for bid in files:
        entry = index.get(bid) if isinstance(index.get(bid), dict) else {"id": bid}
        rows.append(_row_of(dict(entry, id=bid), verified=copy_state(entry) == "verified" if "copy" in entry
                            else False))
    kept = retention(rows, policy, utc_now())
    gone = sorted(bid for bid in files if bid not in kept)
    for bid in gone:
        for path in (files[bid], backup_sidecar(files[bid])):
            if os.path.lexists(path):
                os.unlink(path)
    if gone:
        fsync_dir(dest_dir)
    return gone


# -- restore test ------------------------------------------------------------------------

def missing_blobs(data: str) -> tuple[int, list[str]]:
    """(files listed, ids without a blob): every live row of account.sqlite's files table must have
    user-files/file-<id>.blob beside it."""
    import sqlite3
    db_path = os.path.join(data, "server-files", "account.sqlite")
    if not os.path.isfile(db_path):
        return 0, []
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        cols = [r[1] for r in db.execute("PRAGMA table_info(files)")]
        if "id" not in cols:
            return 0, []
        ids = [str(r[0]) for r in db.execute("SELECT id FROM files" + (" WHERE NOT deleted" if "deleted" in cols
                                                                      else ""))]
    finally:
        db.close()
    return len(ids), [i for i in ids if not os.path.isfile(os.path.join(data, "user-files", f"file-{i}.blob"))]


def restore_test(ctx: Context, entry: Mapping[str, Any]) -> dict[str, Any]:
    """Extract a backup into a temp dir, start its own server version on a free loopback port as the
    instance's user (smoke_start; the service user for an old-style or deleted instance), require
    /health UP, check every listed user file has its blob, then remove everything. Raises (exit 4) when
    the server or a blob fails; the index records the result."""
    import time
    versions = Versions(ctx)
    version = str(entry.get("server_version"))
    ventry = versions.doc["versions"].get(version)
    if not isinstance(ventry, dict):
        raise NotFound(f"the restore test of {entry['id']} needs its server version {version}, which is not "
                       "installed", hint=f"abssctl version install {version}")
    archive = archive_path(ctx, entry)
    if not os.path.isfile(archive):
        archive = copy_archive_of(entry) or archive
    if not os.path.isfile(archive):
        raise NotFound(f"the archive of {entry['id']} is missing: {archive}", hint="run abssctl backup reconcile")
    pkg = os.path.realpath(versions.package_dir(version))
    work = os.path.join(ctx.paths.install_root, f".smoke-restore-test-{ctx.op_id}")
    started = time.monotonic()
    result: dict[str, Any] = {"id": entry["id"], "server_version": version}
    try:
        ensure_dir(work, 0o750)
        scan = ArchiveScan(ctx, archive)
        ctx.out.progress(f"restore test {entry['id']}: extracting")
        extract_backup(scan, entry, work)
        if scan.sha256 != entry.get("sha256"):
            raise ChecksumMismatch(f"{entry['id']}: the archive sha256 does not match the index")
        ctx.out.progress(f"restore test {entry['id']}: starting {version} on its data")
        # as the instance's own user: the drill reads the data with the live server's permissions
        owner = (ctx.registry("instances").load()["instances"].get(str(entry.get("instance"))) or {}).get("user")
        _migrations, info = smoke_start(ctx, pkg, os.path.join(pkg, ventry["bin"]), version, work,
                                        runner=runner_for(ctx, ventry), user=owner)
        listed, missing = missing_blobs(os.path.join(work, "data"))
        result.update(health="UP", info_version=info, user_files=listed, missing_blobs=missing)
        if missing:
            raise ProviderError(f"restore test of {entry['id']}: {len(missing)} of {listed} user file(s) the "
                                f"account database lists have no blob ({', '.join(missing[:5])})",
                                hint="this backup cannot bring those budgets back; use another one",
                                details={"missing_blobs": missing})
    except AbssctlError as exc:
        _record_restore_test(ctx, entry, "failed", exc.message)
        exc.details.setdefault("restore_test", result)
        raise
    finally:
        if os.path.lexists(work):
            remove_tree(work)
    result["seconds"] = round(time.monotonic() - started, 1)
    _record_restore_test(ctx, entry, "ok", None)
    return result


def _record_restore_test(ctx: Context, entry: Mapping[str, Any], outcome: str, message: str | None) -> None:
    with ctx.registry("backups").edit(ctx.op_id) as doc:
        if isinstance(doc["backups"].get(entry["id"]), dict):
            doc["backups"][entry["id"]]["restore_test"] = {"at": _now(), "result": outcome, "message": message}
    with ctx.registry("unattended").edit(ctx.op_id) as doc:
        by_instance = dict((doc["unattended"].get("restore_test") or {}).get("by_instance") or {})
        by_instance[str(entry["instance"])] = _now()
        doc["unattended"]["restore_test"] = {"at": _now(), "backup_id": entry["id"], "result": outcome,
                                             "message": message, "by_instance": by_instance}


def op_backup_restore_test(ctx: Context, backup_id: str) -> Result:
    entry = _backup_entry(ctx, backup_id)
    res = restore_test(ctx, entry)
    return Result({"restore_test": res}, [f"{backup_id}: restore test passed on {res['server_version']} (/health UP, "
                                          f"{res['user_files']} user file(s) with their blobs, {res['seconds']} s); "
                                          "everything it made is removed"])


# -- units -------------------------------------------------------------------------------

def self_command(ctx: Context) -> str:
    """How systemd runs this abssctl: its absolute path (a .pyz or the script; with the absolute
    python3 when it is not executable) and the config file in use."""
    here = os.path.abspath(sys.argv[0]) if os.path.basename(sys.argv[0]).startswith("abssctl") else ""
    if not here or not os.path.isfile(here):
        module = os.path.abspath(__file__)
        here = os.path.dirname(module) if os.path.isfile(os.path.dirname(module)) else module
    argv = [here] if os.access(here, os.X_OK) else [os.path.abspath(sys.executable), here]
    return " ".join(_systemd_word(w) for w in argv + ["--config", os.path.abspath(ctx.config.path)])


def _systemd_word(word: str) -> str:
    """One ExecStart= word: % doubled (a specifier otherwise), quoted when it holds a space or quote."""
    word = word.replace("%", "%%")
    if re.match(r"^[A-Za-z0-9_./@:+=,%-]+\Z", word):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'



def calendar_next(ctx: Context, spec: str, flag: str = "--calendar") -> str | None:
    """Check a calendar with systemd-analyze calendar; the next elapse it prints (None if it prints none)."""
    if not re.match(r"^[A-Za-z0-9 ,:.*/~+-]{1,100}\Z", spec):
        raise UsageError(f"{flag} {spec!r} is not a systemd calendar", hint="e.g. daily, weekly, 'Sun 03:00'")
    done = ctx.runner.run("systemd_analyze", ["calendar", spec], mutating=False, check=False)
    if done.returncode != 0:
        raise UsageError(f"{flag} {spec!r} is not a systemd calendar: "
                         f"{(_tail(done.stderr) or _tail(done.stdout) or ['rejected'])[-1]}",
                         hint="see man systemd.time; e.g. daily, weekly, 'Mon..Fri 02:30'")
    m = re.search(r"Next elapse:\s*(.+)", done.stdout)
    return m.group(1).strip() if m else None


def _unit_files(ctx: Context, names: Sequence[str], calendar: str) -> dict[str, bytes]:
    values = {"ABSSCTL": self_command(ctx), "CALENDAR": calendar}
    return {os.path.join(ctx.paths.unit_dir, n): render(ctx.paths.templates_dir, n, values).encode()
            for n in names}


def _verify_units_step(ctx: Context, plan: Plan, paths: Sequence[str]) -> None:
    def do() -> None:
        done = ctx.runner.run("systemd_analyze", ["verify", *paths], mutating=True, check=False)
        if done.returncode != 0:
            raise ProviderError("systemd-analyze verify rejected the units: "
                                + " ".join(_tail(done.stderr) or _tail(done.stdout) or []),
                                hint="a template override in [paths] templates_dir may be at fault")
    plan.add("units.verify", "check them with systemd-analyze verify", " ".join(paths), do)


def set_config_keys(text: str, section: str, values: Mapping[str, Any]) -> str:
    """The config file's text with ``[section] key = value`` set for each key: an existing line is
    replaced, a missing key goes after the section header, a missing section at the end."""
    lines = text.splitlines()
    todo = dict(values)
    start = next((i for i, ln in enumerate(lines) if ln.strip() == f"[{section}]"), None)
    if start is not None:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].lstrip().startswith("[")), len(lines))
        for i in range(start + 1, end):
            m = re.match(r"^\s*([A-Za-z0-9_]+)\s*=", lines[i])
            if m and m.group(1) in todo:
                lines[i] = f"{m.group(1)} = {_toml_value(todo.pop(m.group(1)))}"
        lines[start + 1:start + 1] = [f"{k} = {_toml_value(v)}" for k, v in todo.items()]
    else:
        lines += ["", f"[{section}]"] + [f"{k} = {_toml_value(v)}" for k, v in todo.items()]
    return "\n".join(lines) + "\n"


def _config_step(ctx: Context, plan: Plan, section: str, values: Mapping[str, Any]) -> None:
    path = ctx.config.path
    text = open(path, encoding="utf-8").read() if os.path.isfile(path) else ""
    mode = os.stat(path).st_mode & 0o777 if os.path.isfile(path) else 0o644
    new = set_config_keys(text, section, values)
    _file_step(ctx, plan, "config.write", path, new.encode(), mode, 0,
               f"set [{section}] " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in values.items()) + f" in {path}")


def _timer_state(ctx: Context, timer: str) -> dict[str, str]:
    props = ("UnitFileState", "ActiveState", "NextElapseUSecRealtime", "LastTriggerUSec")
    return Systemd(ctx.runner).show([timer], props)[timer]


def _enable_units(ctx: Context, names: Sequence[str], calendar: str, title: str, section: str,
                  values: Mapping[str, Any], args: Mapping[str, Any], outcome: list[str]) -> Result:
    files = _unit_files(ctx, list(names) + [NOTIFY_UNIT], calendar)
    timer = next(n for n in names if n.endswith(".timer"))

    def build() -> Plan:
        plan = Plan(title)
        _config_step(ctx, plan, section, values)
        for path, data in files.items():
            _file_step(ctx, plan, "unit.write", path, data, 0o644, 0, f"write {path}")
        _verify_units_step(ctx, plan, sorted(files))
        plan.add("systemd.reload", "systemctl daemon-reload", "systemd", lambda: Systemd(ctx.runner).daemon_reload())
        _systemctl_step(ctx, plan, "enable", timer, "disable")
        _systemctl_step(ctx, plan, "start", timer, "stop")
        return plan
    return run_mutation(ctx, Mutation(title=title, build=build, global_mode="exclusive",
                                      target={"kind": "schedule", "name": timer}, args=dict(args),
                                      outcome=lambda _x: outcome))


def _disable_units(ctx: Context, names: Sequence[str], title: str) -> Result:
    timer = next(n for n in names if n.endswith(".timer"))
    paths = [os.path.join(ctx.paths.unit_dir, n) for n in names]
    other = next(n for n in BACKUP_UNITS + UPGRADE_UNITS if n.endswith(".timer") and n != timer)
    if not os.path.exists(os.path.join(ctx.paths.unit_dir, other)):
        paths.append(os.path.join(ctx.paths.unit_dir, NOTIFY_UNIT))   # no service left to notify about

    def build() -> Plan:
        plan = Plan(title)
        if any(os.path.exists(p) for p in paths):
            for verb, undo in (("stop", "start"), ("disable", "enable")):
                plan.add(f"systemctl.{verb}", f"systemctl {verb} {timer}", timer,
                         lambda verb=verb: ctx.runner.run("systemctl", ["--no-pager", verb, timer], mutating=True,
                                                          check=False),
                         UndoAction("systemctl", verb=undo, unit=timer))
        for path in paths:
            if os.path.exists(path):
                before = snapshot(path)
                plan.add("unit.remove", f"remove {path}", path, lambda path=path: os.unlink(path),
                         UndoAction("restore_file", path=path, snapshot=before))
        if plan.steps:
            plan.add("systemd.reload", "systemctl daemon-reload", "systemd",
                     lambda: Systemd(ctx.runner).daemon_reload())
        return plan
    return run_mutation(ctx, Mutation(title=title, build=build, global_mode="exclusive",
                                      target={"kind": "schedule", "name": timer}, args={},
                                      outcome=lambda _x: [f"{timer} is disabled and its units removed"]))


def _last_run(ctx: Context, key: str) -> dict[str, Any]:
    doc = ctx.registry("unattended").load()["unattended"]
    return dict(doc.get(key) or {})


def _record_run(ctx: Context, key: str, record: Mapping[str, Any]) -> None:
    with ctx.registry("unattended").edit(ctx.op_id) as doc:
        doc["unattended"][key] = dict(doc["unattended"].get(key) or {}, **record)


# -- backup schedule ---------------------------------------------------------------------

def op_backup_schedule_enable(ctx: Context, *, calendar: str | None, keep: Mapping[str, int | None],
                              copy_to: str | None, verify: bool | None, restore_test_every: str | None) -> Result:
    spec = calendar or str(ctx.config.get("backups", "schedule"))
    nxt = calendar_next(ctx, spec)
    values: dict[str, Any] = {"schedule": spec}
    values.update({k: int(v) for k, v in keep.items() if v is not None})
    if copy_to is not None:
        values["copy_to"] = _check_copy_to(copy_to) if copy_to else ""
    if verify is not None:
        values["verify"] = verify
    if restore_test_every is not None:
        values["restore_test"] = restore_test_every
    policy = {k: int(values.get(k, ctx.config.get("backups", k))) for k in retention_policy(ctx)}
    copies = values.get("copy_to", ctx.config.get("backups", "copy_to"))
    res = _enable_units(ctx, BACKUP_UNITS, spec, "enable the backup schedule", "backups", values,
                        {"calendar": spec, **values},
                        [f"abssctl-backup.timer runs {spec} (next: {nxt or 'see systemctl list-timers'}): back up "
                         f"every instance, verify, keep {_policy_text(policy)}"
                         + (f", copy to {copies}" if copies else ""),
                         "see what it did with: abssctl backup schedule show (or journalctl -u abssctl-backup)"])
    res.data["schedule"] = {"calendar": spec, "next": nxt, "policy": policy, "copy_to": copies or None}
    return res


def op_backup_schedule_disable(ctx: Context) -> Result:
    return _disable_units(ctx, BACKUP_UNITS, "disable the backup schedule")


def op_backup_schedule_show(ctx: Context) -> Result:
    enabled = os.path.isfile(os.path.join(ctx.paths.unit_dir, "abssctl-backup.timer"))
    state = _timer_state(ctx, "abssctl-backup.timer") if enabled else {}
    last = _last_run(ctx, "backup")
    nxt = None
    if enabled:
        try:
            nxt = calendar_next(ctx, str(ctx.config.get("backups", "schedule")))
        except AbssctlError:
            nxt = None
    policy = retention_policy(ctx)
    doc = {"enabled": enabled, "calendar": ctx.config.get("backups", "schedule"), "next": nxt,
           "timer": state, "policy": policy, "verify": ctx.config.get("backups", "verify"),
           "copy_to": ctx.config.get("backups", "copy_to") or None,
           "restore_test": ctx.config.get("backups", "restore_test"), "last_run": last or None,
           "last_restore_test": _last_run(ctx, "restore_test") or None,
           "notify": ctx.config.get("notify", "command") or None}
    text = [f"backup schedule: {'enabled' if enabled else 'disabled'}, {doc['calendar']}"
            + (f", next {nxt}" if nxt else ""),
            f"policy: {_policy_text(policy)}; verify {'on' if doc['verify'] else 'off'}; restore test "
            f"{doc['restore_test']}; copies {doc['copy_to'] or 'none'}",
            "last run: " + (f"{last.get('at')}: {last.get('result')} ({last.get('summary')})" if last else "never")]
    if not doc["notify"]:
        text.append("no [notify] command: a failed run only reaches the journal")
    if not enabled:
        text.append("enable it with: abssctl backup schedule enable")
    return Result({"schedule": doc}, text)


def op_backup_schedule_run(ctx: Context) -> Result:
    """What the timer runs: back up every instance (label scheduled), verify each new backup, a
    restore test when one is due, the retention policy, then the copies. Any failure fails the run
    (a failed copy never removes the local backup); the outcome is recorded for show and doctor."""
    started = _now()
    names = sorted(Instances(ctx).doc["instances"])
    if ctx.dry_run:
        return Result({"run": {"would_back_up": names, "would_prune": [b["id"] for b in
                                                                        policy_doomed(ctx, None, retention_policy(ctx))],
                               "copy_to": ctx.config.get("backups", "copy_to") or None}},
                      [f"would back up {', '.join(names) or 'nothing'}, verify, and prune by the policy "
                       f"({_policy_text(retention_policy(ctx))})"], changed=False)
    errors: list[str] = []
    worst: AbssctlError | None = None

    def failed(exc: AbssctlError, what: str) -> None:
        nonlocal worst
        errors.append(f"{what}: {exc.message}")
        worst = exc if worst is None or exc.exit_code > worst.exit_code else worst

    new: list[dict[str, Any]] = []
    if names:
        made = op_backup_create(ctx, names, message="scheduled", labels=["scheduled"],
                                compression=str(ctx.config.get("backups", "compression")))
        for row in made.data.get("results") or [{"ok": True, "backup": made.data.get("backup")}]:
            if row.get("ok"):
                new.append(row["backup"])
            else:
                errors.append(f"backup {row['instance']}: {row['error']['message']}")
        if made.error is not None:
            worst = made.error
        _next_op(ctx)
    index = ctx.registry("backups").load()["backups"]
    verified = []
    if ctx.config.get("backups", "verify"):
        for b in new:
            try:
                verify_backup(ctx, dict(index[b["id"]]), True)
                verified.append(b["id"])
            except AbssctlError as exc:
                failed(exc, f"verify {b['id']}")
    tested = None
    every = RESTORE_TEST_DAYS.get(str(ctx.config.get("backups", "restore_test")))
    last_test = _last_run(ctx, "restore_test")
    if every and new and utc_now() - _parse_ts(str(last_test.get("at") or "")) >= every * 86400 - 3600:
        index = ctx.registry("backups").load()["backups"]
        by_instance = dict(last_test.get("by_instance") or {})     # the instance tested longest ago goes
        pick = min(new, key=lambda b: (str(by_instance.get(b["instance"], "")), b["instance"]))["id"]
        try:
            tested = restore_test(ctx, dict(index[pick]))
        except AbssctlError as exc:
            failed(exc, f"restore test {pick}")
    policy = retention_policy(ctx)
    pruned: list[str] = []
    try:
        pruned = op_backup_prune_policy(ctx, None, ask=False).data.get("removed") or []
        _next_op(ctx)
    except AbssctlError as exc:
        failed(exc, "prune")
    copies: dict[str, Any] = {}
    copy_to = str(ctx.config.get("backups", "copy_to") or "")
    if copy_to:
        index = ctx.registry("backups").load()["backups"]
        try:
            _check_copy_to(copy_to)
            for b in sorted((b for b in index.values() if isinstance(b, dict) and b.get("status") in ("ok", "adopted")
                             and copy_state(b) != "verified"), key=lambda b: str(b.get("created_at"))):
                if b["id"] not in [x["id"] for x in new] and b["id"] not in verified:
                    continue          # only this run's backups are copied; older ones were copied by theirs
                copies[b["id"]] = copy_backup(ctx, b, copy_to)["path"]
            for name in names:
                copies.setdefault("pruned", []).extend(prune_copies(ctx, copy_to, name, policy))
        except AbssctlError as exc:
            failed(exc, "copy")
    result = "ok" if not errors else "failed"
    summary = (f"{len(new)} backup(s), {len(verified)} verified, {len(pruned)} pruned"
               + (f", {len([k for k in copies if k != 'pruned'])} copied to {copy_to}" if copy_to else "")
               + (f", restore test {tested['id']} passed" if tested else "")
               + (f"; failed: {'; '.join(errors)}" if errors else ""))
    _record_run(ctx, "backup", {"at": started, "finished_at": _now(), "result": result, "summary": summary,
                                "backups": [b["id"] for b in new], "verified": verified, "pruned": pruned,
                                "copies": copies, "errors": errors})
    res = Result({"run": {"result": result, "backups": new, "verified": verified, "pruned": pruned,
                          "copies": copies, "restore_test": tested, "errors": errors}},
                 [f"backup schedule run: {summary}"], changed=bool(new or pruned))
    if worst is not None:
        res.ok, res.error = False, worst
        res.error.hint = res.error.hint or "see abssctl backup schedule show and journalctl -u abssctl-backup"
    return res


# -- unattended upgrades -----------------------------------------------------------------

def _allowed(current: str, candidate: str, to: str) -> bool:
    cur, new = semver_key(current), semver_key(candidate)
    if new <= cur or "-" in candidate:
        return False
    c, n = current.split("."), candidate.split(".")
    if to == "patch":
        return c[:2] == n[:2]
    if to == "minor":
        return c[:1] == n[:1]
    return True


def op_version_auto_upgrade_enable(ctx: Context, *, calendar: str | None, to: str | None) -> Result:
    spec = calendar or str(ctx.config.get("upgrade", "calendar"))
    nxt = calendar_next(ctx, spec)
    values: dict[str, Any] = {"calendar": spec, "to": to or str(ctx.config.get("upgrade", "to"))}
    res = _enable_units(ctx, UPGRADE_UNITS, spec, "enable unattended upgrades", "upgrade", values, values,
                        [f"abssctl-upgrade.timer runs {spec} (next: {nxt or 'see systemctl list-timers'}): install "
                         f"the newest {values['to']} update, switch with backups, health gates and rollback",
                         "see what it did with: abssctl version auto-upgrade show"])
    res.data["auto_upgrade"] = {"calendar": spec, "to": values["to"], "next": nxt}
    return res


def op_version_auto_upgrade_disable(ctx: Context) -> Result:
    return _disable_units(ctx, UPGRADE_UNITS, "disable unattended upgrades")


def op_version_auto_upgrade_show(ctx: Context) -> Result:
    enabled = os.path.isfile(os.path.join(ctx.paths.unit_dir, "abssctl-upgrade.timer"))
    last = _last_run(ctx, "upgrade")
    blocked = dict(last.get("blocked") or {})
    doc = {"enabled": enabled, "calendar": ctx.config.get("upgrade", "calendar"), "to": ctx.config.get("upgrade", "to"),
           "timer": _timer_state(ctx, "abssctl-upgrade.timer") if enabled else {},
           "last_run": {k: v for k, v in last.items() if k != "blocked"} or None, "blocked": blocked}
    text = [f"auto-upgrade: {'enabled' if enabled else 'disabled'}, {doc['calendar']}, up to {doc['to']} updates",
            "last run: " + (f"{last.get('at')}: {last.get('result')} ({last.get('summary')})" if last.get("at")
                            else "never")]
    for version, why in sorted(blocked.items()):
        text.append(f"{version} is never tried again automatically: its switch rolled back at {why.get('at')} "
                    f"({why.get('message')}); install it by hand with abssctl version switch {version}")
    return Result({"auto_upgrade": doc}, text)


def op_version_upgrade(ctx: Context, *, auto: bool, to: str | None) -> Result:
    """check-updates, install the newest allowed version, rolling gated switch with data rollback,
    then uninstall versions older than the two newest that no instance uses. With --auto a version
    whose switch rolled back is skipped, and a rollback marks the version so it is never retried."""
    started = _now()
    reach = to or str(ctx.config.get("upgrade", "to"))
    versions = Versions(ctx)
    current = versions.current or max(versions.doc["versions"], key=semver_key, default=None)
    if current is None:
        raise NotFound("no server version is installed", hint="abssctl version install latest --set-current")
    blocked = dict(_last_run(ctx, "upgrade").get("blocked") or {})
    remote = [v for v in Npm(ctx.runner, ctx.config).remote_versions() if "-" not in v]
    allowed = sorted((v for v in remote if _allowed(current, v, reach)), key=semver_key)
    skipped = [v for v in allowed if auto and v in blocked]
    candidates = [v for v in allowed if v not in skipped]
    target = candidates[-1] if candidates else None
    record: dict[str, Any] = {"at": started, "from": current, "to_reach": reach, "target": target,
                              "skipped": skipped}
    if ctx.dry_run:
        return Result({"upgrade": record}, [f"would upgrade {current} -> {target}" if target else
                                            f"{current} is the newest allowed ({reach}) version"], changed=False)
    if target is None:
        record.update(result="up-to-date", summary=f"{current} is the newest allowed ({reach}) version"
                      + (f"; skipped {', '.join(skipped)} (rolled back before)" if skipped else ""))
        _record_run(ctx, "upgrade", record)
        return Result({"upgrade": record}, [record["summary"]])
    try:
        if versions.state_of(target) == "missing":
            op_version_install(ctx, target, set_current=False)
            _next_op(ctx)
        switched = op_version_switch(ctx, target, restart="rolling", backup=True, message="auto-upgrade")
        _next_op(ctx)
    except AbssctlError as exc:
        rolled = any(r.get("outcome") == "rolled-back" for r in exc.data.get("instances") or [])
        if rolled:
            blocked[target] = {"at": _now(), "message": exc.message}
        record.update(result="rolled-back" if rolled else "failed", blocked=blocked,
                      summary=f"upgrade {current} -> {target} failed: {exc.message}"
                      + ("; rolled back with data, never retried automatically" if rolled else ""))
        _record_run(ctx, "upgrade", record)
        raise
    removed = _uninstall_old(ctx)
    record.update(result="upgraded", blocked=blocked, uninstalled=removed,
                  summary=f"upgraded {current} -> {target}" + (f"; uninstalled {', '.join(removed)}" if removed else ""))
    _record_run(ctx, "upgrade", record)
    return Result({"upgrade": record, "instances": switched.data.get("instances")}, [record["summary"]],
                  changed=True)


def _uninstall_old(ctx: Context) -> list[str]:
    versions = Versions(ctx)
    newest_two = sorted(versions.doc["versions"], key=semver_key)[-2:]
    gone = []
    for v in sorted(versions.doc["versions"], key=semver_key):
        if v in newest_two or v == versions.current or versions.users_of(v):
            continue
        try:
            op_version_uninstall(ctx, v)
            gone.append(v)
        except AbssctlError as exc:
            ctx.out.warn(f"could not uninstall {v}: {exc.message}")
        _next_op(ctx)
    return gone


# -- notify ------------------------------------------------------------------------------

def op_notify(ctx: Context, unit: str) -> Result:
    """Run from abssctl-notify@<unit>.service: [notify] command gets a one-paragraph summary on
    stdin and ABSSCTL_UNIT, ABSSCTL_RESULT in its environment."""
    import socket
    if not re.match(r"^[A-Za-z0-9@._:-]{1,200}\Z", unit):
        raise UsageError(f"{unit!r} is not a unit name")
    state = Systemd(ctx.runner).show([unit], ["Result", "ExecMainStatus", "ActiveState"]).get(unit) or {}
    key = "upgrade" if unit.startswith("abssctl-upgrade") else "backup"
    last = _last_run(ctx, key)
    outcome = state.get("Result") or str(last.get("result") or "failed")
    summary = (f"{unit} failed on {socket.gethostname()} at {_now()} (systemd result: {outcome}, exit status "
               f"{state.get('ExecMainStatus') or '?'}). "
               + (f"Its last run ({last.get('at')}) reported: {last.get('summary')}. " if last else "")
               + f"Read: journalctl -u {unit} -n 100; abssctl doctor; abssctl "
               + ("version auto-upgrade show." if key == "upgrade" else "backup schedule show."))
    command = list(ctx.config.get("notify", "command") or [])
    if not command:
        ctx.out.warn("no [notify] command is configured; this failure only reaches the journal")
        return Result({"notify": {"unit": unit, "sent": False, "summary": summary}}, [summary])
    ctx.runner.with_commands(notify=command).run(
        "notify", [], mutating=True, input=summary + "\n", timeout=120,
        env_extra={"ABSSCTL_UNIT": unit, "ABSSCTL_RESULT": outcome})
    return Result({"notify": {"unit": unit, "sent": True, "summary": summary, "command": command}},
                  [f"told {command[0]}: {summary}"], changed=True)


# -- doctor ------------------------------------------------------------------------------

def _period_seconds(spec: str) -> float:
    """About how often a calendar fires (for 'is the newest backup late?'); a day when unsure."""
    return {"hourly": 3600.0, "weekly": 7 * 86400.0, "monthly": 31 * 86400.0}.get(spec.strip().lower(), 86400.0)


@probe("unattended")
def probe_unattended(ctx: Context, facts: Facts) -> list[Finding]:
    out = []
    enabled = os.path.isfile(os.path.join(ctx.paths.unit_dir, "abssctl-backup.timer"))
    last = _last_run(ctx, "backup")
    if not enabled:
        out.append(_ok("unattended.schedule", None, "no backup schedule: backups happen only by hand "
                                                    "(abssctl backup schedule enable)"))
    elif not last:
        out.append(_ok("unattended.schedule", None, "the backup schedule is enabled and has not run yet"))
    elif last.get("result") != "ok":
        out.append(Finding("unattended.schedule", None, "fail", f"the last scheduled backup run ({last.get('at')}) "
                           f"failed: {last.get('summary')}", hint="journalctl -u abssctl-backup; abssctl backup "
                           "schedule run"))
    else:
        out.append(_ok("unattended.schedule", None, f"the last scheduled backup run ({last.get('at')}) was ok: "
                                                    f"{last.get('summary')}"))
    if enabled:
        period = _period_seconds(str(ctx.config.get("backups", "schedule")))
        for name in sorted(facts.instances):
            ok = [b for b in facts.backups.values() if isinstance(b, dict) and b.get("instance") == name
                  and b.get("status") in ("ok", "adopted")]
            newest = max((str(b.get("created_at")) for b in ok), default=None)
            if newest is None or utc_now() - _parse_ts(newest) > 2 * period + 3600:
                out.append(Finding("unattended.backup-age", name, "warn",
                                   f"the newest backup of {name} is {newest or 'missing'}; the schedule "
                                   f"({ctx.config.get('backups', 'schedule')}) should have made a newer one",
                                   hint="systemctl list-timers abssctl-backup.timer; journalctl -u abssctl-backup"))
    copy_to = str(ctx.config.get("backups", "copy_to") or "")
    if copy_to:
        usable = [b for b in facts.backups.values() if isinstance(b, dict) and b.get("status") in ("ok", "adopted")]
        bad = [b["id"] for b in usable if copy_state(b) != "verified"]
        if not os.path.isdir(copy_to):
            out.append(Finding("unattended.copies", None, "fail", f"the copy destination {copy_to} is not there",
                               hint="mount it again"))
        elif bad:
            out.append(Finding("unattended.copies", None, "warn", f"{len(bad)} backup(s) have no verified copy in "
                               f"{copy_to}: {', '.join(sorted(bad)[:5])}", hint="abssctl backup list --copies"))
        else:
            out.append(_ok("unattended.copies", None, f"every backup has a verified copy in {copy_to}"))
    upgrading = os.path.isfile(os.path.join(ctx.paths.unit_dir, "abssctl-upgrade.timer"))
    if upgrading:
        up = _last_run(ctx, "upgrade")
        status = "warn" if up.get("result") in ("failed", "rolled-back") else "ok"
        out.append(Finding("unattended.upgrade", None, status, f"auto-upgrade is enabled ({ctx.config.get('upgrade', 'to')}"
                           f" updates); last run: {up.get('result') or 'never'}"
                           + (f"; never retried: {', '.join(sorted(up.get('blocked') or {}))}" if up.get("blocked")
                              else ""), hint="abssctl version auto-upgrade show" if status == "warn" else None))
    else:
        out.append(_ok("unattended.upgrade", None, "auto-upgrade is off (abssctl version auto-upgrade enable)"))
    if (enabled or upgrading) and not ctx.config.get("notify", "command"):
        out.append(Finding("unattended.notify", None, "warn", "no [notify] command: a failed scheduled run only "
                           "reaches the journal", hint='set [notify] command = ["mail", "-s", "abssctl", "root"]'))
    return out


# ============================================================================
# 9. CLI wiring
# ============================================================================

# -- adapters: move parsed arguments into operations; no logic here -----------------

def cmd_init(ctx: Context, args: argparse.Namespace) -> Result:
    if args.rebuild_state:
        return op_init_rebuild(ctx)
    if args.discover:
        return op_init_discover(ctx)
    if not args.install_packages:
        return op_init(ctx, allow_create_user=args.allow_create_user)
    packages = op_host_packages(ctx)
    result = op_init(ctx, allow_create_user=args.allow_create_user)
    result.data["packages"] = packages.data["packages"]
    if ctx.dry_run:
        result.data["plan"] = packages.data.get("plan", []) + result.data.get("plan", [])
    else:
        result.data["steps"] = packages.data.get("steps", []) + result.data.get("steps", [])
    result.text = packages.text + result.text
    result.changed = bool(packages.changed or result.changed)
    return result


def cmd_doctor(ctx: Context, args: argparse.Namespace) -> Result:
    split = lambda v: [c for c in (v or "").split(",") if c]  # noqa: E731
    return op_doctor(ctx, only=split(args.only), exclude=split(args.exclude), fix=args.fix)


def cmd_support_bundle(ctx: Context, args: argparse.Namespace) -> Result:
    return op_support_bundle(ctx, args.output, redact=not args.no_redact)


def cmd_config_show(ctx: Context, args: argparse.Namespace) -> Result:
    return op_config_show(ctx)


def cmd_config_path(ctx: Context, args: argparse.Namespace) -> Result:
    return op_config_path(ctx)


def cmd_config_check(ctx: Context, args: argparse.Namespace) -> Result:
    return op_config_check(ctx, args.config_problems)


def cmd_ports_list(ctx: Context, args: argparse.Namespace) -> Result:
    return op_ports_list(ctx)


def cmd_history(ctx: Context, args: argparse.Namespace) -> Result:
    return op_history(ctx, limit=args.n, instance=args.instance)


def cmd_instance_create(ctx: Context, args: argparse.Namespace) -> Result:
    return op_instance_create(ctx, args.name, domain=args.domain, port=args.port, version=args.binding,
                              tls=args.tls, cert=args.cert, key=args.key, chain=args.chain,
                              start=not args.no_start, acme=acme_flags(args))


def cmd_instance_import(ctx: Context, args: argparse.Namespace) -> Result:
    return op_instance_import(ctx, args.name, source_dir=args.source_dir, backup_file=args.backup_file,
                              domain=args.domain, port=args.port, version=args.binding, tls=args.tls,
                              cert=args.cert, key=args.key, chain=args.chain, allow_missing=args.allow_missing)


def cmd_instance_status(ctx: Context, args: argparse.Namespace) -> Result:
    return op_instance_status(ctx, args.name)


def cmd_instance_lifecycle(ctx: Context, args: argparse.Namespace) -> Result:
    return op_instance_lifecycle(ctx, args.name, args.lifecycle)


def cmd_instance_logs(ctx: Context, args: argparse.Namespace) -> Result:
    if args.follow and ctx.out.json:
        raise UsageError("--follow streams text; it cannot be combined with --json",
                         hint="drop --json, or drop -f for a JSON list of lines")
    return op_instance_logs(ctx, args.name, lines=args.n, since=args.since, follow=args.follow,
                            emit_line=lambda line: ctx.out.write_lines([line]))


def cmd_instance_env(ctx: Context, args: argparse.Namespace) -> Result:
    return op_instance_env(ctx, args.name)


def cmd_instance_set_port(ctx: Context, args: argparse.Namespace) -> Result:
    return op_instance_set_port(ctx, args.name, args.port)


def cmd_instance_set_domain(ctx: Context, args: argparse.Namespace) -> Result:
    return op_instance_set_domain(ctx, args.name, args.domain)


def cmd_instance_rename(ctx: Context, args: argparse.Namespace) -> Result:
    return op_instance_rename(ctx, args.old, args.new)


def cmd_instance_delete(ctx: Context, args: argparse.Namespace) -> Result:
    return op_instance_delete(ctx, args.name, purge_data=args.purge_data, no_backup=args.no_backup,
                              message=args.backup_message)


def cmd_instance_reset_password(ctx: Context, args: argparse.Namespace) -> Result:
    return op_instance_reset_password(ctx, args.name)


def cmd_backup_create(ctx: Context, args: argparse.Namespace) -> Result:
    if bool(args.name) == bool(args.all):
        raise UsageError("give an instance NAME or --all, not both or neither")
    names = sorted(Instances(ctx).doc["instances"]) if args.all else [args.name]
    if not names:
        raise NotFound("there are no instances to back up")
    older = parse_duration(args.if_older_than, "--if-older-than") if args.if_older_than else None
    return op_backup_create(ctx, names, message=args.message, labels=args.label or [],
                            compression=args.compression or ctx.config.get("backups", "compression"),
                            if_older_than=older)


def cmd_backup_list(ctx: Context, args: argparse.Namespace) -> Result:
    return op_backup_list(ctx, args.instance, args.copies)


def cmd_backup_show(ctx: Context, args: argparse.Namespace) -> Result:
    return op_backup_show(ctx, args.backup_id)


def cmd_backup_verify(ctx: Context, args: argparse.Namespace) -> Result:
    if bool(args.backup_id) == bool(args.all):
        raise UsageError("give a backup ID or --all, not both or neither")
    if args.restore_test and not args.backup_id:
        raise UsageError("--restore-test takes one backup ID", hint="abssctl backup verify ID --restore-test")
    result = op_backup_verify(ctx, args.backup_id, deep=args.deep)
    if args.restore_test:
        tested = op_backup_restore_test(ctx, args.backup_id)
        result.data.update(tested.data)
        result.text += tested.text
    return result


def cmd_backup_prune(ctx: Context, args: argparse.Namespace) -> Result:
    if args.policy:
        return op_backup_prune_policy(ctx, args.instance)
    return op_backup_prune(ctx, args.instance, keep=args.keep, older_than=args.older_than)


def cmd_backup_schedule(ctx: Context, args: argparse.Namespace) -> Result:
    given = [f for f in ("calendar", "keep_last", "keep_daily", "keep_weekly", "keep_monthly", "copy_to", "verify",
                         "restore_test") if getattr(args, f) is not None]
    if args.action != "enable" and given:
        raise UsageError(f"--{given[0].replace('_', '-')} goes with backup schedule enable")
    if args.action == "enable":
        return op_backup_schedule_enable(ctx, calendar=args.calendar, copy_to=args.copy_to, verify=args.verify,
                                         restore_test_every=args.restore_test,
                                         keep={k: getattr(args, k) for k in ("keep_last", "keep_daily", "keep_weekly",
                                                                             "keep_monthly")})
    if args.action == "disable":
        return op_backup_schedule_disable(ctx)
    if args.action == "run":
        return op_backup_schedule_run(ctx)
    return op_backup_schedule_show(ctx)


def cmd_version_auto_upgrade(ctx: Context, args: argparse.Namespace) -> Result:
    if args.action != "enable" and (args.calendar or args.to):
        raise UsageError("--calendar and --to go with version auto-upgrade enable")
    if args.action == "enable":
        return op_version_auto_upgrade_enable(ctx, calendar=args.calendar, to=args.to)
    if args.action == "disable":
        return op_version_auto_upgrade_disable(ctx)
    return op_version_auto_upgrade_show(ctx)


def cmd_version_upgrade(ctx: Context, args: argparse.Namespace) -> Result:
    return op_version_upgrade(ctx, auto=args.auto, to=args.to)


def cmd_notify(ctx: Context, args: argparse.Namespace) -> Result:
    return op_notify(ctx, args.unit)


def cmd_backup_reconcile(ctx: Context, args: argparse.Namespace) -> Result:
    return op_backup_reconcile(ctx, apply_changes=args.apply)


def cmd_backup_restore(ctx: Context, args: argparse.Namespace) -> Result:
    return op_backup_restore(ctx, args.backup_id, instance=args.instance, pre_backup=not args.no_pre_backup,
                             message=args.backup_message)


def cmd_tls_verify(ctx: Context, args: argparse.Namespace) -> Result:
    return op_tls_verify(ctx, args.name, args.cert, args.key, args.chain)


def cmd_tls_install(ctx: Context, args: argparse.Namespace) -> Result:
    return op_tls_install(ctx, args.name, args.cert, args.key, args.chain)


def cmd_tls_use_system(ctx: Context, args: argparse.Namespace) -> Result:
    return op_tls_use_system(ctx, args.name)


def cmd_tls_self_signed(ctx: Context, args: argparse.Namespace) -> Result:
    return op_tls_self_signed(ctx, args.name, args.days)


def cmd_tls_acme(ctx: Context, args: argparse.Namespace) -> Result:
    return op_tls_acme(ctx, args.name, args.email, args.staging, args.server)


def cmd_tls_deploy_hook(ctx: Context, args: argparse.Namespace) -> Result:
    return op_tls_deploy_hook(ctx)


def cmd_quickstart(ctx: Context, args: argparse.Namespace) -> Result:
    return op_quickstart(ctx, args.name, args.domain, args.version, args.tls, acme=acme_flags(args))


def cmd_instance_list(ctx: Context, args: argparse.Namespace) -> Result:
    return op_instance_list(ctx)


def cmd_instance_show(ctx: Context, args: argparse.Namespace) -> Result:
    return op_instance_show(ctx, args.name)


def cmd_version_list(ctx: Context, args: argparse.Namespace) -> Result:
    return op_version_list(ctx, remote=args.remote, prerelease=args.include_prerelease)


def cmd_version_check_updates(ctx: Context, args: argparse.Namespace) -> Result:
    return op_version_check_updates(ctx)


def cmd_version_install(ctx: Context, args: argparse.Namespace) -> Result:
    if args.from_bundle:
        return op_version_import(ctx, args.from_bundle, expect_version=None if args.version == "latest"
                                 else args.version, set_current=args.set_current)
    return op_version_install(ctx, args.version, set_current=args.set_current,
                              refresh_runtime=args.refresh_runtime)


def cmd_version_switch(ctx: Context, args: argparse.Namespace) -> Result:
    return op_version_switch(ctx, args.version, restart=args.restart, backup=not args.no_backup,
                             message=args.backup_message)


def cmd_instance_set_version(ctx: Context, args: argparse.Namespace) -> Result:
    return op_instance_set_version(ctx, args.name, args.binding, backup=not args.no_backup,
                                   message=args.backup_message)


def cmd_version_uninstall(ctx: Context, args: argparse.Namespace) -> Result:
    return op_version_uninstall(ctx, args.version)


def cmd_version_export(ctx: Context, args: argparse.Namespace) -> Result:
    return op_version_export(ctx, args.version, args.output)


def cmd_version_import(ctx: Context, args: argparse.Namespace) -> Result:
    return op_version_import(ctx, args.file, set_current=args.set_current)


def cmd_completion(ctx: Context, args: argparse.Namespace) -> Result:
    script = completion_script(build_parser(None), args.shell)
    return Result({"shell": args.shell, "script": script}, [script.rstrip("\n")])


def cmd_man(ctx: Context, args: argparse.Namespace) -> Result:
    page = man_page(build_parser(None))
    return Result({"man": page}, [page.rstrip("\n")])


def cmd_complete(ctx: Context, args: argparse.Namespace) -> Result:
    return op_complete(ctx, args.what)


# -- argument types: validate while parsing, so errors exit 2 before anything runs ----

def _argtype(fn: Callable[[str], Any]) -> Callable[[str], Any]:
    def convert(value: str) -> Any:
        try:
            return fn(value)
        except UsageError as exc:
            raise argparse.ArgumentTypeError(exc.message + (f" ({exc.hint})" if exc.hint else "")) from None
    convert.__name__ = fn.__name__
    return convert


def _lock_timeout(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise UsageError(f"--lock-timeout must be a number of seconds, not {value!r}") from None
    if not 0 <= seconds <= 86400:
        raise UsageError(f"--lock-timeout must be between 0 and 86400, not {value}")
    return seconds


# -- the parser ----------------------------------------------------------------------

class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """argparse's formatter without its shutil import: add_argument builds one per argument."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                 width: int | None = None) -> None:
        if width is None:
            try:
                width = int(os.environ.get("COLUMNS") or os.get_terminal_size(sys.stdout.fileno()).columns) - 2
            except (OSError, ValueError):
                width = 78
        super().__init__(prog, indent_increment, max_help_position, max(40, width))


class Parser(argparse.ArgumentParser):
    """argparse whose mistakes raise UsageError (exit 2, honouring --json) instead of exiting."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}", hint=f"see {self.prog} --help")


def _add_global_flags(p: argparse.ArgumentParser, *, root: bool) -> None:
    # A subparser copies its namespace over the parent's (CPython Lib/argparse.py), so a default of
    # False here would erase `abssctl --json instance list`. SUPPRESS keeps the root's value.
    extra: dict[str, Any] = {} if root else {"default": argparse.SUPPRESS}
    g = p.add_argument_group("global options")
    g.add_argument("--config", metavar="FILE", help="config file (default $ABSSCTL_CONFIG or "
                   f"{DEFAULT_CONFIG})", **({"default": None} if root else extra))
    g.add_argument("--json", action="store_true", help="print one JSON document on stdout", **extra)
    g.add_argument("--dry-run", action="store_true", help="print the plan; change nothing", **extra)
    g.add_argument("-y", "--yes", action="store_true", help="accept the default answer of every prompt",
                   **extra)
    g.add_argument("--debug", action="store_true", help="echo commands; tracebacks for internal errors",
                   **extra)
    g.add_argument("-q", "--quiet", action="store_true", help="no progress lines", **extra)
    g.add_argument("--lock-timeout", metavar="S", type=_argtype(_lock_timeout),
                   help="seconds to wait for a lock (0-86400; default [locks] timeout)",
                   **({"default": None} if root else extra))
    g.add_argument("--no-color", action="store_true", help="no colour (also NO_COLOR)", **extra)


def _examples(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def _verb(verbs: argparse._SubParsersAction, name: str, help_text: str, handler: Callable[..., Result],
          *examples: str, mutating: bool = False) -> argparse.ArgumentParser:
    p = verbs.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".",
                         formatter_class=HelpFormatter,
                         epilog=_examples(*examples) if examples else None)
    _add_global_flags(p, root=False)
    command = f"{verbs._abssctl_group} {name}".strip()   # type: ignore[attr-defined]
    p.set_defaults(handler=handler, command=command, mutating=mutating)
    return p


def _group(groups: argparse._SubParsersAction, name: str, help_text: str) -> argparse._SubParsersAction:
    p = groups.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".")
    _add_global_flags(p, root=False)
    verbs = p.add_subparsers(dest="verb", required=True, metavar="VERB", prog=f"abssctl {name}")
    verbs._abssctl_group = name    # type: ignore[attr-defined]
    return verbs


def _single(groups: argparse._SubParsersAction, name: str, help_text: str, handler: Callable[..., Result],
            *examples: str, mutating: bool = False) -> argparse.ArgumentParser:
    groups._abssctl_group = ""     # type: ignore[attr-defined]
    return _verb(groups, name, help_text, handler, *examples, mutating=mutating)


def _add_init_parser(groups: argparse._SubParsersAction) -> None:
    p = _single(groups, "init", "prepare the host: service account, directories, config, registries",
                cmd_init, "abssctl init --allow-create-user", "abssctl init --dry-run --json",
                mutating=True)
    p.add_argument("--allow-create-user", action="store_true",
                   help="create the service user without asking (needed without a terminal)")
    p.add_argument("--discover", action="store_true",
                   help="report abssctl units, vhosts, instance dirs and versions the registries do not know")
    p.add_argument("--rebuild-state", action="store_true",
                   help="rewrite the registries from what --discover finds (the old ones are copied aside)")
    p.add_argument("--install-packages", action="store_true",
                   help="first install the Debian packages abssctl needs and the host lacks (apt-get; prompts)")
    p.set_defaults(writes_config=True)     # init writes a missing config file, even one named by --config


def _add_doctor_parser(groups: argparse._SubParsersAction) -> None:
    p = _single(groups, "doctor", "probe the host, the instances and their backups; --fix repairs what is safe",
                cmd_doctor, "abssctl doctor", "abssctl doctor --only nginx,tls --json", "abssctl doctor --fix")
    p.add_argument("--only", metavar="CATS", help="comma-separated categories: " + ",".join(DOCTOR_CATEGORIES))
    p.add_argument("--exclude", metavar="CATS", help="categories to skip")
    p.add_argument("--fix", action="store_true", help="apply the safe repairs (prompts), then probe again")


def _add_support_bundle_parser(groups: argparse._SubParsersAction) -> None:
    p = _single(groups, "support-bundle", "write a redacted tar.gz for a maintainer (no data, keys or secrets)",
                cmd_support_bundle, "abssctl support-bundle -o /tmp/abssctl-support.tar.gz")
    p.add_argument("-o", "--output", metavar="FILE", help="default ./abssctl-support-<host>-<time>.tar.gz")
    p.add_argument("--no-redact", action="store_true",
                   help="keep domains, IPs and user names (secrets are removed regardless)")


def _add_config_parser(groups: argparse._SubParsersAction) -> None:
    verbs = _group(groups, "config", "show and check the configuration")
    _verb(verbs, "show", "print the effective configuration and where each key comes from",
          cmd_config_show, "abssctl config show", "abssctl --json config show")
    _verb(verbs, "path", "print the config file path and whether it exists", cmd_config_path,
          "abssctl config path")
    p = _verb(verbs, "check", "validate the config file, the environment and template overrides",
              cmd_config_check, "abssctl config check", "ABSSCTL_PORTS__BASE=6000 abssctl config check")
    p.set_defaults(tolerates_bad_config=True)


def _add_ports_parser(groups: argparse._SubParsersAction) -> None:
    verbs = _group(groups, "ports", "port reservations")
    _verb(verbs, "list", "list reserved ports and whether each is listening", cmd_ports_list,
          "abssctl ports list", "abssctl ports list --json")


def _port_arg(value: str) -> int:
    return validate_port(value)


def _add_instance_parser(groups: argparse._SubParsersAction) -> None:
    verbs = _group(groups, "instance", "create, run, change and delete instances")
    p = _verb(verbs, "create", "create an instance: dirs, config, unit, health-gated start, HTTPS vhost",
              cmd_instance_create, "abssctl instance create alice --domain alice.budget.example.org",
              "abssctl instance create bob --domain bob.example.org --tls self-signed --json", mutating=True)
    p.add_argument("name", type=_argtype(validate_name), help="instance name")
    p.add_argument("--domain", type=_argtype(validate_fqdn), help="its FQDN (default NAME.<server_name_suffix>)")
    p.add_argument("--port", type=_argtype(_port_arg), help="loopback port (default: the lowest free one)")
    p.add_argument("--version", dest="binding", default="current",
                   type=_argtype(lambda v: v if v == "current" else validate_version(v, allow_latest=False)),
                   help="current (default) or an installed exact version")
    p.add_argument("--tls", choices=("auto", "system", "self-signed", "custom", "acme"), help="certificate source "
                   "(default [tls] default_source; auto: a certbot lineage, else the system pair when it "
                   "covers the domain, else self-signed; acme: created on self-signed, then a Let's Encrypt "
                   "certificate through certbot, as tls acme with [tls] acme_email/acme_server)")
    p.add_argument("--cert", metavar="FILE", help="with --tls custom: the certificate")
    p.add_argument("--key", metavar="FILE", help="with --tls custom: its key")
    p.add_argument("--chain", metavar="FILE", help="with --tls custom: intermediate certificates")
    p.add_argument("--no-start", action="store_true", help="do not start it (the vhost is still written)")
    _add_acme_flags(p, "--tls acme")
    p = _verb(verbs, "import", "bring an existing server's data in as a new instance (a Docker volume, an npm "
              "install's data dir, or another host's backup)", cmd_instance_import,
              "abssctl instance import home --from /var/lib/docker/volumes/actual_data/_data --domain "
              "budget.example.org", "abssctl instance import home --from-backup 20261126-101500-home-3f9a.tar.zst "
              "--dry-run", mutating=True)
    p.add_argument("name", type=_argtype(validate_name), help="the new instance's name")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--from", dest="source_dir", metavar="DIR", help="the server's data dir (holding "
                        "server-files/account.sqlite and user-files/), or the dir whose config.json names it; "
                        "only read, never changed")
    source.add_argument("--from-backup", dest="backup_file", metavar="FILE",
                        help="an abssctl backup archive, e.g. made on another host")
    p.add_argument("--domain", type=_argtype(validate_fqdn), help="its FQDN (default: the backup's, else "
                   "NAME.<server_name_suffix>)")
    p.add_argument("--port", type=_argtype(_port_arg), help="loopback port (default: the lowest free one)")
    p.add_argument("--version", dest="binding", default=None,
                   type=_argtype(lambda v: v if v == "current" else validate_version(v, allow_latest=False)),
                   help="an installed version the data can run on (default: the newest installed one)")
    p.add_argument("--tls", choices=("auto", "system", "self-signed", "custom"), help="certificate source, as "
                   "for instance create")
    p.add_argument("--cert", metavar="FILE", help="with --tls custom: the certificate")
    p.add_argument("--key", metavar="FILE", help="with --tls custom: its key")
    p.add_argument("--chain", metavar="FILE", help="with --tls custom: intermediate certificates")
    p.add_argument("--allow-missing", action="store_true",
                   help="import even when budget files the account database lists are missing")
    _verb(verbs, "list", "list registered instances (reads the registry only)", cmd_instance_list,
          "abssctl instance list", "abssctl instance list --json")
    p = _verb(verbs, "show", "show one instance's registry entry, server config and backups",
              cmd_instance_show, "abssctl instance show alice --json")
    p.add_argument("name", type=_argtype(validate_name), help="instance name")
    p = _verb(verbs, "status", "live state: unit, port, /health, /info version", cmd_instance_status,
              "abssctl instance status", "abssctl instance status alice --json")
    p.add_argument("name", nargs="?", type=_argtype(validate_name), help="instance name (default: all)")
    for verb, text in (("start", "start an instance, then the health gate"), ("stop", "stop an instance"),
                       ("restart", "restart an instance, then the health gate"),
                       ("enable", "start an instance at boot"), ("disable", "do not start an instance at boot")):
        p = _verb(verbs, verb, text, cmd_instance_lifecycle, f"abssctl instance {verb} alice", mutating=True)
        p.add_argument("name", type=_argtype(validate_name), help="instance name")
        p.set_defaults(lifecycle=verb)
    p = _verb(verbs, "logs", "show the server's journal", cmd_instance_logs, "abssctl instance logs alice -n 50",
              "abssctl instance logs alice -f")
    p.add_argument("name", type=_argtype(validate_name), help="instance name")
    p.add_argument("-n", type=_argtype(lambda v: bounded_int(v, "-n", 1, 100000)), default=100, metavar="N",
                   help="lines (default 100)")
    p.add_argument("--since", metavar="TS", help="journalctl --since value, e.g. '1 hour ago'")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines (Ctrl-C stops)")
    p = _verb(verbs, "env", "print the unit's environment and the command it runs", cmd_instance_env,
              "abssctl instance env alice")
    p.add_argument("name", type=_argtype(validate_name), help="instance name")
    p = _verb(verbs, "set-port", "move an instance to another loopback port", cmd_instance_set_port,
              "abssctl instance set-port alice 5010", mutating=True)
    p.add_argument("name", type=_argtype(validate_name), help="instance name")
    p.add_argument("port", type=_argtype(_port_arg), help="the new port")
    for alias in ("set-domain", "set-fqdn"):
        p = _verb(verbs, alias, "serve an instance under another domain" + (" (alias of set-domain)"
                  if alias == "set-fqdn" else ""), cmd_instance_set_domain,
                  f"abssctl instance {alias} alice alice.example.net", mutating=True)
        p.add_argument("name", type=_argtype(validate_name), help="instance name")
        p.add_argument("domain", type=_argtype(validate_fqdn), help="the new FQDN")
    p = _verb(verbs, "set-version", "move an instance to another version (cold backup, gate, data rollback)",
              cmd_instance_set_version, "abssctl instance set-version alice 26.9.0",
              "abssctl instance set-version alice current", mutating=True)
    p.add_argument("name", type=_argtype(validate_name), help="instance name")
    p.add_argument("binding", metavar="VER", type=_argtype(
        lambda v: v if v == "current" else validate_version(v, allow_latest=False)),
        help="an installed exact version, or current")
    p.add_argument("--no-backup", action="store_true", help="no pre-set-version backup (prompts)")
    p.add_argument("--backup-message", metavar="TEXT", help="message of the backup")
    p = _verb(verbs, "rename", "rename an instance: dirs, unit, vhost, TLS, port, registry, backups",
              cmd_instance_rename, "abssctl instance rename alice alicia", mutating=True)
    p.add_argument("old", type=_argtype(validate_name), help="current name")
    p.add_argument("new", type=_argtype(validate_name), help="new name")
    p = _verb(verbs, "delete", "remove an instance (prompts); its data is kept unless --purge-data",
              cmd_instance_delete, "abssctl instance delete alice",
              "abssctl instance delete alice --purge-data --no-backup --yes", mutating=True)
    p.add_argument("name", type=_argtype(validate_name), help="instance name")
    p.add_argument("--purge-data", action="store_true", help="also delete its data and TLS files")
    p.add_argument("--no-backup", action="store_true", help="with --purge-data: no final backup")
    p.add_argument("--backup-message", metavar="TEXT", help="message of the final backup")
    p = _verb(verbs, "reset-password", "reset the server password with the server's own tool (needs a TTY)",
              cmd_instance_reset_password, "abssctl instance reset-password alice", mutating=True)
    p.add_argument("name", type=_argtype(validate_name), help="instance name")


def _label(value: str) -> str:
    if not re.match(r"^[a-z0-9][a-z0-9:._-]{0,63}\Z", value):
        raise UsageError(f"invalid label {value!r}", hint="labels are 1-64 of a-z 0-9 : . _ -")
    return value


def _add_backup_parser(groups: argparse._SubParsersAction) -> None:
    verbs = _group(groups, "backup", "consistent backups, verification, retention and restore")
    p = _verb(verbs, "create", "back up an instance while it runs (SQLite online-backup snapshots)",
              cmd_backup_create, "abssctl backup create alice -m 'before tax season'", "abssctl backup create --all",
              mutating=True)
    p.add_argument("name", nargs="?", type=_argtype(validate_name), help="instance name")
    p.add_argument("--all", action="store_true", help="every instance, one after the other")
    p.add_argument("-m", "--message", metavar="MSG", help="why this backup was taken")
    p.add_argument("--label", action="append", type=_argtype(_label), help="a label (repeatable; keep protects "
                   "from prune)")
    p.add_argument("--compression", choices=("auto", "zstd", "gzip", "none"),
                   help="default [backups] compression")
    p.add_argument("--if-older-than", metavar="DURATION", help="only when the newest good backup is older than "
                   "DURATION (90m, 24h, 7d); else nothing to do, changed false (for Ansible, cron)")
    p = _verb(verbs, "list", "list backups, newest first", cmd_backup_list, "abssctl backup list --instance alice",
              "abssctl backup list --copies")
    p.add_argument("--instance", metavar="NAME", type=_argtype(validate_name))
    p.add_argument("--copies", action="store_true", help="also show which backups have a verified copy")
    p = _verb(verbs, "show", "show a backup's index entry and manifest summary", cmd_backup_show,
              "abssctl backup show 20261126-101500-alice-3f9a")
    p.add_argument("backup_id", metavar="ID", type=_argtype(validate_backup_id))
    p = _verb(verbs, "verify", "check archive checksums; --deep also extracts and checks every file and database",
              cmd_backup_verify, "abssctl backup verify --all --deep", mutating=False)
    p.add_argument("backup_id", metavar="ID", nargs="?", type=_argtype(validate_backup_id))
    p.add_argument("--all", action="store_true")
    p.add_argument("--deep", action="store_true", help="extract to a temp dir and run integrity_check")
    p.add_argument("--restore-test", action="store_true", help="also start the backup's server version on its "
                   "data, as the instance's user: /health UP and every user file's blob present; then "
                   "remove it all")
    p = _verb(verbs, "prune", "remove old backups (lists them, then asks)", cmd_backup_prune,
              "abssctl backup prune --keep 5", "abssctl backup prune --older-than 90 --dry-run", mutating=True)
    p.add_argument("--instance", metavar="NAME", type=_argtype(validate_name))
    way = p.add_mutually_exclusive_group()
    way.add_argument("--keep", type=_argtype(lambda v: bounded_int(v, "--keep", 1, 1000)), metavar="N")
    way.add_argument("--older-than", type=_argtype(lambda v: bounded_int(v, "--older-than", 1, 3650)),
                     metavar="DAYS")
    way.add_argument("--policy", action="store_true", help="the schedule's retention policy ([backups] keep_*)")
    p = _verb(verbs, "schedule", "back up every instance on a systemd timer: verify, keep by a retention policy, "
              "copy off the host", cmd_backup_schedule, "abssctl backup schedule enable --copy-to /mnt/usb",
              "abssctl backup schedule enable --calendar '*-*-* 03:00' --keep-daily 14 --keep-monthly 12",
              "abssctl backup schedule show", "abssctl backup schedule run", mutating=True)
    p.add_argument("action", choices=("enable", "show", "disable", "run"))
    p.add_argument("--calendar", metavar="SPEC", help="OnCalendar= of the timer (default [backups] schedule, daily)")
    for period in ("last", "daily", "weekly", "monthly"):
        p.add_argument(f"--keep-{period}", metavar="N", dest=f"keep_{period}",
                       type=_argtype(lambda v, f=f"--keep-{period}": bounded_int(v, f, 0, 1000)),
                       help=f"default [backups] keep_{period}")
    p.add_argument("--copy-to", metavar="DIR", help="copy each backup to DIR/<hostname>/<instance>/ ('' for none)")
    p.add_argument("--verify", action=argparse.BooleanOptionalAction, default=None,
                   help="deep-verify each new backup (default on)")
    p.add_argument("--restore-test", choices=("never", "daily", "weekly"), default=None,
                   help="how often a run starts a new backup on its server version (default weekly)")
    p = _verb(verbs, "reconcile", "compare the index with the files; --apply adopts copied archives",
              cmd_backup_reconcile, "abssctl backup reconcile", "abssctl backup reconcile --apply", mutating=True)
    p.add_argument("--apply", action="store_true", help="mark missing, adopt orphans, remove leftovers")
    p = _verb(verbs, "restore", "restore a backup into its instance (prompts; takes a pre-restore backup)",
              cmd_backup_restore, "abssctl backup restore 20261126-101500-alice-3f9a", mutating=True)
    p.add_argument("backup_id", metavar="ID", type=_argtype(validate_backup_id))
    p.add_argument("--instance", metavar="NAME", type=_argtype(validate_name), help="another existing instance")
    p.add_argument("--no-pre-backup", action="store_true", help="no safety backup of the current data")
    p.add_argument("--backup-message", metavar="TEXT", help="message of the pre-restore backup")


def _add_tls_parser(groups: argparse._SubParsersAction) -> None:
    verbs = _group(groups, "tls", "certificates of instances")
    p = _verb(verbs, "verify", "check a certificate and key: match, expiry, SAN, modes", cmd_tls_verify,
              "abssctl tls verify alice", "abssctl tls verify --cert c.pem --key k.pem")
    p.add_argument("name", nargs="?", type=_argtype(validate_name), help="instance name")
    p.add_argument("--cert", metavar="FILE")
    p.add_argument("--key", metavar="FILE")
    p.add_argument("--chain", metavar="FILE")
    p = _verb(verbs, "install", "install a custom certificate for an instance", cmd_tls_install,
              "abssctl tls install alice --cert fullchain.pem --key privkey.pem", mutating=True)
    p.add_argument("name", type=_argtype(validate_name), help="instance name")
    p.add_argument("--cert", metavar="FILE", required=True)
    p.add_argument("--key", metavar="FILE", required=True)
    p.add_argument("--chain", metavar="FILE")
    p = _verb(verbs, "use-system", "serve an instance with the system certificate ([tls] system_cert)",
              cmd_tls_use_system, "abssctl tls use-system alice", mutating=True)
    p.add_argument("name", type=_argtype(validate_name), help="instance name")
    p = _verb(verbs, "self-signed", "generate a self-signed certificate for an instance", cmd_tls_self_signed,
              "abssctl tls self-signed alice --days 825", mutating=True)
    p.add_argument("name", type=_argtype(validate_name), help="instance name")
    p.add_argument("--days", type=_argtype(lambda v: bounded_int(v, "--days", 1, 3650)), default=825)
    p = _verb(verbs, "acme", "get a Let's Encrypt certificate through certbot and serve it (renewed by certbot.timer)",
              cmd_tls_acme, "abssctl tls acme alice --email admin@example.org",
              "abssctl tls acme alice --staging", mutating=True)
    p.add_argument("name", type=_argtype(validate_name), help="instance name (its domain's DNS must point at this "
                   "host and port 80 be reachable)")
    _add_acme_flags(p)
    _verb(verbs, "deploy-hook", "run by certbot after a renewal: verify the new pair and reload nginx for the "
          "instances that serve it (RENEWED_LINEAGE, RENEWED_DOMAINS)", cmd_tls_deploy_hook,
          "RENEWED_LINEAGE=/etc/letsencrypt/live/alice.example.org abssctl tls deploy-hook", mutating=True)


def _add_acme_flags(p: argparse.ArgumentParser, with_tls: str = "") -> None:
    """certbot's account and CA flags: tls acme's, and instance create's and quickstart's with --tls acme."""
    also = f" (with {with_tls})" if with_tls else ""
    p.add_argument("--email", metavar="E", help=f"account email for expiry notices{also} (default [tls] "
                   "acme_email; none: certbot registers without one)")
    p.add_argument("--staging", action="store_true", help=f"Let's Encrypt's staging CA{also} (untrusted; for trying)")
    p.add_argument("--server", metavar="URL", help=f"ACME directory URL{also} (default [tls] acme_server, else "
                   "certbot's: Let's Encrypt)")


def acme_flags(args: argparse.Namespace) -> dict[str, Any] | None:
    """The --email/--staging/--server given to instance create or quickstart, or None."""
    flags = {"email": args.email, "staging": args.staging, "server": args.server}
    return flags if any(v not in (None, False) for v in flags.values()) else None


def _add_quickstart_parser(groups: argparse._SubParsersAction) -> None:
    p = _single(groups, "quickstart", "install missing Debian packages, init, install a version and bring up a "
                "first instance",
                cmd_quickstart, "abssctl quickstart alice --domain alice.budget.example.org --yes",
                mutating=True)
    p.add_argument("name", type=_argtype(validate_name), help="instance name")
    p.add_argument("--domain", type=_argtype(validate_fqdn), required=True, help="its FQDN")
    p.add_argument("--version", default="latest", type=_argtype(validate_version), help="default: latest")
    p.add_argument("--tls", choices=("auto", "system", "self-signed", "acme"),
                   help="certificate source (default [tls] default_source; acme: installs certbot and gets a "
                        "Let's Encrypt certificate: the domain's DNS must point here and port 80 be reachable)")
    _add_acme_flags(p, "--tls acme")


def _exact_version(value: str) -> str:
    return validate_version(value, allow_latest=False)


def _add_version_parser(groups: argparse._SubParsersAction) -> None:
    verbs = _group(groups, "version", "install and manage server versions side by side")
    p = _verb(verbs, "list", "list installed versions (and, with --remote, the registry's)", cmd_version_list,
              "abssctl version list", "abssctl version list --remote --json")
    p.add_argument("--remote", action="store_true", help="also list versions from the npm registry")
    p.add_argument("--include-prerelease", action="store_true", help="with --remote: show prereleases too")
    _verb(verbs, "check-updates", "compare the newest installed version with the registry's newest stable",
          cmd_version_check_updates, "abssctl version check-updates --json")
    p = _verb(verbs, "install", "install a server version from npm (verified and smoke-started)",
              cmd_version_install, "abssctl version install 26.9.0", "abssctl version install latest --set-current",
              "abssctl version install 26.9.0 --from-bundle /media/usb/abssctl-26.9.0.tar.zst", mutating=True)
    p.add_argument("version", metavar="VER", type=_argtype(validate_version), help="an exact version, or latest")
    p.add_argument("--set-current", action="store_true",
                   help="point current at it (only while no instance follows current)")
    p.add_argument("--from-bundle", metavar="FILE", help="install from an export bundle (no registry)")
    p.add_argument("--refresh-runtime", action="store_true",
                   help="fetch the newest node of the chosen major even if an older one is installed")
    p = _verb(verbs, "switch", "point current at VER and move its instances: cold backup, restart, health "
              "gate, rollback with data", cmd_version_switch, "abssctl version switch 26.9.0",
              "abssctl version switch 26.9.0 --restart none", mutating=True)
    p.add_argument("version", metavar="VER", type=_argtype(_exact_version), help="an installed version")
    p.add_argument("--restart", choices=("rolling", "all", "none"), default="rolling",
                   help="rolling (default): one instance at a time; all: stop all, then start all; "
                        "none: each changes at its next restart")
    p.add_argument("--no-backup", action="store_true", help="no pre-switch backups (prompts)")
    p.add_argument("--backup-message", metavar="TEXT", help="message of the pre-switch backups")
    p = _verb(verbs, "upgrade", "install the newest allowed update and switch to it (rolling, gated, rollback with "
              "data); then uninstall old unused versions", cmd_version_upgrade, "abssctl version upgrade --auto --yes",
              mutating=True)
    p.add_argument("--auto", action="store_true", help="unattended: skip versions whose switch rolled back before, "
                   "and mark one that rolls back now")
    p.add_argument("--to", choices=("patch", "minor", "latest"), help="how far to go (default [upgrade] to)")
    p = _verb(verbs, "auto-upgrade", "upgrade on a systemd timer (version upgrade --auto)", cmd_version_auto_upgrade,
              "abssctl version auto-upgrade enable --calendar weekly --to minor", "abssctl version auto-upgrade show",
              mutating=True)
    p.add_argument("action", choices=("enable", "show", "disable"))
    p.add_argument("--calendar", metavar="SPEC", help="OnCalendar= of the timer (default [upgrade] calendar, weekly)")
    p.add_argument("--to", choices=("patch", "minor", "latest"), help="default [upgrade] to (minor)")
    p = _verb(verbs, "uninstall", "remove an installed version that no instance uses (prompts)",
              cmd_version_uninstall, "abssctl version uninstall 25.6.0 --yes", mutating=True)
    p.add_argument("version", metavar="VER", type=_argtype(_exact_version), help="the installed version")
    p = _verb(verbs, "export", "write an air-gap bundle of an installed version", cmd_version_export,
              "abssctl version export 26.9.0 -o /media/usb/abssctl-26.9.0.tar.zst", mutating=True)
    p.add_argument("version", metavar="VER", type=_argtype(_exact_version), help="the installed version")
    p.add_argument("-o", "--output", metavar="FILE", required=True, help="the bundle to write")
    p = _verb(verbs, "import", "install a version from an export bundle, checked against this host",
              cmd_version_import, "abssctl version import /media/usb/abssctl-26.9.0.tar.zst", mutating=True)
    p.add_argument("file", metavar="FILE", help="a bundle written by abssctl version export")
    p.add_argument("--set-current", action="store_true",
                   help="point current at it (only while no instance follows current)")


def _add_notify_parser(groups: argparse._SubParsersAction) -> None:
    p = _single(groups, "notify", "tell a person that a unit failed: runs [notify] command with a summary on stdin "
                "(abssctl-notify@.service runs it)", cmd_notify, "abssctl notify abssctl-backup.service",
                mutating=True)
    p.add_argument("unit", metavar="UNIT", help="the unit that failed")


def _add_history_parser(groups: argparse._SubParsersAction) -> None:
    p = _single(groups, "history", "show recent operations from the operations log", cmd_history,
                "abssctl history", "abssctl history -n 5 --instance alice --json")
    p.add_argument("-n", type=_argtype(lambda v: bounded_int(v, "-n", 1, 100000)), default=20,
                   metavar="N", help="how many records (1-100000, default 20)")
    p.add_argument("--instance", metavar="NAME", type=_argtype(validate_name),
                   help="only operations on this instance")


def _add_completion_parser(groups: argparse._SubParsersAction) -> None:
    p = _single(groups, "completion", "print a shell completion script generated from the parser",
                cmd_completion, "abssctl completion bash > /etc/bash_completion.d/abssctl",
                "abssctl completion fish > ~/.config/fish/completions/abssctl.fish")
    p.add_argument("shell", choices=("bash", "zsh", "fish"), help="the shell")


def _add_man_parser(groups: argparse._SubParsersAction) -> None:
    _single(groups, "man", "print the manual page (roff) generated from the parser", cmd_man,
            "abssctl man > /usr/local/share/man/man1/abssctl.1")


def _add_complete_parser(groups: argparse._SubParsersAction) -> None:
    groups._abssctl_group = ""     # type: ignore[attr-defined]
    p = groups.add_parser("__complete")
    _add_global_flags(p, root=False)
    p.add_argument("what", choices=("instances", "versions", "backups"))
    p.set_defaults(handler=cmd_complete, command="__complete", mutating=False)


# name -> adder. Order is the order of --help.
GROUPS: dict[str, Callable[[argparse._SubParsersAction], None]] = {
    "quickstart": _add_quickstart_parser, "init": _add_init_parser, "version": _add_version_parser,
    "instance": _add_instance_parser, "tls": _add_tls_parser, "backup": _add_backup_parser,
    "doctor": _add_doctor_parser, "support-bundle": _add_support_bundle_parser, "ports": _add_ports_parser,
    "config": _add_config_parser, "history": _add_history_parser, "notify": _add_notify_parser,
    "completion": _add_completion_parser, "man": _add_man_parser,
}
HIDDEN_GROUPS = {"__complete": _add_complete_parser}

ROOT_DESCRIPTION = ("Run several Actual Budget sync servers (@actual-app/sync-server) on one Debian host, "
                    "each with its own port, data directory, systemd unit and nginx HTTPS vhost.")
ROOT_EPILOG = """exit status:
  0 ok, 2 bad input, 3 host problem, 4 a provider (npm, systemd, nginx, openssl) failed,
  70 internal error (a bug), 130 interrupted

""" + _examples("abssctl init --allow-create-user", "abssctl --json config show",
                "abssctl ports list --json")


def build_parser(group: str | None) -> Parser:
    """The parser; only the named group's subcommands are filled in (all of them when None)."""
    # argparse asks gettext for every title of every parser, and each ask searches the locale dirs:
    # about 0.1 ms a call, 20 ms for the instance group. abssctl's messages are English anyway.
    argparse._ = lambda text: text                                    # type: ignore[attr-defined]
    argparse.ngettext = lambda one, many, n: one if n == 1 else many  # type: ignore[attr-defined]
    root = Parser(prog="abssctl", description=ROOT_DESCRIPTION, epilog=ROOT_EPILOG,
                  formatter_class=HelpFormatter)
    root.add_argument("-V", "--version", action="store_true", dest="show_version",
                      help="print the version and exit")
    _add_global_flags(root, root=False)
    root.set_defaults(json=False, dry_run=False, yes=False, debug=False, quiet=False, no_color=False,
                      config=None, lock_timeout=None)
    # An explicit prog keeps argparse from building a HelpFormatter (and importing shutil) per level.
    groups = root.add_subparsers(dest="group", required=True, metavar="COMMAND", prog="abssctl")
    if group in GROUPS:            # the fast path: one group only (every parser costs gettext lookups)
        GROUPS[group](groups)
    elif group in HIDDEN_GROUPS:
        HIDDEN_GROUPS[group](groups)
    else:                          # --help, a typo, man and completion: the whole tree
        for adder in GROUPS.values():
            adder(groups)
    return root


def _group_word(argv: Sequence[str]) -> str | None:
    """The first positional word: the command group to fill in."""
    takes_value = {"--config", "--lock-timeout"}
    skip = False
    for word in argv:
        if skip:
            skip = False
        elif word in takes_value:
            skip = True
        elif word == "--":
            return None
        elif not word.startswith("-"):
            return word
    return None


def _wants_version(argv: Sequence[str]) -> bool:
    """-V/--version before any command word (``instance create --version`` is another flag)."""
    takes_value = {"--config", "--lock-timeout"}
    skip = False
    for word in argv:
        if skip:
            skip = False
        elif word in ("-V", "--version"):
            return True
        elif word in takes_value:
            skip = True
        elif not word.startswith("-"):
            return False
    return False


def version_line() -> str:
    """``abssctl X.Y.Z (source)``, or ``(build <commit12>, <date>)`` inside abssctl.pyz."""
    loader = getattr(__spec__, "loader", None)
    if loader is not None and type(loader).__name__ == "zipimporter":
        try:
            info = json.loads(_read_resource("BUILD-INFO.json"))
        except (OSError, ValueError):
            return f"abssctl {__version__} (archive without BUILD-INFO.json)"
        import time
        day = time.strftime("%Y-%m-%d", time.gmtime(int(info.get("source_date_epoch", 0))))
        return f"abssctl {__version__} (build {str(info.get('git_commit', 'unknown'))[:12]}, {day})"
    return f"abssctl {__version__} (source)"


# -- completion and man, generated from the parser --------------------------------------

def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return {name: p for name, p in action.choices.items() if not name.startswith("__")}
    return {}


def _options(parser: argparse.ArgumentParser) -> list[str]:
    return sorted(o for a in parser._actions for o in a.option_strings if o.startswith("--"))


def _dynamic(parser: argparse.ArgumentParser) -> str | None:
    """What a parser's first positional completes to: instances, versions or backups."""
    for a in parser._actions:
        if not a.option_strings and not isinstance(a, argparse._SubParsersAction):
            return {"name": "instances", "old": "instances", "version": "versions",
                    "backup_id": "backups"}.get(a.dest)
    return None


def _command_table(root: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """(group, verb or '', parser) for every command."""
    rows = []
    for group, gp in _subcommands(root).items():
        verbs = _subcommands(gp)
        if not verbs:
            rows.append((group, "", gp))
        rows += [(group, verb, vp) for verb, vp in verbs.items()]
    return rows


def completion_script(root: argparse.ArgumentParser, shell: str) -> str:
    """A bash, zsh or fish completion script for the given parser tree."""
    rows = _command_table(root)
    groups = list(_subcommands(root))
    if shell == "fish":
        return _fish_completion(root, rows)
    cases = []
    for group in groups:
        verbs = [v for g, v, _p in rows if g == group and v]
        cases.append(f'        {group}) words_for_verb="{" ".join(verbs)}" ;;')
    opt_cases, dyn_cases = [], []
    for group, verb, p in rows:
        key = f"{group}:{verb}"
        opt_cases.append(f'        "{key}") opts="{" ".join(_options(p))}" ;;')
        kind = _dynamic(p)
        if kind:
            dyn_cases.append(f'        "{key}") dyn={kind} ;;')
    body = f"""# abssctl completion for bash (generated by `abssctl completion bash`; zsh via bashcompinit)
_abssctl() {{
    local cur group="" verb="" word i words_for_verb="" opts="" dyn=""
    cur="${{COMP_WORDS[COMP_CWORD]}}"
    for ((i = 1; i < COMP_CWORD; i++)); do
        word="${{COMP_WORDS[i]}}"
        case "$word" in
            --config|--lock-timeout) ((i++)); continue ;;
            -*) continue ;;
        esac
        if [[ -z "$group" ]]; then group="$word"; elif [[ -z "$verb" ]]; then verb="$word"; fi
    done
    if [[ -z "$group" ]]; then
        COMPREPLY=($(compgen -W "{" ".join(groups)} {" ".join(_options(root))}" -- "$cur"))
        return
    fi
    case "$group" in
{chr(10).join(cases)}
    esac
    if [[ -n "$words_for_verb" && -z "$verb" ]]; then
        COMPREPLY=($(compgen -W "$words_for_verb" -- "$cur"))
        return
    fi
    case "$group:$verb" in
{chr(10).join(opt_cases)}
    esac
    case "$group:$verb" in
{chr(10).join(dyn_cases) or '        "") ;;'}
    esac
    if [[ "$cur" != -* && -n "$dyn" ]]; then
        COMPREPLY=($(compgen -W "$(abssctl __complete "$dyn" 2>/dev/null)" -- "$cur"))
    else
        COMPREPLY=($(compgen -W "$opts" -- "$cur"))
    fi
}}
"""
    if shell == "zsh":
        return "#compdef abssctl\nautoload -U +X bashcompinit && bashcompinit\n" + body + \
            "complete -F _abssctl abssctl\n"
    return body + "complete -F _abssctl abssctl\n"


def _fish_completion(root: argparse.ArgumentParser,
                     rows: list[tuple[str, str, argparse.ArgumentParser]]) -> str:
    groups = list(_subcommands(root))
    lines = ["# abssctl completion for fish (generated by `abssctl completion fish`)",
             "complete -c abssctl -f"]
    for group, gp in _subcommands(root).items():
        lines.append(f"complete -c abssctl -n 'not __fish_seen_subcommand_from {' '.join(groups)}' "
                     f"-a {group} -d {json.dumps(gp.description or group)}")
    for group, verb, p in rows:
        if verb:
            lines.append(f"complete -c abssctl -n '__fish_seen_subcommand_from {group}' -a {verb} "
                         f"-d {json.dumps(p.description or verb)}")
        cond = f"__fish_seen_subcommand_from {verb or group}"
        for opt in _options(p):
            lines.append(f"complete -c abssctl -n '{cond}' -l {opt[2:]}")
        kind = _dynamic(p)
        if kind:
            lines.append(f"complete -c abssctl -n '{cond}' -a '(abssctl __complete {kind} 2>/dev/null)'")
    return "\n".join(lines) + "\n"


def _roff(text: str) -> str:
    escaped = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join(("\\&" + line) if line.startswith((".", "'")) else line for line in escaped.splitlines())


def man_page(root: argparse.ArgumentParser) -> str:
    """roff for man(1): every command, its options and examples, exit status, files."""
    out = [f'.TH ABSSCTL 1 "" "abssctl {__version__}" "User Commands"', ".SH NAME",
           "abssctl \\- manage Actual Budget sync servers on one host", ".SH SYNOPSIS",
           ".B abssctl", "[\\fIGLOBAL OPTIONS\\fR] \\fICOMMAND\\fR [\\fIVERB\\fR] [\\fIARGS\\fR]",
           ".SH DESCRIPTION", _roff(ROOT_DESCRIPTION), ".SH GLOBAL OPTIONS"]
    for action in root._actions:
        if action.option_strings and action.help not in (None, argparse.SUPPRESS):
            out += [".TP", "\\fB" + _roff(", ".join(action.option_strings)) + "\\fR"
                    + (f" \\fI{action.metavar}\\fR" if action.metavar else ""), _roff(action.help)]
    out.append(".SH COMMANDS")
    for group, verb, p in _command_table(root):
        out += [".SS " + _roff(f"abssctl {group} {verb}".strip()), _roff(p.description or "")]
        for action in p._actions:
            if action.help in (None, argparse.SUPPRESS) or action.container.title == "global options":
                continue
            if isinstance(action, argparse._HelpAction):
                continue
            label = ", ".join(action.option_strings) or (action.metavar or action.dest).upper()
            out += [".TP", "\\fB" + _roff(label) + "\\fR", _roff(action.help)]
        if p.epilog:
            out += [".PP", ".nf", _roff(p.epilog), ".fi"]
    out += [".SH EXIT STATUS", ".TP", "0", "ok (dry runs and no-ops included)", ".TP", "2",
            "bad input: usage, validation, not found, already exists, declined, needs \\-\\-yes",
            ".TP", "3", "host problem: missing tool, permission, disk, lock timeout, corrupt state",
            ".TP", "4", "a provider failed: npm, systemd, nginx, openssl, tar/zstd, the health gate",
            ".TP", "70", "internal error (a bug): rerun with \\-\\-debug and report it",
            ".TP", "130", "interrupted; the undo has run",
            ".SH ENVIRONMENT", ".TP", "ABSSCTL_CONFIG", "the config file, unless \\-\\-config is given",
            ".TP", "ABSSCTL_<SECTION>__<KEY>", "overrides one config key, e.g. ABSSCTL_PORTS__BASE=6000",
            ".TP", "NO_COLOR", "disables colour",
            ".SH FILES", ".TP", _roff(DEFAULT_CONFIG), "the configuration (TOML)",
            ".TP", "/var/lib/abssctl/registry/", "instances, ports and versions registries",
            ".TP", "/var/log/abssctl/operations.jsonl", "the operations log",
            ".SH SEE ALSO", "systemctl(1), nginx(8), npm(1)", ""]
    return "\n".join(out)


# ============================================================================
# 10. main
# ============================================================================


def make_context(args: argparse.Namespace, out: Output) -> Context:
    """Load the configuration and build the Context; invalid config exits 2 (except config check)."""
    flags = {"locks.timeout": args.lock_timeout} if args.lock_timeout is not None else {}
    config, problems = load_config(args.config, os.environ, flags,
                                   may_be_missing=getattr(args, "writes_config", False))
    if problems and not getattr(args, "tolerates_bad_config", False):
        raise config_error(problems)
    args.config_problems = problems
    for key in config.unknown:
        out.warn(f"unknown configuration key {key} ignored")
    interactive = (not out.json) and sys.stdin.isatty() and sys.stderr.isatty()
    if args.mutating and not args.dry_run:
        os.umask(0o027)
    return Context(config=config, out=out, dry_run=args.dry_run, assume_yes=args.yes,
                   interactive=interactive, lock_timeout=float(config.get("locks", "timeout")),
                   command=args.command)


def report_error(out: Output, exc: AbssctlError, result: Result | None = None) -> int:
    """One message on stderr (and the JSON document on stdout under --json); returns the exit code."""
    out.error(exc)
    if out.json:
        doc = {"ok": False, "error": error_doc(exc), **exc.data}
        if result is not None:
            doc.update(result.data)
        try:
            out.write_json(doc)
        except BrokenPipeError:
            _reader_went_away()
    return int(exc.exit_code)


def _reader_went_away() -> None:
    """stdout was closed early (``| head``): point it at /dev/null so nothing fails again at exit."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _host_error(exc: OSError) -> HostError:
    import errno
    where = f" {exc.filename}" if exc.filename else ""
    text = f"{exc.strerror or exc}{':' if where else ''}{where}"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return PermissionDenied(f"permission denied: {text}", hint="run as root, or fix the path's owner and mode")
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFull(f"no space left: {text}", hint="free some space, then re-run")
    return HostError(text)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, run one command, emit its result; map every failure to an exit code."""
    return int(_main(argv))


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    color = "--no-color" not in argv and "NO_COLOR" not in os.environ and sys.stderr.isatty()
    out = Output(json_mode="--json" in argv, quiet="-q" in argv or "--quiet" in argv,
                 debug="--debug" in argv, color=color, stdout=sys.stdout, stderr=sys.stderr)
    try:
        if _wants_version(argv):
            out.write_lines([version_line()])
            return ExitCode.OK
        args = build_parser(_group_word(argv)).parse_args(argv)
        if args.show_version:
            out.write_lines([version_line()])
            return ExitCode.OK
        out.json, out.quiet, out.debug = args.json, args.quiet, args.debug
        out.color = out.color and not args.no_color
        ctx = make_context(args, out)
        if args.mutating and not args.dry_run:
            recover_before_validation(ctx)
        result = args.handler(ctx, args)
    except AbssctlError as exc:
        return report_error(out, exc)
    except (KeyboardInterrupt, _Terminated):
        return report_error(out, Interrupted("interrupted; the changes made so far were undone"))
    except BrokenPipeError:
        _reader_went_away()
        return ExitCode.OK
    except SystemExit as exc:            # --help and argparse's own exits
        return int(exc.code or 0) if isinstance(exc.code, int) else ExitCode.USAGE
    except OSError as exc:               # host trouble no boundary translated
        if out.debug:
            import traceback
            traceback.print_exc(file=out.stderr)
        return report_error(out, _host_error(exc))
    except Exception:  # noqa: BLE001 - the one place a bug becomes exit 70
        if out.debug:
            import traceback
            traceback.print_exc(file=out.stderr)
        return report_error(out, InternalError("internal error; rerun with --debug and report it"))
    try:
        emit(out, result)
        if result.error is not None and not out.json:
            out.error(result.error)
    except BrokenPipeError:
        _reader_went_away()
    return result.error.exit_code if result.error is not None else ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
