"""Check a compute-only schedule, and lower it: add the sends and receives each rank needs.

`validate` checks that every (stage, microbatch) runs F once and either B and W once or BW once, on the rank
that holds the stage, and that the per-rank orders respect the dependencies without deadlock. `lower` is a pure
function from a compute-only schedule to one with SEND_F/RECV_F/SEND_B/RECV_B actions: a value is sent right
after the action that produces it and received right before the action that reads it, when the two stages live
on different ranks. With `reduce=True` it also adds one REDUCE per stage (`1R`), on the stage's rank right after
the stage's last W (or BW) and the SEND_B that follows it, for data parallelism:

    zb-h1, 2 ranks:  rank 1: ... 1F2 1B2 1SEND_B2 1W1 1W2     ->   ... 1F2 1B2 1SEND_B2 1W1 1W2 1R
    1f1b, 2 ranks:   rank 1: ... 1F2 1BW2 1SEND_B2            ->   ... 1F2 1BW2 1SEND_B2 1R
                     rank 0: ... 0RECV_B2 0BW2                ->   ... 0RECV_B2 0BW2 0R

`check_deadlock_free` runs a lowered schedule with non-blocking sends, blocking receives and reductions that wait
only for their stage's last compute action on the same rank.
"""

from __future__ import annotations

from collections import Counter

from zb.schedules.actions import (
    BW, COMPUTE, RECV_B, RECV_F, REDUCE, SEND_B, SEND_F, Action, B, F, Schedule, ScheduleError, W,
)
from zb.schedules.simulate import dependencies


def validate(schedule: Schedule) -> None:
    n, m, placement = schedule.num_stages, schedule.num_microbatches, schedule.placement
    seen: Counter = Counter()
    for rank, actions in enumerate(schedule.actions):
        for a in actions:
            if a.kind not in COMPUTE:
                raise ScheduleError(f"rank {rank}: {a} is not a compute action; validate the compute-only schedule")
            if not (0 <= a.stage < n and 0 <= a.microbatch < m):
                raise ScheduleError(f"rank {rank}: {a} is outside {n} stages x {m} microbatches")
            if placement[a.stage] != rank:
                raise ScheduleError(f"rank {rank} runs {a}, but stage {a.stage} lives on rank {placement[a.stage]}")
            seen[a] += 1
    split = schedule.split_backward
    if split and any(a.kind == BW for a in seen):
        raise ScheduleError("the schedule mixes split (B, W) and unsplit (BW) backwards")
    kinds = (F, B, W) if split else (F, BW)
    for s in range(n):
        for mb in range(m):
            for kind in kinds:
                count = seen[Action(s, kind, mb)]
                if count != 1:
                    raise ScheduleError(f"{Action(s, kind, mb)} appears {count} times; every action must appear once")
    _check_order(schedule)


def _check_order(schedule: Schedule) -> None:
    """Run the schedule on dependencies alone; a stall names the rule that is broken."""
    n, split, placement = schedule.num_stages, schedule.split_backward, schedule.placement
    done: set[Action] = set()
    position = [0] * schedule.num_ranks
    index = {a: i for acts in schedule.actions for i, a in enumerate(acts)}
    while True:
        progressed = False
        for rank, acts in enumerate(schedule.actions):
            while position[rank] < len(acts) and all(d in done for d in dependencies(acts[position[rank]], n, split)):
                done.add(acts[position[rank]])
                position[rank] += 1
                progressed = True
        if not progressed:
            break
    for rank, acts in enumerate(schedule.actions):
        if position[rank] < len(acts):
            a = acts[position[rank]]
            for d in dependencies(a, n, split):
                if d not in done and placement[d.stage] == rank and index[d] > position[rank]:
                    raise ScheduleError(f"rank {rank} runs {a} before {d}, which it depends on")
            blocked = [str(acts[position[r]]) for r, acts in enumerate(schedule.actions) if position[r] < len(acts)]
            raise ScheduleError(f"the schedule deadlocks: every rank waits for another ({', '.join(blocked)})")


def lower(schedule: Schedule, reduce: bool = False) -> Schedule:
    """Add communication actions to a compute-only schedule (which must validate); with `reduce`, also each stage's
    gradient reduction after its last W or BW (a stage with no backward, as in a forward-only schedule, gets none)."""
    n, placement = schedule.num_stages, schedule.placement
    lowered = []
    for rank, actions in enumerate(schedule.actions):
        out: list[Action] = []
        last = _last_gradient_actions(actions) if reduce else {}
        for i, a in enumerate(actions):
            s, kind, mb = a
            if kind == F and s > 0 and placement[s - 1] != rank:
                out.append(Action(s, RECV_F, mb))
            if kind in (B, BW) and s < n - 1 and placement[s + 1] != rank:
                out.append(Action(s, RECV_B, mb))
            out.append(a)
            if kind == F and s < n - 1 and placement[s + 1] != rank:
                out.append(Action(s, SEND_F, mb))
            if kind in (B, BW) and s > 0 and placement[s - 1] != rank:
                out.append(Action(s, SEND_B, mb))
            if last.get(s) == i:
                out.append(Action(s, REDUCE, 0))
        lowered.append(tuple(out))
    return Schedule(schedule.name, schedule.num_microbatches, placement, tuple(lowered))


def _last_gradient_actions(actions) -> dict[int, int]:
    """Stage -> index of its last W or BW in one rank's list: after it the stage's parameter gradients are final."""
    return {a.stage: i for i, a in enumerate(actions) if a.kind in (W, BW)}


def check_deadlock_free(lowered: Schedule) -> None:
    """Sends never block; a receive waits for its send; a compute action waits for what it reads."""
    n, split = lowered.num_stages, lowered.split_backward
    done: set[Action] = set()
    position = [0] * lowered.num_ranks
    last_compute = [{a.stage: a for a in acts if a.kind in COMPUTE} for acts in lowered.actions]

    def can_run(rank: int, a: Action) -> bool:
        if a.kind == REDUCE:  # a collective over the replicas of this stage: only this rank's own work precedes it
            return last_compute[rank].get(a.stage) in done
        if a.kind == RECV_F:
            return Action(a.stage - 1, SEND_F, a.microbatch) in done
        if a.kind == RECV_B:
            return Action(a.stage + 1, SEND_B, a.microbatch) in done
        if a.kind in (SEND_F, SEND_B):
            return Action(a.stage, F if a.kind == SEND_F else (B if split else BW), a.microbatch) in done
        for d in dependencies(a, n, split):
            if lowered.placement[d.stage] == rank:
                needed = d
            else:
                needed = Action(a.stage, RECV_F if a.kind == F else RECV_B, a.microbatch)
            if needed not in done:
                return False
        return True

    progressed = True
    while progressed:
        progressed = False
        for rank, acts in enumerate(lowered.actions):
            while position[rank] < len(acts) and can_run(rank, acts[position[rank]]):
                done.add(acts[position[rank]])
                position[rank] += 1
                progressed = True
    blocked = [f"rank {r} at {acts[position[r]]}" for r, acts in enumerate(lowered.actions) if position[r] < len(acts)]
    if blocked:
        raise ScheduleError(f"the lowered schedule deadlocks: {', '.join(blocked)}")
