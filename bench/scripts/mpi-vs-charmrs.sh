#!/usr/bin/env bash
# charmrs entry calls against OpenMPI's MPI_Send/MPI_Recv and UCX's own active messages, one-way
# latency by message size, in one invocation.
#
#   bench/scripts/mpi-vs-charmrs.sh [REPS]     (default 5; SIZES=8,4096,... to change sizes)
#
# Each repetition runs, one after the other on the same two cores, two processes each:
#   1. charmrs: the cross-process harness `xproc` under charmrun (`+p2 ++ppn 1 +machine ucx`),
#      an entry call carrying a `Buffer` of the size, ping-pong / 2;
#   2. OpenMPI over UCX (`--mca pml ucx`, its shared-memory transports: the same path as 1);
#   3. OpenMPI over its own shared-memory transport (`--mca pml ob1 --mca btl vader,self`);
#   4. `ucx_perftest -t ucp_am_lat` (UCX active messages alone).
# 2 and 3 run bench/mpi/pingpong.c (MPI_Send/MPI_Recv ping-pong / 2, buffer written once and
# reused, warm-up first), built here with mpicc. It prints the median of each over the
# repetitions. UCX runs use UCX_TLS (default shm,self) on the loopback device only.
# Needs openmpi-bin, libopenmpi-dev, ucx-utils and libucx-dev (ci/test installs them).
set -euo pipefail
cd "$(dirname "$0")/../.."
. bench/scripts/lib.sh
reps=${1:-5}
sizes=${SIZES:-8,4096,65536}
export UCX_TLS=${UCX_TLS:-shm,self} UCX_NET_DEVICES=lo UCX_WARN_UNUSED_ENV_VARS=n
for tool in mpicc mpirun ucx_perftest; do
    command -v "$tool" >/dev/null || {
        echo "$tool not found: apt-get install openmpi-bin libopenmpi-dev ucx-utils" >&2
        exit 1
    }
done
cargo build --release -q -p charmrs-launcher -p charmrs-xproc-bench --features ucx
mkdir -p target/release
mpicc -O2 -o target/release/mpi-pingpong bench/mpi/pingpong.c
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
# Loopback only; root may run mpirun here (a container).
mpi=(mpirun --allow-run-as-root -np 2 --bind-to core --mca btl_tcp_if_include lo
    --mca oob_tcp_if_include lo)

perftest() { # size iterations -> prints the average one-way latency in µs
    local port=$((20000 + RANDOM % 20000))
    timeout 60 ucx_perftest -t ucp_am_lat -s "$1" -n "$2" -p "$port" >/dev/null 2>&1 &
    local server=$!
    sleep 0.3
    timeout 60 ucx_perftest 127.0.0.1 -t ucp_am_lat -s "$1" -n "$2" -p "$port" 2>/dev/null |
        awk '/^Final:/ {print $4}'
    wait "$server" || true
}

for rep in $(seq 1 "$reps"); do
    echo "repetition $rep/$reps" >&2
    XPROC_CHARMRS_ONLY=1 XPROC_NO_BARE=1 XPROC_SIZES=$sizes XPROC_REPEATS=5 \
        target/release/charmrun ++quiet +p2 ++ppn 1 target/release/xproc +machine ucx |
        awk 'NR > 2 && $1 ~ /^[0-9]+$/ {print $1, $2}' >>"$out/charmrs"
    "${mpi[@]}" --mca pml ucx --mca pml_ucx_tls any --mca pml_ucx_devices any -x UCX_TLS \
        -x UCX_NET_DEVICES -x UCX_WARN_UNUSED_ENV_VARS target/release/mpi-pingpong ${sizes//,/ } \
        >>"$out/mpi-ucx"
    "${mpi[@]}" --mca pml ob1 --mca btl vader,self target/release/mpi-pingpong ${sizes//,/ } \
        >>"$out/mpi-vader"
    for size in ${sizes//,/ }; do
        echo "$size $(perftest "$size" $((size <= 65536 ? 20000 : 2000)))" >>"$out/perftest"
    done
done

printf '# one-way µs, UCX_TLS=%s, medians of %s repetitions\n' "$UCX_TLS" "$reps"
printf '%9s %11s %11s %13s %14s %16s %18s\n' size charmrs "MPI (UCX)" "MPI (vader)" \
    "ucp_am_lat" "charmrs/MPI-UCX" "charmrs/MPI-vader"
for size in ${sizes//,/ }; do
    c=$(median_of "$out/charmrs" "$size" 2)
    u=$(median_of "$out/mpi-ucx" "$size" 2)
    v=$(median_of "$out/mpi-vader" "$size" 2)
    p=$(median_of "$out/perftest" "$size" 2)
    awk -v s="$size" -v c="$c" -v u="$u" -v v="$v" -v p="$p" 'BEGIN {
        printf "%9d %11.3f %11.3f %13.3f %14.3f %16.2f %18.2f\n", s, c, u, v, p, c / u, c / v }'
done
