#!/usr/bin/env bash
# The demo: two rdmaproxy nodes carry a curl download across RDMA, then print the throughput
# and the sockets registry of both proxies.
#
#   curl --socks5-hostname--> rdmaproxy (ingress, rxe0 10.99.0.1) ==RDMA==>
#        rdmaproxy (egress, rxe1 10.99.0.2) --TCP--> busybox httpd
#
# usage: scripts/demo.sh [SIZE_MIB]      (default 64)
# On a host that can create rxe devices it runs natively (as root); elsewhere it installs what
# it needs and runs inside the QEMU VM (ci/vm.sh), like scripts/test.sh.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
VENV=${RDMAPROXY_VENV:-$REPO/.venv}
SIZE_MIB=${1:-64}

inside() {
    local py
    work=$(mktemp -d)  # global: the EXIT trap runs after this function has returned
    py="$VENV/bin/python"
    export RDMAPROXY_RUN_DIR="$work/run"
    trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"' EXIT
    printf 'demo secret\n' > "$work/secret"; chmod 600 "$work/secret"
    mkdir "$work/www"
    head -c "$((SIZE_MIB << 20))" /dev/urandom > "$work/www/blob"
    busybox httpd -f -p 127.0.0.1:8080 -h "$work/www" &
    "$py" -m rdmaproxy serve --name egress --listen 10.99.0.2:7471 \
        --secret-file "$work/secret" 2> "$work/egress.log" &
    "$py" -m rdmaproxy serve --name ingress --socks 127.0.0.1:1080 --listen 10.99.0.1:7471 \
        --peer 10.99.0.2:7471 --secret-file "$work/secret" 2> "$work/ingress.log" &
    echo "== waiting for the ingress proxy to connect to its peer over RDMA"
    for _ in $(seq 1 120); do
        if "$py" -m rdmaproxy status --json --name ingress 2>/dev/null | grep -q '"state": "up"'; then
            break
        fi
        sleep 0.5
    done
    "$py" -m rdmaproxy status --name ingress || { cat "$work"/*.log; exit 1; }

    echo "== curl --socks5-hostname 127.0.0.1:1080 http://localhost:8080/blob (${SIZE_MIB} MiB)"
    local speed
    speed=$(curl -sS --fail --socks5-hostname 127.0.0.1:1080 http://localhost:8080/blob \
        -o "$work/got" -w '%{speed_download}')
    if cmp -s "$work/www/blob" "$work/got"; then echo "content: identical (cmp)"; else
        echo "content: DIFFERS"; exit 1; fi
    awk -v s="$speed" 'BEGIN { printf "throughput: %.1f MiB/s through rdmaproxy over RDMA\n", s / 1048576 }'

    echo "== the sockets registry while a (rate-limited) transfer is in flight"
    curl -sS --socks5-hostname 127.0.0.1:1080 --limit-rate 256K http://localhost:8080/blob \
        -o /dev/null &
    local slow=$!
    sleep 6
    "$py" -m rdmaproxy status
    kill "$slow" 2>/dev/null || true
    wait "$slow" 2>/dev/null || true
    sleep 1
    echo "== after the transfer"
    "$py" -m rdmaproxy status
}

if [ "${1:-}" = "--inside" ]; then
    SIZE_MIB=${2:-64}
    inside
    exit 0
fi
if [ -d /sys/class/infiniband/rxe0 ] || { [ "$(id -u)" -eq 0 ] && modprobe rdma_rxe 2>/dev/null; }; then
    bash scripts/setup_rxe.sh >/dev/null
    ulimit -l unlimited 2>/dev/null || true
    inside
else
    # the test command installs the packages, the venv and (for the VM) the kernel
    [ -x "$VENV/bin/rdmaproxy" ] || RDMAPROXY_ONLY_INSTALL=1 bash scripts/test.sh
    exec bash ci/vm.sh --timeout 1200 -- bash scripts/demo.sh --inside "$SIZE_MIB"
fi
