"""Runtime: a program (codegen/program.py) and a schedule -> one step, over the communication module."""

from zb.runtime.comm import DistributedComm, LocalComm
from zb.runtime.executor import StepExecutor
from zb.runtime.microbatch import split_microbatches
from zb.runtime.runner import PipelineRunner, sequential_schedule

__all__ = ["DistributedComm", "LocalComm", "PipelineRunner", "StepExecutor", "sequential_schedule",
           "split_microbatches"]
