"""Loads a moerl checkpoint folder into HF transformers' DeepseekV3ForCausalLM and compares its logits with
moerl's on the same tokens (written by `moerl eval CKPT --data F --logits moerl_logits.safetensors`).

    python3 bench/peers/hf_load_check.py CKPT_DIR moerl_logits.safetensors

Prints one JSON line: {"bench": "peer.hf", "metric": "hf_load_logits_max_rel_err", ...}; exits 1 when the
relative error (max |diff| / max |logit|) is above 1e-4 (FP32, different summation order: ~1e-6 expected).
"""
import json
import sys
import warnings

import torch
from safetensors.torch import load_file
from transformers import DeepseekV3ForCausalLM
import transformers

warnings.filterwarnings("ignore")
ckpt, moerl_file = sys.argv[1], sys.argv[2]
ref = load_file(moerl_file)
model = DeepseekV3ForCausalLM.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="eager").eval()
with torch.no_grad():
    ids = ref["input_ids"].long().unsqueeze(0)
    logits = model(input_ids=ids).logits[0].float()
ours = ref["logits"].float()
err = ((logits - ours).abs().max() / ours.abs().max()).item()
print(json.dumps({"bench": "peer.hf", "metric": "hf_load_logits_max_rel_err", "value": err, "unit": "ratio",
                  "stat": "max", "transformers": transformers.__version__, "tokens": int(ids.shape[1]),
                  "checkpoint": ckpt}))
sys.exit(0 if err <= 1e-4 else 1)
