#!/usr/bin/env python3
"""A kernel's instruction mix and stall sites from Nsight Compute's source page (ncu -i REPORT --page source --csv
--print-source sass, as scripts/device-ncu.sh writes it): warp instructions executed and warp-stall samples per
opcode, and the instructions with the most stall samples (the stall shows on the instruction that waited, e.g. the
first use of a load's result).

    python3 scripts/sass_summary.py SASS_CSV [--top 25]
"""
import argparse
import collections
import csv
import re


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv")
    ap.add_argument("--top", type=int, default=25)
    a = ap.parse_args()
    rows = list(csv.reader(open(a.csv)))
    header = next(i for i, r in enumerate(rows) if "Source" in r and "Instructions Executed" in r)
    cols = rows[header]
    src, execd = cols.index("Source"), cols.index("Instructions Executed")
    stall = cols.index("Warp Stall Sampling (All Samples)")
    ops, stalls, lines = collections.Counter(), collections.Counter(), []
    for r in rows[header + 1:]:
        try:
            n, s = int(r[execd].replace(",", "")), int(r[stall].replace(",", ""))
        except (IndexError, ValueError):
            continue
        text = r[src].strip()
        m = re.match(r"(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", text)
        op = m.group(1) if m else text
        ops[op] += n
        stalls[op] += s
        lines.append((s, n, text))
    total, total_stalls = sum(ops.values()) or 1, sum(stalls.values()) or 1
    print("%d warp instructions, %d stall samples" % (total, total_stalls))
    for op, n in ops.most_common(a.top):
        share, stall_share = 100 * n / total, 100 * stalls[op] / total_stalls
        print("  %-12s %6.1f%% of instructions  %6.1f%% of stalls" % (op, share, stall_share))
    print("most stalled instructions (samples, executions):")
    for s, n, text in sorted(lines, reverse=True)[: a.top // 2]:
        print("  %7d %10d  %s" % (s, n, text[:100]))


if __name__ == "__main__":
    main()
