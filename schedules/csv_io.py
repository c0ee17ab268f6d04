"""CSV interchange with torch.distributed.pipelining (`_dump_csv` / `_load_csv`, compute-only format).

One row per rank, one action per cell. torch names the input-gradient pass `I` and the unsplit backward `B`;
zb (like the paper) calls the input-gradient pass B and the unsplit one BW. Both directions translate.
"""

from __future__ import annotations

import csv
import pathlib
import re

from zb.schedules.actions import BW, Action, B, F, Schedule, ScheduleError, W

_TO_TORCH = {F: "F", B: "I", W: "W", BW: "B"}
_FROM_TORCH = {v: k for k, v in _TO_TORCH.items()}
_TORCH_ACTION = re.compile(r"^(\d+)(F|I|B|W)(\d+)$")


def to_csv(schedule: Schedule, path: str | pathlib.Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        for actions in schedule.actions:
            writer.writerow([f"{a.stage}{_TO_TORCH[a.kind]}{a.microbatch}" for a in actions])


def from_csv(path: str | pathlib.Path, name: str = "csv") -> Schedule:
    """Read a compute-only CSV; the placement is where each stage's actions appear."""
    rows = []
    with open(path, newline="") as f:
        for rank, row in enumerate(csv.reader(f)):
            actions = []
            for cell in (c.strip() for c in row):
                if not cell:  # torch writes idle slots as empty cells
                    continue
                match = _TORCH_ACTION.match(cell)
                if not match:
                    raise ScheduleError(f"rank {rank}: cannot read {cell!r}; expected a compute-only action like "
                                        "'0F1', '0I1', '0W1' or '0B1'")
                actions.append(Action(int(match[1]), _FROM_TORCH[match[2]], int(match[3])))
            rows.append(tuple(actions))
    stages = {a.stage: rank for rank, acts in enumerate(rows) for a in acts}
    if not stages:
        raise ScheduleError(f"{path} holds no actions")
    placement = []
    for s in range(max(stages) + 1):
        if s not in stages:
            raise ScheduleError(f"{path}: stage {s} never appears")
        placement.append(stages[s])
    microbatches = max(a.microbatch for acts in rows for a in acts) + 1
    return Schedule(name, microbatches, tuple(placement), tuple(rows))
