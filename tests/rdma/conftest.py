"""Fixtures for tests that move bytes through real rxe (SoftRoCE) devices.

Without devices these tests skip, saying how to get devices; with RDMAPROXY_REQUIRE_RDMA=1 (as
in CI and scripts/test.sh) tests/conftest.py turns that skip into a failure.
"""

from __future__ import annotations

import random

import pytest
from rxe_topology import NODE_A_IP, NODE_B_IP, Node, RxePair

from rdmaproxy.verbs.device import DeviceNotFound, device_for_ip

HOW_TO_GET_DEVICES = (
    "no RDMA devices for the test topology ({a} and {b}). As root on a host whose kernel has "
    "rdma_rxe run `scripts/setup_rxe.sh`; elsewhere run the suite in the VM with "
    "`scripts/test.sh` (it boots Debian's kernel under QEMU via ci/vm.sh). Detail: {detail}"
)


@pytest.fixture(scope="session")
def rxe_pair() -> RxePair:
    try:
        a = device_for_ip(NODE_A_IP)
        b = device_for_ip(NODE_B_IP)
    except (DeviceNotFound, OSError) as exc:
        pytest.skip(HOW_TO_GET_DEVICES.format(a=NODE_A_IP, b=NODE_B_IP, detail=exc))
    return RxePair(Node(NODE_A_IP, a.device), Node(NODE_B_IP, b.device))


@pytest.fixture
def rdma_port() -> int:
    """A fresh rdma_cm port per test (avoids colliding with ids still in TIME_WAIT)."""
    return random.randint(20000, 40000)
