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
# instead of building one), LOAD_BIN (a vhost_blk_load binary to use instead of building one).
#
# Both disks are raw, sparse files in the page cache (vstor: direct = false; qemu-storage-daemon:
# aio=io_uring, cache.direct=off), filled completely with the same data before measuring; both
# exports offer 2 queues. The machine this runs on is shared and noisy: only figures from one run
# compare with each other.

set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)

# The command line as given, with the knobs that were set in the environment.
invocation=""
for var in SIZE RUNTIME RAMP ROUNDS WORKERS ONLY VSTOR_BIN LOAD_BIN; do
    if [[ -v $var ]]; then invocation+="$var=$(printf '%q' "${!var}") "; fi
done
invocation+="$0"
for arg in "$@"; do invocation+=" $(printf '%q' "$arg")"; done

SIZE=${SIZE:-1G}
RUNTIME=${RUNTIME:-4}
RAMP=${RAMP:-1}
ROUNDS=${ROUNDS:-3}
WORKERS=${WORKERS:-}
NUM_QUEUES=2   # queues both exports offer

BENCH=vhost_vs_qsd
# shellcheck source=benches/lib.sh
source "$SCRIPT_DIR/lib.sh"

# --- prerequisites -------------------------------------------------------------------------------
for tool in qemu-storage-daemon python3 timeout cmp; do
    command -v "$tool" >/dev/null 2>&1 ||
        die "$tool is not installed (qemu-storage-daemon is in Debian's qemu-system-common / qemu-utils)"
done
if [[ -z "${VSTOR_BIN:-}" || -z "${LOAD_BIN:-}" ]]; then
    command -v cargo >/dev/null 2>&1 || die "cargo is not installed (or give VSTOR_BIN and LOAD_BIN)"
fi
check_knobs

# --- binaries ------------------------------------------------------------------------------------
git_rev=$(source_revision)

abs_exe() {
    local var=$1 path=$2
    [[ -x "$path" && -f "$path" ]] || die "$var=$path is not an executable"
    echo "$(cd "$(dirname "$path")" && pwd)/$(basename "$path")"
}

if [[ -n "${LOAD_BIN:-}" ]]; then
    LOAD=$(abs_exe LOAD_BIN "$LOAD_BIN")
else
    log "building the load generator (cargo bench --bench vhost_blk_load --no-run) ..."
    # The JSON messages name the built executable; diagnostics still go to the terminal.
    LOAD=$(cd "$REPO_ROOT" &&
        cargo bench --bench vhost_blk_load --no-run --message-format=json-render-diagnostics |
        python3 -c '
import json, sys
exe = None
for line in sys.stdin:
    try:
        msg = json.loads(line)
    except ValueError:
        continue
    if msg.get("reason") == "compiler-artifact" and msg.get("target", {}).get("name") == "vhost_blk_load" \
            and msg.get("executable"):
        exe = msg["executable"]
if not exe:
    sys.exit("no vhost_blk_load executable in cargo'"'"'s output")
print(exe)
') || die "cargo bench --bench vhost_blk_load --no-run failed"
    [[ -x "$LOAD" ]] || die "no load generator at $LOAD after the build"
fi

if [[ -n "${VSTOR_BIN:-}" ]]; then
    VSTOR=$(abs_exe VSTOR_BIN "$VSTOR_BIN")
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
WORK=$(mktemp -d "${TMPDIR:-/tmp}/vhost-vs-qsd.XXXXXX")
install_cleanup

VSTOR_SOCK="$WORK/vstor-vhost.sock"
QSD_SOCK="$WORK/qsd-vhost.sock"

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
socket = "$VSTOR_SOCK"
num_queues = $NUM_QUEUES
EOF

start_daemons --export \
    "type=vhost-user-blk,id=exp0,node-name=fmt0,addr.type=unix,addr.path=$QSD_SOCK,writable=on,num-queues=$NUM_QUEUES"

# --- load ----------------------------------------------------------------------------------------

# run_load SIDE OUTFILE LIMIT ARGS...: one load generator run against SIDE (vstor or qsd), its JSON
# line into OUTFILE; killed (and the script stopped) if it takes more than LIMIT seconds.
run_load() {
    local side=$1 out=$2 limit=$3 sock logfile rc=0
    shift 3
    if [[ $side == vstor ]]; then sock=$VSTOR_SOCK logfile=$WORK/vstor.log; else sock=$QSD_SOCK logfile=$WORK/qsd.log; fi
    check_alive
    timeout -k 5 "$limit" "$LOAD" --socket "$sock" --seed 20240601 "$@" >"$out" 2>"$out.err" || rc=$?
    if ((rc != 0)); then
        if ((rc == 124 || rc == 137)); then
            log "the load generator against $side did not finish within $limit s (vhost_blk_load $*): a hang"
        else
            log "the load generator against $side failed with status $rc (vhost_blk_load $*):"
        fi
        sed 's/^/    /' "$out.err" "$out" >&2 2>/dev/null || true
        check_alive
        daemon_failed "$side" "$logfile" "the load generator failed against it"
    fi
    if [[ -s "$out.err" ]]; then
        log "the load generator against $side said:"
        sed 's/^/    /' "$out.err" >&2
    fi
    check_alive
}

# Fill both disks completely with the same data, so reads hit allocated blocks and both files sit
# in the page cache the same way. --refill makes every block's bytes depend only on the seed and
# its offset, not on the order in which each server completes requests.
#
# The fill writes 4 KiB at a time: the size of the writes that first bring a file's pages into the
# page cache decides the size of its folios (kernel 6.18, ext4), and a later 4 KiB write into a
# large folio costs the kernel about three times one into a 4 KiB folio. Filling in large writes
# would make the 4k write rows measure how each server happened to fill its file.
FILL_ARGS=(--rw write --bs 4096 --iodepth 32 --queues 1 --once --refill)
FILL_LIMIT=$((60 + SIZE_BYTES / 1048576 / 4))   # generous: 4 MiB/s would still finish
for side in vstor qsd; do
    log "filling $side's disk ($SIZE) ..."
    run_load "$side" "$WORK/fill-$side.json" "$FILL_LIMIT" "${FILL_ARGS[@]}"
    log "    $(cat "$WORK/fill-$side.json")"
done
if cmp -s "$VSTOR_FILE" "$WORK/qsd.raw"; then
    log "both disk files hold the same $SIZE_BYTES bytes"
else
    log "warning: the two disk files differ after the fill: $(cmp "$VSTOR_FILE" "$WORK/qsd.raw" 2>&1 | head -n1)"
fi

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
if [[ -n "${ONLY:-}" ]]; then
    kept=()
    for row in "${ROWS[@]}"; do [[ "${row%%|*}" == *"$ONLY"* ]] && kept+=("$row"); done
    ((${#kept[@]})) || die "ONLY=$ONLY matches no workload"
    ROWS=("${kept[@]}")
fi
RUN_LIMIT=$((RUNTIME + RAMP + 60))

RESULTS="$WORK/results.tsv"
: >"$RESULTS"

# Prints "IOPS MiB/s p50-µs p99-µs errors" from one JSON line of the load generator.
parse_load() {
    python3 - "$1" <<'EOF'
import json, sys
lines = [l for l in open(sys.argv[1]) if l.lstrip().startswith("{")]
if not lines:
    sys.exit(f"no JSON line in {sys.argv[1]}")
d = json.loads(lines[-1])
print(f"{d['iops']:.1f} {d['mib_s']:.2f} {d['p50_us']:.1f} {d['p99_us']:.1f} {d['errors']}")
EOF
}

START=$(date +%s)
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
for row in "${ROWS[@]}"; do
    IFS='|' read -r name rw bs qd queues <<<"$row"
    for ((round = 1; round <= ROUNDS; round++)); do
        if ((round % 2 == 1)); then order=(vstor qsd); else order=(qsd vstor); fi
        for side in "${order[@]}"; do
            out="$WORK/${rw}-${bs}-qd${qd}-q${queues}-r${round}-${side}.json"
            run_load "$side" "$out" "$RUN_LIMIT" --rw "$rw" --bs "$bs" --iodepth "$qd" --queues "$queues" \
                --runtime "$RUNTIME" --ramp "$RAMP"
            read -r iops bw p50 p99 errors < <(parse_load "$out") || die "cannot parse $out"
            printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$side" "$round" "$iops" "$bw" "$p50" "$p99" >>"$RESULTS"
            log "$(printf '%-20s round %d %-5s %9.0f IOPS %8.1f MiB/s  p50 %7.1f µs  p99 %8.1f µs  (load %s)' \
                "$name" "$round" "$side" "$iops" "$bw" "$p50" "$p99" "$(cut -d' ' -f1 /proc/loadavg)")"
        done
    done
done
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)
ELAPSED=$(($(date +%s) - START))

# --- report --------------------------------------------------------------------------------------

echo "Command: \`$invocation\`"
echo
echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC'); host: $(nproc) CPUs, load average $LOAD_BEFORE before, $LOAD_AFTER after"
echo "- vstor $git_rev when the script started ($VSTOR, runtime.worker_threads ${WORKERS:-default}); $(qemu-storage-daemon --version | head -n1)"
echo "- disks: $SIZE sparse raw files, filled before measuring, in the page cache (vstor direct = false; qsd aio=io_uring, cache.direct=off); both exports offer $NUM_QUEUES queues"
echo "- each run: \`vhost_blk_load --socket SOCK --rw RW --bs BS --iodepth QD --queues Q --runtime $RUNTIME --ramp $RAMP --seed 20240601\` (libblkio virtio-blk-vhost-user, one thread per queue, QD per queue, offsets over the whole disk)"
echo "- $ROUNDS rounds per row, vstor and qsd alternating which goes first; medians per side; $ELAPSED s of measuring"
echo
python3 - "$RESULTS" <<'EOF'
import statistics, sys
rows, data = [], {}
for line in open(sys.argv[1]):
    name, side, _round, iops, bw, p50, p99 = line.rstrip("\n").split("\t")
    if name not in rows:
        rows.append(name)
    data.setdefault((name, side), []).append((float(iops), float(bw), float(p50), float(p99)))

def med(name, side, i):
    return statistics.median(v[i] for v in data[(name, side)])

print("| workload | vstor IOPS | qsd IOPS | ratio (vstor/qsd) | vstor p50 µs | qsd p50 µs"
      " | vstor p99 µs | qsd p99 µs | vstor MiB/s | qsd MiB/s |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for name in rows:
    vi, qi = med(name, "vstor", 0), med(name, "qsd", 0)
    ratio = f"{vi / qi:.2f}x" if qi else "n/a"
    print(f"| {name} | {vi:,.0f} | {qi:,.0f} | {ratio}"
          f" | {med(name, 'vstor', 2):,.1f} | {med(name, 'qsd', 2):,.1f}"
          f" | {med(name, 'vstor', 3):,.1f} | {med(name, 'qsd', 3):,.1f}"
          f" | {med(name, 'vstor', 1):,.1f} | {med(name, 'qsd', 1):,.1f} |")
EOF
