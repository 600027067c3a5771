#!/usr/bin/env python3
"""Where a kernel timeline's time goes: reads the intervals `moerl bench gpu` writes with MOERL_GPU_TRACE=1
MOERL_GPU_TRACE_DUMP=PREFIX (PREFIX<label>.tsv: start_ns, end_ns, stream, name per line) and prints

  - per kernel name, its share of the span: each instant split evenly among the intervals running then, so that
    concurrent kernels (the MoE lanes, the side streams) are not counted twice and the shares add up to the busy
    time;
  - the idle time between intervals of 1-100 us by transition (the work before -> the work after), the launches
    the GPU waited for.

    python3 scripts/trace_summary.py TSV [--steps 3] [--top 40]
"""
import argparse
import collections
import re
import signal


def short(name):
    name = name.replace("fp8::cuda::", "").replace("quant_detail::", "").replace("cuda::", "")
    m = re.match(r"nvjet_sm90_(\w+?)_(\d+x\d+)_.*?_([TN]\w\w)$", name)
    if m:  # cuBLASLt's kernels: types, tile and layouts
        return "cuBLASLt %s %s %s%s" % (m.group(1), m.group(2), m.group(3), " badd" if "badd" in name else "")
    return name[:90]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tsv")
    ap.add_argument("--steps", type=int, default=3, help="steps the timeline holds (divides the totals)")
    ap.add_argument("--top", type=int, default=40)
    a = ap.parse_args()
    rows = []
    for line in open(a.tsv):
        start, end, stream, name = line.rstrip("\n").split("\t", 3)
        rows.append((int(start), int(end), int(stream), short(name)))
    rows.sort()
    per = 1e6 * max(a.steps, 1)  # ns -> ms per step

    events = sorted([(s, 1, n) for s, e, _, n in rows] + [(e, -1, n) for s, e, _, n in rows])
    active, share, idle, last = collections.Counter(), collections.Counter(), 0, events[0][0] if events else 0
    for t, d, n in events:
        if t > last:
            total = sum(active.values())
            if total == 0:
                idle += t - last
            for k, v in active.items():
                share[k] += (t - last) * v / total
        last = t
        active[n] += d
        if active[n] == 0:
            del active[n]
    span = events[-1][0] - events[0][0] if events else 0
    print("span %.3f ms/step, idle %.3f ms/step" % (span / per, idle / per))
    print("time by kernel (ms/step; concurrent work shares the time):")
    for k, v in share.most_common(a.top):
        print("  %8.3f  %s" % (v / per, k))

    gaps, count, busy, before = collections.Counter(), collections.Counter(), 0, ""
    for s, e, _, n in rows:
        if busy and s > busy and 1000 <= s - busy < 100000:
            gaps[(before, n)] += s - busy
            count[(before, n)] += 1
        if e > busy:
            busy, before = e, n
    print("idle gaps of 1-100 us by transition: %.3f ms/step" % (sum(gaps.values()) / per))
    for (b, n), v in gaps.most_common(a.top // 2):
        print("  %8.1f us/step in %5.1f gaps  %s -> %s" % (v / per * 1000, count[(b, n)] / a.steps, b, n))


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # quiet when piped into head
    main()
