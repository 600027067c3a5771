#!/usr/bin/env bash
# Nsight Compute on the H200 machine (its image has ncu; the clocks are left alone: --clock-control none): one launch
# of a kernel, chosen by a regular expression on its demangled name, in a `moerl bench gpu --only BENCH` run; every
# section, and the per-instruction (SASS) execution counts and warp-stall samples. Uses build-gpu/carry/carry.tgz as
# scripts/device-run.sh does. Each argument is NAME=REGEX@SKIP@BENCH (SKIP: matching launches to pass over first, so
# that the one profiled is a warm one; BENCH: moe_layer, train_step, attention ...):
#
#   bash scripts/device-ncu.sh 'bpr=BackwardPairRows@5@moe_layer' 'dkdv=attention_dkdv@20@train_step'
#
# ncu matches REGEX against names as it demangles them, with template arguments written (bool)1, (int)128: e.g.
# 'dual=PlainSource, \(bool\)1, \(bool\)1, \(int\)128, \(int\)0@5@quantize' (log_NAME.txt lists the launches' names
# when nothing matched).
#
# $OUT/ncu.txz: details_NAME.txt (every section, `--page details --print-details all`) and sass_NAME.csv (the source
# page, for scripts/sass_summary.py); printed: each kernel's duration, DRAM throughput and issue-slot use, then its
# instruction mix.
set -uo pipefail
[ $# -ge 1 ] || { echo "usage: $0 NAME=REGEX@SKIP@BENCH ..." >&2; exit 2; }
out=${OUT:-/tmp/moerl-device}
mkdir -p "$out" /tmp/moerl-carry /tmp/moerl-ncu
tar xf build-gpu/carry/carry.tgz -C /tmp/moerl-carry
export LD_LIBRARY_PATH=/tmp/moerl-carry/rtlib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
ncu=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
[ -n "$ncu" ] || { echo "no ncu on this machine" >&2; exit 1; }
sections=()
for s in SpeedOfLight ComputeWorkloadAnalysis MemoryWorkloadAnalysis InstructionStats WarpStateStats SchedulerStats \
         Occupancy LaunchStats SourceCounters; do
  sections+=(--section "$s")
done
status=0
for spec in "$@"; do
  name=${spec%%=*} rest=${spec#*=}
  regex=${rest%%@*} rest=${rest#*@}
  skip=${rest%%@*} bench=${rest#*@}
  report=/tmp/moerl-ncu/$name
  if ! timeout 200 "$ncu" --clock-control none --kernel-name-base demangled -k "regex:$regex" --launch-skip "$skip" \
      --launch-count 1 "${sections[@]}" -f -o "$report" /tmp/moerl-carry/bin/moerl bench gpu \
      --only "$bench" >"/tmp/moerl-ncu/log_$name.txt" 2>&1 || [ ! -f "$report.ncu-rep" ]; then
    echo "$name: ncu failed (log_$name.txt)" >&2
    status=1
    continue
  fi
  "$ncu" -i "$report.ncu-rep" --page details --print-details all >"/tmp/moerl-ncu/details_$name.txt" 2>&1
  "$ncu" -i "$report.ncu-rep" --page source --csv --print-source sass >"/tmp/moerl-ncu/sass_$name.csv" 2>&1
  echo "== $name ($regex, launch $skip, $bench)"
  grep -m3 -E "Duration|DRAM Throughput|Issue Slots Busy" "/tmp/moerl-ncu/details_$name.txt"
  python3 scripts/sass_summary.py "/tmp/moerl-ncu/sass_$name.csv" --top 12
done
tar cJf "$out/ncu.txz" -C /tmp/moerl-ncu $(cd /tmp/moerl-ncu && ls details_* sass_* log_* 2>/dev/null)
exit $status
