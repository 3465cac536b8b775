"""Shared pytest configuration.

Everything under tests/rdma needs real RDMA devices. With RDMAPROXY_REQUIRE_RDMA=1 (as in CI
and scripts/test.sh, which install everything the suite needs) no test may skip: a skip is
reported as a failure with its reason, so a test that did not run can never pass CI.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

RDMA_DIR = Path(__file__).parent / "rdma"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if RDMA_DIR in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.rdma)


def _fail_skip(report: pytest.TestReport | pytest.CollectReport) -> None:
    if report.skipped and os.environ.get("RDMAPROXY_REQUIRE_RDMA") == "1":
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped, which RDMAPROXY_REQUIRE_RDMA=1 does not allow: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Skips while setting up or running a test (marks, skipif, pytest.skip in fixtures)."""
    outcome = yield
    _fail_skip(outcome.get_result())  # type: ignore[attr-defined]


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Iterator[None]:
    """Skips while collecting a module (importorskip, module-level pytest.skip)."""
    outcome = yield
    _fail_skip(outcome.get_result())  # type: ignore[attr-defined]
