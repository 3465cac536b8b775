"""Shared pytest configuration: everything under tests/rdma needs real RDMA devices."""

from __future__ import annotations

from pathlib import Path

import pytest

RDMA_DIR = Path(__file__).parent / "rdma"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if RDMA_DIR in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.rdma)
