"""Activation memory per microbatch with and without activation checkpointing: the plan's M_B and M_W per stage.

    .venv/bin/python bench/checkpoint_memory.py [--preset small] [--stages 2] [--microbatches 8]

The example GPT, once as it is and once with every block under torch.utils.checkpoint (non-reentrant). M_B is what
one microbatch's F leaves for the backward, M_W what its B leaves for W (the simulator's memory costs, computed
from the plan's graphs: codegen/program.py). Prints a table; nothing is compiled or run.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import torch
import torch.nn as nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import zb  # noqa: E402
from examples.gpt import GPT, PRESETS  # noqa: E402
from zb.codegen import build_program  # noqa: E402


class Recomputed(nn.Module):
    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x):
        return torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=False)


def memory(preset: str, stages: int, microbatches: int, checkpointed: bool):
    torch.manual_seed(0)
    config = PRESETS[preset]
    model = GPT(config)
    if checkpointed:
        model.blocks = nn.ModuleList(Recomputed(b) for b in model.blocks)
    batch = 2 * microbatches
    idx = torch.randint(0, config.vocab_size, (batch, config.block_size))
    targets = torch.randint(0, config.vocab_size, (batch, config.block_size))
    plan = zb.explain(model, idx, targets, stages=stages, microbatches=microbatches)
    program = build_program(plan, {})
    return [(s.memory_b, s.memory_w) for s in program.stages], plan.counters["fused_attention"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--microbatches", type=int, default=8)
    args = parser.parse_args()
    rows = {c: memory(args.preset, args.stages, args.microbatches, c) for c in (False, True)}
    print(f"GPT {args.preset}, {args.stages} stages, 2 samples per microbatch, torch {torch.__version__}")
    print("| stage | M_B without (KiB) | M_B checkpointed (KiB) | ratio | M_W without (KiB) | M_W checkpointed (KiB) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for s, ((b0, w0), (b1, w1)) in enumerate(zip(rows[False][0], rows[True][0])):
        print(f"| {s} | {b0 / 1024:.0f} | {b1 / 1024:.0f} | {b1 / b0:.2f}x | {w0 / 1024:.0f} | {w1 / 1024:.0f} |")
    total = [sum(b for b, _ in rows[c][0]) for c in (False, True)]
    print(f"\nall stages: {total[0] / 1024:.0f} KiB -> {total[1] / 1024:.0f} KiB per microbatch "
          f"({total[1] / total[0]:.2f}x); attention fused: {rows[False][1]} without, {rows[True][1]} checkpointed")


if __name__ == "__main__":
    main()
