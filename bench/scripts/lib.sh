# Shell helpers shared by the comparison scripts in this directory (sourced, not run).

# median_of FILE SIZE COLUMN: the median of COLUMN over the rows of FILE whose first column is SIZE
# (the lower middle value for an even count).
median_of() {
    awk -v s="$2" -v c="$3" '$1 == s {print $c}' "$1" | sort -g |
        awk '{v[NR] = $1} END {print v[int((NR + 1) / 2)]}'
}
