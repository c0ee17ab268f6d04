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


def test_gpt2_s_own_loss_breaks_the_graph_and_the_error_says_what_to_write():
    """GPT-2 with labels computes its loss in `self.loss_function`, which Dynamo cannot trace in one graph."""
    import transformers as T

    config = T.GPT2Config(vocab_size=hf_models.VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32)
    model = T.GPT2LMHeadModel(config).train()
    input_ids, labels = hf_models.batch()
    step = torch.compile(lambda x, y: model(input_ids=x, labels=y).loss, backend="zb",
                         options={"stages": 2, "microbatches": 4, "compiler": "eager"})
    with pytest.raises(Exception, match=r"(?s)inside a loss function.*logits = model\(input_ids=input_ids\).logits"):
        step(input_ids, labels)
