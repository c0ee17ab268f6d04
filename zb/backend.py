"""The `zb` torch.compile backend: Dynamo graph -> passes -> codegen -> runtime.

`torch.compile(model, backend="zb", options={...})` reaches `zb_backend` through the `torch_dynamo_backends`
entry point. `ZbBackend` is the object behind it: it keeps every graph it compiled (`backend.graphs`) and, per
graph, the plan it built for each input signature, so tests and `zb.explain` can look inside.

Each graph is a `CompiledGraph`, which Dynamo calls in place of it; it finds the pipeline for a call through its
input signature (zb/signature.py) in a bounded cache (zb/plan_cache.py), builds the ones it lacks (zb/planning.py:
the plan the passes start from, the runner of their plan), gives the model the tensors its stages read
(zb/model_state.py), and after each step lets zb/adapt.py re-plan or re-cut.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx

from zb import adapt, plan_cache
from zb.autocast import no_autocast
from zb.core import torch_internals
from zb.core.errors import ZbError, ZbPeerError, ZbUnsupportedError
from zb.core.options import Options
from zb.dynamo import describe_inputs, frame_modules, reject_graph_break, size_guards
from zb.model_state import ModelState
from zb.passes import PASSES, Plan, run_passes
from zb.pipeline import Pipeline
from zb.planning import Planner
from zb.runtime import PipelineRunner
from zb.runtime.released import zb_internal
from zb.signature import Signatures

log = logging.getLogger(__name__)


class ZbBackend:
    """The torch.compile backend object: makes each Dynamo graph a `CompiledGraph` and keeps them to look inside.

    `codegen=False` builds plans but runs the Dynamo graph eagerly."""

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
    """What Dynamo calls in place of one graph: runs each call on the pipeline built (once) for its signature."""

    def __init__(self, gm: fx.GraphModule, example_inputs: Sequence[Any], options: Options,
                 tx=None, codegen: bool = True):
        """`tx`: Dynamo's translator for the frame (None when the graph did not come from Dynamo)."""
        self.gm = gm
        self.options = options
        self.codegen = codegen
        self.inputs = describe_inputs(gm, example_inputs)
        self.pipeline = Pipeline(options)
        self.modules = frame_modules(tx, example_inputs)
        # Planning only (codegen=False, zb.explain) keeps its plans to itself: they have nothing to run.
        # The graph as a computation (graph_identity: a released parameter changes how Dynamo spells some of it).
        identity = ((torch_internals.translator_frame(tx).code, plan_cache.graph_identity(gm))
                    if tx is not None and codegen else None)
        self.cache = plan_cache.shared(identity, options, self.modules)
        self.signatures = Signatures(gm, self.inputs, options, self.cache)
        self.planner = Planner(gm, self.inputs, options, self.pipeline, tx)
        self.model_state = ModelState(options, self.modules)
        self.symbolic_failed: str | None = None  # why a pipeline with symbolic sizes could not be built

    @property
    def plans(self) -> dict[tuple, Plan]:
        """Signature -> its plan, for the signatures the cache holds."""
        return {key: entry.plan for key, entry in self.cache.entries.items()}

    @property
    def built(self) -> dict[tuple, tuple[PipelineRunner | None, list[int]]]:
        """Signature -> (what runs it, the position in this graph's arguments of each of the plan's inputs)."""
        return {key: (entry.runner, self.signatures.arg_map(entry)) for key, entry in self.cache.entries.items()}

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
        symbolic = self.options.symbolic_sizes and self.symbolic_failed is None
        key, entry, dynamic = self.signatures.lookup(args, training, symbolic)
        if entry is None:
            key, entry = self._build(key, args, training, dynamic)
        if entry.runner is None:
            return self.gm(*args)
        arg_map = self.signatures.arg_map(entry)
        entry.runner.grad_scaler = self.options.grad_scaler
        with no_autocast():  # the pieces carry autocast's casts already; it must not apply again
            result = entry.runner(*[args[i] for i in arg_map])
        adapt.after_step(self, key, entry.runner, args)
        entry.runner.last_grads = None  # read by a re-cut only (adapt); backward holds the gradients it hands out
        return result

    def _build(self, key: tuple, args: Sequence[Any], training: bool, dynamic: dict[int, list[int]]
               ) -> tuple[tuple, plan_cache.Entry]:
        """The pipeline for a call no cached one serves, cached under `key` (the lookup's) and returned with it:
        with the `dynamic` dims symbolic where it can be, else for this signature only (under its exact key). A new
        runner's models get their tensors first."""
        keep = self.model_state.keep_cuts()
        entry = self._build_symbolic(args, training, keep, dynamic) if dynamic else None
        if entry is None:  # static sizes: a pipeline for this signature only
            key = self.signatures.key(args, training)
            plan, arg_map = self.build_plan(args, training, keep_cuts=keep)
            runner = self.planner.runner(plan) if self.codegen else None
            entry = plan_cache.Entry(plan, runner, self.signatures.sources(arg_map))
        self.cache.put(key, entry)
        if entry.runner is not None:
            self.model_state.ready(entry.runner, entry.plan, [args[i] for i in self.signatures.arg_map(entry)])
        return key, entry

    def _build_symbolic(self, args: Sequence[Any], training: bool, keep: tuple | None,
                        dynamic: dict[int, list[int]]) -> plan_cache.Entry | None:
        """The pipeline traced with the `dynamic` dims symbolic, or None where it came out static or zb cannot
        plan or compile it symbolically (a loss normalised by a symbolic size, an operation Inductor cannot
        compile at symbolic sizes): then this graph builds a pipeline per signature, as with option
        symbolic_sizes=False, and says so once."""
        failed = program = None
        try:
            plan, arg_map = self.build_plan(args, training, keep_cuts=keep, dynamic=dynamic)
            program = self.planner.program(plan) if self.codegen else None
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
        runner = self.planner.runner(plan, program=program) if self.codegen else None
        return plan_cache.Entry(plan, runner, self.signatures.sources(arg_map), guards, dynamic)

    def _agree(self, value: Any, what: str = "agreeing on the shape guards") -> list[Any]:
        """`value` of every process of this pipeline and its replicas (only this one's when planning only)."""
        return self.pipeline.agree(value, what) if self.codegen else [value]

    def build_plan(self, args: Sequence[Any], training: bool, measured: tuple[float, ...] | None = None,
                   previous: tuple[int, ...] | None = None, balance_window: float | None = None,
                   keep_cuts: tuple | None = None, dynamic: dict[int, list[int]] | None = None
                   ) -> tuple[Plan, list[int]]:
        """The plan for one call's inputs, and for each of the plan graph's inputs its position in `args`;
        `measured`, `previous`, `balance_window`: a re-cut's measured stage times, old cuts and balance window
        (zb/adapt.py); `keep_cuts`: (cuts, operations) of an earlier plan to cut at the same places (option
        release); `dynamic`: per input position, the dims traced with a symbolic size (the plan then serves every
        size its guards admit). Every plan zb builds comes from here."""
        plan, arg_map = self.planner.plan(args, training, dynamic, measured_stage_times=measured,
                                          previous_cuts=previous, balance_window=balance_window, keep_cuts=keep_cuts)
        with no_autocast():  # the passes apply the caller's autocast op by op; nothing else may
            return run_passes(plan, PASSES), arg_map

    def install(self, key: tuple, plan: Plan, arg_map: list[int], steps: int) -> PipelineRunner:
        """Run `plan` for this input signature from now on (a re-cut: zb/adapt.py)."""
        fresh = self.planner.runner(plan, measure_first=False)
        fresh.steps = steps  # zb-auto re-plans at the same step as without the re-cut
        old = self.cache.entries.get(key)
        dynamic = old.dynamic if old is not None else {}
        self.cache.put(key, plan_cache.Entry(plan, fresh, self.signatures.sources(arg_map),
                                             size_guards(plan, self._agree) if dynamic else None, dynamic))
        return fresh

    def recut_done(self, runner: PipelineRunner, values: list[Any], plan: Plan) -> None:
        """After a re-cut across ranks (zb/adapt.py), with option release: free what this rank no longer reads,
        and let every later plan of the model keep the new cuts (zb/model_state.py)."""
        self.model_state.recut_done(runner, values, plan)

    def may_recut(self) -> bool:
        """Whether a re-cut may still happen: with option release, once per model (zb/model_state.py)."""
        return self.model_state.may_recut()
