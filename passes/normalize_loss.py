"""normalize_loss: make the loss over microbatches equal eager's loss over the whole batch.

The graph zb runs is traced on one microbatch, so each microbatch's loss is normalised by what that microbatch
holds: a token-mean cross entropy divides by the microbatch's token count, a sum adds the microbatch only. Eager
PyTorch normalises once over the whole batch. This pass reads how the loss is normalised and makes the runtime
weigh each microbatch's loss so that the step's loss, and every gradient, equal eager's.

Contract
  input:  `plan.graph` (a copy: fuse_attention ran), training, `plan.options.loss_reduction`,
          `plan.options.microbatches` and `plan.options.data_parallel`, and `plan.batch_graph` (the frame's graph
          at the global batch, to tell a batch size baked into a constant from a fixed scale).

Splits. The batch eager sees is the global one: the concatenation of every data-parallel replica's batch. zb
splits it n = microbatches x data_parallel ways (m microbatches in each of D replicas), and this pass reasons
with n throughout: every split's loss is weighed so that the sum over all n splits (the runtime adds the
microbatches of a replica, then the replicas, by the rules of runtime/combine.py) is eager's loss
on the global batch. So with D > 1 a token mean is weighted by the global token count even when
microbatches=1; only n = 1 (one microbatch, one replica) has nothing to weigh. `plan.batch_graph` is accordingly
the frame traced at the global batch, n times a split's samples (zb/planning.py `Planner._batch_graph`: Dynamo's
own graph when it is static and D = 1; else the frame traced again, under torchrun on D copies of this replica's
batch, since only the shapes and the numbers baked into the graph are compared). It is None only when n = 1.
Below, "m microbatches" reads as "n splits" with data parallelism.
  output: `plan.loss` (a `LossSpec`): how the runtime seeds each microbatch's backward and combines the loss and
          each scalar extra output over microbatches. When the loss terms are not all plain means, `plan.graph`
          gets one scalar input per weighting class (`plan.inputs` kind "loss_weight") and each term is multiplied
          by its class's weight; the runtime feeds the weights, seeds every microbatch with 1 and sums the
          weighted losses. `LossSpec.denominator` is a small graph over the plan's inputs (targets, masks) that
          gives each data-dependent denominator of one microbatch: the runtime evaluates it for every
          microbatch before the step's first action, so each B has its exact seed without waiting for any F.

The loss is split into additive terms through +, -, negation and scaling by a number. Each term is one of:
    mean        x.mean(), F.*_loss(reduction="mean"), kl_div "batchmean": every microbatch holds the same number
                of elements, so the batch's value is the mean of the microbatches' (weight 1/m); also any term that
                reads no batched input (a regulariser), which eager counts once
    sum         x.sum(), F.*_loss(reduction="sum"): the batch's value is the sum (weight 1)
    ratio       F.cross_entropy / F.nll_loss with class-index targets and reduction "mean" (the summed loss over
                the weight of the targets that are not ignore_index), or s / d with s a sum and d a sum over
                inputs only (a token count the user computed): the term becomes its numerator (the loss with
                reduction "sum", or s) times 1 / (d summed over every microbatch)
A number added to the loss counts once (weighted like a mean); the mean or sum of a scalar is that scalar.
A division by a number that is the batch size in Dynamo's full-batch graph and the microbatch size here (a
`/ x.shape[0]`) makes a mean; a number that is the same in both is a fixed scale. The full-batch graph (Dynamo's,
or the frame traced again at static shapes) also checks that every reduction reduces one value per sample and
that every other value computed from the batch is per sample (m times the elements of its microbatch twin):
a model that mixes samples across the batch (BatchNorm in training, `x - x.mean(0)`, `e @ e.T`) cannot be split
into microbatches and is refused. Anything else is an error
naming the operation, with the option `loss_reduction` ("mean": average the microbatches' losses, as exact as
the microbatches are equal in normalisation; "sum": add them) as the explicit way out.

    loss = ce(logits, y)                  (y with -100 padding; 4 microbatches with 7, 2, 8, 5 tokens)
    ->  ce(logits, y, reduction="sum") * w,  w = 1 / 22 in every microbatch,  step loss = sum of the four
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from zb.core.errors import ZbUnsupportedError
from zb.passes.keys import denominator_key, input_key
from zb.passes.loss_samples import SampleChecks
from zb.passes.loss_terms import (
    ADD, DIV, ELEMENTWISE_LOSSES, MEAN, MUL, NEG, RATIO, SUM, LossSpec, LossTerm, baked_numbers, bind_arguments,
    erase_unused, index_targets, is_scalar, reduced_arg, uncast,
)
from zb.passes.plan import InputSpec, Plan, ancestors, concrete


def normalize_loss(plan: Plan) -> Plan:
    splits = plan.splits  # n in the module docstring
    reduction = plan.options.loss_reduction
    analysis = _Analysis(plan)
    outputs = analysis.outputs
    learned = [isinstance(n, fx.Node) and analysis.learned(n) for n in outputs]
    if not plan.training:  # every output is combined as eager would compute it on the whole batch
        rules = [analysis.output_rule(j, n) for j, n in enumerate(outputs)]
        analysis.check_per_sample()
        plan.loss = LossSpec("mean", outputs=rules, denominator=analysis.denominator_graph(), learned=learned)
        return plan
    rules: list[Any] = ["loss"]
    for j, node in enumerate(outputs[1:], start=1):
        rules.append(analysis.output_rule(j, node))
    try:
        terms = [] if splits == 1 or reduction != "auto" else list(dict.fromkeys(analysis.terms(outputs[0], "output")))
    except ZbUnsupportedError:  # a loss zb cannot read: if something before it mixes samples, that is the cause
        analysis.check_per_sample(explicit=True, within=ancestors([outputs[0]]), auxiliary=False)
        raise
    if splits == 1 or reduction == "mean" or (reduction == "auto" and all(t.kind == MEAN for t in terms)):
        mode = "mean"
    else:
        mode = "sum" if reduction == "sum" else "weighted"
    analysis.check_per_sample(explicit=reduction != "auto")
    plan.loss = LossSpec(mode, terms=terms, outputs=rules, denominator=analysis.denominator_graph(), learned=learned)
    if mode == "weighted":
        _weigh_terms(plan, analysis, terms)
    plan.counters["normalize_loss.terms"] = len(plan.loss.terms)
    plan.counters["normalize_loss.weights"] = len(plan.loss.weights)
    return plan


class _Analysis(SampleChecks):
    """Reads the loss expression of `plan.graph` (and of each scalar extra output)."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.m = plan.splits  # n in the module docstring
        self.graph = plan.graph.graph
        (out,) = self.graph.find_nodes(op="output")
        self.outputs = list(out.args[0]) if isinstance(out.args[0], (tuple, list)) else [out.args[0]]
        self.placeholders = {n: i for i, n in enumerate(self.graph.find_nodes(op="placeholder"))}
        self.batch_nodes = {n.name: n for n in plan.batch_graph.graph.nodes} if plan.batch_graph is not None else None
        self.denominators: list[tuple[str, Any]] = []  # (kind, data) per RATIO denominator
        self.verified: set[fx.Node] = set()  # reductions over the batch the analysis understood
        self.auxiliary: list[fx.Node] = []  # loss terms reducing a statistic of the batch (option aux_loss)
        self.auxiliary_reduced: dict[fx.Node, fx.Node] = {}
        self.nodes = {n.name: n for n in self.graph.nodes}
        self._reads: dict[fx.Node, frozenset[int]] = {}
        self._batched: dict[fx.Node, bool] = {}

    # What a node depends on ----------------------------------------------------------------------------------
    def reads(self, node: fx.Node) -> frozenset[int]:
        """The plan inputs a node's value depends on (one pass over the graph in order: no recursion, so a chain
        of thousands of nodes is fine)."""
        if not self._reads:
            for n in self.graph.nodes:
                self._reads[n] = frozenset({self.placeholders[n]}) if n in self.placeholders else \
                    frozenset().union(*(self._reads[a] for a in n.all_input_nodes))
        return self._reads[node]

    def batched(self, node: fx.Node) -> bool:
        """Its value depends on the batch: it reads a batched input, or the full-batch graph computes it with
        other numbers or sizes (a `torch.ones(x.shape[0])`, a `float(x.shape[0])`), or it reads such a value."""
        if not self._batched:
            for n in self.graph.nodes:
                twin = self.twin(n)
                self._batched[n] = (
                    any(self.plan.inputs[i].batched for i in self.reads(n))
                    or (twin is not None
                        and (baked_numbers(twin) != baked_numbers(n) or self.ratio(n) not in (None, 1)))
                    or any(self._batched[a] for a in n.all_input_nodes)
                )
        return self._batched[node]

    def learned(self, node: Any) -> bool:
        """Eager would let it require grad (it depends on a parameter or an input that requires grad)."""
        value = node.meta.get("example_value") if isinstance(node, fx.Node) else None
        return isinstance(value, torch.Tensor) and value.requires_grad

    def computed(self, node: fx.Node) -> bool:
        """Depends on a parameter or an input that requires grad: an activation (detached or not), not data."""
        return any(self.plan.inputs[i].kind == "parameter" or self.plan.inputs[i].requires_grad
                   for i in self.reads(node))

    def twin(self, node: fx.Node) -> fx.Node | None:
        """The same node in the full-batch graph (None without one, or for a node zb inserted)."""
        return self.batch_nodes.get(node.name) if self.batch_nodes is not None else None

    def ratio(self, node: fx.Node) -> float | None:
        """How many times more elements the full batch's value has than a microbatch's (m for a per-sample
        value, 1 for a reduction over the batch), or None when unknown."""
        twin = self.twin(node)
        mine = node.meta.get("example_value")
        theirs = twin.meta.get("example_value") if twin is not None else None
        if not isinstance(mine, torch.Tensor) or not isinstance(theirs, torch.Tensor) or concrete(mine.numel()) == 0:
            return None
        return concrete(theirs.numel()) / concrete(mine.numel())  # (at the traced sizes: no guard on a symbol)

    # The loss as terms ---------------------------------------------------------------------------------------
    def terms(self, node: Any, parent: str) -> list[LossTerm]:
        """The additive terms of `node`'s value; `parent` is the node that reads it."""
        if not isinstance(node, fx.Node):
            raise self._unknown(node, "a constant")
        if not self.batched(node):
            return [LossTerm(node.name, parent, MEAN)]  # the same in every microbatch: eager counts it once
        target, args = self._call(node)
        if target in (torch.mean, "mean", torch.sum, "sum") and len(args) == 1 and not node.kwargs \
                and isinstance(args[0], fx.Node) and is_scalar(args[0]):
            return self.terms(args[0], node.name)  # the mean or sum of one number is that number
        if target in ADD and len(args) == 2 and not node.kwargs:
            # A number added to the loss counts once over the batch: a term weighted like a mean.
            return [t for a in args for t in (self.terms(a, node.name) if isinstance(a, fx.Node)
                                              else [LossTerm(node.name, node.name, MEAN, constant=True)])]
        if target in NEG or uncast(node) is not node or target in ("detach", "clone", torch.clone, "contiguous"):
            return self.terms(args[0], node.name)
        if target in MUL and len(args) == 2 and any(isinstance(a, (int, float)) for a in args):
            index = 0 if isinstance(args[0], (int, float)) else 1
            if isinstance(args[1 - index], fx.Node):
                return self._scaled(node, parent, args[1 - index], args[index], index)
        if target in DIV and len(args) == 2 and isinstance(args[0], fx.Node):
            numerator, divisor = args
            if isinstance(divisor, (int, float)):
                return self._scaled(node, parent, numerator, 1.0 / divisor, 1)
            if isinstance(divisor, fx.Node):
                return [self._ratio(node, parent, numerator, divisor)]
        return [self._leaf(node, parent)]

    def _scaled(self, node: fx.Node, parent: str, inner: fx.Node, scale: float, index: int) -> list[LossTerm]:
        """`inner` times a number: a fixed scale when the full-batch graph has the same number there, or a batch
        size baked in (a `/ x.shape[0]`: the number there differs by the factor m), which makes a mean of a sum."""
        inner_terms = self.terms(inner, node.name)
        batch = self._batch_constant(node, index)
        if batch is None or batch == node.args[index]:
            return inner_terms
        full_scale = batch if self._call(node)[0] in MUL else 1.0 / batch
        if all(t.kind == SUM for t in inner_terms) and math.isclose(full_scale * self.m, scale, rel_tol=1e-9):
            return [LossTerm(node.name, parent, MEAN)]  # a sum over the batch divided by the batch size
        raise self._unknown(node, f"a scale of {scale:g} per microbatch but {full_scale:g} for the whole batch")

    def _batch_constant(self, node: fx.Node, index: int) -> Any:
        """The number at the same place in the global batch's graph (None when there is none: one split)."""
        if self.batch_nodes is None:
            return None
        twin = self.batch_nodes.get(node.name)
        if twin is None or twin.target != node.target or len(twin.args) <= index:
            raise self._unknown(node, "an operation the full-batch graph does not have at the same place")
        value = twin.args[index]
        if isinstance(value, fx.Node):  # Dynamo made the full-batch graph dynamic: a size, with its traced value
            size = value.meta.get("example_value")
            hint = getattr(getattr(size, "node", None), "hint", None)
            if hint is None:
                raise self._unknown(node, "a scale the full-batch graph computes from symbolic sizes")
            value = hint
        return value

    def _ratio(self, node: fx.Node, parent: str, numerator: fx.Node, divisor: fx.Node) -> LossTerm:
        if self.computed(divisor):
            raise ZbUnsupportedError(
                f"the loss divides by {divisor.name}, which depends on the model's activations, so zb cannot "
                "compute the whole batch's denominator before the backward starts; normalise by a count computed "
                "from the inputs (for example the number of target tokens), or set "
                "options={'loss_reduction': 'mean'} (average the microbatches' losses) or 'sum'"
            )
        if not all(t.kind == SUM for t in self.terms(numerator, node.name)):
            raise self._unknown(node, "a division whose numerator is not a sum")
        if not self.batched(divisor):
            return LossTerm(node.name, parent, SUM)  # a fixed divisor: a scaled sum
        count = uncast(divisor)
        if self._leaf_kind(count) != SUM:
            raise self._unknown(node, f"a division by {divisor.name}, which is not a sum over the batch")
        self._verify_reduction(count)
        return LossTerm(node.name, parent, RATIO, self._denominator(("value", divisor)))

    def _leaf(self, node: fx.Node, parent: str) -> LossTerm:
        kind = self._leaf_kind(node)
        if kind is None:
            raise self._unknown(node, "an operation zb does not know the normalisation of")
        reduced = reduced_arg(node)
        if self.plan.batch is not None and isinstance(reduced, fx.Node) and reduced.name in self.plan.batch.stat:
            return self._auxiliary(node, parent, reduced)
        self._verify_reduction(node)
        if kind == RATIO:
            return LossTerm(node.name, parent, RATIO, self._denominator(("targets", bind_arguments(node))))
        return LossTerm(node.name, parent, kind)

    def _auxiliary(self, node: fx.Node, parent: str, reduced: fx.Node) -> LossTerm:
        """A loss term reducing a statistic of the batch: perhaps an auxiliary loss such as a router's
        load-balancing loss (tokens per expert times mean router probability), which check_per_sample accepts
        only under option aux_loss='per_microbatch' (each microbatch computes it over its own tokens, the step
        averages them: Megatron's per-micro-batch aux loss) and only next to a main loss that is per sample."""
        self.auxiliary.append(node)
        self.auxiliary_reduced[node] = reduced
        return LossTerm(node.name, parent, MEAN)

    def _verify_reduction(self, node: fx.Node) -> None:
        """A reduction the analysis understood must reduce one value per sample; check_per_sample then lets it be."""
        reduced = reduced_arg(node)
        batch = self.plan.batch
        if isinstance(reduced, fx.Node) and batch is not None and reduced.name in batch.stat:
            self.check_per_sample(within=ancestors([reduced]), auxiliary=False)  # name what mixed the samples
            raise self._unknown(node, f"a reduction of {reduced.name}, which is not one value per sample (it is "
                                      "computed from several samples of the batch)")
        self.verified.add(node)

    def _leaf_kind(self, node: fx.Node) -> str | None:
        target, args = self._call(node)
        reduce_all = len(args) == 1 and not {k for k in node.kwargs if k != "dtype"}
        if target in (torch.mean, "mean") and reduce_all:
            return MEAN
        if target in (torch.sum, "sum") and reduce_all:
            return SUM
        if target in ELEMENTWISE_LOSSES:
            bound = bind_arguments(node)
            if bound.get("size_average") is not None or bound.get("reduce") is not None:
                return None  # the deprecated arguments: say so rather than guess
            reduction = bound.get("reduction", "mean")
            if reduction == "sum":
                return SUM
            if reduction == "batchmean" or (reduction == "mean" and target in (F.cross_entropy, F.nll_loss)
                                            and not index_targets(bound["target"])):
                return MEAN
            if reduction == "mean" and target in (F.cross_entropy, F.nll_loss):
                return RATIO
            if reduction == "mean" and bound.get("weight") is None:
                return MEAN
        return None

    def _denominator(self, what: tuple[str, Any]) -> int:
        self.denominators.append(what)
        return len(self.denominators) - 1

    def _call(self, node: fx.Node) -> tuple[Any, list[Any]]:
        if node.op == "call_method":
            target = {"add": operator.add, "sub": operator.sub, "mul": operator.mul, "div": operator.truediv,
                      "neg": operator.neg, "__neg__": operator.neg}.get(node.target, node.target)
            return target, list(node.args)
        if node.op == "call_function":
            return node.target, list(node.args)
        return None, []

    def _unknown(self, node: Any, what: str) -> ZbUnsupportedError:
        name = node.name if isinstance(node, fx.Node) else repr(node)
        return ZbUnsupportedError(
            f"zb cannot tell how the loss is normalised over the batch: {name} is {what}. With several "
            "microbatches zb must weigh each microbatch's loss as eager weighs the whole batch. Write the loss as "
            "a mean, a sum, a token-mean cross entropy, or a sum divided by a count computed from the inputs, or "
            "say how to combine microbatches with options={'loss_reduction': 'mean'} (average their losses: exact "
            "when every microbatch's loss is normalised alike) or 'sum' (add them)"
        )

    # Extra outputs -------------------------------------------------------------------------------------------
    def output_rule(self, j: int, node: Any) -> Any:
        value = node.meta.get("example_value") if isinstance(node, fx.Node) else None
        if not isinstance(value, torch.Tensor):
            return "first"  # a constant: the same for every microbatch
        if not self.batched(node):
            return "first"  # reads no batched input: the same value in every microbatch
        if self.m == 1:
            return ("concat", 0) if value.dim() > 0 else MEAN
        if value.dim() > 0:
            return ("concat", self._batch_dim(j, node))
        try:
            terms = self.terms(node, "output")
        except ZbUnsupportedError as e:
            raise ZbUnsupportedError(f"output {j} of the compiled function ({node.name}): {e}") from None
        kinds = {(t.kind, t.denominator) for t in terms}
        if len(kinds) != 1:
            raise ZbUnsupportedError(
                f"output {j} of the compiled function ({node.name}) adds terms that combine differently over "
                f"microbatches ({', '.join(sorted(t.kind for t in terms))}); return them as separate outputs")
        kind, denominator = kinds.pop()
        return (RATIO, denominator) if kind == RATIO else kind

    def _batch_dim(self, j: int, node: fx.Node) -> int:
        """The dimension along which the microbatches' values of an output make the full batch's: its one batch
        dim whose samples are contiguous (analyze_batch)."""
        mine = list(node.meta["example_value"].shape)
        dims = self.plan.batch.batch_dims(node.name) if self.plan.batch is not None else {}
        if len(dims) == 1 and None not in dims.values():
            return next(iter(dims))
        raise ZbUnsupportedError(
            f"output {j} of the compiled function ({node.name}, shape {mine} per microbatch) is not one row per "
            f"sample along a dimension (its batch dims: {sorted(dims) or 'none'}), so zb cannot put the "
            "microbatches' values together; return per-sample values or scalars")

    # The denominators as one graph ---------------------------------------------------------------------------
    def denominator_graph(self) -> fx.GraphModule | None:
        if not self.denominators:
            return None
        roots = []
        for kind, data in self.denominators:
            roots += [data] if kind == "value" else [a for a in (data["target"], data.get("weight"))
                                                        if isinstance(a, fx.Node)]
        new = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        needed = ancestors(roots)
        for node in self.graph.nodes:
            if node not in needed:
                continue
            if node in self.placeholders:
                env[node] = new.placeholder(node.name)
                env[node].meta = {"zb_key": input_key(self.placeholders[node])}
            else:
                env[node] = new.node_copy(node, lambda a: env[a])
        results = []
        for kind, data in self.denominators:
            if kind == "value":
                results.append(env[data])
            else:
                weight = data.get("weight")
                weight = env[weight] if isinstance(weight, fx.Node) else None
                results.append(new.call_function(target_weight, (env[data["target"]], data.get("ignore_index", -100),
                                                                  weight)))
        new.output(tuple(results))
        gm = fx.GraphModule(self.plan.graph, new)
        gm.meta["zb_output_keys"] = [denominator_key(i) for i in range(len(results))]
        return gm


def target_weight(target: torch.Tensor, ignore_index: int, weight: torch.Tensor | None) -> torch.Tensor:
    """What F.cross_entropy / F.nll_loss with reduction="mean" divide by: the summed class weight (1 without
    weights) of the targets that are not ignore_index."""
    valid = target != ignore_index
    if weight is None:
        return valid.sum()
    return torch.where(valid, weight[torch.where(valid, target, 0)], 0).sum()


def _weigh_terms(plan: Plan, analysis: _Analysis, terms: list[LossTerm]) -> None:
    """One scalar input per weighting class; each term's value is multiplied by its class's weight where the loss
    expression reads it."""
    graph = plan.graph.graph
    nodes = {n.name: n for n in graph.nodes}
    loss = analysis.outputs[0]
    last_placeholder = list(graph.find_nodes(op="placeholder"))[-1]
    example = loss.meta["example_value"]
    fake_mode = example.fake_mode if hasattr(example, "fake_mode") else None
    weight_of: dict[tuple[str, int], fx.Node] = {}
    replaced: list[fx.Node] = []
    for term in terms:
        key = (term.kind, term.denominator)
        if key not in weight_of:
            index = len(plan.inputs)
            with graph.inserting_after(last_placeholder):
                weight = graph.placeholder(f"zb_loss_weight_{len(weight_of)}")
            last_placeholder = weight
            real = torch.ones((), dtype=example.dtype, device=example.device)
            weight.meta["example_value"] = fake_mode.from_tensor(real) if fake_mode is not None else real
            plan.inputs.append(InputSpec(index, "loss_weight", weight.name, False, False, weight.name))
            plan.example_inputs.append(real)
            plan.loss.weights.append((index, term.kind, term.denominator))
            weight_of[key] = weight
        node = value = nodes[term.node]
        if term.constant:  # a number added to the loss: that number times the weight
            index = next(i for i, a in enumerate(node.args) if not isinstance(a, fx.Node))
            with graph.inserting_before(node):
                scaled = graph.call_function(operator.mul, (node.args[index], weight_of[key]))
            scaled.meta = dict(node.meta)
            node.update_arg(index, scaled)
            continue
        if term.kind == RATIO and node.target in (F.cross_entropy, F.nll_loss):
            # The loss's own sum (a microbatch of padding only would make its mean 0 / 0), over the batch's total;
            # a new node, since other outputs may read the mean.
            with graph.inserting_after(node):
                value = graph.call_function(node.target, (), {**bind_arguments(node), "reduction": "sum"})
            value.meta = dict(node.meta)
        elif term.kind == RATIO:  # numerator / count: the numerator, over the batch's total count
            value = node.args[0]
        with graph.inserting_after(value):
            weighted = graph.call_function(operator.mul, (value, weight_of[key]))
        weighted.meta = dict(node.meta)
        if term.parent == "output":
            (out,) = graph.find_nodes(op="output")
            values = out.args[0]
            out.args = ((weighted, *values[1:]),) if isinstance(values, (tuple, list)) else (weighted,)
        else:
            nodes[term.parent].replace_input_with(node, weighted)
        replaced.append(node)
    erase_unused(graph, replaced)  # the divisions whose numerators now carry the weight
    graph.lint()
    plan.graph.recompile()
