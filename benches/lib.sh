# Shared plumbing of the side-by-side benchmark scripts (sourced, not run). The sourcing script sets
# BENCH (its name, for messages), SIZE, ROUNDS, RUNTIME, RAMP and REPO_ROOT first, and WORK,
# VSTOR_PID and QSD_PID as it starts its two daemons.

die() { echo "$BENCH: $*" >&2; exit 1; }
log() { echo "$*" >&2; }

# Checks the knobs every script shares and sets SIZE_BYTES from SIZE (binary units, as vstor's
# config reads them: 1G = 1 GiB).
check_knobs() {
    [[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]] || die "ROUNDS must be a positive integer, got '$ROUNDS'"
    [[ "$RUNTIME" =~ ^[1-9][0-9]*$ ]] || die "RUNTIME must be a positive number of seconds, got '$RUNTIME'"
    [[ "$RAMP" =~ ^[0-9]+$ ]] || die "RAMP must be a number of seconds, got '$RAMP'"
    [[ -z "${WORKERS:-}" || "$WORKERS" =~ ^[1-9][0-9]*$ ]] || die "WORKERS must be a positive integer, got '$WORKERS'"
    SIZE_BYTES=$(python3 - "$SIZE" <<'PY'
import re, sys
m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(i?B)?\s*", sys.argv[1], re.I)
if not m:
    sys.exit(f"SIZE {sys.argv[1]!r} is not a size like 1G or 512M")
print(int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}[m.group(2).upper()])
PY
) || die "bad SIZE"
    (( SIZE_BYTES >= 1048576 && SIZE_BYTES % 1048576 == 0 )) || die "SIZE must be a whole number of MiB, at least 1M"
}

# The source revision the vstor binary is built from, taken before building (another engineer may
# commit while a run is going on).
source_revision() {
    local rev
    rev=$(cd "$REPO_ROOT" && git rev-parse --short HEAD 2>/dev/null || echo unknown)
    if [[ -n "$(cd "$REPO_ROOT" && git status --porcelain -- vdisk src Cargo.toml Cargo.lock 2>/dev/null)" ]]; then
        rev+=" (with uncommitted changes in vdisk/, src/ or Cargo.*)"
    fi
    echo "$rev"
}

# Stops both daemons (TERM, then KILL after 5 s) and removes the work directory; set as the EXIT
# trap by `install_cleanup`.
cleanup() {
    local pid
    for pid in "$VSTOR_PID" "$QSD_PID"; do
        if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
            kill "$pid" 2>/dev/null || true
        fi
    done
    for pid in "$VSTOR_PID" "$QSD_PID"; do
        [[ -n "$pid" ]] || continue
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$WORK"
}

install_cleanup() {
    VSTOR_PID=""
    QSD_PID=""
    trap cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
}

# Shows what a daemon said and stops, when it is gone or never came up.
daemon_failed() {
    local name=$1 logfile=$2
    log "---- last lines of the $name log ($logfile) ----"
    tail -n 40 "$logfile" >&2 || true
    die "$name: $3"
}

# wait_for_socket NAME PID SOCKET LOGFILE: waits up to 30 s for a daemon's socket.
wait_for_socket() {
    local name=$1 pid=$2 sock=$3 logfile=$4
    for _ in $(seq 300); do
        [[ -S "$sock" ]] && return 0
        kill -0 "$pid" 2>/dev/null || daemon_failed "$name" "$logfile" "exited before its socket $sock appeared"
        sleep 0.1
    done
    daemon_failed "$name" "$logfile" "no socket at $sock after 30 s"
}

check_alive() {
    kill -0 "$VSTOR_PID" 2>/dev/null || daemon_failed vstor "$WORK/vstor.log" "the daemon died"
    kill -0 "$QSD_PID" 2>/dev/null || daemon_failed qemu-storage-daemon "$WORK/qsd.log" "the daemon died"
}

# start_daemons QSD-EXPORT-ARGS...: starts vstor on $WORK/vstor.toml (listening on $VSTOR_SOCK)
# and qemu-storage-daemon on an equal sparse raw file with the given export arguments (listening
# on $QSD_SOCK), waits for both sockets, and sets VSTOR_FILE to vstor's disk file.
start_daemons() {
    log "starting vstor: $VSTOR serve --config $WORK/vstor.toml"
    "$VSTOR" serve --config "$WORK/vstor.toml" >"$WORK/vstor.log" 2>&1 &
    VSTOR_PID=$!
    wait_for_socket vstor "$VSTOR_PID" "$VSTOR_SOCK" "$WORK/vstor.log"

    truncate -s "$SIZE_BYTES" "$WORK/qsd.raw"
    local qsd=(qemu-storage-daemon
        --blockdev "driver=file,node-name=file0,filename=$WORK/qsd.raw,aio=io_uring,cache.direct=off"
        --blockdev "driver=raw,node-name=fmt0,file=file0"
        "$@")
    log "starting qemu-storage-daemon: ${qsd[*]}"
    "${qsd[@]}" >"$WORK/qsd.log" 2>&1 &
    QSD_PID=$!
    wait_for_socket qemu-storage-daemon "$QSD_PID" "$QSD_SOCK" "$WORK/qsd.log"

    local files
    shopt -s nullglob
    files=("$WORK"/vstor/disks/*.raw)
    shopt -u nullglob
    (( ${#files[@]} == 1 )) || die "expected one disk file under $WORK/vstor/disks, found ${#files[@]}"
    VSTOR_FILE=${files[0]}
    [[ $(stat -c %s "$VSTOR_FILE") == "$SIZE_BYTES" ]] ||
        die "vstor's disk file $VSTOR_FILE is $(stat -c %s "$VSTOR_FILE") bytes, expected $SIZE_BYTES"
}
