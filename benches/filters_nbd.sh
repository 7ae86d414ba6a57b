#!/usr/bin/env bash
# IOPS through a chain of four pass-through filters against no filters, through the real daemon
# and a real client: one `vstor serve` with two equal disks, `plain` (no filters) and `chained`
# (four `passthrough` filters, each called on every request and every completion), filled with
# the same data, and fio's nbd engine against each, alternating which goes first each round.
# Prints a Markdown table of median IOPS per side and the median of the per-round ratios.
#
#   benches/filters_nbd.sh                       # builds vstor in release first
#   ROUNDS=7 RUNTIME=4 benches/filters_nbd.sh
#   VSTOR_BIN=target/release/vstor benches/filters_nbd.sh
#
# Environment: SIZE (default 512M), RUNTIME (s per run, default 3), RAMP (default 1), ROUNDS
# (default 5), ONLY (workloads whose name contains it), VSTOR_BIN; ALLOW_LOAD, MAX_LOAD and
# KEEP_WORK as in benches/lib.sh (the script refuses to run while the 1-minute load average is
# above half the CPUs, unless ALLOW_LOAD=1).

set -euo pipefail

# shellcheck source=benches/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
bench_init filters_nbd "$@"
knob SIZE 512M
knob RUNTIME 3
knob RAMP 1
knob ROUNDS 5
knob ONLY ""
knob VSTOR_BIN ""
bench_start
require_fio_nbd
build_vstor

make_workdir filters-nbd
SOCK="$WORK/nbd.sock"
PT='{ type = "passthrough" }'
cat >"$WORK/vstor.toml" <<EOT
data_dir = "$WORK/vstor"

[api]
socket = "$WORK/api.sock"

[nbd]
socket = "$SOCK"

[[disk]]
name = "plain"
size = "$SIZE"

[[disk]]
name = "chained"
size = "$SIZE"
filters = [$PT, $PT, $PT, $PT]
EOT
start_vstor "$SOCK"

for disk in plain chained; do
    log "filling $disk ($SIZE) ..."
    fio_run "$disk" "nbd+unix:///$disk?socket=$SOCK" "$WORK/fill-$disk.json" \
        --rw=write --bs=4k --iodepth=32 --randseed=7 --refill_buffers
done

ROWS=("4k randread QD1|randread|1" "4k randread QD32|randread|32" "4k randwrite QD1|randwrite|1" "4k randwrite QD32|randwrite|32")
select_rows

measuring_starts
for row in "${ROWS[@]}"; do
    IFS='|' read -r name rw qd <<<"$row"
    dir="read"
    [[ $rw == randwrite ]] && dir="write"
    for ((round = 1; round <= ROUNDS; round++)); do
        for disk in $(round_order "$round" plain chained); do
            out="$WORK/$rw-$qd-$round-$disk.json"
            fio_run "$disk" "nbd+unix:///$disk?socket=$SOCK" "$out" \
                --rw="$rw" --bs=4k --iodepth="$qd" --time_based --runtime="$RUNTIME" --ramp_time="$RAMP"
            read -r iops _ < <(fio_figures "$out" "$dir")
            record "$name" "$disk" "$round" iops="$iops"
        done
    done
done

note "two $SIZE raw disks in one daemon, filled with the same data; fio nbd engine, 4k blocks, $RUNTIME s measured after $RAMP s of ramp"
note "$ROUNDS rounds per row, plain and chained alternating which goes first; medians per side"
bench_table \
    'no filters IOPS|plain.iops|{:,.0f}' '4 passthrough IOPS|chained.iops|{:,.0f}' \
    'ratio of medians|chained.iops/plain.iops|{:.3f}x' \
    'median of per-round ratios|each:chained.iops/plain.iops|{:.3f}x' \
    'per-round ratios|rounds:chained.iops/plain.iops|{:.2f}'
