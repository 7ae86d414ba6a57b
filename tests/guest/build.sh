#!/usr/bin/env bash
# Prepares the guest of the VM tests into a cache directory (default: target/guest):
#   vmlinuz            a Debian cloud kernel (linux-image-*-cloud-amd64, unpacked with dpkg -x)
#   initramfs.cpio.gz  busybox-static, the virtio block modules and /init
#   kernel-version     the kernel's release, for the record
#
# /init mounts proc, sys and dev, loads virtio_ring, virtio, virtio_pci_legacy_dev,
# virtio_pci_modern_dev, virtio_pci and virtio_blk in that order (those built into the kernel
# are skipped), waits briefly for /dev/vda, then runs /guest-script with `sh -e` (for at most
# vstor.timeout=SECONDS from the kernel command line, default 60). A test adds
# /guest-script (and any data files) in a second, uncompressed cpio archive appended to this one:
# Linux unpacks concatenated archives in order. On the serial console /init prints
#   GUEST-BOOTED <kernel release>
#   GUEST-OK                     the script exited 0
#   GUEST-FAIL <reason>          anything else
# and then powers the machine off, so that QEMU (run with -no-reboot) exits.
#
# Idempotent and safe to run concurrently: the build holds a lock on CACHE/.lock and does
# nothing when the cache was built by this same script. Needs apt-get, dpkg, cpio, gzip and
# busybox-static (scripts/setup.sh installs them); the kernel package is fetched with
# `apt-get download` the first time. VSTOR_GUEST_KERNEL=linux-image-...-cloud-amd64 picks
# another kernel package than the candidate of linux-image-cloud-amd64.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
cache=${1:-$here/../../target/guest}
mkdir -p "$cache"
cache=$(cd "$cache" && pwd)

modules=(virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk)

exec 9>"$cache/.lock"
flock 9

stamp="$(sha256sum "$here/build.sh" | cut -d' ' -f1) ${VSTOR_GUEST_KERNEL:-default}"
if [ -f "$cache/vmlinuz" ] && [ -f "$cache/initramfs.cpio.gz" ] && [ "$(cat "$cache/.stamp" 2>/dev/null)" = "$stamp" ]; then
    exit 0
fi

busybox=$(command -v busybox || true)
if [ -z "$busybox" ]; then
    echo "build.sh: busybox is missing (package busybox-static; run scripts/setup.sh)" >&2
    exit 1
fi
# A dynamically linked busybox names its program interpreter; the guest has no libc.
if ldd "$busybox" >/dev/null 2>&1; then
    echo "build.sh: $busybox is not statically linked (package busybox-static; run scripts/setup.sh)" >&2
    exit 1
fi
for tool in apt-get apt-cache dpkg cpio gzip; do
    command -v "$tool" >/dev/null || {
        echo "build.sh: $tool is missing (run scripts/setup.sh)" >&2
        exit 1
    }
done

work=$(mktemp -d "$cache/build.XXXXXX")
trap 'rm -rf "$work"' EXIT

# The kernel package: the candidate that linux-image-cloud-amd64 depends on.
pkg=${VSTOR_GUEST_KERNEL:-}
if [ -z "$pkg" ]; then
    pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null |
        awk '$1 == "Depends:" && $2 ~ /^linux-image-.*-cloud-amd64$/ { print $2; exit }')
fi
if [ -z "$pkg" ]; then
    echo "build.sh: apt-cache knows no linux-image-*-cloud-amd64 (apt-get update?)" >&2
    exit 1
fi
download() {
    # As root, apt's download sandbox user (_apt) cannot write into our directory: skip it.
    (cd "$work" && apt-get download -qq -o APT::Sandbox::User="$(id -un)" "$pkg") >"$work/download.log" 2>&1
}
if ! download; then
    # A security update may have replaced the version the package lists name: refresh, retry.
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq >/dev/null 2>&1 || true
    fi
    if ! download; then
        cat "$work/download.log" >&2
        echo "build.sh: apt-get download $pkg failed" >&2
        exit 1
    fi
fi
dpkg -x "$work"/"$pkg"_*.deb "$work/pkg"
release=${pkg#linux-image-}
moddir="$work/pkg/lib/modules/$release"
[ -f "$work/pkg/boot/vmlinuz-$release" ] || {
    echo "build.sh: $pkg holds no /boot/vmlinuz-$release" >&2
    exit 1
}

# The initramfs tree.
root="$work/root"
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,mnt,lib/modules}
cp "$busybox" "$root/bin/busybox"
loaded=()
for m in "${modules[@]}"; do
    ko=$(find "$moddir/kernel" \( -name "$m.ko" -o -name "$m.ko.xz" -o -name "$m.ko.zst" -o -name "$m.ko.gz" \) | head -n 1)
    if [ -z "$ko" ]; then
        if grep -Eq "/$m\.ko$" "$moddir/modules.builtin" 2>/dev/null; then
            continue # built into the kernel
        fi
        echo "build.sh: module $m is neither in $pkg nor built into it" >&2
        exit 1
    fi
    # busybox insmod takes plain ELF objects only.
    case "$ko" in
    *.xz) xz -dc "$ko" >"$root/lib/modules/$m.ko" ;;
    *.zst) zstd -qdc "$ko" >"$root/lib/modules/$m.ko" ;;
    *.gz) gzip -dc "$ko" >"$root/lib/modules/$m.ko" ;;
    *) cp "$ko" "$root/lib/modules/$m.ko" ;;
    esac
    # Every dependency must be loaded before, or be built in.
    deps=$(tr '\0' '\n' <"$root/lib/modules/$m.ko" | sed -n 's/^depends=//p' | tr ',' ' ')
    for d in $deps; do
        ok=
        for l in "${loaded[@]}"; do [ "$l" = "$d" ] && ok=1; done
        if [ -z "$ok" ]; then
            echo "build.sh: $m needs module $d, which is not loaded before it" >&2
            exit 1
        fi
    done
    loaded+=("$m")
done

{
    cat <<'EOF'
#!/bin/busybox sh
# The guest's init, made by tests/guest/build.sh.
/bin/busybox --install -s
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# The initramfs holds no /dev/console, so the kernel could not give init one: take it now.
exec </dev/console >/dev/console 2>&1
mount -t tmpfs tmpfs /tmp
done_() {
    sync
    poweroff -f
    sleep 60
}
fail() {
    echo "GUEST-FAIL $*"
    done_
}
echo "GUEST-BOOTED $(uname -r)"
EOF
    for m in "${loaded[@]}"; do
        echo "insmod /lib/modules/$m.ko || fail \"insmod $m\""
    done
    cat <<'EOF'
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do
    sleep 0.1
    i=$((i + 1))
done
[ -b /dev/vda ] || echo "GUEST-NOTE no /dev/vda"
[ -f /guest-script ] || fail "no /guest-script in the initramfs"
# A watchdog, so that a script stuck on I/O fails fast and says so: vstor.timeout=SECONDS on
# the kernel command line (default 60). It powers off without sync, which could hang too.
timeout=60
for arg in $(cat /proc/cmdline); do
    case "$arg" in vstor.timeout=*) timeout=${arg#vstor.timeout=} ;; esac
done
(
    sleep "$timeout"
    echo "GUEST-FAIL /guest-script still running after $timeout s; last kernel messages:"
    dmesg | tail -n 40
    poweroff -f -n
) &
cd /
sh -e /guest-script
rc=$?
sync
if [ $rc -eq 0 ]; then
    echo "GUEST-OK"
else
    echo "GUEST-FAIL /guest-script exited with status $rc"
fi
done_
EOF
} >"$root/init"
chmod 0755 "$root/init"

(cd "$root" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) | gzip -9n >"$work/initramfs.cpio.gz"
cp "$work/pkg/boot/vmlinuz-$release" "$work/vmlinuz"
echo "$release" >"$work/kernel-version"
for f in vmlinuz initramfs.cpio.gz kernel-version; do
    mv -f "$work/$f" "$cache/$f"
done
echo "$stamp" >"$cache/.stamp"
