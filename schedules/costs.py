"""Per-stage costs of a pipeline: time of F, B, W and of one point-to-point transfer, activation memory, and the
time to all-reduce each stage's parameter gradients over its data-parallel replicas.

Memory follows the paper: F allocates M_B (held until B), B releases M_B - M_W and W the remaining M_W; an unsplit
BW releases M_B. Units are whatever the caller uses (ms and bytes when profiled, 1.0 for uniform studies).
`with_reduction` fills the reduction times from a ring all-reduce model (bytes, replicas, bandwidth, latency).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from zb.schedules.actions import BW, B, F, ScheduleError, W


@dataclass(frozen=True)
class Costs:
    """Per-stage times of F, B and W, the time of a message, and the activation memory B and W hold and free."""
    f: tuple[float, ...]
    b: tuple[float, ...]
    w: tuple[float, ...]
    comm: float = 0.0
    mem_b: tuple[float, ...] = ()
    mem_w: tuple[float, ...] = ()
    reduce: tuple[float, ...] = ()  # per stage: all-reduce of its parameter gradients over the replicas (default 0)

    def __post_init__(self):
        n = len(self.f)
        if not (len(self.b) == len(self.w) == n):
            raise ScheduleError(f"costs give F for {n} stages, B for {len(self.b)}, W for {len(self.w)}")
        object.__setattr__(self, "mem_b", self.mem_b or (1.0,) * n)
        object.__setattr__(self, "mem_w", self.mem_w or tuple(0.5 * m for m in self.mem_b))
        object.__setattr__(self, "reduce", self.reduce or (0.0,) * n)
        if len(self.mem_b) != n or len(self.mem_w) != n:
            raise ScheduleError(f"memory costs must cover all {n} stages")
        if len(self.reduce) != n:
            raise ScheduleError(f"costs give reduction times for {len(self.reduce)} stages, not {n}")
        if min(self.f + self.b + self.w + self.reduce + (self.comm,)) < 0:
            raise ScheduleError("costs must not be negative")

    @property
    def num_stages(self) -> int:
        return len(self.f)

    @classmethod
    def uniform(cls, stages: int, f=1.0, b=1.0, w=1.0, comm=0.0, mem_b=1.0, mem_w=None, reduce=0.0) -> Costs:
        mem_w = 0.5 * mem_b if mem_w is None else mem_w
        return cls((f,) * stages, (b,) * stages, (w,) * stages, comm, (mem_b,) * stages, (mem_w,) * stages,
                   (reduce,) * stages)

    @classmethod
    def parse(cls, text: str, stages: int) -> Costs:
        """'F=1,B=1,W=1,comm=0' (optionally MB=..., MW=..., R=... for the gradient reduction); a value may list one
        number per stage: F=1:1:2:2."""
        fields = {"F": "1", "B": "1", "W": "1", "comm": "0", "MB": "1", "MW": None, "R": "0"}
        for item in filter(None, (p.strip() for p in text.split(","))):
            key, sep, value = item.partition("=")
            if not sep or key not in fields:
                raise ScheduleError(f"cannot read cost {item!r}; expected F=, B=, W=, comm=, MB=, MW= or R=")
            fields[key] = value

        def per_stage(key: str) -> tuple[float, ...]:
            values = [float(v) for v in fields[key].split(":")]
            if len(values) == 1:
                return tuple(values * stages)
            if len(values) != stages:
                raise ScheduleError(f"{key} lists {len(values)} values for {stages} stages")
            return tuple(values)

        mem_b = per_stage("MB")
        mem_w = per_stage("MW") if fields["MW"] is not None else tuple(0.5 * m for m in mem_b)
        return cls(per_stage("F"), per_stage("B"), per_stage("W"), float(fields["comm"]), mem_b, mem_w,
                   per_stage("R"))

    def with_reduction(self, param_bytes: float | tuple[float, ...], replicas: int, bandwidth: float,
                       latency: float = 0.0) -> Costs:
        """These costs with each stage's reduction time: a ring all-reduce of its gradients (`param_bytes`, one
        number for every stage or one per stage) over `replicas` copies, 2(D-1)/D x bytes / bandwidth + 2(D-1) x
        latency (bandwidth in bytes per time unit of the other costs, latency in that unit); 0 for one replica."""
        n = self.num_stages
        sizes = tuple(param_bytes) if isinstance(param_bytes, (tuple, list)) else (float(param_bytes),) * n
        if len(sizes) != n:
            raise ScheduleError(f"param_bytes lists {len(sizes)} values for {n} stages")
        if replicas < 1 or bandwidth <= 0 or latency < 0 or min(sizes) < 0:
            raise ScheduleError("a reduction needs replicas >= 1, bandwidth > 0, latency >= 0 and bytes >= 0")
        d = replicas
        return replace(self, reduce=tuple(2 * (d - 1) / d * size / bandwidth + 2 * (d - 1) * latency
                                          for size in sizes))

    def split(self, chunks: int) -> Costs:
        """The same model cut `chunks` times finer: stage j of the result is a 1/chunks share of stage
        j // chunks here (F, B, W, M_B, M_W and the gradient reduction divided by `chunks`; one transfer takes as
        long as before). How zb-auto prices the placements with two stages per rank from one-per-rank costs."""
        if chunks < 1:
            raise ScheduleError(f"chunks must be positive, not {chunks}")

        def finer(values: tuple[float, ...]) -> tuple[float, ...]:
            return tuple(values[j // chunks] / chunks for j in range(len(values) * chunks))

        return Costs(finer(self.f), finer(self.b), finer(self.w), self.comm, finer(self.mem_b), finer(self.mem_w),
                     finer(self.reduce))

    def duration(self, stage: int, kind: str) -> float:
        if kind == F:
            return self.f[stage]
        if kind == B:
            return self.b[stage]
        if kind == W:
            return self.w[stage]
        if kind == BW:
            return self.b[stage] + self.w[stage]
        return 0.0

    def memory_delta(self, stage: int, kind: str) -> float:
        if kind == F:
            return self.mem_b[stage]
        if kind == B:
            return -(self.mem_b[stage] - self.mem_w[stage])
        if kind == W:
            return -self.mem_w[stage]
        if kind == BW:
            return -self.mem_b[stage]
        return 0.0


def parse_memory_limit(limit: str | float | None, unit: float, ranks: int) -> float | None:
    """'2p' -> 2 * ranks * unit (unit: one microbatch's activations on one rank); a number is taken as is."""
    if limit is None or isinstance(limit, (int, float)):
        return None if limit is None else float(limit)
    match = re.fullmatch(r"\s*([0-9.]+)\s*p\s*", limit)
    if match:
        return float(match[1]) * ranks * unit
    try:
        return float(limit)
    except ValueError:
        raise ScheduleError(f"memory limit {limit!r}: give a number or a multiple of p such as '1p', '2p'") from None
