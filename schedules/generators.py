"""Schedule generators: gpipe, 1f1b, interleaved-1f1b, zb-h1, zb-h2, zb-v, v-half, v-min.

zb-h1 and zb-h2 come from the list scheduler (greedy.py) with the policy that defines them; the others are
written out directly (v-half and v-min from their building blocks). Every generator returns a compute-only
`Schedule`; `simulate` times it.
"""

from __future__ import annotations

from collections import deque

from zb.schedules.actions import BW, Action, B, F, Schedule, ScheduleError, W, looped, one_per_rank, v_shape
from zb.schedules.costs import Costs
from zb.schedules.greedy import Policy, greedy


def gpipe(ranks: int, microbatches: int) -> Schedule:
    """All forwards, then all backwards (unsplit): peak memory m microbatches."""
    actions = []
    for r in range(ranks):
        actions.append(tuple(Action(r, F, mb) for mb in range(microbatches))
                       + tuple(Action(r, BW, mb) for mb in range(microbatches)))
    return Schedule("gpipe", microbatches, one_per_rank(ranks), tuple(actions))


def one_f_one_b(ranks: int, microbatches: int) -> Schedule:
    """1F1B: rank r warms up with p-1-r forwards, then alternates one F and one (unsplit) backward."""
    actions = []
    for r in range(ranks):
        warmup = min(ranks - 1 - r, microbatches)
        order = [Action(r, F, mb) for mb in range(warmup)]
        for mb in range(microbatches - warmup):
            order += [Action(r, F, warmup + mb), Action(r, BW, mb)]
        order += [Action(r, BW, mb) for mb in range(microbatches - warmup, microbatches)]
        actions.append(tuple(order))
    return Schedule("1f1b", microbatches, one_per_rank(ranks), tuple(actions))


def interleaved_1f1b(ranks: int, microbatches: int, chunks: int) -> Schedule:
    """Megatron's interleaved 1F1B: `chunks` stages per rank (stage s on rank s % p), microbatches in groups of p."""
    _require(microbatches % ranks == 0, f"interleaved-1f1b needs microbatches divisible by the ranks "
                                        f"(m={microbatches}, p={ranks})")
    total = microbatches * chunks

    def virtual(k: int, backward: bool) -> tuple[int, int]:
        chunk = (k // ranks) % chunks
        mb = (k // (ranks * chunks)) * ranks + k % ranks
        return (chunks - 1 - chunk if backward else chunk), mb

    actions = []
    for r in range(ranks):
        warmup = min((ranks - r - 1) * 2 + (chunks - 1) * ranks, total)
        order, fwd, bwd = [], 0, 0
        for _ in range(warmup):
            chunk, mb = virtual(fwd, False)
            order.append(Action(chunk * ranks + r, F, mb))
            fwd += 1
        while bwd < total:
            if fwd < total:
                chunk, mb = virtual(fwd, False)
                order.append(Action(chunk * ranks + r, F, mb))
                fwd += 1
            chunk, mb = virtual(bwd, True)
            order.append(Action(chunk * ranks + r, BW, mb))
            bwd += 1
        actions.append(tuple(order))
    return Schedule("interleaved-1f1b", microbatches, looped(ranks, chunks), tuple(actions))


def zb_h1(ranks: int, microbatches: int, costs: Costs | None = None) -> Schedule:
    """ZB-H1: 1F1B's in-flight limit (rank r holds at most p-r microbatches); W fills the gaps."""
    inflight = tuple(ranks - r for r in range(ranks))
    policy = Policy(inflight=inflight, pending_w=tuple(range(ranks)), b_first=False)
    return _zero_bubble("zb-h1", one_per_rank(ranks), microbatches, costs, policy)


def zb_h2(ranks: int, microbatches: int, costs: Costs | None = None) -> Schedule:
    """ZB-H2: extra warm-up forwards (rank r holds up to 2(p-r)-1) fill the warm-up bubble; W fills the drain."""
    inflight = tuple(2 * (ranks - r) - 1 for r in range(ranks))
    policy = Policy(inflight=inflight, pending_w=tuple(2 * r for r in range(ranks)), b_first=False)
    return _zero_bubble("zb-h2", one_per_rank(ranks), microbatches, costs, policy)


def zb_v(ranks: int, microbatches: int) -> Schedule:
    """ZB-V: 2p stages in a V (rank r holds stages r and 2p-1-r, so stage 0 and the loss share rank 0).

    Rank r warms up with 2(p-r)-1 forwards of its first stage, then r forwards alternating between its two
    stages, then p-r rounds of F, B, W on its second stage; in steady state it runs F, B, W on each stage in
    turn; the cool-down runs the remaining B, then the W that fill the drain. Built for at least 2p-1
    microbatches (the length of its warm-up); with fewer, the extra microbatches' actions are left out.
    """
    _require(microbatches >= ranks, f"zb-v needs at least as many microbatches as ranks (m={microbatches} < "
                                    f"p={ranks}); use more microbatches or 1f1b")
    n = max(microbatches, 2 * ranks - 1)
    actions = tuple(tuple(a for a in _zb_v_rank(r, ranks, n) if a.microbatch < microbatches) for r in range(ranks))
    return Schedule("zb-v", microbatches, v_shape(ranks), actions)


def _zb_v_rank(r: int, ranks: int, n: int) -> list[Action]:
    stages = (r, 2 * ranks - 1 - r)
    count = {F: [0, 0], B: [0, 0], W: [0, 0]}
    order: list[Action] = []

    def add(*steps: tuple[str, int]) -> None:
        for kind, chunk in steps:
            order.append(Action(stages[chunk], kind, count[kind][chunk]))
            count[kind][chunk] += 1

    for _ in range(2 * (ranks - r) - 1):
        add((F, 0))
    for _ in range(r):
        add((F, 1), (F, 0))
    for _ in range(ranks - r):
        add((F, 1), (B, 1), (W, 1))
    while count[F][1] < count[F][0] or count[F][0] < n:
        if count[F][0] < n:
            add((F, 0))
        add((B, 0), (W, 0), (F, 1), (B, 1), (W, 1))
    for _ in range(r):
        add((B, 0), (B, 1))
    for _ in range(ranks - r):
        add((B, 0), (W, 0))
    while count[W][1] < count[B][1]:
        add((W, 1))
    while count[W][0] < count[B][0]:
        add((W, 0))
    return order


def v_half(ranks: int, microbatches: int) -> Schedule:
    """V-Half (Qi et al., "Pipeline Parallelism with Controllable Memory", arXiv 2405.15362): the V placement with
    about half of 1F1B's activation memory ((p+2)/2 M_B at most) and about half of its bubble rate (p/2m)."""
    return _v_blocks("v-half", ranks, microbatches, _v_half_block)


def v_min(ranks: int, microbatches: int) -> Schedule:
    """V-Min (arXiv 2405.15362): the V placement with about a third of 1F1B's activation memory ((p+4)/3 M_B at
    most) for a bubble rate of about 2p/3m."""
    return _v_blocks("v-min", ranks, microbatches, _v_min_block)


def _v_half_block(r: int, p: int) -> tuple[int, int, int, int]:
    gap = 3 if p % 2 == 0 else 0
    return 2 * r, 3 * p - 2 - r, 3 * p + gap + 2 * r - 1, 6 * p + gap - 2 - r


def _v_min_block(r: int, p: int) -> tuple[int, int, int, int]:
    gap = 2 if p % 3 == 0 else 0
    return r, 2 * p - 1 - r, 2 * p + gap + r, 4 * p + gap - 1 - r


def _v_blocks(name: str, ranks: int, microbatches: int, block) -> Schedule:
    """A V-shaped building block repeated every 6 slots. The block gives, for rank r and microbatch 0, the time
    slots of its four passes: F of its first stage (r), F of its second stage (2p-1-r), then B of the second and
    B of the first. Microbatch k runs them 6k slots later; the two slots of each period the block leaves free run
    W's, the oldest waiting first, and the rest drain at the end. A block's lifespan on a rank (its first F to
    its last B) fixes how many microbatches the rank holds: the memory bound. The rank runs its passes in slot
    order; the simulator squeezes out the empty slots."""
    new = tuple.__new__  # an Action without its Python-level constructor: this runs for zb-auto on every plan
    actions = []
    for r in range(ranks):
        stages = (r, 2 * ranks - 1 - r, 2 * ranks - 1 - r, r)
        passes = sorted((slot + 6 * k, new(Action, (stage, kind, k)))
                        for slot, stage, kind in zip(block(r, ranks), stages, (F, F, B, B))
                        for k in range(microbatches))
        order: list[Action] = []
        waiting: deque[Action] = deque()
        for i, (slot, action) in enumerate(passes):
            order.append(action)
            if action.kind == B:
                waiting.append(new(Action, (action.stage, W, action.microbatch)))
            free = passes[i + 1][0] - slot - 1 if i + 1 < len(passes) else 0  # empty slots up to the next pass
            for _ in range(min(free, len(waiting))):
                order.append(waiting.popleft())
        actions.append(tuple(order + list(waiting)))
    return Schedule(name, microbatches, v_shape(ranks), tuple(actions))


def _zero_bubble(name, placement, microbatches, costs, policy) -> Schedule:
    ranks = max(placement) + 1
    _require(microbatches >= ranks, f"{name} needs at least as many microbatches as ranks (m={microbatches} < "
                                    f"p={ranks}); use more microbatches or 1f1b")
    costs = costs or Costs.uniform(len(placement))
    schedule, _ = greedy(name, placement, microbatches, costs, policy)
    return schedule


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ScheduleError(message)
