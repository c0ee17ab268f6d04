"""How close zb-auto comes to the best schedule there is: zb-auto vs the exact optimum vs the lower bound.

    .venv/bin/python bench/optimality.py [--time-limit 10] [--ranks 2 3 4 5 6] [--workers N]

For p in 2..6 ranks (one stage per rank), m in {p, 2p, 3p} microbatches, memory limits 1p and 2p, and three cost
profiles: uniform (F = B = W = 1, comm = 0), paper-like (the paper's 1.5B costs, F=18.522, B=18.086, W=9.337,
comm=0.601, every stage alike) and random (per stage F, B, W drawn from 0.5..3 in steps of 0.25 and comm from
0..0.5, seeded by p; M_B = 1 and M_W = 1/2 everywhere). Each row: zb-auto's step time (longest rank span), the
exact solver's (schedules/exact.py: "proven" optimal, or the "best found" within --time-limit seconds with the
solver's bound), bound.py's lower bound, and zb-auto's gap to the exact value in percent. The summary gives
zb-auto's worst gap to a proven optimum and how many cases were proven. zb-auto is whatever `zb.schedules` the
interpreter imports (the installed checkout, or one put first on PYTHONPATH): the header names its folder, commit
and whether it had uncommitted changes.
"""

from __future__ import annotations

import argparse
import pathlib
import random
import subprocess
import time

import zb.schedules
from zb.schedules import Costs, generate, one_per_rank, simulate
from zb.schedules.bound import lower_bound
from zb.schedules.exact import solve

PAPER = dict(f=18.522, b=18.086, w=9.337, comm=0.601)


def profiles(ranks: int) -> dict[str, Costs]:
    rng = random.Random(ranks)

    def draw():
        return tuple(rng.randint(2, 12) / 4 for _ in range(ranks))

    return {"uniform": Costs.uniform(ranks), "paper-like": Costs.uniform(ranks, **PAPER),
            "random": Costs(draw(), draw(), draw(), rng.randint(0, 2) / 4)}


def span(schedule, costs: Costs) -> float:
    timeline = simulate(schedule, costs)
    return max(timeline.span(r) for r in range(schedule.num_ranks))


def checkout() -> str:
    """Where the zb.schedules measured comes from: its folder, commit, and whether it differs from the commit."""
    folder = pathlib.Path(zb.schedules.__file__).resolve().parent

    def git(*args):
        return subprocess.run(["git", *args], cwd=folder, capture_output=True, text=True).stdout.strip()

    dirty = git("status", "--porcelain", "--", ".")
    return (f"zb.schedules from {folder} at commit {git('rev-parse', '--short', 'HEAD')}"
            + (" with uncommitted changes" if dirty else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--time-limit", type=float, default=10.0, help="seconds per case (default: %(default)s)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 3, 4, 5, 6])
    parser.add_argument("--workers", type=int, default=None, help="CP-SAT threads (default: all cores)")
    args = parser.parse_args()
    print(f"zb-auto vs exact vs lower bound; {checkout()}; {args.time_limit:g} s per case")
    print()
    print("| p | m | costs | limit | zb-auto | exact | status | solver's bound | lower bound | zb-auto gap | s |")
    print("|--:|--:|---|---|--:|--:|---|--:|--:|--:|--:|")
    gaps, unproven, cases, began = [], [], 0, time.perf_counter()
    for ranks in args.ranks:
        for m in (ranks, 2 * ranks, 3 * ranks):
            for name, costs in profiles(ranks).items():
                for limit in ("1p", "2p"):
                    auto = span(generate("zb-auto", ranks, m, costs, limit), costs)
                    solution = solve(one_per_rank(ranks), m, costs, limit, args.time_limit, workers=args.workers)
                    bound = lower_bound(one_per_rank(ranks), m, costs)
                    gap = 100 * (auto - solution.value) / solution.value
                    cases += 1
                    case = (gap, f"p={ranks} m={m} {name} {limit}")
                    (gaps if solution.status == "optimal" else unproven).append(case)
                    status = "proven" if solution.status == "optimal" else "best found"
                    print(f"| {ranks} | {m} | {name} | {limit} | {auto:.6g} | {solution.value:.6g} | {status} | "
                          f"{solution.bound:.6g} | {bound:.6g} | {gap:.2f}% | {solution.wall_time:.1f} |", flush=True)
    worst, worst_found = max(gaps, default=(0.0, "-")), max(unproven, default=(0.0, "-"))
    print()
    print(f"{len(gaps)} of {cases} cases proven optimal. Where proven, zb-auto equals the optimum in "
          f"{sum(g <= 1e-9 for g, _ in gaps)}, is within 1% in {sum(g <= 1 for g, _ in gaps)}, and its worst gap is "
          f"{worst[0]:.2f}% ({worst[1]}). Where not, the solver's best is up to {worst_found[0]:.2f}% below zb-auto "
          f"({worst_found[1]}). {time.perf_counter() - began:.0f} s in all.")


if __name__ == "__main__":
    main()
