"""Tier (a): each pass on small graphs, structurally and numerically against torch.autograd."""

import pytest
import torch

import zb
from tests import models
from zb.passes import PASSES, PassError, Plan, capture_joint, run_passes
from zb.passes.plan import input_keys, op_counts, output_keys, output_values
from zb.passes.verify import InvariantError, verify_graph

# (factory, which inputs need a gradient): models chosen for what the split must get right.
CASES = {
    "mlp_input_grad": lambda: models.mlp(x_requires_grad=True),
    "mlp_no_input_grad": models.mlp,
    "conv_norm_fused_backward": models.conv_norm,
    "tied_embedding": models.tied_embedding,
    "unused_parameter": models.unused_parameter,
    "buffer": models.buffer,
    "loss_and_logits": models.loss_and_logits,
    "sdpa_block": lambda: _with_input_grad(models.sdpa_block()),
    "gpt": models.gpt,
}


def _with_input_grad(case):
    model, (x, y) = case
    return model, (x.requires_grad_(), y)


def _plan(name, microbatches=2) -> tuple[Plan, tuple]:
    model, args = CASES[name]()
    return zb.explain(model, *args, microbatches=microbatches), (model, args)


def _evaluate(gm, env):
    outs = gm(*[env[k] for k in input_keys(gm)])
    env.update({k: v for k, v in zip(output_keys(gm), outs) if k is not None})


def _reference(plan, model, args):
    """Eager loss and gradients on the first microbatch, keyed like the plan's values."""
    env = {s.key: v for s, v in zip(plan.inputs, plan.example_inputs)}
    wanted = [s for s in plan.inputs if s.requires_grad]
    leaves = [env[s.key].detach().requires_grad_() for s in wanted]
    call = dict(env, **{s.key: leaf for s, leaf in zip(wanted, leaves)})
    outs = plan.graph(*[call[s.key] for s in plan.inputs])
    loss = outs[0] if isinstance(outs, (tuple, list)) else outs
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return loss, {f"grad:{s.key}": g for s, g in zip(wanted, grads)}


def _start_env(plan):
    return {s.key: v.detach() if isinstance(v, torch.Tensor) else v for s, v in zip(plan.inputs, plan.example_inputs)}


@pytest.mark.parametrize("name", sorted(CASES))
def test_split_is_structurally_sound(name):
    plan, _ = _plan(name)
    stage = plan.stages[0]
    params = {f"grad:{s.key}" for s in plan.parameters}
    b, w = stage.backward_input, stage.backward_weight
    b_grads = [k for k in (output_keys(b) if b else []) if k.startswith("grad:")]
    w_grads = [k for k in output_keys(w) if k.startswith("grad:")]
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
        crossing = [n for n in w.graph.find_nodes(op="placeholder") if n.meta["zb_key"].startswith("stash:")]
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
    assert output_keys(plan.stages[0].backward_weight).count(f"grad:{tied[0].key}") == 1


def test_parameters_without_gradient_get_none():
    plan, _ = _plan("unused_parameter")
    by_name = {s.name: s for s in plan.parameters}
    assert "unused.weight" not in by_name  # never read: Dynamo does not even lift it
    w_keys = output_keys(plan.stages[0].backward_weight)
    assert f"grad:{by_name['frozen'].key}" not in w_keys
    assert f"grad:{by_name['no_grad_path'].key}" not in w_keys


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_pass_matches_autograd(name):
    plan, (model, args) = _plan(name)
    loss, expected = _reference(plan, model, args)
    stage = plan.stages[0]
    one = torch.ones((), dtype=loss.dtype)

    env = dict(_start_env(plan), **{"tangent:out:0": one})
    _evaluate(stage.joint, env)  # capture_joint
    joint = env

    env = _start_env(plan)
    _evaluate(stage.forward, env)  # partition_fw_bw
    env["tangent:out:0"] = one
    unsplit = dict(env)
    _evaluate(stage.backward, unsplit)

    if stage.backward_input is not None:  # split_backward
        _evaluate(stage.backward_input, env)
    _evaluate(stage.backward_weight, env)

    for which, result in (("joint", joint), ("forward/backward", unsplit), ("F/B/W", env)):
        torch.testing.assert_close(result["out:0"], loss.detach(), msg=lambda m, which=which: f"{which} loss: {m}")
        for key, grad in expected.items():
            if grad is None:
                assert key not in result or result[key] is None, f"{which}: {key} should get no gradient"
            else:
                torch.testing.assert_close(result[key], grad, rtol=1e-5, atol=1e-6,
                                           msg=lambda m, which=which, key=key: f"{which} {key}: {m}")


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
