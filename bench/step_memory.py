"""A step's memory per rank: what zb plans (runtime/memory.py) against what the CPU allocator held.

    .venv/bin/python bench/step_memory.py [--microbatches 8 32] [--schedules 1f1b zb-h1 ...]

Runs tests/distributed/memory_check.py on 2 ranks (gloo, one thread each; the example GPT "small" preset,
untied, sequence 64, 2 samples per microbatch, compiler eager) for each microbatch count, and prints one row per
schedule and rank: the allocator's peak during the profiled second step (torch profiler memory events, above the
level at its start), the plan's peak, their ratio, where the plan reaches it and what it holds there, and the
most bytes of boundary tensors held at once (receive buffers and tensors waiting for their send).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.test_pipeline import launch  # noqa: E402

SCHEDULES = ["gpipe", "1f1b", "interleaved-1f1b", "zb-h1", "zb-h2", "zb-v"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--microbatches", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--schedules", nargs="+", default=SCHEDULES)
    args = parser.parse_args()
    print("GPT small (untied), sequence 64, 2 samples per microbatch, 2 ranks (gloo), compiler eager; KiB\n")
    print("| microbatches | schedule | rank | allocator peak | planned peak | planned / measured | planned at | "
          "activations | boundary | gradients | running piece | most boundary at once |")
    print("|---:|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|")
    worst = 0.0
    for m in args.microbatches:
        result = launch(2, ROOT / "tests/distributed/memory_check.py", *args.schedules, "--microbatches", str(m),
                        "--batch", str(2 * m))
        if result.returncode != 0:
            raise SystemExit(result.stdout + result.stderr)
        rows = [json.loads(line[len("memory "):]) for line in result.stdout.splitlines()
                if line.startswith("memory ")]
        for r in sorted(rows, key=lambda r: (args.schedules.index(r["schedule"]), r["rank"])):
            ratio = r["planned"] / r["measured"]
            worst = max(worst, abs(ratio - 1))
            held = r["held"]
            print(f"| {m} | {r['schedule']} | {r['rank']} | {r['measured'] / 1024:.0f} | {r['planned'] / 1024:.0f} | "
                  f"{ratio:.3f} | {r['at']} | {held['activations'] / 1024:.0f} | {held['boundary'] / 1024:.0f} | "
                  f"{held['gradients'] / 1024:.0f} | {held['running'] / 1024:.0f} | {r['boundary'] / 1024:.0f} |",
                  flush=True)
    print(f"\nlargest difference between plan and allocator: {100 * worst:.1f}%")


if __name__ == "__main__":
    main()
