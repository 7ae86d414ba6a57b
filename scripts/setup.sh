#!/usr/bin/env bash
# Installs what vstor needs to build and test on a fresh Debian machine (run as root).
set -euo pipefail
need=()
for pkg in libclang-dev librocksdb-dev fio libnbd-bin qemu-utils; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need[@]}"
fi
