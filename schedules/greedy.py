"""The list scheduler behind the zero-bubble generators: simulate the pipeline and decide, whenever a rank is
free, what it runs next.

The policy knobs are those of the paper's heuristic: how many microbatches a rank may hold in flight (or a memory
limit), whether a ready B goes before a ready F, and when a pending W fills an idle gap ("gap": only if the wait
is at least T_W; "always": whenever the rank would idle). Each stage runs its F and its B in microbatch order.
The result is the per-rank order; the start times it computes are those `simulate` gives for that order.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass

from zb.schedules.actions import BW, Action, B, F, Schedule, ScheduleError, W
from zb.schedules.costs import Costs

INF = float("inf")
new = tuple.__new__  # new(Action, (s, kind, mb)) skips Action's Python-level constructor: this loop is planning time


@dataclass(frozen=True)
class Policy:
    """The rules the greedy scheduler follows: B/W split, in-flight and memory limits, and when a pending W runs."""
    split: bool = True  # B and W as separate actions (else one BW)
    inflight: tuple[int, ...] | None = None  # per rank: microbatch activations held at most (F done, B not)
    memory_limit: float | None = None  # per rank, in the units of costs.mem_b (counts pending W's M_W too)
    b_first: bool = True  # a ready B runs before a ready F
    fill: str | tuple[str, ...] = "gap"  # when a pending W runs while no F/B is ready: "gap" or "always" (per rank)
    deeper_f_first: bool = True  # among ready forwards on a rank, the later stage first
    pending_w: tuple[int, ...] | None = None  # per rank: W's that may wait; beyond that a W runs first
    reserve: int = 0  # W's kept back for the drain: before a rank's last F, a gap is filled only beyond these
    gap_fraction: float | tuple[float, ...] = 1.0  # fill="gap": a W runs when the wait is >= this x T_W (per rank)
    # fill="gap" once a rank has run all its forwards: a W runs only if it ends before the next B can start, as
    # far as the producing rank's state tells (it has not started that B: no earlier than it is free plus T_B),
    # so the drain never delays the chain of backwards the first rank waits for.
    strict_drain: bool = False


def greedy(name: str, placement: tuple[int, ...], microbatches: int, costs: Costs, policy: Policy
           ) -> tuple[Schedule, tuple[float, float]]:
    """Returns the schedule and its (longest rank span, makespan) under `costs`, as `simulate` would time it."""
    ranks = max(placement) + 1
    n, m = len(placement), microbatches
    stages_of = [sorted((s for s in range(n) if placement[s] == r), reverse=True) for r in range(ranks)]
    comm = costs.comm
    back = B if policy.split else BW
    # end times by stage and microbatch (lists, not a dict of actions: this loop is zb-auto's planning time)
    end_f = [[None] * m for _ in range(n)]
    end_b = [[None] * m for _ in range(n)]
    # the transfer a pass waits for: F from the stage before, B from the stage after (0 on the same rank)
    delay_f = [comm if s > 0 and placement[s - 1] != placement[s] else 0.0 for s in range(n)]
    delay_b = [comm if s + 1 < n and placement[s + 1] != placement[s] else 0.0 for s in range(n)]
    duration = {kind: [costs.duration(s, kind) for s in range(n)] for kind in (F, back, W)}
    delta = {kind: [costs.memory_delta(s, kind) for s in range(n)] for kind in (F, back, W)}
    back_time = duration[back]
    next_f, next_b = [0] * n, [0] * n
    pending_w: list[deque] = [deque() for _ in range(n)]
    inflight, memory = [0] * ranks, [0.0] * ranks
    free = [0.0] * ranks
    first_start: list[float | None] = [None] * ranks
    last_end = [0.0] * ranks
    orders: list[list[Action]] = [[] for _ in range(ranks)]
    total = n * m * (3 if policy.split else 2)
    done = 0
    heap = [(0.0, r) for r in range(ranks)]
    waiting: set[int] = set()

    def f_ready(s: int) -> float | None:
        mb = next_f[s]
        if mb >= m:
            return None
        if s == 0:
            return 0.0
        t = end_f[s - 1][mb]
        return None if t is None else t + delay_f[s]

    def b_ready(s: int) -> float | None:
        mb = next_b[s]
        if mb >= next_f[s]:
            return None
        own = end_f[s][mb]
        if s == n - 1:
            return own
        other = end_b[s + 1][mb]
        return None if other is None else max(own, other + delay_b[s])

    def f_allowed(s: int, rank: int) -> bool:
        if policy.inflight is not None and inflight[rank] >= policy.inflight[rank]:
            return False
        return policy.memory_limit is None or memory[rank] + costs.mem_b[s] <= policy.memory_limit + 1e-9

    def run(rank: int, action: Action, start: float) -> None:
        nonlocal done
        s, kind, mb = action
        if first_start[rank] is None:
            first_start[rank] = start
        last_end[rank] = free[rank] = start + duration[kind][s]
        orders[rank].append(action)
        memory[rank] += delta[kind][s]
        if kind == F:
            end_f[s][mb] = free[rank]
            next_f[s] += 1
            inflight[rank] += 1
            wake = placement[s + 1] if s + 1 < n else None
        else:
            wake = None
            if kind != W:
                end_b[s][mb] = free[rank]
                next_b[s] += 1
                inflight[rank] -= 1
                if kind == B:
                    pending_w[s].append(mb)
                if s > 0:
                    wake = placement[s - 1]
        done += 1
        if wake is not None and wake in waiting:
            waiting.discard(wake)
            free[wake] = max(free[wake], start)
            heapq.heappush(heap, (free[wake], wake))
        heapq.heappush(heap, (free[rank], rank))

    while heap:
        t, rank = heapq.heappop(heap)
        if t != free[rank] or rank in waiting:
            continue
        # What the rank could run: its stages' next F and B (with when their inputs are there) and pending W's.
        fs, bs, ws, f_now, b_now, blocked_f = [], [], [], [], [], []
        for s in stages_of[rank]:
            if next_f[s] < m:
                r = f_ready(s)
                fs.append((s, r))
                if r is not None and r <= t:
                    (f_now if f_allowed(s, rank) else blocked_f).append(s)
            if next_b[s] < next_f[s]:
                r = b_ready(s)
                bs.append((s, r))
                if r is not None and r <= t:
                    b_now.append(s)
            if pending_w[s]:
                ws.append(s)
        if not policy.deeper_f_first:
            f_now.reverse()
        over_w = policy.pending_w is not None and sum(len(pending_w[s]) for s in ws) > policy.pending_w[rank]
        if over_w:  # too many W's wait: the next F waits for one of them (a ready B still goes first)
            blocked_f += f_now
            f_now = []
        if (policy.memory_limit is not None or over_w) and ws and blocked_f and not b_now:
            # An F is ready but memory (or the W cap) is full and no B can free it: a W frees M_W.
            s = ws[0]
            run(rank, new(Action, (s, W, pending_w[s].popleft())), t)
            continue
        first, second = (b_now, f_now) if policy.b_first else (f_now, b_now)
        pick = first or second
        if pick:
            s = pick[0]
            if pick is b_now:
                run(rank, new(Action, (s, back, next_b[s])), t)
            else:
                run(rank, new(Action, (s, F, next_f[s])), t)
            continue
        known = [r for _, r in fs + bs if r is not None and (r > t)]
        next_known = min(known) if known else INF
        if ws:
            unknown = [s for s, r in fs + bs if r is None]
            bound = next_known
            if unknown:
                bound = min(bound, t + comm + min(costs.f[s] for s in unknown))
            last_chain = policy.strict_drain and not fs and any(next_b[x] == m - 1 for x, _ in bs)
            if last_chain:
                for x, r in bs:
                    if r is None:
                        bound = min(bound, max(t, free[placement[x + 1]]) + back_time[x + 1] + comm)
            s = ws[0]
            draining = not fs
            held = sum(len(pending_w[x]) for x in ws)
            fill = policy.fill if isinstance(policy.fill, str) else policy.fill[rank]
            fraction = policy.gap_fraction if isinstance(policy.gap_fraction, float) else policy.gap_fraction[rank]
            if last_chain:
                fraction = 1.0
            wants = fill == "always" or bound - t >= fraction * costs.w[s] - 1e-9
            if not (fs or bs) or (wants and (draining or held > policy.reserve)):
                run(rank, new(Action, (s, W, pending_w[s].popleft())), t)
                continue
        if done == total:
            break
        if next_known < INF:
            free[rank] = next_known
            heapq.heappush(heap, (next_known, rank))
        elif fs or bs or ws:
            waiting.add(rank)
    if done != total:
        raise ScheduleError(
            f"{name}: no schedule fits these constraints (every rank waits); raise the memory limit"
        )
    schedule = Schedule(name, m, tuple(placement), tuple(tuple(o) for o in orders))
    used = [r for r in range(ranks) if orders[r]]
    spans = [last_end[r] - first_start[r] for r in used]
    return schedule, (max(spans), max(last_end[r] for r in used) - min(first_start[r] for r in used))
