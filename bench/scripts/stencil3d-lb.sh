#!/usr/bin/env bash
# stencil3d with the paper's synthetic imbalance: load balancing (GreedyRefine) against no
# balancer, in one invocation, as interleaved pairs of runs (the machine may be shared: medians).
#
#   bench/scripts/stencil3d-lb.sh [PAIRS (5)] [extra stencil3d arguments…]
#
# The runs have 8 PEs (+p8): an extra +p with another count is refused ("+p given twice").
#
# Prints every run's total time, then the medians and the speedup (median ratio of the pairs).
set -euo pipefail
cd "$(dirname "$0")/../.."
pairs=${1:-5}
shift || true
cargo build --release -q -p charmrs-apps --bin stencil3d
bin="${CARGO_TARGET_DIR:-target}/release/stencil3d"
total() { "$bin" +p8 --imbalance "$@" | awk '/^Total time:/ {print $3}'; }
lb=() nolb=() ratio=()
for i in $(seq "$pairs"); do
    a=$(total +balancer GreedyRefine "$@")
    b=$(total "$@")
    lb+=("$a") nolb+=("$b")
    ratio+=("$(awk -v a="$a" -v b="$b" 'BEGIN {printf "%.3f", b / a}')")
    echo "pair $i: GreedyRefine $a s, no balancer $b s, speedup ${ratio[-1]}"
done
median() { printf '%s\n' "$@" | sort -g | awk '{v[NR]=$1} END {print (NR%2 ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2)}'; }
echo "median: GreedyRefine $(median "${lb[@]}") s, no balancer $(median "${nolb[@]}") s, speedup $(median "${ratio[@]}") (best $(printf '%s\n' "${ratio[@]}" | sort -g | tail -1))"
