"""§4.4 versions against the fakes: input validation, npm argv, offline behaviour, empty hosts."""
from __future__ import annotations

import json

import pytest

from rig.fakes import DEFAULT_REGISTRY, FAKE_NODE, Sandbox

PACKAGE = "@actual-app/sync-server"
BAD_VERSIONS = ["1.2", "../x", "v1.0.0", "1.0.0+build", ">=1.0.0", "", "1.0", "01.0.0",
                "1.0.0-", "^1.0.0", "~1.0.0", "1.x", "nightly", "1.0.0 ", "1.0.0/..",
                "1.0.0-" + "a" * 64]      # valid SemVer, but longer than 64 characters


def show(res) -> str:
    return f"argv={res.argv}\nrc={res.rc}\nstdout={res.out}\nstderr={res.err}"


def host(sandbox: Sandbox) -> Sandbox:
    """An initialised sandbox whose smoke start can run (root: tmp_path is 0700)."""
    sandbox.configure("service", user="root", group="root")
    # the fake node answers `-e` with nothing unless told; the native check wants its JSON line
    sandbox.knob("node", eval_stdout=json.dumps({"better-sqlite3": "ok"}) + "\n")
    res = sandbox.run("--json", "init")
    assert res.rc == 0, show(res)
    sandbox.clear_calls()
    return sandbox


def npm_subcalls(sandbox: Sandbox, sub: str) -> list[list[str]]:
    return [c for c in sandbox.calls("npm") if c[1:2] == [sub]]


@pytest.mark.parametrize("bad", BAD_VERSIONS)
def test_install_refuses_bad_version_strings_before_touching_anything(sandbox: Sandbox, bad: str) -> None:
    host(sandbox)
    before = sandbox.tree()
    res = sandbox.run("--json", "version", "install", bad)
    assert res.rc == 2, show(res)
    assert res.doc["ok"] is False and res.doc["error"]["kind"] != "InternalError", show(res)
    assert "Traceback" not in res.err
    assert sandbox.tree() == before
    assert sandbox.calls() == []             # not even npm view: validation comes first


@pytest.mark.parametrize("bad", ["1.2", "../x", "v1.0.0", "1.0.0+build", ">=1.0.0"])
@pytest.mark.parametrize("verb", ["uninstall", "export"])
def test_other_verbs_refuse_bad_version_strings(sandbox: Sandbox, bad: str, verb: str) -> None:
    host(sandbox)
    before = sandbox.tree()
    argv = ["--json", "--yes", "version", verb, bad]
    if verb == "export":
        argv += ["-o", str(sandbox.root / "b.tar.zst")]
    res = sandbox.run(*argv)
    assert res.rc == 2, show(res)
    assert sandbox.tree() == before


def test_dry_run_of_a_bad_version_still_exits_2(sandbox: Sandbox) -> None:
    host(sandbox)
    before = sandbox.tree()
    res = sandbox.run("--json", "--dry-run", "version", "install", "v1.0.0")
    assert res.rc == 2, show(res)
    assert sandbox.tree() == before


def test_install_asks_npm_view_for_the_exact_version(sandbox: Sandbox) -> None:
    host(sandbox)
    res = sandbox.run("--json", "version", "install", "25.6.0")
    views = npm_subcalls(sandbox, "view")
    assert views, sandbox.calls()
    assert views[0] == ["npm", "view", f"{PACKAGE}@25.6.0", "version", "engines", "--json"], views
    assert res.rc == 0, show(res)
    assert res.doc["changed"] is True and res.doc["version"]["version"] == "25.6.0"


def test_install_runs_npm_install_into_staging_with_the_design_flags(sandbox: Sandbox) -> None:
    host(sandbox)
    res = sandbox.run("--json", "version", "install", "25.6.0")
    assert res.rc == 0, show(res)
    installs = npm_subcalls(sandbox, "install")
    assert len(installs) == 1, sandbox.calls("npm")
    argv = installs[0]
    prefix = argv[argv.index("--prefix") + 1]
    assert prefix.startswith(str(sandbox.paths["install_root"] / ".staging-25.6.0-")), argv
    assert argv == ["npm", "install", "--prefix", prefix, "--omit=dev", "--no-audit", "--no-fund",
                    "--loglevel=warn"], argv                 # no [npm] registry: no --registry
    installed = sandbox.paths["install_root"] / "25.6.0"
    assert (installed / "node_modules" / PACKAGE / "package.json").is_file()
    assert not [p for p in sandbox.paths["install_root"].iterdir() if p.name.startswith(".staging-")]


def test_registry_flag_is_passed_when_configured(sandbox: Sandbox) -> None:
    host(sandbox)
    sandbox.configure("npm", registry="http://127.0.0.1:9/")
    res = sandbox.run("--json", "version", "install", "25.6.0")
    assert res.rc == 0, show(res)
    for call in npm_subcalls(sandbox, "view") + npm_subcalls(sandbox, "install"):
        assert call[call.index("--registry") + 1] == "http://127.0.0.1:9/", call


def test_latest_resolves_through_dist_tags(sandbox: Sandbox) -> None:
    host(sandbox)
    res = sandbox.run("--json", "version", "install", "latest")
    assert res.rc == 0, show(res)
    assert res.doc["version"]["version"] == DEFAULT_REGISTRY[PACKAGE]["dist-tags"]["latest"]
    assert ["npm", "view", PACKAGE, "dist-tags.latest"] in [c[:4] for c in sandbox.calls("npm")]


def test_unknown_version_is_not_found(sandbox: Sandbox) -> None:
    host(sandbox)
    before = sandbox.tree()
    res = sandbox.run("--json", "version", "install", "99.0.0")
    assert res.rc == 2, show(res)
    assert res.doc["error"]["kind"] == "NotFound", show(res)
    assert npm_subcalls(sandbox, "install") == []
    after = sandbox.tree()
    assert not [k for k in set(before) | set(after) if before.get(k) != after.get(k)
                and (k.startswith("srv/") or "/registry/" in k)]


def test_offline_install_exits_4_and_points_at_import(sandbox: Sandbox) -> None:
    host(sandbox)
    sandbox.npm_offline()
    res = sandbox.run("--json", "version", "install", "25.6.0")
    assert res.rc == 4, show(res)
    assert "version import" in (res.doc["error"]["hint"] or ""), show(res)
    assert list(sandbox.paths["install_root"].iterdir()) == []


def test_failed_npm_install_leaves_no_staging_and_no_entry(sandbox: Sandbox) -> None:
    host(sandbox)
    sandbox.npm_fail_install("fail")
    res = sandbox.run("--json", "version", "install", "25.6.0")
    assert res.rc == 4, show(res)
    assert list(sandbox.paths["install_root"].iterdir()) == []
    reg = json.loads((sandbox.paths["state_dir"] / "registry" / "versions.json").read_text())
    assert reg["versions"] == {}
    assert list((sandbox.paths["state_dir"] / "journal").iterdir()) == []


def test_check_updates_is_unknown_when_npm_is_offline(sandbox: Sandbox) -> None:
    host(sandbox)
    sandbox.npm_offline()
    res = sandbox.run("--json", "version", "check-updates")
    assert res.rc == 0, show(res)
    doc = res.doc
    assert doc["ok"] is True and doc["status"] == "unknown", show(res)
    assert doc["package"] == PACKAGE and doc["latest_stable"] is None
    assert doc["current"] is None and doc["newest_installed"] is None
    assert doc["update_available"] in (False, None)


def test_check_updates_reports_an_update_for_an_empty_host(sandbox: Sandbox) -> None:
    host(sandbox)
    res = sandbox.run("--json", "version", "check-updates")
    assert res.rc == 0, show(res)
    assert res.doc["latest_stable"] == DEFAULT_REGISTRY[PACKAGE]["dist-tags"]["latest"], show(res)
    assert res.doc["current"] is None


def test_list_on_an_empty_host(sandbox: Sandbox) -> None:
    before = sandbox.tree()                       # not even init: nothing exists yet
    res = sandbox.run("--json", "version", "list")
    assert res.rc == 0, show(res)
    assert res.doc["ok"] is True and res.doc["versions"] == [], show(res)
    assert sandbox.tree() == before
    text = sandbox.run("version", "list")
    assert text.rc == 0 and "Traceback" not in text.err


def test_list_remote_sorts_numerically_and_hides_prereleases(sandbox: Sandbox) -> None:
    host(sandbox)
    sandbox.npm_add_version("26.10.0")
    sandbox.npm_add_version("26.11.0-nightly.20261120")
    res = sandbox.run("--json", "version", "list", "--remote")
    assert res.rc == 0, show(res)
    assert [e["version"] for e in res.doc["versions"]] == ["25.6.0", "26.8.1", "26.9.0", "26.10.0"]
    assert all(e["installed"] is False for e in res.doc["versions"])
    res = sandbox.run("--json", "version", "list", "--remote", "--include-prerelease")
    assert [e["version"] for e in res.doc["versions"]] == [
        "25.6.0", "26.8.1", "26.9.0", "26.10.0", "26.11.0-nightly.20261120"], show(res)
    assert ["npm", "view", PACKAGE, "versions", "--json"] in [c[:5] for c in sandbox.calls("npm")]


def test_list_remote_offline_warns_and_shows_local(sandbox: Sandbox) -> None:
    host(sandbox)
    assert sandbox.run("--json", "version", "install", "25.6.0").rc == 0
    sandbox.npm_offline()
    res = sandbox.run("--json", "version", "list", "--remote")
    assert res.rc == 0, show(res)
    assert [(e["version"], e["installed"]) for e in res.doc["versions"]] == [("25.6.0", True)]
    assert res.doc.get("warnings") or "warning" in res.err, show(res)


def test_install_records_node_facts_from_node(sandbox: Sandbox) -> None:
    host(sandbox)
    res = sandbox.run("--json", "version", "install", "25.6.0")
    assert res.rc == 0, show(res)
    assert res.doc["version"]["node"] == {"version": FAKE_NODE["version"], "abi": FAKE_NODE["modules"],
                                          "arch": FAKE_NODE["arch"],
                                          "libc": f"glibc {FAKE_NODE['glibc']}"}


def test_uninstall_needs_yes_without_a_terminal(sandbox: Sandbox) -> None:
    host(sandbox)
    assert sandbox.run("--json", "version", "install", "25.6.0").rc == 0
    before = sandbox.tree()
    res = sandbox.run("--json", "version", "uninstall", "25.6.0")
    assert res.rc == 2 and res.doc["error"]["kind"] == "NeedsConfirmation", show(res)
    assert sandbox.tree() == before


def test_uninstall_of_an_absent_version_is_not_found(sandbox: Sandbox) -> None:
    host(sandbox)
    res = sandbox.run("--json", "--yes", "version", "uninstall", "25.6.0")
    assert res.rc == 2 and res.doc["error"]["kind"] == "NotFound", show(res)
