#!/usr/bin/env bash
# charmrs entry methods over UCX against UCX's own `ucx_perftest`, in one invocation.
#
#   bench/scripts/ucx-vs-perftest.sh [REPS]      (default 5; SIZES=8,1048576,... to change sizes)
#
# Each repetition runs, one after the other on the same two cores:
#   1. the cross-process harness `xproc` under charmrun (`+p2 ++ppn 1 +machine ucx`, without its
#      bare-socket columns): one-way
#      latency of an entry call carrying a `Buffer` (ping-pong / 2) and the bandwidth of a stream
#      of such calls (windows of 16, one acknowledgement per window);
#   2. the ping-pong of the smallest entry call, one `u64` argument (`XPROC_WORD=1`: 8 bytes of
#      arguments, the peer known in advance), beside the 8 B `Buffer` call of step 1;
#   3. the same stream again with huge-page buffers on both sides: `xproc` sending `BufferMut`s,
#      `ucp_am_bw` with UCX_ALLOC_PRIO=thp,mmap,heap (4 KiB pages again if the kernel has no
#      transparent huge pages; its default allocator puts its buffers in SysV shared
#      memory, 4 KiB pages; `xproc` otherwise sends `Vec`s, XPROC_HEAP_BUFFERS=1). CMA pins the
#      sender's pages one by one, so the page size moves both programs' 64 KiB – 4 MiB streams;
#   4. `ucx_perftest -t ucp_am_lat` and `-t ucp_am_bw` (server and client on 127.0.0.1) for the
#      same sizes (`ucp_am_bw` also with huge pages, as in step 3).
# It prints the median of each column over the repetitions. Latencies are averages over the
# iterations on both sides (`xproc` times the whole ping-pong; `ucx_perftest`'s "average" column,
# not its "typical" one, which is a median and leaves out the tail). Bandwidth is in MB/s of 10^6 bytes
# (ucx_perftest's 2^20-byte figures are converted). Both sides use UCX_TLS (default shm,self).
# Needs the ucx-utils and libucx-dev packages (ci/test installs them).
set -euo pipefail
cd "$(dirname "$0")/../.."
. bench/scripts/lib.sh
reps=${1:-5}
sizes=${SIZES:-8,4096,65536,262144,1048576,2097152,4194304}
export UCX_TLS=${UCX_TLS:-shm,self} UCX_NET_DEVICES=lo UCX_WARN_UNUSED_ENV_VARS=n
command -v ucx_perftest >/dev/null || { echo "ucx_perftest not found: apt-get install ucx-utils" >&2; exit 1; }
cargo build --release -q -p charmrs-launcher -p charmrs-xproc-bench --features ucx
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

perftest() { # test size iterations -> prints "lat_avg_us bw_MBps(1e6)"
    local port=$((20000 + RANDOM % 20000))
    timeout 60 ucx_perftest -t "$1" -s "$2" -n "$3" -p "$port" >/dev/null 2>&1 &
    local server=$!
    sleep 0.3
    timeout 60 ucx_perftest 127.0.0.1 -t "$1" -s "$2" -n "$3" -p "$port" 2>/dev/null |
        awk '/^Final:/ {printf "%s %.1f\n", $4, $7 * 1.048576}'
    wait "$server" || true
}

for rep in $(seq 1 "$reps"); do
    echo "repetition $rep/$reps" >&2
    XPROC_HEAP_BUFFERS=1 XPROC_NO_BARE=1 XPROC_SIZES=$sizes target/release/charmrun ++quiet +p2 \
        ++ppn 1 target/release/xproc +machine ucx | awk 'NR > 2 && $1 ~ /^[0-9]+$/ {print $1, $2, $7}' >>"$out/charmrs"
    XPROC_WORD=1 target/release/charmrun ++quiet +p2 ++ppn 1 target/release/xproc +machine ucx |
        awk '$1 == "word" {print 8, $2}' >>"$out/charmrs-word"
    XPROC_BW_ONLY=1 XPROC_NO_BARE=1 XPROC_SIZES=$sizes target/release/charmrun ++quiet +p2 ++ppn 1 \
        target/release/xproc +machine ucx | awk 'NR > 2 && $1 ~ /^[0-9]+$/ {print $1, $7}' >>"$out/charmrs-huge"
    for size in ${sizes//,/ }; do
        iters=$((size <= 65536 ? 20000 : 2000))
        lat=$(perftest ucp_am_lat "$size" "$iters" | awk '{print $1}')
        bw=$(perftest ucp_am_bw "$size" "$iters" | awk '{print $2}')
        bw_huge=$(UCX_ALLOC_PRIO=thp,mmap,heap perftest ucp_am_bw "$size" "$iters" | awk '{print $2}')
        echo "$size $lat $bw $bw_huge" >>"$out/perftest"
    done
done

printf '# UCX_TLS=%s, medians of %s repetitions; stream columns: 4 KiB pages (Vec / SysV), then huge pages\n' \
    "$UCX_TLS" "$reps"
printf '%9s %11s %14s %6s %13s %15s %6s %13s %15s %6s\n' size "charmrs µs" "ucp_am_lat µs" ratio \
    "charmrs MB/s" "ucp_am_bw MB/s" ratio "huge MB/s" "am_bw thp MB/s" ratio
for size in ${sizes//,/ }; do
    cl=$(median_of "$out/charmrs" "$size" 2)
    cb=$(median_of "$out/charmrs" "$size" 3)
    ch=$(median_of "$out/charmrs-huge" "$size" 2)
    pl=$(median_of "$out/perftest" "$size" 2)
    pb=$(median_of "$out/perftest" "$size" 3)
    ph=$(median_of "$out/perftest" "$size" 4)
    awk -v s="$size" -v cl="$cl" -v pl="$pl" -v cb="$cb" -v pb="$pb" -v ch="$ch" -v ph="$ph" 'BEGIN {
        printf "%9d %11.3f %14.3f %6.2f %13.0f %15.0f %6.2f %13.0f %15.0f %6.2f\n",
            s, cl, pl, cl / pl, cb, pb, cb / pb, ch, ph, ch / ph }'
done
if [[ ",$sizes," == *",8,"* ]]; then
    cw=$(median_of "$out/charmrs-word" 8 2)
    pl=$(median_of "$out/perftest" 8 2)
    awk -v cw="$cw" -v pl="$pl" 'BEGIN {
        printf "# one-word entry call (a u64 argument, XPROC_WORD=1): %.3f µs one-way, %.2f× ucp_am_lat at 8 B\n", cw, cw / pl }'
fi
