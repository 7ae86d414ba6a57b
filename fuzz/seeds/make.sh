#!/usr/bin/env bash
# Makes the seed inputs of every fuzz target into fuzz/seeds/out/<target>/: real NBD clients
# recorded against qemu-nbd, tar and gzip layers made by GNU tar, busybox tar and gzip, an image
# layout made by umoci, and what vstor's own code writes (examples/seeds.rs). Run as root (device
# nodes in the tars). Then minimize into the corpus: see fuzz/README.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=fuzz/seeds/out
rm -rf "$out"
mkdir -p "$out"
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

# 1. NBD: the client side of real sessions (nbdinfo, qemu-img, qemu-io, nbdcopy with qemu-nbd
#    behind a recording proxy). Transmission seeds are the same streams from the first request
#    on, behind each mode byte.
qemu-img create -f raw "$work/a.img" 256K >/dev/null
wait_for() { for _ in $(seq 100); do [ -S "$1" ] && return; sleep 0.1; done; echo "no socket $1" >&2; exit 1; }
qemu-nbd -k "$work/up.sock" -x a -t -e 8 -f raw "$work/a.img" &
mkdir -p "$work/nbd"
wait_for "$work/up.sock"
python3 fuzz/seeds/nbd_proxy.py "$work/px.sock" "$work/up.sock" "$work/nbd" &
wait_for "$work/px.sock"
uri="nbd+unix:///a?socket=$work/px.sock"
nbdinfo "$uri" >/dev/null
nbdinfo --list "nbd+unix:///?socket=$work/px.sock" >/dev/null
nbdinfo --map "$uri" >/dev/null
qemu-img info "$uri" >/dev/null
qemu-io -f raw -c 'write -P 0x5a 0 4k' -c 'read 0 4k' -c 'write -z 8k 4k' -c 'discard 16k 8k' -c 'flush' \
    -c 'write -P 1 4608 512' -c 'read -v 512 512' "$uri" >/dev/null
qemu-io -f raw -c 'write -f -P 0x7 64k 8k' -c 'readv 0 512 1024 2048' -c 'aio_write 0 4k' -c 'aio_read 4k 4k' \
    -c 'aio_flush' "$uri" >/dev/null
qemu-io -f raw -c 'write -z -u 0 64k' -c 'discard 0 128k' "$uri" >/dev/null
nbdcopy "$uri" /dev/null
sleep 1
mkdir -p "$out/nbd_handshake" "$out/nbd_transmission"
python3 - "$work/nbd" "$out" <<'EOF'
import glob, sys
src, out = sys.argv[1], sys.argv[2]
magic = bytes.fromhex('25609513')
for i, f in enumerate(sorted(glob.glob(src + '/client-*'))):
    d = open(f, 'rb').read()
    open(f'{out}/nbd_handshake/client-{i}', 'wb').write(d)
    at = d.find(magic)
    if at >= 0:
        for mode in (0, 1, 4, 7):
            open(f'{out}/nbd_transmission/client-{i}-{mode}', 'wb').write(bytes([mode]) + d[at:])
EOF

# 2. Layers: one tree, archived in every format the tools have, plain and gzipped.
tree="$work/tree"
mkdir -p "$tree/etc/ssl" "$tree/usr/lib/x86_64-linux-gnu" "$tree/var/empty" "$tree/dir.opaque"
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$tree/etc/passwd"
head -c 3000 /dev/urandom >"$tree/usr/lib/x86_64-linux-gnu/libfake.so.1"
: >"$tree/etc/empty"
printf '%0513d' 0 >"$tree/etc/ssl/513-bytes"
ln -s libfake.so.1 "$tree/usr/lib/x86_64-linux-gnu/libfake.so"
ln "$tree/etc/passwd" "$tree/etc/passwd-"
mkfifo "$tree/var/fifo"
mknod "$tree/var/null" c 1 3
mknod "$tree/var/loop9" b 7 9
: >"$tree/etc/.wh.shadow"
: >"$tree/dir.opaque/.wh..wh..opq"
chmod 4755 "$tree/etc/passwd"
long="$tree/usr/lib/a-directory-name-that-is-rather-long-to-push-the-path-past-one-hundred-bytes"
mkdir -p "$long"
printf 'deep\n' >"$long/file-with-a-long-name-too.txt"
python3 -c "import os, sys; os.setxattr(sys.argv[1], 'user.vstor', b'seed'); os.setxattr(sys.argv[1], 'security.capability', b'\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00')" "$tree/etc/passwd" || true
tars="$work/tars"
mkdir -p "$tars"
for fmt in gnu oldgnu pax posix; do
    tar --format=$fmt --xattrs --xattrs-include='*' -C "$tree" -cf "$tars/$fmt.tar" .
done
tar --format=ustar -C "$tree" -cf "$tars/ustar.tar" etc var 2>/dev/null || true
tar --format=v7 -C "$tree" -cf "$tars/v7.tar" etc/passwd etc/ssl 2>/dev/null || true
(cd "$tree" && busybox tar -cf "$tars/busybox.tar" etc usr var)
mkdir -p "$work/latin1" && printf 'x' >"$work/latin1/$(printf 'caf\xe9')"
tar --format=gnu -C "$work/latin1" -cf "$tars/latin1-name.tar" .
tar --format=pax --numeric-owner --owner=1000 --group=1000 --mtime='@-1' -C "$tree" -cf "$tars/pax-negative-mtime.tar" etc
for t in "$tars"/*.tar; do
    gzip -6 -c "$t" >"$t.gz"
done
gzip -1 -n -c "$tars/gnu.tar" >"$tars/gnu-fast.tar.gz"
gzip -9 -c "$tars/pax.tar" >"$tars/pax-best.tar.gz"
head -c 10240 "$tars/busybox.tar" | gzip -c >"$work/part1.gz"
tail -c +10241 "$tars/busybox.tar" | gzip -c >"$work/part2.gz"
cat "$work/part1.gz" "$work/part2.gz" >"$tars/busybox-two-members.tar.gz"

# 3. An image layout from umoci: its index and manifest.
oci="$work/oci"
umoci init --layout "$oci"
umoci new --image "$oci:v1"
umoci config --image "$oci:v1" --config.cmd=/bin/sh --config.env=PATH=/bin --os linux --architecture amd64

# 4. vstor's own: gzip indexes, eStargz copies, registry answers, FTL commands, records.
cargo run -q -p vstor-fuzz --example seeds -- "$out" "$tars" "$oci"
echo "seeds in $out:"
for d in "$out"/*; do echo "  $(basename "$d"): $(ls "$d" | wc -l)"; done
