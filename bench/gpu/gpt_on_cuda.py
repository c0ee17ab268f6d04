"""zb on CUDA: one training step of the example GPT through zb vs eager, the loss and every gradient.

    PYTHONPATH=. python bench/gpu/gpt_on_cuda.py
    PYTHONPATH=bench/gpu/shim:. python bench/gpu/gpt_on_cuda.py     # with torch older than 2.13 (see shim/)

zb-h1 on 2 stages and zb-v on 4 stages, in one process (no process group), Inductor generating Triton for every
piece. Exits non-zero if the loss or a gradient differs from eager by more than 1e-4 relative.
"""
import copy
import time

import torch

import zb
from examples.gpt import GPT, PRESETS

torch.manual_seed(0)
dev = "cuda"
for preset in ("small",):
    cfg = PRESETS[preset].with_(tie_weights=False)
    model = GPT(cfg).to(dev)
    ref = copy.deepcopy(model)
    x = torch.randint(0, cfg.vocab_size, (8, cfg.block_size), device=dev)
    y = torch.randint(0, cfg.vocab_size, (8, cfg.block_size), device=dev)
    for schedule in ("zb-h1", "zb-v"):
        torch._dynamo.reset()
        m = copy.deepcopy(ref)
        backend = zb.ZbBackend({"stages": 2 if schedule != "zb-v" else 4, "schedule": schedule, "microbatches": 4,
                                "compiler": "inductor"})
        f = torch.compile(m, backend=backend)
        t = time.time()
        loss = f(x, y)
        loss.backward()
        ref.zero_grad()
        want = ref(x, y)
        want.backward()
        torch.cuda.synchronize()
        print(schedule, "loss", loss.item(), want.item(), f"compile+step {time.time() - t:.1f}s", flush=True)
        torch.testing.assert_close(loss, want, rtol=1e-4, atol=1e-5)
        worst = 0.0
        for p, q in zip(m.parameters(), ref.parameters()):
            err = ((p.grad - q.grad).abs().max() / q.grad.abs().max().clamp_min(1e-12)).item()
            worst = max(worst, err)
        print(schedule, "max relative grad error", worst, "fused attention",
              backend.plans[0].counters.get("fused_attention"), flush=True)
        assert worst < 1e-4, f"{schedule}: a gradient differs from eager by {worst:.2e} relative"
print("GPU GPT OK")
