"""What normalize_loss refuses because splitting the batch would change it: an operation that mixes samples
(batch statistics, comparisons between samples, a sort over the batch) outside a reduction the loss analysis
understood, a batch reshaped into another dimension, and a statistic of the batch reduced into the loss (an
auxiliary loss, accepted per microbatch only under option aux_loss)."""

from __future__ import annotations

import torch
import torch.fx as fx

from zb.core.errors import ZbUnsupportedError
from zb.passes.analyze_batch import source_line
from zb.passes.loss_terms import describe
from zb.passes.plan import ancestors, concrete, descendants


class SampleChecks:
    """The per-sample checks of the loss analysis (`_Analysis` in normalize_loss.py, which holds the graph, its
    full-batch twin, the verified reductions and the auxiliary terms these read)."""

    def check_per_sample(self, explicit: bool = False, within: set[fx.Node] | None = None,
                         auxiliary: bool = True) -> None:
        """Every operation analyze_batch found mixing samples must be a reduction this analysis understood (a loss
        term, a token count): anything else (batch statistics, comparisons between samples, one sample picked
        out, a sort or scan over the batch) cannot be reproduced by splitting the batch. With an explicit
        `loss_reduction` the user says how the loss combines, so a reduction over the batch is the user's to answer
        for; a per-sample value computed from it is still refused (analyze_batch records that use separately).
        `within`: look only at operations among these nodes (to name what made a refused loss term mix);
        `auxiliary`: excuse what feeds only the auxiliary terms (`_check_auxiliary` decides whether they are)."""
        batch = self.plan.batch
        if batch is None:
            return
        self._check_sample_shapes(within)
        nodes = self.nodes
        excused = self._auxiliary_only() if auxiliary else set()
        if auxiliary:
            self._check_auxiliary(excused)
        for mixing in batch.mixing:
            if nodes.get(mixing.node) in self.verified | excused or (explicit and mixing.kind == "reduction"):
                continue
            if within is not None and nodes.get(mixing.node) not in within:
                continue
            where = f" at {mixing.source}" if mixing.source else ""
            target = nodes[mixing.node] if mixing.node in nodes else None
            what = describe(target) if target is not None else mixing.op
            raise ZbUnsupportedError(
                f"{mixing.node} ({what}, aten.{mixing.op}){where} mixes samples across the batch: it {mixing.why}. "
                f"zb splits the batch into {self.m} parts (microbatches x data-parallel replicas) and each would "
                "compute it over its own samples only, so zb cannot give eager's result. Compute it per sample "
                "(normalise over features, not over dim 0), or use microbatches=1 without data parallelism")

    def _check_sample_shapes(self, within: set[fx.Node] | None) -> None:
        """Every value that carries the batch has the same size in each other dim for one split as for the whole
        batch. Where it does not, the batch was reshaped into another dimension (`h.reshape(L, b, d)` of a
        [b, L, d] value): each row still holds one sample's numbers, but which of them depends on the batch size,
        so a split computes something else for its samples than the whole batch does."""
        for node in self.graph.nodes:
            twin = self.twin(node)
            dims = self.plan.batch.batch_dims(node.name)
            if twin is None or not dims or (within is not None and node not in within):
                continue
            mine, theirs = node.meta.get("example_value"), twin.meta.get("example_value")
            if not isinstance(mine, torch.Tensor) or not isinstance(theirs, torch.Tensor) or mine.dim() != theirs.dim():
                continue
            other = [d for d in range(mine.dim()) if d not in dims]
            a = [concrete(mine.shape[d]) for d in other]
            b = [concrete(theirs.shape[d]) for d in other]
            if a != b:
                where = source_line(node)
                raise ZbUnsupportedError(
                    f"{node.name} ({describe(node)}){' at ' + where if where else ''} holds the batch in dim(s) "
                    f"{sorted(dims)}, but its other dims {other} are {a} for one of the {self.m} splits and {b} for "
                    "the whole batch: the batch was reshaped into another dimension, so which numbers of a sample "
                    "end up together depends on the batch size, and each split would compute something else than "
                    "eager. Keep the batch in a dimension of its own (reshape [b, L, d] to [b, L', d'], or use "
                    "transpose/permute to move it), or use microbatches=1 without data parallelism")

    def _auxiliary_only(self) -> set[fx.Node]:
        """The nodes that feed the per-microbatch auxiliary terms and nothing else: not the per-sample path (the
        router logits that also route the tokens), not another output; only the loss's own sums and scales may
        read them."""
        if not self.auxiliary:
            return set()
        mine = ancestors(self.auxiliary)
        loss = ancestors([self.outputs[0]])
        chain = {d for a in self.auxiliary for d in descendants(a)} & loss
        others = [n for n in self.graph.nodes if n not in mine and n not in chain and n.op != "output"]
        return mine - ancestors(others)

    def _check_auxiliary(self, auxiliary: set[fx.Node]) -> None:
        loss = ancestors([self.outputs[0]])
        main = [n for n in self.verified if n in loss]
        for node in self.auxiliary:
            reduced = self.auxiliary_reduced[node]
            within = ancestors([reduced])
            names = {a.name for a in within}
            mixing = [mx for mx in self.plan.batch.mixing if mx.node in names]
            if not main or any(self.nodes[mx.node] not in auxiliary for mx in mixing):
                self.check_per_sample(within=within, auxiliary=False)  # not an auxiliary term: name the cause
                raise self._unknown(node, f"a reduction of {reduced.name}, which is computed from several samples")
            if self.plan.options.aux_loss == "per_microbatch":
                continue
            first = mixing[0] if mixing else None
            cause = (f" ({first.node}{' at ' + first.source if first.source else ''}: it {first.why})"
                     if first is not None else "")
            raise ZbUnsupportedError(
                f"the loss term {node.name} reduces {reduced.name}, a statistic of the whole batch{cause}: split "
                f"into {self.m} parts each would compute it over its own samples, so zb cannot give eager's value. "
                "If it is an auxiliary loss such as a mixture-of-experts router's load-balancing loss, "
                "options={'aux_loss': 'per_microbatch'} computes it per microbatch and averages the microbatches' "
                "values (Megatron's per-micro-batch semantics, not eager's whole-batch value); or leave it out "
                "(router_aux_loss_coef=0, output_router_logits=False)")
