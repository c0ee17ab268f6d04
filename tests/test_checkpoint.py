"""Checkpoints: zb.save_checkpoint / zb.load_checkpoint resume exactly, in any layout, and fail clearly.

In one process (fast): resume is bit-identical for SGD and AdamW, with the optimizer outside or inside zb; the
re-planned schedule is restored; wrong model, optimizer or directory are clear errors; a crash between moving the
old checkpoint aside and the new one in leaves the old one loadable. Under torchrun (tests/distributed/
checkpoint_check.py, 2 ranks): save with one schedule, resume with another, in one process, into plain eager,
from zb-v's two stages per rank into one; a rank dying in the middle of a save; a rank dying mid-step and the
example script's --resume finishing with the uninterrupted run's final loss.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import pathlib
import subprocess
import sys

import pytest
import torch

import zb
from tests import models
from tests.distributed.checkpoint_check import batch as token_batch
from tests.test_pipeline import ROOT, launch, torchrun
from zb.schedules import Schedule, generate

OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1),
}


def batch(step: int):
    generator = torch.Generator().manual_seed(step)
    return torch.randn(8, 16, generator=generator), torch.randn(8, 16, generator=generator)


def train(model, kind: str, steps: range, inside: bool, save=None, load=None, schedule="zb-auto", save_at=None):
    """Train `model` over `steps` (the batch of step i is batch(i)), saving to `save` after step `save_at` (default:
    the last); returns (losses, optimizer, backend)."""
    torch._dynamo.reset()
    optimizer = OPTIMIZERS[kind](model.parameters())
    options = {"stages": 2, "microbatches": 4, "compiler": "eager", "schedule": schedule}
    if inside:
        options.update(optimizer=optimizer, max_grad_norm=0.5)
    backend = zb.ZbBackend(options)
    step_fn = torch.compile(model, backend=backend)
    if load is not None:
        zb.load_checkpoint(load, model, optimizer)
    losses = []
    for i in steps:
        loss = step_fn(*batch(i))
        if not inside:
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        losses.append(loss.item())
        if save is not None and i + 1 == (save_at or steps.stop):
            zb.save_checkpoint(save, model, optimizer, step=i + 1)
    return losses, optimizer, backend


@pytest.mark.parametrize("inside", [False, True], ids=["optimizer-outside", "optimizer-inside"])
@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_resume_is_bit_identical_to_training_without_stopping(kind, inside, tmp_path):
    """6 steps saving after the 3rd (zb-auto has re-planned on its measured costs by then) vs a fresh model and
    optimizer loading that checkpoint and running steps 4-6: the same losses and parameters bit for bit (inside:
    post-validation and clipping at max_grad_norm 0.5, with rolled-back steps)."""
    torch.manual_seed(0)
    model = models.DeepMLP()
    second = copy.deepcopy(model)
    whole, _, _ = train(model, kind, range(6), inside, save=tmp_path / "ckpt", save_at=3)
    after, optimizer, _ = train(second, kind, range(3, 6), inside, load=tmp_path / "ckpt")
    assert after == whole[3:]
    for (name, p), q in zip(model.named_parameters(), second.parameters()):
        assert torch.equal(p, q), name


def scaled_training(model, steps: range, save=None, load=None, save_at=None):
    """float16 autocast, SGD and a GradScaler inside zb's step (tests/optim_check.py's batches: overflows at steps
    3 and 6); returns (losses, the scaler's state after each step)."""
    from tests.optim_check import scaled_batches

    torch._dynamo.reset()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**14, growth_interval=3)
    step_fn = torch.compile(model, backend=zb.ZbBackend({"stages": 2, "microbatches": 2, "compiler": "eager",
                                                         "optimizer": optimizer, "grad_scaler": scaler,
                                                         "max_grad_norm": 0.26}))
    if load is not None:
        zb.load_checkpoint(load, model, optimizer, grad_scaler=scaler)
    losses, states, data = [], [], scaled_batches()
    for i in steps:
        with torch.autocast("cpu", dtype=torch.float16):
            losses.append(step_fn(*data[i]).item())
        states.append(scaler.state_dict())
        if save is not None and i + 1 == save_at:
            zb.save_checkpoint(save, model, optimizer, grad_scaler=scaler)
    return losses, states


def test_resume_with_loss_scaling_continues_the_scale(tmp_path):
    """The loss scale and its growth tracker are part of a checkpoint (grad_scaler=): 10 float16 steps saving after
    the 5th (after a backoff, mid-way to a growth) vs a fresh model, optimizer and scaler resuming from it: the
    same losses, scale trajectory and parameters bit for bit. Loading without saving it is a clear error."""
    torch.manual_seed(0)
    model = models.DeepMLP()
    second = copy.deepcopy(model)
    whole, states = scaled_training(model, range(10), save=tmp_path / "ckpt", save_at=5)
    assert len({s["scale"] for s in states}) > 2 and states[4]["_growth_tracker"] > 0, states
    after, resumed = scaled_training(second, range(5, 10), load=tmp_path / "ckpt")
    assert after == whole[5:] and resumed == states[5:]
    for (name, p), q in zip(model.named_parameters(), second.parameters()):
        assert torch.equal(p, q), name
    assert json.loads((tmp_path / "ckpt" / "zb.json").read_text())["grad_scaler"] == states[4]
    zb.save_checkpoint(tmp_path / "plain", model)
    with pytest.raises(zb.ZbError, match="saved without grad_scaler="):
        zb.load_checkpoint(tmp_path / "plain", model, grad_scaler=torch.amp.GradScaler("cpu"))


def test_resume_restores_the_schedule_instead_of_replanning(tmp_path):
    """zb-auto re-plans on measured costs; a resumed run must run the schedule the saved run had reached."""
    torch.manual_seed(0)
    model = models.DeepMLP()
    fresh = copy.deepcopy(model)
    _, _, backend = train(model, "sgd", range(3), False)
    runner = backend.runners[0]
    other = generate("1f1b", 2, 4)  # stands for a re-planned schedule, distinct from zb-auto's first plan
    assert other.actions != runner.schedule.actions
    runner.install(Schedule("zb-auto", 4, other.placement, other.actions))
    zb.save_checkpoint(tmp_path / "ckpt", model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
    _, _, resumed = train(fresh, "sgd", range(3, 4), False, load=tmp_path / "ckpt")
    assert resumed.runners[0].schedule.actions == other.actions
    assert resumed.runners[0].steps == 4


def test_plain_pytorch_loads_a_zb_checkpoint_and_zb_loads_a_plain_one(tmp_path):
    torch.manual_seed(0)
    model = models.DeepMLP()
    _, optimizer, _ = train(model, "adamw", range(2), False, save=tmp_path / "zb")
    plain = models.DeepMLP()
    plain_optimizer = OPTIMIZERS["adamw"](plain.parameters())
    assert zb.load_checkpoint(tmp_path / "zb", plain, plain_optimizer) == {"step": 2}
    for p, q in zip(model.parameters(), plain.parameters()):
        assert torch.equal(p, q)
        for key, value in optimizer.state[p].items():
            assert torch.equal(value, plain_optimizer.state[q][key]), key
    zb.save_checkpoint(tmp_path / "plain", plain, plain_optimizer)  # never compiled: saved whole
    again = models.DeepMLP()
    zb.load_checkpoint(tmp_path / "plain", again)
    assert all(torch.equal(p, q) for p, q in zip(plain.parameters(), again.parameters()))


def test_wrong_model_optimizer_or_directory_are_clear_errors(tmp_path):
    torch.manual_seed(0)
    model = models.DeepMLP()
    train(model, "sgd", range(1), False, save=tmp_path / "ckpt")
    with pytest.raises(zb.ZbError, match=r"does not fit this model: .*not in the checkpoint.*Load it into the model"):
        zb.load_checkpoint(tmp_path / "ckpt", models.MLP())
    wider = models.DeepMLP()
    with torch.no_grad():
        wider.layers[0].weight = torch.nn.Parameter(torch.zeros(16, 8))
    with pytest.raises(zb.ZbError, match=r"layers.0.weight: shape \[16, 16\] in the checkpoint, \[16, 8\] in this"):
        zb.load_checkpoint(tmp_path / "ckpt", wider)
    with pytest.raises(zb.ZbError, match="holds the state of a SGD optimizer, not of a AdamW"):
        zb.load_checkpoint(tmp_path / "ckpt", model, OPTIMIZERS["adamw"](model.parameters()))
    with pytest.raises(zb.ZbError, match="no checkpoint at .*missing: the directory does not exist"):
        zb.load_checkpoint(tmp_path / "missing", model)
    (tmp_path / "empty").mkdir()
    with pytest.raises(zb.ZbError, match="is not a zb checkpoint"):
        zb.load_checkpoint(tmp_path / "empty", model)


def test_a_save_interrupted_between_the_two_renames_leaves_the_previous_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = models.DeepMLP()
    train(model, "sgd", range(2), False, save=tmp_path / "ckpt")
    (tmp_path / "ckpt").rename(tmp_path / ".ckpt.old")  # the crash: the old one moved aside, the new one not in
    (tmp_path / ".ckpt.partial").mkdir()
    assert zb.checkpoint_exists(tmp_path / "ckpt")
    said = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())
    logging.getLogger("zb").addHandler(handler)
    try:
        assert zb.load_checkpoint(tmp_path / "ckpt", models.DeepMLP())["step"] == 2
    finally:
        logging.getLogger("zb").removeHandler(handler)
    assert any("loading the previous one" in line for line in said), said


def test_zb_checkpoint_command_lists_what_a_checkpoint_holds(tmp_path):
    torch.manual_seed(0)
    train(models.DeepMLP(), "adamw", range(3), True, save=tmp_path / "ckpt")
    out = subprocess.run([sys.executable, "-m", "zb", "checkpoint", str(tmp_path / "ckpt")], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "zb checkpoint at step 3" in out.stdout and "pipeline: 2 stages, schedule zb-auto" in out.stdout
    assert "optimizer: AdamW" in out.stdout and "model parameters and buffers" in out.stdout
    info = json.loads(subprocess.run([sys.executable, "-m", "zb", "checkpoint", str(tmp_path / "ckpt"), "--json"],
                                     cwd=ROOT, capture_output=True, text=True).stdout)
    assert info["entries"]["model"][0] == len(models.DeepMLP().state_dict())


# Under torchrun ---------------------------------------------------------------------------------------------------
def _run(tmp_path: pathlib.Path, name: str, *args: str, ranks: int = 2, agent: bool = True):
    out_file = tmp_path / f"{name}.pt"
    if not agent:  # a rank dies on purpose: see tests.test_pipeline.launch
        out = launch(ranks, ROOT / "tests" / "distributed" / "checkpoint_check.py", *args, "--out", str(out_file))
    elif ranks == 1:
        env_args = [sys.executable, str(ROOT / "tests" / "distributed" / "checkpoint_check.py")]
        out = subprocess.run([*env_args, *args, "--out", str(out_file)], cwd=ROOT, capture_output=True, text=True,
                             timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    else:
        out = torchrun(ranks, "checkpoint_check.py", *args, "--out", str(out_file))
    return out, out_file


def test_torchrun_checkpoints_reshard_across_schedules_processes_and_plain_eager(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    out, whole = _run(tmp_path, "whole", "--schedule", "zb-h1", "--steps", "6", "--save-at", "3", "--save", ckpt)
    assert out.returncode == 0, out.stderr[-4000:]
    whole = torch.load(whole)
    # The same layout, another schedule, one process with 2 stages: the same losses bit for bit; parameters equal
    # (one process sums the tied weight's two gradient parts in another order: last-bit differences).
    for name, args in [("1f1b", ["--schedule", "1f1b"]), ("one-process", ["--schedule", "zb-h1", "--stages", "2"])]:
        out, result = _run(tmp_path, name, *args, "--steps", "6", "--load", ckpt,
                           ranks=1 if name == "one-process" else 2)
        assert out.returncode == 0, out.stderr[-4000:]
        result = torch.load(result)
        assert result["start"] == 3 and result["losses"] == {k: v for k, v in whole["losses"].items() if k >= 3}, name
        for key, value in whole["state"].items():
            torch.testing.assert_close(result["state"][key], value, rtol=0, atol=1e-7, msg=f"{name}: {key}")
    # Plain eager PyTorch: the checkpoint's parameters, then 3 steps of torch.optim with its momentum.
    torch.manual_seed(0)
    model, _ = models.gpt()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    assert zb.load_checkpoint(ckpt, model, optimizer)["step"] == 3
    for step in range(3, 6):
        loss = model(*token_batch(step))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        assert abs(loss.item() - whole["losses"][step]) < 1e-5, (step, loss.item(), whole["losses"][step])


def test_torchrun_two_stages_per_rank_resume_with_one(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    out, whole = _run(tmp_path, "zbv", "--schedule", "zb-v", "--steps", "5", "--save-at", "3", "--save", ckpt)
    assert out.returncode == 0, out.stderr[-4000:]
    out, resumed = _run(tmp_path, "h1", "--schedule", "zb-h1", "--steps", "5", "--load", ckpt)
    assert out.returncode == 0, out.stderr[-4000:]
    whole, resumed = torch.load(whole), torch.load(resumed)
    assert resumed["losses"] == {k: v for k, v in whole["losses"].items() if k >= 3}
    for key, value in whole["state"].items():
        torch.testing.assert_close(resumed["state"][key], value, rtol=0, atol=1e-7, msg=key)


def test_torchrun_a_rank_dying_during_a_save_leaves_the_previous_checkpoint(tmp_path):
    ckpt = tmp_path / "ckpt"
    out, _ = _run(tmp_path, "dies", "--schedule", "zb-h1", "--steps", "6", "--save-at", "2,4", "--die-in-save",
                  "--save", str(ckpt), agent=False)
    assert out.returncode != 0
    assert "writing checkpoint" in out.stderr and "previous checkpoint" in out.stderr, out.stderr[-3000:]
    torch.manual_seed(0)
    model, _ = models.gpt()
    assert zb.load_checkpoint(ckpt, model)["step"] == 2


def test_torchrun_a_lost_rank_and_resume_finish_with_the_uninterrupted_loss(tmp_path):
    """examples/train_gpt.py: the last rank exits at step 5; the other raises a ZbError naming it within the
    timeout; running the command again (--resume) finishes from the step-4 checkpoint with the final loss of a run
    that never stopped. (torchrun --max-restarts does the same rerun, but its restarted gloo workers sometimes
    failed to connect on this machine: torch's agent store, before any zb code runs.)"""
    common = ["--preset", "tiny", "--compiler", "eager", "--steps", "6", "--corpus-mb", "0.5", "--batch-size", "8",
              "--microbatches", "4", "--log-every", "2", "--json", "--timeout", "10", "--schedule", "zb-h1"]

    def run(*extra: str):  # without torchrun's agent, which would kill the survivor (tests.test_pipeline.launch)
        return launch(2, ROOT / "examples" / "train_gpt.py", *common, *extra, cwd=tmp_path)

    whole = run()
    assert whole.returncode == 0, whole.stderr[-3000:]
    expected = json.loads(whole.stdout.strip().splitlines()[-1])["final_loss"]
    lost = run("--save-every", "2", "--resume", "--fail-at-step", "5", "--checkpoint", "ck")
    assert lost.returncode != 0 and "exiting at step 5" in lost.stdout
    assert "ZbError: pipeline peer rank 1 failed" in lost.stderr, lost.stderr[-3000:]
    resumed = run("--save-every", "2", "--resume", "--checkpoint", "ck")  # the same command, run again
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-8000:]
    assert "resumed from ck at step 4" in resumed.stdout
    assert json.loads(resumed.stdout.strip().splitlines()[-1])["final_loss"] == expected
