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
# VSTOR_BIN, LOAD_BIN as in vhost_vs_qsd.sh. Both disks are filled with 4 KiB writes first, so
# reads hit written blocks on both (an FTL's unwritten blocks cost nothing to read).

set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
BENCH=ftl_vs_raw
SIZE=${SIZE:-512M}
RUNTIME=${RUNTIME:-4}
RAMP=${RAMP:-1}
ROUNDS=${ROUNDS:-3}

die() { echo "$BENCH: $*" >&2; exit 1; }
log() { echo "$*" >&2; }

if [[ -z "${VSTOR_BIN:-}" || -z "${LOAD_BIN:-}" ]]; then
    log "building vstor and the load generator (release) ..."
    (cd "$REPO_ROOT" && cargo build --release --quiet && cargo bench --bench vhost_blk_load --no-run --quiet) >&2
fi
VSTOR=${VSTOR_BIN:-$REPO_ROOT/target/release/vstor}
LOAD=${LOAD_BIN:-$(ls -t "$REPO_ROOT"/target/release/deps/vhost_blk_load-* | grep -v '\.d$' | head -n1)}
[[ -x "$VSTOR" && -x "$LOAD" ]] || die "missing binaries: $VSTOR $LOAD"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/ftl-vs-raw.XXXXXX")
trap 'kill "${PID:-}" 2>/dev/null; wait 2>/dev/null; rm -rf "$WORK"' EXIT
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
socket = "$WORK/raw.sock"
num_queues = 1
[[vhost_user]]
disk = "ftl"
socket = "$WORK/ftl.sock"
num_queues = 1
EOF
"$VSTOR" serve --config "$WORK/vstor.toml" >"$WORK/vstor.log" 2>&1 &
PID=$!
for _ in $(seq 100); do [[ -S "$WORK/ftl.sock" && -S "$WORK/raw.sock" ]] && break; sleep 0.1; done
[[ -S "$WORK/ftl.sock" ]] || { cat "$WORK/vstor.log" >&2; die "vstor did not start"; }

load() { # SIDE ARGS... -> "iops p50 p99"
    local side=$1
    shift
    kill -0 "$PID" 2>/dev/null || { cat "$WORK/vstor.log" >&2; die "vstor died"; }
    timeout -k 5 600 "$LOAD" --socket "$WORK/$side.sock" --seed 20240601 "$@" 2>"$WORK/err" | tail -n1 |
        python3 -c 'import json,sys; d=json.load(sys.stdin); assert d["errors"]==0, d; print(d["iops"], d["p50_us"], d["p99_us"])' ||
        { cat "$WORK/err" >&2; die "load failed against $side"; }
}

for side in raw ftl; do
    log "filling $side ($SIZE) ..."
    load "$side" --rw write --bs 4096 --iodepth 32 --queues 1 --once --refill >/dev/null
done

ROWS=("4k randread QD1|randread|1" "4k randread QD32|randread|32" "4k randwrite QD1|randwrite|1" "4k randwrite QD32|randwrite|32")
echo "Command: \`$0\` (SIZE=$SIZE RUNTIME=$RUNTIME RAMP=$RAMP ROUNDS=$ROUNDS), $(date -u '+%Y-%m-%d %H:%M UTC'), load average $(cut -d' ' -f1-3 /proc/loadavg) at the start"
echo
echo "| workload | FTL IOPS | raw IOPS | ratio (FTL/raw) | FTL p50 µs | raw p50 µs | FTL p99 µs | raw p99 µs |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|"
for row in "${ROWS[@]}"; do
    IFS='|' read -r name rw qd <<<"$row"
    : >"$WORK/ftl.txt"
    : >"$WORK/raw.txt"
    for ((round = 1; round <= ROUNDS; round++)); do
        if ((round % 2)); then order=(ftl raw); else order=(raw ftl); fi
        for side in "${order[@]}"; do
            r=$(load "$side" --rw "$rw" --bs 4096 --iodepth "$qd" --queues 1 --runtime "$RUNTIME" --ramp "$RAMP")
            echo "$r" >>"$WORK/$side.txt"
            log "$name round $round $side: $r"
        done
    done
    python3 - "$name" "$WORK/ftl.txt" "$WORK/raw.txt" <<'EOF'
import statistics, sys
name, f, r = sys.argv[1:]
cols = lambda p: list(zip(*[map(float, l.split()) for l in open(p) if l.strip()]))
(fi, f50, f99), (ri, r50, r99) = cols(f), cols(r)
m = statistics.median
print(f"| {name} | {m(fi):,.0f} | {m(ri):,.0f} | {m(fi)/m(ri):.2f}x | {m(f50):.1f} | {m(r50):.1f} | {m(f99):.1f} | {m(r99):.1f} |")
EOF
done
