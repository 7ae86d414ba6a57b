#!/usr/bin/env bash
# An FTL disk (guest FTL -> host FTL driver -> emulated open-channel SSD in a sparse file) against a
# raw-file disk of the same size, both in one vstor daemon and exported over vhost-user, under the
# same libblkio load (benches/vhost_blk_load.rs), alternating which goes first each round. Prints a
# Markdown table with the median IOPS and latencies per side and the ratio (FTL / raw).
#
#   benches/ftl_vs_raw.sh
#   ROUNDS=5 RUNTIME=6 VSTOR_BIN=target/release/vstor LOAD_BIN=... benches/ftl_vs_raw.sh
#
# Environment: SIZE (default 512M), RUNTIME (default 4), RAMP (default 1), ROUNDS (default 3),
# ONLY (run only the workloads whose name contains it), VSTOR_BIN, LOAD_BIN as in vhost_vs_qsd.sh;
# ALLOW_LOAD, MAX_LOAD and KEEP_WORK as in benches/lib.sh (the script refuses to run while the
# 1-minute load average is above half the CPUs, unless ALLOW_LOAD=1). Both disks are filled with
# 4 KiB writes first, so reads hit written blocks on both (an FTL's unwritten blocks cost nothing
# to read).

set -euo pipefail

# shellcheck source=benches/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
bench_init ftl_vs_raw "$@"
knob SIZE 512M
knob RUNTIME 4
knob RAMP 1
knob ROUNDS 3
knob ONLY ""
knob VSTOR_BIN ""
knob LOAD_BIN ""
bench_start
require timeout
build_load
build_vstor

make_workdir ftl-vs-raw
declare -A SOCK=([raw]="$WORK/raw.sock" [ftl]="$WORK/ftl.sock")
cat >"$WORK/vstor.toml" <<EOF
data_dir = "$WORK/data"
[api]
socket = "$WORK/api.sock"
[nbd]
enabled = false
[[disk]]
name = "raw"
size = "$SIZE"
block_size = 4096
backend = { type = "raw" }
[[disk]]
name = "ftl"
size = "$SIZE"
block_size = 4096
backend = { type = "ftl" }
[[vhost_user]]
disk = "raw"
socket = "${SOCK[raw]}"
num_queues = 1
[[vhost_user]]
disk = "ftl"
socket = "${SOCK[ftl]}"
num_queues = 1
EOF
start_vstor "${SOCK[ftl]}" "${SOCK[raw]}"

FILL_LIMIT=$((60 + SIZE_BYTES / 1048576 / 4)) # generous: 4 MiB/s would still finish
for side in raw ftl; do
    log "filling $side ($SIZE) ..."
    load_run "$side" "${SOCK[$side]}" "$WORK/fill-$side.json" "$FILL_LIMIT" \
        --rw write --bs 4096 --iodepth 32 --queues 1 --once --refill
    load_figures "$WORK/fill-$side.json" >/dev/null
done

ROWS=("4k randread QD1|randread|1" "4k randread QD32|randread|32" "4k randwrite QD1|randwrite|1" "4k randwrite QD32|randwrite|32")
select_rows
RUN_LIMIT=$((RUNTIME + RAMP + 60))

measuring_starts
for row in "${ROWS[@]}"; do
    IFS='|' read -r name rw qd <<<"$row"
    for ((round = 1; round <= ROUNDS; round++)); do
        for side in $(round_order "$round" ftl raw); do
            out="$WORK/$rw-qd$qd-r$round-$side.json"
            load_run "$side" "${SOCK[$side]}" "$out" "$RUN_LIMIT" --rw "$rw" --bs 4096 --iodepth "$qd" \
                --queues 1 --runtime "$RUNTIME" --ramp "$RAMP"
            read -r iops _ p50 p99 < <(load_figures "$out")
            record "$name" "$side" "$round" iops="$iops" p50="$p50" p99="$p99"
        done
    done
done

note "two $SIZE disks of 4 KiB blocks in one daemon, raw file and FTL (default geometry), each over vhost-user with one queue, filled with 4 KiB writes first"
note "each run: \`vhost_blk_load --socket SOCK --rw RW --bs 4096 --iodepth QD --queues 1 --runtime $RUNTIME --ramp $RAMP --seed 20240601\`"
note "$ROUNDS rounds per row, FTL and raw alternating which goes first; medians per side"
bench_table \
    'FTL IOPS|ftl.iops|{:,.0f}' 'raw IOPS|raw.iops|{:,.0f}' 'ratio (FTL/raw)|ftl.iops/raw.iops|{:.2f}x' \
    'FTL p50 µs|ftl.p50|{:.1f}' 'raw p50 µs|raw.p50|{:.1f}' 'FTL p99 µs|ftl.p99|{:.1f}' 'raw p99 µs|raw.p99|{:.1f}'
