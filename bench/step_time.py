"""Compile time and step time of the example GPT: eager PyTorch vs torch.compile (Inductor) vs zb.

    .venv/bin/python bench/step_time.py [--steps 40] [--preset small]

Each configuration trains the same model on the same batches (examples/train_gpt.py) in its own process with its
own empty Inductor cache, so "first step" includes a cold compilation. Step time is the mean over the later
steps; the ratio column is against eager PyTorch measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]

CONFIGS = [
    ("eager PyTorch", ["--backend", "eager"]),
    ("torch.compile (inductor)", ["--backend", "inductor"]),
    ("zb, microbatches=1", ["--backend", "zb", "--microbatches", "1"]),
    ("zb, microbatches=4", ["--backend", "zb", "--microbatches", "4"]),
    ("zb, microbatches=4, compiler=eager", ["--backend", "zb", "--microbatches", "4", "--compiler", "eager"]),
]


def run(extra: list[str], common: list[str]) -> dict:
    with tempfile.TemporaryDirectory(prefix="zb-bench-inductor-") as cache:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
        out = subprocess.run([sys.executable, str(ROOT / "examples" / "train_gpt.py"), *common, *extra, "--json"],
                             env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--preset", default="small")
    args = parser.parse_args()
    common = ["--steps", str(args.steps), "--preset", args.preset, "--log-every", str(args.steps)]
    rows = []
    for name, extra in CONFIGS:
        rows.append((name, run(extra, common)))
        print(f"measured {name}", file=sys.stderr)
    import torch

    base = rows[0][1]["step_s"]
    print(f"GPT {args.preset}, batch 16 x 64 tokens, {args.steps} steps, torch {torch.__version__}, "
          f"{os.cpu_count()} cores, cold Inductor cache per row")
    print(f"| {'configuration':<36} | first step (s) | step (ms) | step vs eager | final loss |")
    print(f"|{'-' * 38}|---------------:|----------:|--------------:|-----------:|")
    for name, r in rows:
        print(f"| {name:<36} | {r['first_step_s']:14.1f} | {r['step_s'] * 1e3:9.1f} | "
              f"{r['step_s'] / base:12.2f}x | {r['loss_end']:10.3f} |")


if __name__ == "__main__":
    main()
