"""Changing sequence lengths (dynamic padding): how many pipelines zb builds and what a step costs.

    .venv/bin/python bench/lengths.py [--steps 20] [--compiler inductor] [--plan-cache 8]

The example GPT ("small" preset, block size 64) trains `--steps` steps on 2 pipeline stages in one process
(zb-h1, 4 microbatches, batch 8). In the "changing" run each step's sequence length is drawn from 8..64 (seeded);
in the "fixed" run every step has length 64. Reported per run: zb pipelines built (one per signature that was not
in the cache: trace, plan and compile), Dynamo graphs, the time of all steps, and the mean step time of the steps
that built nothing. The ratio compares the changing run's total time with the fixed run's, measured in the same
process. zb builds one pipeline per new length (there is no symbolic-length pipeline yet); a length seen before
is served from the cache (option plan_cache).
"""

from __future__ import annotations

import argparse
import pathlib
import random
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import zb  # noqa: E402
from examples.gpt import GPT, PRESETS  # noqa: E402
from zb.backend import CompiledGraph  # noqa: E402


def run(lengths: list[int], compiler: str, plan_cache: int) -> dict:
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = GPT(PRESETS["small"])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    backend = zb.ZbBackend({"stages": 2, "microbatches": 4, "schedule": "zb-h1", "compiler": compiler,
                            "plan_cache": plan_cache})
    step = torch.compile(model, backend=backend)
    builds = []
    original = CompiledGraph.build_plan

    def counting(self, *args, **kwargs):
        builds.append(1)
        return original(self, *args, **kwargs)

    CompiledGraph.build_plan = counting
    generator = torch.Generator().manual_seed(0)
    times, steady = [], []
    try:
        for length in lengths:
            ids = torch.randint(0, 256, (8, length), generator=generator)
            before = len(builds)
            start = time.perf_counter()
            loss = step(ids, torch.roll(ids, -1, 1))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            seconds = time.perf_counter() - start
            times.append(seconds)
            if len(builds) == before:
                steady.append(seconds)
    finally:
        CompiledGraph.build_plan = original
    return {"builds": len(builds), "graphs": len(backend.graphs), "total": sum(times),
            "steady": sum(steady) / len(steady) if steady else float("nan"), "distinct": len(set(lengths))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--compiler", default="inductor", choices=["inductor", "eager"])
    parser.add_argument("--plan-cache", type=int, default=8)
    args = parser.parse_args()
    rng = random.Random(0)
    changing = [rng.randint(8, 64) for _ in range(args.steps)]
    fixed = run([64] * args.steps, args.compiler, args.plan_cache)
    varying = run(changing, args.compiler, args.plan_cache)
    print(f"lengths of the changing run: {changing}")
    print(f"| run ({args.compiler}) | distinct lengths | pipelines built | Dynamo graphs | all {args.steps} steps (s) "
          "| mean step without a build (s) |")
    print("|---|---|---|---|---|---|")
    for name, r in [("fixed length 64", fixed), ("lengths drawn from 8..64", varying)]:
        print(f"| {name} | {r['distinct']} | {r['builds']} | {r['graphs']} | {r['total']:.1f} | {r['steady']:.3f} |")
    print(f"changing / fixed, all steps: {varying['total'] / fixed['total']:.2f}x")


if __name__ == "__main__":
    main()
