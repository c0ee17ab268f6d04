"""How close zb-auto comes to the best schedule there is: zb-auto vs the exact optimum vs the lower bound.

    .venv/bin/python bench/optimality.py [--time-limit 10] [--ranks 2 3 4 5 6] [--workers N]

For p in 2..6 ranks (one stage per rank), m in {p, 2p, 3p} microbatches, memory limits 1p and 2p, and three cost
profiles: uniform (F = B = W = 1, comm = 0), paper-like (the paper's 1.5B costs, F=18.522, B=18.086, W=9.337,
comm=0.601, every stage alike) and random (per stage F, B, W drawn from 0.5..3 in steps of 0.25 and comm from
0..0.5, seeded by p; M_B = 1 and M_W = 1/2 everywhere). Each row: bound.py's lower bound (memory cannot lower it,
so one for both limits), and per limit zb-auto's step time (longest rank span; in brackets how far above the exact
value) and the exact solver's (schedules/exact.py: optimal unless marked "best found" within --time-limit seconds,
with the solver's bound), and the seconds the solver ran. The summary gives zb-auto's worst gap to a proven optimum
and how many cases were proven. zb-auto is whatever `zb.schedules` the
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
    print("| p | m | costs | lower bound | zb-auto 1p | exact 1p | zb-auto 2p | exact 2p | solver s |")
    print("|--:|--:|---|--:|--:|--:|--:|--:|--:|")
    proven, unproven, began = [], [], time.perf_counter()
    for ranks in args.ranks:
        for m in (ranks, 2 * ranks, 3 * ranks):
            for name, costs in profiles(ranks).items():
                cells, seconds = [], 0.0
                for limit in ("1p", "2p"):
                    auto = span(generate("zb-auto", ranks, m, costs, limit), costs)
                    solution = solve(one_per_rank(ranks), m, costs, limit, args.time_limit, workers=args.workers)
                    gap = 100 * (auto - solution.value) / solution.value
                    case = (gap, f"p={ranks} m={m} {name} {limit}")
                    (proven if solution.status == "optimal" else unproven).append(case)
                    exact = f"{solution.value:.6g}" + ("" if solution.status == "optimal" else
                                                       f" (best found; bound {solution.bound:.6g})")
                    cells += [f"{auto:.6g}" + (f" (+{gap:.2f}%)" if gap > 1e-9 else ""), exact]
                    seconds += solution.wall_time
                bound = lower_bound(one_per_rank(ranks), m, costs)
                print(f"| {ranks} | {m} | {name} | {bound:.6g} | {' | '.join(cells)} | {seconds:.1f} |", flush=True)
    cases = len(proven) + len(unproven)
    worst, worst_found = max(proven, default=(0.0, "-")), max(unproven, default=(0.0, "-"))
    print()
    print(f"{len(proven)} of {cases} cases proven optimal. Where proven, zb-auto equals the optimum in "
          f"{sum(g <= 1e-9 for g, _ in proven)}, is within 1% in {sum(g <= 1 for g, _ in proven)}, and its worst gap "
          f"is {worst[0]:.2f}% ({worst[1]}). Where not, the solver's best is up to {worst_found[0]:.2f}% below zb-auto "
          f"({worst_found[1]}). {time.perf_counter() - began:.0f} s in all.")


if __name__ == "__main__":
    main()
