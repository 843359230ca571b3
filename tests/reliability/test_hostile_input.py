"""Hostile input over TOML, environment and arguments (DESIGN §3.3, §6.2, §10.7).

Every case exits 2 (or 3 for a host fault) with a message and no traceback, and `sandbox.tree()`
is byte-identical before and after the command. This table adds to tests/unit/test_instances.py's
BAD (names, domains, ports, versions of instance/tls commands), which it does not repeat; the
combined count is asserted below. Unknown sections and keys are warnings (exit 0) and are tested
separately, outside the count.
"""
from __future__ import annotations

from typing import Any

import pytest

from reliability.rigs import RHost, SharedRHost, show, tree_diff
from unit.test_instances import BAD as UNIT_BAD

pytestmark = pytest.mark.reliability
MUTATE = ["instance", "create", "zed", "--domain", "zed.example.org"]


def _setup(h: RHost, ctx: dict[str, Any]) -> None:
    h.ok("instance", "create", "alice", "--domain", "alice.example.org")
    ctx["backup"] = h.ok("backup", "create", "alice")["backup"]["id"]


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory):
    s = SharedRHost(tmp_path_factory, _setup)
    yield s
    s.close()


# (id, TOML text appended to the sandbox config as an override, or a whole file if it starts with "!")
TOML: list[tuple[str, str]] = [
    ("toml-path-int", "[paths]\nstate_dir = 5"),
    ("toml-path-relative", '[paths]\ninstance_root = "srv/instances"'),
    ("toml-path-space", '[paths]\nbackup_root = "/srv/with space"'),
    ("toml-path-dotdot", '[paths]\nlog_dir = "/srv/../etc"'),
    ("toml-path-dot", '[paths]\nrun_dir = "/srv/./run"'),
    ("toml-path-unicode", '[paths]\ntls_dir = "/srv/tlś"'),
    ("toml-path-newline", '[paths]\ntemplates_dir = "/srv/t\\nx"'),
    ("toml-path-dollar", '[paths]\nsystemd_unit_dir = "/etc/$(id)"'),
    ("toml-path-list", '[paths]\nnginx_sites_enabled = ["/a"]'),
    ("toml-port-string", '[ports]\nbase = "6000"'),
    ("toml-port-float", "[ports]\nbase = 6000.5"),
    ("toml-port-bool", "[ports]\nmax = true"),
    ("toml-port-zero", "[nginx]\nhttp_port = 0"),
    ("toml-port-70000", "[nginx]\nhttps_port = 70000"),
    ("toml-base-above-max", "[ports]\nbase = 7000\nmax = 6000"),
    ("toml-bind-name", '[ports]\nbind = "localhost"'),
    ("toml-bool-string", '[nginx]\nblock_internal = "yes"'),
    ("toml-size-mb", '[nginx]\nclient_max_body_size = "50MB"'),
    ("toml-size-int", "[nginx]\nclient_max_body_size = 50"),
    ("toml-timeout-string", '[health]\ntimeout = "90"'),
    ("toml-interval-zero", "[health]\ninterval = 0"),
    ("toml-timeout-inf", "[health]\ntimeout = inf"),
    ("toml-timeout-nan", "[locks]\ntimeout = nan"),
    ("toml-lock-negative", "[locks]\ntimeout = -1"),
    ("toml-keep-0", "[backups]\nkeep = 0"),
    ("toml-keep-1001", "[backups]\nkeep = 1001"),
    ("toml-compression-lz4", '[backups]\ncompression = "lz4"'),
    ("toml-tls-source", '[tls]\ndefault_source = "acme"'),
    ("toml-argv-string", '[commands]\nsystemctl = "systemctl"'),
    ("toml-argv-empty", "[commands]\nnpm = []"),
    ("toml-argv-empty-word", '[commands]\nnode = [""]'),
    ("toml-argv-ints", "[commands]\nnginx = [1, 2]"),
    ("toml-list-string", '[npm]\nallow_scripts = "bcrypt"'),
    ("toml-user-upper", '[service]\nuser = "Root"'),
    ("toml-group-space", '[service]\ngroup = "a b"'),
    ("toml-syntax-open-table", "![paths\nstate_dir = \"/x\""),
    ("toml-syntax-no-value", "![ports]\nbase ="),
    ("toml-syntax-duplicate-key", "![ports]\nbase = 6000\nbase = 6001"),
    ("toml-syntax-duplicate-table", "![ports]\nbase = 6000\n[ports]\nmax = 7000"),
    ("toml-syntax-bad-string", '![paths]\nstate_dir = "/x'),
    ("toml-not-utf8", "!\udcff\udcfe = 1"),
]

# (id, {env var: value})
ENV: list[tuple[str, dict[str, str]]] = [
    ("env-int-text", {"ABSSCTL_PORTS__BASE": "abc"}),
    ("env-int-nan", {"ABSSCTL_PORTS__BASE": "NaN"}),
    ("env-int-float", {"ABSSCTL_PORTS__MAX": "6000.5"}),
    ("env-int-huge", {"ABSSCTL_PORTS__MAX": "9" * 40}),
    ("env-int-negative", {"ABSSCTL_PORTS__BASE": "-5"}),
    ("env-int-empty", {"ABSSCTL_BACKUPS__KEEP": ""}),
    ("env-float-nan", {"ABSSCTL_HEALTH__TIMEOUT": "nan"}),
    ("env-float-inf", {"ABSSCTL_HEALTH__TIMEOUT": "inf"}),
    ("env-float-overflow", {"ABSSCTL_LOCKS__TIMEOUT": "1e999"}),
    ("env-float-negative", {"ABSSCTL_LOCKS__TIMEOUT": "-0.5"}),
    ("env-float-text", {"ABSSCTL_HEALTH__INTERVAL": "fast"}),
    ("env-bool-maybe", {"ABSSCTL_NGINX__BLOCK_INTERNAL": "maybe"}),
    ("env-path-relative", {"ABSSCTL_PATHS__STATE_DIR": "var/lib/x"}),
    ("env-path-space", {"ABSSCTL_PATHS__STATE_DIR": "/var/lib/a b"}),
    ("env-path-dotdot", {"ABSSCTL_PATHS__BACKUP_ROOT": "/srv/../../etc"}),
    ("env-path-unicode", {"ABSSCTL_PATHS__INSTANCE_ROOT": "/srv/instancés"}),
    ("env-path-semicolon", {"ABSSCTL_PATHS__LOG_DIR": "/var/log;rm"}),
    ("env-argv-bad-json", {"ABSSCTL_COMMANDS__SYSTEMCTL": '["systemctl"'}),
    ("env-argv-empty-json", {"ABSSCTL_COMMANDS__NGINX": "[]"}),
    ("env-argv-blank", {"ABSSCTL_COMMANDS__NODE": "   "}),
    ("env-argv-newline", {"ABSSCTL_COMMANDS__NPM": '["npm\\nx"]'}),
    ("env-size-bad", {"ABSSCTL_NGINX__CLIENT_MAX_BODY_SIZE": "0"}),
    ("env-choice-bad", {"ABSSCTL_BACKUPS__COMPRESSION": "xz"}),
    ("env-user-bad", {"ABSSCTL_SERVICE__USER": "0day"}),
    ("env-bind-bad", {"ABSSCTL_PORTS__BIND": "127.0.0.1; rm"}),
]

BID = "{BID}"
# (id, argv after --json)
ARGS: list[tuple[str, list[str]]] = [
    ("bid-dotdot", ["--yes", "backup", "restore", "../../etc/passwd"]),
    ("bid-dotdot-shaped", ["--yes", "backup", "restore", "20261202-000000-../x-abcd"]),
    ("bid-absolute", ["backup", "show", "/etc/passwd"]),
    ("bid-upper", ["backup", "verify", "20261202-000000-ALICE-abcd"]),
    ("bid-bad-hex", ["backup", "show", "20261202-000000-alice-zzzz"]),
    ("bid-newline", ["backup", "verify", "20261202-000000-alice-abcd\n"]),
    ("bid-unknown", ["--yes", "backup", "restore", "20261202-000000-alice-abcd"]),
    ("restore-into-dotdot", ["--yes", "backup", "restore", BID, "--instance", "../x"]),
    ("restore-into-missing", ["--yes", "backup", "restore", BID, "--instance", "ghost"]),
    ("restore-needs-yes", ["backup", "restore", BID]),
    ("days-negative", ["tls", "self-signed", "alice", "--days", "-1"]),
    ("days-text", ["tls", "self-signed", "alice", "--days", "abc"]),
    ("days-float", ["tls", "self-signed", "alice", "--days", "1e3"]),
    ("history-n-0", ["history", "-n", "0"]),
    ("history-n-100001", ["history", "-n", "100001"]),
    ("history-n-text", ["history", "-n", "many"]),
    ("logs-n-huge", ["instance", "logs", "alice", "-n", "100001"]),
    ("prune-keep-0", ["--yes", "backup", "prune", "--keep", "0"]),
    ("prune-keep-1001", ["--yes", "backup", "prune", "--keep", "1001"]),
    ("prune-keep-text", ["--yes", "backup", "prune", "--keep", "all"]),
    ("prune-older-0", ["--yes", "backup", "prune", "--older-than", "0"]),
    ("prune-older-3651", ["--yes", "backup", "prune", "--older-than", "3651"]),
    ("prune-both", ["--yes", "backup", "prune", "--keep", "2", "--older-than", "5"]),
    ("prune-bad-instance", ["--yes", "backup", "prune", "--instance", "../x", "--keep", "1"]),
    ("lock-timeout-negative", ["--lock-timeout", "-1", *MUTATE]),
    ("lock-timeout-huge", ["--lock-timeout", "86401", *MUTATE]),
    ("lock-timeout-nan", ["--lock-timeout", "nan", *MUTATE]),
    ("lock-timeout-inf", ["--lock-timeout", "inf", *MUTATE]),
    ("compression-bad", ["backup", "create", "alice", "--compression", "lz4"]),
    ("backup-create-missing", ["backup", "create", "ghost"]),
    ("backup-create-dotdot", ["backup", "create", "../alice"]),
    ("backup-label-space", ["backup", "create", "alice", "--label", "a b"]),
    ("backup-list-bad-instance", ["backup", "list", "--instance", "../x"]),
    ("version-range", ["version", "install", "^25"]),
    ("version-v", ["version", "install", "v25.6.0"]),
    ("version-build", ["version", "install", "25.6.0+build.1"]),
    ("version-65-chars", ["version", "install", "1.0.0-" + "a" * 59]),
    ("install-dotdot", ["version", "install", "../25.6.0"]),
    ("version-unknown", ["version", "install", "9.9.9"]),
    ("switch-not-installed", ["version", "switch", "26.9.0"]),
    ("switch-bad", ["version", "switch", "../current"]),
    ("uninstall-current", ["--yes", "version", "uninstall", "25.6.0"]),
    ("uninstall-missing", ["--yes", "version", "uninstall", "9.9.9"]),
    ("export-dotdot", ["version", "export", "../25.6.0", "-o", "/tmp/x.tar"]),
    ("import-missing", ["version", "import", "/nonexistent/bundle.tar.zst"]),
    ("tls-install-space-path", ["tls", "install", "alice", "--cert", "/tmp/with space.pem", "--key", "/tmp/k y.pem"]),
    ("tls-install-dotdot-path", ["tls", "install", "alice", "--cert", "../../etc/ssl/cert.pem", "--key",
                                 "../../etc/ssl/cert.key"]),
    ("tls-install-unicode-path", ["tls", "install", "alice", "--cert", "/tmp/cërt.pem", "--key", "/tmp/kéy.pem"]),
    ("tls-install-dir", ["tls", "install", "alice", "--cert", "/etc", "--key", "/etc"]),
    ("config-relative", ["--config", "relative.toml", *MUTATE]),
    ("config-missing", ["--config", "/nonexistent/abssctl.toml", *MUTATE]),
    ("config-dir", ["--config", "/etc", *MUTATE]),
    ("unknown-command", ["frobnicate"]),
    ("unknown-flag", ["instance", "create", "zed", "--domian", "zed.example.org"]),
    ("completion-bad-shell", ["completion", "powershell"]),
    ("quickstart-bad-version", ["quickstart", "zed", "--domain", "zed.example.org", "--version", "v1"]),
]

CASES = [("toml", i, v) for i, v in TOML] + [("env", i, v) for i, v in ENV] + [("args", i, v) for i, v in ARGS]


def test_the_matrix_is_big_enough_and_adds_to_the_unit_tier() -> None:
    ids = [i for _k, i, _v in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 60, len(ids)
    assert not set(ids) & {i for i, *_ in UNIT_BAD}
    print(f"hostile input: {len(ids)} reliability cases + {len(UNIT_BAD)} unit-tier cases "
          f"= {len(ids) + len(UNIT_BAD)}")


@pytest.mark.parametrize("kind,value", [pytest.param(k, v, id=i) for k, i, v in CASES])
def test_hostile_input_exits_2_or_3_with_a_message_and_changes_nothing(shared: SharedRHost, kind: str, value: Any,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    h = shared.get()
    sb = h.sb
    original = sb.config.read_bytes()
    argv = MUTATE
    try:
        if kind == "toml":
            text = value[1:] if value.startswith("!") else _merge(original.decode(), value)
            sb.config.write_bytes(text.encode("utf-8", "surrogateescape"))
        elif kind == "env":
            for k, v in value.items():
                monkeypatch.setenv(k, v)
        else:
            argv = [a.replace(BID, shared.ctx["backup"]) for a in value]
        before, units = sb.tree(), sb.systemctl_units()
        res = sb.run("--json", *argv)
        after = sb.tree()
        shared.dirty = after != before or sb.systemctl_units() != units
    finally:
        sb.config.write_bytes(original)
    assert res.rc in (2, 3), show(res)
    assert "Traceback" not in res.err, show(res)
    assert isinstance(res.doc, dict) and res.doc.get("ok") is False, show(res)
    assert (res.doc["error"].get("message") or "").strip(), show(res)
    assert res.rc == 3 or res.doc["error"]["kind"] in ("UsageError", "NotFound", "AlreadyExists", "Conflict",
                                                       "NeedsConfirmation"), show(res)
    blob = str(res.doc["error"])
    if kind == "env":            # §3.3: names the key and its source
        assert all(k in blob for k in value), show(res)
    elif kind == "toml" and not value.startswith("!") and "base = 7000" not in value:
        section, key = value.split("\n")[0].strip("[]"), value.split("\n")[1].split(" =")[0]
        assert f"{section}.{key}" in blob and "file:" in blob, show(res)
    assert after == before, f"tree changed: {tree_diff(before, after) or sorted(set(before) ^ set(after))}"


def _merge(original: str, override: str) -> str:
    """The sandbox config with OVERRIDE's keys replacing its own (TOML forbids a key twice)."""
    import tomllib
    doc = tomllib.loads(original)
    section, body = override.split("\n", 1)
    name = section.strip("[]")
    lines = original.splitlines()
    out, current = [], None
    for line in lines:
        if line.startswith("["):
            current = line.strip("[]")
        key = line.split("=", 1)[0].strip() if "=" in line else None
        if current == name and key and f"\n{key} =" in "\n" + body:
            continue
        out.append(line)
    if name not in doc:
        out.append(section)
        out.append(body)
        return "\n".join(out) + "\n"
    at = out.index(section) + 1
    out[at:at] = body.splitlines()
    return "\n".join(out) + "\n"


@pytest.mark.parametrize("how", ["section", "key", "env-key", "env-no-separator"])
def test_unknown_sections_and_keys_only_warn(shared: SharedRHost, how: str, monkeypatch: pytest.MonkeyPatch) -> None:
    h = shared.get()
    sb = h.sb
    original = sb.config.read_bytes()
    try:
        if how == "section":
            sb.config.write_bytes(original + b"\n[bogus]\nx = 1\n")
        elif how == "key":
            sb.config.write_text(_merge(original.decode(), "[ports]\nbogus_key = 3"))
        elif how == "env-key":
            monkeypatch.setenv("ABSSCTL_PORTS__BOGUS", "1")
        else:
            monkeypatch.setenv("ABSSCTL_NOSEPARATOR", "1")
        before = sb.tree()
        res = sb.run("--json", "instance", "list")
        shared.dirty = sb.tree() != before
    finally:
        sb.config.write_bytes(original)
    assert res.rc == 0, show(res)
    token = {"section": "bogus", "key": "ports.bogus_key", "env-key": "ABSSCTL_PORTS__BOGUS",
             "env-no-separator": "ABSSCTL_NOSEPARATOR"}[how]
    assert "unknown configuration key" in res.err and token in res.err, show(res)
