#!/usr/bin/env bash
# One lane per process against one per PE: UCX workers (`CHARMRS_UCX_WORKERS=process|pe`) or
# libfabric endpoints (`CHARMRS_OFI_ENDPOINTS=process|pe`), interleaved round by round so that
# the VM's changes of speed hit both alike: one-way latency and stream bandwidth of an entry call
# between two processes of two PEs each (`+p4 ++ppn 2`), for two placements of the pair:
#   - PEs 0 and 2: the first PE of each process, the one that polls for its process when it has
#     a single lane;
#   - PEs 1 and 3: neither polls for its process with a single lane (every arrival is handed
#     on by PE 0 or 2, whose thread must run too: four busy threads).
#
#   bench/scripts/lanes.sh [ROUNDS]   (default 5; SIZES=8,4096,… to change sizes)
#   MACHINE=ofi bench/scripts/lanes.sh  (default ucx; for ofi FI_PROVIDER=shm by default, or
#                                        FI_PROVIDER="tcp;ofi_rxm")
#
# On a machine with fewer than 4 cores the second placement oversubscribes the cores with one
# lane per process; the script prints the core count with the figures.
set -euo pipefail
cd "$(dirname "$0")/../.."
. bench/scripts/lib.sh
rounds=${1:-5}
sizes=${SIZES:-8,4096,65536,1048576}
machine=${MACHINE:-ucx}
case "$machine" in
ucx)
    export UCX_TLS=${UCX_TLS:-shm,self} UCX_NET_DEVICES=lo UCX_WARN_UNUSED_ENV_VARS=n
    var=CHARMRS_UCX_WORKERS what="UCX workers" transport="UCX_TLS=$UCX_TLS"
    ;;
ofi)
    export FI_PROVIDER=${FI_PROVIDER:-shm} FI_TCP_IFACE=lo
    var=CHARMRS_OFI_ENDPOINTS what="libfabric endpoints" transport="FI_PROVIDER=$FI_PROVIDER"
    ;;
*)
    echo "MACHINE must be ucx or ofi" >&2
    exit 1
    ;;
esac
cargo build --release -q -p charmrs-launcher -p charmrs-xproc-bench --features "$machine"
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

for round in $(seq 1 "$rounds"); do
    echo "round $round/$rounds" >&2
    for pair in "0 2" "1 3"; do
        set -- $pair
        for lanes in process pe; do
            env "$var=$lanes" XPROC_PING_PE=$1 XPROC_PONG_PE=$2 XPROC_HEAP_BUFFERS=1 \
                XPROC_NO_BARE=1 XPROC_SIZES=$sizes timeout 300 target/release/charmrun \
                ++quiet +p4 ++ppn 2 target/release/xproc +machine "$machine" |
                awk 'NR > 2 && $1 ~ /^[0-9]+$/ {print $1, $2, $7}' >>"$out/$lanes-$1$2"
        done
    done
done

echo "# $what per process vs per PE, +p4 ++ppn 2, $transport, $(nproc) cores, medians of $rounds interleaved rounds"
printf '%9s | %-27s | %-27s\n' "" "PEs 0 <-> 2 (pollers)" "PEs 1 <-> 3 (not pollers)"
table() { # unit column
    printf '%9s | %13s %13s | %13s %13s\n' "size" "process $1" "pe $1" "process $1" "pe $1"
    for s in ${sizes//,/ }; do
        printf '%9s | %13s %13s | %13s %13s\n' "$s" \
            "$(median_of "$out/process-02" "$s" "$2")" "$(median_of "$out/pe-02" "$s" "$2")" \
            "$(median_of "$out/process-13" "$s" "$2")" "$(median_of "$out/pe-13" "$s" "$2")"
    done
}
table µs 2
table MB/s 3
