"""Data-parallel gradient reduction at scale, simulated: in the schedule (zb) or after each rank's compute.

    .venv/bin/python bench/scale.py [--bandwidth 25] [--latency 10] [--bytes-per-param 2] [--quick]

For p in {8, 16, 32, 64} pipeline ranks, m = 3p microbatches (the paper's p = 8, m = 24) and D in {1, 8, 64}
pipeline replicas. Every stage costs what the paper profiled for its 1.5B model on 8 ranks (F = 18.522,
B = 18.086, W = 9.337, comm = 0.601 ms) and holds an eighth of that model's parameters (187.5M; bf16 gradients,
--bytes-per-param 2: 375 MB), so the model grows with p (1.5B x p / 8; 12B at p = 64) and a stage's compute stays
the same. Schedules with two stages per rank (zb-v, and interleaved-1f1b for comparison) get half of each per
stage. A stage's gradients are all-reduced over its D
replicas in a ring, 2(D-1)/D x bytes / bandwidth + 2(D-1) x latency, at --bandwidth GB/s per GPU (default 25:
one 200 Gb/s network port per GPU, across nodes) and --latency us per ring step. Reductions run one at a time on
each rank's network channel, in parallel with its compute (the channel is not shared with the pipeline's own
transfers here). zb-auto plans at the paper's 2p memory limit.

Columns: the compute makespan (the step when D = 1), then for each D the step time (first action to the end of
the last reduction) with the reduction after each rank's last compute ("after", as data parallelism around a
pipeline does) and in the schedule ("overlap": a stage's reduction starts as its last W ends), the exposed
reduction (step - makespan) in brackets, and the speedup after / overlap.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from zb.schedules import Costs, default_chunks, generate, simulate  # noqa: E402

PAPER = dict(f=18.522, b=18.086, w=9.337, comm=0.601)  # ms per stage, 1.5B model, p = 8 (A100)
PARAMS_PER_STAGE = 1.5e9 / 8
SCHEDULES = ("1f1b", "interleaved-1f1b", "zb-h1", "zb-h2", "zb-v", "zb-auto")
REPLICAS = (8, 64)  # D = 1 is the makespan column


def costs_for(ranks: int, chunks: int) -> Costs:
    return Costs.uniform(ranks * chunks, PAPER["f"] / chunks, PAPER["b"] / chunks, PAPER["w"] / chunks,
                         PAPER["comm"], 1.0 / chunks)


def with_reduction(costs: Costs, chunks: int, replicas: int, args: argparse.Namespace) -> Costs:
    """Costs in ms: bandwidth (GB/s) in bytes per ms, latency (us) in ms."""
    return costs.with_reduction(PARAMS_PER_STAGE * args.bytes_per_param / chunks, replicas, args.bandwidth * 1e6,
                                args.latency / 1e3)


def row(name: str, ranks: int, args: argparse.Namespace) -> list[str]:
    chunks = default_chunks(name)
    costs = costs_for(ranks, chunks)
    m = 3 * ranks
    schedule = generate(name, ranks * chunks, m, costs, "2p" if name == "zb-auto" else None, chunks)
    cells = [str(ranks), str(m), name, f"{simulate(schedule, costs, 'none').makespan:.1f}"]
    for d in REPLICAS:
        reducing = with_reduction(costs, chunks, d, args)
        after, overlap = simulate(schedule, reducing, "after"), simulate(schedule, reducing, "overlap")
        cells += [f"{after.step_time:.1f} (+{after.exposed_reduction:.1f})",
                  f"{overlap.step_time:.1f} (+{overlap.exposed_reduction:.1f})",
                  f"{after.step_time / overlap.step_time:.3f}"]
    return cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bandwidth", type=float, default=25.0, help="all-reduce GB/s per GPU (default: %(default)s)")
    parser.add_argument("--latency", type=float, default=10.0, help="us per ring step (default: %(default)s)")
    parser.add_argument("--bytes-per-param", type=float, default=2, help="gradient bytes (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="p in {8, 16} only")
    args = parser.parse_args()
    per_stage = [with_reduction(costs_for(1, 1), 1, d, args).reduce[0] for d in REPLICAS]
    print(f"bandwidth {args.bandwidth:g} GB/s per GPU, latency {args.latency:g} us, {args.bytes_per_param:g} bytes "
          "per parameter; one stage's gradient reduction "
          + ", ".join(f"D={d}: {r:.1f} ms" for d, r in zip(REPLICAS, per_stage))
          + " (two stages per rank: each about half of it)\n")
    header = ["p", "m", "schedule", "D=1 step"]
    for d in REPLICAS:
        header += [f"D={d} after", f"D={d} overlap", f"D={d} speedup"]
    print("| " + " | ".join(header) + " |")
    print("|---:|---:|---|" + "|".join("---:" for _ in header[3:]) + "|")
    for ranks in (8, 16) if args.quick else (8, 16, 32, 64):
        for name in SCHEDULES:
            print("| " + " | ".join(row(name, ranks, args)) + " |")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
