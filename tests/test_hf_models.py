"""Real models: Hugging Face transformers families (tests/hf_models.py) as 2- and 4-stage zb pipelines in one
process, and Llama across 2 ranks, against eager PyTorch: the loss and every gradient (compiler="eager")."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.helpers import assert_close

hf_models = pytest.importorskip("tests.hf_models", reason="transformers is in the test extra")


@pytest.mark.parametrize("stages", [2, 4])
@pytest.mark.parametrize("family", sorted(hf_models.FAMILIES))
def test_hf_family_through_a_pipeline_equals_eager(family, stages):
    torch.manual_seed(0)
    model = hf_models.FAMILIES[family]()
    reference = copy.deepcopy(model)
    input_ids, labels = hf_models.batch()
    step = torch.compile(lambda x, y: hf_models.loss_fn(model, x, y), backend="zb",
                         options={"stages": stages, "microbatches": 4, "compiler": "eager"})
    loss = step(input_ids, labels)
    loss.backward()
    expected = hf_models.loss_fn(reference, input_ids, labels)
    expected.backward()
    assert_close(loss.detach(), expected.detach(), f"{family}, {stages} stages: loss")
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert_close(p.grad, q.grad, f"{family}, {stages} stages: grad of {name}")


def test_torchrun_llama_on_two_ranks_equals_eager():
    from tests.test_pipeline import torchrun

    out = torchrun(2, "hf_check.py", timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    assert "ok llama" in out.stdout
