"""Schedules as plain data: actions, placements and per-rank action lists, with a text form.

An action is (stage, kind, microbatch), printed `1F3` (stage 1, forward, microbatch 3) and parsed back.
Compute kinds: F (forward), B (input gradient), W (weight gradient), BW (unsplit backward, for schedules that do
not split). Communication kinds, added by lowering: SEND_F / RECV_F (activations), SEND_B / RECV_B (gradients);
a SEND names the sending stage, a RECV the receiving stage, as torch.distributed.pipelining does. Collective
kind, added by `lower(..., reduce=True)` for data parallelism: REDUCE, printed `1R` (stage 1, no microbatch), all-
reduces the stage's parameter gradients over its replica group, asynchronously, once the rank has run the stage's
last W (or BW).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple

F, B, W, BW = "F", "B", "W", "BW"
SEND_F, RECV_F, SEND_B, RECV_B = "SEND_F", "RECV_F", "SEND_B", "RECV_B"
COMPUTE = (F, B, W, BW)
COMMUNICATION = (SEND_F, RECV_F, SEND_B, RECV_B)
REDUCE = "R"
COLLECTIVE = (REDUCE,)

_ACTION = re.compile(r"^(\d+)(?:(SEND_F|RECV_F|SEND_B|RECV_B|BW|F|B|W)(\d+)|(R))$")


class ScheduleError(ValueError):
    """An impossible schedule request, or a schedule that breaks a rule (names the rule)."""


class Action(NamedTuple):
    """One action of a schedule (`1W3`: stage 1's W of microbatch 3), printed and parsed in that form."""
    stage: int
    kind: str
    microbatch: int

    def __str__(self) -> str:
        if self.kind == REDUCE:  # one per stage and step: no microbatch
            return f"{self.stage}{REDUCE}"
        return f"{self.stage}{self.kind}{self.microbatch}"

    @classmethod
    def parse(cls, text: str) -> Action:
        match = _ACTION.match(text.strip())
        if not match:
            raise ScheduleError(f"cannot parse action {text!r}; expected e.g. '1F3', '0B2', '0W2', '2BW0', '1SEND_F3', "
                                "'1R'")
        if match[4]:
            return cls(int(match[1]), REDUCE, 0)
        return cls(int(match[1]), match[2], int(match[3]))


@dataclass(frozen=True)
class Schedule:
    """A list of actions per rank, plus which rank holds each stage."""

    name: str
    num_microbatches: int
    placement: tuple[int, ...]  # placement[stage] = rank
    actions: tuple[tuple[Action, ...], ...]  # actions[rank]

    @property
    def num_stages(self) -> int:
        return len(self.placement)

    @property
    def num_ranks(self) -> int:
        return len(self.actions)

    @property
    def split_backward(self) -> bool:
        return any(a.kind == B for rank in self.actions for a in rank)

    def text(self) -> str:
        """One line per rank: `rank 0: 0F0 0F1 0B0 0W0 ...`."""
        return "\n".join(f"rank {r}: " + " ".join(map(str, acts)) for r, acts in enumerate(self.actions))

    @classmethod
    def from_text(cls, text: str, placement: tuple[int, ...], num_microbatches: int, name: str = "custom"):
        rows = []
        for line in text.strip().splitlines():
            if line.startswith("#"):  # a comment, as zb's ZB_DUMP_DIR files begin with
                continue
            _, _, body = line.partition(":")
            rows.append(tuple(Action.parse(t) for t in (body if body else line).split()))
        return cls(name, num_microbatches, tuple(placement), tuple(rows))

    def as_lists(self) -> list[list[str]]:
        return [[str(a) for a in acts] for acts in self.actions]


def one_per_rank(ranks: int) -> tuple[int, ...]:
    return tuple(range(ranks))


def looped(ranks: int, chunks: int) -> tuple[int, ...]:
    """Interleaved placement: stage s on rank s % ranks (each rank holds `chunks` stages)."""
    return tuple(s % ranks for s in range(ranks * chunks))


def v_shape(ranks: int) -> tuple[int, ...]:
    """ZB-V placement: rank r holds stages r and 2*ranks-1-r, so the first and last stage share rank 0."""
    return tuple(s if s < ranks else 2 * ranks - 1 - s for s in range(2 * ranks))
