"""Hunt silent wrong gradients: random small models (tests/fuzz_models.py) through zb and eager, many examples.

    .venv/bin/python bench/fuzz.py --examples 200 --seed 0

Each example is one random model (a chain of ops from the vocabulary: per-sample ops, ops along the batch dim,
views that merge the batch with other dims, reductions, several loss forms) with random options (stages,
microbatches, schedule, data_parallel; compiler="eager"). zb must either give eager's loss and gradients
(rtol 1e-5, atol 1e-6) or refuse with a ZbError. Prints a table: examples run, exact, refused (by error class
and message), silent differences (with the model: a `repro:` line rebuilds it) and other exceptions.
Exit status 1 when anything silent or other was found.
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import pathlib
import random
import sys
import time
import warnings

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("ZB_VERIFY", "1")  # as in the test suite (tests/conftest.py): check every pass


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=200, help="number of random models (default 200)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generator (default 0)")
    parser.add_argument("--max-ops", type=int, default=5, help="ops per model, at most (default 5)")
    parser.add_argument("--dtype", default="float64", choices=["float64", "float32"],
                        help="parameters and inputs (default float64: rounding cannot pass for a finding)")
    parser.add_argument("--show", type=int, default=10, help="examples printed per finding category (default 10)")
    parser.add_argument("--generator", default="random", choices=["random", "hypothesis"],
                        help="random: each example drawn independently (uniform over the same choices, so the "
                             "counts are rates); hypothesis: tests/test_fuzz.py's strategy, which explores around "
                             "earlier examples (default random)")
    parser.add_argument("--minimize", action="store_true",
                        help="shrink each printed finding (drop ops, simplify options while it stays) before printing")
    parser.add_argument("--verbose", action="store_true", help="one line per example as it runs")
    args = parser.parse_args(argv)

    from tests.fuzz_models import OPS, minimize, random_case, run_case
    from tests.fuzz_models import cases as case_strategy

    logging.getLogger("torch._subclasses.fake_tensor").setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore")

    outcomes = []
    start = time.perf_counter()

    def one(case):
        t = time.perf_counter()
        outcome = run_case(case)
        outcomes.append(outcome)
        if args.verbose:
            print(f"{len(outcomes):4d} {outcome.kind:8s} {time.perf_counter() - t:5.2f}s  {case.describe()}",
                  flush=True)

    if args.generator == "random":
        rng = random.Random(args.seed)
        for _ in range(args.examples):
            one(random_case(rng, max_ops=args.max_ops, dtype=args.dtype))
    else:
        from hypothesis import HealthCheck, Phase, given, settings
        from hypothesis import seed as hypothesis_seed

        explore = given(case_strategy(max_ops=args.max_ops, dtype=args.dtype))(one)
        explore = settings(max_examples=args.examples, deadline=None, database=None, phases=[Phase.generate],
                           suppress_health_check=list(HealthCheck))(explore)
        hypothesis_seed(args.seed)(explore)()
    elapsed = time.perf_counter() - start

    kinds = collections.Counter(o.kind for o in outcomes)
    print(f"\nzb fuzz: {len(outcomes)} examples ({args.generator}), seed {args.seed}, {args.dtype}, "
          f"{elapsed:.0f} s")
    print(f"{'outcome':<34}{'count':>7}")
    for kind in ("exact", "refused", "silent", "other", "invalid"):
        print(f"{kind:<34}{kinds.get(kind, 0):>7}")

    refused = collections.Counter((o.error, o.detail[:110]) for o in outcomes if o.kind == "refused")
    if refused:
        print("\nrefused, by error class and message:")
        for (error, detail), n in refused.most_common():
            print(f"  {n:4d}  {error}: {detail}")

    suspicious = [o for o in outcomes if o.kind == "refused" and not o.case.mixing_ops and o.error != "ZbOptionError"]
    if suspicious:
        print(f"\nrefused with no batch-mixing op (possible false refusals, not failures): {len(suspicious)}")
        for (error, detail), n in collections.Counter((o.error, o.detail[:110]) for o in suspicious).most_common():
            print(f"  {n:4d}  {error}: {detail}")
        for o in sorted(suspicious, key=lambda o: len(o.case.ops))[:3]:
            print(f"        e.g. {o.case!r}")

    # Which ops appear in which outcome: a silent difference with a per-sample-only model is the worst kind.
    print(f"\n{'op':<38}{'kind':<14}{'exact':>6}{'refused':>8}{'silent':>7}{'other':>6}")
    per_op = collections.defaultdict(collections.Counter)
    for o in outcomes:
        for name in set(o.case.ops):
            per_op[name][o.kind] += 1
    for name, op in OPS.items():
        c = per_op[name]
        print(f"{name:<38}{op.kind:<14}{c['exact']:>6}{c['refused']:>8}{c['silent']:>7}{c['other']:>6}")

    for kind, title in (("silent", "SILENT DIFFERENCES"), ("other", "OTHER EXCEPTIONS (not a ZbError)")):
        found = [o for o in outcomes if o.kind == kind]
        if not found:
            continue
        clean = [o for o in found if not o.case.mixing_ops]
        print(f"\n{title}: {len(found)} ({len(clean)} with no batch-mixing op)")
        split = collections.Counter((o.case.microbatches * o.case.data_parallel > 1, bool(o.case.mixing_ops),
                                     o.case.stages > 1) for o in found)
        print("   count  batch split (microbatches x data_parallel > 1)  batch-mixing op  stages > 1")
        for (is_split, mixes, staged), n in sorted(split.items(), key=lambda kv: -kv[1]):
            print(f"    {n:4d}  {'yes' if is_split else 'no':<46}  {'yes' if mixes else 'no':<15}  "
                  f"{'yes' if staged else 'no'}")
        if kind == "other":
            for (error, detail), n in collections.Counter((o.error, o.detail) for o in found).most_common():
                print(f"  {n:4d}  {error}: {detail[:200]}")
        shown = sorted(found, key=lambda o: (bool(o.case.mixing_ops), len(o.case.ops)))[:args.show]
        for o in shown:
            if args.minimize:
                small = minimize(o)
                if small.case != o.case:
                    print(f"\n(minimized from {o.case!r})")
                o = small
            print("\n" + o.report())

    return 1 if kinds.get("silent") or kinds.get("other") else 0


if __name__ == "__main__":
    sys.exit(main())
