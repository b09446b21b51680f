#!/usr/bin/env bash
# Checkpoint and restart of heat2d against the file system's own write speed, in one invocation.
#
#   bench/scripts/checkpoint.sh [REPS]     (default 5)
#   BLOCKS=8 EDGE=256 SAVE="+p4 ++ppn 2" RESTORE="+p2 ++ppn 1" DIR=/tmp/... to change
#
# Each repetition, one after the other on the same cores:
#   1. heat2d under `charmrun $SAVE` runs 30 steps and checkpoints after steps 10, 20 and 30 into a
#      fresh directory (each checkpoint: quiescence, every PE packs and writes its blocks, synced,
#      then the metadata); the time of each checkpoint as heat2d prints it.
#   2. heat2d under `charmrun $RESTORE` restarts from it: the time from its start to the end of
#      `charmrs::restore` (read every PE file, send every block home, wait until all are in).
#   3. `dd` writes as many bytes as one checkpoint to the same directory, 1 MiB at a time, with
#      `conv=fsync` (the disk's own speed for a synced write of that size), and `cat` reads the
#      checkpoint's files back (page cache, as the restart just did).
# Prints the median of each over the repetitions. MB are 10^6 bytes.
set -euo pipefail
cd "$(dirname "$0")/../.."
. bench/scripts/lib.sh
reps=${1:-5}
blocks=${BLOCKS:-8}
edge=${EDGE:-256}
save=${SAVE:-+p4 ++ppn 2}
restore=${RESTORE:-+p2 ++ppn 1}
base=${DIR:-$(mktemp -d)}
cargo build --release -q -p charmrs-launcher -p charmrs-apps --bin charmrun --bin heat2d
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

for rep in $(seq 1 "$reps"); do
    echo "repetition $rep/$reps" >&2
    dir="$base/heat-$rep"
    rm -rf "$dir"
    # shellcheck disable=SC2086 # the layouts are several words
    target/release/charmrun ++quiet $save target/release/heat2d --blocks "$blocks" --edge "$edge" \
        --steps 30 --every 10 --checkpoint "$dir" |
        awk '/^checkpoint at step/ {print "save", $9, $7}' >>"$out/rows"
    # shellcheck disable=SC2086
    target/release/charmrun ++quiet $restore target/release/heat2d --blocks "$blocks" \
        --edge "$edge" --steps 30 --restart "$dir" |
        awk '/^heat2d: restarted/ {for (i = 1; i <= NF; i++) if ($i == "ms,") print "restore", $(i - 1); else if ($i == "ms") print "restore", $(i - 1)}' >>"$out/rows"
    bytes=$(cat "$dir"/pe-*.ckpt | wc -c)
    mib=$(((bytes + 1048575) / 1048576))
    dd if=/dev/zero of="$dir/raw" bs=1M count="$mib" conv=fsync 2>&1 |
        awk -v b="$((mib * 1048576))" '/copied/ {for (i = 1; i <= NF; i++) if ($i == "s,") print "dd", $(i - 1) * 1000, b}' >>"$out/rows"
    start=$(date +%s.%N)
    cat "$dir"/pe-*.ckpt >/dev/null
    end=$(date +%s.%N)
    echo "read $(echo "($end - $start) * 1000" | bc -l) $bytes" >>"$out/rows"
    rm -rf "$dir"
done

bytes=$(awk '$1 == "save" {print $3; exit}' "$out/rows")
printf '# heat2d --blocks %s --edge %s: %s bytes of block state per checkpoint; medians of %s repetitions\n' \
    "$blocks" "$edge" "$bytes" "$reps"
printf '%-44s %10s %10s\n' "what" "ms" "MB/s"
row() { # label key
    local ms bytes_of
    ms=$(median_of "$out/rows" "$2" 2)
    bytes_of=$(awk -v k="$2" '$1 == k {print $3; exit}' "$out/rows")
    if [ -n "$bytes_of" ]; then
        printf '%-44s %10.1f %10.0f\n' "$1" "$ms" "$(echo "$bytes_of / ($ms * 1000)" | bc -l)"
    else
        printf '%-44s %10.1f %10s\n' "$1" "$ms" "-"
    fi
}
row "checkpoint (charmrun $save)" save
row "dd, same bytes, conv=fsync" dd
row "restore (charmrun $restore)" restore
row "cat of the checkpoint's files" read
