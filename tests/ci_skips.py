"""In CI (CI=true), a skipped test fails the run.

Locally a test may skip when an optional part is missing (PyTorch for the converter's
reference, the demo checkpoint, pexpect). CI installs everything, so a skip there means
something that should run did not: the run fails and lists what skipped and why.
"""

import os

import pytest

_skips: list[str] = []


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _record(report) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _skips.append(f"{report.nodeid}: {reason}")


def pytest_collectreport(report):
    _record(report)


def pytest_runtest_logreport(report):
    _record(report)


def pytest_terminal_summary(terminalreporter):
    if _in_ci() and _skips:
        terminalreporter.section("skipped in CI (a failure: CI must run every test)", red=True)
        for line in _skips:
            terminalreporter.line(line)


def pytest_sessionfinish(session, exitstatus):
    if _in_ci() and _skips and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
