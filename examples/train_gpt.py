"""Train the example GPT on the Python standard library's own source code, read as bytes.

    python examples/train_gpt.py                        # zb backend, defaults below
    python examples/train_gpt.py --backend eager        # the same model without torch.compile
    python examples/train_gpt.py --microbatches 8 --compiler eager --steps 50
    torchrun --nproc-per-node 2 examples/train_gpt.py      # a 2-rank zero-bubble pipeline (zb-auto by default)
    torchrun --nproc-per-node 2 examples/train_gpt.py --save-every 25 --resume
                                                           # checkpoints; run again, it resumes from the last one

Prints the options, the loss every --log-every steps, tokens/s (excluding the first step, which compiles) and
the loss at the start and the end. Offline: the corpus is whatever `sysconfig` says the stdlib is.

Checkpoints: --save-every K writes --checkpoint DIR (zb.save_checkpoint: model, optimizer, the data stream's
position, the losses so far) after every K-th step; --resume continues from DIR when it holds one, with no step
lost or repeated. If a rank dies, the others raise a ZbError within --timeout seconds; rerunning the command (or
torchrun --max-restarts N, which reruns it) resumes from the last checkpoint. --fail-at-step N makes the last rank
exit at step N of the first attempt, to see this happen.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import sysconfig
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import zb  # noqa: E402
from examples.gpt import GPT, PRESETS  # noqa: E402


def load_corpus(megabytes: float) -> torch.Tensor:
    """The stdlib's .py files, concatenated as bytes (sorted, so every run reads the same text)."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    limit = int(megabytes * 2**20)
    chunks, size = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        size += len(data)
        if size >= limit:
            break
    if size < 2**16:
        raise SystemExit(f"found only {size} bytes of Python source under {root}; is the stdlib installed?")
    return torch.frombuffer(bytearray(b"".join(chunks)[:limit]), dtype=torch.uint8).long()


def batches(data: torch.Tensor, batch_size: int, block_size: int, generator: torch.Generator):
    while True:
        starts = torch.randint(0, len(data) - block_size - 1, (batch_size,), generator=generator)
        x = torch.stack([data[s: s + block_size] for s in starts.tolist()])
        y = torch.stack([data[s + 1: s + 1 + block_size] for s in starts.tolist()])
        yield x, y


def report_pipeline(backend, timeline_prefix: str | None, say) -> dict:
    """The schedule zb ran, the bubble rate of the last profiled step and, if asked, its timeline pictures."""
    runner = backend.runners[0] if backend.runners else None
    if runner is None or runner.program.num_stages == 1:
        return {}
    from zb.schedules import draw, simulate

    say(f"pipeline: {runner.program.num_stages} stages, schedule {runner.schedule.name}")
    if not runner.trace:
        return {}
    measured = runner.measured_timeline()
    simulated = simulate(runner.schedule, runner.costs)
    say(f"measured bubble rate {measured.bubble_rate:.3f} (simulated with the measured costs: "
        f"{simulated.bubble_rate:.3f})")
    if timeline_prefix and int(os.environ.get("RANK", "0")) == 0:
        for name, timeline in (("measured", measured), ("simulated", simulated)):
            path = draw(timeline, f"{timeline_prefix}-{name}.png")
            say(f"wrote {path}")
    return {"bubble_rate": measured.bubble_rate}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--attention", choices=["sdpa", "manual"], default="sdpa")
    parser.add_argument("--backend", choices=["zb", "eager", "inductor"], default="zb",
                        help="zb (default), plain eager PyTorch, or torch.compile's default Inductor backend")
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--schedule", default="zb-auto", help="pipeline schedule (under torchrun or with --stages)")
    parser.add_argument("--stages", type=int, default=None, help="pipeline stages (default: one per rank)")
    parser.add_argument("--timeline", metavar="PREFIX",
                        help="write PREFIX-measured.png and PREFIX-simulated.png of the last profiled step")
    parser.add_argument("--compiler", choices=["inductor", "eager"], default="inductor", help="zb's piece compiler")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--corpus-mb", type=float, default=4.0)
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line at the end")
    parser.add_argument("--checkpoint", default="checkpoints/gpt", help="checkpoint directory (default: %(default)s)")
    parser.add_argument("--save-every", type=int, default=0, metavar="K", help="save a checkpoint every K steps")
    parser.add_argument("--resume", action="store_true", help="continue from --checkpoint if it holds one")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for a peer rank")
    parser.add_argument("--fail-at-step", type=int, default=None, metavar="N",
                        help="the last rank exits at step N (first attempt only): a lost rank, for trying --resume")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    config = PRESETS[args.preset].with_(attention=args.attention)
    model = GPT(config)
    data = load_corpus(args.corpus_mb)
    options = {"microbatches": args.microbatches, "compiler": args.compiler, "schedule": args.schedule,
               "profile": args.timeline is not None, "timeout": args.timeout}
    if args.stages is not None:
        options["stages"] = args.stages
    backend = None
    if args.backend == "zb":
        backend = zb.ZbBackend(options)
        step_fn = torch.compile(model, backend=backend)
    elif args.backend == "inductor":
        step_fn = torch.compile(model)
    else:
        step_fn = model
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    params = sum(p.numel() for p in model.parameters())
    rank = int(os.environ.get("RANK", "0"))
    say = print if rank == 0 else (lambda *a, **k: None)
    say(f"model: GPT {args.preset} ({params / 1e6:.2f} M parameters, {config}); corpus: {len(data) / 2**20:.1f} MiB"
          " of Python stdlib source")
    say(f"backend: {args.backend}" + (f", zb options {options}" if args.backend == "zb" else "")
          + f"; batch {args.batch_size} x {config.block_size} tokens, {args.steps} steps, lr {args.lr}")

    generator = torch.Generator().manual_seed(args.seed)
    stream = batches(data, args.batch_size, config.block_size, generator)
    losses, first_step, timed, start = [], 0.0, 0.0, time.perf_counter()
    first = 1
    if args.resume and zb.checkpoint_exists(args.checkpoint):
        loading = time.perf_counter()
        extra = zb.load_checkpoint(args.checkpoint, model, optimizer)
        generator.set_state(extra["data"])
        losses, first = extra["losses"], extra["step"] + 1
        say(f"resumed from {args.checkpoint} at step {extra['step']} (loaded in {time.perf_counter() - loading:.2f} s)")
    last_rank = int(os.environ.get("WORLD_SIZE", "1")) - 1
    for step in range(first, args.steps + 1):
        if step == args.fail_at_step and rank == last_rank and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
            print(f"rank {rank}: exiting at step {step} (--fail-at-step)", flush=True)
            os._exit(1)
        x, y = next(stream)
        t0 = time.perf_counter()
        loss = step_fn(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - t0
        if step == first:
            first_step = elapsed
        else:
            timed += elapsed
        losses.append(loss.item())
        if args.save_every and step % args.save_every == 0:
            saving = time.perf_counter()
            zb.save_checkpoint(args.checkpoint, model, optimizer, step=step,
                               data=generator.get_state(), losses=losses)
            say(f"step {step:5d}  saved {args.checkpoint} in {time.perf_counter() - saving:.2f} s")
        if step % args.log_every == 0 or step == args.steps:
            recent = sum(losses[-args.log_every:]) / len(losses[-args.log_every:])
            rate = (step - first) * x.numel() / timed if timed else float("nan")
            say(f"step {step:5d}  loss {recent:.4f}  {rate:8.0f} tokens/s")
    head = sum(losses[:10]) / min(10, len(losses))
    tail = sum(losses[-10:]) / min(10, len(losses))
    step_time = timed / max(1, args.steps - first)
    say(f"first step (includes compilation): {first_step:.1f} s; later steps: {step_time * 1e3:.1f} ms each")
    result_extra = report_pipeline(backend, args.timeline, say) if backend is not None else {}
    say(f"loss fell from {head:.3f} (first 10 steps) to {tail:.3f} (last 10 steps) in "
          f"{time.perf_counter() - start:.0f} s")
    result = {"first_step_s": first_step, "step_s": step_time, "loss_start": head, "loss_end": tail,
              "final_loss": losses[-1] if losses else None, **result_extra}
    if args.json and rank == 0:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
