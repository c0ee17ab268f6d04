"""Changing input shapes (dynamic padding: another sequence length per batch) against eager PyTorch.

Dynamo compiles the function again for a new shape (static first, then with the changed sizes symbolic). For the
dynamic graph zb traces its pipeline once with those sizes symbolic (option symbolic_sizes): one plan and one
compile serve every later length its shape guards admit, and each call's boundary shapes and bytes are evaluated
at its own length. A length the guards do not admit, or option symbolic_sizes=False, gets a pipeline per
signature; they live in a cache (zb/plan_cache.py) bounded by option plan_cache (least recently used freed first).
Graphs never share a cache: each bakes in its own constants.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

import zb
from tests import hf_models, models
from tests.helpers import assert_close, assert_grads_match
from zb.backend import CompiledGraph
from zb.codegen.inductor import _in_layout

LENGTHS = [16, 12, 8, 12, 16, 10]


def _train(lengths, monkeypatch, factory=models.gpt, batch=None, loss_fn=None, **options):
    """Train on batches of the given lengths, comparing each step with eager; returns (backend, built), built
    holding (input shape, whether traced symbolic) of every pipeline zb built. `loss_fn(model, *batch)`: what is
    compiled (default: the model, whose forward returns the loss)."""
    built = []
    original = CompiledGraph.build_plan

    def counting(self, args, training, *rest, **kwargs):
        built.append((tuple(args[-1].shape), bool(kwargs.get("dynamic"))))
        return original(self, args, training, *rest, **kwargs)

    monkeypatch.setattr(CompiledGraph, "build_plan", counting)
    torch._dynamo.reset()  # (Dynamo remembers which sizes changed per code object: each run starts afresh)
    torch.manual_seed(0)
    model, _ = factory()
    reference = copy.deepcopy(model)
    backend = zb.ZbBackend({"stages": 2, "microbatches": 2, "compiler": "eager", "schedule": "zb-h1", **options})
    compiled = torch.compile(model if loss_fn is None else (lambda *args: loss_fn(model, *args)), backend=backend)
    loss_fn = loss_fn or (lambda m, *args: m(*args))
    generator = torch.Generator().manual_seed(1)
    batch = batch or (lambda length: tuple(torch.randint(0, 256, (8, length), generator=generator) for _ in "xy"))
    for length in lengths:
        args = batch(length)
        loss = compiled(*args)
        loss.backward()
        expected = loss_fn(reference, *args)
        expected.backward()
        assert_close(loss, expected, f"length {length}: loss")
        assert_grads_match(model, reference, f"length {length}: ")
        model.zero_grad()
        reference.zero_grad()
    return backend, built


def test_changing_lengths_are_planned_and_compiled_once_with_a_symbolic_length(monkeypatch):
    backend, built = _train([16, 12, 8, 12, 16, 10, 5, 2], monkeypatch)
    assert len(backend.graphs) == 2  # Dynamo's static graph, then its dynamic one
    # the static graph's pipeline at 16; the dynamic graph's, symbolic, at 12, serving 8, 12, 16, 10, 5 and 2
    assert built == [((8, 16), False), ((8, 12), True)], built
    (entry,) = backend.graphs[1].cache.entries.values()
    assert entry.guards is not None
    program = entry.runner.program
    # the boundary stage 1 receives is the last call's length: [microbatch, 2, hidden]
    assert [spec.shape for spec in program.stages[1].receives_forward] == [(4, 2, 32)]
    assert list(program.sizes.values()) == [2]


def test_the_symbolic_program_at_a_length_is_the_static_program_of_that_length(monkeypatch):
    """Boundary shapes, the bytes F leaves for B and W (the simulator's M_B, M_W) and each piece's memory, evaluated
    for the call's length, equal those of a pipeline traced at that length alone."""
    symbolic, _ = _train([16, 12, 7], monkeypatch)
    static, _ = _train([16, 12, 7], monkeypatch, symbolic_sizes=False)
    mine = next(iter(symbolic.graphs[1].cache.entries.values())).runner.program
    theirs = list(static.graphs[1].cache.entries.values())[-1].runner.program
    assert mine.sizes and not theirs.symbols
    mine.refresh_memory()  # (the byte counts follow the bound sizes when read)

    def shapes(specs):  # (the symbolic graph takes the length as an input of its own, and names values its way)
        return [(spec.shape, spec.dtype) for spec in specs if spec is not None]

    assert shapes(mine.input_specs) == shapes(theirs.input_specs)
    assert shapes(mine.outputs) == shapes(theirs.outputs)
    for a, b in zip(mine.stages, theirs.stages):
        assert shapes(a.receives_forward) == shapes(b.receives_forward)
        assert shapes(a.receives_backward) == shapes(b.receives_backward)
        assert (a.memory_b, a.memory_w) == (b.memory_b, b.memory_w)
        for name, piece in a.pieces.items():  # its peak, and the bytes of each tensor it makes
            other = b.pieces[name].memory
            assert piece.memory.peak == other.peak
            assert [o for o in piece.memory.outputs if o[0] == "new"] == [o for o in other.outputs if o[0] == "new"]


def test_the_same_tensor_as_two_arguments(monkeypatch):
    """`model(ids, ids)`: Dynamo's graph reads the tensor once; both arguments get each microbatch's rows."""
    generator = torch.Generator().manual_seed(4)

    def batch(length):
        ids = torch.randint(0, 256, (8, length), generator=generator)
        return ids, ids

    backend, built = _train([16, 10, 6], monkeypatch, batch=batch)
    assert [symbolic for _, symbolic in built] == [False, True], built


def test_a_length_the_shape_guards_do_not_admit_gets_a_pipeline_of_its_own(monkeypatch):
    """The symbolic trace holds for lengths 2..16 (Dynamo specialises sizes 0 and 1; the position table has 16
    rows): a batch of length 1 gets a static pipeline (in a graph Dynamo made for it), and the symbolic one keeps
    serving the others."""
    backend, built = _train([16, 12, 1, 9, 1], monkeypatch)
    assert built == [((8, 16), False), ((8, 12), True), ((8, 1), False)], built
    assert [[e.guards is not None for e in graph.cache.entries.values()] for graph in backend.graphs] == \
        [[False], [True], [False]]


def test_with_symbolic_sizes_off_each_length_builds_and_a_length_seen_before_builds_nothing(monkeypatch):
    backend, built = _train(LENGTHS, monkeypatch, plan_cache=8, symbolic_sizes=False)
    assert len(backend.graphs) == 2
    # 16 again: built once more, in the dynamic graph (the static one's is not shared); 12 again: from the cache
    assert [shape for shape, _ in built] == [(8, 16), (8, 12), (8, 8), (8, 16), (8, 10)], built
    assert not any(symbolic for _, symbolic in built)
    assert backend.graphs[0].cache is not backend.graphs[1].cache


def test_the_cache_is_bounded_least_recently_used_first(monkeypatch):
    backend, built = _train([16, 12, 8, 12, 16], monkeypatch, plan_cache=2, symbolic_sizes=False)
    cache = backend.graphs[-1].cache
    # the static graph: 16; the dynamic one: 12, 8, 12 (kept), 16 (built; 8 freed)
    assert [shape for shape, _ in built] == [(8, 16), (8, 12), (8, 8), (8, 16)], built
    assert len(cache.entries) == 2 and cache.evicted == 1
    kept = {sig[0][1] for key in cache.entries for source, sig in key[2:]  # (training, autocast state, inputs...)
            if source.startswith("L['") and "_modules" not in source and len(sig[0]) == 2}
    assert kept == {12, 16}, kept


class _Lengthy(torch.nn.Module):
    """A token model whose loss reads the length as a number in several ways."""

    def __init__(self, loss: str):
        super().__init__()
        self.loss = loss
        self.emb = torch.nn.Embedding(32, 16)
        self.fc = torch.nn.Linear(16, 16)
        self.head = torch.nn.Linear(16, 32)

    def forward(self, ids, labels):
        h = self.emb(ids)
        length = ids.shape[1]
        h = h + torch.tanh(self.fc(h.cumsum(1) / length))  # mixes along the sequence, never across samples
        h = h * torch.arange(length, dtype=h.dtype).view(1, length, 1) / length
        logits = self.head(h)
        if self.loss == "token_mean":  # padding: microbatches hold different numbers of tokens
            return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        if self.loss == "sum":
            return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
        if self.loss == "sum_over_length":
            return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100,
                                   reduction="sum") / labels.shape[1]
        per_sample = F.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none").mean(1)
        return per_sample.mean()


def _padded(length):
    generator = torch.Generator().manual_seed(length)
    ids = torch.randint(0, 32, (8, length), generator=generator)
    labels = torch.randint(0, 32, (8, length), generator=generator)
    labels[0] = -100
    labels[5, length // 2:] = -100
    return ids, labels


@pytest.mark.parametrize("loss", ["token_mean", "sum", "sum_over_length", "per_sample_mean"])
@pytest.mark.parametrize("microbatches", [2, 4])
def test_losses_that_read_the_length_equal_eager_at_every_length(monkeypatch, loss, microbatches):
    backend, built = _train([12, 7, 16, 3, 9], monkeypatch, factory=lambda: (_Lengthy(loss), None), batch=_padded,
                            microbatches=microbatches)
    assert [symbolic for _, symbolic in built] == [False, True], built


def test_an_unbatched_mask_of_the_length_and_zb_v(monkeypatch):
    class Masked(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(32, 16)
            self.layers = torch.nn.ModuleList(torch.nn.Linear(16, 16) for _ in range(4))

        def forward(self, ids, labels, mask):
            h = self.emb(ids)
            for layer in self.layers:
                scores = (h @ h.transpose(1, 2) / 16).masked_fill(mask == 0, float("-inf"))  # [B, L, L], [L, L]
                h = h + torch.tanh(layer(torch.softmax(scores, -1) @ h))
            return F.mse_loss(h.sum(-1), labels)

    generator = torch.Generator().manual_seed(3)

    def batch(length):
        mask = torch.ones(length, length).tril()
        return torch.randint(0, 32, (8, length), generator=generator), torch.randn(8, length, generator=generator), \
            mask

    backend, built = _train([10, 6, 13, 4], monkeypatch, factory=lambda: (Masked(), None), batch=batch,
                            schedule="zb-v", unbatched=["mask"])
    assert [symbolic for _, symbolic in built] == [False, True], built


def test_a_hugging_face_llama_with_changing_lengths(monkeypatch):
    def batch(length):
        return hf_models.batch(length=length)

    backend, built = _train([12, 9, 16, 5], monkeypatch, factory=lambda: (hf_models.FAMILIES["llama"](), None),
                            batch=batch, loss_fn=hf_models.loss_fn)
    assert [symbolic for _, symbolic in built] == [False, True], built


def test_inference_with_changing_lengths(monkeypatch):
    torch.manual_seed(0)
    model, _ = models.gpt()
    backend = zb.ZbBackend({"stages": 2, "microbatches": 2, "compiler": "eager"})
    compiled = torch.compile(model, backend=backend)
    for length in [16, 11, 6, 14]:
        ids = torch.randint(0, 256, (8, length))
        with torch.no_grad():
            torch.testing.assert_close(compiled(ids, ids), model(ids, ids), rtol=1e-5, atol=1e-6)
    assert len(backend.plans) == 2


def test_inductor_compiles_the_symbolic_pipeline_once(monkeypatch):
    backend, built = _train([16, 12, 7, 14], monkeypatch, compiler="inductor")
    assert [symbolic for _, symbolic in built] == [False, True], built
    (entry,) = backend.graphs[1].cache.entries.values()
    sources = [piece.run.source_code for stage in entry.runner.program.stages for piece in stage.pieces.values()
               if piece.run is not None]
    assert sources and all(source for source in sources)
    assert any("s13" in source or "ks0" in source for source in sources)  # the length is an argument of the code


class _Tokens(torch.nn.Module):
    """Embedding, linear layers, cross entropy: the shape of most token models, small."""

    def __init__(self, depth=2, checkpointed_dropout=False):
        super().__init__()
        self.checkpointed_dropout = checkpointed_dropout
        self.emb = torch.nn.Embedding(64, 16)
        self.fc = torch.nn.ModuleList(torch.nn.Linear(16, 16) for _ in range(depth))
        self.head = torch.nn.Linear(16, 64)

    def forward(self, ids, labels):
        h = self.emb(ids)
        for fc in self.fc:
            if self.checkpointed_dropout:
                block = lambda x, fc=fc: F.dropout(torch.tanh(fc(x)), 0.3, self.training)  # noqa: E731
                h = h + torch.utils.checkpoint.checkpoint(block, h, use_reentrant=False)
            else:
                h = torch.tanh(fc(h))
        return F.cross_entropy(self.head(h).flatten(0, 1), labels.flatten())


def _tokens(length):
    generator = torch.Generator().manual_seed(length)
    return tuple(torch.randint(0, 64, (8, length), generator=generator) for _ in "xy")


def test_inductor_compiles_pieces_whose_values_show_the_length_only_in_products(monkeypatch):
    """Stage 1's W reads only [4*L, 16] values; Inductor needs L itself: the piece takes it as an input."""
    backend, built = _train([16, 12, 7], monkeypatch, factory=lambda: (_Tokens(), None), batch=_tokens,
                            compiler="inductor")
    assert [symbolic for _, symbolic in built] == [False, True], built
    assert backend.graphs[1].symbolic_failed is None
    plan = next(iter(backend.graphs[1].cache.entries.values())).plan
    assert plan.counters["split_backward.sizes_exposed"] >= 1


def test_a_boundary_value_keeps_its_traced_layout_at_every_length(monkeypatch):
    """Cut right before a fused attention: the gradients of q, k, v come back in the kernel's layout, which
    stage 0's B views as traced (strides that are products of the length)."""

    class Attention(torch.nn.Module):
        def forward(self, q, k, v):
            return (q @ k.transpose(-1, -2) / 4.0).softmax(-1) @ v

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(64, 16)
            self.q, self.k, self.v = (torch.nn.Linear(16, 16) for _ in range(3))
            self.attn, self.post, self.head = Attention(), torch.nn.Linear(16, 16), torch.nn.Linear(16, 64)

        def forward(self, ids, labels):
            h = self.emb(ids)
            h = h + self.post(self.attn(self.q(h), self.k(h), self.v(h)))
            return F.cross_entropy(self.head(h).flatten(0, 1), labels.flatten())

    backend, built = _train([16, 12, 8, 5], monkeypatch, factory=lambda: (Model(), None), batch=_tokens,
                            split_points=["attn"])
    assert [symbolic for _, symbolic in built] == [False, True], built


def test_a_boundary_strided_by_a_length_its_shape_does_not_show(monkeypatch):
    """The last token's state `h[:, -1]` crosses to the head's stage, traced as a view with strides (L*d, 1) of a
    [m, d] value. In one process the view itself arrives; over torch.distributed a contiguous buffer does, and the
    piece lays it out as traced, with the call's L (its shape does not show L): checked on the piece's layout."""

    class LastToken(_Tokens):
        def forward(self, ids, labels):
            h = torch.tanh(self.fc[0](self.emb(ids)))
            return F.cross_entropy(self.head(h[:, -1]), labels[:, -1])

    backend, built = _train([16, 12, 7], monkeypatch, factory=lambda: (LastToken(), None), batch=_tokens,
                            compiler="inductor", split_points=["head"])
    assert [symbolic for _, symbolic in built] == [False, True], built
    assert backend.graphs[1].symbolic_failed is None
    (entry,) = backend.graphs[1].cache.entries.values()
    piece = entry.runner.program.stages[1].pieces["forward"].run
    (position, strides), = [(p, s) for p, s in piece.layouts if callable(s)]
    received = torch.randn(4, 16)  # contiguous, as a receive buffer
    assert strides(received.shape, piece.sizes) == (16 * 7, 1)  # the last call's length, 7
    laid_out = [_in_layout(received, strides(received.shape, piece.sizes))]
    assert laid_out[0].stride() == (16 * 7, 1) and torch.equal(laid_out[0], received)


def test_checkpointed_dropout_and_the_memory_at_the_current_length(monkeypatch):
    """A recomputed dropout saves its RNG state, whose size no input shows: counted as traced. Dropout draws
    differ from eager's (zb seeds each microbatch), so this checks that the steps run and report memory."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    backend = zb.ZbBackend({"stages": 2, "microbatches": 2, "compiler": "eager"})
    step = torch.compile(_Tokens(depth=4, checkpointed_dropout=True), backend=backend)
    for length in [16, 12, 8, 5, 12]:
        step(*_tokens(length)).backward()
    (entry,) = backend.graphs[1].cache.entries.values()
    assert entry.guards is not None
    memory = entry.runner.planned_memory()
    step(*_tokens(9)).backward()
    assert entry.runner.planned_memory() != memory  # the activations of length 9, not 12


def test_a_loss_zb_cannot_normalise_at_a_symbolic_length_falls_back_to_a_pipeline_per_length(monkeypatch):
    """A sum divided by the number of tokens as a symbolic number: normalize_loss reads scales that are numbers;
    the graph then builds per length (exact), and says so once."""

    class Model(_Tokens):
        def forward(self, ids, labels):
            h = self.emb(ids)
            total = F.cross_entropy(self.head(torch.tanh(self.fc[0](h))).flatten(0, 1), labels.flatten(),
                                    reduction="sum")
            return total / labels.numel()

    import zb.backend

    warned = []
    monkeypatch.setattr(zb.backend.log, "warning", lambda message, *args: warned.append(message % args))
    backend, built = _train([16, 12, 8, 12], monkeypatch, factory=lambda: (Model(), None), batch=_tokens)
    assert [shape for shape, _ in built] == [(8, 16), (8, 12), (8, 12), (8, 8)], built
    assert "how the loss is normalised" in backend.graphs[1].symbolic_failed
    assert len(warned) == 1 and "one pipeline per input shape" in warned[0], warned


def test_an_int_argument_dynamo_made_dynamic_is_the_calls_own():
    """`forward(ids, labels, k)` slicing [:, :k]: Dynamo makes k a graph input on its second value; the re-trace
    at microbatch size must use each call's k (it once kept the first call's, silently)."""

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.head = torch.nn.Embedding(64, 16), torch.nn.Linear(16, 64)

        def forward(self, ids, labels, k: int):
            return F.cross_entropy(self.head(self.emb(ids)[:, :k]).flatten(0, 1), labels[:, :k].flatten())

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Model()
    reference = copy.deepcopy(model)
    step = torch.compile(model, backend=zb.ZbBackend({"stages": 2, "microbatches": 2, "compiler": "eager"}))
    ids, labels = _tokens(12)
    for k in [6, 5, 4, 7, 5]:
        loss = step(ids, labels, k)
        loss.backward()
        expected = reference(ids, labels, k)
        expected.backward()
        assert_close(loss, expected, f"k={k}: loss")
        assert_grads_match(model, reference, f"k={k}: ")
        model.zero_grad()
        reference.zero_grad()


def test_graphs_that_differ_inside_a_checkpointed_block_never_share_a_pipeline():
    """Dropout inside an activation-checkpointed block: train and eval graphs differ only in the block's body."""
    torch.manual_seed(0)
    model = _Tokens(depth=2, checkpointed_dropout=True)
    step = torch.compile(model, backend=zb.ZbBackend({"stages": 2, "microbatches": 2, "compiler": "eager"}))
    batch = _tokens(8)
    step(*batch).backward()
    model.eval()
    torch.testing.assert_close(step(*batch), model(*batch), rtol=1e-5, atol=1e-6)  # no dropout, grad enabled


def test_graphs_with_other_constants_never_share_a_pipeline():
    """A flag argument and module.training are baked into Dynamo's graphs, not into zb's signature key."""

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = torch.nn.Linear(16, 32), torch.nn.Linear(32, 16)
            self.drop = torch.nn.Dropout(0.5)

        def forward(self, x, y, l1: bool):
            out = self.fc2(self.drop(torch.relu(self.fc1(x))))
            return torch.nn.functional.l1_loss(out, y) if l1 else torch.nn.functional.mse_loss(out, y)

    torch.manual_seed(0)
    model = Model().eval()
    reference = copy.deepcopy(model)
    step = torch.compile(model, backend=zb.ZbBackend({"stages": 2, "microbatches": 2, "compiler": "eager"}))
    x, y = torch.randn(8, 16), torch.randn(8, 16)
    for l1 in (False, True):
        torch.testing.assert_close(step(x, y, l1), reference(x, y, l1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [0, -1, 1.5])
def test_plan_cache_option_is_checked(bad):
    with pytest.raises(zb.ZbOptionError, match="plan_cache"):
        zb.ZbBackend({"plan_cache": bad})
