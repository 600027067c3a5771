"""The PyTorch peer of `moerl bench gpu`'s moe_layer_* metrics: one DeepSeek-V3 MoE layer, forward + backward,
in BF16 with torch._grouped_mm for the routed experts (the fastest grouped GEMM PyTorch ships), at the shapes of
issue 4: T = 16384 tokens, hidden 2048, moe_intermediate 1408, 64 routed experts top-6 + 1 shared expert,
sigmoid router with a selection bias, weights normalised over the chosen 6.

    python3 bench/peers/torch_grouped_mm_moe.py [--steps 20] [--warmup 5]

Prints {"bench": "peer.torch", "metric": "moe_layer_bf16_ms", ...} (median of CUDA-event-timed forward +
backward passes; weight gradients included, optimizer excluded).
"""
import datetime
import json

import torch
import torch.nn.functional as F

from peer_common import git_rev, median_ms, timing_args

T, H, I, E, K = 16384, 2048, 1408, 64, 6


class MoeLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        std = 0.02
        self.router = torch.nn.Parameter(torch.randn(E, H, dtype=torch.float32) * std)
        self.bias = torch.zeros(E, device="cuda")  # e_score_correction_bias: selection only, not trained
        # Stacked experts, each [E, K_in, N_out] as torch._grouped_mm's right operand wants them.
        self.gate_up = torch.nn.Parameter(torch.randn(E, H, 2 * I, dtype=torch.bfloat16) * std)
        self.down = torch.nn.Parameter(torch.randn(E, I, H, dtype=torch.bfloat16) * std)
        self.shared_gate_up = torch.nn.Parameter(torch.randn(2 * I, H, dtype=torch.bfloat16) * std)
        self.shared_down = torch.nn.Parameter(torch.randn(H, I, dtype=torch.bfloat16) * std)

    def forward(self, x):
        scores = torch.sigmoid(x.float() @ self.router.t())                    # [T, E] FP32 router
        idx = torch.topk(scores + self.bias, K, dim=-1).indices                 # selection with the bias
        weight = scores.gather(1, idx)
        weight = (weight / weight.sum(-1, keepdim=True)).to(x.dtype)           # norm_topk_prob
        flat = idx.reshape(-1)
        order = torch.argsort(flat, stable=True)
        token_of = order // K
        counts = torch.bincount(flat, minlength=E)
        offs = torch.cumsum(counts, 0).to(torch.int32)
        xs = x[token_of]                                                        # [T*K, H] expert-major
        gu = torch._grouped_mm(xs, self.gate_up, offs=offs)                     # [T*K, 2I]
        g, u = gu.chunk(2, dim=-1)
        ys = torch._grouped_mm(F.silu(g) * u, self.down, offs=offs)             # [T*K, H]
        ys = ys * weight.reshape(-1)[order].unsqueeze(-1)
        routed = torch.zeros_like(x).index_add_(0, token_of, ys)
        sg, su = (x @ self.shared_gate_up.t()).chunk(2, dim=-1)
        return routed + (F.silu(sg) * su) @ self.shared_down.t()


def main():
    args = timing_args(__doc__, steps=20, warmup=5)
    torch.manual_seed(0)
    layer = MoeLayer().cuda()
    x = (torch.randn(T, H, device="cuda") * 0.5).to(torch.bfloat16).requires_grad_()
    dy = torch.randn(T, H, device="cuda").to(torch.bfloat16)

    def step():
        y = layer(x)
        y.backward(dy)

    print(json.dumps({"bench": "peer.torch", "metric": "moe_layer_bf16_ms",
                      "value": median_ms(step, args.steps, args.warmup),
                      "unit": "ms", "stat": "median", "rev": git_rev(), "device": torch.cuda.get_device_name(),
                      "date": datetime.date.today().isoformat(), "torch": torch.__version__,
                      "shape": {"tokens": T, "hidden": H, "moe_intermediate": I, "experts": E, "top_k": K,
                                "shared": 1}}), flush=True)


if __name__ == "__main__":
    main()
