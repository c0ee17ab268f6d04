"""Pictures of a timed schedule: a timeline (PNG or SVG, matplotlib) and a compact text rendering.

When gradient reductions take time (data parallelism), each rank gets a thin lane under it with one bar R per
stage reduction, and the time axis runs to the end of the step.
"""

from __future__ import annotations

import pathlib

from zb.schedules.actions import BW, REDUCE, B, F, W
from zb.schedules.simulate import Timeline

COLOURS = {F: "#4c72b0", B: "#55a868", W: "#dd8452", BW: "#8172b3", REDUCE: "#c44e52"}
LETTERS = {F: "F", B: "B", W: "W", BW: "X", REDUCE: "R"}


def title(timeline: Timeline) -> str:
    peaks = ", ".join(f"{p:g}" for p in timeline.peak_memory)
    reduction = ""
    if timeline.has_reduction:
        reduction = f"; step time {timeline.step_time:g}, exposed reduction {timeline.exposed_reduction:g}"
    return (f"{timeline.schedule.name}: {timeline.schedule.num_ranks} ranks, {timeline.schedule.num_stages} stages, "
            f"{timeline.schedule.num_microbatches} microbatches; bubble rate {timeline.bubble_rate:.4f}, "
            f"makespan {timeline.makespan:g}, peak memory per rank [{peaks}]" + reduction)


def draw(timeline: Timeline, path: str | pathlib.Path) -> pathlib.Path:
    """Write the timeline picture; the format follows the suffix (.png or .svg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    path = pathlib.Path(path)
    ranks = timeline.schedule.num_ranks
    origin = min(timeline.start.values())
    longest = max(len(timeline.rank_actions(r)) for r in range(ranks))
    reductions = timeline.has_reduction
    height = 0.55 if reductions else 0.8  # compute bars leave room for the reduction lane below them
    fig, ax = plt.subplots(figsize=(min(24, max(9, 0.3 * longest)), 0.5 * ranks + 1.6))
    for rank in range(ranks):
        for action, start, end in timeline.rank_actions(rank):
            ax.broken_barh([(start - origin, end - start)], (rank - 0.4, height),
                           facecolors=COLOURS[action.kind], edgecolors="white", linewidth=0.5)
            if end - start > timeline.makespan / 150:
                label = str(action.microbatch)
                if timeline.schedule.num_stages > ranks:  # several stages per rank: say which one
                    label = f"{action.stage}:{label}"
                ax.text((start + end) / 2 - origin, rank - 0.4 + height / 2, label, ha="center", va="center",
                        fontsize=6, color="white")
        if reductions:
            for stage, start, end in timeline.rank_reductions(rank):
                ax.broken_barh([(start - origin, end - start)], (rank + 0.2, 0.2), facecolors=COLOURS[REDUCE],
                               edgecolors="white", linewidth=0.5)
                if end - start > timeline.step_time / 50:
                    ax.text((start + end) / 2 - origin, rank + 0.3, f"{stage}R", ha="center", va="center",
                            fontsize=5, color="white")
    ax.set_yticks(range(ranks), [f"rank {r}" for r in range(ranks)])
    ax.invert_yaxis()
    ax.set_xlim(0, timeline.step_time)
    ax.set_xlabel("time")
    kinds = [k for k in (F, B, W, BW) if any(a.kind == k for a in timeline.start)] + [REDUCE] * reductions
    ax.legend(handles=[Patch(color=COLOURS[k], label=k) for k in kinds], loc="upper left", fontsize=7,
              bbox_to_anchor=(1.0, 1.0))
    ax.set_title(title(timeline), fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def to_text(timeline: Timeline, width: int = 100) -> str:
    """One line per rank: each action drawn over the columns its time covers ('.' is idle); with reductions, a
    line `R` under each rank draws its stages' reductions (`R3rrr`: stage 3)."""
    origin = min(timeline.start.values())
    scale = width / timeline.step_time

    def line(bars) -> str:
        row = ["."] * width
        for kind, number, start, end in bars:
            a, b = int(round((start - origin) * scale)), int(round((end - origin) * scale))
            b = max(b, a + 1)
            cells = (f"{LETTERS[kind]}{number}" + LETTERS[kind].lower() * width)[: b - a]
            row[a:b] = list(cells)[: max(0, min(b, width) - a)]
        return "".join(row[:width])

    lines = [title(timeline)]
    for rank in range(timeline.schedule.num_ranks):
        compute = [(a.kind, a.microbatch, start, end) for a, start, end in timeline.rank_actions(rank)]
        lines.append(f"rank {rank:2d} |{line(compute)}|")
        if timeline.has_reduction:
            reductions = [(REDUCE, stage, start, end) for stage, start, end in timeline.rank_reductions(rank)]
            lines.append(f"{'R':>7} |{line(reductions)}|")
    return "\n".join(lines)
