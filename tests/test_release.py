"""Released tensors (runtime/released.py): on a pipeline rank, the parameters and buffers only other ranks read are
freed; the object stays (shape, dtype, device), any read of its values outside zb is a ZbError naming the owner.
The torchrun test checks the bytes each rank holds, training against eager, evaluation, state dicts and a
checkpoint with the release on (and the bytes with it off)."""

import copy

import pytest
import torch

import zb
from tests.test_pipeline import torchrun
from zb.runtime.released import is_released, release, restore, zb_internal


def test_a_released_parameter_keeps_its_metadata_and_refuses_reads():
    layer = torch.nn.Linear(4, 3)
    weight = layer.weight
    assert release(weight, "pipeline rank 1 (stage 1)") == 4 * 3 * 4
    assert layer.weight is weight and is_released(weight) and isinstance(weight, torch.nn.Parameter)
    assert weight.shape == (3, 4) and weight.dtype == torch.float32 and weight.requires_grad and weight.grad is None
    for read in (lambda: weight + 1, lambda: weight.sum(), lambda: str(weight), lambda: copy.deepcopy(layer),
                 lambda: layer(torch.randn(2, 4)), lambda: weight.data, lambda: layer.to(torch.float64),
                 lambda: layer.state_dict()["weight"] * 2):
        with pytest.raises(zb.ZbError, match=r"pipeline rank 1 \(stage 1\) holds and trains it"):
            read()
    assert {weight} and weight in {weight}  # hashing (optimizers keep parameters in sets)
    with zb_internal():
        assert weight.untyped_storage().nbytes() == 0
    restore(weight)
    assert not is_released(weight) and type(weight) is torch.nn.Parameter
    with torch.no_grad():
        weight.fill_(2.0)
    assert layer(torch.ones(1, 4)).sub(layer.bias).eq(8.0).all()


def test_a_released_buffer():
    norm = torch.nn.BatchNorm1d(3)
    mean = norm.running_mean
    release(mean, "pipeline rank 0")
    assert is_released(mean) and not isinstance(mean, torch.nn.Parameter) and mean.shape == (3,)
    with pytest.raises(zb.ZbError, match="pipeline rank 0"):
        mean.clone()
    restore(mean)
    assert type(mean) is torch.Tensor and mean.zero_().sum() == 0


@pytest.mark.parametrize("release_option", [True, False])
def test_torchrun_each_rank_holds_only_its_own_stages(release_option):
    out = torchrun(2, "release_check.py", *([] if release_option else ["--no-release"]))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    lines = sorted(line.split() for line in out.stdout.splitlines() if line.startswith("ok release"))
    assert len(lines) == 2, out.stdout
    for _, _, _rank, held, own, total in lines:
        # Each rank's parameters and buffers: exactly its own stages' bytes (all of them with release=False).
        assert int(held) == (int(own) if release_option else int(total)), lines
        assert int(own) < int(total)
