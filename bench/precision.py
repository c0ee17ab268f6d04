"""Mixed precision on 2 ranks: per-rank bytes, step time, and 50-step loss curves against eager in the same mode.

    .venv/bin/python bench/precision.py [--steps 50] [--microbatches 4] [--batch 16]

Runs itself on 2 ranks (gloo, one thread each): the example GPT ("small" preset: 4 layers, width 128, tied
head, sequence 64) with schedule zb-h1, compiler eager, SGD (lr 0.3, momentum 0.9; a multi-step comparison with
AdamW would amplify rounding differences, see tests/optim_check.py), trained in three modes:

    fp32      no autocast, float32 parameters
    autocast  `with torch.autocast("cpu", dtype=torch.bfloat16):` around the call
    policy    options param_dtype=torch.bfloat16 (reduce_dtype float32): a bf16 copy of each rank's parameters
              per step, W's gradients summed in float32, float32 master weights and .grad

Per mode and rank, after the second step's backward: bytes of the parameters the rank holds (others' are
released), of the policy's bf16 copies (the plan's `copies`, runtime/memory.py), of the gradients (.grad) and of
the optimizer state; the median step time (call, backward, optimizer step) of steps 5 to the end. Rank 0 also
trains eager in the same mode (the policy's eager: a bf16 copy of the model per step, its gradients cast to float32
for the float32 optimizer) on the same batches, and the table gives the largest relative difference between the
two loss curves, and between each mode's curve and fp32 eager's (what the precision itself costs). CPU only: on one
GPU two ranks cannot share it over NCCL (tests/test_precision.py and bench/gpu_check.sh run CUDA in one process).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import pathlib
import statistics
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = ["fp32", "autocast", "policy"]
LR = 0.3
BF16 = torch.bfloat16


def batches(steps: int, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Learnable sequences (so the curve falls: 5.6 to about 2.4 in 50 steps): arithmetic progressions mod 256 from
    a random start with a random stride of 1 to 3; the target is the next term."""
    generator = torch.Generator().manual_seed(1)
    data = []
    for _ in range(steps):
        start = torch.randint(0, 256, (batch, 1), generator=generator)
        stride = torch.randint(1, 4, (batch, 1), generator=generator)
        tokens = (start + stride * torch.arange(64)) % 256
        data.append((tokens, (tokens + stride) % 256))
    return data


def region(mode: str):
    return torch.autocast("cpu", dtype=BF16) if mode == "autocast" else contextlib.nullcontext()


def eager_losses(model, mode: str, data) -> list[float]:
    """Eager training in `mode` on the whole batch of each step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    losses = []
    for x, y in data:
        if mode == "policy":  # torchtitan's semantics by hand: compute with a bf16 copy, float32 gradients
            low = copy.deepcopy(model).to(BF16)
            loss = low(x, y)
            loss.backward()
            for p, q in zip(model.parameters(), low.parameters()):
                p.grad = q.grad.float()
        else:
            with region(mode):
                loss = model(x, y)
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
    return losses


def worker(args) -> None:
    import torch.distributed as dist

    import zb
    from examples.gpt import GPT, PRESETS
    from zb.runtime.released import is_released

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    data = batches(args.steps, args.batch)
    fp32_eager = None
    for mode in MODES:
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = GPT(PRESETS["small"])
        reference = copy.deepcopy(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
        options = {"schedule": "zb-h1", "microbatches": args.microbatches, "compiler": "eager"}
        if mode == "policy":
            options["param_dtype"] = BF16
        backend = zb.ZbBackend(options)
        step = torch.compile(model, backend=backend)
        losses, times, row = [], [], {"mode": mode, "rank": rank}
        for i, (x, y) in enumerate(data):
            dist.barrier()
            start = time.perf_counter()
            with region(mode):
                loss = step(x, y)
            loss.backward()
            if i == 1:
                held = {id(p): p for p in model.parameters() if not is_released(p)}.values()
                row["parameters"] = sum(p.nbytes for p in held)
                row["gradients"] = sum(p.grad.nbytes for p in held if p.grad is not None)
                (runner,) = backend.runners
                row["copies"] = max(m.most["copies"] for m in runner.planned_memory().values())
            optimizer.step()
            times.append(time.perf_counter() - start)
            if i == 1:
                row["optimizer"] = sum(v.nbytes for s in optimizer.state.values() for v in s.values()
                                       if isinstance(v, torch.Tensor))
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss))
        row["step"] = statistics.median(times[4:])
        if rank == 0:
            expected = eager_losses(reference, mode, data)
            if mode == "fp32":
                fp32_eager = expected
            row["deviation"] = max(abs(a - b) / abs(b) for a, b in zip(losses, expected))
            row["vs_fp32"] = max(abs(a - b) / abs(b) for a, b in zip(losses, fp32_eager))
            row["first"], row["last"] = losses[0], losses[-1]
        print("precision " + json.dumps(row), flush=True)
        dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    from tests.test_pipeline import launch

    result = launch(2, pathlib.Path(__file__), "--worker", "--steps", str(args.steps), "--microbatches",
                    str(args.microbatches), "--batch", str(args.batch), timeout=3600)
    if result.returncode != 0:
        raise SystemExit(result.stdout + result.stderr)
    rows = [json.loads(line[len("precision "):]) for line in result.stdout.splitlines()
            if line.startswith("precision ")]
    base = {r["rank"]: r for r in rows if r["mode"] == "fp32"}
    print(f"GPT small, 2 ranks (gloo), zb-h1, {args.microbatches} microbatches of {args.batch // args.microbatches} "
          f"x 64 tokens, compiler eager, CPU; KiB per rank, ratios against fp32 in this run\n")
    print("| mode | rank | parameters | bf16 copies | gradients | optimizer state | total | total / fp32 | "
          "step (s) | step / fp32 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in sorted(rows, key=lambda r: (MODES.index(r["mode"]), r["rank"])):
        total = r["parameters"] + r["copies"] + r["gradients"] + r["optimizer"]
        b = base[r["rank"]]
        base_total = b["parameters"] + b["copies"] + b["gradients"] + b["optimizer"]
        print(f"| {r['mode']} | {r['rank']} | {r['parameters'] / 1024:.0f} | {r['copies'] / 1024:.0f} | "
              f"{r['gradients'] / 1024:.0f} | {r['optimizer'] / 1024:.0f} | {total / 1024:.0f} | "
              f"{total / base_total:.2f} | {r['step']:.3f} | {r['step'] / b['step']:.2f} |")
    print(f"\nLoss over {args.steps} steps (rank 0): largest relative difference from eager in the same mode, and "
          "from fp32 eager\n")
    print("| mode | first loss | last loss | max rel. diff vs eager, same mode | max rel. diff vs fp32 eager |")
    print("|---|---:|---:|---:|---:|")
    for r in sorted((r for r in rows if r["rank"] == 0), key=lambda r: MODES.index(r["mode"])):
        print(f"| {r['mode']} | {r['first']:.4f} | {r['last']:.4f} | {r['deviation']:.2e} | {r['vs_fp32']:.2e} |")


if __name__ == "__main__":
    main()
