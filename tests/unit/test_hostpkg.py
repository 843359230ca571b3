"""Host packages (DESIGN §11.3), TLS auto (§11.2) and the outcome text of mutating commands.

The fake apt-get (tests/rig/fakes.py) logs each call with its DEBIAN_FRONTEND and "installs" a
package by copying the tools waiting in fake-state/apt-pool/<package>/ into the sandbox's bin/.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import abssctl
from rig.fakes import HOST_TOOL_PACKAGES, Sandbox

from .test_instances import VERSION, backends, pick_port_range, prepare, show  # noqa: F401 (fixture)

DOMAIN = "alice.example.org"


@pytest.fixture
def fresh(sandbox: Sandbox, backends, monkeypatch: pytest.MonkeyPatch) -> Sandbox:  # noqa: F811
    """A host before quickstart: nothing initialised, the unit and sites dirs there (systemd and
    nginx's own), the service running as root so the fake server can read tmp_path."""
    sandbox.configure("service", user="root", group="root")
    base = pick_port_range()
    sandbox.configure("ports", base=base, max=base + 99)
    sandbox.make_host_dirs()
    bundle = sandbox.root / "ca-certificates.crt"
    bundle.write_text("# a CA bundle\n")
    monkeypatch.setattr(abssctl, "CA_BUNDLE", str(bundle))
    return sandbox


def install_argv(*tools: str) -> list[str]:
    return ["install", "-y", "--no-install-recommends", *sorted(HOST_TOOL_PACKAGES[t] for t in tools)]


def instances(sb: Sandbox) -> dict[str, Any]:
    path = sb.paths["state_dir"] / "registry" / "instances.json"
    return json.loads(path.read_text())["instances"] if path.exists() else {}


# -- host packages ------------------------------------------------------------------------------

def test_quickstart_installs_what_is_missing_then_carries_on(fresh: Sandbox) -> None:
    fresh.hide_host_tools("nginx", "make", "zstd")
    res = fresh.run("--json", "--yes", "quickstart", "alice", "--domain", DOMAIN, "--version", VERSION)
    assert res.rc == 0, show(res)
    calls = fresh.apt_calls()
    assert [c["argv"] for c in calls] == [["update"], install_argv("make", "nginx", "zstd")], calls
    assert all(c["DEBIAN_FRONTEND"] == "noninteractive" for c in calls), calls
    assert res.doc["packages"]["missing"] == ["make", "nginx-light", "zstd"]
    assert (fresh.bin / "nginx").exists() and (fresh.bin / "make").exists()
    assert instances(fresh)["alice"]["state"] == "ready" and res.doc["instance"]["health"] == "UP", show(res)
    # a re-run finds nothing missing: no prompt, no apt
    again = fresh.run("--json", "quickstart", "alice", "--domain", DOMAIN, "--version", VERSION)
    assert again.rc == 0 and again.doc["packages"]["missing"] == [], show(again)
    assert len(fresh.apt_calls()) == 2


def test_quickstart_without_a_terminal_or_yes_exits_2_and_changes_nothing(fresh: Sandbox) -> None:
    fresh.hide_host_tools("npm", "g++")
    before = fresh.tree()
    res = fresh.run("quickstart", "alice", "--domain", DOMAIN)
    assert res.rc == 2 and "Install these Debian packages: g++ npm?" in res.err, show(res)
    assert "--yes" in res.err
    assert fresh.apt_calls() == [] and fresh.tree() == before


def test_quickstart_dry_run_shows_the_package_step_and_changes_nothing(fresh: Sandbox) -> None:
    fresh.hide_host_tools("openssl", "python3")
    before = fresh.tree()
    res = fresh.run("--dry-run", "quickstart", "alice", "--domain", DOMAIN)
    assert res.rc == 0, show(res)
    assert "install Debian packages: openssl python3" in res.out
    assert "apt-get install -y --no-install-recommends openssl python3" in res.out
    assert f"abssctl instance create alice --domain {DOMAIN}" in res.out
    doc = fresh.run("--json", "--dry-run", "quickstart", "alice", "--domain", DOMAIN).doc
    assert [s["step"] for s in doc["plan"]] == ["apt.install"] and doc["changed"] is False
    assert fresh.apt_calls() == [] and fresh.tree() == before


def test_a_host_without_apt_exits_3_naming_the_packages(fresh: Sandbox) -> None:
    fresh.hide_host_tools("nginx", "npm")
    fresh.commands["apt_get"] = [str(fresh.root / "no-such-apt-get")]
    fresh.write_config()
    res = fresh.run("--json", "--yes", "quickstart", "alice", "--domain", DOMAIN)
    assert res.rc == 3 and res.doc["error"]["kind"] == "MissingTool", show(res)
    assert "nginx-light npm" in res.doc["error"]["hint"], show(res)
    assert res.doc["error"]["details"]["packages"] == ["nginx-light", "npm"]


@pytest.mark.parametrize("verb", ["update", "install"])
def test_apt_failing_exits_4_with_its_reason_and_nothing_else_runs(fresh: Sandbox, verb: str) -> None:
    fresh.hide_host_tools("nginx")
    fresh.knob("apt-get", fail=verb)
    res = fresh.run("--yes", "quickstart", "alice", "--domain", DOMAIN)
    assert res.rc == 4, show(res)
    assert f"apt-get {verb} failed" in res.err and "Temporary failure resolving" in res.err, show(res)
    assert "apt-get update" in res.err and "sources" in res.err        # the hint
    assert not (fresh.bin / "nginx").exists() and not fresh.paths["state_dir"].exists()


def test_a_package_that_does_not_bring_the_tool_exits_3(fresh: Sandbox) -> None:
    fresh.hide_host_tools("zstd")
    for tool in (fresh.state / "apt-pool" / "zstd").iterdir():
        tool.unlink()                                    # the package installs, the tool stays missing
    res = fresh.run("--json", "--yes", "quickstart", "alice", "--domain", DOMAIN)
    assert res.rc == 3 and "still missing: zstd" in res.doc["error"]["message"], show(res)


def test_nothing_missing_means_no_prompt_and_no_apt(fresh: Sandbox) -> None:
    fresh.hide_host_tools()
    res = fresh.run("--json", "quickstart", "alice", "--domain", DOMAIN, "--version", VERSION)
    assert res.rc == 0, show(res)
    assert fresh.apt_calls() == [] and res.doc["packages"]["missing"] == []


def test_node_is_needed_only_with_the_system_runtime(fresh: Sandbox) -> None:
    fresh.hide_host_tools("node")
    fresh.configure("node", runtime="managed")
    got = fresh.run("--json", "--dry-run", "init", "--install-packages")
    assert got.rc == 0 and got.doc["packages"]["missing"] == [], show(got)
    fresh.configure("node", runtime="system")
    got = fresh.run("--json", "--dry-run", "init", "--install-packages")
    assert got.rc == 0 and got.doc["packages"]["missing"] == ["nodejs"], show(got)


def test_ca_certificates_is_found_by_its_bundle(fresh: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    fresh.hide_host_tools()
    monkeypatch.setattr(abssctl, "CA_BUNDLE", str(fresh.root / "missing.crt"))
    got = fresh.run("--json", "--dry-run", "init", "--install-packages")
    assert got.rc == 0 and got.doc["packages"]["missing"] == ["ca-certificates"], show(got)


def test_init_install_packages(fresh: Sandbox) -> None:
    fresh.hide_host_tools("npm")
    res = fresh.run("--json", "--yes", "init", "--install-packages")
    assert res.rc == 0 and res.doc["changed"] is True, show(res)
    assert [c["argv"] for c in fresh.apt_calls()] == [["update"], install_argv("npm")]
    assert [s["step"] for s in res.doc["steps"]][0] == "apt.install"
    assert (fresh.paths["state_dir"] / "registry").is_dir()
    plain = fresh.run("init")                      # without the flag nothing is installed or checked
    assert plain.rc == 0 and len(fresh.apt_calls()) == 2, show(plain)


# -- TLS auto -------------------------------------------------------------------------------------

@pytest.fixture
def host(sandbox: Sandbox, backends) -> Sandbox:  # noqa: F811
    return prepare(sandbox)        # its system certificate covers example.org and *.example.org


def lineage(sb: Sandbox, domain: str) -> tuple[Path, Path]:
    live = sb.paths["letsencrypt_dir"] / "live" / domain
    return sb.make_system_cert(domain, days=90, cert=live / "fullchain.pem", key=live / "privkey.pem")


def create(sb: Sandbox, name: str, domain: str, *extra: str):
    return sb.run("--json", "instance", "create", name, "--domain", domain, "--no-start", *extra)


def vhost(sb: Sandbox, name: str) -> str:
    return (sb.paths["nginx_sites_available"] / f"abssctl-{name}.conf").read_text()


def test_auto_takes_a_covering_certbot_lineage_first(host: Sandbox) -> None:
    cert, key = lineage(host, DOMAIN)
    res = create(host, "alice", DOMAIN)
    assert res.rc == 0 and res.doc["instance"]["tls"]["source"] == "letsencrypt", show(res)
    assert instances(host)["alice"]["tls"] == {"source": "letsencrypt", "cert": str(cert), "key": str(key),
                                               "chain": None, "lineage": str(cert.parent)}
    assert f"ssl_certificate {cert};" in vhost(host, "alice") and f"ssl_certificate_key {key};" in vhost(host, "alice")
    assert not (host.paths["tls_dir"] / "alice").exists()


def test_auto_skips_a_lineage_for_another_domain(host: Sandbox) -> None:
    live = host.paths["letsencrypt_dir"] / "live" / DOMAIN
    host.make_system_cert("other.example.net", cert=live / "fullchain.pem", key=live / "privkey.pem")
    res = create(host, "alice", DOMAIN)
    assert res.rc == 0 and res.doc["instance"]["tls"]["source"] == "system", show(res)


def test_auto_takes_the_system_pair_when_it_covers_the_domain(host: Sandbox) -> None:
    res = create(host, "alice", DOMAIN, "--tls", "auto")
    assert res.rc == 0 and res.doc["instance"]["tls"]["source"] == "system", show(res)
    assert f"ssl_certificate {host.settings['tls']['system_cert']};" in vhost(host, "alice")
    assert not [w for w in res.doc["warnings"] if "self-signed" in w]


def test_auto_falls_back_to_self_signed_when_the_system_pair_does_not_cover(host: Sandbox) -> None:
    res = create(host, "alice", "alice.example.net")
    assert res.rc == 0 and res.doc["instance"]["tls"]["source"] == "self-signed", show(res)
    warning = next(w for w in res.doc["warnings"] if "self-signed" in w)
    assert "browsers will warn" in warning and "abssctl tls install" in warning and "abssctl tls acme" in warning
    assert (host.paths["tls_dir"] / "alice" / "fullchain.pem").is_file()


def test_auto_without_any_certificate_is_self_signed_with_a_warning(host: Sandbox) -> None:
    Path(host.settings["tls"]["system_cert"]).unlink()
    res = host.run("instance", "create", "two", "--domain", "two.example.org", "--no-start")
    assert res.rc == 0, show(res)
    assert "self-signed" in res.err and "browsers will warn" in res.err
    assert instances(host)["two"]["tls"]["source"] == "self-signed"


def test_explicit_system_stays_strict(host: Sandbox) -> None:
    before = host.tree()
    res = create(host, "alice", "alice.example.net", "--tls", "system")
    assert res.rc == 2 and "does not cover alice.example.net" in res.doc["error"]["message"], show(res)
    Path(host.settings["tls"]["system_cert"]).unlink()
    res = create(host, "alice", DOMAIN, "--tls", "system")
    assert res.rc == 2 and "does not exist" in res.doc["error"]["message"], show(res)
    assert "instances.json" not in str(sorted(set(host.tree()) - set(before)))


def test_quickstart_uses_auto_like_instance_create(fresh: Sandbox) -> None:
    fresh.hide_host_tools()
    cert, _key = lineage(fresh, DOMAIN)
    res = fresh.run("--json", "--yes", "quickstart", "alice", "--domain", DOMAIN, "--version", VERSION)
    assert res.rc == 0 and res.doc["instance"]["tls"]["source"] == "letsencrypt", show(res)
    res = fresh.run("--json", "--yes", "instance", "create", "bob", "--domain", "bob.example.net", "--no-start")
    assert res.rc == 0 and res.doc["instance"]["tls"]["source"] == "self-signed", show(res)


def test_quickstart_without_certificates_is_self_signed_with_a_warning(fresh: Sandbox) -> None:
    fresh.hide_host_tools()
    res = fresh.run("--yes", "quickstart", "alice", "--domain", DOMAIN, "--version", VERSION)
    assert res.rc == 0, show(res)
    assert "self-signed" in res.err and "browsers will warn" in res.err
    assert instances(fresh)["alice"]["tls"]["source"] == "self-signed"
    assert res.out.splitlines()[0].startswith(f"alice is up: https://{DOMAIN}/")


def test_tls_auto_is_a_valid_default_source(sandbox: Sandbox) -> None:
    assert abssctl.CONFIG_SCHEMA["tls"]["default_source"][1] == "auto"
    sandbox.configure("tls", default_source="letsencrypt")
    assert sandbox.run("--json", "config", "check").rc == 2
    sandbox.configure("tls", default_source="auto")
    assert sandbox.run("--json", "config", "check").rc == 0


# -- the outcome, not the plan again -----------------------------------------------------------

def test_a_mutating_command_ends_with_its_outcome_not_its_plan(host: Sandbox) -> None:
    dry = host.run("--dry-run", "instance", "create", "alice", "--domain", DOMAIN)
    assert dry.rc == 0 and "  1. " in dry.out and "(undo: " in dry.out, show(dry)
    res = host.run("instance", "create", "alice", "--domain", DOMAIN)
    assert res.rc == 0, show(res)
    assert "undo" not in res.out and "  1. " not in res.out, show(res)
    lines = res.out.splitlines()
    assert lines[0].startswith(f"created alice: https://{DOMAIN}/ (port ") and "running" in lines[0], show(res)
    assert lines[-1] == f"next: open https://{DOMAIN}/ and set the server password"
    assert "publish" in res.err                     # the progress lines showed the steps
    full = host.run("--json", "instance", "stop", "alice")
    assert full.rc == 0 and full.doc["steps"], show(full)
    res = host.run("instance", "start", "alice")
    assert res.rc == 0 and res.out.startswith("alice started; /health is UP"), show(res)
    res = host.run("tls", "self-signed", "alice")
    assert res.rc == 0 and "undo" not in res.out, show(res)
    assert res.out.startswith("alice is now served with the self-signed certificate ("), show(res)
