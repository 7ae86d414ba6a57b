#!/usr/bin/env bash
# The catalog at scale: creates DISKS raw disks one by one through the control API, then restarts
# the daemon, then deletes them all, and reports per step of STEP disks what one create and one
# delete cost, the daemon's resident memory and the state directory's size per disk, and the
# restart time. A create should cost the same at 10 disks as at 5,000 (issue 14).
#
# Knobs: DISKS (default 5000), STEP (default 500), DISK_SIZE (bytes, default 1 MiB; the disk files
# are sparse), VSTOR_BIN (a built vstor; default: cargo build --release), ALLOW_LOAD, MAX_LOAD,
# KEEP_WORK.
#
#   benches/catalog_scale.sh
#   DISKS=1000 STEP=100 benches/catalog_scale.sh
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
bench_init catalog_scale "$@"
knob DISKS 5000
knob STEP 500
knob DISK_SIZE 1048576
bench_start
[[ "$DISKS" =~ ^[1-9][0-9]*$ && "$STEP" =~ ^[1-9][0-9]*$ && "$DISK_SIZE" =~ ^[1-9][0-9]*$ ]] ||
    die "DISKS, STEP and DISK_SIZE must be positive integers"
build_vstor
make_workdir vstor-catalog-scale

cat >"$WORK/vstor.toml" <<TOML
data_dir = "$WORK/data"
[api]
socket = "$WORK/api.sock"
[nbd]
socket = "$WORK/nbd.sock"
TOML

note "raw disks of $DISK_SIZE bytes (sparse files), created and deleted one at a time over the control socket"
note "per disk: the growth since the empty daemon, divided by the disks that exist at the end of the step; MiB: the whole daemon, the whole state directory (allocated blocks)"
start_vstor "$WORK/api.sock"
measuring_starts
python3 "$BENCH_LIB_DIR/support/catalog_scale.py" grow "$WORK" "$VSTOR_PID" "$DISKS" "$STEP" "$DISK_SIZE" "$RESULTS"

# Restart: SIGTERM, wait for the exit, start again and time until the API answers a listing.
stop_daemon "$VSTOR_PID" 0
t0=$(date +%s.%N)
start_vstor "$WORK/api.sock"
python3 "$BENCH_LIB_DIR/support/catalog_scale.py" listed "$WORK" "$VSTOR_PID" "$DISKS" "$STEP" "$DISK_SIZE" "$RESULTS" "$t0"

python3 "$BENCH_LIB_DIR/support/catalog_scale.py" shrink "$WORK" "$VSTOR_PID" "$DISKS" "$STEP" "$DISK_SIZE" "$RESULTS"
check_alive

bench_table 'create ms|vstor.create_ms|{:.2f}' 'delete ms|vstor.delete_ms|{:.2f}' \
    'RSS KiB/disk|vstor.rss_kib_per_disk|{:.1f}' 'RSS MiB|vstor.rss_mib|{:.1f}' \
    'state KiB/disk|vstor.state_kib_per_disk|{:.2f}' 'state MiB|vstor.state_mib|{:.1f}' \
    'restart s|vstor.restart_s|{:.2f}'
