"""Bubble rate and peak activation memory of every schedule, the published heuristic against zb-auto, and how long
zb-auto takes to plan.

    .venv/bin/python bench/schedules.py [--quick] [--cli-only] [--runs 5]

For p in {4, 8, 16, 32} ranks and m in {p, 2p, 4p, 8p} microbatches, with uniform costs (F = B = W = 1, no
communication), the paper's profiled 1.5B-model costs (F=18.522, B=18.086, W=9.337, comm=0.601 ms per stage) and
the same with a slow transfer (comm = 9 ms, half an F). Every column moves the same model: schedules with two
stages per rank (interleaved-1f1b, zb-v, v-half, v-min) get each one-per-rank stage's costs halved
(`Costs.split(2)`). Cells read `bubble rate / peak memory`, memory in M_B (one microbatch's activations of a whole
rank's layers; M_W = M_B / 2). The published heuristic (one stage per rank) and zb-auto (`choose_placement`: its
cell ends with the placement it chose, 1 = one stage per rank, V, I = interleaved) run at memory limits 1p and 2p.
Then zb-auto's gap to the heuristic (its step time over the heuristic's, minus one: never above 0), zb-auto's
planning time in process for p = 32, m = 256 (cold caches, CPU seconds, best and median of --runs), and the end
to end time of two `zb` commands in a fresh process.
"""

from __future__ import annotations

import argparse
import pathlib
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from zb.schedules import (  # noqa: E402
    Costs, ScheduleError, auto, choose_placement, default_chunks, generate, simulate, span_key, zb_heuristic,
)

PROFILES = {
    "uniform (F=B=W=1, comm=0)": dict(f=1.0, b=1.0, w=1.0, comm=0.0),
    "paper 1.5B (F=18.5, B=18.1, W=9.3, comm=0.6)": dict(f=18.522, b=18.086, w=9.337, comm=0.601),
    "paper 1.5B, slow transfer (comm=9)": dict(f=18.522, b=18.086, w=9.337, comm=9.0),
}
FIXED = ("gpipe", "1f1b", "interleaved-1f1b", "zb-h1", "zb-h2", "zb-v", "v-half", "v-min")
LIMITS = ("1p", "2p")
LETTER = {"one-per-rank": "1", "v": "V", "interleaved": "I"}
CLI_COMMANDS = [["--help"], "schedule --schedule zb-auto --stages 32 --microbatches 256 --memory-limit 1p".split()]


def cell(schedule, costs) -> str:
    t = simulate(schedule, costs)
    return f"{t.bubble_rate:.3f} / {max(t.peak_memory):.1f}"


def row(p: int, m: int, profile: dict, gaps: list) -> list[str]:
    costs = Costs.uniform(p, **profile)
    out = [str(p), str(m)]
    for name in FIXED:
        chunks = default_chunks(name)
        try:
            out.append(cell(generate(name, p * chunks, m, chunks=chunks), costs.split(chunks)))
        except ScheduleError:
            out.append("n/a")
    heuristic = {}
    for limit in LIMITS:
        try:
            schedule = zb_heuristic(p, m, costs, limit)
        except ScheduleError:
            out.append("n/a")
            continue
        heuristic[limit] = span_key(schedule, costs)[0]
        out.append(cell(schedule, costs))
    for limit in LIMITS:
        decision = choose_placement(p, m, costs, limit)
        chosen = costs.split(decision.chunks)
        out.append(f"{cell(decision.schedule, chosen)} {LETTER[decision.placement]}")
        if limit in heuristic:
            gaps.append((span_key(decision.schedule, chosen)[0] / heuristic[limit] - 1, p, m, limit))
    return out


def planning_times(runs: int) -> None:
    print(f"\n### zb-auto planning p = 32, m = 256 in process (CPU seconds, cold caches, {runs} runs)\n")
    print("| costs | limit | placement | best | median |\n|---|---|---|---:|---:|")
    for title, profile in PROFILES.items():
        costs = Costs.uniform(32, **profile)
        for limit in LIMITS:
            seconds = []
            for _ in range(runs):
                auto._fixed_schedule.cache_clear()
                start = time.process_time()
                decision = choose_placement(32, 256, costs, limit)
                seconds.append(time.process_time() - start)
            print(f"| {title.split(' (')[0]} | {limit} | {decision.placement} | {min(seconds):.2f} | "
                  f"{statistics.median(seconds):.2f} |")
            sys.stdout.flush()


def zb_command() -> list[str]:
    """The `zb` script next to this interpreter (the venv's), else `python -m zb`."""
    script = pathlib.Path(sys.executable).with_name("zb")
    return [str(script)] if script.exists() else [sys.executable, "-m", "zb"]


def cli_times(runs: int) -> None:
    """Wall time (what a user waits) and CPU time (user + system: less sensitive to other work on a shared
    machine) of each command in a fresh process."""
    print(f"\n### zb commands end to end (seconds, median of {runs} runs, this machine)\n")
    print("| command | wall median | wall min | wall max | CPU median |\n|---|---:|---:|---:|---:|")
    root = pathlib.Path(__file__).resolve().parents[1]
    for argv in CLI_COMMANDS:
        command = zb_command() + argv
        wall, cpu = [], []
        for _ in range(runs):
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            start = time.perf_counter()
            subprocess.run(command, cwd=root, check=True, stdout=subprocess.DEVNULL)
            wall.append(time.perf_counter() - start)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
        print(f"| `zb {' '.join(argv)}` | {statistics.median(wall):.2f} | {min(wall):.2f} | {max(wall):.2f} | "
              f"{statistics.median(cpu):.2f} |")
        sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="p in {4, 8} only")
    parser.add_argument("--cli-only", action="store_true", help="only the end-to-end times of the zb commands")
    parser.add_argument("--runs", type=int, default=5, help="runs of each timing (default: %(default)s)")
    args = parser.parse_args()
    if args.cli_only:
        cli_times(args.runs)
        return
    ranks_list = (4, 8) if args.quick else (4, 8, 16, 32)
    gaps: list = []
    for title, profile in PROFILES.items():
        print(f"\n### {title}\n")
        header = ["p", "m", *FIXED, *(f"heuristic {limit}" for limit in LIMITS),
                  *(f"zb-auto {limit}" for limit in LIMITS)]
        print("| " + " | ".join(header) + " |")
        print("|" + "|".join("---:" for _ in header) + "|")
        for p in ranks_list:
            for m in (p, 2 * p, 4 * p, 8 * p):
                print("| " + " | ".join(row(p, m, profile, gaps)) + " |")
                sys.stdout.flush()
    worst = max(gaps)
    print(f"\nzb-auto against the published heuristic over {len(gaps)} cases: worst gap {worst[0]:+.4%} "
          f"(p = {worst[1]}, m = {worst[2]}, {worst[3]}); best {min(gaps)[0]:+.2%}")
    planning_times(args.runs)
    cli_times(args.runs)


if __name__ == "__main__":
    main()
