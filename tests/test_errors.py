"""Bad input gets a clear, early error that says what to change."""

import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import zb
from tests import models


def _compile(model, **options):
    return torch.compile(model, backend="zb", options={"compiler": "eager", **options})


def test_unknown_option_lists_the_valid_ones():
    with pytest.raises(zb.ZbOptionError, match=r"unknown zb option 'microbatch' \(did you mean 'microbatches'\?\); "
                       r"valid options: aux_loss, compiler, data_parallel, fuse_attention, grad_scaler, group, init, "
                       r"init_seed, loss_reduction, max_grad_norm, memory_limit, mesh, microbatches, optimizer, "
                       r"param_dtype, plan_cache, post_validation, profile, rebalance, reduce_dtype, release, "
                       r"schedule, shard_optimizer, split_points, stages, symbolic_sizes, timeout, unbatched"):
        zb.Options.from_dict({"microbatch": 2})


@pytest.mark.parametrize("options, message", [
    ({"microbatches": 0}, "'microbatches' must be a positive int, got 0"),
    ({"microbatches": "4"}, "'microbatches' must be a positive int, got '4'"),
    ({"compiler": "tvm"}, "'compiler' must be one of 'inductor', 'eager'; got 'tvm'"),
])
def test_wrong_option_value(options, message):
    with pytest.raises(zb.ZbOptionError, match=message):
        zb.Options.from_dict(options)


def test_wrong_option_through_torch_compile_fails_at_the_first_call():
    model, args = models.mlp()
    with pytest.raises(Exception, match="unknown zb option 'microbatchez'"):
        torch.compile(model, backend="zb", options={"microbatchez": 2})(*args)


def test_batch_not_divisible_by_microbatches():
    model, (x, y) = models.mlp()
    with pytest.raises(Exception, match=r"input 'x' has batch size 6, which microbatches=4 does not divide"):
        _compile(model, microbatches=4)(x[:6], y[:6])


class ReturnsLogits(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x)


def test_non_scalar_output_when_training_says_how_to_wrap_the_model():
    with pytest.raises(Exception, match=r"(?s)zb trains on a scalar loss.*shape \[8, 4\].*F.cross_entropy"):
        _compile(ReturnsLogits())(torch.randn(8, 4))


def test_non_scalar_output_is_fine_for_inference():
    model = ReturnsLogits()
    x = torch.randn(8, 4)
    with torch.no_grad():
        torch.testing.assert_close(_compile(model, microbatches=2)(x), model(x))


class Breaks(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        h = self.fc(x)
        if h.sum().item() > 1e9:  # data-dependent control flow: a graph break
            h = h * 2
        return h.pow(2).mean()


def test_graph_break_is_named_and_suggests_fullgraph():
    pattern = r"(?s)zb needs the whole model in one graph.*test_errors.py:\d+.*fullgraph=True"
    with pytest.raises(Exception, match=pattern):
        _compile(Breaks())(torch.randn(8, 4))


class BatchNormModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):
        return self.bn(x).pow(2).mean()


def test_buffer_mutation_is_rejected_with_a_hint():
    with pytest.raises(Exception, match=r"In-place updates of buffers.*BatchNorm"):
        _compile(BatchNormModel())(torch.randn(8, 4))


def test_backward_twice_through_one_step_is_an_error():
    model, args = models.mlp()
    loss = _compile(model)(*args)
    loss.backward(retain_graph=True)
    with pytest.raises(zb.ZbError, match="ran twice"):
        loss.backward()


def test_backend_is_registered_without_importing_zb():
    code = (
        "import sys, torch\n"
        "m = torch.nn.Linear(4, 1)\n"
        "f = torch.compile(lambda x: m(x).pow(2).mean(), backend='zb', options={'compiler': 'eager'})\n"
        "f(torch.randn(2, 4)).backward()\n"
        "assert m.weight.grad is not None\n"
        "print('zb' in sys.modules, 'zb.backend' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "True"]  # loaded by torch through the entry point


def test_loss_is_the_mean_over_microbatches():
    model, (x, y) = models.mlp()
    loss = _compile(model, microbatches=4)(x, y)
    expected = torch.stack([F.mse_loss(model.fc2(F.gelu(model.fc1(a))), b)
                            for a, b in zip(x.chunk(4), y.chunk(4))]).mean()
    torch.testing.assert_close(loss, expected)


def test_a_wrong_aux_loss_value_lists_the_choices():
    with pytest.raises(zb.ZbOptionError, match="'aux_loss' must be one of 'refuse', 'per_microbatch'"):
        zb.Options.from_dict({"aux_loss": "global"})
