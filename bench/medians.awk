# bench/medians.awk: read `BENCH <name> <value> <unit>` lines (several runs of a benchmark)
# and print one `BENCH <name> <median> <unit>` line per name, sorted by name (the lower
# median for an even count). Used by bench/*.sh.
$1 == "BENCH" {
    n = ++count[$2]
    val[$2, n] = $3 # as printed; compared as numbers
    unit[$2] = $4
}
END {
    for (k in count) {
        m = count[k]
        for (i = 2; i <= m; i++) { # insertion sort: a handful of runs
            x = val[k, i]
            for (j = i - 1; j >= 1 && val[k, j] + 0 > x + 0; j--)
                val[k, j + 1] = val[k, j]
            val[k, j + 1] = x
        }
        print "BENCH", k, val[k, int((m + 1) / 2)], unit[k] | "sort"
    }
}
