"""The one place zb touches PyTorch's private APIs.

zb plans and compiles below torch.compile's public surface: it reads Dynamo's frame, exports joint graphs with
AOTAutograd, partitions them with the min-cut partitioner and compiles pieces with Inductor. Every private name
it uses is reached through this module, so a torch release that moves one breaks one file, and what zb depends on
is the table below. tests/test_house.py fails when any other product module names a private torch path (`torch._x`,
`torch.utils._x`, `torch.fx.experimental`, a private attribute of a torch object) or uses unittest.mock.

Operators are not internals: the ATen operator functions `torch._foreach_*` and `torch._fused_*` (the ones
torch.optim itself calls), `torch._grouped_mm`, and every operator reached through `torch.ops`
(`torch.ops.aten._to_copy`) are called where they are needed, as the operators they are.

Importing this module loads nothing `import torch` does not: Dynamo, AOTAutograd, Inductor, symbolic shapes and
DTensor's internals are imported inside the functions that use them, on first use.

Each internal, why zb needs it, and the torch versions it was checked on (a release that changes one is tried
against this list first):

internal                                     checked  why zb needs it
-------------------------------------------  -------  ---------------------------------------------------------------
torch._C, operators, tensors
  torch._C._set_grad_enabled                 2.13.0   the call Dynamo records for `with torch.no_grad()`: no stage
                                                      cut falls inside such a region
  torch._C._log_api_usage_once               2.13.0   a call Dynamo records (a module built in the step), no value
  torch._C.DisableTorchFunctionSubclass      2.13.0   a released tensor runs an op as a plain tensor (the public
                                                      Tensor.__torch_function__ would re-wrap the result)
  torch.Tensor._is_view                      2.13.0   fake-tensor conversion asks it of every tensor, a released
                                                      one too: metadata
  Tensor._base                               2.13.0   whether an output is a view (AOTAutograd gives such an output
                                                      no tangent of its own)
  torch._ops.OpOverload, OpOverload._schema  2.13.0   an aten call's arguments, aliasing, mutation, overload name
  Tensor._use_count                          2.13.0   whether gloo's worker still holds a tensor zb handed it
torch.distributed
  distributed_c10d._get_default_store        2.13.0   the default group's store, where the failure key lives
torch.amp, torch.nn
  torch.amp.autocast_mode._enter_autocast,   2.13.0   the calls Dynamo records for `with torch.autocast(...)`
    _exit_autocast
  torch.autocast._enabled                    2.13.0   whether a region is on after torch's own device/dtype check
                                                      (no public getter)
  nn.Module._non_persistent_buffers_set      2.13.0   which buffers no state dict holds (no public query)
torch.utils
  torch.utils._pytree.tree_leaves            2.13.0   the tensors in nested values (no public pytree module)
  torch.utils._python_dispatch               2.13.0   the batch analysis sees every aten op a graph dispatches
    .TorchDispatchMode
  torch.utils._triton                        2.13.0   emitting Triton code without a GPU: see
    .triton_hash_with_backend                         `triton_hash_without_driver`
fake tensors: torch._guards, torch._subclasses
  torch._guards.detect_fake_mode             2.13.0   the fake mode a graph's values live in, to make new ones in it
  torch._guards.TracingContext, tracing      2.13.0   the partitioner makes fake RNG states in the tracing context's
                                                      fake mode
  torch._subclasses.fake_tensor              2.13.0   a fake mode of zb's own for the batch analysis; real tensors
    .FakeTensorMode, unset_fake_temporarily           while a fake mode is active (DTensor's mesh, random data)
  FakeTensor.fake_mode,                      2.13.0   (read in passes) a fake value's mode; a new constant in it
    FakeTensorMode.from_tensor
symbolic sizes: torch.fx.experimental.symbolic_shapes
  ShapeEnv                                   2.13.0   the batch analysis' fake mode allows data-dependent output
                                                      shapes (nonzero, unique)
  SymInt.node .expr .hint .shape_env         2.13.0   a symbolic size's expression and traced value, read without
                                                      adding a guard
  ShapeEnv.backed_var_to_val                 2.13.0   the traced value of a symbol no input shows
  ShapeEnv.produce_guards_expression,        2.13.0   whether a plan traced with symbolic sizes serves a call
    evaluate_guards_expression
Dynamo: torch._dynamo
  symbolic_convert.InstructionTranslator     2.13.0   the frame being compiled, seen from the backend: its code,
    .current_tx(); its f_code, f_globals,             globals, closure and locals (zb traces it again at microbatch
    closure, f_locals,                                size) and whether Dynamo broke the graph there
    output.compile_subgraph_reason
  the prefix torch_dynamo_resume_in_         2.13.0   a graph that starts after a break
  node.meta["grapharg"].source,              2.13.0   where each graph input came from (an argument, an item of
    source.LocalSource, GetItemSource, .name          one, module state)
  torch._dynamo.maybe_mark_dynamic           2.13.0   the re-trace keeps symbolic the dims Dynamo made dynamic
  exc.Unsupported, exc.TorchRuntimeError     2.13.0   what Dynamo cannot trace; the model's own error, wrapped
  pgo.get_code_state()                       2.13.0   see `automatic_dynamic_kept`
  config.inline_inbuilt_nn_modules           2.13.0   (relied on at its default, True; not set) Dynamo lifts every
                                                      parameter and buffer to a graph input
AOTAutograd: torch._functorch
  aot_autograd                               2.13.0   a stage's joint forward/backward graph; a forward-only graph
    .aot_export_joint_with_descriptors,
    .aot_export_module
  _aot_autograd.descriptors: PlainAOTInput,  2.13.0   which joint graph input and output is which
    TangentAOTInput, PlainAOTOutput,
    GradAOTOutput
  partitioners                               2.13.0   the forward/backward split, with Inductor's save-or-recompute
    .min_cut_rematerialization_partition              choices
  config.decompose_custom_triton_ops         2.13.0   zb's Triton operators stay one node each
Inductor: torch._inductor
  decomposition.select_decomp_table()        2.13.0   joint graphs are traced with Inductor's decompositions
  compile_fx.compile_fx_inner                2.13.0   compiles one aten-level piece (not a whole Dynamo graph)
  config.patch, utils.get_code               2.13.0   generated code without running it (`zb inspect --emit triton`)
DTensor: torch.distributed.tensor
  DTensor._op_dispatcher                     2.13.0   "is this op per sample?" asked as DTensor's sharding question:
    .sharding_propagator, _dtensor_spec               see `dtensor_sharding`
    .DTensorSpec / TensorMeta,
    _op_schema.OpSchema
  DeviceMesh(_init_backend=False, _rank=0)   2.13.0   a mesh without process group (no torch.distributed set-up)
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch._ops
import torch.amp.autocast_mode
import torch.utils._python_dispatch
import torch.utils._pytree
from torch import fx
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily

# Re-exported as they are: detect_fake_mode(values), the fake mode of the fake tensors among `values` (or None);
# unset_fake_temporarily(), a context in which tensors are real again.
__all__ = ["ENTER_AUTOCAST", "EXIT_AUTOCAST", "LOG_API_USAGE_ONCE", "SET_GRAD_ENABLED", "TENSOR_IS_VIEW",
           "OpOverload", "TorchDispatchMode", "argument_path", "autocast_enabled", "automatic_dynamic_kept",
           "current_translator", "custom_triton_ops_opaque", "default_store", "detect_fake_mode", "dtensor_sharding",
           "dynamo_error_cause", "export_forward", "export_joint", "fake_mode_with_shape_env", "graph_break_reason",
           "graph_input_source", "guards_expression", "guards_hold", "inductor_code", "inductor_compile",
           "inductor_decompositions", "is_dynamo_unsupported", "is_resume_function", "is_view", "joint_input_role",
           "joint_output_role", "maybe_mark_dynamic", "non_persistent_buffers", "op_schema", "partition_joint",
           "shape_env_of", "sym_expr", "sym_hint", "torch_function_disabled", "traced_values", "translator_frame",
           "tree_leaves", "triton_hash_without_driver", "unset_fake_temporarily", "use_count"]

# ---- torch._C, operators, tensors ------------------------------------------------------------------------------

SET_GRAD_ENABLED = torch._C._set_grad_enabled  # what Dynamo records for `with torch.no_grad()`
LOG_API_USAGE_ONCE = torch._C._log_api_usage_once  # recorded by Dynamo, returns nothing
TENSOR_IS_VIEW = torch.Tensor._is_view  # metadata fake-tensor conversion reads, released tensors included
OpOverload = torch._ops.OpOverload  # an aten (or custom) operator overload: the targets of aten-level graphs


def torch_function_disabled() -> contextlib.AbstractContextManager:
    """Ops run as on plain tensors inside a subclass's __torch_function__, results not re-wrapped."""
    return torch._C.DisableTorchFunctionSubclass()


def op_schema(target: Any) -> torch.FunctionSchema | None:
    """The schema of an operator overload (arguments, returns, aliasing, mutation); None for any other target."""
    return target._schema if isinstance(target, OpOverload) else None


def is_view(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is a view of another tensor's storage."""
    return tensor._base is not None


def use_count(tensor: torch.Tensor) -> int:
    """How many references the C++ side holds to `tensor`'s impl: 1 once gloo's worker no longer holds a tensor
    zb handed it (runtime/comm_threads.py)."""
    return tensor._use_count()


# ---- torch.distributed -------------------------------------------------------------------------------------------

def default_store() -> Any:
    """The key-value store the default process group started with (no public getter): the failure key every rank
    polls lives there (runtime/comm.py)."""
    import torch.distributed as dist

    return dist.distributed_c10d._get_default_store()


# ---- torch.amp, torch.nn -----------------------------------------------------------------------------------------

ENTER_AUTOCAST = torch.amp.autocast_mode._enter_autocast  # what Dynamo records for entering `with torch.autocast`
EXIT_AUTOCAST = torch.amp.autocast_mode._exit_autocast  # ... and for leaving it


def autocast_enabled(region: torch.autocast) -> bool:
    """Whether an autocast region is on, after torch's own check of its device and dtype (it may turn it off)."""
    return bool(region._enabled)


def non_persistent_buffers(module: torch.nn.Module) -> set[str]:
    """The names of `module`'s own buffers that no state dict holds."""
    return set(module._non_persistent_buffers_set)


# ---- torch.utils -------------------------------------------------------------------------------------------------

tree_leaves = torch.utils._pytree.tree_leaves  # the leaves of nested lists, tuples and dicts
TorchDispatchMode = torch.utils._python_dispatch.TorchDispatchMode  # sees every aten op that runs under it


@contextlib.contextmanager
def triton_hash_without_driver(placeholder: str) -> Iterator[None]:
    """Inductor's Triton code generation without a GPU: `triton_hash_with_backend()` reads as `placeholder`.

    Inductor writes `torch.utils._triton.triton_hash_with_backend()` (a hash of triton and of the active GPU
    backend, an autotune cache key) into every Triton kernel's metadata. Without a GPU, triton has no active driver
    and that call raises ("0 active drivers"), so Inductor cannot even generate the code. No Inductor setting leaves
    the hash out (torch/_inductor/codegen/triton.py `inductor_meta_common` calls it unconditionally; only the
    autotune cache tolerates the error), and the function is looked up on its module at each call: the module
    attribute is replaced for the duration and restored after. With a driver nothing is replaced: the real hash.
    For generating code to read, never to run (the hash keys caches that code never reaches); not thread-safe,
    which the one-shot `zb inspect --emit triton` does not need."""
    import torch.utils._triton as triton_utils

    if _has_triton_driver(triton_utils):
        yield
        return
    original = triton_utils.triton_hash_with_backend
    triton_utils.triton_hash_with_backend = lambda: placeholder
    try:
        yield
    finally:
        triton_utils.triton_hash_with_backend = original


def _has_triton_driver(triton_utils) -> bool:
    try:
        triton_utils.triton_hash_with_backend()
    except (RuntimeError, ImportError, OSError):  # "0 active drivers"; no triton (Inductor then says so); a driver
        # library that fails to load
        return False
    return True


# ---- fake tensors (torch._guards, torch._subclasses) -------------------------------------------------------------

def fake_mode_with_shape_env() -> FakeTensorMode:
    """A fake-tensor mode with a shape environment of its own, which allows data-dependent output shapes (nonzero,
    unique), and which takes real tensors as inputs."""
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    return FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)


# ---- symbolic sizes (torch.fx.experimental.symbolic_shapes) ------------------------------------------------------

def sym_expr(size: torch.SymInt) -> Any:
    """The sympy expression of a symbolic size, read without adding a guard (s0, 2*s0, ...)."""
    return size.node.expr


def sym_hint(size: torch.SymInt) -> int:
    """The value a symbolic size had in the example that was traced."""
    return int(size.node.hint)


def traced_values(size: torch.SymInt) -> dict[Any, int]:
    """Every symbol of `size`'s shape environment -> its traced value."""
    return size.node.shape_env.backed_var_to_val


def shape_env_of(values: Sequence[Any]) -> Any:
    """The shape environment of the first symbolic size among `values` (SymInts, tensors), or None."""
    for value in values:
        sizes = [value] if isinstance(value, torch.SymInt) else value.shape if isinstance(value, torch.Tensor) else []
        for size in sizes:
            if isinstance(size, torch.SymInt):
                return size.node.shape_env
    return None


def guards_expression(shape_env: Any, values: Sequence[Any]) -> str | None:
    """The shape guards recorded in `shape_env`, as one Python expression over `values` (the traced inputs, in
    the order a call gives them); static sizes are left out. None when there are none."""
    return shape_env.produce_guards_expression(list(values), ignore_static=True)


def guards_hold(shape_env: Any, code: Any, args: Sequence[Any]) -> bool:
    """Whether the compiled guards expression `code` (from `guards_expression`) holds for a call's `args`."""
    return shape_env.evaluate_guards_expression(code, list(args))


# ---- Dynamo ------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Frame:
    """The Python frame Dynamo is compiling: what zb needs to trace the same function again."""

    code: Any
    globals: dict[str, Any]
    closure: tuple | None
    locals: dict[str, Any]


def current_translator() -> Any:
    """Dynamo's translator of the frame being compiled (seen from inside the backend), or None outside Dynamo."""
    from torch._dynamo.symbolic_convert import InstructionTranslator

    return InstructionTranslator.current_tx()


def translator_frame(tx: Any) -> Frame:
    return Frame(tx.f_code, tx.f_globals, tx.closure, tx.f_locals)


def graph_break_reason(tx: Any) -> Any:
    """Why Dynamo ended the graph (`.graph_break`, `.reason`, `.user_stack` of frame summaries), or None."""
    return getattr(tx.output, "compile_subgraph_reason", None)


def is_resume_function(code: Any) -> bool:
    """Whether `code` is the function Dynamo made for the code after a graph break."""
    return code.co_name.startswith("torch_dynamo_resume_in_")


def graph_input_source(node: fx.Node) -> Any:
    """Dynamo's source of a placeholder of its graph (`.name`: "L['x']", "L['self']._modules['fc']..."), or None."""
    return getattr(node.meta.get("grapharg"), "source", None)


def argument_path(source: Any) -> tuple[str, list[Any]] | None:
    """For a source that is an argument of the frame or an item of one (`L['batch'][0]['ids']`): the argument's
    name and the item keys (["batch"... -> ("batch", [0, "ids"])); None for anything else (module state, globals)."""
    from torch._dynamo.source import GetItemSource, LocalSource

    path = []
    while isinstance(source, GetItemSource):
        path.append(source.index)
        source = source.base
    if not isinstance(source, LocalSource):
        return None
    return source.local_name, path[::-1]


def maybe_mark_dynamic(tensor: torch.Tensor, dims: Sequence[int]) -> None:
    """Ask Dynamo to trace these dims symbolic (a dim the model needs static stays static)."""
    import torch._dynamo

    torch._dynamo.maybe_mark_dynamic(tensor, list(dims))


def is_dynamo_unsupported(error: BaseException) -> bool:
    """Whether Dynamo raised `error` because it cannot trace the code."""
    from torch._dynamo.exc import Unsupported

    return isinstance(error, Unsupported)


def dynamo_error_cause(error: BaseException) -> BaseException:
    """The model's own error inside the TorchRuntimeError Dynamo wraps it in (else `error` itself)."""
    from torch._dynamo.exc import TorchRuntimeError

    return error.__cause__ if isinstance(error, TorchRuntimeError) and error.__cause__ else error


@contextlib.contextmanager
def automatic_dynamic_kept() -> Iterator[None]:
    """Dynamo's record of the sizes it saw per code object ("automatic dynamic") is put back as it was.

    A re-trace at microbatch size records another batch size for the user's frame, so Dynamo's next recompile of
    it (after zb releases other ranks' parameters, which changes their class) would make the batch dimension
    dynamic and zb would plan that graph again."""
    import copy

    from torch._dynamo import pgo

    seen = copy.deepcopy(dict(pgo.get_code_state()))
    try:
        yield
    finally:
        state = pgo.get_code_state()
        state.clear()
        state.update(seen)


# ---- AOTAutograd (torch._functorch) ------------------------------------------------------------------------------

def custom_triton_ops_opaque() -> contextlib.AbstractContextManager:
    """zb's triton_op operators (flash attention) stay single nodes in traced graphs, and Inductor calls them as
    such (on CPU it cannot trace into a Triton kernel: no driver)."""
    import torch._functorch.config as functorch_config

    return functorch_config.patch(decompose_custom_triton_ops=False)


def export_joint(stack: contextlib.ExitStack, module: torch.nn.Module, args: tuple, decompositions: dict) -> Any:
    """AOTAutograd's joint forward/backward graph of `module` (`.graph_module`; `.params_spec`/`.buffers_spec`:
    state it did not lift), with descriptors in each placeholder's and the output's meta["desc"]."""
    from torch._functorch.aot_autograd import aot_export_joint_with_descriptors

    return aot_export_joint_with_descriptors(stack, module, args, decompositions=decompositions)


def export_forward(module: torch.nn.Module, args: tuple, decompositions: dict) -> tuple[fx.GraphModule, Any]:
    """AOTAutograd's forward-only graph of `module` and its signature (`.parameters`, `.buffers` not lifted)."""
    from torch._functorch.aot_autograd import aot_export_module

    return aot_export_module(module, args, trace_joint=False, decompositions=decompositions)


def joint_input_role(desc: Any) -> tuple[str, int] | None:
    """What a joint graph input is, from its descriptor: ("input", i) for the module's i-th input, ("tangent", j)
    for the tangent of its j-th output; None for anything else."""
    from torch._functorch._aot_autograd.descriptors import PlainAOTInput, PlainAOTOutput, TangentAOTInput

    if isinstance(desc, PlainAOTInput):
        return "input", desc.idx
    if isinstance(desc, TangentAOTInput) and isinstance(desc.output, PlainAOTOutput):
        return "tangent", desc.output.idx
    return None


def joint_output_role(desc: Any) -> tuple[str, int] | None:
    """What a joint graph output is: ("output", j) for the module's j-th output, ("grad", i) for the gradient of
    its i-th input; None for anything else (an input mutation, ...)."""
    from torch._functorch._aot_autograd.descriptors import GradAOTOutput, PlainAOTInput, PlainAOTOutput

    if isinstance(desc, PlainAOTOutput):
        return "output", desc.idx
    if isinstance(desc, GradAOTOutput) and isinstance(desc.grad_of, PlainAOTInput):
        return "grad", desc.grad_of.idx
    return None


def partition_joint(joint: fx.GraphModule, num_fwd_outputs: int, fake_mode: FakeTensorMode | None
                    ) -> tuple[fx.GraphModule, fx.GraphModule]:
    """The min-cut rematerialisation partitioner Inductor uses: (forward, backward). It recognises primals and
    tangents by placeholder name, and makes fake RNG states (a recomputed random op) in the tracing context's fake
    mode, set here to `fake_mode`: the one the joint's values were traced in."""
    from torch._functorch.partitioners import min_cut_rematerialization_partition
    from torch._guards import TracingContext, tracing

    with tracing(TracingContext(fake_mode)):
        return min_cut_rematerialization_partition(joint, None, num_fwd_outputs=num_fwd_outputs)


# ---- Inductor ----------------------------------------------------------------------------------------------------

def inductor_decompositions() -> dict:
    """The decompositions Inductor lowers with: joint graphs are traced with them."""
    import torch._inductor.decomposition

    return torch._inductor.decomposition.select_decomp_table()


def inductor_compile(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
    """Inductor's compiler for one aten-level graph (not a whole Dynamo graph): a callable over a list of inputs,
    with `.source_code` where it generated some."""
    from torch._inductor.compile_fx import compile_fx_inner

    return compile_fx_inner(gm, list(example_inputs))


def inductor_code(gm: fx.GraphModule, example_inputs: Sequence[Any], settings: dict[str, Any]) -> list[str]:
    """The modules Inductor generates for `gm` under config `settings`, without compiling or running them."""
    from torch._inductor import config as inductor_config
    from torch._inductor.utils import get_code

    with inductor_config.patch(settings):
        return get_code(lambda: inductor_compile(gm, example_inputs))


# ---- DTensor -----------------------------------------------------------------------------------------------------

def dtensor_sharding(func: Any, args: Sequence[Any], kwargs: dict[str, Any], placement: Callable[[Any], Any]) -> Any:
    """DTensor's sharding propagation for `func` with each tensor argument `t` placed as `placement(t)` (Shard(d),
    Replicate()) on a 2-device CPU mesh: its answer (`.needs_redistribute`, `.output_spec` with `.placements`).
    None where DTensor has no rule (or one that cannot take these arguments); building the question itself (the
    specs, the schema, the mesh) raises, so that a torch release that moves one of them is seen, not taken for
    "no rule".

    The mesh has no process group, so the question needs no torch.distributed set-up and touches no user group.
    The propagator's cache keys an OpSchema by its tensor specs plus only the arguments its `schema_info` declares
    static, so the schema carries `op_to_schema_info[func]` (without it, softmax over dim 1 would get the cached
    answer for dim 0). Runs with any fake mode unset: the mesh and the propagator's own tensors are real."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta
    from torch.distributed.tensor._op_schema import OpSchema

    def spec(a: Any) -> Any:
        if not isinstance(a, torch.Tensor):
            return a
        return DTensorSpec(_mesh(), (placement(a),), tensor_meta=TensorMeta(a.shape, a.stride(), a.dtype))

    with unset_fake_temporarily():
        propagator = DTensor._op_dispatcher.sharding_propagator
        schema = OpSchema(func, fx.node.map_aggregate(tuple(args), spec),
                          fx.node.map_aggregate(dict(kwargs), spec),
                          schema_info=propagator.op_to_schema_info.get(func))
        try:
            return propagator.propagate_op_sharding(schema)
        except Exception:  # no strategy registered, or one that cannot handle these arguments
            return None


@functools.cache
def _mesh():
    from torch.distributed.device_mesh import DeviceMesh

    return DeviceMesh("cpu", torch.arange(2), _init_backend=False, _rank=0)
