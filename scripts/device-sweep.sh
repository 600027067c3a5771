#!/usr/bin/env bash
# A/B comparison of settings on the H200 machine, side by side in one device call: runs
# `moerl bench gpu --only $MOERL_SWEEP_ONLY` once per setting per round, the settings interleaved round after round
# (A B C A B C ...), so that a drift of the GPU's clocks during the call spreads over all of them instead of
# favouring the first. A setting is a space-separated list of environment assignments, or "-" for none (the
# defaults). Uses the binaries of build-gpu/carry/carry.tgz as scripts/device-run.sh does.
#
#   bash scripts/device-sweep.sh - "MOERL_MOE_LANES=8" "MOERL_LT_FP8_ALGO=2 MOERL_MOE_LANES=8"
#     MOERL_SWEEP_ONLY=moe_layer,train_step  benchmarks of `moerl bench gpu --only` (default: moe_layer)
#     MOERL_SWEEP_ROUNDS=3                   rounds (default 3)
#
# $OUT/sweep.jsonl: every metric line of every run with "setting" and "round" added; $OUT/sweep.txt (also
# printed): per setting and metric, the median over the rounds and the range.
set -uo pipefail
[ $# -ge 1 ] || { echo "usage: $0 SETTING... (a setting: \"NAME=VALUE ...\" or - for the defaults)" >&2; exit 2; }
out=${OUT:-/tmp/moerl-device}
only=${MOERL_SWEEP_ONLY:-moe_layer}
rounds=${MOERL_SWEEP_ROUNDS:-3}
mkdir -p "$out"
if [ -z "${MOERL_SWEEP_BIN:-}" ]; then
  mkdir -p /tmp/moerl-carry
  tar xf build-gpu/carry/carry.tgz -C /tmp/moerl-carry  # gzip or xz
  export LD_LIBRARY_PATH=/tmp/moerl-carry/rtlib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
fi
moerl=${MOERL_SWEEP_BIN:-/tmp/moerl-carry/bin/moerl}  # MOERL_SWEEP_BIN: another binary (the script's own test)
: >"$out/sweep.jsonl"
status=0
for ((round = 1; round <= rounds; ++round)); do
  for setting in "$@"; do
    assignments=()
    [ "$setting" != - ] && read -r -a assignments <<<"$setting"
    if ! env "${assignments[@]}" "$moerl" bench gpu --only "$only" 2>>"$out/sweep.err" >"$out/run.jsonl"; then
      echo "setting '$setting', round $round: moerl bench gpu failed (see sweep.err)" >&2
      status=1
    fi
    python3 - "$setting" "$round" "$out/run.jsonl" >>"$out/sweep.jsonl" <<'EOF'
import json, sys
setting, rnd, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
for line in open(path):
    line = line.strip()
    if not line.startswith("{"):
        continue
    d = json.loads(line)
    d["setting"], d["round"] = setting, rnd
    print(json.dumps(d))
EOF
  done
done
python3 - "$out/sweep.jsonl" <<'EOF' | tee "$out/sweep.txt"
import json, statistics, sys
runs = {}
for line in open(sys.argv[1]):
    d = json.loads(line)
    runs.setdefault((d["metric"], d["unit"]), {}).setdefault(d["setting"], []).append(d["value"])
for (metric, unit), by_setting in runs.items():
    print(f"{metric} ({unit}): median over rounds [min .. max]")
    base = None
    for setting, values in by_setting.items():
        m = statistics.median(values)
        base = m if base is None else base
        ratio = f"  x{m / base:.3f} of the first" if base else ""
        print(f"  {setting:<48} {m:12.4g}  [{min(values):.4g} .. {max(values):.4g}]{ratio}")
EOF
exit $status
