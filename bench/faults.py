"""Fault injection on 2 ranks: how long after a fault every rank raises, and what the next call does.

    .venv/bin/python bench/faults.py [--modes F,B,W,...]

Each mode of tests/distributed/fault_check.py runs once (2 processes, one after another): rank 1 (the failing
rank) fails in the second step of a 2-stage MLP (zb-h1, 4 microbatches, compiler eager; option timeout 60 s, 4 s for
the stalled rank). Per rank: the error its failing call raised and how many seconds after the fault (on the shared
clock of this machine), the next call's result, and whether parameters and gradients are as the last completed
step left them ("-" where the mode changes them by design: optimizer updates, a re-cut; for the checkpoint: the
previous checkpoint loads with the first step's values), and whether the process then exited cleanly (a normal
exit after destroying the process group: exit code 0, nothing aborted).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.distributed.fault_check import MODES, parse  # noqa: E402
from tests.test_pipeline import launch  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--modes", default=",".join(MODES))
    modes = parser.parse_args().modes.split(",")
    print("| fault (on rank 1) | rank | raised | seconds after the fault | next call | state | exit |")
    print("|---|---|---|---|---|---|---|")
    for mode in modes:
        out = launch(2, ROOT / "tests" / "distributed" / "fault_check.py", mode, timeout=300)
        ranks = parse(out.stdout)
        for rank in (0, 1):
            entry = ranks.get(rank)
            if entry is None:
                print(f"| {mode} | {rank} | (process gone: the fault) | | | | |")
                continue
            after = f"{entry['after_fault']:.2f}" if entry["after_fault"] is not None else ""
            raised = entry["error"] or "nothing (its part of the step was done)"
            following = entry["next"] if entry["next"] == "ran" else f"{entry['next']} in {entry['next_seconds']:.2f} s"
            state = "intact" if entry["intact"] else "-" if mode in ("update", "rollback", "migrate") else "CHANGED"
            aborted = "terminate called" in out.stderr or out.returncode not in (0, 3)  # 3: the killed rank's own
            exit = "clean" if f"exit {mode} rank {rank}" in out.stdout and not aborted else "NOT CLEAN"
            print(f"| {mode} | {rank} | {raised} | {after} | {following} | {state} | {exit} |")


if __name__ == "__main__":
    main()
