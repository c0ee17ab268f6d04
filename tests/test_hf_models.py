"""Real models: Hugging Face transformers families (tests/hf_models.py), dense and mixture-of-experts, as 2- and
4-stage zb pipelines in one process, and Llama and Mixtral across 2 ranks, against eager PyTorch: the loss and every
gradient (compiler="eager"). Mixtral's router aux loss: refused by default, per microbatch on request."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.helpers import assert_close

hf_models = pytest.importorskip("tests.hf_models", reason="transformers is in the test extra")


def _assert_pipeline_equals_eager(build, family, stages):
    torch.manual_seed(0)
    model = build()
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


@pytest.mark.parametrize("stages", [2, 4])
@pytest.mark.parametrize("family", sorted(hf_models.FAMILIES))
def test_hf_family_through_a_pipeline_equals_eager(family, stages):
    _assert_pipeline_equals_eager(hf_models.FAMILIES[family], family, stages)


# Every MoE family at 2 stages; at 4 stages (a stage boundary inside a layer, between routing and experts) only
# Mixtral and Qwen2-MoE (shared expert), to keep the suite short.
MOE_CASES = [(family, 2) for family in sorted(hf_models.MOE_FAMILIES)] + [("mixtral", 4), ("qwen2_moe", 4)]


@pytest.mark.parametrize(("family", "stages"), MOE_CASES, ids=[f"{f}-{s}" for f, s in MOE_CASES])
def test_hf_moe_family_through_a_pipeline_equals_eager(family, stages):
    """Routing (top-k over experts), grouped_mm experts and the inverse permutation are per token: exact."""
    _assert_pipeline_equals_eager(hf_models.MOE_FAMILIES[family], family, stages)


def test_torchrun_llama_and_mixtral_on_two_ranks_equal_eager():
    from tests.test_pipeline import torchrun

    out = torchrun(2, "hf_check.py", timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    assert "ok llama" in out.stdout
    assert "ok mixtral" in out.stdout


def _mixtral_with_aux_loss():
    """Mixtral with its router aux loss on, and the loss a training script writes with it."""
    import torch.nn.functional as F
    import transformers as T

    torch.manual_seed(0)
    model = hf_models._decoder(T.MixtralConfig, T.MixtralForCausalLM, num_key_value_heads=2, num_local_experts=4,
                               num_experts_per_tok=2, router_aux_loss_coef=0.02)()
    # transformers installs the hooks that collect router logits on the first call, under a threading lock Dynamo
    # cannot trace (a graph break): install them outside the compiled region.
    with torch.no_grad():
        model(input_ids=torch.ones(1, 4, dtype=torch.long), output_router_logits=True)

    def loss_fn(m, input_ids, labels):
        out = m(input_ids=input_ids, output_router_logits=True)
        return F.cross_entropy(out.logits.flatten(0, 1), labels.flatten()) + 0.02 * out.aux_loss

    return model, loss_fn


def test_mixtral_aux_loss_is_refused_by_default():
    """The load-balancing loss counts tokens per expert over the whole batch (histc): no microbatch split gives it."""
    import zb

    model, loss_fn = _mixtral_with_aux_loss()
    input_ids, labels = hf_models.batch()
    step = torch.compile(lambda x, y: loss_fn(model, x, y), backend="zb",
                         options={"stages": 2, "microbatches": 4, "compiler": "eager"})
    with pytest.raises(zb.ZbError, match=r"(?s)(?=.*aux_loss)(?=.*per_microbatch)"):
        step(input_ids, labels)


def test_mixtral_aux_loss_per_microbatch_equals_eager_per_microbatch():
    """options aux_loss='per_microbatch': the cross entropy over the whole batch (padded labels: zb weighs each
    microbatch by its share of the batch's tokens) plus 0.02 x the mean over the 4 microbatches of the aux loss
    eager computes on each microbatch alone (Megatron's semantics)."""
    model, loss_fn = _mixtral_with_aux_loss()
    reference = copy.deepcopy(model)
    input_ids, labels = hf_models.batch()
    step = torch.compile(lambda x, y: loss_fn(model, x, y), backend="zb",
                         options={"stages": 2, "microbatches": 4, "compiler": "eager", "aux_loss": "per_microbatch"})
    loss = step(input_ids, labels)
    loss.backward()
    cross_entropy = hf_models.loss_fn(reference, input_ids, labels)
    aux = torch.stack([reference(input_ids=chunk, output_router_logits=True).aux_loss
                       for chunk in input_ids.chunk(4)]).mean()
    whole_batch_aux = reference(input_ids=input_ids, output_router_logits=True).aux_loss.detach()
    assert not torch.allclose(aux.detach(), whole_batch_aux), "the test needs microbatches whose aux loss differs"
    expected = cross_entropy + 0.02 * aux
    expected.backward()
    assert_close(loss.detach(), expected.detach(), "loss")
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert_close(p.grad, q.grad, f"grad of {name}")


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
