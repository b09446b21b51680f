#!/usr/bin/env bash
# charmrs between two hosts against the raw transports between the same two hosts, in one
# invocation: the emulated hosts of ci/netns-hosts (node0 and node1, a network namespace each,
# joined by a bridge: the path between them is the kernel's TCP/IP over a veth pair, not
# loopback). Needs root; starts the hosts if they are not up (and stops them at the end).
#
#   bench/scripts/hosts-vs-raw.sh [REPS]      (default 5; SIZES=8,65536,1048576 to change sizes)
#
# Each repetition runs, one after the other, one process on each host:
#   1. `xproc` under mpirun (`+p2`, a PE per process) over the TCP layer, with its bare-socket
#      ping-pong between the same two processes (blocking and busy-polling sockets); over UCX
#      (its TCP transport on eth0); over libfabric (`tcp;ofi_rxm` on eth0): one-way latency of
#      an entry call carrying a `Buffer` (ping-pong / 2);
#   2. `ucx_perftest -t ucp_am_lat` (UCX_TLS=tcp,self on eth0) and `fi_pingpong` (`tcp;ofi_rxm`
#      on eth0), server on node1, client on node0.
# It prints the median of each over the repetitions ("nan" where a tool printed no figure). (OpenMPI is not compared: between these
# namespaces its TCP transport fails to connect and its UCX one hangs.)
# Needs libucx-dev, ucx-utils, libfabric-dev, libfabric-bin, openmpi-bin and iproute2 (ci/test
# installs them).
set -euo pipefail
cd "$(dirname "$0")/../.."
. bench/scripts/lib.sh
reps=${1:-5}
sizes=${SIZES:-8,65536,1048576}
for tool in ucx_perftest fi_pingpong mpirun; do
    command -v "$tool" >/dev/null || { echo "$tool not found (ucx-utils, libfabric-bin, openmpi-bin)" >&2; exit 1; }
done
cargo build --release -q -p charmrs-xproc-bench --features pmix,ucx,ofi
started=false
out=$(mktemp -d)
trap 'rm -rf "$out"; if $started; then ci/netns-hosts stop; fi' EXIT
namespaces=$'\n'$(ip netns list | awk '{print $1}')$'\n'
if [[ $namespaces != *$'\n'charmrs-node1$'\n'* ]]; then
    started=true
    ci/netns-hosts start 2 >/dev/null
fi
# Nothing inherited pins a tool to loopback or picks a layer.
unset UCX_NET_DEVICES UCX_TLS FI_TCP_IFACE FI_PROVIDER OMPI_MCA_btl_tcp_if_include \
    OMPI_MCA_oob_tcp_if_include CHARMRS_MACHINE CHARMRS_PES
on() { ci/netns-hosts rsh "$@"; } # host command-line

# xproc with one process per host: mpirun on node0 reaching node1 through the hosts' rsh. Not
# bound, and its PE threads not pinned: each process is alone on its (emulated) host, so mpirun
# would bind each, and charmrs pin each PE, to the first core, the same one (the raw tools do
# not pin either).
xproc() { # layer VAR=value…
    local layer=$1 envs="" e
    shift
    for e in CHARMRS_PES=1 XPROC_HEAP_BUFFERS=1 XPROC_SIZES="$sizes" "$@"; do
        envs+=" -x $(printf %q "$e")"
    done
    on node0 "timeout 300 mpirun --allow-run-as-root --host node0:1,node1:1 -np 2 --bind-to none \
        --mca plm_rsh_agent $PWD/ci/netns-hosts-rsh --mca oob_tcp_if_include eth0 $envs \
        $PWD/target/release/xproc +machine $layer +noaffinity"
}

# A raw tool's server on node1 (command line $1), its client on node0 (command line $2, whose
# output the awk program $3 turns into the figure); "nan" if the client fails.
server_client() {
    on node1 "$1" >/dev/null 2>&1 &
    local server=$!
    sleep 0.5
    on node0 "$2" 2>/dev/null | awk "$3" || echo nan
    wait "$server" || true
}

perftest() { # size -> the average one-way latency in µs
    local port=$((20000 + RANDOM % 20000)) ucx="UCX_TLS=tcp,self UCX_NET_DEVICES=eth0"
    local test="timeout 120 ucx_perftest -t ucp_am_lat -s $1 -n 10000 -p $port"
    server_client "$ucx $test" "$ucx ${test/ucx_perftest/ucx_perftest 10.231.0.2}" \
        '/^Final:/ {v = $4} END {print (v == "" ? "nan" : v)}'
}

pingpong() { # size -> the one-way latency in µs
    local port=$((20000 + RANDOM % 20000)) iters fi="FI_PROVIDER='tcp;ofi_rxm' FI_TCP_IFACE=eth0"
    iters=$(($1 <= 65536 ? 10000 : 1000))
    local test="timeout 120 fi_pingpong -e rdm -I $iters -S $1"
    server_client "$fi $test -B $port" "$fi $test -P $port 10.231.0.2" \
        'END {print ($7 ~ /^[0-9.]+$/ ? $7 : "nan")}'
}

for rep in $(seq 1 "$reps"); do
    echo "repetition $rep/$reps" >&2
    # size, charmrs µs, bare blocking µs, bare spinning µs
    xproc tcp XPROC_BARE_PEER=10.231.0.2 |
        awk 'NR > 2 && $1 ~ /^[0-9]+$/ {print $1, $2, $3, $5}' >>"$out/tcp"
    xproc ucx XPROC_NO_BARE=1 UCX_TLS=tcp,self UCX_NET_DEVICES=eth0 |
        awk 'NR > 2 && $1 ~ /^[0-9]+$/ {print $1, $2}' >>"$out/ucx"
    xproc ofi XPROC_NO_BARE=1 "FI_PROVIDER=tcp;ofi_rxm" FI_TCP_IFACE=eth0 |
        awk 'NR > 2 && $1 ~ /^[0-9]+$/ {print $1, $2}' >>"$out/ofi"
    for size in ${sizes//,/ }; do
        echo "$size $(perftest "$size") $(pingpong "$size")" >>"$out/raw"
    done
done

printf '# two emulated hosts (veth + bridge), one process each; one-way µs, medians of %s\n' "$reps"
printf '%9s %12s %12s %12s %12s %14s %12s %14s\n' size "charmrs tcp" "bare socket" "bare spin" \
    "charmrs ucx" "ucp_am_lat" "charmrs ofi" "fi_pingpong"
for size in ${sizes//,/ }; do
    printf '%9d %12.2f %12.2f %12.2f %12.2f %14.2f %12.2f %14.2f\n' "$size" \
        "$(median_of "$out/tcp" "$size" 2)" "$(median_of "$out/tcp" "$size" 3)" \
        "$(median_of "$out/tcp" "$size" 4)" "$(median_of "$out/ucx" "$size" 2)" \
        "$(median_of "$out/raw" "$size" 2)" "$(median_of "$out/ofi" "$size" 2)" \
        "$(median_of "$out/raw" "$size" 3)"
done
