"""The thin runtime: run a plan's schedule over microbatches and ranks, and hand the result back to autograd."""

from zb.runtime.executor import StepExecutor
from zb.runtime.microbatch import combine_outputs, split_microbatches
from zb.runtime.runner import PipelineRunner, sequential_schedule
from zb.runtime.transport import DistributedTransport, InProcessTransport

__all__ = ["DistributedTransport", "InProcessTransport", "PipelineRunner", "StepExecutor", "combine_outputs",
           "sequential_schedule", "split_microbatches"]
