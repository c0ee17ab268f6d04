"""zb on CUDA: one training step of the example GPT through zb vs eager, the loss and every gradient.

    PYTHONPATH=. python bench/gpu/gpt_on_cuda.py
    PYTHONPATH=bench/gpu/shim:. python bench/gpu/gpt_on_cuda.py     # with torch older than 2.13 (see shim/)

Every schedule (one stage per rank on 2 ranks; zb-v, v-half, v-min and interleaved-1f1b on 4 stages over 2 ranks),
in one process (no process group, the in-process transport under NCCL's point-to-point rules), Inductor generating
Triton for every piece, attention fused. Exits non-zero if the loss or a gradient differs from eager by more than
1e-4 relative. Then zb's fused optimizer update (options["optimizer"], SGD with momentum, post-validation) for 3
steps against torch.optim on eager, parameters within 1e-4 relative.
"""
import copy
import time

import torch

import zb
import zb.schedules
from examples.gpt import GPT, PRESETS

torch.manual_seed(0)
dev = "cuda"
for preset in ("small",):
    cfg = PRESETS[preset].with_(tie_weights=False)
    model = GPT(cfg).to(dev)
    ref = copy.deepcopy(model)
    x = torch.randint(0, cfg.vocab_size, (8, cfg.block_size), device=dev)
    y = torch.randint(0, cfg.vocab_size, (8, cfg.block_size), device=dev)
    for schedule in zb.schedules.SCHEDULES:
        torch._dynamo.reset()
        m = copy.deepcopy(ref)
        two = schedule in zb.schedules.V_SHAPED or schedule == "interleaved-1f1b"
        backend = zb.ZbBackend({"stages": 4 if two else 2, "schedule": schedule, "microbatches": 4,
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
    torch._dynamo.reset()
    m, eager = copy.deepcopy(ref), copy.deepcopy(ref)
    fused = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    plain = torch.optim.SGD(eager.parameters(), lr=0.05, momentum=0.9)
    f = torch.compile(m, backend="zb", options={"stages": 2, "schedule": "zb-h1", "microbatches": 4,
                                                 "compiler": "inductor", "optimizer": fused})
    for _ in range(3):
        f(x, y)
        plain.zero_grad()
        eager(x, y).backward()
        plain.step()
    zb.synchronize(fused)
    worst = max(((p - q).abs().max() / q.abs().max().clamp_min(1e-12)).item()
                for p, q in zip(m.parameters(), eager.parameters()))
    print("fused SGD update, 3 steps: max relative parameter error", worst, flush=True)
    assert worst < 1e-4, f"the fused update differs from torch.optim by {worst:.2e} relative"
print("GPU GPT OK")
