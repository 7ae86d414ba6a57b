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
# ROUNDS (default 3), ONLY (run only the workloads whose name contains it, e.g. "QD1"), WORKERS (vstor's runtime.worker_threads; default: vstor's own default), VSTOR_BIN (a vstor binary to use instead of building one).
#
# Both disks are raw, sparse files in the page cache (vstor: direct = false; qemu-storage-daemon:
# aio=io_uring, cache.direct=off), filled completely with the same data before measuring.
# The machine this runs on is shared and noisy: only figures from one run compare with each other.

set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)

# The command line as given, with the knobs that were set in the environment.
invocation=""
for var in SIZE RUNTIME RAMP ROUNDS WORKERS ONLY VSTOR_BIN; do
    if [[ -v $var ]]; then invocation+="$var=$(printf '%q' "${!var}") "; fi
done
invocation+="$0"
for arg in "$@"; do invocation+=" $(printf '%q' "$arg")"; done

SIZE=${SIZE:-1G}
RUNTIME=${RUNTIME:-4}
RAMP=${RAMP:-1}
ROUNDS=${ROUNDS:-3}
WORKERS=${WORKERS:-}

BENCH=nbd_vs_qsd
# shellcheck source=benches/lib.sh
source "$SCRIPT_DIR/lib.sh"

# --- prerequisites -------------------------------------------------------------------------------
for tool in fio qemu-storage-daemon python3; do
    command -v "$tool" >/dev/null 2>&1 ||
        die "$tool is not installed (scripts/setup.sh installs fio; qemu-storage-daemon is in Debian's qemu-system-common / qemu-utils)"
done
fio --enghelp 2>/dev/null | grep -qw nbd ||
    die "this fio ($(fio --version)) has no nbd ioengine (it needs fio built with libnbd)"
check_knobs

# --- vstor binary --------------------------------------------------------------------------------
git_rev=$(source_revision)
if [[ -n "${VSTOR_BIN:-}" ]]; then
    [[ -x "$VSTOR_BIN" ]] || die "VSTOR_BIN=$VSTOR_BIN is not an executable"
    VSTOR=$(cd "$(dirname "$VSTOR_BIN")" && pwd)/$(basename "$VSTOR_BIN")
else
    log "building vstor (cargo build --release) ..."
    (cd "$REPO_ROOT" && cargo build --release >&2) || die "cargo build --release failed"
    target_dir=$(cd "$REPO_ROOT" && cargo metadata --format-version 1 --no-deps 2>/dev/null |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])') ||
        target_dir="$REPO_ROOT/target"
    VSTOR="$target_dir/release/vstor"
    [[ -x "$VSTOR" ]] || die "no vstor binary at $VSTOR after the build"
fi

# --- work dir, daemons, cleanup ------------------------------------------------------------------
WORK=$(mktemp -d "${TMPDIR:-/tmp}/nbd-vs-qsd.XXXXXX")
install_cleanup

VSTOR_SOCK="$WORK/vstor-nbd.sock"
QSD_SOCK="$WORK/qsd.sock"
VSTOR_URI="nbd+unix:///bench?socket=$VSTOR_SOCK"
QSD_URI="nbd+unix:///bench?socket=$QSD_SOCK"

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

# --nbd-server must come before --export (the export needs a running server).
start_daemons --nbd-server "addr.type=unix,addr.path=$QSD_SOCK" \
    --export "type=nbd,id=exp0,node-name=fmt0,name=bench,writable=on"

# --- fio -----------------------------------------------------------------------------------------

# run_fio SIDE OUTFILE FIO-ARGS...: one fio run against SIDE (vstor or qsd), JSON into OUTFILE.
run_fio() {
    local side=$1 out=$2 uri
    shift 2
    if [[ $side == vstor ]]; then uri=$VSTOR_URI; else uri=$QSD_URI; fi
    check_alive
    if ! fio --name=bench --ioengine=nbd --uri="$uri" --numjobs=1 --size="$SIZE_BYTES" \
        --output-format=json --output="$out" "$@" 2>"$out.err"; then
        log "fio against $side failed (fio ${*}):"
        cat "$out.err" "$out" >&2 2>/dev/null || true
        check_alive
        die "fio against $side failed"
    fi
    if [[ -s "$out.err" ]]; then
        log "fio against $side said:"
        sed 's/^/    /' "$out.err" >&2
    fi
    check_alive
}

# Fill both disks completely with the same data, so reads hit allocated blocks and both files sit
# in the page cache the same way. A fixed seed and buffers refilled in submission order make the
# data independent of the order in which each server completes requests. The fill writes 4 KiB at
# a time, for the reason given in vhost_vs_qsd.sh: the size of the first writes decides the size of
# the page cache's folios, which the 4k write rows would otherwise measure.
FILL_ARGS=(--rw=write --bs=4k --iodepth=32 --randseed=20240601 --refill_buffers)
for side in vstor qsd; do
    log "filling $side's disk ($SIZE) ..."
    run_fio "$side" "$WORK/fill-$side.json" "${FILL_ARGS[@]}"
done
if cmp -s "$VSTOR_FILE" "$WORK/qsd.raw"; then
    log "both disk files hold the same $SIZE_BYTES bytes"
else
    log "warning: the two disk files differ after the fill"
fi

# name | rw | bs | iodepth
ROWS=(
    "4k randread QD1|randread|4k|1"
    "4k randread QD32|randread|4k|32"
    "4k randwrite QD1|randwrite|4k|1"
    "4k randwrite QD32|randwrite|4k|32"
    "128k seq read QD8|read|128k|8"
    "128k seq write QD8|write|128k|8"
)
if [[ -n "${ONLY:-}" ]]; then
    kept=()
    for row in "${ROWS[@]}"; do [[ "${row%%|*}" == *"$ONLY"* ]] && kept+=("$row"); done
    ((${#kept[@]})) || die "ONLY=$ONLY matches no workload"
    ROWS=("${kept[@]}")
fi
FIO_COMMON=(--time_based "--runtime=$RUNTIME" "--ramp_time=$RAMP")

RESULTS="$WORK/results.tsv"
: >"$RESULTS"

# Prints "IOPS MiB/s p99-µs" from one fio JSON file, for the read or write direction.
parse_fio() {
    python3 - "$1" "$2" <<'EOF'
import json, sys
path, direction = sys.argv[1], sys.argv[2]
text = open(path).read()
data = json.loads(text[text.index("{"):])  # fio may print a notice before the JSON
job = data["jobs"][0]
if job.get("error"):
    sys.exit(f"fio job error {job['error']} in {path}")
d = job[direction]
p99 = d["clat_ns"].get("percentile", {}).get("99.000000", 0) / 1000.0
print(f"{d['iops']:.1f} {d['bw'] / 1024.0:.2f} {p99:.1f}")
EOF
}

START=$(date +%s)
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
for row in "${ROWS[@]}"; do
    IFS='|' read -r name rw bs qd <<<"$row"
    case $rw in *read) direction=read ;; *) direction=write ;; esac
    for ((round = 1; round <= ROUNDS; round++)); do
        if ((round % 2 == 1)); then order=(vstor qsd); else order=(qsd vstor); fi
        for side in "${order[@]}"; do
            out="$WORK/${rw}-${bs}-qd${qd}-r${round}-${side}.json"
            run_fio "$side" "$out" "--rw=$rw" "--bs=$bs" "--iodepth=$qd" "${FIO_COMMON[@]}"
            read -r iops bw p99 < <(parse_fio "$out" "$direction") || die "cannot parse $out"
            printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$side" "$round" "$iops" "$bw" "$p99" >>"$RESULTS"
            log "$(printf '%-18s round %d %-5s %9.0f IOPS %8.1f MiB/s  p99 %8.1f µs  (load %s)' \
                "$name" "$round" "$side" "$iops" "$bw" "$p99" "$(cut -d' ' -f1 /proc/loadavg)")"
        done
    done
done
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)
ELAPSED=$(($(date +%s) - START))

# --- report --------------------------------------------------------------------------------------

echo "Command: \`$invocation\`"
echo
echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC'); host: $(nproc) CPUs, load average $LOAD_BEFORE before, $LOAD_AFTER after"
echo "- vstor $git_rev when the script started ($VSTOR); $(qemu-storage-daemon --version | head -n1); $(fio --version)"
echo "- disks: $SIZE sparse raw files, filled before measuring, in the page cache (vstor direct = false; qsd aio=io_uring, cache.direct=off)"
echo "- each run: \`fio --name=bench --ioengine=nbd --uri='nbd+unix:///bench?socket=SOCK' --rw=RW --bs=BS --iodepth=QD --numjobs=1 --size=$SIZE_BYTES --time_based --runtime=$RUNTIME --ramp_time=$RAMP --output-format=json\`"
echo "- $ROUNDS rounds per row, vstor and qsd alternating which goes first; medians per side; $ELAPSED s of measuring"
echo
python3 - "$RESULTS" <<'EOF'
import statistics, sys
rows, data = [], {}
for line in open(sys.argv[1]):
    name, side, _round, iops, bw, p99 = line.rstrip("\n").split("\t")
    if name not in rows:
        rows.append(name)
    data.setdefault((name, side), []).append((float(iops), float(bw), float(p99)))

def med(name, side, i):
    return statistics.median(v[i] for v in data[(name, side)])

print("| workload | vstor IOPS | qsd IOPS | ratio (vstor/qsd) | vstor p99 µs | qsd p99 µs | vstor MiB/s | qsd MiB/s |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
for name in rows:
    vi, qi = med(name, "vstor", 0), med(name, "qsd", 0)
    ratio = f"{vi / qi:.2f}x" if qi else "n/a"
    print(f"| {name} | {vi:,.0f} | {qi:,.0f} | {ratio} | {med(name, 'vstor', 2):,.1f} | {med(name, 'qsd', 2):,.1f}"
          f" | {med(name, 'vstor', 1):,.1f} | {med(name, 'qsd', 1):,.1f} |")
EOF
