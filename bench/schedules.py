"""Bubble rate and peak activation memory of every schedule, and how long zb-auto takes to plan.

    .venv/bin/python bench/schedules.py [--quick] [--cli-only] [--runs 5]

For p in {4, 8, 16, 32} ranks and m in {p, 2p, 4p, 8p} microbatches, with uniform costs (F = B = W = 1, no
communication) and the paper's profiled 1.5B-model costs (F=18.522, B=18.086, W=9.337, comm=0.601 ms per stage).
Schedules with two stages per rank (zb-v, interleaved-1f1b) get half the time and memory per stage, so every
column moves the same model. Cells read `bubble rate / peak memory`, memory in M_B (one microbatch's activations
of a whole rank's layers; M_W = M_B / 2). zb-auto runs at memory limits 1p and 2p. Last, the end-to-end time
of two `zb` commands in a fresh process (median of --runs): `zb --help`, and zb-auto planning p = 32, m = 256 at
1p and printing the timeline (the requirement: under 2 s).
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

from zb.schedules import Costs, ScheduleError, generate, simulate  # noqa: E402

PROFILES = {
    "uniform (F=B=W=1, comm=0)": dict(f=1.0, b=1.0, w=1.0, comm=0.0),
    "paper 1.5B (F=18.5, B=18.1, W=9.3, comm=0.6)": dict(f=18.522, b=18.086, w=9.337, comm=0.601),
}
CLI_COMMANDS = [["--help"], "schedule --schedule zb-auto --stages 32 --microbatches 256 --memory-limit 1p".split()]
COLUMNS = [("gpipe", 1, None), ("1f1b", 1, None), ("interleaved-1f1b", 2, None), ("zb-h1", 1, None),
           ("zb-h2", 1, None), ("zb-v", 2, None), ("zb-auto", 1, "1p"), ("zb-auto", 1, "2p")]


def costs_for(profile: dict, stages: int, chunks: int) -> Costs:
    return Costs.uniform(stages, profile["f"] / chunks, profile["b"] / chunks, profile["w"] / chunks,
                         profile["comm"], 1.0 / chunks)


def cell(name: str, ranks: int, m: int, chunks: int, limit, profile: dict) -> tuple[str, float]:
    stages = ranks * chunks
    costs = costs_for(profile, stages, chunks)
    start = time.perf_counter()
    try:
        schedule = generate(name, stages, m, costs, limit, chunks)
    except ScheduleError:
        return "n/a", 0.0
    seconds = time.perf_counter() - start
    t = simulate(schedule, costs)
    return f"{t.bubble_rate:.3f} / {max(t.peak_memory):.1f}", seconds


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
    parser.add_argument("--runs", type=int, default=5, help="runs of each zb command (default: %(default)s)")
    args = parser.parse_args()
    if args.cli_only:
        cli_times(args.runs)
        return
    ranks_list = (4, 8) if args.quick else (4, 8, 16, 32)
    plan_times = []
    for title, profile in PROFILES.items():
        print(f"\n### {title}\n")
        header = ["p", "m"] + [n if limit is None else f"{n} {limit}" for n, _, limit in COLUMNS]
        print("| " + " | ".join(header) + " |")
        print("|" + "|".join("---:" for _ in header) + "|")
        for p in ranks_list:
            for m in (p, 2 * p, 4 * p, 8 * p):
                row = [str(p), str(m)]
                for name, chunks, limit in COLUMNS:
                    text, seconds = cell(name, p, m, chunks, limit, profile)
                    row.append(text)
                    if name == "zb-auto":
                        plan_times.append((title.split(" (")[0], p, m, limit, seconds))
                print("| " + " | ".join(row) + " |")
        sys.stdout.flush()
    print("\n### zb-auto planning time (seconds, this machine)\n")
    print("| costs | p | m | limit | seconds |\n|---|---:|---:|---|---:|")
    for title, p, m, limit, seconds in plan_times:
        if m in (p, 8 * p):
            print(f"| {title} | {p} | {m} | {limit} | {seconds:.2f} |")
    worst = max(s for *_, s in plan_times)
    print(f"\nslowest zb-auto plan: {worst:.2f} s")
    cli_times(args.runs)


if __name__ == "__main__":
    main()
