#!/usr/bin/env bash
# Lazy image pull: `vstor image mount` against a full pull (`skopeo copy` + `umoci unpack`), side
# by side in one run, on an image built here from a copy of this machine's /usr/bin and
# /usr/lib/x86_64-linux-gnu (one gzip layer) pushed to a local docker-registry, plus its eStargz
# copy made with `vstor image convert` (the start-up set before the prefetch landmark).
#
#   sudo benches/lazypull.sh
#   SRC="/usr/bin" ROUNDS=1 VSTOR_BIN=target/release/vstor sudo -E benches/lazypull.sh
#
# Measured, page cache dropped before each side:
# - time to the first read of a small file, and to read a start-up set of 64 files (about 6% of
#   the bytes, as Slacker found), from the moment the pull or mount starts;
# - bytes fetched from the registry before the start-up set was read;
# - read throughput of the whole tree after the handoff against the same tree (umoci's unpack)
#   on a plain overlayfs, and through FUSE (mounted --no-handoff from a filled cache).
# Prints a Markdown table with medians over ROUNDS and the ratios. Needs root, /dev/fuse,
# docker-registry, umoci, skopeo, curl. Drops the page cache (vm.drop_caches) between sides.

set -euo pipefail
shopt -s inherit_errexit # a failing step inside $(...) stops the run too

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
BENCH=lazypull
SRC=${SRC:-/usr/bin /usr/lib/x86_64-linux-gnu}
ROUNDS=${ROUNDS:-3}
STARTUP_FILES=${STARTUP_FILES:-64}
STARTUP_SHARE=${STARTUP_SHARE:-0.06}

die() { echo "$BENCH: $*" >&2; exit 1; }
log() { echo "$*" >&2; }

[[ $(id -u) == 0 ]] || die "needs root (FUSE and overlay mounts)"
[[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]] || die "ROUNDS must be a positive integer"
for tool in docker-registry umoci skopeo curl python3; do
    command -v "$tool" >/dev/null || die "$tool is missing (scripts/setup.sh installs it)"
done
if [[ -z "${VSTOR_BIN:-}" ]]; then
    log "building vstor (release) ..."
    (cd "$REPO_ROOT" && cargo build --release --quiet) >&2
fi
VSTOR=${VSTOR_BIN:-${CARGO_TARGET_DIR:-$REPO_ROOT/target}/release/vstor}
[[ -x "$VSTOR" ]] || die "missing $VSTOR"

WORK=$(mktemp -d "${TMPDIR:-/var/tmp}/lazypull.XXXXXX")
REG_PID=""
MOUNT_PID=""
MOUNTS=()
cleanup() {
    [[ -n "$MOUNT_PID" ]] && kill "$MOUNT_PID" 2>/dev/null
    local m
    for m in "${MOUNTS[@]}"; do
        while mountpoint -q "$m" 2>/dev/null; do umount -l "$m" 2>/dev/null || break; done
    done
    [[ -n "$REG_PID" ]] && kill "$REG_PID" 2>/dev/null
    wait 2>/dev/null || true
    if [[ -n "${KEEP_WORK:-}" ]]; then log "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

now() { date +%s.%N; }
since() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.3f}')" "$1" "$(now)"; }
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }

# ---- the registry ----------------------------------------------------------------------------
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
REG=127.0.0.1:$PORT
cat >"$WORK/registry.yml" <<EOF
version: 0.1
log: { level: error, accesslog: { disabled: true } }
storage: { filesystem: { rootdirectory: $WORK/registry }, delete: { enabled: true } }
http: { addr: $REG }
EOF
docker-registry serve "$WORK/registry.yml" >"$WORK/registry.log" 2>&1 &
REG_PID=$!
for _ in $(seq 100); do curl -sf "http://$REG/v2/" >/dev/null && break; sleep 0.1; done
curl -sf "http://$REG/v2/" >/dev/null || die "docker-registry did not come up (see $WORK/registry.log)"

# ---- the image: one gzip layer holding a copy of $SRC -------------------------------------------
log "building the image from $SRC ..."
umoci init --layout "$WORK/oci"
umoci new --image "$WORK/oci:big"
umoci unpack --image "$WORK/oci:big" "$WORK/bundle" >/dev/null
for dir in $SRC; do
    mkdir -p "$WORK/bundle/rootfs$(dirname "$dir")"
    cp -a "$dir" "$WORK/bundle/rootfs$(dirname "$dir")/"
done
umoci repack --image "$WORK/oci:big" "$WORK/bundle" >/dev/null
ROOTFS=$WORK/bundle/rootfs

# The start-up set: the STARTUP_FILES regular files whose sizes are nearest to an equal share of
# STARTUP_SHARE of the tree's bytes; the small file: the last small file in path order.
python3 - "$ROOTFS" "$STARTUP_FILES" "$STARTUP_SHARE" "$WORK" <<'PY'
import os, sys
root, n, share, work = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
files = []
for d, _, names in os.walk(root):
    for name in names:
        p = os.path.join(d, name)
        if os.path.isfile(p) and not os.path.islink(p):
            files.append((os.path.relpath(p, root), os.path.getsize(p)))
total = sum(s for _, s in files)
each = total * share / n
chosen = sorted(files, key=lambda f: (abs(f[1] - each), f[0]))[:n]
with open(os.path.join(work, "startup.list"), "w") as f:
    f.writelines(p + "\n" for p, _ in sorted(chosen))
small = [p for p, s in sorted(files) if 1024 <= s <= 16384][-1]
open(os.path.join(work, "small"), "w").write(small + "\n")
open(os.path.join(work, "tree.bytes"), "w").write(f"{total}\n")
print(f"tree {total/2**20:.0f} MiB in {len(files)} files; start-up set {sum(s for _, s in chosen)/2**20:.1f} MiB "
      f"({100*sum(s for _, s in chosen)/total:.1f}%) in {len(chosen)} files; small file {small}", file=sys.stderr)
PY
SMALL=$(cat "$WORK/small")
TREE_BYTES=$(cat "$WORK/tree.bytes")
sed 's|^|/|' "$WORK/startup.list" >"$WORK/prefetch.list"

skopeo copy -q --dest-tls-verify=false "oci:$WORK/oci:big" "docker://$REG/bench/big:gzip"
log "converting to eStargz with vstor image convert ..."
CONVERT_CACHE=$WORK/cache-convert
"$VSTOR" image convert "$REG/bench/big:gzip" "$REG/bench/big:estargz" --prefetch "$WORK/prefetch.list" \
    --cache "$CONVERT_CACHE" >&2
rm -rf "$CONVERT_CACHE"
GZIP_BYTES=$(curl -sf -H 'Accept: application/vnd.oci.image.manifest.v1+json' "http://$REG/v2/bench/big/manifests/gzip" |
    python3 -c 'import json,sys; print(sum(l["size"] for l in json.load(sys.stdin)["layers"]))')
ESTARGZ_BYTES=$(curl -sf -H 'Accept: application/vnd.oci.image.manifest.v1+json' "http://$REG/v2/bench/big/manifests/estargz" |
    python3 -c 'import json,sys; print(sum(l["size"] for l in json.load(sys.stdin)["layers"]))')
log "layers: gzip $((GZIP_BYTES >> 20)) MiB, eStargz $((ESTARGZ_BYTES >> 20)) MiB"

read_startup() { (cd "$1" && xargs -d '\n' cat <"$WORK/startup.list" >/dev/null); }
read_tree() { (cd "$1" && find . -type f -print0 | xargs -0 cat >/dev/null); }
fetched_bytes() { curl -sf "http://$1/metrics" | awk '/^vstor_image_fetched_bytes_total/ {print $2}'; }
phase_is() { curl -sf "http://$1/metrics" | grep -q "^vstor_image_phase{.*phase=\"$2\"} 1"; }
fuse_at() { grep -q " $1 .* - fuse" /proc/self/mountinfo; }
overlay_at() { awk -v t="$1" '$5 == t' /proc/self/mountinfo | tail -n1 | grep -q " - overlay "; }

# ---- full pull: skopeo copy + umoci unpack, then the same reads ---------------------------------
full_pull() { # prints: first startup bytes
    local dir=$WORK/full t0 first startup
    rm -rf "$dir"
    mkdir -p "$dir"
    drop_caches
    t0=$(now)
    skopeo copy -q --src-tls-verify=false "docker://$REG/bench/big:gzip" "oci:$dir/oci:big"
    umoci unpack --image "$dir/oci:big" "$dir/bundle" >/dev/null
    cat "$dir/bundle/rootfs/$SMALL" >/dev/null
    first=$(since "$t0")
    read_startup "$dir/bundle/rootfs"
    startup=$(since "$t0")
    echo "$first $startup $GZIP_BYTES"
    rm -rf "$dir"
}

# ---- lazy: vstor image mount from an empty cache ------------------------------------------------
lazy_mount() { # TAG -> sets LAZY="first startup bytes handoff_s" (not in a subshell: it keeps the mount)
    local tag=$1 target=$WORK/mnt-$1 cache=$WORK/cache-$1 mport t0 end first startup bytes handoff
    mkdir -p "$target"
    rm -rf "$cache"
    MOUNTS+=("$target")
    mport=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    drop_caches
    t0=$(now)
    "$VSTOR" image mount "$REG/bench/big:$tag" "$target" --cache "$cache" --metrics "127.0.0.1:$mport" \
        >/dev/null 2>"$WORK/mount-$tag.log" &
    MOUNT_PID=$!
    for _ in $(seq 3000); do fuse_at "$target" && break; kill -0 $MOUNT_PID 2>/dev/null || break; sleep 0.01; done
    fuse_at "$target" || { tail "$WORK/mount-$tag.log" >&2; die "no FUSE mount at $target"; }
    cat "$target/$SMALL" >/dev/null
    first=$(since "$t0")
    read_startup "$target"
    # The counter first, before anything slow: the background fetch resumes 250 ms after the
    # last read, and what it fetches then was not needed to start.
    end=$(now)
    bytes=$(fetched_bytes "127.0.0.1:$mport")
    startup=$(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.3f}')" "$t0" "$end")
    # The mount process may exit as soon as it has handed off (nothing holds FUSE open).
    for _ in $(seq 6000); do phase_is "127.0.0.1:$mport" handed_off && break; kill -0 $MOUNT_PID 2>/dev/null || break; sleep 0.1; done
    handoff=$(since "$t0")
    overlay_at "$target" || { tail "$WORK/mount-$tag.log" >&2; die "no overlay at $target after the handoff"; }
    LAZY="$first $startup $bytes $handoff"
}

unmount_lazy() { # TAG
    local target=$WORK/mnt-$1
    while mountpoint -q "$target"; do umount -l "$target"; done
    wait "$MOUNT_PID" 2>/dev/null || true
    MOUNT_PID=""
}

# ---- throughput: after handoff vs plain overlayfs, and through FUSE -----------------------------
tput() { # DIR -> MiB/s reading the whole tree, page cache dropped first
    local t0 s
    drop_caches
    t0=$(now)
    read_tree "$1"
    s=$(since "$t0")
    python3 -c "import sys; print(f'{int(sys.argv[1]) / 2**20 / float(sys.argv[2]):.0f}')" "$TREE_BYTES" "$s"
}

mkdir -p "$WORK/empty" "$WORK/plain"
MOUNTS+=("$WORK/plain")
mount -t overlay overlay -o "ro,lowerdir=$ROOTFS:$WORK/empty" "$WORK/plain"

declare -A R
for round in $(seq "$ROUNDS"); do
    log "round $round/$ROUNDS: full pull ..."
    read -r a b c <<<"$(full_pull)"; R[full_first]+="$a "; R[full_startup]+="$b "; R[full_bytes]+="$c "
    for tag in estargz gzip; do
        log "round $round/$ROUNDS: lazy mount ($tag) ..."
        lazy_mount $tag
        read -r a b c d <<<"$LAZY"
        R[${tag}_first]+="$a "; R[${tag}_startup]+="$b "; R[${tag}_bytes]+="$c "; R[${tag}_handoff]+="$d "
        if [[ $tag == estargz ]]; then
            log "round $round/$ROUNDS: throughput after handoff vs plain overlayfs ..."
            # ABBA order, so neither side always reads first after the handoff's writes.
            R[plain_tput]+="$(tput "$WORK/plain") "
            R[handoff_tput]+="$(tput "$WORK/mnt-$tag") "
            R[handoff_tput]+="$(tput "$WORK/mnt-$tag") "
            R[plain_tput]+="$(tput "$WORK/plain") "
        fi
        unmount_lazy $tag
    done
    log "round $round/$ROUNDS: throughput through FUSE (--no-handoff, cache filled) ..."
    target=$WORK/mnt-fuse
    mkdir -p "$target"
    MOUNTS+=("$target")
    "$VSTOR" image mount "$REG/bench/big:estargz" "$target" --cache "$WORK/cache-estargz" --no-handoff \
        >/dev/null 2>"$WORK/mount-fuse.log" &
    MOUNT_PID=$!
    for _ in $(seq 3000); do fuse_at "$target" && break; kill -0 $MOUNT_PID 2>/dev/null || break; sleep 0.01; done
    fuse_at "$target" || { tail "$WORK/mount-fuse.log" >&2; die "no FUSE mount at $target"; }
    R[fuse_tput]+="$(tput "$target") "
    while mountpoint -q "$target"; do umount -l "$target"; done
    kill "$MOUNT_PID" 2>/dev/null || true
    wait "$MOUNT_PID" 2>/dev/null || true
    MOUNT_PID=""
    rm -rf "$WORK/cache-gzip"
done

med() { python3 -c "import statistics,sys; print(statistics.median(float(x) for x in sys.argv[1:]))" $1; }
ratio() { python3 -c "import sys; print(f'{float(sys.argv[1]) / float(sys.argv[2]):.3f}')" "$1" "$2"; }
FULL_FIRST=$(med "${R[full_first]}"); FULL_STARTUP=$(med "${R[full_startup]}")
echo
echo "Lazy image pull: tree $((TREE_BYTES >> 20)) MiB; gzip layer $((GZIP_BYTES >> 20)) MiB, eStargz $((ESTARGZ_BYTES >> 20)) MiB; medians of $ROUNDS rounds"
echo
echo "| side | first small read (s) | start-up set read (s) | vs full pull | bytes fetched by then (MiB) | share of image | handoff done (s) |"
echo "|---|---:|---:|---:|---:|---:|---:|"
printf '| full pull (skopeo copy + umoci unpack) | %.2f | %.2f | 1.000 | %d | 100%% | - |\n' \
    "$FULL_FIRST" "$FULL_STARTUP" $((GZIP_BYTES >> 20))
for tag in estargz gzip; do
    first=$(med "${R[${tag}_first]}"); startup=$(med "${R[${tag}_startup]}"); bytes=$(med "${R[${tag}_bytes]}")
    layer=$GZIP_BYTES; [[ $tag == estargz ]] && layer=$ESTARGZ_BYTES
    printf '| vstor image mount (%s) | %.2f | %.2f | %s | %.0f | %.1f%% | %.1f |\n' "$tag" "$first" "$startup" \
        "$(ratio "$startup" "$FULL_STARTUP")" "$(python3 -c "print($bytes / 2**20)")" \
        "$(python3 -c "print(100 * $bytes / $layer)")" "$(med "${R[${tag}_handoff]}")"
done
PLAIN=$(med "${R[plain_tput]}"); HANDOFF=$(med "${R[handoff_tput]}"); FUSE=$(med "${R[fuse_tput]}")
echo
echo "| read of the whole tree, cold page cache | MiB/s | vs plain overlayfs |"
echo "|---|---:|---:|"
printf '| plain overlayfs over umoci unpack | %.0f | 1.000 |\n' "$PLAIN"
printf '| vstor after handoff (overlayfs) | %.0f | %s |\n' "$HANDOFF" "$(ratio "$HANDOFF" "$PLAIN")"
printf '| vstor through FUSE (--no-handoff, cache filled) | %.0f | %s |\n' "$FUSE" "$(ratio "$FUSE" "$PLAIN")"
