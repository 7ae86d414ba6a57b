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
