#!/usr/bin/env bash
# The image cache's shared index under `vstor image mount`: start-up of one mount, and two mounts
# (two daemons) started together on one cache directory, for one or more vstor binaries side by
# side (rounds interleaved, so a busy machine weighs on each the same).
#
#   sudo BINS="before=/tmp/vstor-before after=target/release/vstor" benches/lazypull_index.sh
#
# The image: LAYERS gzip layers of about 1 MiB (64 files of 16 KiB each), pushed to a local
# docker-registry; every layer is a blob the mount records and holds in the index. Each round, for
# each binary:
# - cold: one mount from an empty cache (the mount fetches and indexes every layer);
# - warm: one mount of the same image again, from the cache the cold mount left (layer indexes
#   kept: nothing to fetch before serving);
# - two cold / two warm: two mounts of the image at two targets, started at once, one cache.
# Measured from the moment the mount(s) start: `first read`, until a small file in the top layer
# has been read through every mount; `done`, until every mount process has handed its target over
# to overlayfs, run its gc and exited. Prints medians over ROUNDS as a Markdown table. Needs root,
# /dev/fuse, docker-registry, umoci, skopeo, curl, python3.

set -euo pipefail
shopt -s inherit_errexit # a failing step inside $(...) stops the run too

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
BENCH=lazypull_index
ROUNDS=${ROUNDS:-5}
LAYERS=${LAYERS:-8}
# shellcheck source=benches/lib.sh
source "$SCRIPT_DIR/lib.sh"

[[ $(id -u) == 0 ]] || die "needs root (FUSE and overlay mounts)"
[[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]] || die "ROUNDS must be a positive integer"
[[ "$LAYERS" =~ ^[1-9][0-9]*$ ]] || die "LAYERS must be a positive integer"
for tool in docker-registry umoci skopeo curl python3; do
    command -v "$tool" >/dev/null || die "$tool is missing (scripts/setup.sh installs it)"
done
if [[ -z "${BINS:-}" ]]; then
    log "building vstor (release) ..."
    (cd "$REPO_ROOT" && cargo build --release --quiet --bin vstor) >&2
    BINS="$(source_revision | tr ' ' _)=${CARGO_TARGET_DIR:-$REPO_ROOT/target}/release/vstor"
fi
NAMES=()
declare -A BIN
for pair in $BINS; do
    name=${pair%%=*}
    BIN[$name]=${pair#*=}
    [[ -x "${BIN[$name]}" ]] || die "missing ${BIN[$name]}"
    NAMES+=("$name")
done

WORK=$(mktemp -d "${TMPDIR:-/var/tmp}/lazypull-index.XXXXXX")
REG_PID=""
PIDS=()
cleanup_all() {
    local pid m
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for m in "$WORK"/mnt-*; do
        while mountpoint -q "$m" 2>/dev/null; do umount -l "$m" 2>/dev/null || break; done
    done
    [[ -n "$REG_PID" ]] && kill "$REG_PID" 2>/dev/null
    wait 2>/dev/null || true
    if [[ -n "${KEEP_WORK:-}" ]]; then log "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup_all EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.3f", b - a }'; }
# Whether the image is mounted at TARGET: over FUSE, or already handed over to overlayfs (a warm
# cache can hand over before the first poll).
served_at() { grep -q " $1 .* - \(fuse\|overlay\)" /proc/self/mountinfo; }

# ---- the registry and the image -----------------------------------------------------------------
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
REG=127.0.0.1:$PORT
cat >"$WORK/registry.yml" <<EOF
version: 0.1
log: { level: error, accesslog: { disabled: true } }
storage: { filesystem: { rootdirectory: $WORK/registry } }
http: { addr: $REG }
EOF
docker-registry serve "$WORK/registry.yml" >"$WORK/registry.log" 2>&1 &
REG_PID=$!
for _ in $(seq 100); do curl -sf "http://$REG/v2/" >/dev/null && break; sleep 0.1; done
curl -sf "http://$REG/v2/" >/dev/null || die "docker-registry did not come up (see $WORK/registry.log)"

log "building an image of $LAYERS layers ..."
umoci init --layout "$WORK/oci"
umoci new --image "$WORK/oci:img"
umoci unpack --image "$WORK/oci:img" "$WORK/bundle" >/dev/null
for layer in $(seq "$LAYERS"); do
    mkdir -p "$WORK/bundle/rootfs/layer$layer"
    for f in $(seq 64); do
        head -c 16384 /dev/urandom >"$WORK/bundle/rootfs/layer$layer/file$f"
    done
    umoci repack --refresh-bundle --image "$WORK/oci:img" "$WORK/bundle" >/dev/null
done
SMALL=layer$LAYERS/file1
skopeo copy -q --dest-tls-verify=false "oci:$WORK/oci:img" "docker://$REG/bench/index:1"
IMAGE=$REG/bench/index:1

# ---- mounts ---------------------------------------------------------------------------------------
# Starts COUNT mounts of the image with binary BIN on cache CACHE; sets FIRST and FINISH (seconds).
mounts() { # BIN CACHE COUNT
    local bin=$1 cache=$2 count=$3 t0 i target
    local -a pids=() targets=()
    for i in $(seq "$count"); do
        target=$WORK/mnt-$i
        mkdir -p "$target"
        targets+=("$target")
    done
    t0=$(now)
    for target in "${targets[@]}"; do
        echo "== $bin $target" >>"$WORK/mount.log"
        "$bin" image mount "$IMAGE" "$target" --cache "$cache" >/dev/null 2>>"$WORK/mount.log" &
        pids+=($!)
    done
    PIDS=("${pids[@]}")
    for target in "${targets[@]}"; do
        for _ in $(seq 6000); do served_at "$target" && break; sleep 0.005; done
        served_at "$target" || { tail "$WORK/mount.log" >&2; die "nothing mounted at $target"; }
        cat "$target/$SMALL" >/dev/null
    done
    FIRST=$(since "$t0")
    for i in "${!pids[@]}"; do
        wait "${pids[$i]}" || { tail "$WORK/mount.log" >&2; die "mount $i failed"; }
    done
    FINISH=$(since "$t0")
    PIDS=()
    for target in "${targets[@]}"; do
        while mountpoint -q "$target"; do umount -l "$target"; done
    done
}

echo "binary scenario round first finish" >"$WORK/results"
for round in $(seq "$ROUNDS"); do
    for name in "${NAMES[@]}"; do
        for count in 1 2; do
            cache=$WORK/cache
            rm -rf "$cache"
            sync
            mounts "${BIN[$name]}" "$cache" "$count"
            echo "$name cold-$count $round $FIRST $FINISH" >>"$WORK/results"
            mounts "${BIN[$name]}" "$cache" "$count"
            echo "$name warm-$count $round $FIRST $FINISH" >>"$WORK/results"
            log "round $round $name x$count: $(tail -n2 "$WORK/results" | awk '{print $2, $4, $5}' | paste -sd' ')"
        done
    done
done

python3 - "$WORK/results" "${NAMES[0]}" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1]).read().splitlines()[1:]]
base = sys.argv[2]
names = list(dict.fromkeys(r[0] for r in rows))
label = {"cold-1": "one mount, empty cache", "warm-1": "one mount, warm cache",
         "cold-2": "two mounts at once, empty cache", "warm-2": "two mounts at once, warm cache"}
med = {}
for name, scen, _, first, finish in rows:
    med.setdefault((name, scen), []).append((float(first), float(finish)))
print("| scenario | binary | first read (s) | vs " + base + " | all done (s) | vs " + base + " |")
print("|---|---|---:|---:|---:|---:|")
for scen in label:
    b = med[(base, scen)]
    bf, bd = statistics.median(x[0] for x in b), statistics.median(x[1] for x in b)
    for name in names:
        m = med[(name, scen)]
        f, d = statistics.median(x[0] for x in m), statistics.median(x[1] for x in m)
        print(f"| {label[scen]} | {name} | {f:.3f} | {f / bf:.2f} | {d:.3f} | {d / bd:.2f} |")
print(f"\nmedians of {len(b)} rounds", file=sys.stderr)
PY
