"""Time a schedule: each rank runs its actions in order, each as soon as its inputs are there.

An action waits for the rank to be free and for its dependencies (F after the previous stage's F, B after the
next stage's B and its own F, W after its B); a dependency on another rank adds one transfer (`costs.comm`).
The result has every action's start and end, the makespan, the bubble rate as the paper defines it (from the
span of the busiest rank, see `Timeline.bubble_rate`) and each rank's peak activation memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from zb.schedules.actions import BW, COMPUTE, Action, B, F, Schedule, ScheduleError, W
from zb.schedules.costs import Costs


def dependencies(action: Action, num_stages: int, split: bool) -> list[Action]:
    """The compute actions that must finish before `action` (communication is not modelled as an action)."""
    s, kind, mb = action
    back = B if split else BW
    if kind == F:
        return [Action(s - 1, F, mb)] if s > 0 else []
    if kind in (B, BW):
        deps = [Action(s, F, mb)]
        if s < num_stages - 1:
            deps.append(Action(s + 1, back, mb))
        return deps
    if kind == W:
        return [Action(s, B, mb)]
    return []


@dataclass
class Timeline:
    schedule: Schedule
    costs: Costs
    start: dict[Action, float] = field(default_factory=dict)
    end: dict[Action, float] = field(default_factory=dict)

    def rank_actions(self, rank: int) -> list[tuple[Action, float, float]]:
        return [(a, self.start[a], self.end[a]) for a in self.schedule.actions[rank] if a.kind in COMPUTE]

    @property
    def makespan(self) -> float:
        return max(self.end.values()) - min(self.start.values())

    def span(self, rank: int) -> float:
        acts = self.rank_actions(rank)
        return acts[-1][2] - acts[0][1] if acts else 0.0

    def work(self, rank: int) -> float:
        return sum(e - s for _, s, e in self.rank_actions(rank))

    @property
    def bubble_rate(self) -> float:
        """(cost - work) / cost: cost is the longest rank span (first start to last end), work that rank's busy
        time. With equal work on every rank this is the paper's (cost - m(T_F+T_B+T_W)) / cost."""
        ranks = range(self.schedule.num_ranks)
        cost = max(self.span(r) for r in ranks)
        longest = max(ranks, key=lambda r: (self.span(r), self.work(r)))
        return (cost - self.work(longest)) / cost if cost else 0.0

    @property
    def peak_memory(self) -> list[float]:
        peaks = []
        for rank in range(self.schedule.num_ranks):
            level = peak = 0.0
            for action, _, _ in self.rank_actions(rank):
                level += self.costs.memory_delta(action.stage, action.kind)
                peak = max(peak, level)
            peaks.append(peak)
        return peaks

    def summary(self) -> dict:
        return {
            "makespan": self.makespan,
            "bubble_rate": self.bubble_rate,
            "peak_memory": self.peak_memory,
        }


def simulate(schedule: Schedule, costs: Costs) -> Timeline:
    if costs.num_stages != schedule.num_stages:
        raise ScheduleError(f"costs are for {costs.num_stages} stages, the schedule has {schedule.num_stages}")
    split, n, placement = schedule.split_backward, schedule.num_stages, schedule.placement
    timeline = Timeline(schedule, costs)
    end = timeline.end
    position = [0] * schedule.num_ranks
    free = [0.0] * schedule.num_ranks
    lists = [[a for a in acts if a.kind in COMPUTE] for acts in schedule.actions]
    remaining = sum(map(len, lists))
    while remaining:
        progressed = False
        for rank, acts in enumerate(lists):
            while position[rank] < len(acts):
                action = acts[position[rank]]
                deps = dependencies(action, n, split)
                if any(d not in end for d in deps):
                    break
                ready = max((end[d] + (costs.comm if placement[d.stage] != rank else 0.0) for d in deps), default=0.0)
                start = max(free[rank], ready)
                timeline.start[action] = start
                end[action] = free[rank] = start + costs.duration(action.stage, action.kind)
                position[rank] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            blocked = [str(acts[position[r]]) for r, acts in enumerate(lists) if position[r] < len(acts)]
            raise ScheduleError(f"schedule {schedule.name!r} deadlocks: every rank waits ({', '.join(blocked)})")
    return timeline
