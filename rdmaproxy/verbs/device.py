"""Finding and opening RDMA devices: by name, or by an IP address bound to them (RoCE GID)."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import attrs

from rdmaproxy.verbs._pyverbs import pv

SYSFS_IB = Path("/sys/class/infiniband")


class DeviceNotFound(LookupError):
    pass


@attrs.frozen
class GidEntry:
    device: str
    port: int
    index: int
    address: ipaddress.IPv4Address | ipaddress.IPv6Address
    gid_type: str
    netdev: str


def _gid_to_ip(gid: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.IPv6Address(gid)
    except ValueError:
        return None
    if address.is_unspecified:
        return None
    return address.ipv4_mapped or address


def list_gids(root: Path = SYSFS_IB) -> list[GidEntry]:
    """Every non-empty GID of every port, with the IP address it stands for."""
    entries: list[GidEntry] = []
    if not root.is_dir():
        return entries
    for dev_dir in sorted(root.iterdir()):
        ports = dev_dir / "ports"
        if not ports.is_dir():
            continue
        for port_dir in sorted(ports.iterdir()):
            gids = port_dir / "gids"
            if not gids.is_dir():
                continue
            for gid_file in sorted(gids.iterdir(), key=lambda p: int(p.name)):
                try:
                    address = _gid_to_ip(gid_file.read_text().strip())
                except OSError:  # unpopulated GID entries fail with EINVAL
                    continue
                if address is None:
                    continue
                attrs_dir = port_dir / "gid_attrs"
                try:
                    gid_type = (attrs_dir / "types" / gid_file.name).read_text().strip()
                except OSError:
                    gid_type = ""
                try:
                    netdev = (attrs_dir / "ndevs" / gid_file.name).read_text().strip()
                except OSError:
                    netdev = ""
                entries.append(
                    GidEntry(
                        dev_dir.name, int(port_dir.name), int(gid_file.name), address, gid_type,
                        netdev,
                    )
                )
    return entries


def device_for_ip(ip: str, root: Path = SYSFS_IB) -> GidEntry:
    """The RDMA device/port/GID that carries ``ip`` (RoCE v2 preferred over v1)."""
    wanted = ipaddress.ip_address(ip)
    matches = [e for e in list_gids(root) if e.address == wanted]
    if not matches:
        known = ", ".join(sorted({f"{e.address}@{e.device}" for e in list_gids(root)})) or "none"
        raise DeviceNotFound(
            f"no RDMA device has the address {ip} (addresses on RDMA devices: {known}); "
            "create SoftRoCE devices with scripts/setup_rxe.sh"
        )
    matches.sort(key=lambda e: (e.gid_type != "RoCE v2", e.index))
    return matches[0]


def device_names() -> list[str]:
    try:
        return [d.name.decode() if isinstance(d.name, bytes) else d.name
                for d in pv().device.get_device_list()]
    except pv().PyverbsError:
        return []


#: vendor_id of the software providers, which copy a WRITE's payload inside ``post_send``:
#: rxe (Soft-RoCE, RXE_VENDOR_ID) and siw (soft iWARP, SIW_VENDOR_ID, "bmt").
SOFTWARE_VENDOR_IDS = frozenset({0xFFFFFF, 0x626D74})


class VerbsDevice:
    """An opened device: its verbs context and one protection domain for all our objects."""

    def __init__(self, name: str) -> None:
        if name not in device_names():
            raise DeviceNotFound(
                f"RDMA device {name!r} not found (devices: {', '.join(device_names()) or 'none'}); "
                "create SoftRoCE devices with scripts/setup_rxe.sh"
            )
        self.name = name
        self.context: Any = pv().device.Context(name=name)
        self.pd: Any = pv().pd.PD(self.context)
        attr = self.context.query_device()
        self.max_qp_wr: int = attr.max_qp_wr
        self.max_cqe: int = attr.max_cqe
        self.max_mr_size: int = attr.max_mr_size
        #: The provider does a WRITE's work (copies, checksums) inside ``post_send``, as rxe
        #: and siw do; a hardware RNIC's post only rings a doorbell.
        self.copies_in_post: bool = attr.vendor_id in SOFTWARE_VENDOR_IDS

    @classmethod
    def for_ip(cls, ip: str) -> VerbsDevice:
        return cls(device_for_ip(ip).device)

    def close(self) -> None:
        self.pd.close()
        self.context.close()

    def __enter__(self) -> VerbsDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
