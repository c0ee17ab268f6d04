"""The zb pass pipeline. The order lives here and nowhere else."""

from zb.passes.analyze_batch import analyze_batch
from zb.passes.autocast_regions import autocast_regions
from zb.passes.capture_joint import capture_joint
from zb.passes.fuse_attention import fuse_attention
from zb.passes.normalize_loss import normalize_loss
from zb.passes.assign_updates import assign_updates
from zb.passes.record_boundaries import record_boundaries
from zb.passes.partition_fw_bw import partition_fw_bw
from zb.passes.partition_stages import partition_stages
from zb.passes.precision_policy import precision_policy
from zb.passes.plan import PIECES, InputSpec, Plan, Stage
from zb.passes.runner import PassError, dump_plan, run_passes
from zb.passes.split_backward import split_backward

# Each pass takes the Plan and returns it; see each file's docstring for its contract.
PASSES = [
    autocast_regions,
    precision_policy,
    fuse_attention,
    analyze_batch,
    normalize_loss,
    partition_stages,
    capture_joint,
    partition_fw_bw,
    split_backward,
    record_boundaries,
    assign_updates,
]

__all__ = [
    "PASSES",
    "PIECES",
    "InputSpec",
    "PassError",
    "analyze_batch",
    "Plan",
    "Stage",
    "capture_joint",
    "dump_plan",
    "fuse_attention",
    "normalize_loss",
    "assign_updates",
    "partition_fw_bw",
    "run_passes",
    "split_backward",
]
