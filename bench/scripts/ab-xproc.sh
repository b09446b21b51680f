#!/usr/bin/env bash
# Two builds of the cross-process harness `xproc` against each other, interleaved (A, B, A, B, …)
# so that the VM's changes of speed hit both alike: one-way latency and stream bandwidth by size,
# the median of each over the rounds.
#
#   bench/scripts/ab-xproc.sh XPROC_A XPROC_B [ROUNDS]   (default 8; SIZES=8,2097152,… to change
#                                                        sizes, MACHINE=ucx|ofi|tcp, default ucx)
#
# XPROC_A and XPROC_B are `xproc` binaries, e.g. built in a `git worktree` of the older commit
# (`cargo build --release -p charmrs-xproc-bench --features ucx`) and copied aside. Each round
# runs each binary twice under charmrun (`+p2 ++ppn 1`): with `XPROC_HEAP_BUFFERS=1` (buffers
# on 4 KiB pages; latency and stream) and without (huge pages; stream only). UCX runs use
# UCX_TLS (default shm,self) on the loopback device; libfabric runs FI_PROVIDER (default shm).
set -euo pipefail
cd "$(dirname "$0")/../.."
. bench/scripts/lib.sh
[ $# -ge 2 ] || { sed -n 2,13p "$0" >&2; exit 2; }
a=$1 b=$2 rounds=${3:-8}
sizes=${SIZES:-8,4096,65536,1048576,2097152,4194304}
machine=${MACHINE:-ucx}
export UCX_TLS=${UCX_TLS:-shm,self} UCX_NET_DEVICES=lo UCX_WARN_UNUSED_ENV_VARS=n
export FI_PROVIDER=${FI_PROVIDER:-shm} FI_TCP_IFACE=lo
cargo build --release -q -p charmrs-launcher
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

run() { # binary label
    XPROC_HEAP_BUFFERS=1 XPROC_NO_BARE=1 XPROC_SIZES=$sizes timeout 300 target/release/charmrun \
        ++quiet +p2 ++ppn 1 "$1" +machine "$machine" |
        awk 'NR > 2 && $1 ~ /^[0-9]+$/ {print $1, $2, $7}' >>"$out/$2"
    XPROC_BW_ONLY=1 XPROC_NO_BARE=1 XPROC_SIZES=$sizes timeout 300 target/release/charmrun \
        ++quiet +p2 ++ppn 1 "$1" +machine "$machine" |
        awk 'NR > 2 && $1 ~ /^[0-9]+$/ {print $1, $7}' >>"$out/$2-huge"
}

for round in $(seq 1 "$rounds"); do
    echo "round $round/$rounds" >&2
    run "$a" a
    run "$b" b
done

printf '# +machine %s, medians of %s interleaved rounds; A = %s, B = %s\n' "$machine" "$rounds" "$a" "$b"
printf '%9s %10s %10s %12s %12s %12s %12s\n' size "A µs" "B µs" "A MB/s" "B MB/s" "A huge MB/s" \
    "B huge MB/s"
for size in ${sizes//,/ }; do
    printf '%9d %10s %10s %12s %12s %12s %12s\n' "$size" "$(median_of "$out/a" "$size" 2)" \
        "$(median_of "$out/b" "$size" 2)" "$(median_of "$out/a" "$size" 3)" \
        "$(median_of "$out/b" "$size" 3)" "$(median_of "$out/a-huge" "$size" 2)" \
        "$(median_of "$out/b-huge" "$size" 2)"
done
