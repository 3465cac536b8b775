"""The test topology: two rxe devices on a veth pair (see scripts/setup_rxe.sh)."""

from __future__ import annotations

import os

import attrs

NODE_A_IP = os.environ.get("RDMAPROXY_IP_A", "10.99.0.1")
NODE_B_IP = os.environ.get("RDMAPROXY_IP_B", "10.99.0.2")


@attrs.frozen
class Node:
    ip: str
    device: str


@attrs.frozen
class RxePair:
    a: Node  # the "listening" node, rxe0 on 10.99.0.1
    b: Node  # the other node, rxe1 on 10.99.0.2
