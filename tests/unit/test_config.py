"""§3: defaults, file, env and flags; typing by the schema; every bad value names its key and source."""
from __future__ import annotations

import pytest

import abssctl


def test_defaults_without_a_file() -> None:
    cfg, problems = abssctl.load_config(None, {}, {})
    assert problems == [] and cfg.path == "/etc/abssctl/config.toml"
    assert cfg.get("ports", "base") == 5006 and cfg.get("paths", "state_dir") == "/var/lib/abssctl"
    assert set(cfg.sources.values()) == {"default"}


def test_precedence_flag_over_env_over_file_over_default(tmp_path) -> None:
    f = tmp_path / "c.toml"
    f.write_text("[locks]\ntimeout = 5\n[ports]\nbase = 6000\nmax = 6100\n")
    env = {"ABSSCTL_LOCKS__TIMEOUT": "9", "ABSSCTL_PORTS__MAX": "6200"}
    cfg, problems = abssctl.load_config(str(f), env, {"locks.timeout": 11.0})
    assert problems == []
    assert cfg.get("locks", "timeout") == 11.0 and cfg.sources["locks.timeout"] == "flag:--lock-timeout"
    assert cfg.get("ports", "max") == 6200 and cfg.sources["ports.max"] == "env:ABSSCTL_PORTS__MAX"
    assert cfg.get("ports", "base") == 6000 and cfg.sources["ports.base"] == f"file:{f}"
    assert cfg.sources["ports.bind"] == "default"


def test_env_lists_accept_json_or_words(tmp_path) -> None:
    cfg, _ = abssctl.load_config(None, {"ABSSCTL_COMMANDS__SYSTEMCTL": '["python3","/c/systemctl","--root=/sb"]',
                                        "ABSSCTL_NPM__ALLOW_SCRIPTS": "a, b c"}, {})
    assert cfg.command("systemctl") == ["python3", "/c/systemctl", "--root=/sb"]
    assert cfg.get("npm", "allow_scripts") == ["a", "b", "c"]


def test_abssctl_config_env_names_the_file(tmp_path) -> None:
    f = tmp_path / "x.toml"
    f.write_text("[service]\nuser = \"someone\"\n")
    cfg, _ = abssctl.load_config(None, {"ABSSCTL_CONFIG": str(f)}, {})
    assert cfg.path == str(f) and cfg.get("service", "user") == "someone"


@pytest.mark.parametrize("toml, key", [
    ('[ports]\nbase = "6000"\n', "ports.base"),
    ("[ports]\nbase = 6000.5\n", "ports.base"),
    ("[ports]\nbase = 70000\n", "ports.base"),
    ("[ports]\nbase = 6000\nmax = 5000\n", "ports.base"),
    ('[paths]\nstate_dir = "relative/dir"\n', "paths.state_dir"),
    ('[paths]\nstate_dir = "/var/lib/a b"\n', "paths.state_dir"),
    ('[paths]\nstate_dir = "/var/../etc"\n', "paths.state_dir"),
    ("[paths]\nstate_dir = 5\n", "paths.state_dir"),
    ('[nginx]\nblock_internal = "yes"\n', "nginx.block_internal"),
    ('[nginx]\nclient_max_body_size = "lots"\n', "nginx.client_max_body_size"),
    ('[commands]\nsystemctl = []\n', "commands.systemctl"),
    ('[commands]\nsystemctl = "systemctl"\n', "commands.systemctl"),
    ('[service]\nuser = "Root User"\n', "service.user"),
    ('[backups]\ncompression = "xz"\n', "backups.compression"),
    ("[health]\ntimeout = 0\n", "health.timeout"),
])
def test_wrong_values_in_the_file_exit_2_naming_key_and_file(sandbox, toml: str, key: str) -> None:
    sandbox.config.write_text(toml)
    got = sandbox.run("--json", "config", "show")
    assert got.rc == 2
    problem = got.doc["error"]["details"]["problems"][0]
    assert problem["key"] == key and problem["source"] == f"file:{sandbox.config}"
    assert key in got.err and str(sandbox.config) in got.err


@pytest.mark.parametrize("name, value", [("ABSSCTL_PORTS__BASE", "six"), ("ABSSCTL_HEALTH__TIMEOUT", "nan"),
                                         ("ABSSCTL_NGINX__BLOCK_INTERNAL", "maybe"),
                                         ("ABSSCTL_PATHS__LOG_DIR", "tmp/x"),
                                         ("ABSSCTL_COMMANDS__NPM", "[broken"),
                                         ("ABSSCTL_LOCKS__TIMEOUT", "-3")])
def test_bad_env_values_exit_2_naming_the_variable(sandbox, monkeypatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    got = sandbox.run("--json", "ports", "list")
    assert got.rc == 2
    assert got.doc["error"]["details"]["problems"][0]["source"] == f"env:{name}"


def test_bad_toml_exits_2_naming_the_file(sandbox) -> None:
    sandbox.config.write_text("[ports\nbase = 1\n")
    got = sandbox.run("--json", "config", "show")
    assert got.rc == 2 and str(sandbox.config) in got.doc["error"]["message"]


def test_unknown_keys_warn_once_and_do_not_fail(sandbox, monkeypatch) -> None:
    with open(sandbox.config, "a") as f:
        f.write("\n[nosuch]\nx = 1\n[ports]\nbsae = 6000\n")
    monkeypatch.setenv("ABSSCTL_PORTS__NOPE", "1")
    got = sandbox.run("--json", "ports", "list")
    assert got.rc == 0
    warnings = [line for line in got.err.splitlines() if "unknown configuration key" in line]
    assert len(warnings) == 3
    assert any("ports.bsae" in w for w in warnings) and any("ABSSCTL_PORTS__NOPE" in w for w in warnings)


def test_missing_explicit_config_exits_2(sandbox) -> None:
    got = sandbox.run("--json", "--config", str(sandbox.root / "nope.toml"), "config", "show")
    assert got.rc == 2 and "does not exist" in got.doc["error"]["message"]


def test_config_show_reports_every_source(sandbox, monkeypatch) -> None:
    monkeypatch.setenv("ABSSCTL_PORTS__BASE", "5100")
    got = sandbox.run("--json", "config", "show")
    assert got.rc == 0, got.err
    sources = got.doc["sources"]
    assert set(sources) == {f"{s}.{k}" for s, keys in abssctl.CONFIG_SCHEMA.items() for k in keys}
    assert sources["ports.base"] == "env:ABSSCTL_PORTS__BASE"
    assert sources["paths.state_dir"] == f"file:{sandbox.config}"
    assert got.doc["config"]["ports"]["base"] == 5100


def test_config_path(sandbox) -> None:
    got = sandbox.run("--json", "config", "path")
    assert got.doc == {"ok": True, "path": str(sandbox.config), "exists": True}


def test_config_check_passes_then_reports_every_problem(sandbox, monkeypatch) -> None:
    assert sandbox.run("config", "check").rc == 0
    with open(sandbox.config, "a") as f:
        f.write('\n[ports]\nbase = "x"\n')
    monkeypatch.setenv("ABSSCTL_HEALTH__TIMEOUT", "slow")
    got = sandbox.run("--json", "config", "check")
    assert got.rc == 2
    keys = {p["key"] for p in got.doc["error"]["details"]["problems"]}
    assert keys == {"ports.base", "health.timeout"}


def test_config_check_renders_template_overrides(sandbox) -> None:
    tdir = sandbox.paths["templates_dir"]
    tdir.mkdir(parents=True)
    (tdir / "systemd-unit.service").write_text("[Service]\nExecStart=${NODE} ${NOPE}\n")
    got = sandbox.run("--json", "config", "check")
    assert got.rc == 2
    assert "NOPE" in got.doc["error"]["message"] or any(
        "NOPE" in p["message"] for p in got.doc["error"]["details"]["problems"])
    (tdir / "systemd-unit.service").write_text("[Service]\nExecStart=${NODE} ${BIN} $MAINPID\n")
    got = sandbox.run("--json", "config", "check")
    assert got.rc == 0 and got.doc["templates"]["systemd-unit.service"] == str(tdir / "systemd-unit.service")


def test_default_config_template_parses_to_the_defaults(tmp_path) -> None:
    cfg, _ = abssctl.load_config(None, {}, {})
    f = tmp_path / "config.toml"
    text = abssctl.config_template(cfg)
    f.write_text(text)
    parsed, problems = abssctl.load_config(str(f), {}, {})
    assert problems == [] and parsed.values == cfg.values
    uncommented = "\n".join(line[2:] if line.startswith("# ") and " = " in line else line
                            for line in text.splitlines())
    f.write_text(uncommented)
    parsed, problems = abssctl.load_config(str(f), {}, {})
    assert problems == [] and parsed.values == cfg.values and parsed.unknown == []


@pytest.mark.parametrize("text", [
    '[ports]\nbase = 6000\nmax = 6100\n[commands]\nsystemctl = ["python3", "/c/s", "--root=/sb"]\n',
    '# c\n[nginx]\nblock_internal = false\nclient_max_body_size = "50M"\n[health]\ntimeout = 1.5\n',
    '[npm]\nallow_scripts = []\n', '[paths]\nstate_dir = "/x"\n\n\n',
])
def test_the_fast_toml_subset_reads_exactly_what_tomllib_reads(text: str) -> None:
    import tomllib
    assert abssctl._simple_toml(text) == tomllib.loads(text)


@pytest.mark.parametrize("text", ['[ports]\nbase = 06000\n', '[a]\nx = "a\\\\b"\n', '[a]\nx = 1 # c\n',
                                  '[a]\n[a]\n', "[a]\nx = 'lit'\n", '[a.b]\nx = 1\n', '[a]\nx = 1\nx = 2\n',
                                  '[a]\nx = 1e3\n', '[a]\nx = [1, 2]\n', '[a]\nx = "tab\there"\n'])
def test_anything_outside_the_subset_is_left_to_tomllib(text: str) -> None:
    assert abssctl._simple_toml(text) is None
