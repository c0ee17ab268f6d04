"""A lower bound on the step time of any schedule, for any placement, costs and memory limit.

The step time is the cost zb-auto minimises and the paper's bubble rate divides by: the longest rank span, from a
rank's first action's start to its last action's end. `lower_bound(placement, microbatches, costs)` is at most the
step time of every schedule with split backwards (B and W) and of every unsplit one (BW), whatever its order and
whatever memory it uses: a memory limit only removes schedules, so it cannot lower a bound that holds for all.

The bound, for one rank r (the step time is at least the largest over the ranks)
------------------------------------------------------------------------------
All m microbatches run the same actions: for each stage an F, a B and a W, with the dependencies `simulate` uses
(F after the previous stage's F; B after its own F and the next stage's B; W after its B; a dependency across
ranks adds `comm`). Write t0 for the start of rank r's first action and E for the end of its last.

  head(x): for an action type x = (stage, kind), the longest path in one microbatch's dependency graph from the
    start of an action on rank r to the start of x (an action's duration counts when the path leaves it, plus
    `comm` on an edge across ranks); 0 for types on rank r; undefined if no action of rank r reaches x.
  tail(x): the longest path from the end of x to the end of an action on rank r; 0 for types on rank r;
    undefined if x reaches no action of rank r.

Claim: for any rank q and any set S of action types on q with head and tail defined,

    E - t0 >= min_{x in S} head(x) + m * sum_{x in S} duration(x) + min_{x in S} tail(x).

Proof. Take a copy of x in S for microbatch k. Its path to it starts at an action y of rank r for the same
microbatch k; y starts at or after t0 (every action of rank r does), and every edge of the path holds in any
valid timing (a successor starts no earlier than its predecessor ends, plus comm across ranks), so the copy
starts at or after t0 + head(x). Likewise it ends at or before E - tail(x): it is followed by a path to an action
of rank r, which ends at or before E. So all m |S| copies run inside [t0 + min head, E - min tail], on rank q,
which runs one action at a time: that window is at least their total duration long.  QED

`rank_bounds` takes for each rank r the largest right-hand side over every rank q and every S. With S all of
rank r's own types it is rank r's work; one-stage-per-rank with r = 0, q = p - 1 and S = {F, B} it is the bound
the paper case is proven optimal against (docs/schedules.md, "Against the paper"):

    (p-1)(F + comm) + m(F + B) + (p-1)(B + comm) + W

(head of the last stage's F: the F chain reaching it; tail of its B: the B chain back to rank 0, then rank 0's W).
W's of other ranks have no tail (nothing waits for them) and so never count. The largest right-hand side over S
is found without trying every subset: it is attained by S = {x on q: head(x) >= h, tail(x) >= t} for some head
value h and tail value t of q's types, so the search is cubic in the types a rank holds.

An unsplit schedule (BW) is covered: running each BW as its B then its W at once is a valid split timing with the
same span, so its span is at least the bound.
"""

from __future__ import annotations

from zb.schedules.actions import Action, B, F, ScheduleError, W
from zb.schedules.costs import Costs
from zb.schedules.simulate import dependencies

NONE = float("-inf")


def lower_bound(placement: tuple[int, ...], microbatches: int, costs: Costs) -> float:
    """The least step time (longest rank span) any schedule of this pipeline can have (module docstring)."""
    return max(rank_bounds(placement, microbatches, costs))


def rank_bounds(placement: tuple[int, ...], microbatches: int, costs: Costs) -> list[float]:
    """Per rank r, a lower bound on rank r's span in any schedule (the largest right-hand side of the claim)."""
    n = len(placement)
    if costs.num_stages != n:
        raise ScheduleError(f"costs are for {costs.num_stages} stages, the placement has {n}")
    ranks = max(placement) + 1
    types = [(s, k) for k in (F, B, W) for s in range(n)]
    order = [(s, F) for s in range(n)] + [(s, B) for s in reversed(range(n))] + [(s, W) for s in range(n)]
    deps = {x: [(d.stage, d.kind) for d in dependencies(Action(*x, 0), n, True)] for x in types}
    users = {x: [] for x in types}
    for x in types:
        for d in deps[x]:
            users[d].append(x)

    def duration(x):
        return costs.duration(*x)

    def comm(a, b):
        return costs.comm if placement[a[0]] != placement[b[0]] else 0.0

    bounds = []
    for r in range(ranks):
        head = {x: 0.0 if placement[x[0]] == r else NONE for x in types}
        for x in order:
            for d in deps[x]:
                if head[d] > NONE:
                    head[x] = max(head[x], head[d] + duration(d) + comm(d, x))
        tail = {x: 0.0 if placement[x[0]] == r else NONE for x in types}
        for x in reversed(order):
            for u in users[x]:
                if tail[u] > NONE:
                    tail[x] = max(tail[x], comm(x, u) + duration(u) + tail[u])
        best = 0.0
        for q in range(ranks):
            held = [x for x in types if placement[x[0]] == q and head[x] > NONE and tail[x] > NONE]
            for h in {head[x] for x in held}:
                for t in {tail[x] for x in held}:
                    chosen = [x for x in held if head[x] >= h and tail[x] >= t]
                    if chosen:
                        best = max(best, h + microbatches * sum(map(duration, chosen)) + t)
        bounds.append(best)
    return bounds

