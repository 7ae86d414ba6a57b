#!/usr/bin/env bash
# vstor's NBD export against qemu-storage-daemon's NBD export of an equal raw file, side by side
# in one run: the same fio jobs (nbd engine) against both, alternating which side goes first each
# round, and the median of ROUNDS rounds per side. Prints a Markdown table on stdout (progress and
# per-run figures go to stderr).
#
#   benches/nbd_vs_qsd.sh                       # builds vstor in release first
#   ROUNDS=5 RUNTIME=8 benches/nbd_vs_qsd.sh
#   VSTOR_BIN=target/release/vstor benches/nbd_vs_qsd.sh
#
# Environment: SIZE (disk size, default 1G; K/M/G/T are binary units), RUNTIME (seconds measured
# per fio run, default 4), RAMP (seconds of warm-up per run left out of the figures, default 1),
# ROUNDS (default 3), ONLY (run only the workloads whose name contains it, e.g. "QD1"), WORKERS
# (vstor's runtime.worker_threads; default: vstor's own default), VSTOR_BIN (a vstor binary to use
# instead of building one); ALLOW_LOAD, MAX_LOAD and KEEP_WORK as in benches/lib.sh (the script
# refuses to run while the 1-minute load average is above half the CPUs, unless ALLOW_LOAD=1).
#
# Both disks are raw, sparse files in the page cache (vstor: direct = false; qemu-storage-daemon:
# aio=io_uring, cache.direct=off), filled completely with the same data before measuring.
# The machine this runs on is shared and noisy: only figures from one run compare with each other.

set -euo pipefail

# shellcheck source=benches/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
bench_init nbd_vs_qsd "$@"
knob SIZE 1G
knob RUNTIME 4
knob RAMP 1
knob ROUNDS 3
knob ONLY ""
knob WORKERS ""
knob VSTOR_BIN ""
bench_start
require qemu-storage-daemon cmp
require_fio_nbd
build_vstor

# --- work dir, daemons ---------------------------------------------------------------------------
make_workdir nbd-vs-qsd
VSTOR_SOCK="$WORK/vstor-nbd.sock"
QSD_SOCK="$WORK/qsd.sock"
declare -A URI=([vstor]="nbd+unix:///bench?socket=$VSTOR_SOCK" [qsd]="nbd+unix:///bench?socket=$QSD_SOCK")

cat >"$WORK/vstor.toml" <<EOF
data_dir = "$WORK/vstor"

[api]
socket = "$WORK/api.sock"

[nbd]
socket = "$VSTOR_SOCK"

$([[ -n "$WORKERS" ]] && printf '[runtime]\nworker_threads = %s\n' "$WORKERS")

[[disk]]
name = "bench"
size = "$SIZE"
block_size = 512
backend = { type = "raw", direct = false }
EOF
start_vstor "$VSTOR_SOCK"
# --nbd-server must come before --export (the export needs a running server).
start_qsd "$QSD_SOCK" --nbd-server "addr.type=unix,addr.path=$QSD_SOCK" \
    --export "type=nbd,id=exp0,node-name=fmt0,name=bench,writable=on"
VSTOR_FILE=$(vstor_disk_file)

# Fill both disks completely with the same data, so reads hit allocated blocks and both files sit
# in the page cache the same way. A fixed seed and buffers refilled in submission order make the
# data independent of the order in which each server completes requests. The fill writes 4 KiB at
# a time, for the reason given in vhost_vs_qsd.sh: the size of the first writes decides the size of
# the page cache's folios, which the 4k write rows would otherwise measure.
for side in vstor qsd; do
    log "filling $side's disk ($SIZE) ..."
    fio_run "$side" "${URI[$side]}" "$WORK/fill-$side.json" --rw=write --bs=4k --iodepth=32 \
        --randseed=20240601 --refill_buffers
done
same_data "$VSTOR_FILE" "$WORK/qsd.raw"

# --- measuring -----------------------------------------------------------------------------------
# name | rw | bs | iodepth
ROWS=(
    "4k randread QD1|randread|4k|1"
    "4k randread QD32|randread|4k|32"
    "4k randwrite QD1|randwrite|4k|1"
    "4k randwrite QD32|randwrite|4k|32"
    "128k seq read QD8|read|128k|8"
    "128k seq write QD8|write|128k|8"
)
select_rows

measuring_starts
for row in "${ROWS[@]}"; do
    IFS='|' read -r name rw bs qd <<<"$row"
    case $rw in *read) direction="read" ;; *) direction="write" ;; esac
    for ((round = 1; round <= ROUNDS; round++)); do
        for side in $(round_order "$round" vstor qsd); do
            out="$WORK/${rw}-${bs}-qd${qd}-r${round}-${side}.json"
            fio_run "$side" "${URI[$side]}" "$out" "--rw=$rw" "--bs=$bs" "--iodepth=$qd" \
                --time_based "--runtime=$RUNTIME" "--ramp_time=$RAMP"
            read -r iops mibs _ p99 < <(fio_figures "$out" "$direction")
            record "$name" "$side" "$round" iops="$iops" mibs="$mibs" p99="$p99"
        done
    done
done

# --- report --------------------------------------------------------------------------------------
note "$(qemu-storage-daemon --version | head -n1); $(fio --version)"
note "disks: $SIZE sparse raw files, filled before measuring, in the page cache (vstor direct = false; qsd aio=io_uring, cache.direct=off)"
note "each run: \`fio --name=bench --ioengine=nbd --uri='nbd+unix:///bench?socket=SOCK' --rw=RW --bs=BS --iodepth=QD --numjobs=1 --size=$SIZE_BYTES --time_based --runtime=$RUNTIME --ramp_time=$RAMP --output-format=json\`"
note "$ROUNDS rounds per row, vstor and qsd alternating which goes first; medians per side"
bench_table \
    'vstor IOPS|vstor.iops|{:,.0f}' 'qsd IOPS|qsd.iops|{:,.0f}' 'ratio (vstor/qsd)|vstor.iops/qsd.iops|{:.2f}x' \
    'vstor p99 µs|vstor.p99|{:,.1f}' 'qsd p99 µs|qsd.p99|{:,.1f}' \
    'vstor MiB/s|vstor.mibs|{:,.1f}' 'qsd MiB/s|qsd.mibs|{:,.1f}'
