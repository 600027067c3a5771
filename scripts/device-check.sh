#!/usr/bin/env bash
# Runs on the H200 machine over a copy of the working tree with build-gpu/ carried (see DEVELOPER notes in
# README "GPU"): the GPU tests, `moerl bench gpu`, and HF transformers loading a moerl checkpoint.
# Results go to $OUT (gpu_tests.txt, bench_gpu.jsonl, hf_check.jsonl).
set -uo pipefail
export LD_LIBRARY_PATH=$PWD/build-gpu/rtlib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
out=${OUT:-/tmp/moerl-device}
mkdir -p "$out"
nvidia-smi -L
status=0
build-gpu/bin/moerl_gpu_tests 2>&1 | tee "$out/gpu_tests.txt" | grep -E "^\[ +(OK|FAILED|PASSED|SKIPPED) |rel|GB/s|seed" || status=1
build-gpu/bin/moerl bench gpu --json "$out/bench_gpu.jsonl" >/dev/null 2>"$out/bench_gpu.err" || status=1
cat "$out/bench_gpu.jsonl" "$out/bench_gpu.err"
if [ -d build-gpu/hfcheck ]; then
  PYTHONUNBUFFERED=1 python3 bench/peers/hf_load_check.py build-gpu/hfcheck/ckpt build-gpu/hfcheck/moerl_logits.safetensors \
    2>"$out/hf_check.err" | tee "$out/hf_check.jsonl" || { status=1; tail -20 "$out/hf_check.err"; }
fi
exit $status
