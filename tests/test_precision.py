"""Mixed precision: torch.autocast inside and around the compiled function (passes/autocast_regions.py).

Two references. Eager under the same autocast run microbatch by microbatch (each microbatch's loss scaled by 1/m,
gradients accumulated) does exactly the operations zb's pipeline does, so zb equals it to fp32 rounding of the
accumulation (rtol 1e-6). Eager under autocast on the whole batch differs from both by bf16 rounding: bf16 keeps 8
significant bits (a relative rounding of 2^-9, about 0.2%), and a gradient sums many rounded products whose
blocking depends on the batch size, so eager itself moves by up to about 1% of the largest element between
splittings; that comparison uses 3e-2 of the largest element. Each test also checks that autocast took effect:
the gradients differ from fp32 eager's by far more than fp32 rounding.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import fx, nn

from zb.passes.keys import Kind
import zb
from tests import hf_models
from tests.models import PRESETS, GPT
from tests.optim_check import assert_same_scaling, assert_same_training, train_scaled

BF16 = torch.bfloat16


class Net(nn.Module):
    """Linear layers, an activation and an fp32 loss; with `inside`, the forward opens its own autocast region."""

    def __init__(self, inside: bool = False):
        super().__init__()
        self.inside = inside
        self.a, self.b, self.c, self.d = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 16)

    def body(self, x, y):
        h = self.d(torch.relu(self.c(torch.tanh(self.b(torch.relu(self.a(x)))))))
        return nn.functional.mse_loss(h.float(), y)

    def forward(self, x, y):
        if self.inside:
            with torch.autocast("cpu", dtype=BF16):
                return self.body(x, y)
        return self.body(x, y)


def around(on: bool):
    return torch.autocast("cpu", dtype=BF16) if on else torch.autocast("cpu", enabled=False)


def microbatched(model, args, microbatches: int, autocast_around: bool):
    """Eager, microbatch by microbatch, each loss scaled by 1/m (what zb's pipeline computes); returns the loss."""
    total = 0.0
    for part in zip(*(a.chunk(microbatches) for a in args)):
        with around(autocast_around):
            loss = model(*part) / microbatches
        loss.backward()
        total = total + loss.detach()
    return total


def relative_error(model, reference) -> float:
    return max(((p.grad - q.grad).abs().max() / q.grad.abs().max()).item()
               for p, q in zip(model.parameters(), reference.parameters()))


@pytest.mark.parametrize("stages", [1, 2, 4])
@pytest.mark.parametrize("where", ["inside", "around"])
def test_autocast_equals_eager_microbatch_by_microbatch(where, stages):
    torch.manual_seed(0)
    model = Net(inside=where == "inside")
    reference, fp32 = copy.deepcopy(model), copy.deepcopy(model)
    fp32.inside = False
    x, y = torch.randn(8, 16), torch.randn(8, 16)
    step = torch.compile(model, backend=zb.ZbBackend({"stages": stages, "microbatches": 4, "compiler": "eager"}))
    with around(where == "around"):
        loss = step(x, y)
    loss.backward()
    expected = microbatched(reference, (x, y), 4, where == "around")
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-7)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert p.grad.dtype == torch.float32, name  # fp32 parameters get fp32 gradients, as in eager
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7, msg=name)
    fp32(x, y).backward()
    assert relative_error(model, fp32) > 1e-3  # bf16 compute: far from fp32's gradients


def test_autocast_through_inductor():
    torch.manual_seed(0)
    model = Net()
    reference = copy.deepcopy(model)
    x, y = torch.randn(8, 16), torch.randn(8, 16)
    step = torch.compile(model, backend=zb.ZbBackend({"stages": 2, "microbatches": 2, "compiler": "inductor"}))
    with around(True):
        loss = step(x, y)
    loss.backward()
    expected = microbatched(reference, (x, y), 2, True)
    torch.testing.assert_close(loss, expected, rtol=1e-3, atol=1e-4)  # Inductor fuses: other fp32 roundings
    assert relative_error(model, reference) < 1e-2


def test_a_gpt_with_fused_attention_under_autocast():
    """SDPA under autocast runs in bf16 in eager; the fused attention gets q, k, v cast to bf16 (every site is
    fused)."""
    torch.manual_seed(0)
    model = GPT(PRESETS["tiny"])
    reference, fp32 = copy.deepcopy(model), copy.deepcopy(model)
    ids = torch.randint(0, 256, (8, 16))
    targets = torch.randint(0, 256, (8, 16))
    backend = zb.ZbBackend({"stages": 2, "microbatches": 2, "compiler": "eager"})
    step = torch.compile(model, backend=backend)
    with around(True):
        loss = step(ids, targets)
    loss.backward()
    (plan,) = backend.plans
    assert plan.counters["fused_attention"] == PRESETS["tiny"].n_layer
    fused = [n for n in plan.graph.graph.nodes if "zb_attention_site" in n.meta]
    assert fused and all(n.meta["example_value"].dtype == BF16 for n in fused)
    expected = microbatched(reference, (ids, targets), 2, True)
    torch.testing.assert_close(loss, expected, rtol=1e-2, atol=1e-2)
    assert relative_error(model, reference) < 3e-2
    fp32(ids, targets).backward()
    assert relative_error(model, fp32) > 1e-3


def test_a_hugging_face_llama_under_bf16_autocast():
    torch.manual_seed(0)
    model = hf_models.FAMILIES["llama"]()
    reference, fp32 = copy.deepcopy(model), copy.deepcopy(model)
    ids, labels = hf_models.batch()
    step = torch.compile(lambda i, t: hf_models.loss_fn(model, i, t),
                         backend=zb.ZbBackend({"stages": 2, "microbatches": 2, "compiler": "eager"}))
    with around(True):
        loss = step(ids, labels)
        expected = hf_models.loss_fn(reference, ids, labels)  # the whole batch: bf16 tolerance
    loss.backward()
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-2, atol=1e-2)
    assert relative_error(model, reference) < 3e-2
    hf_models.loss_fn(fp32, ids, labels).backward()
    assert relative_error(model, fp32) > 1e-3


def test_an_autocast_region_left_open_is_refused():
    model = Net()
    x, y = torch.randn(8, 16), torch.randn(8, 16)

    def step(x, y):
        torch.amp.autocast_mode._enter_autocast("cpu", BF16, True, None)  # no matching exit in the function
        return model(x, y)

    before = torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")
    try:
        with pytest.raises(Exception, match="autocast"):
            torch.compile(step, backend="zb", options={"stages": 2, "microbatches": 2, "compiler": "eager"})(x, y)
    finally:  # the function's own enter ran once it fell back to eager: put the process's state back (the nesting
        # count too: while it is above 0, autocast keeps its cast cache, and later regions would read stale casts)
        torch.set_autocast_enabled("cpu", before[0])
        torch.set_autocast_dtype("cpu", before[1])
        nesting = torch.autocast_increment_nesting() - 1
        for _ in range(nesting + 1):
            torch.autocast_decrement_nesting()
        torch.clear_autocast_cache()
    assert not torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize("ranks, replicas, cases", [(2, 1, ["autocast:zb-h1", "autocast:zb-v", "policy:zb-h1"]),
                                                    (4, 2, ["autocast:1f1b", "policy:zb-v"])])
def test_torchrun_autocast_and_the_policy_on_ranks_and_replicas(ranks, replicas, cases):
    """tests/distributed/data_parallel_check.py `autocast` and `policy`: 2 pipeline ranks, and 2 replicas x 2 ranks,
    3 SGD steps with autocast inside the model equal eager under autocast microbatch by microbatch on the global
    batch; with param_dtype, eager with a bf16 copy and float32 sums over microbatches and replicas."""
    from tests.test_data_parallel import _ok
    from tests.test_pipeline import torchrun

    out = torchrun(ranks, "data_parallel_check.py", "--replicas", str(replicas), "--cases", ",".join(cases))
    assert _ok(out) == cases


def policy_reference(model, args, microbatches: int, dtype=BF16) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Eager's counterpart of options param_dtype/reduce_dtype: a copy of the model with `dtype` parameters run
    microbatch by microbatch on float inputs cast to `dtype` (arguments without the batch dim passed whole), each
    loss scaled by 1/m, the copies' gradients summed in float32."""
    low = copy.deepcopy(model)
    for p in low.parameters():  # parameters only: buffers keep their dtype (FSDP2's policy)
        p.data = p.data.to(dtype)
    sums = [torch.zeros_like(p) for p in model.parameters()]
    total = torch.zeros(())
    batch = args[0].shape[0]
    for part in zip(*(a.chunk(microbatches) if a.shape[0] == batch else [a] * microbatches for a in args)):
        low.zero_grad()
        loss = low(*(a.to(dtype) if a.is_floating_point() else a for a in part)) / microbatches
        loss.backward()
        total += loss.detach().float()
        for s, p in zip(sums, low.parameters()):
            s += p.grad.float()
    return total, sums


@pytest.mark.parametrize("stages", [1, 2, 4])
def test_the_policy_equals_eager_with_bf16_copies_and_float32_sums(stages):
    torch.manual_seed(0)
    model = Net()
    x, y = torch.randn(16, 16), torch.randn(16, 16)
    expected_loss, expected = policy_reference(model, (x, y), 8)
    backend = zb.ZbBackend({"stages": stages, "microbatches": 8, "compiler": "eager", "param_dtype": BF16})
    loss = torch.compile(model, backend=backend)(x, y)
    loss.backward()
    torch.testing.assert_close(loss.float(), expected_loss, rtol=1e-6, atol=1e-7)
    for (name, p), g in zip(model.named_parameters(), expected):
        assert p.dtype == p.grad.dtype == torch.float32, name  # float32 masters and gradients
        torch.testing.assert_close(p.grad, g, rtol=1e-6, atol=1e-7, msg=name)
    # The copies are made by the runtime once per step: no piece converts a parameter.
    (plan,) = backend.plans
    assert set(plan.copies) == {i for i, s in enumerate(plan.inputs) if s.kind == "parameter"}
    for stage in plan.stages:
        for gm in filter(None, stage.pieces.values()):
            converted = {n.args[0].meta.get("zb_key") for n in gm.graph.nodes
                         if "convert_element_type" in str(n.target) and n.args and isinstance(n.args[0], fx.Node)
                         and n.args[0].op == "placeholder"}
            assert not any(k is not None and k.is_(Kind.IN) and k.index in plan.copies for k in converted), converted
    # The plan's memory counts the copies: one bfloat16 copy of every parameter on this (only) process.
    planned = backend.runners[0].planned_memory()
    copies = sum(p.numel() * 2 for p in model.parameters())
    assert sum(m.most["copies"] for m in planned.values()) == copies


def test_the_policy_on_the_example_gpt():
    """The example GPT (position ids from torch.arange, a node that reads no tensor; tied head; fused attention),
    2 stages, against eager's bf16 copy with float32 sums within bf16 rounding (fused attention and the tied
    weight's per-stage float32 sums round differently), and measurably apart from float32 training."""
    torch.manual_seed(0)
    model = GPT(PRESETS["tiny"])
    fp32 = copy.deepcopy(model)
    args = (torch.randint(0, 256, (4, 16)), torch.randint(0, 256, (4, 16)))
    expected_loss, expected = policy_reference(model, args, 2)
    step = torch.compile(model, backend=zb.ZbBackend({"stages": 2, "microbatches": 2, "compiler": "eager",
                                                      "param_dtype": BF16}))
    loss = step(*args)
    assert loss.dtype == BF16
    loss.backward()
    torch.testing.assert_close(loss.float(), expected_loss, rtol=1e-2, atol=1e-2)
    assert all(p.dtype == p.grad.dtype == torch.float32 for p in model.parameters())
    worst = max(float((p.grad - g).abs().max() / g.abs().max()) for p, g in zip(model.parameters(), expected))
    assert worst < 3e-2, worst
    fp32(*args).backward()
    assert relative_error(model, fp32) > 1e-3


def test_the_policy_refuses_code_that_read_a_dtype_while_traced_in_float32():
    """An HF Llama reads tensors' dtypes (RMSNorm's input_dtype, the rotary embedding's cos.to(x.dtype)): Dynamo
    wrote float32 there, where eager's bf16 copy would pick bf16; zb cannot tell, so the policy is refused, naming
    the code, instead of running another program (before, a float32 x bf16 matmul crashed mid-step). A model
    that names its dtypes (`x.float()`) runs, as the other policy tests show."""
    torch.manual_seed(0)
    model = hf_models.FAMILIES["llama"]()
    step = torch.compile(lambda i, t: hf_models.loss_fn(model, i, t),
                         backend=zb.ZbBackend({"stages": 2, "microbatches": 2, "compiler": "eager",
                                               "param_dtype": BF16}))
    with pytest.raises(zb.ZbUnsupportedError, match=r"(?s)float32 written.*modeling_llama.py.*torch.autocast"):
        step(*hf_models.batch())

    class Written(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(16, 16)

        def forward(self, x, y):
            h = self.a(x)
            mask = torch.full(h.shape, -1.0, dtype=h.dtype)  # float32 in the trace, bf16 in eager's bf16 copy
            return ((h + mask) - y).square().mean()

    torch._dynamo.reset()
    step = torch.compile(Written(), backend=zb.ZbBackend({"stages": 1, "microbatches": 2, "compiler": "eager",
                                                          "param_dtype": BF16}))
    with pytest.raises(zb.ZbUnsupportedError, match=r"torch.full\(h.shape, -1.0, dtype=h.dtype\)"):
        step(torch.randn(4, 16), torch.randn(4, 16))


def test_bf16_gradient_sums_drift_the_policys_do_not():
    """16 microbatches: the model cast to bfloat16 (each microbatch's gradient added into a bfloat16 sum) against
    the policy (the same bfloat16 compute, float32 sums); the reference is that compute with exact float32 sums
    (policy_reference), so what differs is the summation alone."""
    torch.manual_seed(0)
    model = Net()
    x, y = torch.randn(64, 16), torch.randn(64, 16)
    _, expected = policy_reference(model, (x, y), 16)
    errors = {}
    for name, options in (("bf16 model", {}), ("policy", {"param_dtype": BF16})):
        torch._dynamo.reset()
        net = copy.deepcopy(model).to(BF16) if name == "bf16 model" else copy.deepcopy(model)
        args = (x.to(BF16), y.to(BF16)) if name == "bf16 model" else (x, y)
        step = torch.compile(net, backend=zb.ZbBackend({"stages": 2, "microbatches": 16, "compiler": "eager",
                                                        **options}))
        step(*args).backward()
        errors[name] = max(((p.grad.float() - g).abs().max() / g.abs().max()).item()
                           for p, g in zip(net.parameters(), expected))
    assert errors["policy"] < 1e-6 and errors["bf16 model"] > 1e-3, errors


def test_policy_bad_input():
    with pytest.raises(zb.ZbOptionError, match="reduce_dtype.*param_dtype"):
        zb.ZbBackend({"reduce_dtype": torch.float32})
    with pytest.raises(zb.ZbOptionError, match="param_dtype"):
        zb.ZbBackend({"param_dtype": torch.int8})
    model = Net().to(BF16)
    step = torch.compile(model, backend=zb.ZbBackend({"stages": 2, "microbatches": 2, "compiler": "eager",
                                                      "param_dtype": BF16}))
    with pytest.raises(Exception, match="float32 master parameters.*is torch.bfloat16"):
        step(torch.randn(4, 16, dtype=BF16), torch.randn(4, 16, dtype=BF16))


class Regions(nn.Module):
    """Autocast cases from a review: an inner region with no dtype (eager takes the enclosing one's, through a
    disabled region), and attention on float32 q, k, v inside an activation-checkpointed body."""

    def __init__(self, case: str):
        super().__init__()
        self.case = case
        self.a, self.b = nn.Linear(16, 32), nn.Linear(32, 16)

    def attention(self, h):
        b, t, c = h.shape
        q = h.float().view(b, t, 4, 8).transpose(1, 2)  # float32 q, k, v: eager's SDPA casts them to bf16
        out = nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
        return out.transpose(1, 2).reshape(b, t, c)

    def forward(self, x, y):
        if self.case == "dtype-none":
            with torch.autocast("cpu", dtype=torch.float16):
                with torch.autocast("cpu", enabled=False):
                    with torch.autocast("cpu"):  # float16 in eager
                        h = self.b(torch.relu(self.a(x)))
        else:
            h = self.b(torch.utils.checkpoint.checkpoint(self.attention, self.a(x), use_reentrant=False))
        return nn.functional.mse_loss(h.float(), y)


@pytest.mark.parametrize("case", ["dtype-none", "checkpointed-attention"])
def test_nested_regions_and_checkpointed_attention(case):
    torch.manual_seed(0)
    model = Regions(case)
    reference = copy.deepcopy(model)
    shape = (8, 6, 16) if case == "checkpointed-attention" else (8, 16)
    x, y = torch.randn(shape), torch.randn(shape)
    caller = case == "checkpointed-attention"  # that case runs under the caller's autocast
    backend = zb.ZbBackend({"stages": 2, "microbatches": 2, "compiler": "eager"})
    with around(caller):
        loss = torch.compile(model, backend=backend)(x, y)
    loss.backward()
    expected = microbatched(reference, (x, y), 2, caller)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-7)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7, msg=name)
    if caller:
        assert backend.plans[0].counters["fused_attention"] == 1


def test_what_zb_cannot_do_exactly_under_autocast_is_refused():
    """float16 with a loss scale zb was not told of (option grad_scaler): eager's backward starts from the scaled loss
    in float16, zb's ran from 1; and loss.backward() inside the autocast region, which eager would run under
    autocast too."""
    torch.manual_seed(0)
    x, y = torch.randn(8, 16), torch.randn(8, 16)
    for case in ("scaled", "inside"):
        torch._dynamo.reset()
        model = Net()
        step = torch.compile(model, backend=zb.ZbBackend({"stages": 2, "microbatches": 2, "compiler": "eager"}))
        dtype = torch.float16 if case == "scaled" else BF16
        with torch.autocast("cpu", dtype=dtype):
            loss = step(x, y)
            if case == "inside":
                with pytest.raises(zb.ZbUnsupportedError, match="after the `with torch.autocast"):
                    loss.backward()
        if case == "scaled":  # a scaler zb was not given
            with pytest.raises(zb.ZbUnsupportedError, match="grad_scaler"):
                (loss * 1024.0).backward()


class Checkpointed(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 16)

    def block(self, h):
        return torch.tanh(self.b(h))

    def forward(self, x, y):
        h = torch.utils.checkpoint.checkpoint(self.block, torch.relu(self.a(x)), use_reentrant=False)
        return nn.functional.mse_loss(self.c(h).float(), y)


def test_the_policy_with_activation_checkpointing():
    torch.manual_seed(0)
    model = Checkpointed()
    x, y = torch.randn(8, 16), torch.randn(8, 16)
    expected_loss, expected = policy_reference(model, (x, y), 4)
    step = torch.compile(model, backend=zb.ZbBackend({"stages": 2, "microbatches": 4, "compiler": "eager",
                                                      "param_dtype": BF16}))
    loss = step(x, y)
    loss.backward()
    torch.testing.assert_close(loss.float(), expected_loss, rtol=1e-6, atol=1e-7)
    for (name, p), g in zip(model.named_parameters(), expected):
        torch.testing.assert_close(p.grad, g, rtol=1e-6, atol=1e-7, msg=name)


def test_float16_with_a_grad_scaler_equals_eager_step_for_step():
    """float16 autocast and torch.amp.GradScaler (option grad_scaler): 10 SGD steps with overflows forced at steps
    3 and 6; the same skipped steps, the same scale trajectory (backoff and growth) and the same parameters as
    eager with its own scaler run microbatch by microbatch."""
    torch.manual_seed(0)
    model = Net()
    reference = copy.deepcopy(model)
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**14, growth_interval=3) for _ in range(2)]
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for m in (model, reference)]
    step = torch.compile(model, backend=zb.ZbBackend({"stages": 2, "microbatches": 2, "compiler": "eager",
                                                      "grad_scaler": scalers[0]}))
    scales = []
    for i in range(10):
        generator = torch.Generator().manual_seed(i)
        x, y = torch.randn(8, 16, generator=generator), torch.randn(8, 16, generator=generator)
        if i in (3, 6):
            x = x * 6e4  # beyond float16's range: inf gradients, a skipped step
        with torch.autocast("cpu", dtype=torch.float16):
            loss = step(x, y)
        scalers[0].scale(loss).backward()
        for part in zip(x.chunk(2), y.chunk(2)):
            with torch.autocast("cpu", dtype=torch.float16):
                partial = reference(*part) / 2
            scalers[1].scale(partial).backward()
        for scaler, optimizer in zip(scalers, optimizers):
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
        scales.append((scalers[0].get_scale(), scalers[1].get_scale()))
    assert [a for a, _ in scales] == [b for _, b in scales], scales
    assert scales[3][0] == scales[2][0] / 2 and scales[2][0] == 2 * scales[1][0]  # backoff, and growth
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("schedule,stages,post_validation", [("1f1b", 2, True), ("zb-v", 4, True),
                                                             ("zb-h1", 2, False)])
def test_loss_scaling_inside_zbs_optimizer_step_equals_eager_with_a_grad_scaler(schedule, stages, post_validation):
    """float16 autocast with options optimizer + grad_scaler: zb scales the backward's seed, unscales before
    clipping, skips on inf and grows/backs off the scale (post-validation rolls back the ranks that updated
    early). 10 SGD steps, gradient overflows forced at steps 3 and 6 (tests/optim_check.py train_scaled): the same
    skipped steps, the same scale after every step, the same parameters and momentum as eager with
    torch.amp.GradScaler."""
    run = train_scaled({"stages": stages, "schedule": schedule, "microbatches": 2, "compiler": "eager",
                        "post_validation": post_validation}, Net, max_norm=0.5)
    assert_same_scaling(run, f"{schedule} post_validation={post_validation}")
    assert_same_training(run.model, run.optimizer, run.reference, run.ref_optimizer, "scaled")  # and momentum


class Float16Loss(nn.Module):
    """A loss left in the compute dtype: under param_dtype=float16 it is float16, so a default GradScaler's
    2**16 makes the scaled loss inf in eager."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x, y, bias):
        return (self.b(torch.relu(self.a(x) + bias)) - y).square().mean()


def test_review_cases_of_the_policy_and_the_scaler():
    """A float16 loss scaled to inf skips the step as eager does (every gradient non-finite); an unbatched float
    argument is cast like the batched ones; reduce_dtype other than float32 is refused."""
    torch.manual_seed(0)
    model = Float16Loss()
    x, y, bias = torch.randn(8, 16), torch.randn(8, 16), torch.randn(1, 32)
    scaler = torch.amp.GradScaler("cpu")  # 2**16: beyond float16
    step = torch.compile(model, backend=zb.ZbBackend({"stages": 2, "microbatches": 2, "compiler": "eager",
                                                      "param_dtype": torch.float16, "grad_scaler": scaler}))
    loss = step(x, y, bias)
    assert loss.dtype == torch.float16
    scaler.scale(loss).backward()
    assert not all(bool(p.grad.isfinite().all()) for p in model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() == 2.0**15 and all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    # the unbatched bias is cast to float16 too: the gradients equal the float16 copy's (float32 sums)
    torch._dynamo.reset()
    model.zero_grad()
    expected_loss, expected = policy_reference(model, (x, y, bias), 2, dtype=torch.float16)
    step = torch.compile(model, backend=zb.ZbBackend({"stages": 2, "microbatches": 2, "compiler": "eager",
                                                      "param_dtype": torch.float16, "unbatched": ["bias"]}))
    step(x, y, bias).backward()
    for (name, p), g in zip(model.named_parameters(), expected):
        torch.testing.assert_close(p.grad, g, rtol=1e-6, atol=1e-7, msg=name)
    with pytest.raises(zb.ZbOptionError, match="float32 only"):
        zb.ZbBackend({"param_dtype": BF16, "reduce_dtype": BF16})


@pytest.mark.parametrize("mode", ["autocast inside", "param_dtype"])
def test_zb_check_holds_bf16_compute_to_bf16_tolerance(mode, monkeypatch):
    """`zb check` under bf16 compute: a float32 output of a bf16 computation is held to bf16's tolerance (it was
    held to float32's, a false FAIL), the dtype column says both; a piece that is 5% off still fails."""
    from tests.test_cli import miscompile
    from zb.check import check, format_table

    torch.manual_seed(0)
    model = Net(inside=mode == "autocast inside")
    options = {"stages": 2, "microbatches": 2, "compiler": "eager"}
    if mode == "param_dtype":
        options["param_dtype"] = BF16
    args = (torch.randn(8, 16), torch.randn(8, 16))
    rows = check(model, args, options)
    assert all(r.passed for r in rows), format_table(rows)
    assert any(r.dtypes == "float32/bfloat16" for r in rows), format_table(rows)
    fp32_rows = check(Net(), args, {"stages": 2, "microbatches": 2, "compiler": "eager"})
    assert all(r.compute is None and r.tolerance == 1e-4 for r in fp32_rows)  # float32 compute: float32's tolerance
    miscompile(monkeypatch, 0, "backward_weight", 1.05)
    failed = [r.piece for r in check(model, args, options) if not r.passed]
    assert failed[0] == "stage 0 W", failed


def test_zb_check_keeps_float32_tolerance_for_a_piece_that_computes_in_float32():
    """bf16 autocast around the last layer only: stage 0 computes in float32 and keeps float32's tolerance (the
    whole step, which runs the bf16 layer, gets bf16's)."""
    from zb.check import check

    class LastInBf16(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(16, 32), nn.Linear(32, 16)

        def forward(self, x, y):
            h = torch.tanh(self.a(x))
            with torch.autocast("cpu", dtype=BF16):
                out = self.b(h)
            return (out.float() - y).square().mean()

    torch.manual_seed(0)
    rows = {r.piece: r for r in check(LastInBf16(), (torch.randn(8, 16), torch.randn(8, 16)),
                                      {"stages": 2, "microbatches": 2, "compiler": "eager", "split_points": ["b"]})}
    assert rows["stage 0 W"].tolerance == 1e-4 and rows["stage 0 F"].tolerance == 1e-4, rows
    assert rows["stage 1 F"].tolerance == 3e-2 and rows["whole step (loss, 4 gradients)"].tolerance == 3e-2, rows
    assert all(r.passed for r in rows.values()), rows


def test_an_autocast_dtype_the_device_does_not_support_is_refused():
    """torch.autocast("cpu", dtype=torch.float64) inside the model: eager disables the region with a warning (and
    runs float32); zb refuses with an error that says which dtypes to use."""

    class Float64Region(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(16, 16)

        def forward(self, x, y):
            with torch.autocast("cpu", dtype=torch.float64):
                return (self.a(x) - y).square().mean()

    torch._dynamo.reset()
    step = torch.compile(Float64Region(), backend=zb.ZbBackend({"stages": 1, "microbatches": 2, "compiler": "eager"}))
    with pytest.raises(zb.ZbUnsupportedError, match=r"(?s)autocast\('cpu', dtype=torch.float64\).*torch.bfloat16"):
        step(torch.randn(4, 16), torch.randn(4, 16))


def test_a_float16_loss_scaled_past_its_range_skips_the_step_inside_zbs_optimizer():
    """A float16 loss and GradScaler's default 2**16 (beyond float16): eager's scaler.scale(loss) is inf, every
    gradient non-finite, the step skipped and the scale halved. zb's seed is the scale in the loss's dtype before
    the microbatches' 1/m (S/m would be finite at 2 microbatches, and zb stepped where eager skips)."""
    from zb.runtime.optimizer import history

    torch.manual_seed(0)
    model = Float16Loss()
    x, y, bias = torch.randn(8, 16), torch.randn(8, 16), torch.randn(1, 32)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    step = torch.compile(model, backend=zb.ZbBackend({"stages": 2, "microbatches": 2, "compiler": "eager",
                                                      "param_dtype": torch.float16, "optimizer": optimizer,
                                                      "grad_scaler": scaler}))
    before = [p.detach().clone() for p in model.parameters()]
    assert step(x, y, bias).dtype == torch.float16
    zb.synchronize(optimizer)
    assert [r.skipped for r in history(optimizer)] == [True] and scaler.get_scale() == 2.0**15
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    step(x, y, bias)  # at 2**15 the seed is finite: the step runs
    zb.synchronize(optimizer)
    assert [r.skipped for r in history(optimizer)] == [True, False]
