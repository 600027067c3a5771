"""The HF transformers peer of `moerl bench gpu`'s training step: DeepseekV3ForCausalLM on the bench-600m
configuration (the one bench/cuda/train_step_bench.cu uses), BF16 weights, SDPA attention, fused torch AdamW,
random tokens, batch 8 x 2048, forward + backward + optimizer step.

    python3 bench/peers/hf_train_step.py [--steps 10] [--warmup 3]

Prints JSON lines in DESIGN.md's benchmark format:
  {"bench": "peer.hf", "metric": "train_step_bf16_tokens_per_s", ...}  median over the timed steps
  {"bench": "peer.hf", "metric": "train_step_peak_mem_gib", ...}
"""
import datetime
import json
import statistics
import warnings

import torch
import transformers
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

from peer_common import git_rev, timing_args

warnings.filterwarnings("ignore")

# bench-600m (issue 4). MTP is not part of HF's model, so moerl's benchmark runs without it too.
BENCH_600M = dict(
    vocab_size=32000, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=704,
    num_hidden_layers=8, first_k_dense_replace=1, num_attention_heads=16, num_key_value_heads=16,
    kv_lora_rank=256, q_lora_rank=None, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
    n_routed_experts=32, num_experts_per_tok=4, n_shared_experts=1, n_group=1, topk_group=1,
    routed_scaling_factor=1.0, norm_topk_prob=True, max_position_embeddings=4096, rope_interleave=True,
    tie_word_embeddings=False, use_cache=False,
)
BATCH, SEQ = 8, 2048


def emit(metric, value, unit, stat, **extra):
    line = {"bench": "peer.hf", "metric": metric, "value": value, "unit": unit, "stat": stat,
            "rev": git_rev(), "device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
            "transformers": transformers.__version__, "torch": torch.__version__}
    line.update(extra)
    print(json.dumps(line), flush=True)


def main():
    args = timing_args(__doc__, steps=10, warmup=3)

    torch.manual_seed(0)
    config = DeepseekV3Config(**BENCH_600M)
    config._attn_implementation = "sdpa"
    model = DeepseekV3ForCausalLM(config).to(device="cuda", dtype=torch.bfloat16).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    ids = torch.randint(0, config.vocab_size, (BATCH, SEQ), device="cuda")

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        loss = step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    median_s = statistics.median(times)
    params = sum(p.numel() for p in model.parameters())
    emit("train_step_bf16_tokens_per_s", BATCH * SEQ / median_s, "tokens/s", "median",
         step_ms=median_s * 1e3, params=params, loss=float(loss), batch=BATCH, seq=SEQ)
    emit("train_step_peak_mem_gib", torch.cuda.max_memory_allocated() / 2**30, "GiB", "max")


if __name__ == "__main__":
    main()
