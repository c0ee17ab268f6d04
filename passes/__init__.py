"""The zb pass pipeline. The order lives here and nowhere else."""

from zb.passes.capture_joint import capture_joint
from zb.passes.fuse_attention import fuse_attention
from zb.passes.fuse_optimizer import fuse_optimizer
from zb.passes.insert_communication import insert_communication
from zb.passes.partition_fw_bw import partition_fw_bw
from zb.passes.partition_stages import partition_stages
from zb.passes.plan import PIECES, InputSpec, Plan, Stage
from zb.passes.runner import PassError, dump_plan, run_passes
from zb.passes.split_backward import split_backward

# Each pass takes the Plan and returns it; see each file's docstring for its contract.
PASSES = [
    fuse_attention,
    partition_stages,
    capture_joint,
    partition_fw_bw,
    split_backward,
    insert_communication,
    fuse_optimizer,
]

__all__ = [
    "PASSES",
    "PIECES",
    "InputSpec",
    "PassError",
    "Plan",
    "Stage",
    "capture_joint",
    "dump_plan",
    "fuse_attention",
    "fuse_optimizer",
    "partition_fw_bw",
    "run_passes",
    "split_backward",
]
