"""The `zb` torch.compile backend: Dynamo graph -> passes -> codegen -> runtime.

`torch.compile(model, backend="zb", options={...})` reaches `zb_backend` through the `torch_dynamo_backends`
entry point. `ZbBackend` is the object behind it: it keeps every graph it compiled (`backend.graphs`) and, per
graph, the plan it built for each input signature, so tests and `zb.explain` can look inside.
"""

from __future__ import annotations

import contextlib
import logging
import operator
import weakref
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import fx

from zb import adapt, checkpoint, plan_cache
from zb.codegen import build_program, compile_plan
from zb.core.errors import ZbError, ZbOptionError, ZbPeerError, ZbUnsupportedError
from zb.core.options import Options
from zb.dynamo import (
    FrameCapture, describe_inputs, frame_modules, has_symbolic_shape, input_source, reject_graph_break, size_guards,
)
from zb.materialize import materialize
from zb.passes import PASSES, InputSpec, Plan, run_passes
from zb.passes.plan import concrete
from zb.pipeline import Pipeline
from zb.runtime import PipelineRunner, split_microbatches
from zb.runtime.released import zb_internal

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
        tx = reject_graph_break(gm)
        compiled = CompiledGraph(gm, example_inputs, self.options, tx=tx, codegen=self.codegen)
        self.graphs.append(compiled)
        return compiled

    @property
    def plans(self) -> list[Plan]:
        return list({id(p): p for graph in self.graphs for p in graph.plans.values()}.values())

    @property
    def runners(self) -> list[PipelineRunner]:
        """What runs each compiled signature: its schedule, measured timeline, memory, per graph in order."""
        runners = {id(r): r for graph in self.graphs for r, _ in graph.built.values() if r is not None}
        return list(runners.values())


def explain(model: Any, *example_inputs: Any, **options: Any) -> Plan:
    """Capture `model(*example_inputs)` and run every zb pass on it; returns the Plan (nothing is compiled).

    The model runs once eagerly (as traced by Dynamo) to capture its graph; no gradients are left behind.
    """
    backend = ZbBackend(options, codegen=False)
    compiled = torch.compile(model, backend=backend, dynamic=False)
    compiled(*example_inputs)
    plans = backend.plans
    if not plans:
        raise ZbError("Dynamo captured no graph: the model ran no tensor operations zb could compile")
    return plans[0]


def zb_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], options: dict | None = None, **kwargs: Any):
    """The function registered as backend "zb"; `options` comes from torch.compile(..., options={...})."""
    return ZbBackend(options)(gm, example_inputs, **kwargs)


class CompiledGraph:
    """What Dynamo calls in place of one graph: builds (once per input signature) and runs a plan.

    Dynamo's graph is traced at the full batch. When the batch is split (microbatches > 1) or Dynamo made the
    graph dynamic, the plan is built from the same frame re-traced at microbatch size (zb/dynamo.py). The built
    pipelines live in a bounded cache, shared only with graphs of the same code (zb/plan_cache.py).
    """

    def __init__(self, gm: fx.GraphModule, example_inputs: Sequence[Any], options: Options,
                 tx=None, codegen: bool = True):
        """`tx`: Dynamo's translator for the frame (None when the graph did not come from Dynamo)."""
        self.gm = gm
        self.options = options
        self.codegen = codegen
        self.inputs = describe_inputs(gm, example_inputs)
        # What the re-trace takes from each call: its tensor arguments, and the numbers among its arguments that
        # Dynamo made graph inputs (an int argument it made dynamic: the trace must see the call's value, not the
        # one the frame was first traced with).
        user_inputs = {s.index: input_source(gm, s.index) for s in self.inputs
                       if s.kind == "input" or (s.kind == "constant" and not _is_size(s.source))}
        numbers = frozenset(s.index for s in self.inputs if s.kind == "constant")
        self.frame = FrameCapture(tx, user_inputs, numbers) if tx is not None else None
        nodes = gm.graph.find_nodes(op="placeholder")
        self.static = not any(s.kind == "constant" or has_symbolic_shape(n) for s, n in zip(self.inputs, nodes))
        self.pipeline = Pipeline(options)
        modules = frame_modules(tx, example_inputs)
        self.modules = modules
        # Planning only (codegen=False, zb.explain) keeps its plans to itself: they have nothing to run.
        # The graph as a computation (graph_identity: a released parameter changes how Dynamo spells some of it).
        identity = (tx.f_code, graph_identity(gm)) if tx is not None and codegen else None
        self.cache = plan_cache.shared(identity, options, modules)
        self.symbolic_failed: str | None = None  # why a pipeline with symbolic sizes could not be built
        # The models this graph trains: their state_dict() on a pipeline rank holds only what the rank owns.
        for module in modules:
            checkpoint.guard(module)

    @property
    def plans(self) -> dict[tuple, Plan]:
        """Signature -> its plan, for the signatures the cache holds."""
        return {key: entry.plan for key, entry in self.cache.entries.items()}

    @property
    def built(self) -> dict[tuple, tuple[PipelineRunner | None, list[int]]]:
        """Signature -> (what runs it, the position in this graph's arguments of each of the plan's inputs)."""
        return {key: (entry.runner, self._arg_map(entry)) for key, entry in self.cache.entries.items()}

    @property
    def rebalanced(self) -> set[tuple]:
        """Signatures whose stages were (or were decided not to be) re-cut."""
        return self.cache.rebalanced

    def __call__(self, *args: Any) -> Any:
        # Other ranks' released tensors (runtime/released.py) are planned with and passed on, never read. A failure
        # here reaches every rank of the pipeline at once (zb/pipeline.py `failing_together`).
        with zb_internal(), self.pipeline.failing_together():
            return self._call(args)

    def _call(self, args: Sequence[Any]) -> Any:
        training = torch.is_grad_enabled() and any(
            isinstance(a, torch.Tensor) and a.requires_grad for a in args
        )
        key, entry, dynamic = self._lookup(args, training)
        if entry is None:
            model = self.modules[0] if self.modules else None
            keep = _CUTS.get(model) if model is not None and _releases(self.options) else None
            entry = self._build_symbolic(args, training, keep, dynamic) if dynamic else None
            if entry is None:  # static sizes: a pipeline for this signature only
                key = self._key(args, training)
                plan, arg_map = self.build_plan(args, training, keep_cuts=keep)
                entry = plan_cache.Entry(plan, self._runner(plan) if self.codegen else None,
                                         [self.inputs[i].source for i in arg_map])
            self.cache.put(key, entry)
            plan, arg_map = entry.plan, self._arg_map(entry)
            if entry.runner is not None:
                values = [args[i] for i in arg_map]
                releasing = entry.runner.distributed and _releases(self.options)
                # Deferred tensors (a meta-built model) get values where they are held: with release, their stages'.
                foreign = entry.runner.foreign(values) if releasing else {}
                with no_autocast():
                    materialize(self.modules, {id(t) for t in _tensors(self.modules)} - set(foreign),
                                self.options.init, self.options.init_seed)
                    checkpoint.resume(entry.runner, values)
                if releasing:
                    _release(entry.runner, values, foreign)
                    if model is not None and model not in _CUTS:  # every later plan of the model keeps these cuts
                        _CUTS[model] = (plan.cuts, plan.operations)
        if entry.runner is None:
            return self.gm(*args)
        arg_map = self._arg_map(entry)
        entry.runner.grad_scaler = self.options.grad_scaler
        with no_autocast():  # the pieces carry autocast's casts already; it must not apply again
            result = entry.runner(*[args[i] for i in arg_map])
        adapt.after_step(self, key, entry.runner, args)
        entry.runner.last_grads = None  # read by a re-cut only (adapt); backward holds the gradients it hands out
        return result

    def _build_symbolic(self, args: Sequence[Any], training: bool, keep: tuple | None,
                        dynamic: dict[int, list[int]]) -> plan_cache.Entry | None:
        """The pipeline traced with the `dynamic` dims symbolic, or None where it came out static or zb cannot
        plan or compile it symbolically (a loss normalised by a symbolic size, an operation Inductor cannot
        compile at symbolic sizes): then this graph builds a pipeline per signature, as with option
        symbolic_sizes=False, and says so once."""
        failed = program = None
        try:
            plan, arg_map = self.build_plan(args, training, keep_cuts=keep, dynamic=dynamic)
            program = self._program(plan) if self.codegen else None
        except ZbPeerError:
            raise
        except Exception as e:  # noqa: BLE001  (the static build below raises what is not about symbolic sizes)
            failed = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        # Every rank compiles only its own stages, so one rank may fail where another does not: they agree (with
        # replicas too), so that every process builds the same pipelines and runs the same collectives.
        failed = next((f for f in self._agree(failed, "agreeing on a pipeline with symbolic sizes") if f is not None),
                      None)
        if failed is not None:
            self.symbolic_failed = failed
            log.warning("zb: could not plan this graph with symbolic sizes (%s); it builds one pipeline per input "
                        "shape instead (option symbolic_sizes=False does so without trying)", failed)
            return None
        guards = size_guards(plan, self._agree)
        if guards is None:
            return None
        runner = self._runner(plan, program=program) if self.codegen else None
        return plan_cache.Entry(plan, runner, [self.inputs[i].source for i in arg_map], guards, dynamic)

    def _agree(self, value: Any, what: str = "agreeing on the shape guards") -> list[Any]:
        """`value` of every process of this pipeline and its replicas (just this one's without torch.distributed)."""
        values = [value]
        comms = [self.pipeline.comm(), self.pipeline.replica_comm()] if self.codegen else []
        for comm in (c for c in comms if c is not None and c.distributed):
            values = [v for gathered in comm.all_gather_object(values, what) for v in gathered]
        return values

    def _lookup(self, args: Sequence[Any], training: bool) -> tuple[tuple, plan_cache.Entry | None, dict]:
        """(the cache key, its entry or None, the dims to trace symbolic when building one). A pipeline built for
        this exact signature serves first; else, when Dynamo made sizes dynamic (option symbolic_sizes), the
        symbolic pipeline of the signature with those sizes left out, if its shape guards admit this call's
        sizes; one that does not gets a pipeline of its own, at these sizes."""
        exact = self._key(args, training)
        entry = self.cache.get(exact)
        symbolic = self.options.symbolic_sizes and self.symbolic_failed is None
        dims = self._dynamic_dims(args) if entry is None and symbolic else {}
        if not dims:
            return exact, entry, {}
        generic = self._key(args, training, dims)
        entry = self.cache.get(generic)
        if entry is None:
            return generic, None, dims
        if entry.guards is not None and entry.guards([args[i] for i in self._arg_map(entry)]):
            return generic, entry, dims
        return exact, None, {}

    def _dynamic_dims(self, args: Sequence[Any]) -> dict[int, list[int]]:
        """Per user input (position in this graph), the dims Dynamo made symbolic, but the batch dim of a split
        input (each microbatch has a fixed size)."""
        dims = {}
        specs = _split_axes([_with_requires_grad(s, a) for s, a in zip(self.inputs, args)], args,
                            self.options.unbatched)
        for spec, node in zip(specs, self.gm.graph.find_nodes(op="placeholder")):
            value = node.meta.get("example_value")
            if spec.kind == "input" and isinstance(value, torch.Tensor):
                symbolic = [d for d in range(value.dim()) if isinstance(value.shape[d], torch.SymInt)
                            and not (d == 0 and spec.batched)]
                if symbolic:
                    dims[spec.index] = symbolic
        return dims

    def _key(self, args: Sequence[Any], training: bool, generic: dict[int, list[int]] | None = None) -> tuple:
        """The call's signature: each input's shape, dtype, device (a non-tensor's value) by its source; the sizes
        a dynamic graph takes as arguments are left out (the tensors' shapes say them), and so are the `generic`
        dims (position -> dims) of a symbolic pipeline. What Dynamo baked into the graph (flags, module.training,
        Python constants) is fixed per graph by its guards, so the cache is too."""
        generic = generic or {}
        named = ((spec.source, _signature(value, generic.get(spec.index, ()))) for spec, value in zip(self.inputs, args)
                 if isinstance(value, torch.Tensor) or not _is_size(spec.source))
        autocast = tuple(sorted((device, enabled, str(dtype)) for device, (enabled, dtype) in autocast_state().items()))
        return (training, autocast, *sorted(named, key=lambda item: item[0]))

    def _arg_map(self, entry: plan_cache.Entry) -> list[int]:
        position = {spec.source: spec.index for spec in self.inputs}
        missing = [source for source in entry.sources if source not in position]
        if missing:
            raise ZbError(f"a pipeline built for this function reads inputs this graph of it does not: {missing}")
        return [position[source] for source in entry.sources]

    def recut_done(self, runner: PipelineRunner, values: list[Any], plan: Plan) -> None:
        """After a re-cut across ranks (zb/adapt.py), with option release: free what this rank no longer reads
        (the parameters it sent to their new rank), and let every later plan of the model keep the new cuts."""
        if not (runner.distributed and _releases(self.options)):
            return
        _release(runner, values, runner.foreign(values))
        model = self.modules[0] if self.modules else None
        if model is None:
            return
        _CUTS[model] = (plan.cuts, plan.operations)
        _RECUT.add(model)
        # Pipelines of the model built with the old cuts (other input signatures, other graphs) would read what this
        # rank just freed: they are dropped, and built again with the new cuts when called.
        for cache in plan_cache.caches_of(model):
            for key in [k for k, e in cache.entries.items() if e.plan.cuts != plan.cuts]:
                del cache.entries[key]

    def may_recut(self) -> bool:
        """Whether a re-cut may still happen: with option release, once per model (a second one, on another
        signature's times, would cut the model differently from pipelines that freed other tensors)."""
        model = self.modules[0] if self.modules else None
        return not (_releases(self.options) and model is not None and model in _RECUT)

    def install(self, key: tuple, plan: Plan, arg_map: list[int], steps: int) -> PipelineRunner:
        """Run `plan` for this input signature from now on (a re-cut: zb/adapt.py)."""
        fresh = self._runner(plan, measure_first=False)
        fresh.steps = steps  # zb-auto re-plans at the same step as without the re-cut
        old = self.cache.entries.get(key)
        dynamic = old.dynamic if old is not None else {}
        self.cache.put(key, plan_cache.Entry(plan, fresh, [self.inputs[i].source for i in arg_map],
                                             size_guards(plan, self._agree) if dynamic else None, dynamic))
        return fresh

    def build_plan(self, args: Sequence[Any], training: bool, measured: tuple[float, ...] | None = None,
                   previous: tuple[int, ...] | None = None, balance_window: float | None = None,
                   keep_cuts: tuple | None = None, dynamic: dict[int, list[int]] | None = None
                   ) -> tuple[Plan, list[int]]:
        """The plan for one call's inputs, and for each of the plan graph's inputs its position in `args`;
        `keep_cuts`: (cuts, operations) of an earlier plan to cut at the same places (option release); `dynamic`:
        per input position, the dims traced with a symbolic size (the plan then serves every size its guards
        admit)."""
        self.pipeline.schedule_for(training)  # impossible placements fail here, on every rank, before any work
        autocast = autocast_state()  # around the call: its operations run under it (passes/autocast_regions.py)
        outer = _split_axes([_with_requires_grad(s, a) for s, a in zip(self.inputs, args)], args,
                            self.options.unbatched)
        replicas = self.pipeline.local_replicas
        batch = args  # this process's batch: every replica's with replicas in this process, else its own
        if replicas > 1:  # data parallelism in this process: the plan is one replica's
            args = _replica_part(outer, args, replicas, self.options.microbatches)
        first = split_microbatches(outer, args, self.options.microbatches)[0]
        if self.static and self.options.microbatches == 1 and replicas == 1:
            gm, specs, example, arg_map = self.gm, outer, first, list(range(len(args)))
        else:
            if self.frame is None:
                raise ZbUnsupportedError("this graph was not captured by Dynamo, so zb cannot split its batch")
            gm, example, inner = self.frame.capture({i: first[i] for i in self.frame.sources},
                                                    dynamic=dynamic)
            position = {s.source: s.index for s in outer}
            missing = [s.source for s in inner if s.source not in position]
            if missing:
                raise ZbUnsupportedError(f"re-tracing at microbatch size read inputs Dynamo did not: {missing}")
            arg_map = [position[s.source] for s in inner]
            # A size traced symbolic is the call's own number in the examples the passes run on (the graph keeps
            # the symbol; running the graph on a static example with the symbol would specialise it).
            example = [concrete(v) if isinstance(v, torch.SymInt) else v for v in example]
            specs = [replace(s, requires_grad=outer[i].requires_grad, batched=outer[i].batched)
                     for s, i in zip(inner, arg_map)]
        plan = Plan(
            graph=gm,
            inputs=specs,
            example_inputs=list(example),
            num_outputs=_num_outputs(gm),
            training=training,
            options=self.options,
            num_stages=self.pipeline.num_stages,
            measured_stage_times=measured,
            previous_cuts=previous,
            balance_window=balance_window,
            keep_cuts=keep_cuts,
            autocast=autocast,
            batch_graph=self._batch_graph(batch, outer, dynamic),
            placement=self.pipeline.placement_summary,
        )
        with no_autocast():  # the passes apply the caller's autocast op by op; nothing else may
            return run_passes(plan, PASSES), arg_map

    def _batch_graph(self, batch: Sequence[Any], outer: list[InputSpec], dynamic: dict[int, list[int]] | None = None
                     ) -> fx.GraphModule | None:
        """The graph of the global batch at static shapes (but the `dynamic` dims, symbolic as in the split's
        graph), which normalize_loss compares with the graph of one split
        (passes/normalize_loss.py): the batch eager would see, every replica's batch together, n = microbatches x
        data_parallel times a split's samples. None when n = 1 (nothing is split: nothing to compare).

        `batch` is this process's: with the replicas in this process, the global batch itself; under torchrun,
        this replica's, and the global batch is traced as D copies of it (the analysis reads only the graph's
        shapes and the numbers baked into it, which depend on the batch size, not on the values). Dynamo's own
        graph serves when it is static and there is one replica."""
        replicas = self.pipeline.replicas
        if self.options.microbatches * replicas == 1:
            return None
        if self.static and replicas == 1:
            return self.gm
        if self.frame is None:
            raise ZbUnsupportedError("this graph was not captured by Dynamo, so zb cannot trace the global batch "
                                     "it must weigh the loss against")
        copies = replicas // self.pipeline.local_replicas  # this process's batches in the global one
        full, _, _ = self.frame.capture({s.index: _tiled(batch[s.index], copies) if s.batched else batch[s.index]
                                         for s in outer if s.index in self.frame.sources}, dynamic=dynamic)
        return full

    def _program(self, plan: Plan):
        """Compile this process's stages of `plan`: the program the runtime runs."""
        local = self.pipeline.local_ranks
        schedule = self.pipeline.schedule_for(plan.training)
        stages = {s for s, r in enumerate(schedule.placement) if r in local}
        with no_autocast():
            return build_program(plan, compile_plan(plan, stages=stages))

    def _runner(self, plan: Plan, measure_first: bool | None = None, program=None) -> PipelineRunner:
        """Compile this process's stages of `plan` (unless `program` is the compiled one) and build what runs
        them."""
        pipeline = self.pipeline
        schedule = pipeline.schedule_for(plan.training)
        local = pipeline.local_ranks
        program = program if program is not None else self._program(plan)
        if measure_first is None:
            options = plan.options
            measure_first = plan.training and plan.num_stages > 1 and options.rebalance and not options.split_points
        runner = PipelineRunner(program, schedule, local, pipeline.comm(), pipeline.replicas, pipeline.replica_comm(),
                                pipeline.replica)
        return adapt.configure(runner, measure_first=measure_first)


# Option release: per model (its root module), the cuts of its first pipeline and the operations they cut between.
# Every later pipeline of the model (another input shape, another Dynamo graph of it) keeps them, so that no rank's
# stages read a tensor the rank released.
_CUTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_RECUT: weakref.WeakSet = weakref.WeakSet()  # models re-cut with option release (CompiledGraph.may_recut)


def _releases(options: Options) -> bool:
    """Option release. With option rebalance too, a re-cut moves the parameters that change rank: the new owner
    gets storage again (zb/adapt.py migrate), the old one frees it (CompiledGraph.recut_done)."""
    return options.release


def _tensors(modules: Sequence[torch.nn.Module]) -> list[torch.Tensor]:
    return [t for m in modules for t in [*m.parameters(), *m.buffers()]]


def _release(runner: PipelineRunner, values: list[Any], foreign: dict[int, str]) -> None:
    freed = runner.release_foreign(values, foreign)
    if freed:
        log.info("zb: pipeline rank %d released %.1f MiB of parameters and buffers other ranks own (option "
                 "release=False keeps them)", runner.ranks[0], freed / 2**20)


def graph_identity(gm: fx.GraphModule) -> tuple:
    """What makes two Dynamo graphs of one frame the same computation, for sharing their pipelines: each node's
    operation, target and arguments, with an operator written as a method (`w.mul(x)`, which Dynamo traces for a
    tensor subclass such as a parameter zb released) the same as the operator (`w * x`), and without the inputs'
    classes."""
    items = []
    for node in gm.graph.nodes:
        op, target = node.op, node.target
        if op == "call_method" and callable(getattr(operator, target, None)):
            op, target = "call_function", getattr(operator, target)
        if callable(target):
            target = f"{getattr(target, '__module__', '')}.{getattr(target, '__qualname__', repr(target))}"
        body = getattr(gm, node.target, None) if op == "get_attr" else None
        if isinstance(body, fx.GraphModule):  # the body of a higher-order op (an activation-checkpointed block)
            target = graph_identity(body)
        items.append((node.name, op, target, repr(node.args), repr(node.kwargs)))
    return tuple(items)


def autocast_state() -> dict[str, tuple[bool, torch.dtype]]:
    """The autocast state here, per device type: (enabled, dtype); the dtype matters even while disabled (a region
    opened with dtype=None inside takes it)."""
    return {device: (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)) for device in ("cpu", "cuda")}


@contextlib.contextmanager
def no_autocast():
    """Autocast off for every device type that has it on (the caller's state comes back afterwards)."""
    with contextlib.ExitStack() as stack:
        for device, (enabled, _) in autocast_state().items():
            if enabled:
                stack.enter_context(torch.autocast(device, enabled=False))
        yield


def _replica_part(specs: list[InputSpec], args: Sequence[Any], replicas: int, microbatches: int) -> list[Any]:
    """The first replica's arguments, when `replicas` run in this process on parts of the batch."""
    sizes = {specs[i].name: a.shape[0] for i, a in enumerate(args) if specs[i].batched}
    for name, size in sizes.items():
        if size % (replicas * microbatches):
            raise ZbOptionError(
                f"input {name!r} has batch size {size}, which data_parallel={replicas} replicas of "
                f"microbatches={microbatches} do not divide; use a batch size that is a multiple of "
                f"{replicas * microbatches}")
    return split_microbatches(specs, args, replicas)[0]


def _tiled(value: Any, copies: int) -> Any:
    """`copies` replicas' batches of `value`'s shape, along dim 0 (a leaf, requiring grad as `value` does)."""
    if copies == 1:
        return value
    return value.detach().repeat(copies, *([1] * (value.dim() - 1))).requires_grad_(value.requires_grad)


def _with_requires_grad(spec: InputSpec, value: Any) -> InputSpec:
    return replace(spec, requires_grad=isinstance(value, torch.Tensor) and value.requires_grad)


def _split_axes(specs: list[InputSpec], args: Sequence[Any], unbatched: tuple[str, ...] | None) -> list[InputSpec]:
    """Which user inputs are split into microbatches along dim 0: those whose dim 0 is the batch size (the size
    most tensor arguments share), unless named in option 'unbatched'. Inputs with another dim 0 (a [1, L]
    position tensor, a shared [L, L] mask) and scalars are passed whole to every microbatch."""
    named = set(unbatched or ())
    known = {s.name for s in specs if s.kind == "input"}
    if named - known:
        raise ZbOptionError(f"option 'unbatched' names {sorted(named - known)}, which the compiled function does not "
                            f"take as tensor arguments; its tensor arguments are {sorted(known)}")
    candidates = [s for s in specs if s.batched and s.name not in named and args[s.index].shape[0] != 1]
    sizes = {s.name: args[s.index].shape[0] for s in candidates}
    if len(set(sizes.values())) > 1:
        raise ZbOptionError(
            f"zb cannot tell the batch size: the tensor arguments have dim 0 of sizes {sizes}; name the arguments "
            "that are not split into microbatches (passed whole to each) with options={'unbatched': [...]}")
    return [replace(s, batched=s in candidates) for s in specs]


def _is_size(source: str) -> bool:
    """A graph input Dynamo reads from a tensor's shape (a dynamic graph's sizes): L['x'].size()[1], ..."""
    return any(part in source for part in (".size()", ".stride()", ".storage_offset()"))


def _signature(value: Any, generic: Sequence[int] = ()) -> Any:
    """A tensor's shape (None at the `generic` dims), dtype, device and requires_grad; anything else itself."""
    if isinstance(value, torch.Tensor):
        shape = tuple(None if d in generic else size for d, size in enumerate(value.shape))
        return (shape, value.dtype, value.device.type, value.requires_grad)
    return value


def _num_outputs(gm: fx.GraphModule) -> int:
    (out,) = gm.graph.find_nodes(op="output")
    return len(out.args[0]) if isinstance(out.args[0], (tuple, list)) else 1
