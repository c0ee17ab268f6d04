"""Property: zb gives eager's loss and gradients, or refuses with a ZbError; never a silent difference.

Hypothesis draws small random models from the vocabulary in tests/fuzz_models.py (per-sample ops, ops along the
batch dim, views that merge the batch with other dims, reductions, several loss forms) and random options
(stages, microbatches, schedule, data_parallel; compiler="eager"), runs one zb step and one eager step on the same
weights and inputs (float64), and compares the loss, every parameter gradient and the input's gradient (rtol 1e-5,
atol 1e-6). Any other exception type is a failure too. The property does not say which models zb must refuse:
ops that mix samples along the batch are marked in each example's description, and the analysis decides.

A failure prints the model (`repro: Case(...)`); `run_case(Case(...))` from tests/fuzz_models.py reruns it, and
`bench/fuzz.py --examples 200` runs the same property over many more examples and tabulates the findings.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, Phase, example, given, settings

from tests.fuzz_models import OPS, Case, cases, run_case


def check(case: Case) -> None:
    outcome = run_case(case)
    assert outcome.kind in ("exact", "refused", "invalid"), (
        "zb must equal eager or raise a ZbError; got " + outcome.report())


@settings(max_examples=30, deadline=None, derandomize=True, database=None,
          phases=(Phase.explicit, Phase.generate),  # no shrinking: a failure already prints a short repro
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(cases())
# Found by this fuzzer at 3b9e3f4: in-process data_parallel=2 with one microbatch combined the replicas' sum and
# token-mean losses as plain means (loss and gradients off, no error).
@example(Case(ops=("tanh",), loss="sum", stages=2, microbatches=1, data_parallel=2))
@example(Case(ops=("tanh",), loss="token-mean ce", stages=2, microbatches=1, data_parallel=2, input_grad=True))
# Found at 3b9e3f4 with one microbatch, one replica: a stage boundary that carries h and a view of it (h.flatten(0, 1),
# h.T) sends one gradient back, so the stages before it get a zero or wrong gradient.
@example(Case(ops=("flatten(0,1)>layernorm>view", "mean(1)"), loss="mse", stages=3, input_grad=True))
@example(Case(ops=("gram(h@h.T)",), loss="mse", rank=2, stages=3, seed=42182))
def test_zb_equals_eager_or_raises_a_zb_error(case):
    check(case)


@pytest.mark.parametrize("op", [name for name, op in OPS.items() if op.mixes])
def test_an_op_along_the_batch_with_microbatches_is_refused_or_exact(op):
    """Each op that mixes samples along the batch (softmax(0), cumsum(0), sort(0), flip(0), roll(1,0), ...) with 4
    microbatches on 2 stages: a ZbError, or eager's loss and gradients. Never a silent difference."""
    rank = OPS[op].ranks[-1]
    check(Case(ops=("linear", op, "tanh"), loss="mse", rank=rank, stages=2, microbatches=4, input_grad=True))


def test_the_harness_sees_a_per_sample_model_as_exact():
    """The harness runs and compares a plain per-sample model (so "exact" above is not an accident of it)."""
    outcome = run_case(Case(ops=("layernorm", "attention(sdpa,causal)", "mean(1)"), loss="token-mean ce",
                            stages=2, microbatches=2, schedule="zb-h1", data_parallel=2, input_grad=True))
    assert outcome.kind == "exact", outcome.report()
