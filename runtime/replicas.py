"""Running a step as data-parallel replicas (runtime/data_parallel.py has the gradient sums and the reasoning).

Across processes each replica runs its own batch: before anything runs the replicas exchange their batch sizes
and loss denominators (`global_totals`), so every loss weight divides by the global count, and after the step
the loss and every scalar output are combined over the replica group (`combine_group`) by the same rules as
microbatches (runtime/combine.py). Without a process group every replica runs in this process, one after another
on its part of the batch (`run_here`), and their outputs combine the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from zb.codegen.program import Program
from zb.core.errors import ZbError
from zb.runtime.combine import Rule, combine
from zb.runtime.data_parallel import GradientReduction, LocalReduction, check_same_weights, owners
from zb.runtime.microbatch import split_microbatches


class Replicas:
    """This process's side of D data-parallel replicas: the gradient reduction the schedule's R actions drive,
    the owner of each parameter's optimizer state (shard_optimizer), the global loss denominators and the
    replicas' combined outputs."""

    def __init__(self, program: Program, count: int, comm=None, index: int = 0):
        """`comm`: the replica group (this process is replica `index` of `count`); None: every replica here."""
        self.program, self.count, self.comm, self.index = program, count, comm, index
        self.owner: dict[int, int] | None = None  # parameter index -> the replica that updates it
        if program.training and program.options.shard_optimizer and comm is not None:
            updated = [i for indices in program.updates.values() for i in indices] + list(program.shared_updates)
            self.owner = owners(program, updated, count)
        self.reduction = None  # sums gradients over the replicas, at the schedule's R actions
        if program.training and count > 1:
            self.reduction = (GradientReduction(program, comm, index, self.owner) if comm is not None
                              else LocalReduction(program, count))
        self.checked = False  # the replicas' weights were compared (first step)

    @property
    def here(self) -> bool:
        """Whether every replica runs in this process."""
        return self.count > 1 and self.comm is None

    def check_weights(self, args: Sequence[Any]) -> None:
        """At the first step: every replica of the group starts from the same parameters and buffers."""
        if self.comm is not None and not self.checked:
            check_same_weights(self.comm, self.program, args)
            self.checked = True

    def global_totals(self, args: Sequence[Any], totals: torch.Tensor | None
                      ) -> tuple[list[list[float]], torch.Tensor | None]:
        """(every replica's loss denominators, their sum over the replicas) from this replica's `totals` (one
        small all-gather per step, which also checks the replicas' batches are of one size: the loss is
        normalised by the global batch)."""
        sizes = {args[s.index].shape[0] for s in self.program.inputs if s.batched}
        mine = torch.tensor([float(max(sizes, default=0)), *(totals.tolist() if totals is not None else [])],
                            dtype=torch.float64)
        everyone = [t.tolist() for t in self.comm.all_gather(mine, "comparing the replicas' batches")]
        if len({row[0] for row in everyone}) > 1:
            raise ZbError(
                f"data-parallel replicas were handed batches of different sizes "
                f"({', '.join(f'replica {r}: {int(row[0])}' for r, row in enumerate(everyone))}); every replica's "
                "batch must have the same size, so that the step equals eager on their concatenation (drop the "
                "last incomplete batch, e.g. DataLoader(..., drop_last=True))"
            )
        counts = [row[1:] for row in everyone]
        if totals is None:
            return counts, None
        return counts, torch.tensor([sum(c[k] for c in counts) for k in range(len(counts[0]))], dtype=torch.float64)

    def combine_group(self, outputs: list[Any], rules: Sequence[Rule], counts: list[list[float]]) -> list[Any]:
        """The loss and every scalar output over the replica group (one all-gather); other outputs stay this
        replica's (they describe its own samples)."""
        scalars = [j for j, o in enumerate(outputs) if isinstance(o, torch.Tensor) and o.dim() == 0]
        if not scalars:
            return outputs
        mine = torch.stack([outputs[j].detach().double().cpu() for j in scalars])
        everyone = self.comm.all_gather(mine, "combining the replicas' losses")
        values = [[theirs[k].to(outputs[j].dtype).to(outputs[j].device) for theirs in everyone]
                  for k, j in enumerate(scalars)]
        result = list(outputs)
        for j, value in zip(scalars, combine(values, [rules[j] for j in scalars], counts)):
            result[j] = value
        return result

    def run_here(self, executor, args: Sequence[Any], rules: Sequence[Rule],
                 run: Callable[[bool], tuple[list[Any], list[torch.Tensor | None]]]
                 ) -> tuple[list[Any], list[torch.Tensor | None]]:
        """Every replica in this process: the batch split into `count` parts, each prepared (its microbatches and
        loss denominators, weighed by the totals of all parts), then each run in turn by `run(last)`, which
        returns the part's (outputs, gradients); the last part completes the gradient sums. Returns the outputs
        combined over the replicas and the gradients (a batched input's joined in replica order)."""
        prepared, local = [], []  # each replica's microbatches and loss denominators, and their totals
        for part in split_microbatches(self.program.inputs, args, self.count):
            local.append(executor.prepare(part))
            prepared.append((executor.inputs, executor.denominators))
        totals = torch.stack(local).sum(0) if local[0] is not None else None
        per_replica, slices = [], {}
        for r, (inputs, denominators) in enumerate(prepared):
            executor.inputs, executor.denominators = inputs, denominators
            executor.totals, executor.replica = totals, r
            if self.reduction is not None:
                self.reduction.begin(r)
            outputs, combined = run(r == self.count - 1)
            if self.reduction is not None:
                self.reduction.reduce_shared(combined)
            per_replica.append(outputs)
            for i, spec in enumerate(self.program.inputs):
                if spec.batched and combined[i] is not None:
                    slices.setdefault(i, []).append(combined[i])
        for i, values in slices.items():
            combined[i] = torch.cat(values)
        counts = [t.tolist() for t in local] if totals is not None else None
        return combine([[outputs[j] for outputs in per_replica] for j in range(len(rules))], rules, counts), combined
