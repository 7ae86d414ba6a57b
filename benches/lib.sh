# shellcheck shell=bash
# Shared plumbing of the benchmark scripts (sourced, not run): knobs, the load-average gate, the
# binaries, the work directory and its cleanup, daemons, fio and load-generator runs, and the
# results file that benches/table.py turns into the report. A script goes:
#
#   source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
#   bench_init NAME "$@"          # --help, the command line, the load average at the start
#   knob SIZE 1G; knob ROUNDS 3   # each knob: recorded if set, else its default
#   bench_start                   # checks the knobs, refuses to run under load, the revision
#   build_vstor; make_workdir NAME; start_daemon ...; measuring_starts
#   record WORKLOAD SIDE ROUND iops=... p99=...     # once per run
#   bench_table COLUMN...         # header and Markdown table on stdout
#
# Knobs every script has: ALLOW_LOAD=1 runs even when the 1-minute load average is above MAX_LOAD
# (default: half the CPUs), and says so in the report; KEEP_WORK=1 keeps the work directory.

BENCH_LIB_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$BENCH_LIB_DIR/.." && pwd)

die() { echo "${BENCH:-bench}: $*" >&2; exit 1; }
log() { echo "$*" >&2; }

# ---- command line, knobs, load average ------------------------------------------------------

# bench_init NAME ARGS...: answers --help with the script's header comment; the scripts take no
# arguments, only knobs in the environment.
bench_init() {
    BENCH=$1
    shift
    KNOBS=()
    KNOBS_SET=()
    BENCH_NOTES=()
    BENCH_T0=$SECONDS
    # Under set -e a failing command stops the script; this says which one did.
    set -E
    trap 'log "$BENCH: stopped: status $? at ${BASH_SOURCE[0]##*/}:$LINENO: $BASH_COMMAND"' ERR
    case "${1:-}" in
        "") ;;
        -h | --help)
            awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
            exit 0
            ;;
        *) die "takes no arguments, only knobs in the environment (see $0 --help)" ;;
    esac
    knob ALLOW_LOAD ""
    knob MAX_LOAD "$(awk -v n="$(nproc)" 'BEGIN { printf "%.1f", n / 2 }')"
    knob KEEP_WORK ""
}

# knob NAME DEFAULT: a setting read from the environment; the report's command line names the
# ones that were set, and lists the values of all.
knob() {
    KNOBS+=("$1")
    if [[ -v $1 ]]; then
        KNOBS_SET+=("$1=$(printf '%q' "${!1}")")
    else
        printf -v "$1" '%s' "$2"
    fi
}

has_knob() { [[ " ${KNOBS[*]} " == *" $1 "* ]]; }

# The command line as given: the knobs that were set, then the script.
bench_command() {
    local cmd="${KNOBS_SET[*]}"
    echo "${cmd}${cmd:+ }$0"
}

# note TEXT: a line of the report's header, saying how the figures were taken.
note() { BENCH_NOTES+=("$1"); }

loadavg() { cut -d' ' -f1-3 /proc/loadavg; }
load1() { cut -d' ' -f1 /proc/loadavg; }

# check_load WHEN: a 1-minute load average above MAX_LOAD means the figures would measure the other
# load as much as vstor. Refuses at the start unless ALLOW_LOAD=1; later only warns (the run's own
# build or fill may be what raised it). Either way the report says so.
check_load() {
    local when=$1 now
    now=$(load1)
    awk -v a="$now" -v b="$MAX_LOAD" 'BEGIN { exit !(a > b) }' || return 0
    if [[ $when == "at the start" && "$ALLOW_LOAD" != 1 ]]; then
        die "the 1-minute load average is $now, above MAX_LOAD=$MAX_LOAD ($(nproc) CPUs): figures taken now" \
            "would measure the other load, not vstor. Wait for a quiet machine, or run anyway with ALLOW_LOAD=1" \
            "(the report will say so)."
    fi
    BENCH_LOADED=1
    log "!!!!!!!! $BENCH: the 1-minute load average is $now $when, above MAX_LOAD=$MAX_LOAD:" \
        "these figures are taken under load !!!!!!!!"
}

# bench_start: checks the knobs, the load average and the tools every script needs, and takes the
# source revision (before building: another engineer may commit while the run goes on).
bench_start() {
    BENCH_LOADED=""
    LOAD_START=$(loadavg)
    require python3 awk
    check_knobs
    check_load "at the start"
    BENCH_REV=$(source_revision)
}

# measuring_starts: the load average and time when the measuring begins (after builds and fills).
measuring_starts() {
    LOAD_MEASURE=$(loadavg)
    check_load "when measuring begins"
    MEASURE_T0=$SECONDS
}

# Checks the knobs a script has among ALLOW_LOAD, MAX_LOAD, ROUNDS, RUNTIME, RAMP, WORKERS and SIZE,
# and sets SIZE_BYTES from SIZE (binary units, as vstor's config reads them: 1G = 1 GiB).
check_knobs() {
    [[ "$ALLOW_LOAD" =~ ^[01]?$ ]] || die "ALLOW_LOAD must be 1 (or 0), got '$ALLOW_LOAD'"
    [[ "$MAX_LOAD" =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "MAX_LOAD must be a number, got '$MAX_LOAD'"
    ! has_knob ROUNDS || [[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]] || die "ROUNDS must be a positive integer, got '$ROUNDS'"
    ! has_knob RUNTIME || [[ "$RUNTIME" =~ ^[1-9][0-9]*$ ]] ||
        die "RUNTIME must be a positive number of seconds, got '$RUNTIME'"
    ! has_knob RAMP || [[ "$RAMP" =~ ^[0-9]+$ ]] || die "RAMP must be a number of seconds, got '$RAMP'"
    ! has_knob WORKERS || [[ "$WORKERS" =~ ^([1-9][0-9]*)?$ ]] || die "WORKERS must be a positive integer, got '$WORKERS'"
    has_knob SIZE || return 0
    SIZE_BYTES=$(python3 - "$SIZE" <<'PY'
import re, sys
m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(i?B)?\s*", sys.argv[1], re.I)
if not m:
    sys.exit(f"SIZE {sys.argv[1]!r} is not a size like 1G or 512M")
print(int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}[m.group(2).upper()])
PY
) || die "bad SIZE"
    ((SIZE_BYTES >= 1048576 && SIZE_BYTES % 1048576 == 0)) || die "SIZE must be a whole number of MiB, at least 1M"
}

# require TOOL...: stops the run naming the first tool that is not installed.
require() {
    local tool
    for tool in "$@"; do
        command -v "$tool" >/dev/null 2>&1 || die "$tool is not installed (scripts/setup.sh installs what the benchmarks need)"
    done
}

require_fio_nbd() {
    require fio
    fio --enghelp 2>/dev/null | grep -qw nbd ||
        die "this fio ($(fio --version)) has no nbd ioengine (it needs fio built with libnbd)"
}

# The revision of the source tree (the binary's, unless VSTOR_BIN names another build).
source_revision() {
    local rev
    rev=$(cd "$REPO_ROOT" && git rev-parse --short HEAD 2>/dev/null || echo unknown)
    if [[ -n "$(cd "$REPO_ROOT" && git status --porcelain -- . ':!benches' ':!*.md' 2>/dev/null)" ]]; then
        rev+=" (with uncommitted changes to the source)"
    fi
    echo "$rev"
}

# ---- binaries -----------------------------------------------------------------------------------

abs_exe() {
    local var=$1 path=$2
    [[ -x "$path" && -f "$path" ]] || die "$var=$path is not an executable"
    echo "$(cd "$(dirname "$path")" && pwd)/$(basename "$path")"
}

# build_vstor: sets VSTOR to VSTOR_BIN, or to a release build of this checkout.
build_vstor() {
    if [[ -n "${VSTOR_BIN:-}" ]]; then
        VSTOR=$(abs_exe VSTOR_BIN "$VSTOR_BIN")
        return
    fi
    require cargo
    log "building vstor (cargo build --release) ..."
    (cd "$REPO_ROOT" && cargo build --release >&2) || die "cargo build --release failed"
    local target_dir
    target_dir=$(cd "$REPO_ROOT" && cargo metadata --format-version 1 --no-deps 2>/dev/null |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])') ||
        target_dir="$REPO_ROOT/target"
    VSTOR="$target_dir/release/vstor"
    [[ -x "$VSTOR" ]] || die "no vstor binary at $VSTOR after the build"
}

# build_load: sets LOAD to LOAD_BIN, or to a build of the libblkio load generator
# (benches/vhost_blk_load.rs, bench profile).
build_load() {
    if [[ -n "${LOAD_BIN:-}" ]]; then
        LOAD=$(abs_exe LOAD_BIN "$LOAD_BIN")
        return
    fi
    require cargo
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
}

# ---- work directory, daemons, cleanup ---------------------------------------------------------

DAEMON_PIDS=()
DAEMON_NAMES=()
DAEMON_LOGS=()
CLEANUP_HOOKS=()
WORK=""

# make_workdir NAME [BASE]: creates WORK (under BASE, default $TMPDIR or /tmp) with an empty
# RESULTS file in it, and sets the traps that stop the daemons and remove it at exit.
make_workdir() {
    WORK=$(mktemp -d "${2:-${TMPDIR:-/tmp}}/$1.XXXXXX")
    RESULTS="$WORK/results.tsv"
    : >"$RESULTS"
    trap cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
}

# on_cleanup FUNCTION: runs FUNCTION at exit, before the daemons are stopped (unmounting, say).
on_cleanup() { CLEANUP_HOOKS+=("$1"); }

cleanup() {
    local hook i
    for hook in "${CLEANUP_HOOKS[@]}"; do "$hook" || true; done
    for i in "${!DAEMON_PIDS[@]}"; do kill "${DAEMON_PIDS[$i]}" 2>/dev/null || true; done
    for i in "${!DAEMON_PIDS[@]}"; do stop_daemon "${DAEMON_PIDS[$i]}"; done
    [[ -n "$WORK" ]] || return 0
    if [[ -n "$KEEP_WORK" ]]; then log "kept $WORK"; else rm -rf "$WORK"; fi
}

# start_daemon NAME LOGFILE COMMAND...: starts COMMAND in the background (its output in LOGFILE),
# stopped at exit; sets DAEMON_PID.
start_daemon() {
    local name=$1 logfile=$2
    shift 2
    log "starting $name: $*"
    "$@" >"$logfile" 2>&1 &
    DAEMON_PID=$!
    DAEMON_PIDS+=("$DAEMON_PID")
    DAEMON_NAMES+=("$name")
    DAEMON_LOGS+=("$logfile")
}

# stop_daemon PID [GRACE]: waits up to GRACE seconds (default 0) for the daemon to exit on its own,
# then TERM, then KILL after 5 s.
stop_daemon() {
    local pid=$1 grace=${2:-0} i
    for _ in $(seq $((grace * 10))); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    for i in "${!DAEMON_PIDS[@]}"; do
        [[ ${DAEMON_PIDS[$i]} != "$pid" ]] || unset "DAEMON_PIDS[$i]" "DAEMON_NAMES[$i]" "DAEMON_LOGS[$i]"
    done
}

# Shows what a daemon said and stops the run.
daemon_failed() {
    local name=$1 logfile=$2
    log "---- last lines of the $name log ($logfile) ----"
    tail -n 40 "$logfile" >&2 || true
    die "$name: $3"
}

# check_alive: stops the run if a daemon has gone.
check_alive() {
    local i
    for i in "${!DAEMON_PIDS[@]}"; do
        kill -0 "${DAEMON_PIDS[$i]}" 2>/dev/null || daemon_failed "${DAEMON_NAMES[$i]}" "${DAEMON_LOGS[$i]}" "the daemon died"
    done
}

show_daemon_logs() {
    local i
    for i in "${!DAEMON_PIDS[@]}"; do
        log "---- last lines of the ${DAEMON_NAMES[$i]} log (${DAEMON_LOGS[$i]}) ----"
        tail -n 20 "${DAEMON_LOGS[$i]}" >&2 || true
    done
}

# wait_for PID SECONDS WHAT COMMAND...: polls COMMAND every 10 ms until it succeeds; stops the run
# with the daemon's log if the daemon (started by start_daemon as PID) exits first or SECONDS pass.
wait_for() {
    local pid=$1 limit=$2 what=$3 i name=daemon logfile=/dev/null
    shift 3
    for i in "${!DAEMON_PIDS[@]}"; do
        [[ ${DAEMON_PIDS[$i]} != "$pid" ]] || { name=${DAEMON_NAMES[$i]}; logfile=${DAEMON_LOGS[$i]}; }
    done
    for _ in $(seq $((limit * 100))); do
        "$@" 2>/dev/null && return 0
        kill -0 "$pid" 2>/dev/null || daemon_failed "$name" "$logfile" "exited before $what"
        sleep 0.01
    done
    daemon_failed "$name" "$logfile" "no $what after $limit s"
}

# start_vstor SOCKET...: starts `vstor serve` on $WORK/vstor.toml and waits for its sockets; sets
# VSTOR_PID.
start_vstor() {
    local sock
    start_daemon vstor "$WORK/vstor.log" "$VSTOR" serve --config "$WORK/vstor.toml"
    VSTOR_PID=$DAEMON_PID
    for sock in "$@"; do wait_for "$VSTOR_PID" 30 "its socket $sock" test -S "$sock"; done
}

# start_qsd SOCKET EXPORT-ARGS...: starts qemu-storage-daemon on a sparse raw file of SIZE
# ($WORK/qsd.raw, page cache, io_uring) with the given export arguments and waits for SOCKET.
start_qsd() {
    local sock=$1
    shift
    truncate -s "$SIZE_BYTES" "$WORK/qsd.raw"
    start_daemon qemu-storage-daemon "$WORK/qsd.log" qemu-storage-daemon \
        --blockdev "driver=file,node-name=file0,filename=$WORK/qsd.raw,aio=io_uring,cache.direct=off" \
        --blockdev "driver=raw,node-name=fmt0,file=file0" "$@"
    wait_for "$DAEMON_PID" 30 "its socket $sock" test -S "$sock"
}

# vstor_disk_file: the file of vstor's only raw disk, checked to be SIZE bytes.
vstor_disk_file() {
    local files
    shopt -s nullglob
    files=("$WORK"/vstor/disks/*.raw)
    shopt -u nullglob
    ((${#files[@]} == 1)) || die "expected one disk file under $WORK/vstor/disks, found ${#files[@]}"
    [[ $(stat -c %s "${files[0]}") == "$SIZE_BYTES" ]] ||
        die "vstor's disk file ${files[0]} is $(stat -c %s "${files[0]}") bytes, expected $SIZE_BYTES"
    echo "${files[0]}"
}

# same_data FILE FILE: says whether the fills left both disks with the same bytes.
same_data() {
    if cmp -s "$1" "$2"; then
        log "both disk files hold the same $(stat -c %s "$1") bytes"
    else
        log "warning: the two disk files differ after the fill: $(cmp "$1" "$2" 2>&1 | head -n1)"
    fi
}

# ---- workloads and runs -------------------------------------------------------------------------

# select_rows: keeps the ROWS ("name|...") whose name contains ONLY, when ONLY is set.
select_rows() {
    [[ -n "${ONLY:-}" ]] || return 0
    local row kept=()
    for row in "${ROWS[@]}"; do [[ "${row%%|*}" == *"$ONLY"* ]] && kept+=("$row"); done
    ((${#kept[@]})) || die "ONLY=$ONLY matches no workload"
    ROWS=("${kept[@]}")
}

# round_order ROUND A B: "A B" in odd rounds, "B A" in even ones, so neither side always goes first.
round_order() { if (($1 % 2 == 1)); then echo "$2 $3"; else echo "$3 $2"; fi; }

# fio_run LABEL URI OUTFILE FIO-ARGS...: one fio run (nbd engine, one job over the whole disk) against
# LABEL's export, its JSON in OUTFILE.
fio_run() {
    local label=$1 uri=$2 out=$3
    shift 3
    check_alive
    if ! fio --name=bench --ioengine=nbd --uri="$uri" --numjobs=1 --size="$SIZE_BYTES" \
        --output-format=json --output="$out" "$@" 2>"$out.err"; then
        log "fio against $label failed (fio ${*}):"
        cat "$out.err" "$out" >&2 2>/dev/null || true
        check_alive
        die "fio against $label failed"
    fi
    if [[ -s "$out.err" ]]; then
        log "fio against $label said:"
        sed 's/^/    /' "$out.err" >&2
    fi
    check_alive
}

# fio_figures OUTFILE DIRECTION: prints "IOPS MiB/s p50-µs p99-µs" (completion latency) of one fio
# run, for the read or write direction.
fio_figures() {
    python3 - "$1" "$2" <<'PY' || die "cannot read fio's figures from $1"
import json, sys
path, direction = sys.argv[1], sys.argv[2]
text = open(path).read()
data = json.loads(text[text.index("{"):])  # fio may print a notice before the JSON
job = data["jobs"][0]
if job.get("error"):
    sys.exit(f"fio job error {job['error']} in {path}")
d = job[direction]
pct = d["clat_ns"].get("percentile", {})
print(f"{d['iops']:.1f} {d['bw'] / 1024.0:.2f} {pct.get('50.000000', 0) / 1000.0:.1f} {pct.get('99.000000', 0) / 1000.0:.1f}")
PY
}

# load_run LABEL SOCKET OUTFILE LIMIT ARGS...: one run of the load generator ($LOAD) against the
# vhost-user socket of LABEL, its JSON line in OUTFILE; a run that takes more than LIMIT seconds is
# killed and stops the script as a hang.
load_run() {
    local label=$1 sock=$2 out=$3 limit=$4 rc=0
    shift 4
    check_alive
    timeout -k 5 "$limit" "$LOAD" --socket "$sock" --seed 20240601 "$@" >"$out" 2>"$out.err" || rc=$?
    if ((rc != 0)); then
        if ((rc == 124 || rc == 137)); then
            log "the load generator against $label did not finish within $limit s (vhost_blk_load $*): a hang"
        else
            log "the load generator against $label failed with status $rc (vhost_blk_load $*):"
        fi
        sed 's/^/    /' "$out.err" "$out" >&2 2>/dev/null || true
        check_alive
        show_daemon_logs
        die "the load generator failed against $label"
    fi
    if [[ -s "$out.err" ]]; then
        log "the load generator against $label said:"
        sed 's/^/    /' "$out.err" >&2
    fi
    check_alive
}

# load_figures OUTFILE: prints "IOPS MiB/s p50-µs p99-µs" of one load generator run; a run that saw
# I/O errors stops the script.
load_figures() {
    python3 - "$1" <<'PY' || die "cannot read the load generator's figures from $1"
import json, sys
lines = [l for l in open(sys.argv[1]) if l.lstrip().startswith("{")]
if not lines:
    sys.exit(f"no JSON line in {sys.argv[1]}")
d = json.loads(lines[-1])
if d["errors"]:
    sys.exit(f"{d['errors']} I/O errors in {sys.argv[1]}")
print(f"{d['iops']:.1f} {d['mib_s']:.2f} {d['p50_us']:.1f} {d['p99_us']:.1f}")
PY
}

# ---- results and the report ---------------------------------------------------------------------

# record WORKLOAD SIDE ROUND METRIC=VALUE...: appends the figures of one run to RESULTS, a line
# "workload side round metric value" (tab-separated) per figure, and logs them.
record() {
    local workload=$1 side=$2 round=$3 kv
    shift 3
    for kv in "$@"; do
        [[ "$kv" =~ ^[a-z0-9_]+=-?[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?$ ]] ||
            die "record: '$kv' is not METRIC=NUMBER ($workload, $side, round $round)"
        printf '%s\t%s\t%s\t%s\t%s\n' "$workload" "$side" "$round" "${kv%%=*}" "${kv#*=}" >>"$RESULTS"
    done
    log "$(printf '%-20s round %-2s %-8s %s  (load %s)' "$workload" "$round" "$side" "$*" "$(load1)")"
}

# bench_table [table.py OPTIONS] COLUMN...: prints the report on stdout: the header (command line,
# date, revision, knobs, load average at the start, when measuring began and at the end, the
# script's notes), then the table of medians and ratios (see benches/table.py).
bench_table() {
    local args=(--command "$(bench_command)" --revision "$BENCH_REV when the script started (${VSTOR:-no binary})"
        --load-start "$LOAD_START" --load-measure "${LOAD_MEASURE:-$LOAD_START}" --load-end "$(loadavg)"
        --max-load "$MAX_LOAD" --elapsed $((SECONDS - BENCH_T0)) --measured $((SECONDS - ${MEASURE_T0:-$BENCH_T0})))
    local k knobs=""
    check_load "at the end"
    [[ -z "$BENCH_LOADED" ]] || args+=(--loaded)
    for k in "${KNOBS[@]}"; do [[ -z "${!k}" ]] || knobs+="$k=${!k} "; done
    args+=(--note "knobs: ${knobs% }")
    for k in "${BENCH_NOTES[@]}"; do args+=(--note "$k"); done
    python3 "$BENCH_LIB_DIR/table.py" "$RESULTS" "${args[@]}" "$@" || die "table.py failed on $RESULTS"
}

# more_table [table.py OPTIONS] COLUMN...: a further table of the same run, without the header.
more_table() {
    echo
    python3 "$BENCH_LIB_DIR/table.py" "$RESULTS" "$@" || die "table.py failed on $RESULTS"
}
