"""options["optimizer"]: fused per-stage updates and post-validation, against synchronous torch.optim training
(clip_grad_norm_ + step, non-finite steps skipped), in one process; tests/distributed/optimizer_check.py does the
same under torchrun (see test_pipeline.py for how it is launched)."""

import copy

import pytest
import torch

from tests import models
from tests.optim_check import OPTIMIZERS, assert_same_training, batches, train_both
from tests.optim_check import reference as reference_training
from zb import ZbBackend, ZbError, ZbOptionError, ZbUnsupportedError
from zb.runtime.optimizer import history as optimizer_history
from zb.runtime.optimizer import synchronize

CASES = [  # (optimizer, schedule, stages, post_validation)
    ("adamw", "zb-h1", 4, True),
    ("adam", "1f1b", 2, False),
    ("sgd", "zb-v", 8, True),
    ("adamw", "interleaved-1f1b", 4, True),
    ("sgd", "zb-auto", 4, True),
    ("adam", "zb-h2", 4, True),
    ("adamw", "gpipe", 1, True),
]


@pytest.mark.parametrize("kind,schedule,stages,post_validation", CASES)
def test_training_equals_synchronous_clip_and_step(kind, schedule, stages, post_validation):
    model, opt, ref_model, ref_opt, did, backend = train_both(
        kind, {"schedule": schedule, "stages": stages, "microbatches": 4, "compiler": "eager",
               "post_validation": post_validation})
    assert {"plain", "clipped", "skipped"} <= set(did), did  # the data exercises every path
    assert_same_training(model, opt, ref_model, ref_opt, f"{kind} {schedule} x{stages}")
    history = optimizer_history(opt)
    assert [("skipped" if h.skipped else "clipped" if h.clipped else "plain") for h in history] == did
    if post_validation and stages > 1:
        # later ranks updated before rank 0 knew the global norm: some of those updates were rolled back
        assert sum(h.rolled_back for h in history) > 0


@pytest.mark.inductor
def test_training_through_inductor():
    model, opt, ref_model, ref_opt, _, _ = train_both("adamw", {"schedule": "zb-h1", "stages": 2, "microbatches": 2})
    assert_same_training(model, opt, ref_model, ref_opt, "adamw through inductor")


def test_tied_weights_are_updated_once_with_the_summed_gradient():
    torch.manual_seed(0)
    model, (idx, targets) = models.tied_embedding()
    reference = copy.deepcopy(model)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    backend = ZbBackend({"stages": 2, "microbatches": 2, "compiler": "eager", "optimizer": opt,
                         "max_grad_norm": 0.5})
    step = torch.compile(model, backend=backend)
    for i in range(4):
        batch = (idx.roll(i, 1), targets.roll(i, 1))
        step(*batch)
        ref_opt.zero_grad()
        reference(*batch).backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
        ref_opt.step()
    assert backend.plans[0].shared_updates  # the tied weight is read by both stages
    assert_same_training(model, opt, reference, ref_opt, "tied embedding")


def test_a_checkpoint_resumes_with_plain_torch_optim():
    """state_dict() of the optimizer zb drives loads into a fresh torch.optim optimizer and training goes on."""
    torch.manual_seed(0)
    model = models.DeepMLP()
    reference = copy.deepcopy(model)
    data = batches(8)
    opt = OPTIMIZERS["adamw"](model.parameters())
    step = torch.compile(model, backend="zb", options={"stages": 4, "microbatches": 4, "compiler": "eager",
                                                        "optimizer": opt, "schedule": "zb-h1"})
    for x, y in data[:5]:
        step(x, y)
    checkpoint = copy.deepcopy(opt.state_dict())
    resumed = copy.deepcopy(model)
    resumed_opt = OPTIMIZERS["adamw"](resumed.parameters())
    resumed_opt.load_state_dict(checkpoint)
    ref_opt = OPTIMIZERS["adamw"](reference.parameters())
    reference_training(reference, ref_opt, data, None)  # step 4 has an inf: skipped by both
    reference_training(resumed, resumed_opt, data[5:], None)
    assert_same_training(resumed, resumed_opt, reference, ref_opt, "resumed from zb's checkpoint")


def test_the_learning_rate_of_the_step_is_used():
    """An LR scheduler changes param_groups between steps; zb reads them at each update."""
    torch.manual_seed(0)
    model = models.DeepMLP()
    reference = copy.deepcopy(model)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.5) for m in (model, reference)]
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5) for o in opts]
    step = torch.compile(model, backend="zb", options={"stages": 2, "microbatches": 2, "compiler": "eager",
                                                        "optimizer": opts[0]})
    for x, y in batches(4):
        step(x, y)
        opts[1].zero_grad()
        reference(x, y).backward()
        opts[1].step()
        for s in scheds:
            s.step()
    assert_same_training(model, opts[0], reference, opts[1], "with StepLR")


def test_the_loss_is_detached_and_backward_explains():
    model = models.DeepMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    step = torch.compile(model, backend="zb", options={"compiler": "eager", "optimizer": opt})
    x, y = batches(1)[0]
    loss = step(x, y)
    assert not loss.requires_grad and loss.grad_fn is None
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ZbError, match="already ran the backward and the optimizer update"):
        loss.backward()
    assert float(loss) > 0


def test_evaluation_after_training_sees_validated_parameters():
    """Under no_grad the compiled model runs forwards only, after validating the last step."""
    torch.manual_seed(0)
    model, opt, ref_model, ref_opt, _, backend = train_both("sgd", {"schedule": "1f1b", "stages": 4,
                                                                     "microbatches": 4, "compiler": "eager"})
    x, y = batches(1)[0]
    step = torch.compile(model, backend=backend)
    with torch.no_grad():
        torch.testing.assert_close(step(x, y), ref_model(x, y), rtol=1e-5, atol=1e-6)
    synchronize(opt)
    assert_same_training(model, opt, ref_model, ref_opt, "after evaluation")


@pytest.mark.parametrize("options,message", [
    ({"optimizer": "adam"}, "takes a torch.optim optimizer"),
    ({"max_grad_norm": 1.0}, "'max_grad_norm' needs option 'optimizer'"),
    ({"post_validation": True}, "'post_validation' needs option 'optimizer'"),
    ({"max_grad_norm": -1.0}, "must be a positive number"),
])
def test_bad_optimizer_options(options, message):
    with pytest.raises(ZbOptionError, match=message):
        ZbBackend(options)


def test_unsupported_optimizers_are_refused_early():
    model = models.DeepMLP()
    with pytest.raises(ZbOptionError, match="zb fuses SGD, Adam, AdamW updates, not RMSprop"):
        ZbBackend({"optimizer": torch.optim.RMSprop(model.parameters())})
    opt = torch.optim.Adam(model.parameters(), differentiable=True)
    step = torch.compile(model, backend="zb", options={"compiler": "eager", "optimizer": opt})
    with pytest.raises(ZbUnsupportedError, match="differentiable=True"):
        step(*batches(1)[0])


def test_an_optimizer_over_other_parameters_is_an_error():
    model = models.DeepMLP()
    opt = torch.optim.SGD(models.DeepMLP().parameters(), lr=0.1)
    step = torch.compile(model, backend="zb", options={"compiler": "eager", "optimizer": opt})
    with pytest.raises(ZbError, match="holds none of the model's trainable parameters"):
        step(*batches(1)[0])
