#!/usr/bin/env bash
# The one GPU run of a change, on the H200 machine over a copy of the working tree (shared/DEVICE.md):
# build-gpu/carry/carry.tgz holds bin/ (moerl, moerl_gpu_tests, stripped, cudart static) and rtlib/ (the Debian
# libraries, scripts/pack-runtime), data/brown the corpus (no network there). In order, so that a time-out
# loses the least: GPU tests, `moerl bench gpu`, the peers (torch._grouped_mm MoE layer, sdpa attention, HF
# training step), then the fp8 and bf16 training curves on Brown, last a CUPTI kernel trace of the training step and
# the MoE layer (MOERL_GPU_TRACE: where the GPU time goes). Results in $OUT: gpu_tests.txt, bench.jsonl,
# curve_*.jsonl, trace.txt, run.log.
#   MOERL_DEVICE_STEPS=N  training steps of each curve (default: the recipes' 200)
#   MOERL_DEVICE_PART=checks|curves  only the tests, bench and peers, or only the curves (default: both; one
#                                    device call is limited to 10 minutes)
set -uo pipefail
out=${OUT:-/tmp/moerl-device}
mkdir -p "$out" /tmp/moerl-carry
tar xf build-gpu/carry/carry.tgz -C /tmp/moerl-carry  # gzip or xz
bin=/tmp/moerl-carry/bin
export LD_LIBRARY_PATH=/tmp/moerl-carry/rtlib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
# The test binary reads fixtures from the absolute path it was built with: point that path here.
fixtures=$(strings "$bin/moerl_gpu_tests" | grep -m1 -o '/[^ ]*/tests/fixtures' || true)
if [ -n "$fixtures" ] && [ ! -e "$fixtures" ]; then mkdir -p "$(dirname "$fixtures")" && ln -s "$PWD/tests/fixtures" "$fixtures"; fi
nvidia-smi -L | tee "$out/run.log"
# The peers' JSON lines carry the binaries' revision (this tree copy's .git may be stale).
MOERL_REV=$("$bin/moerl" --version 2>/dev/null | awk '{print substr($2, 1, 7)}')
export MOERL_REV
status=0
part=${MOERL_DEVICE_PART:-all}
if [ "$part" != curves ]; then
MOERL_REQUIRE_GPU=1 timeout 200 "$bin/moerl_gpu_tests" >"$out/gpu_tests.txt" 2>&1 || status=1
grep -E '^\[  (FAILED|PASSED) ' "$out/gpu_tests.txt" | tee -a "$out/run.log"
timeout 150 "$bin/moerl" bench gpu --json "$out/bench.jsonl" >/dev/null 2>>"$out/run.log" || status=1
timeout 60 python3 bench/peers/torch_grouped_mm_moe.py >>"$out/bench.jsonl" 2>>"$out/run.log" || status=1
timeout 60 python3 bench/peers/torch_attention.py >>"$out/bench.jsonl" 2>>"$out/run.log" || status=1
timeout 90 python3 bench/peers/hf_train_step.py >>"$out/bench.jsonl" 2>>"$out/run.log" || status=1
cat "$out/bench.jsonl"
fi
[ "$part" = checks ] && exit $status
steps=()
[ -n "${MOERL_DEVICE_STEPS:-}" ] && steps=(--set "stages.0.steps=$MOERL_DEVICE_STEPS")
for p in fp8 bf16; do
  timeout 170 "$bin/moerl" run "recipes/pretrain-brown-gpu-$p.yaml" "${steps[@]}" --out "/tmp/run-$p" \
    >>"$out/run.log" 2>&1 || status=1
  metrics=$(find "/tmp/run-$p" -name 'metrics.jsonl' | head -1)
  [ -n "$metrics" ] && cp "$metrics" "$out/curve_$p.jsonl" && tail -2 "$out/curve_$p.jsonl"
done
# Best effort, outside the status: the kernel trace, with CUDA's libcupti where the carry has none.
cupti=$(ls /tmp/moerl-carry/rtlib/libcupti.so.13 /usr/local/cuda/lib64/libcupti.so.13 \
  /usr/local/cuda/extras/CUPTI/lib64/libcupti.so.13 2>/dev/null | head -1)
MOERL_CUPTI_LIB=${cupti:-libcupti.so.13} MOERL_GPU_TRACE=1 timeout 60 "$bin/moerl" bench gpu \
  --only train_step,moe_layer >"$out/trace.txt" 2>&1 || echo "kernel trace failed (trace.txt)" | tee -a "$out/run.log"
exit $status
