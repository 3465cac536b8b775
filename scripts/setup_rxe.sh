#!/usr/bin/env bash
# Create (or remove) the rdmaproxy test topology on a Linux host whose kernel has rdma_rxe:
#
#   veth0 10.99.0.1/24  <-->  veth1 10.99.0.2/24
#   rxe0 on veth0             rxe1 on veth1        (SoftRoCE, RoCE v2)
#
# Both ends stay in the root network namespace (rxe inside network namespaces does not work on
# the 6.1 kernels we test with). Idempotent: running it twice changes nothing the second time.
#
# usage: scripts/setup_rxe.sh            # create, then print devices, port states and GIDs
#        scripts/setup_rxe.sh --teardown # remove exactly what this script creates
#        scripts/setup_rxe.sh --status   # print only
set -euo pipefail

VETH_A=${RDMAPROXY_VETH_A:-veth0}
VETH_B=${RDMAPROXY_VETH_B:-veth1}
IP_A=${RDMAPROXY_IP_A:-10.99.0.1}
IP_B=${RDMAPROXY_IP_B:-10.99.0.2}
RXE_A=${RDMAPROXY_RXE_A:-rxe0}
RXE_B=${RDMAPROXY_RXE_B:-rxe1}

die() { echo "setup_rxe: $*" >&2; exit 1; }

need_tools() {
    [ "$(id -u)" -eq 0 ] || die "must run as root (it loads a kernel module and creates links); try: sudo $0 $*"
    command -v ip >/dev/null || die "the 'ip' tool is missing: apt-get install iproute2"
    command -v rdma >/dev/null || die "the 'rdma' tool is missing: apt-get install iproute2 (rdma is part of it)"
    command -v modprobe >/dev/null || die "'modprobe' is missing: apt-get install kmod"
}

rxe_netdev() {  # prints the netdev an rxe device is bound to, or nothing
    rdma link show "$1/1" 2>/dev/null | sed -n 's/.* netdev \([^ ]*\).*/\1/p'
}

status() {
    echo "== RDMA links"
    rdma link show 2>/dev/null || echo "(none)"
    for dev in "$RXE_A" "$RXE_B"; do
        local base=/sys/class/infiniband/$dev/ports/1
        [ -d "$base" ] || { echo "$dev: absent"; continue; }
        echo "== $dev port 1: $(cat "$base/state") ($(cat "$base/phys_state"))"
        # One grep over the (1024-entry) GID table: a process per entry takes minutes under TCG.
        local line file idx gid type hex
        while IFS= read -r line; do
            file=${line%%:*}; gid=${line#*:}; idx=${file##*/}
            type=$(<"$base/gid_attrs/types/$idx") || type="?"
            hex=${gid:30:4}${gid:35:4}
            printf '   gid index %s: %s  IPv4 %d.%d.%d.%d  (%s)\n' "$idx" "$gid" \
                $((16#${hex:0:2})) $((16#${hex:2:2})) $((16#${hex:4:2})) $((16#${hex:6:2})) "$type"
        done < <(grep -s -H '^0000:0000:0000:0000:0000:ffff:' "$base"/gids/* || true)
    done
}

teardown() {
    need_tools
    for dev in "$RXE_A" "$RXE_B"; do
        if [ -d "/sys/class/infiniband/$dev" ]; then
            rdma link delete "$dev" && echo "removed $dev"
        fi
    done
    if ip link show "$VETH_A" >/dev/null 2>&1; then
        ip link delete "$VETH_A" && echo "removed $VETH_A/$VETH_B"
    fi
}

setup() {
    need_tools
    if [ ! -d /sys/module/rdma_rxe ]; then
        modprobe rdma_rxe 2>/dev/null || die "cannot load kernel module rdma_rxe (kernel $(uname -r)).
  Install a kernel with CONFIG_RDMA_RXE (Debian: linux-image-amd64), or run the tests in the VM:
  ci/vm.sh -- scripts/test.sh --inside"
    fi
    if ! ip link show "$VETH_A" >/dev/null 2>&1; then
        ip link add "$VETH_A" type veth peer name "$VETH_B"
    fi
    ip addr replace "$IP_A/24" dev "$VETH_A"
    ip addr replace "$IP_B/24" dev "$VETH_B"
    ip link set "$VETH_A" up
    ip link set "$VETH_B" up
    ip link set lo up
    # Both addresses are local to this host: without accept_local the kernel drops RoCE v2
    # packets "from itself" (rdma_cm ADDR_ERROR, or errno 110 moving a QP to RTR).
    sysctl -qw net.ipv4.conf.all.accept_local=1 "net.ipv4.conf.$VETH_A.accept_local=1" \
        "net.ipv4.conf.$VETH_B.accept_local=1"
    # Both addresses are local, so ARP between the two ends of the pair never completes and the
    # first rdma_cm address resolution waits for its whole timeout: pin the neighbours instead.
    ip neigh replace "$IP_A" lladdr "$(cat "/sys/class/net/$VETH_A/address")" dev "$VETH_B" nud permanent
    ip neigh replace "$IP_B" lladdr "$(cat "/sys/class/net/$VETH_B/address")" dev "$VETH_A" nud permanent
    for pair in "$RXE_A:$VETH_A" "$RXE_B:$VETH_B"; do
        local dev=${pair%%:*} netdev=${pair#*:} bound
        if [ -d "/sys/class/infiniband/$dev" ]; then
            bound=$(rxe_netdev "$dev")
            [ "$bound" = "$netdev" ] || die "RDMA device $dev already exists on netdev '$bound', not $netdev; remove it (rdma link delete $dev) or set RDMAPROXY_RXE_A/B"
        else
            rdma link add "$dev" type rxe netdev "$netdev"
        fi
    done
    # Wait (bounded) for the ports to become ACTIVE and the IPv4 GIDs to appear.
    for _ in $(seq 1 50); do
        if grep -q ACTIVE "/sys/class/infiniband/$RXE_A/ports/1/state" 2>/dev/null &&
           grep -q ACTIVE "/sys/class/infiniband/$RXE_B/ports/1/state" 2>/dev/null &&
           grep -qs ffff "/sys/class/infiniband/$RXE_A/ports/1/gids/1" &&
           grep -qs ffff "/sys/class/infiniband/$RXE_B/ports/1/gids/1"; then
            break
        fi
        sleep 0.1
    done
    status
}

case "${1:-}" in
    "") setup ;;
    --teardown) teardown ;;
    --status) status ;;
    -h|--help) sed -n '2,13p' "$0" ;;
    *) die "unknown argument '$1' (use --teardown, --status or no argument)" ;;
esac
