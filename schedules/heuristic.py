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

_new = tuple.__new__  # an Action without its Python-level constructor: the heuristic runs on every zb-auto plan
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
            orders, span = rounds.run(prioritize_b, greedy)
        except _DoesNotFit:
            continue
        schedule = Schedule("zb-heuristic", microbatches, one_per_rank(ranks), tuple(map(tuple, orders)))
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
    pass


class _Rounds:
    """One run of the heuristic for one setting of the flags."""

    def __init__(self, ranks: int, microbatches: int, costs: Costs, limit: float | None):
        self.p, self.m, self.costs = ranks, microbatches, costs
        self.limit = float("inf") if limit is None else limit + 1e-9
        self.done = {F: [0] * ranks, B: [0] * ranks, W: [0] * ranks}
        self.end = {F: [[None] * microbatches for _ in range(ranks)], B: [[None] * microbatches for _ in range(ranks)]}
        self.exact = True  # every pass's input was planned before it (so the times below are the simulator's)
        self.free = [0.0] * ranks  # when each rank's last action ends
        self.first = [None] * ranks  # when each rank's first action starts
        self.memory = [0.0] * ranks
        self.bubble = [0.0] * ranks  # idle time since the rank's first F
        self.largest = 0.0  # the largest bubble of any rank so far
        self.orders: list[list[Action]] = [[] for _ in range(ranks)]
        self.duration = {F: costs.f, B: costs.b, W: costs.w}
        self.delta = {k: [costs.memory_delta(j, k) for j in range(ranks)] for k in (F, B, W)}

    def run(self, prioritize_b: bool, greedy: bool):
        """The rounds after the warm-up; returns the orders and the longest rank span (None: see _put)."""
        p, m, c, done = self.p, self.m, self.costs, self.done
        for i in range(1, m):
            wants = [0] * p
            for j in range(p):
                if done[F][j] < m:
                    wants[j] = 0 if prioritize_b and self._b_before_f(j) else 1
            for j in range(p - 2, -1, -1):
                wants[j] = min(wants[j], wants[j + 1])
            for j in range(p):
                if wants[j]:
                    self._make_room(j, c.mem_b[j])
                    if j > 0:
                        self._fill(j, self._input(F, j - 1, done[F][j]), greedy)
                    self._put(j, F)
            for j in range(p - 1, -1, -1):
                self._make_room(j, -(c.mem_b[j] - c.mem_w[j]))
                if j + 1 < p:
                    self._fill(j, self._input(B, j + 1, i), greedy)
                if j == 0 and done[F][0] == m:
                    while done[W][0] < done[B][0]:
                        self._put(0, W)
                self._put(j, B)
        for j in range(p):
            while done[W][j] < m:
                self._put(j, W)
        span = max(self.free[j] - self.first[j] for j in range(p))
        return self.orders, span if self.exact else None

    def warm_up(self, allow_bubble_before_first_b: bool) -> tuple[int, ...]:
        """The first microbatch's passes and the extra forwards; returns how many extra forwards each rank ran
        (they fix the state the rounds start from)."""
        p, m, c, done = self.p, self.m, self.costs, self.done
        for j in range(p):
            self._put(j, F)
        extra = [0] * p
        b_ends = self.end[F][p - 1][0] + c.b[p - 1]  # when the first B ends on the rank after j
        for j in range(p - 2, -1, -1):
            t, memory = self.free[j], self.memory[j]
            while done[F][j] + extra[j] < m and memory + c.mem_b[j] <= self.limit:
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
            while 0 < extra[j] >= extra[j - 1] and done[F][j] + extra[j] < m:
                extra[j] -= 1
        for j in range(p):
            for _ in range(extra[j]):
                self._put(j, F)
        for j in range(p - 1, -1, -1):
            self._put(j, B)
        return tuple(extra)

    def _b_before_f(self, j: int) -> bool:
        """With prioritize_b: whether rank j skips this round's F to be ready for the coming B."""
        c, done = self.costs, self.done
        if j + 1 == self.p or done[F][j] < done[F][j + 1] + 2:
            return False
        coming = self.free[j + 1] + c.f[j + 1] + c.b[j + 1] + c.comm  # the next rank's F, then its B arrives
        if self.free[j] >= coming:
            return True
        w_time, memory, pending = 0.0, self.memory[j] + c.mem_b[j], done[B][j] - done[W][j]
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
            if self.done[W][j] >= self.done[B][j]:
                raise _DoesNotFit
            self._put(j, W)

    def _input(self, kind: str, j: int, mb: int) -> float:
        """When the input of rank j's pass can arrive (0 if it is not planned yet, as in the paper's code)."""
        t = self.end[kind][j][mb]
        return 0.0 if t is None else t + self.costs.comm

    def _fill(self, j: int, ready: float, greedy: bool) -> None:
        """W's in the gap before a pass that can start at `ready`: every W that fits; then one more W if the
        remaining gap would raise the largest bubble, or (greedy) if it would not."""
        c, done = self.costs, self.done
        while done[W][j] < done[B][j] and self.free[j] + c.w[j] <= ready:
            self._put(j, W)
        if done[W][j] < done[B][j] and self.free[j] < ready:
            if greedy or ready - self.free[j] > self.largest - self.bubble[j]:
                self._put(j, W)

    def _put(self, j: int, kind: str) -> None:
        done = self.done
        mb = done[kind][j]
        ready = self.free[j]
        if (kind == F and j > 0) or (kind == B and j + 1 < self.p):
            source = self.end[kind][j - 1 if kind == F else j + 1][mb]
            if source is None:
                # The warm-up can leave a rank with more forwards than the rank before it when it reaches the
                # last microbatch; the paper's code then takes the input as ready at 0. So do we (the same
                # decisions), and the caller times the result with the simulator.
                self.exact = False
            else:
                ready = max(ready, source + self.costs.comm)
        if done[F][j]:
            self.bubble[j] += ready - self.free[j]
            if self.bubble[j] > self.largest:
                self.largest = self.bubble[j]
        else:
            self.first[j] = ready
        self.free[j] = ready + self.duration[kind][j]
        if kind != W:
            self.end[kind][j][mb] = self.free[j]
        self.memory[j] += self.delta[kind][j]
        done[kind][j] += 1
        self.orders[j].append(_new(Action, (j, kind, mb)))
