"""What zb reads from Dynamo: the frame being compiled, where each graph input came from, and the re-trace of the
frame at microbatch size.

The Dynamo internals behind these (the translator of the frame being compiled, its graph-break reason, the
sources of graph inputs, `maybe_mark_dynamic`, Dynamo's error types and its "automatic dynamic" size record) are
reached through zb.core.torch_internals, which lists each one and why. `node.meta["example_value"]` with
`torch.SymInt` sizes says whether Dynamo made the graph dynamic; `torch.compile(..., isolate_recompiles=True)`
re-traces a frame without touching the caller's compile cache. Everything else in zb uses Dynamo only through
`torch.compile` and the backend interface.

Re-capturing the frame at microbatch size: Dynamo traces the user's function at the full batch and bakes shapes
into the graph (a `view(8, 16, ...)` means "batch 8"), so that graph cannot run one microbatch. Dynamo's translator
holds the real frame it traced: its code, globals, closure and arguments. `FrameCapture` keeps those (minus the
batch tensors, which it does not hold on to) and, for a concrete call, traces the same function again on the first
microbatch with a capturing backend (fullgraph; static shapes, but the dims the caller asks to trace symbolic: a
sequence length Dynamo made dynamic). The resulting graph has the same inputs as Dynamo's, matched by source.
"""

from __future__ import annotations

import inspect
import re
import types
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx

from zb.core import torch_internals
from zb.core.errors import ZbUnsupportedError
from zb.passes.plan import InputSpec


class FrameCapture:
    """Re-traces the frame Dynamo compiled (its function, globals, closure and arguments) at another batch size, and
    matches the new graph's inputs to Dynamo's by source."""

    def __init__(self, tx, user_inputs: dict[int, Any], numbers: frozenset[int] = frozenset()):
        """`tx`: Dynamo's InstructionTranslator for the frame; `user_inputs`: graph position -> Dynamo source (of
        tensors, and of the `numbers`)."""
        frame = torch_internals.translator_frame(tx)
        code = frame.code
        self.function = types.FunctionType(code, frame.globals, code.co_name, None, frame.closure or None)
        self.sources = user_inputs
        for position, source in user_inputs.items():
            _check_source(source, position in numbers)
        # Batch tensors are replaced at every call, so the frame does not keep them alive; everything else
        # (self, flags, containers) is kept as traced.
        paths = [torch_internals.argument_path(s) for s in user_inputs.values()]
        direct = {name for name, items in filter(None, paths) if not items}
        names = _arg_names(code)
        # An argument that is the same tensor as a batch argument (`model(ids, ids)`: Dynamo's graph reads it once)
        # takes that argument's microbatch too.
        self.aliases = {k: d for k, v in frame.locals.items() if k in names and k not in direct
                        for d in direct if isinstance(v, torch.Tensor) and v is frame.locals.get(d)}
        self.locals = {k: (None if k in direct or k in self.aliases else v) for k, v in frame.locals.items()
                       if k in names}

    def capture(self, args_by_position: dict[int, Any], dynamic: dict[int, list[int]] | None = None
                ) -> tuple[fx.GraphModule, list[Any], list[InputSpec]]:
        """Trace the frame with these user inputs; returns (graph, its example inputs, their descriptions).
        `dynamic`: per input position, the dims traced with a symbolic size."""
        local = dict(self.locals)
        for position, dims in (dynamic or {}).items():
            value = args_by_position[position] = args_by_position[position].detach().requires_grad_(
                args_by_position[position].requires_grad)
            torch_internals.maybe_mark_dynamic(value, dims)  # (a size the model needs static stays static)
        for position, source in self.sources.items():
            _assign(local, source, args_by_position[position])
        for name, same in self.aliases.items():
            local[name] = local[same]
        code = self.function.__code__
        names = _arg_names(code)
        positional = [local[n] for n in names[: code.co_argcount]]
        keyword = {n: local[n] for n in names[code.co_argcount: code.co_argcount + code.co_kwonlyargcount]}
        rest = names[code.co_argcount + code.co_kwonlyargcount:]
        if code.co_flags & inspect.CO_VARARGS:
            positional += list(local[rest.pop(0)])
        if code.co_flags & inspect.CO_VARKEYWORDS:
            keyword.update(local[rest.pop(0)])

        captured: list[tuple[fx.GraphModule, list[Any], list[InputSpec]]] = []

        def capture_backend(gm, example_inputs, **_):
            # Dynamo drops the placeholders' sources once the backend returns: describe the inputs now.
            captured.append((gm, list(example_inputs), describe_inputs(gm, example_inputs)))
            return _stop  # the graph is all zb wants: the model is not run (no whole-model pass at this size)

        compiled = torch.compile(
            self.function, backend=capture_backend, fullgraph=True, dynamic=False, isolate_recompiles=True
        )
        try:
            with torch_internals.automatic_dynamic_kept():  # the re-trace leaves Dynamo's size record as it was
                compiled(*positional, **keyword)
        except _Captured:
            pass
        except Exception as e:
            if torch_internals.is_dynamo_unsupported(e):
                raise ZbUnsupportedError(f"zb could not re-trace the model at microbatch size: {e}") from None
            # the model itself fails at this batch size (a buffer or index sized to the batch)
            sizes = sorted({tuple(a.shape)[:1] for a in args_by_position.values() if isinstance(a, torch.Tensor)})
            cause = torch_internals.dynamo_error_cause(e)
            first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
            raise ZbUnsupportedError(
                f"zb traces the model at another batch size (dim 0 of {', '.join(str(s[0]) for s in sizes if s)}) "
                f"to split the batch, and there it fails: {type(cause).__name__}: {first}. A model that works only "
                "at one batch size (a buffer, index or mask sized to the batch; BatchNorm on a single sample) "
                "cannot be split into microbatches or replicas: make it work for any batch size, or use "
                "microbatches=1 without data parallelism") from e
        if len(captured) != 1:
            raise ZbUnsupportedError(f"re-tracing at microbatch size gave {len(captured)} graphs, expected one")
        return captured[0]


class _Captured(Exception):
    """Raised in place of running a re-traced graph: capturing it was the point."""


def _stop(*_: Any) -> None:
    raise _Captured


def _arg_names(code: types.CodeType) -> list[str]:
    count = code.co_argcount + code.co_kwonlyargcount
    count += bool(code.co_flags & inspect.CO_VARARGS) + bool(code.co_flags & inspect.CO_VARKEYWORDS)
    return list(code.co_varnames[:count])


def _check_source(source, number: bool = False) -> None:
    if torch_internals.argument_path(source) is not None:
        return
    if number:
        raise ZbUnsupportedError(
            f"zb re-traces the compiled function with each call's inputs, and a number Dynamo made an input of the "
            f"graph (it changed between calls) comes from {source.name}, which zb cannot give each call's value; "
            "pass it as an argument of the compiled function (or in a tuple, list or dict argument)")
    raise ZbUnsupportedError(
        f"zb splits the tensor arguments of the compiled function into microbatches, but one input comes "
        f"from {source.name}; pass batch tensors as arguments (or in tuples, lists or dicts of arguments)"
    )


def _assign(local: dict, source, value: Any) -> None:
    """Set the value an argument source (the argument, or an item of it) names, rebuilding tuples on the way."""
    name, path = torch_internals.argument_path(source)
    local[name] = _replace(local[name], path, value) if path else value


def _replace(container: Any, path: Sequence[Any], value: Any) -> Any:
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(container, tuple):
        items = list(container)
        items[head] = _replace(items[head], rest, value)
        return type(container)(*items) if hasattr(container, "_fields") else tuple(items)
    copy = list(container) if isinstance(container, list) else dict(container)
    copy[head] = _replace(container[head], rest, value)
    return copy


def describe_inputs(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> list[InputSpec]:
    """Classify Dynamo's graph inputs: parameters, buffers (module state), user inputs, constants."""
    specs = []
    for index, (node, value) in enumerate(zip(placeholders(gm), example_inputs)):
        source = torch_internals.graph_input_source(node)
        name = _source_path(source) if source is not None else node.name
        if isinstance(value, torch.nn.Parameter):
            kind = "parameter"
        elif isinstance(value, torch.Tensor):
            kind = "input" if _is_argument(source) else "buffer"
        else:
            kind = "constant"
        batched = kind == "input" and value.dim() > 0
        requires_grad = isinstance(value, torch.Tensor) and value.requires_grad
        specs.append(InputSpec(index, kind, name, requires_grad, batched, source.name if source else node.name))
    return specs


def _is_argument(source) -> bool:
    return torch_internals.argument_path(source) is not None


def placeholders(gm: fx.GraphModule) -> list[fx.Node]:
    return list(gm.graph.find_nodes(op="placeholder"))


def _source_path(source) -> str:
    """L['self']._modules['fc']._parameters['weight'] -> fc.weight; L['x'] -> x."""
    parts = re.findall(r"\['([^']*)'\]", source.name)
    keep = [p for p in parts[1:]] if len(parts) > 1 else parts
    return ".".join(keep) or source.name


def input_source(gm: fx.GraphModule, index: int):
    """Dynamo's source of graph input `index` (L['x'], L['self']._modules['fc']._parameters['weight'], ...)."""
    return torch_internals.graph_input_source(placeholders(gm)[index])


def has_symbolic_shape(node: fx.Node) -> bool:
    value = node.meta.get("example_value")
    return isinstance(value, torch.Tensor) and any(isinstance(d, torch.SymInt) for d in value.shape)


def frame_modules(tx, tensors: Sequence[Any]) -> list[torch.nn.Module]:
    """The nn.Modules the traced frame reaches directly (its arguments such as `self`, its closure, the globals
    its code names) that hold any of `tensors`: the models whose parameters this graph trains."""
    if tx is None:
        return []
    frame = torch_internals.translator_frame(tx)
    candidates = list(frame.locals.values()) + [_contents(c) for c in (frame.closure or ())]
    candidates += [frame.globals[n] for n in frame.code.co_names if n in frame.globals]
    ids = {id(t) for t in tensors}
    found = []
    for value in candidates:
        if isinstance(value, torch.nn.Module) and value not in found and any(
                id(p) in ids for p in value.parameters()):
            found.append(value)
    return found


def _contents(cell) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # a closure variable not assigned yet
        return None


def reject_graph_break(gm: fx.GraphModule):
    """Raise if Dynamo split the frame into several graphs; returns Dynamo's translator (None outside Dynamo)."""
    tx = torch_internals.current_translator()
    if tx is None:  # called outside Dynamo (a test handing us a graph directly)
        return None
    reason = torch_internals.graph_break_reason(tx)
    resumed = torch_internals.is_resume_function(torch_internals.translator_frame(tx).code)
    if (reason is not None and reason.graph_break) or resumed:
        where = ""
        if reason is not None and reason.user_stack:
            frame = reason.user_stack[-1]
            where = f" at {frame.filename}:{frame.lineno} ({frame.line})"
        why = reason.reason.strip().splitlines()[0] if reason is not None and not resumed else "code after a break"
        in_loss = reason is not None and any("loss" in (frame.name or "").lower() for frame in reason.user_stack) \
            or "loss" in where.lower()  # the breaking line calls one (Hugging Face: `self.loss_function(...)`)
        hint = (
            "\nThe break is inside a loss function (a library's, such as a Hugging Face model's loss_function, "
            "often breaks). Compute the loss in the compiled function from the logits instead:\n"
            "    logits = model(input_ids=input_ids).logits\n"
            "    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)"
        ) if in_loss else ""
        raise ZbUnsupportedError(
            f"zb needs the whole model in one graph, but Dynamo broke the graph{where}: {why}\n"
            "Remove what Dynamo cannot trace there (prints, .item(), data-dependent Python control flow), and "
            "use torch.compile(..., fullgraph=True) to see every break." + hint
        )
    return tx


def size_guards(plan, agree: Callable[[str | None], list[str | None]] = lambda code: [code]
                ) -> Callable[[list[Any]], bool] | None:
    """For a plan traced with symbolic sizes: a check whether it serves a call (its inputs in the plan's order),
    from the shape guards the trace, the passes and the compilers recorded (`ShapeEnv.produce_guards_expression`:
    `s0 <= 64`, ...) and the static sizes of the user inputs (but a split input's batch dim, which the signature
    holds). None for a static plan. Each process compiles only its own stages, and a compiler may add guards:
    `agree` gathers every process's guard expression (over the same inputs, in the same order), and a call is
    admitted when all of them hold, so every process makes the same choice."""
    from zb.passes.plan import size_symbols

    symbols = size_symbols(plan.graph, plan.inputs)
    if not symbols:
        return None
    values = [node.meta.get("example_value") for node in placeholders(plan.graph)]
    users = [spec.index for spec in plan.inputs if spec.kind in ("input", "constant")]
    shape_env = torch_internals.shape_env_of(values)
    texts = agree(torch_internals.guards_expression(shape_env, [values[i] for i in users]))
    # Compiled once here: each call only evaluates them (evaluate_guards_expression takes the code object too).
    codes = [compile(text, "<zb shape guards>", "eval") for text in dict.fromkeys(texts) if text]

    def admits(args: list[Any]) -> bool:
        for i in users:
            traced, given = values[i], args[i]
            if isinstance(traced, torch.Tensor):
                if not isinstance(given, torch.Tensor) or given.dim() != traced.dim():
                    return False
                first = 1 if plan.inputs[i].batched else 0
                if any(not isinstance(t, torch.SymInt) and t != g
                       for t, g in list(zip(traced.shape, given.shape))[first:]):
                    return False
        given = [args[i] for i in users]
        return all(torch_internals.guards_hold(shape_env, code, given) for code in codes)

    return admits

