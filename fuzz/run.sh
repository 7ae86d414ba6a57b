#!/usr/bin/env bash
# Runs one fuzz target for SECONDS (default 600) from its saved corpus and regressions, then
# minimizes the corpus it grew back into fuzz/corpus/TARGET: the fewest inputs that cover every
# edge covered (-use_counters=0; keeping every hit-count feature too keeps two to three times
# the files). Needs the nightly toolchain and cargo-fuzz (see fuzz/README.md). The log goes to
# $FUZZ_WORK/TARGET.log.
#
#   fuzz/run.sh TARGET [SECONDS]
set -euo pipefail
target=$1
secs=${2:-600}
cd "$(dirname "$0")/.."
root=${FUZZ_WORK:-/tmp/vstor-fuzz}
work=$root/$target
mkdir -p "$work"
cp -n fuzz/corpus/"$target"/* "$work"/ 2>/dev/null || true
cp -n fuzz/regressions/"$target"/* "$work"/ 2>/dev/null || true

# Rust has no use for LeakSanitizer here, and RocksDB's C API leaks a byte once per open.
export ASAN_OPTIONS=detect_leaks=0
if [ "$target" = cache_index ] && [ -e /usr/lib/x86_64-linux-gnu/libeatmydata.so ]; then
    # Every input opens the cache, whose SQLite index syncs what it writes; eatmydata makes
    # those syncs free (package eatmydata).
    export LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libeatmydata.so
    export ASAN_OPTIONS=detect_leaks=0:verify_asan_link_order=0
fi
flags=(-rss_limit_mb=2048 -timeout=10 -detect_leaks=0)
cargo +nightly fuzz run --features libfuzzer "$target" "$work" -- -max_total_time="$secs" "${flags[@]}" \
    2>&1 | tee "$root/$target.log" | grep -E '^#[0-9]+.*(pulse|DONE)|panicked|ERROR|SUMMARY' || true
grep -E '^#[0-9]+' "$root/$target.log" | tail -1
cargo +nightly fuzz cmin --features libfuzzer "$target" "$work" -- -use_counters=0 "${flags[@]}" >"$root/$target.cmin.log" 2>&1
rm -rf fuzz/corpus/"$target"
cp -r "$work" fuzz/corpus/"$target"
echo "$target: corpus $(ls fuzz/corpus/"$target" | wc -l) files, $(du -sh fuzz/corpus/"$target" | cut -f1)"
