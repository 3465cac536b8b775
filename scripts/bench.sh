#!/usr/bin/env bash
# The benchmark: rdmaproxy beside the device limit (perftest), rsocket (rstream), direct TCP and
# a TCP SOCKS relay (microsocks), all on the same two rxe devices in one run. Prints a table and
# writes bench.json and bench.png (scripts/bench.py does the measuring; see its --help).
#
# usage: scripts/bench.sh [--quick] [--out DIR] [--chunk-sizes 8K,16K,...] [bench.py options]
#   --out defaults to bench-results/ in the checkout; a relative DIR is taken from the checkout.
# On a host that can create rxe devices it runs natively (as root); elsewhere it installs what
# it needs and runs inside the QEMU VM (ci/vm.sh), like scripts/test.sh. In the VM only the
# checkout is writable from the guest, so --out must then lie inside the checkout.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
VENV=${RDMAPROXY_VENV:-$REPO/.venv}

if [ "${1:-}" = "--inside" ]; then
    shift
    exec "$VENV/bin/python" scripts/bench.py "$@"
fi

out_dir() {  # the --out argument made absolute (relative to the checkout), or the default
    local prev="" dir="$REPO/bench-results"
    for arg in "$@"; do
        case "$arg" in
            --out=*) dir=${arg#--out=} ;;
            *) [ "$prev" = "--out" ] && dir=$arg ;;
        esac
        prev=$arg
    done
    case "$dir" in /*) ;; *) dir="$REPO/$dir" ;; esac
    echo "$dir"
}

# the test command installs the Debian packages (perftest, rdmacm-utils, microsocks,
# python3-matplotlib, ...), the venv and (for the VM) the kernel; it does nothing when all is there
RDMAPROXY_ONLY_INSTALL=1 bash scripts/test.sh

if [ -d /sys/class/infiniband/rxe0 ] || { [ "$(id -u)" -eq 0 ] && modprobe rdma_rxe 2>/dev/null; }; then
    bash scripts/setup_rxe.sh >/dev/null
    ulimit -l unlimited 2>/dev/null || true
    exec "$VENV/bin/python" scripts/bench.py "$@"
fi
case "$(out_dir "$@")/" in
    "$REPO"/*) ;;
    *) echo "bench.sh: --out must be inside $REPO when the benchmark runs in the VM" >&2; exit 2 ;;
esac
exec bash ci/vm.sh --timeout "${RDMAPROXY_VM_TIMEOUT:-3000}" -- bash scripts/bench.sh --inside "$@"
