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
#
# Environment: SRC (the directories copied into the image), ROUNDS (default 3), STARTUP_FILES
# (default 64), STARTUP_SHARE (the start-up set's share of the tree's bytes, default 0.06),
# VSTOR_BIN (a vstor binary to use instead of building one); ALLOW_LOAD, MAX_LOAD and KEEP_WORK as
# in benches/lib.sh (the script refuses to run while the 1-minute load average is above half the
# CPUs, unless ALLOW_LOAD=1). The work directory is under $TMPDIR, default /var/tmp.

set -euo pipefail
shopt -s inherit_errexit # a failing step inside $(...) stops the run too

# shellcheck source=benches/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
bench_init lazypull "$@"
knob SRC "/usr/bin /usr/lib/x86_64-linux-gnu"
knob ROUNDS 3
knob STARTUP_FILES 64
knob STARTUP_SHARE 0.06
knob VSTOR_BIN ""
bench_start
[[ "$STARTUP_FILES" =~ ^[1-9][0-9]*$ ]] || die "STARTUP_FILES must be a positive integer, got '$STARTUP_FILES'"
[[ "$STARTUP_SHARE" =~ ^(0?\.[0-9]*[1-9][0-9]*|1(\.0*)?)$ ]] || die "STARTUP_SHARE must be a number in (0, 1], got '$STARTUP_SHARE'"
[[ $(id -u) == 0 ]] || die "needs root (FUSE and overlay mounts)"
require docker-registry umoci skopeo curl mountpoint
build_vstor

make_workdir lazypull "${TMPDIR:-/var/tmp}"
MOUNT_PID=""
MOUNTS=()
unmount_all() {
    local m
    for m in "${MOUNTS[@]}"; do
        while mountpoint -q "$m" 2>/dev/null; do umount -l "$m" 2>/dev/null || break; done
    done
}
on_cleanup unmount_all

now() { date +%s.%N; }
since() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.3f}')" "$1" "$(now)"; }
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# ---- the registry ----------------------------------------------------------------------------
REG=127.0.0.1:$(free_port)
cat >"$WORK/registry.yml" <<EOF
version: 0.1
log: { level: error, accesslog: { disabled: true } }
storage: { filesystem: { rootdirectory: $WORK/registry }, delete: { enabled: true } }
http: { addr: $REG }
EOF
start_daemon docker-registry "$WORK/registry.log" docker-registry serve "$WORK/registry.yml"
wait_for "$DAEMON_PID" 10 "an answer on http://$REG/v2/" curl -sf -o /dev/null "http://$REG/v2/"

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
small = [p for p, s in sorted(files) if 1024 <= s <= 16384]
if not small:
    sys.exit("no file of 1-16 KiB in the tree to read first")
with open(os.path.join(work, "startup.list"), "w") as f:
    f.writelines(p + "\n" for p, _ in sorted(chosen))
open(os.path.join(work, "small"), "w").write(small[-1] + "\n")
open(os.path.join(work, "tree.bytes"), "w").write(f"{total}\n")
open(os.path.join(work, "tree.files"), "w").write(f"{len(files)}\n")
print(f"tree {total/2**20:.0f} MiB in {len(files)} files; start-up set {sum(s for _, s in chosen)/2**20:.1f} MiB "
      f"({100*sum(s for _, s in chosen)/total:.1f}%) in {len(chosen)} files; small file {small[-1]}", file=sys.stderr)
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
layer_bytes() {
    curl -sf -H 'Accept: application/vnd.oci.image.manifest.v1+json' "http://$REG/v2/bench/big/manifests/$1" |
        python3 -c 'import json,sys; print(sum(l["size"] for l in json.load(sys.stdin)["layers"]))'
}
GZIP_BYTES=$(layer_bytes gzip)
ESTARGZ_BYTES=$(layer_bytes estargz)
log "layers: gzip $((GZIP_BYTES >> 20)) MiB, eStargz $((ESTARGZ_BYTES >> 20)) MiB"

read_startup() { (cd "$1" && xargs -d '\n' cat <"$WORK/startup.list" >/dev/null); }
read_tree() { (cd "$1" && find . -type f -print0 | xargs -0 cat >/dev/null); }
fetched_bytes() { curl -sf "http://$1/metrics" | awk '/^vstor_image_fetched_bytes_total/ {print $2}'; }
phase_is() { curl -sf "http://$1/metrics" | grep -q "^vstor_image_phase{.*phase=\"$2\"} 1"; }
fuse_at() { grep -q " $1 .* - fuse" /proc/self/mountinfo; }
overlay_at() { awk -v t="$1" '$5 == t' /proc/self/mountinfo | tail -n1 | grep -q " - overlay "; }
# mib_share BYTES LAYER-BYTES: "MiB percent-of-the-layer"
mib_share() { python3 -c 'import sys; b, l = map(float, sys.argv[1:]); print(f"{b / 2**20:.3f} {100 * b / l:.3f}")' "$1" "$2"; }

# ---- full pull: skopeo copy + umoci unpack, then the same reads ---------------------------------
full_pull() { # ROUND
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
    record start-up full "$1" first="$first" startup="$startup" mib="$((GZIP_BYTES >> 20))" share=100
    rm -rf "$dir"
}

# ---- lazy: vstor image mount from an empty cache ------------------------------------------------
lazy_mount() { # TAG ROUND (not in a subshell: it keeps the mount)
    local tag=$1 target=$WORK/mnt-$1 cache=$WORK/cache-$1 mport t0 end first startup bytes handoff layer
    mkdir -p "$target"
    rm -rf "$cache"
    MOUNTS+=("$target")
    mport=$(free_port)
    drop_caches
    t0=$(now)
    start_daemon "vstor image mount ($tag)" "$WORK/mount-$tag.log" \
        "$VSTOR" image mount "$REG/bench/big:$tag" "$target" --cache "$cache" --metrics "127.0.0.1:$mport"
    MOUNT_PID=$DAEMON_PID
    wait_for "$MOUNT_PID" 30 "a FUSE mount at $target" fuse_at "$target"
    cat "$target/$SMALL" >/dev/null
    first=$(since "$t0")
    read_startup "$target"
    # The counter first, before anything slow: the background fetch resumes 250 ms after the
    # last read, and what it fetches then was not needed to start.
    end=$(now)
    bytes=$(fetched_bytes "127.0.0.1:$mport") ||
        die "no metrics from the $tag mount: it had handed off and exited before the start-up set was read (a larger SRC helps)"
    startup=$(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.3f}')" "$t0" "$end")
    # The mount process may exit as soon as it has handed off (nothing holds FUSE open).
    for _ in $(seq 6000); do phase_is "127.0.0.1:$mport" handed_off && break; kill -0 "$MOUNT_PID" 2>/dev/null || break; sleep 0.1; done
    handoff=$(since "$t0")
    overlay_at "$target" || { tail "$WORK/mount-$tag.log" >&2; die "no overlay at $target after the handoff"; }
    layer=$GZIP_BYTES
    [[ $tag == estargz ]] && layer=$ESTARGZ_BYTES
    read -r mib share <<<"$(mib_share "$bytes" "$layer")"
    record start-up "$tag" "$2" first="$first" startup="$startup" mib="$mib" share="$share" handoff="$handoff"
}

unmount_lazy() { # TAG
    local target=$WORK/mnt-$1
    while mountpoint -q "$target"; do umount -l "$target"; done
    stop_daemon "$MOUNT_PID" 30 # it exits by itself once unmounted
    MOUNT_PID=""
}

# ---- throughput: after handoff vs plain overlayfs, and through FUSE -----------------------------
tput() { # SIDE ROUND DIR: MiB/s reading the whole tree, page cache dropped first
    local t0 s
    drop_caches
    t0=$(now)
    read_tree "$3"
    s=$(since "$t0")
    record "tree read" "$1" "$2" mibs="$(python3 -c "import sys; print(f'{int(sys.argv[1]) / 2**20 / float(sys.argv[2]):.1f}')" "$TREE_BYTES" "$s")"
}

mkdir -p "$WORK/empty" "$WORK/plain"
MOUNTS+=("$WORK/plain")
mount -t overlay overlay -o "ro,lowerdir=$ROOTFS:$WORK/empty" "$WORK/plain"

measuring_starts
for round in $(seq "$ROUNDS"); do
    log "round $round/$ROUNDS: full pull ..."
    full_pull "$round"
    for tag in estargz gzip; do
        log "round $round/$ROUNDS: lazy mount ($tag) ..."
        lazy_mount $tag "$round"
        if [[ $tag == estargz ]]; then
            log "round $round/$ROUNDS: throughput after handoff vs plain overlayfs ..."
            # ABBA order, so neither side always reads first after the handoff's writes.
            tput plain "$round" "$WORK/plain"
            tput handoff "$round" "$WORK/mnt-$tag"
            tput handoff "$round" "$WORK/mnt-$tag"
            tput plain "$round" "$WORK/plain"
        fi
        unmount_lazy $tag
    done
    log "round $round/$ROUNDS: throughput through FUSE (--no-handoff, cache filled) ..."
    target=$WORK/mnt-fuse
    mkdir -p "$target"
    MOUNTS+=("$target")
    start_daemon "vstor image mount (--no-handoff)" "$WORK/mount-fuse.log" \
        "$VSTOR" image mount "$REG/bench/big:estargz" "$target" --cache "$WORK/cache-estargz" --no-handoff
    MOUNT_PID=$DAEMON_PID
    wait_for "$MOUNT_PID" 30 "a FUSE mount at $target" fuse_at "$target"
    tput fuse "$round" "$target"
    while mountpoint -q "$target"; do umount -l "$target"; done
    stop_daemon "$MOUNT_PID"
    MOUNT_PID=""
    rm -rf "$WORK/cache-gzip"
done

note "tree $((TREE_BYTES >> 20)) MiB in $(cat "$WORK/tree.files") files from $SRC; gzip layer $((GZIP_BYTES >> 20)) MiB, eStargz $((ESTARGZ_BYTES >> 20)) MiB; medians of $ROUNDS rounds"
note "page cache dropped before each side; times from the moment the pull or mount starts; bytes fetched from the registry when the start-up set ($STARTUP_FILES files) had been read"
bench_table --rows side --workload start-up --row-header side \
    --label full='full pull (skopeo copy + umoci unpack)' \
    --label estargz='vstor image mount (estargz)' --label gzip='vstor image mount (gzip)' \
    'first small read (s)|*.first|{:.2f}' 'start-up set read (s)|*.startup|{:.2f}' \
    'vs full pull|*.startup/full.startup|{:.3f}' 'bytes fetched by then (MiB)|*.mib|{:.0f}' \
    'share of image|*.share|{:.1f}%' 'handoff done (s)|*.handoff|{:.1f}'
more_table --rows side --workload "tree read" --row-header "read of the whole tree, cold page cache" \
    --label plain='plain overlayfs over umoci unpack' --label handoff='vstor after handoff (overlayfs)' \
    --label fuse='vstor through FUSE (--no-handoff, cache filled)' \
    'MiB/s|*.mibs|{:.0f}' 'vs plain overlayfs|*.mibs/plain.mibs|{:.3f}'
