"""The autograd side of a zb training step: the step runs whole when the compiled function is called, and
`loss.backward()` hands out the gradients it computed.

The whole step (forward and backward of every microbatch, in the schedule's order) runs in the forward, because a
pipeline interleaves forwards and backwards of different microbatches. The step's backward starts from
d(loss)/d(loss) = 1 (or option grad_scaler's scale); `loss.backward()` then hands out the step's gradients scaled
by the gradient that arrives, exact for a scalar loss. With option 'optimizer' the step also ran the update, and
the loss it returns is a `StepLoss`, with no backward left to run.
"""

from __future__ import annotations

from typing import Any

import torch

from zb.core.errors import ZbError, ZbUnsupportedError
from zb.runtime.released import zb_internal


class StepLoss(torch.Tensor):
    """The loss of a step zb already finished, update included (options["optimizer"]): a detached tensor whose
    backward() says why there is nothing left to do."""

    def backward(self, *args: Any, **kwargs: Any) -> None:
        raise ZbError(
            "this loss comes from a zb training step that already ran the backward and the optimizer update "
            "(options['optimizer']); do not call loss.backward() or optimizer.step(): call the model again for "
            "the next step, or compile without 'optimizer' to run backward and the optimizer yourself"
        )


class TrainingStep(torch.autograd.Function):
    """Connects a whole zb training step to autograd: forward runs it, backward hands out its gradients."""

    @staticmethod
    def forward(ctx, runner: Any, *args: Any):  # runner: the PipelineRunner (runtime/runner.py) that calls it
        outputs, grads = runner.run(args)
        ctx.grads, ctx.program, ctx.scale = grads, runner.program, runner.executor.seed_scale
        # An extra output that depends on parameters requires grad, as in eager, so that differentiating it is
        # an error in backward below rather than a gradient silently missing.
        loss = runner.program.loss
        learned = loss.learned if loss is not None else [False] * len(outputs)
        ctx.mark_non_differentiable(*(o for j, o in enumerate(outputs) if j > 0 and isinstance(o, torch.Tensor)
                                      and not (learned[j] and o.is_floating_point())))
        return tuple(outputs)

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, *extra: Any):
        with zb_internal():
            return TrainingStep._backward(ctx, grad_loss, *extra)

    @staticmethod
    def _backward(ctx, grad_loss: torch.Tensor, *extra: Any):
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise ZbError(
                "backward through a zb training step ran twice; each call of the compiled function computes "
                "gradients for one backward"
            )
        for j, grad in enumerate(extra, start=1):
            if grad is not None and bool((grad != 0).any()):
                raise ZbError(
                    f"output {j} of the compiled function was differentiated, but zb runs the backward of the loss "
                    "(output 0) only, inside the step; add the term into the loss inside the compiled function, "
                    f"for example `return loss + 0.01 * aux, aux.detach()`"
                )
        # The step's backward started from d(loss) = ctx.scale (option grad_scaler's scale, else 1): the gradients
        # are ctx.scale times the loss's; what arrives here asks for grad_loss times them.
        # Compared in float64: a float16 loss scaled past 65504 arrives as inf (eager's gradients are then all inf
        # and its scaler skips the step), which must not pass for the finite scale the step started from.
        exact_one = bool((grad_loss.double() == ctx.scale).all())
        program = ctx.program
        finite = bool(torch.isfinite(grad_loss).all())  # inf: the scaled loss overflowed, every gradient is non-finite
        if not exact_one and finite and torch.float16 in program.compute_dtypes and ctx.scale != 1.0:
            raise ZbUnsupportedError(
                f"with option 'grad_scaler' the step's backward started from the scaler's scale {ctx.scale:g}, so "
                "loss.backward() must be called on exactly scaler.scale(loss) (float16 compute: a backward from "
                f"another value, here {float(grad_loss):g}, would flush other gradients to zero than eager's)")
        if not exact_one and finite and torch.float16 in program.compute_dtypes:
            raise ZbUnsupportedError(
                "loss scaling (torch.amp.GradScaler, or loss.backward(gradient) other than 1) with float16 compute "
                "needs option 'grad_scaler' (your scaler): eager runs the float16 backward from the scaled loss, so "
                "small gradients survive there that zb's backward, run inside the step, would flush to zero unless it "
                "starts from the same scale. Pass options={'grad_scaler': scaler} and call "
                "scaler.scale(loss).backward()")
        if program.compute_dtypes and any(torch.is_autocast_enabled(d) for d in ("cpu", "cuda")):
            raise ZbUnsupportedError(
                "loss.backward() was called inside a torch.autocast region: eager would run the backward's float32 "
                "operations under autocast too, while zb ran the step's backward as it runs after the region. Call "
                "loss.backward() after the `with torch.autocast(...)` block, as PyTorch's mixed-precision examples do")
        factor = grad_loss if ctx.scale == 1.0 else grad_loss.double() / ctx.scale
        return (None, *[g if g is None or exact_one else g * factor for g in grads])

