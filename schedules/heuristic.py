"""The published zero-bubble heuristic (Qi et al., ICLR 2024, section 3.1) as its own generator: a baseline for
zb-auto and one of its candidates.

    zb_heuristic(ranks, microbatches, costs, memory_limit) -> Schedule   # one stage per rank

It builds the schedule microbatch by microbatch, tracking when each rank is free, its memory and its idle time
("bubble", counted from its first forward on), exactly as ../shared/reference/zero-bubble.md describes:
1. warm-up: every rank runs the first microbatch's F; then, from the last rank back, each rank adds forwards while
   memory allows until the first B could reach it, and the counts are cut so that rank i runs at least one more F
   than rank i+1; then the first microbatch's B runs on every rank, last to first;
2. steady state, one round per further microbatch: each rank runs one F (unless, with `prioritize_b`, it is two
   ahead of the next rank and the F would delay the coming B and waiting for the B does not raise the largest
   bubble so far; a rank runs an F only if the next rank does) and then the round's B, last rank first. Before
   each F or B a pending W runs when memory would exceed the limit, when it fits in the gap before the pass can
   start (gap >= T_W), or when the gap would raise the largest bubble so far; a gap that would not is filled by
   a W only with `no_bubble_greedy`;
3. the remaining W's drain at the end (rank 0 drains them before each B once its forwards are done);
4. the 8 combinations of the three flags (allow a bubble before the first B, prioritise B, greedily avoid any
   bubble) each give a schedule; the one with the shortest longest-rank span wins (the first of equals).
Times follow the simulator's model (`simulate` times the result the same way): an F waits for the previous
rank's F plus `comm`, a B for the next rank's B plus `comm`.
"""

from __future__ import annotations

import itertools

from zb.schedules.actions import Action, B, F, Schedule, ScheduleError, W, one_per_rank
from zb.schedules.costs import Costs, parse_memory_limit
from zb.schedules.simulate import span_key

FLAGS = tuple(itertools.product((True, False), repeat=3))  # (allow_bubble_before_first_b, prioritize_b, greedy)


def zb_heuristic(ranks: int, microbatches: int, costs: Costs, memory_limit: str | float | None = None) -> Schedule:
    """The best of the heuristic's 8 flag settings, under `memory_limit` per rank ('1p', '2p', a number in the
    units of costs.mem_b, or None for no limit)."""
    if costs.num_stages != ranks:
        raise ScheduleError(f"the published heuristic places one stage per rank: costs cover {costs.num_stages} "
                            f"stages for {ranks} ranks")
    limit = parse_memory_limit(memory_limit, max(costs.mem_b), ranks)
    if limit is not None and limit + 1e-9 < max(costs.mem_b):
        raise ScheduleError(f"memory limit {limit:g} is below one microbatch on a stage ({max(costs.mem_b):g})")
    best, seen = None, set()
    for allow_bubble_before_first_b, prioritize_b, greedy in FLAGS:
        rounds = _Rounds(ranks, microbatches, costs, limit)
        try:
            warm_up = rounds.warm_up(allow_bubble_before_first_b)
            if (warm_up, prioritize_b, greedy) in seen:  # the same warm-up: the same schedule as before
                continue
            seen.add((warm_up, prioritize_b, greedy))
            span = rounds.run(prioritize_b, greedy)
        except _DoesNotFit:
            continue
        if best is not None and span is not None and span >= best[0]:
            continue
        schedule = Schedule("zb-heuristic", microbatches, one_per_rank(ranks), tuple(map(tuple, rounds.orders())))
        if span is None:  # a pass was planned before its input (see _put): time it, if it runs at all
            try:
                span = span_key(schedule, costs)[0]
            except ScheduleError:  # it deadlocks: the paper's code would hand out this order; we drop it
                continue
        if best is None or span < best[0]:
            best = (span, schedule)
    if best is None:
        within = "" if limit is None else f" within memory limit {limit:g}"
        raise ScheduleError(f"the published heuristic finds no schedule{within} (each flag setting runs out of "
                            "memory or gives an order that deadlocks)")
    return best[1]


class _DoesNotFit(Exception):
    """The heuristic's schedule would exceed the memory limit."""


KINDS = (F, B, W)  # indices 0, 1, 2 below: the run keeps plain lists (it is most of zb-auto's planning time)


class _Rounds:
    """One run of the heuristic for one setting of the flags. Kinds are indices into KINDS; a rank's order is
    kept as codes 3 x microbatch + kind until `orders()` turns it into actions."""

    def __init__(self, ranks: int, microbatches: int, costs: Costs, limit: float | None):
        self.p, self.m, self.costs, self.comm = ranks, microbatches, costs, costs.comm
        self.limit = float("inf") if limit is None else limit + 1e-9
        self.done = [[0] * ranks for _ in KINDS]  # per kind, per rank: how many have been planned
        self.end = [[[None] * microbatches for _ in range(ranks)] for _ in (F, B)]  # F's and B's end times
        self.exact = True  # every pass's input was planned before it (so the times below are the simulator's)
        self.free = [0.0] * ranks  # when each rank's last action ends
        self.first = [0.0] * ranks  # when each rank's first action starts
        self.memory = [0.0] * ranks
        self.bubble = [0.0] * ranks  # idle time since the rank's first F
        self.largest = 0.0  # the largest bubble of any rank so far
        self.codes: list[list[int]] = [[] for _ in range(ranks)]
        self.duration = (costs.f, costs.b, costs.w)
        self.delta = tuple(tuple(costs.memory_delta(j, kind) for j in range(ranks)) for kind in KINDS)

    def orders(self) -> list[list[Action]]:
        return [[Action(j, KINDS[code % 3], code // 3) for code in codes] for j, codes in enumerate(self.codes)]

    def run(self, prioritize_b: bool, greedy: bool) -> float | None:
        """The rounds after the warm-up; returns the longest rank span (None: see _put)."""
        p, m, c, (f_done, b_done, w_done) = self.p, self.m, self.costs, self.done
        for i in range(1, m):
            wants = [0] * p
            for j in range(p):
                if f_done[j] < m:
                    wants[j] = 0 if prioritize_b and self._b_before_f(j) else 1
            for j in range(p - 2, -1, -1):
                wants[j] = min(wants[j], wants[j + 1])
            for j in range(p):
                if wants[j]:
                    self._make_room(j, c.mem_b[j])
                    if j > 0:
                        self._fill(j, self._input(0, j - 1, f_done[j]), greedy)
                    self._put(j, 0)
            for j in range(p - 1, -1, -1):
                self._make_room(j, -(c.mem_b[j] - c.mem_w[j]))
                if j + 1 < p:
                    self._fill(j, self._input(1, j + 1, i), greedy)
                if j == 0 and f_done[0] == m:
                    while w_done[0] < b_done[0]:
                        self._put(0, 2)
                self._put(j, 1)
        for j in range(p):
            while w_done[j] < m:
                self._put(j, 2)
        span = max(self.free[j] - self.first[j] for j in range(p))
        return span if self.exact else None

    def warm_up(self, allow_bubble_before_first_b: bool) -> tuple[int, ...]:
        """The first microbatch's passes and the extra forwards; returns how many extra forwards each rank ran
        (they fix the state the rounds start from)."""
        p, m, c, f_done = self.p, self.m, self.costs, self.done[0]
        for j in range(p):
            self._put(j, 0)
        extra = [0] * p
        b_ends = self.end[0][p - 1][0] + c.b[p - 1]  # when the first B ends on the rank after j
        for j in range(p - 2, -1, -1):
            t, memory = self.free[j], self.memory[j]
            while f_done[j] + extra[j] < m and memory + c.mem_b[j] <= self.limit:
                if allow_bubble_before_first_b:
                    if t + c.f[j] > b_ends + c.comm:
                        break
                elif t >= b_ends + c.comm:
                    break
                memory += c.mem_b[j]
                t += c.f[j]
                extra[j] += 1
            b_ends = max(t, b_ends + c.comm) + c.b[j]
        for j in range(1, p):
            while 0 < extra[j] >= extra[j - 1] and f_done[j] + extra[j] < m:
                extra[j] -= 1
        for j in range(p):
            for _ in range(extra[j]):
                self._put(j, 0)
        for j in range(p - 1, -1, -1):
            self._put(j, 1)
        return tuple(extra)

    def _b_before_f(self, j: int) -> bool:
        """With prioritize_b: whether rank j skips this round's F to be ready for the coming B."""
        c, (f_done, b_done, w_done) = self.costs, self.done
        if j + 1 == self.p or f_done[j] < f_done[j + 1] + 2:
            return False
        coming = self.free[j + 1] + c.f[j + 1] + c.b[j + 1] + c.comm  # the next rank's F, then its B arrives
        if self.free[j] >= coming:
            return True
        w_time, memory, pending = 0.0, self.memory[j] + c.mem_b[j], b_done[j] - w_done[j]
        while memory > self.limit and pending:
            w_time += c.w[j]
            memory -= c.mem_w[j]
            pending -= 1
        if self.free[j] + c.f[j] + w_time <= coming:
            return False
        return coming - self.free[j] <= self.largest - self.bubble[j]

    def _make_room(self, j: int, delta: float) -> None:
        """Run pending W's until the next pass (memory change `delta`) fits the limit."""
        while self.memory[j] + delta > self.limit:
            if self.done[2][j] >= self.done[1][j]:
                raise _DoesNotFit
            self._put(j, 2)

    def _input(self, kind: int, j: int, mb: int) -> float:
        """When the input of rank j's pass can arrive (0 if it is not planned yet, as in the paper's code)."""
        t = self.end[kind][j][mb]
        return 0.0 if t is None else t + self.comm

    def _fill(self, j: int, ready: float, greedy: bool) -> None:
        """W's in the gap before a pass that can start at `ready`: every W that fits; then one more W if the
        remaining gap would raise the largest bubble, or (greedy) if it would not."""
        b_done, w_done, w, free = self.done[1], self.done[2], self.costs.w[j], self.free
        while w_done[j] < b_done[j] and free[j] + w <= ready:
            self._put(j, 2)
        if w_done[j] < b_done[j] and free[j] < ready:
            if greedy or ready - free[j] > self.largest - self.bubble[j]:
                self._put(j, 2)

    def _put(self, j: int, kind: int) -> None:
        done = self.done[kind]
        mb = done[j]
        free = self.free[j]
        ready = free
        source = j - 1 if kind == 0 else j + 1 if kind == 1 else -1
        if 0 <= source < self.p:
            t = self.end[kind][source][mb]
            if t is None:
                # The warm-up can leave a rank with more forwards than the rank before it when it reaches the
                # last microbatch; the paper's code then takes the input as ready at 0. So do we (the same
                # decisions), and the caller times the result with the simulator.
                self.exact = False
            elif t + self.comm > ready:
                ready = t + self.comm
        if self.done[0][j]:
            if ready > free:
                bubble = self.bubble[j] = self.bubble[j] + ready - free
                if bubble > self.largest:
                    self.largest = bubble
        else:
            self.first[j] = ready
        end = self.free[j] = ready + self.duration[kind][j]
        if kind < 2:
            self.end[kind][j][mb] = end
        self.memory[j] += self.delta[kind][j]
        done[j] = mb + 1
        self.codes[j].append(3 * mb + kind)
