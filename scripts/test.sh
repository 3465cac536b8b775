#!/usr/bin/env bash
# The test command: installs what is missing, then runs lint, type checks and the whole test
# suite with RDMAPROXY_REQUIRE_RDMA=1 — natively where this host can create rxe devices,
# otherwise inside a QEMU VM booting Debian's stock kernel (ci/vm.sh).
#
# usage: scripts/test.sh [PYTEST ARGS...]     e.g. scripts/test.sh -k socks
#        scripts/test.sh --inside [ARGS...]   (used by the VM: just run pytest here)
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
VENV=${RDMAPROXY_VENV:-$REPO/.venv}
export RDMAPROXY_REQUIRE_RDMA=1

APT_PACKAGES="qemu-system-x86 busybox-static rdma-core ibverbs-providers ibverbs-utils
  rdmacm-utils python3-pyverbs python3-venv perftest iproute2 kmod curl proxychains4 file
  microsocks python3-matplotlib"

install_system() {
    local missing=()
    for p in $APT_PACKAGES; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return
    if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
        echo "test.sh: missing Debian packages: ${missing[*]} (install them as root)" >&2
        exit 1
    fi
    echo "test.sh: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

install_venv() {
    # pyverbs comes from the system's rdma-core (python3-pyverbs), so the venv is made from the
    # system interpreter with --system-site-packages.
    if [ ! -x "$VENV/bin/python" ]; then
        /usr/bin/python3 -m venv --system-site-packages "$VENV"
    fi
    local stamp="$VENV/.rdmaproxy-deps"
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        "$VENV/bin/pip" install -q --disable-pip-version-check -e ".[test,dev]" 2>&1 \
            | grep -v "^WARNING: Location" || true
        "$VENV/bin/python" -c "import rdmaproxy, trio, attrs, pytest" || exit 1
        touch "$stamp"
    fi
}

native_rdma_possible() {
    [ -d /sys/class/infiniband/rxe0 ] && [ -d /sys/class/infiniband/rxe1 ] && return 0
    [ "$(id -u)" -eq 0 ] && modprobe rdma_rxe 2>/dev/null
}

if [ "${1:-}" = "--inside" ]; then
    shift
    exec "$VENV/bin/python" -m pytest "$@"
fi

install_system
install_venv
[ "${RDMAPROXY_ONLY_INSTALL:-}" = 1 ] && exit 0
echo "== ruff"; "$VENV/bin/ruff" check rdmaproxy tests
echo "== mypy"; "$VENV/bin/mypy"
if native_rdma_possible; then
    echo "== native RDMA: setting up rxe devices"
    bash scripts/setup_rxe.sh
    exec "$VENV/bin/python" -m pytest "$@"
fi
echo "== no usable RDMA on this host ($(uname -r)): unit tests here, then the RDMA tests in a VM"
"$VENV/bin/python" -m pytest -m "not rdma" "$@"
exec bash ci/vm.sh --timeout "${RDMAPROXY_VM_TIMEOUT:-4200}" -- bash scripts/test.sh --inside -m rdma "$@"
