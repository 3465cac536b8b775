#!/usr/bin/env bash
# Runs inside the VM (see ci/vm.sh): set up the rxe devices, then run the given command.
# On failure, print the tail of the kernel log to help diagnose.
set -uo pipefail
cd "$(dirname "$0")/.."
ulimit -l unlimited
if ! bash scripts/setup_rxe.sh >/tmp/setup_rxe.log 2>&1; then
    echo "[guest] scripts/setup_rxe.sh failed:" >&2; cat /tmp/setup_rxe.log >&2
    dmesg | tail -n 60 >&2
    exit 1
fi
cat /tmp/setup_rxe.log
"$@"
rc=$?
if [ $rc -ne 0 ]; then
    echo "[guest] command exited $rc; last kernel messages:" >&2
    dmesg | tail -n 60 >&2
fi
# Give the virtio console time to hand the last output to the host before power-off.
sync; sleep 1
exit $rc
