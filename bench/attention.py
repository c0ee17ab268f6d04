"""Fused attention, forward + backward: zb's operator against eager attention and F.scaled_dot_product_attention.

    .venv/bin/python bench/attention.py [--threads N] [--repeat R]

On CPU zb's operator runs its CPU implementation; with a GPU it also times zb's Triton kernels against PyTorch's
flash SDPA in TFLOP/s. One table per device; each row is one shape, all timed in the same run (median of
`--repeat` timings of forward + backward, torch.utils.benchmark). FLOPs count the four matmuls of the forward and
backward as a full (non-causal) attention would, 2 x 2 x B H L^2 D forward and 2.5x that backward, halved when
causal, so that TFLOP/s compare across implementations.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys

import torch
import torch.nn.functional as F
from torch.utils import benchmark

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from zb.ops.attention import attention, reference  # noqa: E402

SHAPES = [  # batch, heads, length, head dim, causal
    (4, 4, 128, 32, True),
    (4, 8, 256, 64, True),
    (4, 8, 256, 64, False),
    (2, 12, 512, 64, True),
    (1, 8, 1024, 128, True),
]


def flops(b, h, n, d, causal) -> float:
    forward = 4 * b * h * n * n * d
    return 3.5 * forward * (0.5 if causal else 1.0)


def time_fwd_bwd(fn, q, k, v, repeat: int) -> float:
    grad = torch.randn_like(q)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]

    def step():
        out = fn(*leaves)
        out.backward(grad)
        for t in leaves:
            t.grad = None

    step()  # warm-up
    if q.is_cuda:
        torch.cuda.synchronize()
    timer = benchmark.Timer(stmt="step()", globals={"step": step})
    return timer.blocked_autorange(min_run_time=0.2 * repeat).median


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cpu(args)
    if torch.cuda.is_available():
        gpu(args)


def cpu(args) -> None:
    print(f"CPU ({args.threads} threads), float32, forward + backward; ms per call, GFLOP/s")
    print(f"{'B,H,L,D,causal':<22} {'eager':>8} {'sdpa':>8} {'zb':>8} {'zb GFLOP/s':>11} {'zb/eager':>9} "
          f"{'zb/sdpa':>8}")
    for b, h, n, d, causal in SHAPES:
        q, k, v = (torch.randn(b, h, n, d) for _ in range(3))
        scale = 1.0 / math.sqrt(d)
        times = {
            "eager": time_fwd_bwd(lambda q, k, v, c=causal, s=scale: reference(q, k, v, None, c, s), q, k, v,
                                  args.repeat),
            "sdpa": time_fwd_bwd(lambda q, k, v, c=causal: F.scaled_dot_product_attention(q, k, v, is_causal=c), q, k,
                                 v, args.repeat),
            "zb": time_fwd_bwd(lambda q, k, v, c=causal, s=scale: attention(q, k, v, None, c, s), q, k, v, args.repeat),
        }
        print(f"{f'{b},{h},{n},{d},{causal}':<22} {times['eager'] * 1e3:8.2f} {times['sdpa'] * 1e3:8.2f} "
              f"{times['zb'] * 1e3:8.2f} {flops(b, h, n, d, causal) / times['zb'] / 1e9:11.1f} "
              f"{times['zb'] / times['eager']:9.2f} {times['zb'] / times['sdpa']:8.2f}")


def gpu(args) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from zb.ops.attention_kernels import triton_backward, triton_forward

    class TritonAttention(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, causal, scale):
            out, lse = triton_forward(q, k, v, None, causal, scale)
            ctx.save_for_backward(q, k, v, out, lse)
            ctx.causal, ctx.scale = causal, scale
            return out

        @staticmethod
        def backward(ctx, grad):
            q, k, v, out, lse = ctx.saved_tensors
            return (*triton_backward(grad.contiguous(), q, k, v, out, lse, None, ctx.causal, ctx.scale), None, None)

    print(f"\n{torch.cuda.get_device_name()}, bfloat16, forward + backward; TFLOP/s")
    print(f"{'B,H,L,D,causal':<22} {'flash sdpa':>11} {'zb triton':>10} {'zb/sdpa':>8}")
    for b, h, n, d, causal in SHAPES + [(4, 16, 2048, 64, True), (2, 16, 4096, 128, True)]:
        q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        scale = 1.0 / math.sqrt(d)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            flash = time_fwd_bwd(lambda q, k, v, c=causal: F.scaled_dot_product_attention(q, k, v, is_causal=c),
                                 q, k, v, args.repeat)
        mine = time_fwd_bwd(lambda q, k, v, c=causal, s=scale: TritonAttention.apply(q, k, v, c, s), q, k, v,
                            args.repeat)
        work = flops(b, h, n, d, causal)
        print(f"{f'{b},{h},{n},{d},{causal}':<22} {work / flash / 1e12:11.1f} {work / mine / 1e12:10.1f} "
              f"{flash / mine:8.2f}")


if __name__ == "__main__":
    main()
