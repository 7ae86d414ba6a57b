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
# (default 5), ONLY (workloads whose name contains it), VSTOR_BIN.

set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
invocation=""
for var in SIZE RUNTIME RAMP ROUNDS ONLY VSTOR_BIN; do
    if [[ -v $var ]]; then invocation+="$var=$(printf '%q' "${!var}") "; fi
done
invocation+="$0"

SIZE=${SIZE:-512M}
RUNTIME=${RUNTIME:-3}
RAMP=${RAMP:-1}
ROUNDS=${ROUNDS:-5}
BENCH=filters_nbd
# shellcheck source=benches/lib.sh
source "$SCRIPT_DIR/lib.sh"

command -v fio >/dev/null 2>&1 || die "fio is not installed (scripts/setup.sh installs it)"
fio --enghelp 2>/dev/null | grep -qw nbd || die "this fio has no nbd ioengine"
check_knobs

git_rev=$(source_revision)
if [[ -n "${VSTOR_BIN:-}" ]]; then
    VSTOR=$(cd "$(dirname "$VSTOR_BIN")" && pwd)/$(basename "$VSTOR_BIN")
else
    log "building vstor (cargo build --release) ..."
    (cd "$REPO_ROOT" && cargo build --release >&2) || die "cargo build --release failed"
    VSTOR="$REPO_ROOT/target/release/vstor"
fi
[[ -x "$VSTOR" ]] || die "no vstor binary at $VSTOR"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/filters-nbd.XXXXXX")
install_cleanup
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
log "starting vstor: $VSTOR serve --config $WORK/vstor.toml"
"$VSTOR" serve --config "$WORK/vstor.toml" >"$WORK/vstor.log" 2>&1 &
VSTOR_PID=$!
wait_for_socket vstor "$VSTOR_PID" "$SOCK" "$WORK/vstor.log"

run_fio() {
    local disk=$1 out=$2
    shift 2
    kill -0 "$VSTOR_PID" 2>/dev/null || daemon_failed vstor "$WORK/vstor.log" "the daemon died"
    fio --name=bench --ioengine=nbd --uri="nbd+unix:///$disk?socket=$SOCK" --numjobs=1 --size="$SIZE_BYTES" \
        --output-format=json --output="$out" "$@" 2>"$out.err" || { cat "$out.err" >&2; die "fio against $disk failed"; }
}

for disk in plain chained; do
    log "filling $disk ($SIZE) ..."
    run_fio "$disk" "$WORK/fill-$disk.json" --rw=write --bs=4k --iodepth=32 --randseed=7 --refill_buffers
done

ROWS=("4k randread QD1|randread|1" "4k randread QD32|randread|32" "4k randwrite QD1|randwrite|1" "4k randwrite QD32|randwrite|32")
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
echo "Command: \`$invocation\` (vstor $git_rev; $(date -u '+%Y-%m-%d %H:%M UTC'); load average $LOAD_BEFORE before)"
echo
echo "| workload | no filters IOPS | 4 passthrough IOPS | ratio of medians | median of per-round ratios | per-round ratios |"
echo "|---|---:|---:|---:|---:|---|"
for row in "${ROWS[@]}"; do
    IFS='|' read -r name rw qd <<<"$row"
    [[ -z "${ONLY:-}" || "$name" == *"$ONLY"* ]] || continue
    dir=read
    [[ $rw == randwrite ]] && dir=write
    : >"$WORK/row.tsv"
    for ((round = 1; round <= ROUNDS; round++)); do
        if ((round % 2 == 1)); then order=(plain chained); else order=(chained plain); fi
        for disk in "${order[@]}"; do
            out="$WORK/$rw-$qd-$round-$disk.json"
            run_fio "$disk" "$out" --rw="$rw" --bs=4k --iodepth="$qd" --time_based --runtime="$RUNTIME" --ramp_time="$RAMP"
            iops=$(python3 -c 'import json,sys; t=open(sys.argv[1]).read(); print(json.loads(t[t.index("{"):])["jobs"][0][sys.argv[2]]["iops"])' "$out" "$dir")
            printf '%s\t%s\t%s\n' "$round" "$disk" "$iops" >>"$WORK/row.tsv"
            log "$(printf '%-18s round %d %-8s %9.0f IOPS (load %s)' "$name" "$round" "$disk" "$iops" "$(cut -d' ' -f1 /proc/loadavg)")"
        done
    done
    python3 - "$WORK/row.tsv" "$name" <<'PY'
import statistics, sys
rows = [l.split("\t") for l in open(sys.argv[1]).read().split("\n") if l]
by = {}
for r, disk, iops in rows:
    by.setdefault(disk, {})[int(r)] = float(iops)
p, c = by["plain"], by["chained"]
ratios = [c[r] / p[r] for r in sorted(p)]
mp, mc = statistics.median(p.values()), statistics.median(c.values())
print(f"| {sys.argv[2]} | {mp:,.0f} | {mc:,.0f} | {mc / mp:.3f}x | {statistics.median(ratios):.3f}x | {' '.join(f'{x:.2f}' for x in ratios)} |")
PY
done
echo
echo "Load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
