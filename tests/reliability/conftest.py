"""Reliability tier wiring: the kill -9 / Ctrl-C matrices the tests collect are printed at the end
of the run (each module marks its tests `reliability` itself)."""
from __future__ import annotations

import pytest

from reliability.rigs import MATRIX


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if not MATRIX.rows:
        return
    tr = terminalreporter
    for kind in sorted({r[0] for r in MATRIX.rows}):
        rows = [r for r in MATRIX.rows if r[0] == kind]
        tr.section(f"{kind} matrix (command x step boundary -> outcome)")
        width = max(len(r[1]) for r in rows)
        swidth = max(len(r[2]) for r in rows)
        for _kind, command, point, outcome in rows:
            tr.write_line(f"{command:<{width}}  {point:<{swidth}}  {outcome}")
        bad = [r for r in rows if not r[3].startswith("ok")]
        tr.write_line(f"{kind}: {len(rows)} points, {len(rows) - len(bad)} ok, {len(bad)} not ok")


# Known abssctl bugs this tier found and that are not fixed yet. Each case still runs and must fail
# (strict): when the bug is fixed, the xfail turns red and its entry here is removed.
KNOWN_BUGS: dict[str, str] = {}


def pytest_collection_modifyitems(config, items):
    import pytest
    for item in items:
        reason = KNOWN_BUGS.get(item.name)
        if reason:
            item.add_marker(pytest.mark.xfail(strict=True, reason="abssctl bug: " + reason))
