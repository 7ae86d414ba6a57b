#!/usr/bin/env bash
# vstor's vhost-user-blk export against qemu-storage-daemon's vhost-user-blk export of an equal raw
# file, side by side in one run: the same libblkio load (benches/vhost_blk_load.rs) against both,
# alternating which side goes first each round, and the median of ROUNDS rounds per side. Prints a
# Markdown table on stdout (progress and per-run figures go to stderr).
#
#   benches/vhost_vs_qsd.sh                     # builds vstor and the load generator first
#   ROUNDS=5 RUNTIME=8 benches/vhost_vs_qsd.sh
#   ONLY="QD32" VSTOR_BIN=target/release/vstor benches/vhost_vs_qsd.sh
#
# Environment: SIZE (disk size, default 1G; K/M/G/T are binary units), RUNTIME (seconds measured
# per run, default 4), RAMP (seconds of warm-up per run left out of the figures, default 1),
# ROUNDS (default 3), ONLY (run only the workloads whose name contains it, e.g. "QD1"), WORKERS
# (vstor's runtime.worker_threads; default: vstor's own default), VSTOR_BIN (a vstor binary to use
# instead of building one), LOAD_BIN (a vhost_blk_load binary to use instead of building one);
# ALLOW_LOAD, MAX_LOAD and KEEP_WORK as in benches/lib.sh (the script refuses to run while the
# 1-minute load average is above half the CPUs, unless ALLOW_LOAD=1).
#
# Both disks are raw, sparse files in the page cache (vstor: direct = false; qemu-storage-daemon:
# aio=io_uring, cache.direct=off), filled completely with the same data before measuring; both
# exports offer 2 queues. The machine this runs on is shared and noisy: only figures from one run
# compare with each other.

set -euo pipefail

# shellcheck source=benches/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
bench_init vhost_vs_qsd "$@"
knob SIZE 1G
knob RUNTIME 4
knob RAMP 1
knob ROUNDS 3
knob ONLY ""
knob WORKERS ""
knob VSTOR_BIN ""
knob LOAD_BIN ""
NUM_QUEUES=2 # queues both exports offer
bench_start
require qemu-storage-daemon timeout cmp
build_load
build_vstor

# --- work dir, daemons ---------------------------------------------------------------------------
make_workdir vhost-vs-qsd
declare -A SOCK=([vstor]="$WORK/vstor-vhost.sock" [qsd]="$WORK/qsd-vhost.sock")

cat >"$WORK/vstor.toml" <<EOF
data_dir = "$WORK/vstor"

[api]
socket = "$WORK/api.sock"

[nbd]
socket = "$WORK/vstor-nbd.sock"

$([[ -n "$WORKERS" ]] && printf '[runtime]\nworker_threads = %s\n' "$WORKERS")

[[disk]]
name = "bench"
size = "$SIZE"
block_size = 512
backend = { type = "raw", direct = false }

[[vhost_user]]
disk = "bench"
socket = "${SOCK[vstor]}"
num_queues = $NUM_QUEUES
EOF
start_vstor "${SOCK[vstor]}"
start_qsd "${SOCK[qsd]}" --export \
    "type=vhost-user-blk,id=exp0,node-name=fmt0,addr.type=unix,addr.path=${SOCK[qsd]},writable=on,num-queues=$NUM_QUEUES"
VSTOR_FILE=$(vstor_disk_file)

# Fill both disks completely with the same data, so reads hit allocated blocks and both files sit
# in the page cache the same way. --refill makes every block's bytes depend only on the seed and
# its offset, not on the order in which each server completes requests.
#
# The fill writes 4 KiB at a time: the size of the writes that first bring a file's pages into the
# page cache decides the size of its folios (kernel 6.18, ext4), and a later 4 KiB write into a
# large folio costs the kernel about three times one into a 4 KiB folio. Filling in large writes
# would make the 4k write rows measure how each server happened to fill its file.
FILL_LIMIT=$((60 + SIZE_BYTES / 1048576 / 4)) # generous: 4 MiB/s would still finish
for side in vstor qsd; do
    log "filling $side's disk ($SIZE) ..."
    load_run "$side" "${SOCK[$side]}" "$WORK/fill-$side.json" "$FILL_LIMIT" \
        --rw write --bs 4096 --iodepth 32 --queues 1 --once --refill
    log "    $(cat "$WORK/fill-$side.json")"
done
same_data "$VSTOR_FILE" "$WORK/qsd.raw"

# --- measuring -----------------------------------------------------------------------------------
# name | rw | bs | iodepth (per queue) | queues
ROWS=(
    "4k randread QD1|randread|4096|1|1"
    "4k randread QD32|randread|4096|32|1"
    "4k randread QD32 2q|randread|4096|32|2"
    "4k randwrite QD1|randwrite|4096|1|1"
    "4k randwrite QD32|randwrite|4096|32|1"
    "4k randwrite QD32 2q|randwrite|4096|32|2"
    "128k seq read QD8|read|131072|8|1"
    "128k seq write QD8|write|131072|8|1"
)
select_rows
RUN_LIMIT=$((RUNTIME + RAMP + 60))

measuring_starts
for row in "${ROWS[@]}"; do
    IFS='|' read -r name rw bs qd queues <<<"$row"
    for ((round = 1; round <= ROUNDS; round++)); do
        for side in $(round_order "$round" vstor qsd); do
            out="$WORK/${rw}-${bs}-qd${qd}-q${queues}-r${round}-${side}.json"
            load_run "$side" "${SOCK[$side]}" "$out" "$RUN_LIMIT" --rw "$rw" --bs "$bs" --iodepth "$qd" \
                --queues "$queues" --runtime "$RUNTIME" --ramp "$RAMP"
            read -r iops mibs p50 p99 < <(load_figures "$out")
            record "$name" "$side" "$round" iops="$iops" mibs="$mibs" p50="$p50" p99="$p99"
        done
    done
done

# --- report --------------------------------------------------------------------------------------
note "runtime.worker_threads ${WORKERS:-default}; $(qemu-storage-daemon --version | head -n1)"
note "disks: $SIZE sparse raw files, filled before measuring, in the page cache (vstor direct = false; qsd aio=io_uring, cache.direct=off); both exports offer $NUM_QUEUES queues"
note "each run: \`vhost_blk_load --socket SOCK --rw RW --bs BS --iodepth QD --queues Q --runtime $RUNTIME --ramp $RAMP --seed 20240601\` (libblkio virtio-blk-vhost-user, one thread per queue, QD per queue, offsets over the whole disk)"
note "$ROUNDS rounds per row, vstor and qsd alternating which goes first; medians per side"
bench_table \
    'vstor IOPS|vstor.iops|{:,.0f}' 'qsd IOPS|qsd.iops|{:,.0f}' 'ratio (vstor/qsd)|vstor.iops/qsd.iops|{:.2f}x' \
    'vstor p50 µs|vstor.p50|{:,.1f}' 'qsd p50 µs|qsd.p50|{:,.1f}' \
    'vstor p99 µs|vstor.p99|{:,.1f}' 'qsd p99 µs|qsd.p99|{:,.1f}' \
    'vstor MiB/s|vstor.mibs|{:,.1f}' 'qsd MiB/s|qsd.mibs|{:,.1f}'
