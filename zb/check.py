"""`zb check`: run every piece zb generates against eager PyTorch and report the error of each.

    rows = check(model, example_args, {"stages": 2})      # zb check MODULE:FACTORY --stages 2
    print(format_table(rows)); ok = all(r.passed for r in rows)

Pieces are checked one at a time on the same inputs: the reference runs the piece's own FX graph eagerly in
float64 where possible (inputs cast up; a graph that will not run in float64 runs in its own dtype, and the row
says so), the compiled piece runs in the model's dtype on those inputs cast down. Inputs are the factory's
example inputs (one microbatch), values earlier pieces produced (in schedule order: every F, then B and W from
the last stage back), and a gradient of 1 for the loss. Beyond the F/B/W pieces:
  * each fused attention: zb's operator (forward and the three input gradients) at that site's shapes and dtype,
    on random inputs, against softmax(q k^T * scale + mask) v in float64;
  * the fused optimizer update (`optimizer=` one of sgd/adam/adamw): two steps of zb's fused kernel against
    torch.optim's single-tensor implementation in float64.
The error is the largest absolute difference, and relative to the reference's largest magnitude. The tolerance is
that of the piece's dtype, or of its compute dtype when that is narrower: a piece whose graph holds a bf16 value
(autocast, or option param_dtype's copies) with a float32 output is held to bf16's (the dtype column then reads
float32/bfloat16), and so is the whole step when any piece computes in bf16.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from zb.codegen.accumulate import runnable
from zb.codegen.program import sum_specs
from zb.core import torch_internals
from zb.passes.keys import LOSS_TANGENT, Key, Kind, PieceName, Role
from zb.passes.plan import Plan, output_keys

TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
OPTIMIZERS = {"sgd": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01}),
              "adam": (torch.optim.Adam, {"lr": 1e-2}),
              "adamw": (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1})}


@dataclass
class Row:
    """One line of `zb check`'s table: a compiled piece against its reference, and how far apart they are."""
    piece: str
    dtype: torch.dtype
    reference: str  # what the compiled piece was compared with
    max_abs: float
    relative: float
    compute: torch.dtype | None = None  # a narrower dtype the piece computed in (autocast, param_dtype)

    @property
    def tolerance(self) -> float:
        return max(TOLERANCE.get(self.dtype, 1e-4), TOLERANCE.get(self.compute, 0.0))

    @property
    def dtypes(self) -> str:
        names = [str(d).replace("torch.", "") for d in (self.dtype, self.compute) if d is not None]
        return "/".join(dict.fromkeys(names))

    @property
    def passed(self) -> bool:
        return math.isfinite(self.relative) and self.relative <= self.tolerance


def check(model: torch.nn.Module, example_args: tuple, options: dict[str, Any] | None = None,
          optimizer: str | None = None, seed: int = 0) -> list[Row]:
    """Compile `model(*example_args)` with zb and check every piece; returns one Row per piece."""
    import zb
    from zb.codegen.inductor import compile_plan

    options = dict(options or {})
    torch.manual_seed(seed)
    plan = zb.explain(model, *example_args, **options)
    compiled = compile_plan(plan)
    rows = _check_pieces(plan, compiled)
    if plan.training:
        rows.append(_check_step(model, example_args, options))
        held = set().union(*(_graph_dtypes(gm) for stage in plan.stages for gm in stage.pieces.values() if gm))
        rows[-1].compute = _narrower(rows[-1].dtype, held)
    rows += _check_attention(plan)
    if optimizer is not None:
        rows.append(_check_optimizer(model, optimizer))
    return rows


def _narrower(dtype: torch.dtype, dtypes) -> torch.dtype | None:
    """The dtype among `dtypes` with a looser tolerance than `dtype`'s (the loosest), or None."""
    loose = [d for d in dtypes if d is not None and TOLERANCE.get(d, 0.0) > TOLERANCE.get(dtype, 1e-4)]
    return max(loose, key=lambda d: TOLERANCE[d], default=None)


def _graph_dtypes(gm) -> set:
    """The dtypes of the float values a piece's graph holds (its inputs included)."""
    values = [n.meta.get("val") for n in gm.graph.nodes]
    return {v.dtype for v in torch_internals.tree_leaves(values)
            if isinstance(v, torch.Tensor) and v.is_floating_point()}


# ---- the whole step --------------------------------------------------------------------------------------------

def _check_step(model: torch.nn.Module, example_args: tuple, options: dict[str, Any]) -> Row:
    """One whole zb training step (every pass, the schedule, microbatching, the loss's normalisation) against the
    model run eagerly in float64 on the whole batch: the loss and every parameter's gradient."""
    import copy

    compiled_model, reference = copy.deepcopy(model), copy.deepcopy(model).double()
    torch.compiler.reset()
    loss = torch.compile(compiled_model, backend="zb", options=options)(*example_args)
    loss = loss[0] if isinstance(loss, tuple) else loss
    loss.backward()
    expected = reference(*[_up(a) for a in example_args])
    expected = expected[0] if isinstance(expected, tuple) else expected
    expected.backward()
    got = [loss.detach()] + [p.grad for p in compiled_model.parameters()]
    want = [expected.detach()] + [p.grad for p in reference.parameters()]
    max_abs, relative = 0.0, 0.0
    for g, w in zip(got, want):
        if g is None or w is None:
            if (g is None) != (w is None):
                return Row("whole step: a gradient zb did not produce", loss.dtype, "eager fp64", math.inf, math.inf)
            continue
        error = (g.double() - w).abs().max().item()
        max_abs = max(max_abs, error)
        relative = max(relative, error / max(w.abs().max().item(), 1e-12))
    return Row(f"whole step (loss, {len(got) - 1} gradients)", loss.dtype, "eager fp64, whole batch", max_abs,
               relative)


def format_table(rows: list[Row]) -> str:
    header = ("piece", "dtype", "reference", "max abs err", "rel err", "tolerance", "result")
    body = [(r.piece, r.dtypes, r.reference, f"{r.max_abs:.3g}", f"{r.relative:.3g}",
             f"{r.tolerance:.0e}", "pass" if r.passed else "FAIL") for r in rows]
    widths = [max(len(str(x)) for x in column) for column in zip(header, *body)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip() for line in (header, *body)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    failed = sum(not r.passed for r in rows)
    summary = f"{len(rows) - failed} of {len(rows)} pieces within tolerance"
    lines.append(summary + (f"; {failed} FAILED" if failed else ""))
    return "\n".join(lines)


# ---- the F/B/W pieces --------------------------------------------------------------------------------------------

def _check_pieces(plan: Plan, compiled) -> list[Row]:
    n = len(plan.stages)
    order = [(s, PieceName.FORWARD) for s in range(n)]
    if plan.training:
        backward = (PieceName.BACKWARD_INPUT, PieceName.BACKWARD_WEIGHT)
        order += [(s, name) for s in reversed(range(n)) for name in backward]
    shared: dict[Key, torch.Tensor] = {}  # act:, grad:act: (crossing stages)
    local: dict[int, dict[Key, Any]] = {s: {} for s in range(n)}
    rows = []
    for s, name in order:
        piece = compiled.get((s, name))
        if piece is None:
            continue
        gm = plan.stages[s].pieces[name]
        placeholders = list(gm.graph.find_nodes(op="placeholder"))
        values = [_input_value(plan, key, node, shared, local[s]) for key, node in zip(piece.inputs, placeholders)]
        reference, label = _run_reference(gm, values)
        native = [_like(v, node) for v, node in zip(values, placeholders)]
        got = _run_piece(piece, native, gm, plan)
        max_abs, relative, dtype = _compare(got, reference, placeholders)
        rows.append(Row(f"stage {s} {_SHORT[name]}", dtype, label, max_abs, relative,
                        _narrower(dtype, _graph_dtypes(gm))))
        for key, value in zip(piece.outputs, reference):
            if key is None:
                continue
            if key.kind is Kind.ACT and key.role is not Role.TANGENT:
                shared[key] = value
            else:
                local[s][key] = value
    return rows


def _run_piece(piece, native: list, gm, plan: Plan) -> list:
    """The compiled piece's outputs in the plan piece's order. A piece that adds parameter gradients into the
    step's sums (codegen/accumulate.py) gets zero sums, and the sums stand for the gradients it returned None for."""
    totals = {spec.key: spec.zeros() for spec in sum_specs(runnable(gm, plan))}
    got = list(piece([*native, *totals.values()]))
    return [totals[key] if value is None and key in totals else value for key, value in zip(output_keys(gm), got)]


_SHORT = {PieceName.FORWARD: "F", PieceName.BACKWARD_INPUT: "B", PieceName.BACKWARD_WEIGHT: "W"}


def _input_value(plan: Plan, key: Key, node, shared: dict, local: dict):
    if key.is_(Kind.IN):
        return _up(plan.example_inputs[key.index])
    if key.is_(Kind.ACT):
        return shared[key]
    if key == LOSS_TANGENT:
        return torch.ones((), dtype=torch.float64)
    if key.is_(Kind.ACT, Role.TANGENT):
        grad = shared.get(key.value().grad())
        if grad is not None:
            return grad
    if key in local:
        return local[key]
    fake = node.meta["val"]  # nothing upstream produced it: a random value of its shape
    return _up(torch.randn(fake.shape, dtype=fake.dtype) if fake.is_floating_point() else torch.zeros(
        fake.shape, dtype=fake.dtype))


def _up(value):
    if isinstance(value, torch.Tensor):
        value = value.detach()
        return value.double() if value.is_floating_point() else value.clone()
    return value


def _like(value, node):
    fake = node.meta.get("val")
    if isinstance(value, torch.Tensor) and isinstance(fake, torch.Tensor):
        # Compiled pieces assume the strides the trace saw (a saved q may be a view into the qkv projection).
        out = torch.empty_strided(fake.shape, fake.stride(), dtype=fake.dtype)
        return out.copy_(value)
    return value


def _run_reference(gm, values: list) -> tuple[list, str]:
    try:
        with torch.no_grad():
            return list(_in_float64(gm)(*values)), "eager fp64"
    except RuntimeError:  # something that has no float64 version: run the graph as it is
        placeholders = list(gm.graph.find_nodes(op="placeholder"))
        with torch.no_grad():
            return [_up(v) for v in gm(*[_like(v, p) for v, p in zip(values, placeholders)])], "eager (own dtype)"


def _in_float64(gm):
    """A copy of the graph whose floating dtype arguments (zeros(..., dtype=float32), casts) say float64."""
    import copy

    def up(value):
        if isinstance(value, torch.dtype) and value.is_floating_point:
            return torch.float64
        if isinstance(value, (list, tuple)):
            return type(value)(up(v) for v in value)
        return value

    gm = copy.deepcopy(gm)
    for node in gm.graph.nodes:
        if node.op == "call_function":
            node.args = up(node.args)
            node.kwargs = {k: up(v) for k, v in node.kwargs.items()}
    gm.recompile()
    return gm


def _compare(got, reference, placeholders) -> tuple[float, float, torch.dtype]:
    max_abs, scale, dtype = 0.0, 0.0, None
    for g, r in zip(got, reference):
        if not isinstance(g, torch.Tensor) or not isinstance(r, torch.Tensor) or not g.is_floating_point():
            continue
        dtype = dtype or g.dtype
        if g.numel():
            max_abs = max(max_abs, (g.double() - r.double()).abs().max().item())
            scale = max(scale, r.double().abs().max().item())
    if dtype is None:
        fakes = [p.meta.get("val") for p in placeholders]
        dtype = next((f.dtype for f in fakes if isinstance(f, torch.Tensor) and f.is_floating_point()), torch.float32)
    return max_abs, max_abs / scale if scale > 0 else max_abs, dtype


# ---- fused attention ------------------------------------------------------------------------------------------

def _check_attention(plan: Plan) -> list[Row]:
    from zb.ops.attention import attention, reference

    rows = []
    for node in plan.graph.graph.nodes:
        if node.op != "call_function" or "zb_attention_site" not in node.meta:
            continue
        q, k, v, bias, causal, scale = node.args
        fq, fk, fv = (a.meta["example_value"] for a in (q, k, v))
        fbias = bias.meta["example_value"] if bias is not None else None
        g = torch.Generator().manual_seed(len(rows))
        inputs = [torch.randn(f.shape, generator=g, dtype=torch.float64) for f in (fq, fk, fv)]
        mask = None if fbias is None else torch.randn(fbias.shape, generator=g, dtype=torch.float64)
        grad = torch.randn(fq.shape, generator=g, dtype=torch.float64)
        leaves = [t.clone().requires_grad_() for t in inputs]
        want = reference(*leaves, mask, causal, scale)
        want = [want.detach(), *torch.autograd.grad(want, leaves, grad)]
        mine = [t.to(fq.dtype).requires_grad_() for t in inputs]
        out = attention(*mine, None if mask is None else mask.to(fq.dtype), causal, scale)
        got = [out.detach(), *torch.autograd.grad(out, mine, grad.to(fq.dtype))]
        max_abs = max((a.double() - b).abs().max().item() for a, b in zip(got, want))
        relative = max(((a.double() - b).abs().max() / b.abs().max()).item() for a, b in zip(got, want))
        what = "causal" if causal else ("masked" if bias is not None else "full")
        site = node.meta.get("zb_attention_site", node.name)
        rows.append(Row(f"attention {site} ({what}, fwd+3 grads)", fq.dtype, "softmax math fp64",
                        max_abs, relative))
    return rows


# ---- fused optimizer ------------------------------------------------------------------------------------------

def _check_optimizer(model: torch.nn.Module, name: str) -> Row:
    from zb.ops.optimizer import update_kernel

    cls, hyper = OPTIMIZERS[name]
    params = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(7)
    grads = [[torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params] for _ in range(2)]
    mine = [p.clone() for p in params]
    optimizer = cls(mine, **hyper)
    kernel = update_kernel(optimizer)
    states = [optimizer.state[p] for p in mine]
    ref = [p.double().requires_grad_() for p in params]
    ref_optimizer = cls(ref, foreach=False, **hyper)
    for step in grads:
        with torch.no_grad():
            kernel(mine, step, states, optimizer.param_groups[0])
        for p, grad in zip(ref, step):
            p.grad = grad.double()
        ref_optimizer.step()
    max_abs = max((a.double() - b.detach()).abs().max().item() for a, b in zip(mine, ref))
    change = max((b.detach() - p.double()).abs().max().item() for b, p in zip(ref, params))
    dtype = params[0].dtype if params else torch.float32
    # Relative to how far the parameters moved: that is what the update computes.
    return Row(f"optimizer {cls.__name__} (fused update, 2 steps)", dtype, "torch.optim fp64",
               max_abs, max_abs / change if change else max_abs)
