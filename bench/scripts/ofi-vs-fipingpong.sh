#!/usr/bin/env bash
# charmrs entry methods over libfabric against libfabric's own `fi_pingpong`, in one invocation.
#
#   bench/scripts/ofi-vs-fipingpong.sh [REPS]   (default 5; SIZES=8,65536,... PROVIDERS="shm" to change)
#
# For each provider (default `shm` and `tcp;ofi_rxm`), each repetition runs, one after the other on
# the same cores:
#   1. the cross-process harness `xproc` under charmrun (`+p2 ++ppn 1 +machine ofi`, without its
#      bare-socket columns): one-way latency of an entry call carrying a `Buffer` (ping-pong / 2)
#      and the bandwidth of a burst of such calls;
#   2. `fi_pingpong -e rdm -p <provider>` (server and client on 127.0.0.1) for the same sizes: its
#      one-way latency (usec/xfer) and its ping-pong bandwidth (MB/sec).
# It prints the median of each column over the repetitions; MB = 10^6 bytes. Ping-pong bandwidth
# is size / one-way time for both (fi_pingpong's MB/sec); charmrs's stream (a burst of calls, no
# equivalent in fi_pingpong) is printed beside it. `fi_rma_bw` is not packaged by Debian
# (libfabric-bin 1.17 holds fi_info, fi_pingpong and fi_strerror only), so the bandwidth
# reference is fi_pingpong's. Both send from heap memory (4 KiB pages; `xproc` with
# XPROC_HEAP_BUFFERS=1, not the huge-page `BufferMut`s it sends by default).
# FI_TCP_IFACE=lo is forced. Needs libfabric-dev and libfabric-bin
# (ci/test installs them).
set -euo pipefail
cd "$(dirname "$0")/../.."
. bench/scripts/lib.sh
reps=${1:-5}
sizes=${SIZES:-8,4096,65536,1048576,4194304}
providers=${PROVIDERS:-"shm tcp;ofi_rxm"}
export FI_TCP_IFACE=lo
command -v fi_pingpong >/dev/null || { echo "fi_pingpong not found: apt-get install libfabric-bin" >&2; exit 1; }
cargo build --release -q -p charmrs-launcher -p charmrs-xproc-bench --features ofi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

pingpong() { # provider size -> prints "lat_us MBps"
    local port=$((20000 + RANDOM % 20000)) iters
    iters=$(($2 <= 65536 ? 10000 : 1000))
    fi_pingpong -e rdm -p "$1" -I "$iters" -S "$2" -B "$port" >/dev/null 2>&1 &
    local server=$!
    sleep 0.3
    timeout 120 fi_pingpong -e rdm -p "$1" -I "$iters" -S "$2" -P "$port" 127.0.0.1 2>/dev/null |
        awk 'END {print $7, $6}'
    wait "$server" || true
}

for provider in $providers; do
    tag=${provider//;/_}
    for rep in $(seq 1 "$reps"); do
        echo "$provider: repetition $rep/$reps" >&2
        FI_PROVIDER=$provider XPROC_HEAP_BUFFERS=1 XPROC_NO_BARE=1 XPROC_SIZES=$sizes timeout 300 \
            target/release/charmrun ++quiet +p2 ++ppn 1 target/release/xproc +machine ofi |
            awk 'NR > 2 && $1 ~ /^[0-9]+$/ {print $1, $2, $7}' >>"$out/charmrs.$tag"
        for size in ${sizes//,/ }; do
            echo "$size $(pingpong "$provider" "$size")" >>"$out/pingpong.$tag"
        done
    done
done

for provider in $providers; do
    tag=${provider//;/_}
    printf '# FI_PROVIDER=%s, medians of %s repetitions\n' "$provider" "$reps"
    printf '%9s %12s %16s %7s %14s %18s %7s %16s\n' size "charmrs µs" "fi_pingpong µs" ratio \
        "charmrs MB/s" "fi_pingpong MB/s" ratio "stream MB/s"
    for size in ${sizes//,/ }; do
        cl=$(median_of "$out/charmrs.$tag" "$size" 2)
        cb=$(median_of "$out/charmrs.$tag" "$size" 3)
        pl=$(median_of "$out/pingpong.$tag" "$size" 2)
        pb=$(median_of "$out/pingpong.$tag" "$size" 3)
        awk -v s="$size" -v cl="$cl" -v pl="$pl" -v cb="$cb" -v pb="$pb" 'BEGIN {
            printf "%9d %12.3f %16.3f %7.2f %14.0f %18.0f %7.2f %16.0f\n", s, cl, pl, cl / pl,
                s / cl, pb, s / cl / pb, cb }'
    done
done
