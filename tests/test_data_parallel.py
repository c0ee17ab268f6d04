"""Data parallelism: D replicas of a zb pipeline equal eager PyTorch on the concatenation of their batches.

In one process (no process group) the replicas run one after another on D parts of the batch (fast, every
loss form); under torchrun with 4 processes, 2 replicas x 2 pipeline ranks (tests/distributed/data_parallel_check.py).
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F

import zb
from tests import models
from tests.helpers import assert_matches_eager
from tests.optim_check import OPTIMIZERS, assert_same_training, train_both
from tests.test_pipeline import torchrun
from tests.test_semantics import LOSSES, TokenNet, assert_same_step, padded_batch, run
from zb.schedules import REDUCE, W


REPLICA_LOSSES = ["token-mean cross entropy", "sum", "mean", "token mean plus a mean", "sum over a token count",
                  "sum over the batch size, plus a regulariser"]


@pytest.mark.parametrize("replicas", [2, 4])
@pytest.mark.parametrize("microbatches", [1, 2])
@pytest.mark.parametrize("stages", [1, 2])
@pytest.mark.parametrize("name", REPLICA_LOSSES)
def test_replicas_in_one_process_equal_eager_on_the_whole_batch(name, stages, microbatches, replicas):
    """D replicas x m microbatches split the batch D*m ways: a token mean is normalised by the tokens of every
    replica's batch (the quarters of the padded batch hold 2, 10, 9 and 12 tokens, so a per-replica or
    per-microbatch mean would differ), also with one microbatch per replica."""
    assert_same_step(*run(LOSSES[name], stages, microbatches=microbatches, data_parallel=replicas),
                     f"{name}, {stages} stages, {microbatches} microbatches, {replicas} replicas")


@pytest.mark.parametrize("microbatches", [1, 2])
def test_a_per_replica_token_mean_would_differ(microbatches):
    """The check above is not vacuous: each replica averaging its own tokens gives another loss here."""
    x, y = padded_batch()
    torch.manual_seed(0)
    model = TokenNet()
    loss = LOSSES["token-mean cross entropy"]
    per_replica = torch.stack([loss(model(a), b) for a, b in zip(x.chunk(2), y.chunk(2))]).mean()
    got, want, _, _ = run(loss, 2, microbatches=microbatches, data_parallel=2)
    assert abs(per_replica.item() - got[0].item()) > 1e-3


def test_one_microbatch_per_replica_weighs_the_token_mean_globally():
    """With microbatches=1 the loss is still split over the replicas: the plan weighs the token mean by the
    global token count (a weighted loss), not by each replica's own."""
    x, y = padded_batch()
    torch.manual_seed(0)
    model = TokenNet()
    backend = zb.ZbBackend({"stages": 2, "microbatches": 1, "compiler": "eager", "data_parallel": 2})
    loss_fn = LOSSES["token-mean cross entropy"]
    torch.compile(lambda x, y: loss_fn(model(x), y), backend=backend)(x, y).backward()
    (plan,) = backend.plans
    assert plan.loss.mode == "weighted" and [w[1] for w in plan.loss.weights] == ["ratio"], plan.loss.describe()


@pytest.mark.parametrize("replicas", [2, 4])
@pytest.mark.parametrize("microbatches", [1, 2])
def test_extra_outputs_with_replicas_combine_over_the_whole_batch(microbatches, replicas):
    def loss_fn(o, y):
        ce = F.cross_entropy(o.flatten(0, 1), y.flatten())
        return ce, ce.detach() * 2, o.pow(2).mean(), (y != -100).sum(), o

    got, want, model, reference = run(loss_fn, 2, microbatches=microbatches, data_parallel=replicas)
    assert_same_step(got, want, model, reference,
                     f"extra outputs with {replicas} replicas of {microbatches} microbatches")


@pytest.mark.parametrize("factory", ["tied_embedding", "mlp_input_grad", "gpt"])
def test_replicas_with_tied_weights_and_input_gradients(factory):
    make = {"tied_embedding": models.tied_embedding, "gpt": models.gpt,
            "mlp_input_grad": lambda: models.mlp(x_requires_grad=True)}[factory]
    assert_matches_eager(make, stages=2, microbatches=2, data_parallel=2, compiler="eager")


@pytest.mark.parametrize("post_validation", [True, False])
def test_replicas_with_the_fused_optimizer_equal_synchronous_training(post_validation):
    """20 SGD steps (clipped, skipped and plain ones) with 2 replicas of a 2-stage pipeline in one process."""
    model, opt, ref_model, ref_opt, did, _ = train_both("sgd", {
        "stages": 2, "microbatches": 2, "compiler": "eager", "data_parallel": 2, "post_validation": post_validation})
    assert {"plain", "clipped", "skipped"} <= set(did)
    assert_same_training(model, opt, ref_model, ref_opt, f"2 replicas, post_validation={post_validation}")


def test_the_lowered_schedule_reduces_each_stage_right_after_its_last_w():
    torch.manual_seed(0)
    model, args = models.deep_mlp()
    backend = zb.ZbBackend({"stages": 2, "microbatches": 4, "compiler": "eager", "data_parallel": 2,
                            "schedule": "zb-h1"})
    torch.compile(model, backend=backend)(*args).backward()
    lowered = backend.runners[0].executor.schedule
    for rank, actions in enumerate(lowered.actions):
        reduces = [i for i, a in enumerate(actions) if a.kind == REDUCE]
        assert [actions[i].stage for i in reduces] == [rank], lowered.text()
        last_w = max(i for i, a in enumerate(actions) if a.kind == W)
        assert reduces[0] > last_w and all(a.kind != W for a in actions[reduces[0]:]), lowered.text()


def test_batch_not_divisible_by_replicas_times_microbatches_is_a_clear_error():
    torch.manual_seed(0)
    model, (x, y) = models.mlp()
    step = torch.compile(model, backend="zb", options={"compiler": "eager", "data_parallel": 3, "microbatches": 2})
    with pytest.raises(Exception, match=r"batch size 8, which data_parallel=3 replicas of microbatches=2 do not "
                                        r"divide; use a batch size that is a multiple of 6"):
        step(x, y)


@pytest.mark.parametrize("options, message", [
    ({"shard_optimizer": True}, "'shard_optimizer' needs option 'optimizer'"),
    ({"shard_optimizer": True, "optimizer": "sgd"}, "set 'data_parallel'"),
    ({"data_parallel": 0}, "'data_parallel' must be a positive int"),
    ({"mesh": "dp,pp"}, "'mesh' takes a torch.distributed DeviceMesh"),
])
def test_data_parallel_options_are_checked(options, message):
    if options.get("optimizer") == "sgd":
        options = {**options, "optimizer": OPTIMIZERS["sgd"](models.MLP().parameters())}
    with pytest.raises(zb.ZbOptionError, match=message):
        zb.ZbBackend(options)


# Under torchrun: 4 processes, 2 replicas x 2 pipeline ranks -----------------------------------------------------
def _ok(out) -> list[str]:
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    return [line.split()[1] for line in out.stdout.splitlines() if line.startswith("ok ")]


def test_torchrun_two_replicas_of_two_ranks_equal_eager_on_the_global_batch():
    """GPT tiny and an MLP, schedules 1f1b, zb-h1, zb-v, zb-auto; one case through a user-built DeviceMesh."""
    cases = ["gpt:1f1b", "gpt:zb-h1", "gpt:zb-v", "gpt:zb-auto", "mlp:1f1b", "mlp:zb-h1:mesh", "mlp:zb-v",
             "mlp:zb-auto"]
    assert _ok(torchrun(4, "data_parallel_check.py", "--replicas", "2", "--cases", ",".join(cases))) == cases


def test_torchrun_every_loss_form_with_one_or_two_microbatches_per_replica():
    """TokenNet on the padded batch (replica 0's rows hold 12 tokens, replica 1's 21): every loss form and extra
    outputs equal eager's on the global batch with microbatches=1 (each process's graph is Dynamo's own) and 2;
    and the MLP and GPT for 3 SGD steps with one microbatch per replica."""
    forms = ["tokenmean", "sum", "mean", "tokenmean+mean", "sumovercount", "sumoverbatch", "extra"]
    cases = [f"loss:{form}:{m}" for m in (1, 2) for form in forms] + ["mlp:1f1b:m1", "gpt:1f1b:m1"]
    assert _ok(torchrun(4, "data_parallel_check.py", "--replicas", "2", "--cases", ",".join(cases))) == cases


def test_torchrun_four_replicas_of_one_rank_with_one_microbatch():
    """4 processes, each a whole replica of 2 rows (2, 10, 9 and 12 tokens) in one microbatch: the global batch
    graph is traced at 4 times this process's batch."""
    cases = ["loss:tokenmean:1", "loss:sumoverbatch:1", "loss:extra:1"]
    assert _ok(torchrun(4, "data_parallel_check.py", "--replicas", "4", "--cases", ",".join(cases))) == cases


def test_torchrun_replicas_with_the_fused_optimizer_and_sharded_state():
    """20 SGD steps with clipping and non-finite steps: post-validation on and off, optimizer state sharded over
    the replicas or not (sharded: each parameter's optimizer state lives in one replica); the GPT's tied head and
    embedding, updated on both pipeline ranks, with sharded state and post-validation."""
    cases = ["opt:sgd:1f1b:0:0", "opt:sgd:zb-h1:1:0", "opt:sgd:zb-h1:1:1", "opt:sgd:zb-v:0:1", "opt:sgd:zb-auto:1:1",
             "optgpt:sgd:zb-v:1:1"]
    assert _ok(torchrun(4, "data_parallel_check.py", "--replicas", "2", "--cases", ",".join(cases))) == cases


def test_torchrun_replica_errors_and_a_dead_rank():
    assert _ok(torchrun(4, "data_parallel_check.py", "--replicas", "2", "--cases", "errors")) == ["errors"]
    out = torchrun(4, "data_parallel_check.py", "--replicas", "2", "--cases", "dead-rank", timeout=120)
    # The processes share torchrun's stdout, so two ranks' lines may run together: find each report in the text.
    caught = re.findall(r"caught on rank (\d) after ([\d.]+) s: (.*?)A rank died or is stuck", out.stdout)
    assert sorted(rank for rank, _, _ in caught) == ["0", "1", "2"], out.stdout[-3000:] + out.stderr[-3000:]
    for rank, seconds, message in caught:
        assert float(seconds) < 30 and "global rank" in message, (rank, seconds, message)
    assert out.returncode == 0 and "terminate called" not in out.stderr, out.stderr[-3000:]  # a clean shutdown


@pytest.mark.inductor
def test_replicas_through_inductor():
    assert_matches_eager(models.gpt, stages=2, microbatches=2, data_parallel=2, schedule="zb-h1")


def _token_mean_and_extras(o, y):
    ce = F.cross_entropy(o.flatten(0, 1), y.flatten())
    return ce, ce.detach() * 2, o.pow(2).mean(), (y != -100).sum(), o


def _token_step(x, y, microbatches, replicas):
    """TokenNet's token-mean step through zb (2 stages, `microbatches` x `replicas` in one process) and in eager,
    from the same weights: (zb's model, eager's model, zb's outputs, eager's outputs)."""
    torch.manual_seed(0)
    model = TokenNet()
    reference = copy.deepcopy(model)
    options = {"stages": 2, "microbatches": microbatches, "compiler": "eager"}
    backend = zb.ZbBackend(options if replicas == 1 else {**options, "data_parallel": replicas})
    got = torch.compile(lambda x, y: _token_mean_and_extras(model(x), y), backend=backend)(x, y)
    return model, reference, got, _token_mean_and_extras(reference(x), y)


@pytest.mark.parametrize("empty_rows", [2, 4])
@pytest.mark.parametrize("microbatches, replicas", [(4, 1), (2, 2), (1, 4), (1, 2)])
def test_a_part_with_no_tokens_adds_nothing_as_a_microbatch_or_a_replica(microbatches, replicas, empty_rows):
    """The batch's first rows hold no token (every label -100), so a microbatch or a replica (or both) has nothing
    to count; the whole batch still has tokens. Eager's token mean ignores such a part, and so must the step's loss,
    its token-mean extra output (a part's own mean is 0/0 there) and every gradient, whichever way the batch is
    split: microbatches and replicas combine their outputs by the same rules."""
    x, y = padded_batch()
    y[:empty_rows] = -100
    model, reference, got, want = _token_step(x, y, microbatches, replicas)
    got[0].backward()
    want[0].backward()
    assert all(bool(torch.isfinite(v).all()) for v in want[:3])
    assert_same_step(got, want, model, reference,
                     f"{empty_rows} rows without tokens, {replicas} replicas of {microbatches} microbatches")


@pytest.mark.parametrize("microbatches, replicas", [(4, 1), (2, 2), (1, 4)])
def test_a_batch_with_no_tokens_at_all_is_nan_as_in_eager(microbatches, replicas):
    """No part has a token: eager's token mean is 0/0, NaN, and so is the step's (not 0 from one way of splitting)."""
    x, y = padded_batch()
    y[:] = -100
    _, _, got, want = _token_step(x, y, microbatches, replicas)
    for j in (0, 1):
        assert bool(torch.isnan(want[j])) and bool(torch.isnan(got[j])), (j, got[j], want[j])
