"""Under ``CI=true`` a skipped test is a failed test.

Tests skip when something they need is missing (redis-server, docker-compose, a browser,
Label Studio, a test oracle such as label-studio-sdk). On a developer's machine that is a
skip with its reason; in CI it would let the suite go green with whole groups unrun, so
there it fails, naming what is missing. The one way out is a test marked
``@pytest.mark.ci_may_skip("why")`` for a skip that no installer can fix (hardware such as
a GPU the CI machine does not have). ``.ci/run`` sets ``CI=true``.

Imported by ``tests/conftest.py``; a plugin module so it can be tested with ``pytester``.
"""

from __future__ import annotations

import os

import pytest

CI_VALUES = {"1", "true", "yes", "on"}
HINT = "install what is missing (scripts/install.sh --test) or mark the test ci_may_skip with the reason"


def strict() -> bool:
    return os.environ.get("CI", "").strip().lower() in CI_VALUES


def _reason(report: pytest.BaseReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def _fail(report: pytest.BaseReport) -> None:
    report.outcome = "failed"
    report.longrepr = f"skipped under CI=true, which counts as a failure: {_reason(report)}\n({HINT})"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "ci_may_skip(reason): this test may skip under CI=true (no installer can "
                                       "provide what it needs, e.g. a GPU)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and strict() and not hasattr(report, "wasxfail") and not item.get_closest_marker("ci_may_skip"):
        _fail(report)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    """A module that skips as a whole (``importorskip`` at import) skips at collection."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and strict():
        _fail(report)
