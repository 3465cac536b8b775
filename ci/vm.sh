#!/usr/bin/env bash
# Run a command inside a QEMU (TCG) VM that boots Debian's stock kernel, so that the rdma_rxe
# module is available on hosts whose kernel has no RDMA support.
#
# usage: ci/vm.sh [--timeout SECONDS] -- COMMAND [ARGS...]
#
# The guest sees this machine's filesystem (copy-on-write; the checkout is mounted read-write),
# runs scripts/setup_rxe.sh, raises the memlock limit, then runs COMMAND from the checkout.
# The guest's exit status becomes ours; 124 means the wall-clock bound was hit.
#
# Environment: RDMAPROXY_VM_CACHE (default /opt/rdmaproxy-vm; must not be under /var/cache or
# /var/tmp, which the guest replaces with tmpfs), RDMAPROXY_VM_MEMORY (4G), RDMAPROXY_VM_CPUS (2),
# RDMAPROXY_VENV (default <checkout>/.venv: vng is taken from it).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${RDMAPROXY_VM_CACHE:-/opt/rdmaproxy-vm}
VENV=${RDMAPROXY_VENV:-$REPO/.venv}
TIMEOUT=3600
while [ $# -gt 0 ]; do
    case "$1" in
        --timeout) TIMEOUT=$2; shift 2 ;;
        --) shift; break ;;
        *) echo "ci/vm.sh: unknown option $1 (usage: ci/vm.sh [--timeout S] -- CMD...)" >&2; exit 2 ;;
    esac
done
[ $# -gt 0 ] || { echo "ci/vm.sh: no command given" >&2; exit 2; }

log() { echo "[vm] $*" >&2; }

kernel_ready() { compgen -G "$CACHE/root/boot/vmlinuz-*" >/dev/null && [ -f "$CACHE/ready" ]; }

fetch_kernel() {
    mkdir -p "$CACHE"
    local pkg
    pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-6\./{print $2; exit}')
    if [ -z "$pkg" ]; then
        apt-get update -qq
        pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-6\./{print $2; exit}')
    fi
    [ -n "$pkg" ] || { log "cannot find Debian's linux-image-6.x-amd64 package"; exit 1; }
    log "fetching kernel package $pkg into $CACHE"
    rm -rf "$CACHE/root" "$CACHE"/*.deb "$CACHE/ready"
    (cd "$CACHE" && apt-get download "$pkg" 2>&1 | grep -v '^W: Download is performed unsandboxed' || true)
    dpkg-deb -x "$CACHE"/"$pkg"_*.deb "$CACHE/root"
    local release
    release=$(basename "$(ls -d "$CACHE"/root/lib/modules/*)")
    # vng links the modules next to the kernel image into the guest; Debian builds modules.dep in
    # its postinst, which an unpacked package never ran.
    depmod -b "$CACHE/root" "$release"
    rm -f "$CACHE"/*.deb
    touch "$CACHE/ready"
}

kernel_ready || fetch_kernel
VMLINUZ=$(ls "$CACHE"/root/boot/vmlinuz-* | head -n 1)
[ -x "$VENV/bin/vng" ] || { log "vng not found in $VENV (pip install virtme-ng; scripts/test.sh does it)"; exit 1; }
command -v qemu-system-x86_64 >/dev/null || { log "qemu-system-x86_64 missing: apt-get install qemu-system-x86"; exit 1; }

cmd=$(printf '%q ' "$@")
log "booting $(basename "$VMLINUZ") under TCG (${RDMAPROXY_VM_CPUS:-2} vCPUs, ${RDMAPROXY_VM_MEMORY:-4G}), bound ${TIMEOUT}s"
set +e
# vng crashes when its standard input is closed (CI has none): give it /dev/null. QEMU reopens
# /proc/self/fd/1 and /2 for the guest's console, so when they are one regular file the two
# streams overwrite each other from offset 0: always hand it a pipe.
PATH="$VENV/bin:$PATH" timeout --kill-after=30 "$TIMEOUT" \
    vng --run "$VMLINUZ" --disable-kvm --memory "${RDMAPROXY_VM_MEMORY:-4G}" \
        --cpus "${RDMAPROXY_VM_CPUS:-2}" --rwdir "$REPO" --cwd "$REPO" \
        --exec "bash $REPO/ci/guest.sh $cmd" </dev/null 2>&1 | cat
rc=${PIPESTATUS[0]}
set -e
if [ $rc -eq 124 ]; then log "the VM hit the ${TIMEOUT}s wall-clock bound"; fi
log "guest exit status $rc"
exit $rc
