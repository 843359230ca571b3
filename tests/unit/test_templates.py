"""§6: strict templates, overrides, and the rendered files pinned by golden copies."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

import abssctl

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
ROOT = Path(__file__).resolve().parents[2]


def test_template_names_match_the_directory() -> None:
    assert sorted(os.listdir(ROOT / "templates")) == sorted(abssctl.TEMPLATE_NAMES)


@pytest.mark.parametrize("name", abssctl.TEMPLATE_NAMES)
def test_rendering_matches_golden(name: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    text = abssctl.render(str(tmp_path / "none"), name, abssctl.sample_values(name))
    golden = GOLDEN / f"{name}.golden"
    if request.config.getoption("--update-golden"):
        golden.write_text(text)
    assert text == golden.read_text()
    assert text.startswith(f"# Managed by abssctl {abssctl.__version__} (template: builtin); changes")
    assert "${" not in text


def test_vhost_keeps_nginx_variables_and_never_adds_coop() -> None:
    text = abssctl.render("/nonexistent", "nginx-vhost.conf", abssctl.sample_values("nginx-vhost.conf"))
    for var in ("$host", "$request_uri", "$remote_addr", "$proxy_add_x_forwarded_for", "$scheme"):
        assert var in text
    assert "add_header" not in text and "Cross-Origin" not in "\n".join(
        line for line in text.splitlines() if not line.lstrip().startswith("#"))


def test_substitution_is_strict_and_escapes_work(tmp_path: Path) -> None:
    (tmp_path / "systemd-unit.service").write_text("A=${NAME} B=$MAINPID C=$${LITERAL} D=${NOPE}\n")
    os.chmod(tmp_path / "systemd-unit.service", 0o644)
    with pytest.raises(abssctl.UsageError) as err:
        abssctl.render(str(tmp_path), "systemd-unit.service", {"NAME": "x"})
    assert "NOPE" in err.value.message and str(tmp_path) in err.value.message
    (tmp_path / "systemd-unit.service").write_text("A=${NAME} B=$MAINPID C=$${LITERAL} $$\n")
    text = abssctl.render(str(tmp_path), "systemd-unit.service", {"NAME": "x"})
    assert text.splitlines()[1] == "A=x B=$MAINPID C=${LITERAL} $$"
    assert f"(template: {tmp_path / 'systemd-unit.service'})" in text.splitlines()[0]


def test_writable_overrides_are_refused(tmp_path: Path) -> None:
    override = tmp_path / "nginx-vhost.conf"
    override.write_text("server {}\n")
    os.chmod(override, 0o666)
    with pytest.raises(abssctl.UsageError) as err:
        abssctl.render(str(tmp_path), "nginx-vhost.conf", {})
    assert "writable" in err.value.message
