"""The PyTorch peer of `moerl bench gpu`'s attention_fwd_ms and attention_bwd_ms: bench-600m's causal attention core
(batch 8, seq 2048, 16 heads, q and k head dim 96, v head dim 64) through
torch.nn.functional.scaled_dot_product_attention in BF16, as HF transformers' DeepseekV3 runs it with
attn_implementation="sdpa":

  sdpa            q, k [.., 96] and v [.., 64] as they are (PyTorch picks its kernel: flash needs equal head dims)
  sdpa_cudnn      the same with cuDNN's kernel forced
  sdpa_efficient  the same with the memory-efficient kernel forced
  sdpa_flash      v zero-padded to 96 and the flash kernel forced (what flash-attention users of MLA do)

    python3 bench/peers/torch_attention.py [--steps 20] [--warmup 5]

Prints {"bench": "peer.torch", "metric": "attention_fwd_ms" | "attention_bwd_ms", "variant": ..., "tflops": ...}
per variant: the median of CUDA-event-timed forward passes, and of forward + backward passes less the forward's
median. TFLOP/s from the causal half of the products, as moerl's (bench/cuda/train_step_bench.cu). The backward's
line also says whether two backward passes on the same inputs gave the same dq, dk and dv bits ("deterministic";
moerl's do, by construction). A variant PyTorch cannot run here prints {"metric": ..., "error": ...} instead.
"""
import datetime
import json

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from peer_common import git_rev, median_ms, timing_args

B, H, L, DQK, DV = 8, 16, 2048, 96, 64


def main():
    args = timing_args(__doc__, steps=20, warmup=5)
    torch.manual_seed(0)
    q = torch.randn(B, H, L, DQK, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(B, H, L, DQK, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(B, H, L, DV, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dout = torch.randn(B, H, L, DV, device="cuda", dtype=torch.bfloat16) * 1e-3
    scale = DQK ** -0.5
    pairs = B * H * L * L / 2
    flops = {"attention_fwd_ms": 2 * pairs * (DQK + DV), "attention_bwd_ms": 2 * pairs * (3 * DQK + 2 * DV)}

    def sdpa(backend=None):
        def run():
            if backend is None:
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        return run

    def sdpa_flash():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            out = F.scaled_dot_product_attention(q, k, F.pad(v, (0, DQK - DV)), is_causal=True, scale=scale)
        return out[..., :DV]

    def grads(attention):
        attention().backward(dout)
        g = [t.grad.clone() for t in (q, k, v)]
        q.grad = k.grad = v.grad = None
        return g

    common = {"bench": "peer.torch", "rev": git_rev(), "device": torch.cuda.get_device_name(),
              "date": datetime.date.today().isoformat(), "torch": torch.__version__,
              "shape": {"batch": B, "heads": H, "seq": L, "dqk": DQK, "dv": DV}}
    variants = (("sdpa", sdpa()), ("sdpa_cudnn", sdpa(SDPBackend.CUDNN_ATTENTION)),
                ("sdpa_efficient", sdpa(SDPBackend.EFFICIENT_ATTENTION)), ("sdpa_flash", sdpa_flash))
    for variant, attention in variants:
        def forward():
            with torch.no_grad():
                attention()

        def forward_backward():
            attention().backward(dout)
            q.grad = k.grad = v.grad = None

        try:
            fwd = median_ms(forward, args.steps, args.warmup)
            both = median_ms(forward_backward, args.steps, args.warmup)
            first, second = grads(attention), grads(attention)
        except RuntimeError as e:  # a kernel PyTorch cannot run on these shapes or this GPU
            print(json.dumps({**common, "metric": "attention_bwd_ms", "variant": variant, "error": str(e)[:200]}),
                  flush=True)
            continue
        deterministic = all(torch.equal(a, b) for a, b in zip(first, second))
        for metric, value in (("attention_fwd_ms", fwd), ("attention_bwd_ms", both - fwd)):
            line = {**common, "metric": metric, "value": value, "unit": "ms", "stat": "median", "variant": variant,
                    "tflops": flops[metric] / (value * 1e-3) / 1e12}
            if metric == "attention_bwd_ms":
                line["deterministic"] = deterministic
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
