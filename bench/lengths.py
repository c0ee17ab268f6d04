"""Changing sequence lengths (dynamic padding): how many pipelines zb builds and what a step costs.

    .venv/bin/python bench/lengths.py [--steps 20] [--compiler inductor] [--per-length]

The example GPT ("small" preset, block size 64) trains `--steps` steps on 2 pipeline stages in one process
(zb-h1, 4 microbatches, batch 8). In the "changing" runs each step's sequence length is drawn from 8..64 (seeded);
in the "fixed" run every step has length 64. Reported per run: zb pipelines built (trace, plan and compile; one
for Dynamo's first, static graph, one symbolic for its dynamic graph), Dynamo graphs, the time of all steps, and
the mean step time of the steps that built nothing. `--per-length` adds a run with option symbolic_sizes=False
(one pipeline per length, as zb did before). Ratios compare runs measured in the same process.
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


def run(lengths: list[int], compiler: str, symbolic: bool = True) -> dict:
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = GPT(PRESETS["small"])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    backend = zb.ZbBackend({"stages": 2, "microbatches": 4, "schedule": "zb-h1", "compiler": compiler,
                            "plan_cache": 32, "symbolic_sizes": symbolic})
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
            "steady": sum(steady) / len(steady) if steady else float("nan"), "distinct": len(set(lengths)),
            "mean_length": sum(lengths) / len(lengths)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--compiler", default="inductor", choices=["inductor", "eager"])
    parser.add_argument("--per-length", action="store_true", help="also run with option symbolic_sizes=False")
    args = parser.parse_args()
    rng = random.Random(0)
    changing = [rng.randint(8, 64) for _ in range(args.steps)]
    runs = [("fixed length 64", run([64] * args.steps, args.compiler)),
            ("lengths drawn from 8..64", run(changing, args.compiler))]
    if args.per_length:
        runs.append(("lengths drawn from 8..64, symbolic_sizes=False", run(changing, args.compiler, symbolic=False)))
    print(f"lengths of the changing runs: {changing}")
    print(f"| run ({args.compiler}) | distinct lengths | mean length | pipelines built | Dynamo graphs "
          f"| all {args.steps} steps (s) | mean step without a build (s) |")
    print("|---|---|---|---|---|---|---|")
    for name, r in runs:
        print(f"| {name} | {r['distinct']} | {r['mean_length']:.1f} | {r['builds']} | {r['graphs']} | {r['total']:.1f} "
              f"| {r['steady']:.3f} |")
    fixed = runs[0][1]
    for name, r in runs[1:]:
        print(f"{name} / fixed: all steps {r['total'] / fixed['total']:.2f}x, "
              f"mean step without a build {r['steady'] / fixed['steady']:.2f}x")


if __name__ == "__main__":
    main()
