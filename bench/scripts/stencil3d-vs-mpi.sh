#!/usr/bin/env bash
# stencil3d in charmrs against the same stencil as an MPI program (rsmpi, same kernel, same grid,
# same initial field), time per step, in one invocation.
#
#   bench/scripts/stencil3d-vs-mpi.sh [REPS]     (default 5; EDGES=16,64 ITERS=1000 to change)
#
# Each repetition runs, one after the other on the same two cores, for every block edge:
#   1. charmrs in one process (`stencil3d +p2`, shared memory);
#   2. charmrs in two processes over UCX (`charmrun +p2 ++ppn 1 stencil3d +machine ucx`);
#   3. `stencil3d-mpi` (bench/stencil-mpi) under OpenMPI on its shared-memory transport
#      (`--mca pml ob1 --mca btl vader,self`);
#   4. `stencil3d-mpi` under OpenMPI over UCX (`--mca pml ucx`, UCX_TLS=shm,self).
# Two blocks of EDGE^3 points (one per PE or rank, the grid cut along x; stencil3d with
# `--blocks-per-pe 1`, no load balancing); the time per step is taken over all ITERS iterations.
# Every run must print the same field checksum (the script stops otherwise). It prints the
# median time per step of each over the repetitions and the ratios to MPI.
# Needs openmpi-bin, libopenmpi-dev, libclang-dev, libucx-dev (ci/test installs them).
set -euo pipefail
cd "$(dirname "$0")/../.."
. bench/scripts/lib.sh
reps=${1:-5}
edges=${EDGES:-16,64}
iters=${ITERS:-1000}
export UCX_TLS=${UCX_TLS:-shm,self} UCX_NET_DEVICES=lo UCX_WARN_UNUSED_ENV_VARS=n
export OMPI_MCA_btl_tcp_if_include=lo OMPI_MCA_oob_tcp_if_include=lo
cargo build --release -q -p charmrs-launcher -p charmrs-apps --features charmrs-apps/ucx --bin stencil3d --bin charmrun
cargo build --release -q -p charmrs-stencil-mpi --features mpi
bin=target/release
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
mpi=(mpirun --allow-run-as-root -np 2 --bind-to core)
common=(--edge EDGE --iters "$iters" --print-every "$iters")
charm=(--blocks-per-pe 1 --lb-warmup 0 --lb-period 0)

run() { # name edge command... : appends "edge ms_per_step" to $out/name, the checksum to $out/sums
    local name=$1 edge=$2
    shift 2
    local text
    text=$("${@//EDGE/$edge}")
    echo "$edge $(awk '/ms\/step/ {print $(NF - 1)}' <<<"$text" | tail -1)" >>"$out/$name"
    echo "$edge $(awk '/field checksum/ {print $3}' <<<"$text")" >>"$out/sums"
}

for rep in $(seq 1 "$reps"); do
    echo "repetition $rep/$reps" >&2
    for edge in ${edges//,/ }; do
        run local "$edge" "$bin/stencil3d" +p2 "${charm[@]}" "${common[@]}"
        run ucx "$edge" "$bin/charmrun" ++quiet +p2 ++ppn 1 "$bin/stencil3d" "${charm[@]}" \
            "${common[@]}" +machine ucx
        run mpi-vader "$edge" "${mpi[@]}" --mca pml ob1 --mca btl vader,self \
            "$bin/stencil3d-mpi" "${common[@]}"
        run mpi-ucx "$edge" "${mpi[@]}" --mca pml ucx --mca pml_ucx_tls any \
            --mca pml_ucx_devices any -x UCX_TLS -x UCX_NET_DEVICES -x UCX_WARN_UNUSED_ENV_VARS \
            "$bin/stencil3d-mpi" "${common[@]}"
    done
done

for edge in ${edges//,/ }; do
    sums=$(awk -v e="$edge" '$1 == e {print $2}' "$out/sums" | sort -u)
    if [ "$(wc -l <<<"$sums")" -ne 1 ] || [ -z "$sums" ]; then
        echo "edge $edge: the programs disagree on the field checksum:" $sums >&2
        exit 1
    fi
done
printf '# ms/step, 2 PEs/ranks, %s iterations, medians of %s repetitions; every run: same field checksum\n' \
    "$iters" "$reps"
printf '%6s %14s %14s %12s %10s %22s %18s\n' edge "charmrs local" "charmrs UCX" "MPI vader" \
    "MPI UCX" "charmrs local/vader" "charmrs UCX/MPI UCX"
for edge in ${edges//,/ }; do
    l=$(median_of "$out/local" "$edge" 2)
    u=$(median_of "$out/ucx" "$edge" 2)
    v=$(median_of "$out/mpi-vader" "$edge" 2)
    m=$(median_of "$out/mpi-ucx" "$edge" 2)
    awk -v e="$edge" -v l="$l" -v u="$u" -v v="$v" -v m="$m" 'BEGIN {
        printf "%6d %14.4f %14.4f %12.4f %10.4f %22.2f %18.2f\n", e, l, u, v, m, l / v, u / m }'
done
