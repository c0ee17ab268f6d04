"""codegen/accumulate.py: the piece as it runs adds parameter gradients into the step's sums."""

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from zb.codegen.accumulate import accumulating
from zb.passes.keys import Kind, Role, act_key, input_key
from zb.passes.plan import input_keys, output_keys


def _piece():
    """A W-like piece: grad:in:0 is one of its inputs passed through, grad:in:1 a product, grad:in:2 (a batched
    input's) and the activation gradient stay outputs."""
    def w(tangent, saved):
        return tangent, saved.t() @ tangent, saved * 2, tangent.sum(0)

    gm = make_fx(w, tracing_mode="fake")(torch.randn(4, 3), torch.randn(4, 3))
    keys = [act_key("h").tangent(), act_key("x")]
    for node, key in zip(gm.graph.find_nodes(op="placeholder"), keys):
        node.meta["zb_key"] = key
    gm.meta["zb_output_keys"] = [input_key(0).grad(), input_key(1).grad(), input_key(2).grad(), act_key("y").grad()]
    return gm, w


@pytest.mark.parametrize("in_place", [True, False])
@pytest.mark.parametrize("reduce_dtype", [None, torch.float64])
def test_gradients_are_added_into_sums_and_not_returned(in_place, reduce_dtype):
    gm, w = _piece()
    new = accumulating(gm, {0, 1}, reduce_dtype, in_place)
    new.graph.lint()
    sums = [k for k in input_keys(new) if k.is_(Kind.IN, Role.GRAD)]
    assert [k.index for k in sums] == [0, 1]
    assert output_keys(new) == [None, None, input_key(2).grad(), act_key("y").grad()]
    tangent, saved = torch.randn(4, 3), torch.randn(4, 3)
    dtype = reduce_dtype or torch.float32
    total0, total1 = torch.ones(4, 3, dtype=dtype), torch.full((3, 3), 2.0, dtype=dtype)
    got = new(tangent, saved, total0, total1)
    want = w(tangent, saved)
    assert got[0] is None and got[1] is None
    torch.testing.assert_close(got[2], want[2])
    torch.testing.assert_close(total0, 1 + want[0].to(dtype))
    torch.testing.assert_close(total1, 2 + want[1].to(dtype))
    assert gm.graph.find_nodes(op="placeholder")[-1].meta["zb_key"] == act_key("x")  # the plan's piece unchanged


def test_nothing_to_add_leaves_the_piece_as_it_is():
    gm, _ = _piece()
    assert accumulating(gm, set(), None, True) is gm


def test_an_embeddings_rows_are_added_into_its_sum_without_a_second_table():
    """The decomposed embedding backward adds rows into a zero table; the piece as it runs adds them into the
    step's sum instead (padding rows masked as the decomposition masks them), with eager's gradient."""
    import copy

    import zb
    from zb.codegen.accumulate import runnable
    from zb.codegen.memory import piece_memory
    from zb.passes.keys import PieceName

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(5000, 32, padding_idx=0), torch.nn.Linear(32, 8))
    reference = copy.deepcopy(model)
    ids = torch.randint(0, 5000, (8, 6))
    ids[0, :3] = 0  # padding rows get no gradient
    backend = zb.ZbBackend({"stages": 1, "microbatches": 4, "compiler": "eager"})
    torch.compile(lambda x: model(x).square().mean(), backend=backend)(ids).backward()
    reference(ids).square().mean().backward()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)
    (plan,) = backend.plans
    weight = plan.stages[0].pieces[PieceName.BACKWARD_WEIGHT]
    running = runnable(weight, plan)
    assert any(n.target is torch.ops.aten.index_put_.default for n in running.graph.nodes)
    table = 5000 * 32 * 4
    assert piece_memory(weight).peak >= table > piece_memory(running).peak


def test_the_runnable_cache_does_not_keep_a_plans_pieces_alive():
    """A plan evicted from the cache (or replaced by a re-cut) frees its graphs: the memo of runnable copies
    holds its keys weakly and never holds a piece that needed no rewrite."""
    import gc
    import types
    import weakref

    from zb.codegen.accumulate import runnable

    options = types.SimpleNamespace(microbatches=2, reduce_dtype=None, compiler="eager")
    plan = types.SimpleNamespace(training=True, options=options,
                                 inputs=[types.SimpleNamespace(batched=False) for _ in range(3)])
    rewritten, untouched = _piece()[0], _piece()[0]
    untouched.meta["zb_output_keys"] = [None, None, None, act_key("y").grad()]
    assert runnable(rewritten, plan) is not rewritten and runnable(untouched, plan) is untouched
    refs = [weakref.ref(rewritten), weakref.ref(untouched)]
    del rewritten, untouched
    gc.collect()
    assert [r() for r in refs] == [None, None]
