"""The optimizer step: zb's fused update vs torch.optim.AdamW, and post-validation vs a synchronous all-reduce.

    .venv/bin/python bench/optimizer.py [--steps 50] [--preset small] [--compiler inductor]

Part 1 (this process, 1 thread): one AdamW update of every parameter of the example GPT, median of --steps:
torch.optim.AdamW with foreach=True and with fused=True, zb's fused update (ops/optimizer.py) alone, and
with the backup post-validation takes before an update it may have to roll back.
Part 2 (launches itself under torchrun, 2 ranks x 1 thread): the step time of a zb pipeline (zb-h1, 8
microbatches) training with options["optimizer"] = AdamW and max_grad_norm = 1.0, with post-validation and with
a synchronous all-reduce of the gradient norm before the update; and, for scale, loss.backward() +
clip_grad_norm_ + optimizer.step() outside zb (each rank's norm is then only its own: not a correct clip).
"""

from __future__ import annotations

import argparse
import copy
import os
import pathlib
import statistics
import subprocess
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from examples.gpt import GPT, PRESETS  # noqa: E402


def median_ms(fn, steps: int, warmup: int = 3) -> float:
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        fn()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def update_table(preset: str, steps: int) -> None:
    from zb.ops.optimizer import update_kernel as kernel_for
    from zb.runtime.fused_update import take_backup

    torch.manual_seed(0)
    model = GPT(PRESETS[preset])
    params = list(model.parameters())
    grads = [torch.randn_like(p) * 1e-2 for p in params]
    rows = []
    for name, options in (("torch.optim.AdamW foreach", {"foreach": True}),
                          ("torch.optim.AdamW fused", {"fused": True})):
        opt = torch.optim.AdamW(copy.deepcopy(params), lr=1e-3, **options)
        for p, g in zip(opt.param_groups[0]["params"], grads):
            p.grad = g
        rows.append((name, median_ms(opt.step, steps)))
    opt = torch.optim.AdamW(copy.deepcopy(params), lr=1e-3)
    zparams, group = opt.param_groups[0]["params"], opt.param_groups[0]
    kernel = kernel_for(opt)
    states = [opt.state[p] for p in zparams]

    def zb_update():
        with torch.no_grad():
            kernel(zparams, grads, states, group)

    spares: dict = {}

    def zb_update_with_backup():
        take_backup(spares, opt, zparams)
        with torch.no_grad():
            kernel(zparams, grads, states, group)

    rows.append(("zb fused update", median_ms(zb_update, steps)))
    rows.append(("zb fused update + rollback backup (post-validation)", median_ms(zb_update_with_backup, steps)))
    count = sum(p.numel() for p in params)
    print(f"AdamW update of GPT {preset} ({count / 1e6:.2f} M parameters, {len(params)} tensors), 1 thread, "
          f"torch {torch.__version__}, median of {steps}")
    print("| update | ms | vs torch foreach |\n|---|---:|---:|")
    for name, ms in rows:
        print(f"| {name} | {ms:.3f} | {ms / rows[0][1]:.2f}x |")


def pipeline_table(preset: str, steps: int, compiler: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    config = PRESETS[preset].with_(tie_weights=False)
    torch.manual_seed(1)
    x = torch.randint(0, config.vocab_size, (32, config.block_size))
    y = torch.randint(0, config.vocab_size, (32, config.block_size))

    def timed(step) -> float:
        times = []
        for i in range(3 + steps):
            dist.barrier()
            start = time.perf_counter()
            step()
            dist.barrier()
            if i >= 3:
                times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e3

    base = {"schedule": "zb-h1", "microbatches": 8, "compiler": compiler}
    rows = []
    for name, post_validation in (("post-validation", True), ("synchronous all-reduce, then update", False)):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = GPT(config)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        step = torch.compile(model, backend="zb", options={**base, "optimizer": opt, "max_grad_norm": 1.0,
                                                           "post_validation": post_validation})
        rows.append((f"zb optimizer, {name}", timed(lambda step=step: step(x, y))))
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = GPT(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    step = torch.compile(model, backend="zb", options=base)

    def outside():
        step(x, y).backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], 1.0)
        opt.step()
        opt.zero_grad()

    rows.append(("zb backward, then clip + torch AdamW per rank (no global norm)", timed(outside)))
    if rank == 0:
        print(f"\nGPT {preset} (untied), batch 32 x {config.block_size}, zb-h1, 8 microbatches, 2 ranks x 1 thread, "
              f"{compiler}, median of {steps} steps")
        print("| training step | ms | vs synchronous |\n|---|---:|---:|")
        sync = rows[1][1]
        for name, ms in rows:
            print(f"| {name} | {ms:.1f} | {ms / sync:.2f}x |")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--compiler", default="inductor", choices=["inductor", "eager"])
    parser.add_argument("--pipeline", action="store_true", help=argparse.SUPPRESS)  # part 2, under torchrun
    args = parser.parse_args()
    if args.pipeline:
        pipeline_table(args.preset, max(5, args.steps // 5), args.compiler)
        return
    torch.set_num_threads(1)
    update_table(args.preset, args.steps)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", __file__,
                    "--pipeline", "--steps", str(args.steps), "--preset", args.preset, "--compiler", args.compiler],
                   check=True, env=env, cwd=ROOT)


if __name__ == "__main__":
    main()
