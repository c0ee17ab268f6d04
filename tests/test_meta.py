"""Models built on the meta device (zb/materialize.py): zb.defer, then option 'init' gives the held tensors values
after planning; against the same model materialised eagerly with the same values.

In one process every tensor is held, so the whole model is filled; tests/distributed/meta_check.py runs 2 ranks,
where each fills only its own stages' tensors.
"""

import copy
import json

import pytest
import torch

import zb
from examples.gpt import GPT, PRESETS
from tests.helpers import assert_close, assert_grads_match
from tests.models import MLP
from zb.runtime.released import is_released


def _batch(length=16, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (8, length), generator=generator),
            torch.randint(0, 256, (8, length), generator=generator))


def _meta_gpt():
    with torch.device("meta"):
        return GPT(PRESETS["tiny"])


def _check(init, stages, reference):
    model = zb.defer(_meta_gpt(), "cpu")
    assert all(is_released(p) for p in model.parameters())
    step = torch.compile(model, backend=zb.ZbBackend({"stages": stages, "microbatches": 2, "compiler": "eager",
                                                       "schedule": "1f1b" if stages > 1 else "zb-auto",
                                                       "init": init}))
    ids, labels = _batch()
    loss = step(ids, labels)
    assert not any(is_released(t) for t in [*model.parameters(), *model.buffers()])
    loss.backward()
    expected = reference(ids, labels)
    expected.backward()
    assert_close(loss, expected, "loss")
    assert_grads_match(model, reference)
    return model


@pytest.mark.parametrize("stages", [1, 2, 4])
def test_reset_parameters_gives_what_zb_initialize_gives(stages):
    reference = zb.initialize(GPT(PRESETS["tiny"]), "reset_parameters", seed=0)
    _check("reset_parameters", stages, reference)


def init_gpt(module):
    """GPT's own init, plus the LayerNorms (whose ones and zeros __init__ wrote, lost on the meta device)."""
    GPT._init(module)
    if isinstance(module, torch.nn.LayerNorm):
        module.reset_parameters()


def test_a_callable_init_and_the_seed():
    reference = zb.initialize(GPT(PRESETS["tiny"]), init_gpt, seed=0)
    model = _check(init_gpt, 2, reference)
    other = zb.initialize(GPT(PRESETS["tiny"]), init_gpt, seed=1)
    assert not torch.equal(other.tok_emb.weight, reference.tok_emb.weight)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(p, q), name  # the same values, not only the same gradients


def test_a_state_dict():
    torch.manual_seed(3)
    reference = GPT(PRESETS["tiny"])
    _check(copy.deepcopy(reference.state_dict()), 2, reference)


def test_a_callable_that_leaves_tensors_unwritten():
    step = torch.compile(zb.defer(_meta_gpt(), "cpu"), backend=zb.ZbBackend(
        {"stages": 2, "microbatches": 2, "compiler": "eager", "init": GPT._init}))  # the LayerNorms forgotten
    with pytest.raises(zb.ZbOptionError, match=r"left 10 tensors .*without values.*blocks.0.ln1.weight"):
        step(*_batch())


def test_a_meta_model_without_init_names_the_ways():
    model = zb.defer(_meta_gpt(), "cpu")
    step = torch.compile(model, backend=zb.ZbBackend({"stages": 2, "microbatches": 2, "compiler": "eager"}))
    with pytest.raises(zb.ZbOptionError, match="reset_parameters.*init.*fn.*state_dict"):
        step(*_batch())


def test_a_state_dict_missing_keys_or_with_a_wrong_shape():
    state = GPT(PRESETS["tiny"]).state_dict()
    missing = {k: v for k, v in state.items() if not k.startswith("ln_f")}
    step = torch.compile(zb.defer(_meta_gpt(), "cpu"), backend=zb.ZbBackend(
        {"stages": 2, "microbatches": 2, "compiler": "eager", "init": missing}))
    with pytest.raises(zb.ZbOptionError, match=r"missing \['ln_f.weight', 'ln_f.bias'\].*Nothing was loaded"):
        step(*_batch())
    wrong = dict(state, **{"ln_f.bias": torch.zeros(5)})
    step = torch.compile(zb.defer(_meta_gpt(), "cpu"), backend=zb.ZbBackend(
        {"stages": 2, "microbatches": 2, "compiler": "eager", "init": wrong}))
    with pytest.raises(zb.ZbOptionError, match=r"ln_f.bias: torch.float32\[5\] for torch.float32\[32\]"):
        step(*_batch())


def test_reset_parameters_on_a_module_without_one():
    class Scale(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gain = torch.nn.Parameter(torch.ones(16))

        def forward(self, x, y):
            return torch.nn.functional.mse_loss(x * self.gain, y)

    with torch.device("meta"):
        model = Scale()
    step = torch.compile(zb.defer(model, "cpu"), backend=zb.ZbBackend({"compiler": "eager",
                                                                        "init": "reset_parameters"}))
    with pytest.raises(zb.ZbOptionError, match=r"no reset_parameters\(\): \['Scale'\]"):
        step(torch.randn(4, 16), torch.randn(4, 16))


def test_a_deferred_model_refuses_reads_before_its_first_call():
    model = zb.defer(_meta_gpt(), "cpu")
    with pytest.raises(zb.ZbError, match="meta device and not materialised"):
        model(*_batch())
    plain = MLP()  # a materialised model is untouched by defer
    before = plain.fc1.weight.clone()
    zb.defer(plain, "cpu")
    assert torch.equal(plain.fc1.weight, before) and not is_released(plain.fc1.weight)


@pytest.mark.parametrize("init", ["reset_parameters", "callable", "state_dict"])
def test_torchrun_each_rank_fills_only_its_own_stages(init):
    from tests.test_pipeline import torchrun

    out = torchrun(2, "meta_check.py", "--init", init)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    lines = [line.split() for line in out.stdout.splitlines() if line.startswith("ok meta")]
    assert len(lines) == 2, out.stdout
    for _, _, _rank, held, own, total in lines:
        assert int(held) == int(own) < int(total), lines


def test_torchrun_a_hugging_face_llama_built_on_meta_reads_only_its_stages(tmp_path):
    """meta_check.py --model llama: 2 ranks, the values from a save_pretrained directory; each rank reads exactly
    its own stages' stored tensors (together: all of them), holds only them, and trains with eager's losses and
    gradients for 3 SGD steps."""
    from tests.test_pipeline import torchrun

    out = torchrun(2, "meta_check.py", "--model", "llama", "--init", "safetensors", "--dir", str(tmp_path / "hf"))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    lines = [line.split() for line in out.stdout.splitlines() if line.startswith("ok meta")]
    assert len(lines) == 2, out.stdout
    assert sum(int(line[7]) for line in lines) == int(lines[0][9]), lines  # the files' tensors, read once
    for line in lines:
        assert int(line[3]) == int(line[4]) < int(line[5]), lines


def test_a_zb_checkpoint_or_dcp_directory(tmp_path):
    import torch.distributed.checkpoint as dcp

    import zb.materialize

    torch.manual_seed(4)
    reference = GPT(PRESETS["tiny"])
    zb.save_checkpoint(tmp_path / "zb", reference)
    dcp.save({k: v for k, v in reference.state_dict().items()}, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    for directory in ("zb", "dcp"):
        _check(str(tmp_path / directory), 2, reference)
        reference.zero_grad()
        prefix = "model." if directory == "zb" else ""
        assert sorted(zb.materialize.READ) == sorted(prefix + k for k in reference.state_dict()
                                                     if k != "head.weight")  # tied: read once


def test_a_hugging_face_safetensors_directory_is_read_per_tensor(tmp_path):
    from safetensors.torch import save_file

    import zb.materialize

    torch.manual_seed(6)
    reference = GPT(PRESETS["tiny"])
    state = {k: v.clone() for k, v in reference.state_dict().items() if k != "head.weight"}  # tied, saved once
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for file, names in shards.items():
        save_file({k: state[k] for k in names}, str(tmp_path / file))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": 0}, "weight_map": {k: f for f, names in shards.items() for k in names}}))
    _check(str(tmp_path), 2, reference)
    assert sorted(zb.materialize.READ) == keys
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    save_file({k: state[k] for k in shards["model-00002-of-00002.safetensors"] if k != "ln_f.bias"},
              str(tmp_path / "model-00002-of-00002.safetensors"))
    step = torch.compile(zb.defer(_meta_gpt(), "cpu"), backend=zb.ZbBackend(
        {"stages": 2, "microbatches": 2, "compiler": "eager", "init": str(tmp_path)}))
    with pytest.raises(zb.ZbOptionError, match=r"missing \['ln_f.bias'\]"):
        step(*_batch())


@pytest.mark.parametrize("source", ["save_pretrained", "init_weights"])
def test_a_hugging_face_llama_built_on_meta(source, tmp_path):
    """A save_pretrained directory (the rotary buffers, in no file, computed by the model's _init_weights as
    transformers' loading does), or the model's own _init_weights as the init callable."""
    from safetensors import safe_open

    import zb.materialize
    from tests import hf_models

    torch.manual_seed(0)
    reference = hf_models.FAMILIES["llama"]()
    with torch.device("meta"):
        model = hf_models.FAMILIES["llama"]()
    if source == "save_pretrained":
        reference.save_pretrained(tmp_path)
        init = str(tmp_path)
    else:
        init = model._init_weights
        zb.initialize(reference, reference._init_weights, seed=0)
    zb.defer(model, "cpu")
    step = torch.compile(lambda ids, labels: hf_models.loss_fn(model, ids, labels), backend=zb.ZbBackend(
        {"stages": 2, "microbatches": 2, "compiler": "eager", "init": init}))
    ids, labels = hf_models.batch()
    loss = step(ids, labels)
    loss.backward()
    expected = hf_models.loss_fn(reference, ids, labels)
    expected.backward()
    assert_close(loss, expected, "loss")
    assert_grads_match(model, reference)
    for (name, b), c in zip(model.named_buffers(), reference.buffers()):
        torch.testing.assert_close(b, c, rtol=0, atol=0, msg=name)
    if source == "save_pretrained":
        files = sorted(tmp_path.glob("*.safetensors"))
        stored = set()
        for file in files:
            with safe_open(str(file), framework="pt") as reader:
                stored |= set(reader.keys())
        assert sorted(zb.materialize.READ) == sorted(stored)


def test_torchrun_the_meta_init_example(tmp_path):
    """examples/meta_init.py as the README runs it: each rank holds about half the parameters."""
    import re
    import subprocess
    import sys

    from tests.test_pipeline import ROOT, launch

    subprocess.run([sys.executable, str(ROOT / "examples" / "meta_init.py"), "--preset", "small",
                    "--save-safetensors", str(tmp_path / "hf")], check=True, capture_output=True)
    out = launch(2, ROOT / "examples" / "meta_init.py", "--preset", "small", "--steps", "1", "--init",
                 str(tmp_path / "hf"))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    pattern = r"holds ([0-9.]+) MiB of the model's ([0-9.]+) MiB"
    held = [(float(a), float(b)) for a, b in re.findall(pattern, out.stdout)]
    assert len(held) == 2 and all(mine < 0.55 * whole for mine, whole in held), out.stdout


def test_a_bool_mask_the_init_does_not_write_is_an_error():
    with torch.device("meta"):
        model = GPT(PRESETS["tiny"].with_(attention="manual"))
    step = torch.compile(zb.defer(model, "cpu"), backend=zb.ZbBackend(
        {"stages": 2, "microbatches": 2, "compiler": "eager", "fuse_attention": False, "init": init_gpt}))
    with pytest.raises(zb.ZbOptionError, match=r"left \['blocks.0.attn.causal_mask'\] without values"):
        step(*_batch())


def test_loading_a_checkpoint_into_a_deferred_model_says_to_use_init(tmp_path):
    zb.save_checkpoint(tmp_path / "ck", GPT(PRESETS["tiny"]))
    model = zb.defer(_meta_gpt(), "cpu")
    with pytest.raises(zb.ZbError, match=r"not materialised yet.*options=\{'init'"):
        zb.load_checkpoint(tmp_path / "ck", model)


def test_a_deferred_model_the_compiled_function_does_not_reach_directly():
    """zb finds the models among the function's arguments, closure and globals; one held by another object is not
    materialised, and the step says so instead of reading storage that does not exist."""

    class Trainer:
        def __init__(self, model):
            self.model = model

        def step(self, ids, labels):
            return self.model(ids, labels)

    trainer = Trainer(zb.defer(_meta_gpt(), "cpu"))
    step = torch.compile(trainer.step, backend=zb.ZbBackend({"stages": 2, "microbatches": 2, "compiler": "eager",
                                                             "init": "reset_parameters"}))
    with pytest.raises(zb.ZbError, match="was not materialised"):
        step(*_batch())
