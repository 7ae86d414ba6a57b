#!/usr/bin/env bash
# Installs what vstor needs to build and test on a fresh Debian machine (run as root).
# Idempotent: a second run installs nothing and prints nothing.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

# Runs an apt-get command, showing its output only if it fails.
apt_quiet() {
    local log
    log=$(mktemp)
    if ! apt-get -y -qq -o Dpkg::Use-Pty=0 "$@" >"$log" 2>&1; then
        cat "$log" >&2
        rm -f "$log"
        echo "setup.sh: apt-get $* failed" >&2
        return 1
    fi
    rm -f "$log"
}

installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"
}

# Build and test tools. busybox-static and cpio make the guest image of the VM tests
# (tests/guest/build.sh); qemu-utils comes with qemu-system-x86 below. docker-registry, umoci and
# skopeo are the image tests' registry on loopback, image builder and pusher (fuse-lazypull);
# openssl makes their test CA; curl and python3 drive benches/lazypull.sh. libsqlite3-dev: the
# image cache's shared index (fuse-lazypull, rusqlite linking Debian's library).
need=()
for pkg in libclang-dev librocksdb-dev libsqlite3-dev fio libnbd-bin busybox-static cpio docker-registry umoci skopeo openssl curl python3; do
    installed "$pkg" || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
    apt_quiet update
    apt_quiet install "${need[@]}"
fi

# Every active apt source file (apt ignores other names, e.g. *.disabled).
apt_source_files() {
    local f
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] && echo "$f"
    done
}

# Prints "URI<TAB>SIGNED-BY" of the first enabled source carrying suite $1 (SIGNED-BY may be
# empty), in one-line (.list) or deb822 (.sources) format.
source_of_suite() {
    local suite=$1 f
    for f in $(apt_source_files); do
        case "$f" in
        *.sources)
            # deb822: stanzas separated by blank lines; continuation lines start with a space.
            awk -v suite="$suite" '
                function flush() {
                    if (types ~ /(^| )deb( |$)/ && (" " suites " ") ~ (" " suite " ") && tolower(enabled) != "no" && uris != "") {
                        split(uris, u, " "); printf "%s\t%s\n", u[1], signed; found = 1; exit
                    }
                    types = ""; suites = ""; uris = ""; signed = ""; enabled = ""
                }
                /^[ \t]*#/ { next }
                /^[ \t]*$/ { flush(); next }
                /^[^ \t]/ {
                    key = tolower($1); sub(/:$/, "", key)
                    val = $0; sub(/^[^:]*:[ \t]*/, "", val)
                    if (key == "types") types = val
                    else if (key == "suites") suites = val
                    else if (key == "uris") uris = val
                    else if (key == "signed-by") signed = val
                    else if (key == "enabled") enabled = val
                }
                END { if (!found) flush() }
            ' "$f"
            ;;
        *)
            # deb [ options ] URI SUITE COMPONENTS...
            awk -v suite="$suite" '
                $1 != "deb" { next }
                {
                    opts = ""; i = 2
                    if ($2 ~ /^\[/) {
                        while (i <= NF && $i !~ /\]$/) { opts = opts " " $i; i++ }
                        opts = opts " " $i; i++
                    }
                    if ($(i + 1) == suite) {
                        signed = ""
                        if (match(opts, /signed-by=[^] ]+/)) signed = substr(opts, RSTART + 10, RLENGTH - 10)
                        printf "%s\t%s\n", $i, signed; exit
                    }
                }
            ' "$f"
            ;;
        esac
    done | head -n 1
}

# qemu-system-x86 for the guest tests, with qemu-utils (qemu-img, qemu-io, qemu-nbd,
# qemu-storage-daemon) of the same version. On bookworm both come from bookworm-backports (10.0):
# bookworm's own qemu-system-x86 (7.2) would replace qemu-utils 10.0 and remove qemu-img.
if ! command -v qemu-system-x86_64 >/dev/null || ! command -v qemu-img >/dev/null ||
    ! command -v qemu-storage-daemon >/dev/null; then
    codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
    if [ "$codename" = bookworm ]; then
        if [ -z "$(source_of_suite bookworm-backports)" ]; then
            main=$(source_of_suite bookworm)
            if [ -z "$main" ]; then
                echo "setup.sh: no enabled apt source for suite bookworm; cannot add bookworm-backports" >&2
                exit 1
            fi
            uri=${main%%$'\t'*}
            signed=${main#*$'\t'}
            {
                echo "# Added by vstor's scripts/setup.sh: qemu-system-x86 and qemu-utils 10.0 for the guest tests."
                echo "Types: deb"
                echo "URIs: $uri"
                echo "Suites: bookworm-backports"
                echo "Components: main"
                if [ -n "$signed" ]; then echo "Signed-By: $signed"; fi
            } >/etc/apt/sources.list.d/vstor-bookworm-backports.sources
        fi
        apt_quiet update
        apt_quiet install -t bookworm-backports qemu-system-x86 qemu-utils
    else
        apt_quiet update
        apt_quiet install qemu-system-x86 qemu-utils
    fi
fi
for tool in qemu-system-x86_64 qemu-img qemu-io qemu-storage-daemon busybox cpio docker-registry umoci skopeo; do
    if ! command -v "$tool" >/dev/null; then
        echo "setup.sh: $tool is missing after installation" >&2
        exit 1
    fi
done
