"""Run under torchrun: the plan's memory for a step (runtime/memory.py) against what the allocator really held.

    torchrun --nproc-per-node 2 tests/distributed/memory_check.py <schedule> [<schedule> ...] [--microbatches 8]
        [--batch 16]

Trains the example GPT ("small" preset, untied, batch 16 x 64) on 2 ranks with compiler="eager" (so what runs is
the pieces' FX graphs, whose memory the plan reads). The first step builds everything; the second runs under the
torch profiler with memory events, after the gradients were set to None, and its peak is the most bytes the CPU
allocator held above the level at the profile's start. Prints, per schedule, `memory {json}`: the schedule, the
rank, the measured and the planned peak, where the plan reaches it, what it holds there by kind, and the most
boundary bytes it holds at once.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import torch
import torch.distributed as dist
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import zb  # noqa: E402
from examples.gpt import GPT, PRESETS  # noqa: E402


def allocator_peak(prof) -> int:
    """The most bytes the allocator held during the profile, above its level when the profile started."""
    events = []

    def walk(nodes):
        for node in nodes:
            if node.tag == _EventType.Allocation:
                events.append((node.start_time_ns, node.extra_fields.alloc_size))
            walk(node.children)

    walk(prof.profiler.kineto_results.experimental_event_tree())
    level = peak = 0
    for _, size in sorted(events):
        level += size
        peak = max(peak, level)
    return peak


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("schedules", nargs="+")
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    for schedule in args.schedules:
        measure(schedule, args.microbatches, args.batch)
    dist.destroy_process_group()


def measure(schedule: str, microbatches: int, batch_size: int) -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = GPT(PRESETS["small"].with_(tie_weights=False))
    backend = zb.ZbBackend({"schedule": schedule, "microbatches": microbatches, "compiler": "eager",
                            "rebalance": False})
    step = torch.compile(model, backend=backend)
    generator = torch.Generator().manual_seed(1)
    batch = [torch.randint(0, 256, (batch_size, 64), generator=generator) for _ in range(2)]
    step(*batch).backward()
    for p in model.parameters():
        p.grad = None
    dist.barrier()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(*batch).backward()
    measured = allocator_peak(prof)
    (runner,) = backend.runners
    (mine,) = runner.planned_memory().values()
    row = {"schedule": schedule, "rank": dist.get_rank(), "measured": measured, "planned": mine.peak, "at": mine.at,
           "held": mine.held, "boundary": mine.most["boundary"]}
    print("memory " + json.dumps(row), flush=True)
    dist.barrier()


if __name__ == "__main__":
    main()
