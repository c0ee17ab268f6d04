"""Tier (a) and (b): each pass on small graphs, structurally, and numerically against the original model run by
plain PyTorch autograd on the whole batch (not against a graph some pass already rewrote)."""

import importlib
import inspect

import pytest
import torch

import zb
from tests import models
from zb.passes import PASSES, PassError, Plan, capture_joint, run_passes
from zb.passes.keys import LOSS_TANGENT, Kind, Role, output_key
from zb.passes.plan import input_keys, op_counts, output_keys, output_values
from zb.passes.verify import InvariantError, verify_graph


def _padded_labels():
    """A token-mean cross entropy over labels padded with -100, unevenly: microbatch 0 holds 12 tokens, 1 holds 19."""
    model, (idx, targets) = models.tied_embedding()
    targets[0] = -100
    targets[1, 2:] = -100
    targets[6, 4:] = -100
    return model, (idx, targets)


# (factory, which inputs need a gradient): models chosen for what the split must get right.
CASES = {
    "mlp_input_grad": lambda: models.mlp(x_requires_grad=True),
    "mlp_no_input_grad": models.mlp,
    "conv_norm_fused_backward": models.conv_norm,
    "tied_embedding": models.tied_embedding,
    "token_mean_with_padding": _padded_labels,
    "unused_parameter": models.unused_parameter,
    "buffer": models.buffer,
    "loss_and_logits": models.loss_and_logits,
    "sdpa_block": lambda: _with_input_grad(models.sdpa_block()),
    "gpt": models.gpt,
}
# Cases also cut into two stages, whose pieces are chained through their boundary values.
MULTI_STAGE = ("gpt", "token_mean_with_padding")


def _with_input_grad(case):
    model, (x, y) = case
    return model, (x.requires_grad_(), y)


def _plan(name, microbatches=2, stages=1) -> tuple[Plan, tuple]:
    model, args = CASES[name]()
    options = {"stages": stages} if stages > 1 else {}
    return zb.explain(model, *args, microbatches=microbatches, **options), (model, args)


def _evaluate(gm, env):
    outs = gm(*[env[k] for k in input_keys(gm)])
    env.update({k: v for k, v in zip(output_keys(gm), outs) if k is not None})


# ---- the numeric reference: the original model, eager, on the whole batch -------------------------------------

def _eager_tensors(plan, model, args) -> list:
    """Each plan input's tensor in the original call: the model's parameter or buffer of that name, the argument of
    that name; None for what zb adds (loss weights) or Dynamo made of a number."""
    arguments = inspect.signature(model.forward).bind(*args).arguments
    found = {"parameter": model.get_parameter, "buffer": model.get_buffer, "input": arguments.__getitem__}
    return [found[s.kind](s.name) if s.kind in found else None for s in plan.inputs]


def _eager(plan, model, args):
    """`model(*args)` by plain PyTorch: its outputs, and d(loss) for each plan input (None: eager computes none)."""
    outs = model(*args)
    outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
    arguments = inspect.signature(model.forward).bind(*args).arguments
    leaves = {n: p for n, p in model.named_parameters() if p.requires_grad}
    leaves.update({n: a for n, a in arguments.items() if isinstance(a, torch.Tensor) and a.requires_grad})
    grads = torch.autograd.grad(outs[0], list(leaves.values()), allow_unused=True)
    tensors = _eager_tensors(plan, model, args)
    lost = [n for (n, leaf), g in zip(leaves.items(), grads) if g is not None and not any(leaf is t for t in tensors)]
    assert not lost, f"eager computes gradients for {lost}, which the plan does not take as inputs"
    by_leaf = {id(leaf): g for leaf, g in zip(leaves.values(), grads)}
    expected = [by_leaf.get(id(t)) if t is not None else None for t in tensors]
    return [o.detach() if isinstance(o, torch.Tensor) else o for o in outs], expected


def _microbatches(plan, model, args) -> list[list]:
    """Each microbatch's plan inputs, as the runtime makes them (runtime/executor.py `prepare` and
    `_add_loss_weights`): batched inputs chunked along dim 0, the loss weights of normalize_loss set."""
    full = [t if t is not None else v for t, v in zip(_eager_tensors(plan, model, args), plan.example_inputs)]
    full = [v.detach() if isinstance(v, torch.Tensor) else v for v in full]
    m = plan.options.microbatches
    per_mb = [list(values) for values in zip(*[v.chunk(m) if s.batched else [v] * m
                                                for s, v in zip(plan.inputs, full)])]
    piece = plan.loss.denominator  # each microbatch's token counts and the like
    counts = [piece(*[mb[k.index] for k in input_keys(piece)]) for mb in per_mb] if piece is not None else []
    for index, kind, denominator in plan.loss.weights:
        if kind == "ratio":
            weight = 1 / torch.stack([c[denominator] for c in counts]).sum().double()
        else:
            weight = torch.tensor(1 / m if kind == "mean" else 1.0)
        for mb in per_mb:
            mb[index] = weight.to(plan.example_inputs[index].dtype)
    return per_mb


def _run_microbatch(plan, inputs, seed, how) -> list[dict]:
    """One microbatch through every stage: forward from the first stage to the last, then backward from the last
    to the first, each stage's tangents being the next one's gradients of their boundary values (as
    runtime/executor.py sends them). `how` names the pieces: "joint" (capture_joint), "forward/backward"
    (partition_fw_bw) or "F/B/W" (split_backward). Returns each stage's values by key."""
    stages = plan.stages
    envs = [{s.key: v for s, v in zip(plan.inputs, inputs)} for _ in stages]
    last = len(stages) - 1
    for stage, env in zip(stages, envs):
        if stage.index > 0:
            env.update({key: envs[stage.index - 1][key] for key, _, _ in stage.receives_forward})
        if how == "joint":  # the boundary values only: this stage's tangents are not known yet
            probe = env | {key.tangent(): torch.zeros(shape, dtype=dtype)
                           for key, shape, dtype in stage.receives_backward}
            if stage.index == last:
                probe[LOSS_TANGENT] = seed
            _evaluate(stage.joint, probe)
            env.update({k: v for k, v in probe.items() if k.is_(Kind.ACT)})
        else:
            _evaluate(stage.forward, env)
    for stage, env in reversed(list(zip(stages, envs))):
        if stage.index == last:
            env[LOSS_TANGENT] = seed
        for key, shape, dtype in stage.receives_backward:
            grad = envs[stage.index + 1].get(key.grad())
            env[key.tangent()] = grad if grad is not None else torch.zeros(shape, dtype=dtype)
        if how == "joint":
            _evaluate(stage.joint, env)
        elif how == "forward/backward":
            _evaluate(stage.backward, env)
        else:
            for piece in (stage.backward_input, stage.backward_weight):
                if piece is not None:  # no B when nothing before the stage needs a gradient
                    _evaluate(piece, env)
    return envs


def _run_plan(plan, model, args, how) -> tuple[list, list]:
    """Every microbatch through the pieces, combined as zb combines them: the outputs by normalize_loss's rules
    (`_combine`), a parameter's gradient summed over stages and microbatches, a batched input's summed over
    stages and put back together in microbatch order."""
    per_mb = _microbatches(plan, model, args)
    m = len(per_mb)
    seed = torch.tensor(1 / m if plan.loss.mode == "mean" else 1.0)  # runtime/executor.py `_forward`
    outs = [[] for _ in range(plan.num_outputs)]
    grads = [[] for _ in plan.inputs]
    for inputs in per_mb:
        envs = _run_microbatch(plan, inputs, seed, how)
        for j, values in enumerate(outs):
            values.append(next(env[output_key(j)] for env in envs if output_key(j) in env))
        for spec, per_input in zip(plan.inputs, grads):
            found = [env[spec.key.grad()] for env in envs if env.get(spec.key.grad()) is not None]
            if found:
                per_input.append(sum(found[1:], found[0]))
    combined = []
    for spec, values in zip(plan.inputs, grads):
        assert len(values) in (0, m), f"{spec.name} gets a gradient in {len(values)} of {m} microbatches"
        combined.append(None if not values else torch.cat(values) if spec.batched else sum(values[1:], values[0]))
    return [_combine(values, rule, plan.loss.mode) for values, rule in zip(outs, plan.loss.outputs)], combined


def _combine(values, rule, mode):
    """One output's microbatch values put together by the rule normalize_loss gave it (`LossSpec.outputs`): the
    loss is the mean of the microbatches' losses when each is a mean (seeded 1/m), else their sum (each weighted)."""
    if rule == "loss":
        return sum(values[1:], values[0]) / (len(values) if mode == "mean" else 1)
    if rule == "first":
        return values[0]
    assert rule[0] == "concat", f"no case here returns an output combined by {rule}"
    return torch.cat(values, dim=rule[1])


def _check_against_eager(plan, model, args):
    """The plan's pieces, run on the whole batch, give eager's outputs and the gradient of every parameter and
    input (rtol 1e-5, atol 1e-6): raises AssertionError naming the pieces and the value that differ."""
    outs, expected = _eager(plan, model, args)
    for how in ("joint", "forward/backward", "F/B/W"):
        got, grads = _run_plan(plan, model, args, how)
        assert len(got) == len(outs), f"{how}: {len(got)} outputs, eager returns {len(outs)}"
        for j, (value, want) in enumerate(zip(got, outs)):
            torch.testing.assert_close(value, want, rtol=1e-5, atol=1e-6,
                                       msg=lambda m, how=how, j=j: f"{how} output {j}: {m}")
        for spec, grad, want in zip(plan.inputs, grads, expected):
            if want is None:
                assert grad is None, f"{how}: {spec.name} gets a gradient, eager computes none"
            else:
                assert grad is not None, f"{how}: {spec.name} gets no gradient"
                torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-6,
                                           msg=lambda m, how=how, spec=spec: f"{how} grad of {spec.name}: {m}")


@pytest.mark.parametrize("name", sorted(CASES))
def test_split_is_structurally_sound(name):
    plan, _ = _plan(name)
    stage = plan.stages[0]
    params = {s.key.grad() for s in plan.parameters}
    b, w = stage.backward_input, stage.backward_weight
    b_grads = [k for k in (output_keys(b) if b else []) if k.role is Role.GRAD]
    w_grads = [k for k in output_keys(w) if k.role is Role.GRAD]
    assert not set(b_grads) & params, "B computes a parameter gradient"
    assert set(w_grads) <= params, "W computes an input gradient"
    assert len(w_grads) == len(set(w_grads)), "a parameter gradient is produced twice"
    expected = {k for k, v in zip(output_keys(stage.backward), output_values(stage.backward))
                if k in params and v is not None}
    assert set(w_grads) == expected, "W must produce exactly the parameter gradients the backward produces"
    if b is not None:
        b_ops = {n.name for n in b.graph.nodes if n.op == "call_function"}
        w_ops = {n.name for n in w.graph.nodes if n.op == "call_function"}
        assert not b_ops & w_ops, f"B and W both compute {b_ops & w_ops}"
        crossing = [n for n in w.graph.find_nodes(op="placeholder") if n.meta["zb_key"].is_(Kind.STASH)]
        assert all(isinstance(n.meta["val"], torch.Tensor) for n in crossing), "a tuple crossed the cut"
        assert {n.meta["zb_key"] for n in crossing} <= set(output_keys(b))


def test_no_input_gradient_means_b_is_empty_and_w_holds_the_backward():
    plan, _ = _plan("mlp_no_input_grad")
    stage = plan.stages[0]
    assert stage.backward_input is None
    whole = sum(n.op == "call_function" for n in stage.backward.graph.nodes)
    assert plan.counters["split_backward.w_nodes"] == whole


def test_fused_convolution_backward_is_split_by_output_mask():
    plan, _ = _plan("conv_norm_fused_backward")
    assert plan.counters["split_backward.fused_nodes_split"] == 1

    def masks(gm):
        return [n.args[-1] for n in gm.graph.nodes if n.target == torch.ops.aten.convolution_backward.default]

    assert masks(plan.stages[0].backward_input) == [[True, False, False]]
    assert masks(plan.stages[0].backward_weight) == [[False, True, True]]


def test_tied_weight_gets_one_gradient():
    plan, (model, _) = _plan("tied_embedding")
    tied = [s for s in plan.parameters if s.name in ("emb.weight", "head.weight")]
    assert len(tied) == 1
    assert output_keys(plan.stages[0].backward_weight).count(tied[0].key.grad()) == 1


def test_parameters_without_gradient_get_none():
    plan, _ = _plan("unused_parameter")
    by_name = {s.name: s for s in plan.parameters}
    assert "unused.weight" not in by_name  # never read: Dynamo does not even lift it
    w_keys = output_keys(plan.stages[0].backward_weight)
    assert by_name['frozen'].key.grad() not in w_keys
    assert by_name['no_grad_path'].key.grad() not in w_keys


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_pass_matches_autograd(name):
    plan, (model, args) = _plan(name)
    _check_against_eager(plan, model, args)


@pytest.mark.parametrize("name", MULTI_STAGE)
def test_every_pass_matches_autograd_across_stages(name):
    plan, (model, args) = _plan(name, stages=2)
    assert len(plan.stages) == 2
    _check_against_eager(plan, model, args)


def _count_padding_as_tokens(nl, monkeypatch):
    """The token count forgets ignore_index (no label is -1): a token mean weighted by too many tokens."""
    right = nl.target_weight
    monkeypatch.setattr(nl, "target_weight", lambda target, ignore_index, weight: right(target, -1, weight))


def _read_means_as_sums(nl, monkeypatch):
    """A mean loss taken for a sum: the microbatches' losses added, not averaged."""
    right = nl._Analysis._leaf_kind
    monkeypatch.setattr(nl._Analysis, "_leaf_kind",
                        lambda self, node: nl.SUM if right(self, node) == nl.MEAN else right(self, node))


@pytest.mark.parametrize(("name", "sabotage"), [("token_mean_with_padding", _count_padding_as_tokens),
                                                ("mlp_input_grad", _read_means_as_sums)])
def test_a_wrong_loss_normalisation_fails_the_comparison(name, sabotage, monkeypatch):
    """The reference is eager on the whole batch, not the graph normalize_loss rewrote: a wrong weight shows."""
    sabotage(importlib.import_module("zb.passes.normalize_loss"), monkeypatch)
    plan, (model, args) = _plan(name)
    assert plan.loss.mode == "weighted"
    with pytest.raises(AssertionError, match="output 0"):
        _check_against_eager(plan, model, args)


def test_a_wrong_fused_attention_fails_the_comparison(monkeypatch):
    """The reference is eager on the whole batch, not the graph fuse_attention rewrote: a wrong scale shows."""
    fa = importlib.import_module("zb.passes.fuse_attention")
    right = fa.attention
    monkeypatch.setattr(fa, "attention", lambda q, k, v, bias, causal, scale: right(q, k, v, bias, causal, 2 * scale))
    plan, (model, args) = _plan("sdpa_block")
    assert plan.counters["fused_attention"] == 1
    with pytest.raises(AssertionError, match="output 0"):
        _check_against_eager(plan, model, args)


def test_runner_names_the_failing_pass_and_those_before_it():
    plan, _ = _plan("mlp_input_grad")

    def break_the_graph(plan):
        raise RuntimeError("boom")

    fresh = Plan(plan.graph, plan.inputs, plan.example_inputs, plan.num_outputs, True, plan.options)
    with pytest.raises(PassError, match=r"pass 'break_the_graph' failed after \['capture_joint'\]: RuntimeError: boom"):
        run_passes(fresh, [capture_joint, break_the_graph])


def test_verifier_catches_a_node_without_meta_val():
    plan, _ = _plan("mlp_input_grad")
    gm = plan.stages[0].backward_weight
    node = next(n for n in gm.graph.nodes if n.op == "call_function")
    del node.meta["val"]
    with pytest.raises(InvariantError, match=f"node {node.name} has no meta"):
        verify_graph(gm, 0)


def test_dump_dir_writes_every_pass_and_the_final_pieces(tmp_path, monkeypatch):
    monkeypatch.setenv("ZB_DUMP_DIR", str(tmp_path))
    model, args = models.mlp(x_requires_grad=True)
    torch.compile(model, backend="zb", options={"compiler": "eager"})(*args).backward()
    names = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.py")}
    for number, fn in enumerate(PASSES, start=1):
        assert any(n.startswith(f"{number:02d}_{fn.__name__}/") for n in names)
    for piece in ("forward", "backward_input", "backward_weight"):
        assert f"final/stage0_{piece}.py" in names
    number = next(i for i, fn in enumerate(PASSES, start=1) if fn.__name__ == "split_backward")
    text = (tmp_path / f"{number:02d}_split_backward" / "stage0_backward_input.py").read_text()
    assert "# inputs: [" in text and "tangent:out:0" in text


def test_dump_dir_writes_the_piece_that_runs_where_it_adds_into_the_gradient_sums(tmp_path, monkeypatch):
    monkeypatch.setenv("ZB_DUMP_DIR", str(tmp_path))
    model, args = models.mlp(x_requires_grad=True)
    torch.compile(model, backend="zb", options={"compiler": "eager", "microbatches": 2})(*args).backward()
    text = (tmp_path / "final" / "stage0_backward_weight.running.py").read_text()
    assert "grad_total_" in text and "add_" in text


def test_dump_dir_writes_the_schedule_in_a_form_that_parses_back(tmp_path, monkeypatch):
    from zb.schedules import Schedule, generate

    monkeypatch.setenv("ZB_DUMP_DIR", str(tmp_path))
    model, args = models.deep_mlp()
    options = {"compiler": "eager", "stages": 2, "schedule": "zb-h1", "microbatches": 4}
    torch.compile(model, backend="zb", options=options)(*args).backward()
    text = (tmp_path / "schedule.txt").read_text()
    assert text.startswith("# zb schedule zb-h1: 2 stages")
    expected = generate("zb-h1", 2, 4)
    assert Schedule.from_text(text, expected.placement, 4).actions == expected.actions
    assert "0SEND_F0" in (tmp_path / "schedule_lowered.txt").read_text()


def test_explain_returns_inspectable_plan():
    plan, _ = _plan("conv_norm_fused_backward")
    stage = plan.stages[0]
    for piece in (stage.forward, stage.backward_input, stage.backward_weight):
        assert isinstance(piece, torch.fx.GraphModule)
        assert "def forward" in piece.code
    summary = plan.summary()
    assert "stage 0 backward_input" in summary and "ops," in summary
    assert op_counts(stage.backward_weight)["aten.convolution_backward"] == 1
    assert plan.counters["split_backward.b_nodes"] > 0 and plan.counters["split_backward.w_nodes"] > 0
    assert [r.name for r in plan.history] == [fn.__name__ for fn in PASSES]
