"""The `zb` torch.compile backend: Dynamo graph -> passes -> codegen -> runtime.

`torch.compile(model, backend="zb", options={...})` reaches `zb_backend` through the `torch_dynamo_backends`
entry point. `ZbBackend` is the object behind it: it keeps every graph it compiled (`backend.graphs`) and, per
graph, the plan it built for each input signature, so tests and `zb.explain` can look inside.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Sequence

import torch
import torch.fx as fx

from zb.codegen import compile_plan
from zb.errors import ZbUnsupportedError
from zb.options import Options
from zb.passes import PASSES, InputSpec, Plan, run_passes
from zb.runtime import MicrobatchRunner, split_microbatches

log = logging.getLogger(__name__)


class ZbBackend:
    """A torch.compile backend object. `codegen=False` builds plans but runs the Dynamo graph eagerly."""

    def __init__(self, options: dict[str, Any] | Options | None = None, *, codegen: bool = True):
        self.options = Options.from_dict(options)
        self.codegen = codegen
        self.graphs: list[CompiledGraph] = []

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any], **kwargs: Any) -> CompiledGraph:
        if kwargs.get("options") is not None:
            raise ZbUnsupportedError("pass options to ZbBackend(...) or to backend='zb', not both")
        _reject_graph_break(gm)
        compiled = CompiledGraph(gm, example_inputs, self.options, codegen=self.codegen)
        self.graphs.append(compiled)
        return compiled

    @property
    def plans(self) -> list[Plan]:
        return [plan for graph in self.graphs for plan in graph.plans.values()]


def zb_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], options: dict | None = None, **kwargs: Any):
    """The function registered as backend "zb"; `options` comes from torch.compile(..., options={...})."""
    return ZbBackend(options)(gm, example_inputs, **kwargs)


class CompiledGraph:
    """What Dynamo calls in place of one graph: builds (once per input signature) and runs a plan."""

    def __init__(self, gm: fx.GraphModule, example_inputs: Sequence[Any], options: Options, codegen: bool = True):
        self.gm = gm
        self.options = options
        self.codegen = codegen
        self.inputs = describe_inputs(gm, example_inputs)
        self.plans: dict[tuple, Plan] = {}
        self._runners: dict[tuple, MicrobatchRunner] = {}

    def __call__(self, *args: Any) -> Any:
        training = torch.is_grad_enabled() and any(
            isinstance(a, torch.Tensor) and a.requires_grad for a in args
        )
        key = (training, *(_signature(a) for a in args))
        if key not in self.plans:
            self.plans[key] = self.build_plan(args, training)
            if self.codegen:
                self._runners[key] = MicrobatchRunner(self.plans[key], compile_plan(self.plans[key]))
        if not self.codegen:
            return self.gm(*args)
        return self._runners[key](*args)

    def build_plan(self, args: Sequence[Any], training: bool) -> Plan:
        specs = [
            InputSpec(s.index, s.kind, s.name, isinstance(a, torch.Tensor) and a.requires_grad, s.batched)
            for s, a in zip(self.inputs, args)
        ]
        example = split_microbatches(specs, args, self.options.microbatches)[0]
        plan = Plan(
            graph=self.gm,
            inputs=specs,
            example_inputs=example,
            num_outputs=_num_outputs(self.gm),
            training=training,
            options=self.options,
        )
        return run_passes(plan, PASSES)


def describe_inputs(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> list[InputSpec]:
    """Classify Dynamo's graph inputs: parameters, buffers (module state), user inputs, constants."""
    specs = []
    for index, (node, value) in enumerate(zip(gm.graph.find_nodes(op="placeholder"), example_inputs)):
        grapharg = node.meta.get("grapharg")
        source = getattr(grapharg, "source", None)
        name = _source_path(source) if source is not None else node.name
        if isinstance(value, torch.nn.Parameter):
            kind = "parameter"
        elif isinstance(value, torch.Tensor):
            is_local = isinstance(source, torch._dynamo.source.LocalSource)
            kind = "input" if is_local else "buffer"
        else:
            kind = "constant"
        if kind == "constant" and isinstance(value, torch.SymInt):
            raise ZbUnsupportedError(
                "zb compiles static shapes; Dynamo made this graph dynamic (an input changed shape between "
                "calls). Pass dynamic=False to torch.compile and keep the batch shape fixed."
            )
        batched = kind == "input" and value.dim() > 0
        requires_grad = isinstance(value, torch.Tensor) and value.requires_grad
        specs.append(InputSpec(index, kind, name, requires_grad, batched))
    return specs


def _source_path(source) -> str:
    """L['self']._modules['fc']._parameters['weight'] -> fc.weight; L['x'] -> x."""
    parts = re.findall(r"\['([^']*)'\]", source.name)
    keep = [p for p in parts[1:]] if len(parts) > 1 else parts
    return ".".join(keep) or source.name


def _signature(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return (tuple(value.shape), value.dtype, value.device.type, value.requires_grad)
    return value


def _num_outputs(gm: fx.GraphModule) -> int:
    (out,) = gm.graph.find_nodes(op="output")
    return len(out.args[0]) if isinstance(out.args[0], (tuple, list)) else 1


def _reject_graph_break(gm: fx.GraphModule) -> None:
    from torch._dynamo.symbolic_convert import InstructionTranslator

    tx = InstructionTranslator.current_tx()
    if tx is None:  # called outside Dynamo (a test handing us a graph directly)
        return
    reason = getattr(tx.output, "compile_subgraph_reason", None)
    resumed = tx.f_code.co_name.startswith("torch_dynamo_resume_in_")
    if (reason is not None and reason.graph_break) or resumed:
        where = ""
        if reason is not None and reason.user_stack:
            frame = reason.user_stack[-1]
            where = f" at {frame.filename}:{frame.lineno} ({frame.line})"
        why = reason.reason.strip().splitlines()[0] if reason is not None and not resumed else "code after a break"
        raise ZbUnsupportedError(
            f"zb needs the whole model in one graph, but Dynamo broke the graph{where}: {why}\n"
            "Remove what Dynamo cannot trace there (prints, .item(), data-dependent Python control flow), and "
            "use torch.compile(..., fullgraph=True) to see every break."
        )
