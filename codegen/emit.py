"""The Triton code Inductor generates for a piece, without a GPU (`zb inspect --emit triton`).

On a GPU every piece's Inductor output is Triton anyway. On CPU, Inductor's Triton backend
(`cpu_backend="triton"`) generates the same kind of module but cannot compile it ("0 active drivers"). Here the
generation runs with the compile step replaced (Inductor's `get_code`), caches off (a cached C++ result must not
stand in), and, without a GPU, triton's backend hash read as a placeholder (it asks the missing driver; see
`zb.core.torch_internals.triton_hash_without_driver`). The text is what Inductor would run; it is written for
reading, not executed.
"""

from __future__ import annotations

import copy
import pathlib
import re

import torch
from torch import fx

from zb.core import torch_internals
from zb.passes.plan import PIECES, Plan


def emit_triton(gm: fx.GraphModule) -> str:
    """Inductor's generated module for one piece (wrapper and kernels), with its backend set to Triton."""
    example = [n.meta["val"] for n in gm.graph.find_nodes(op="placeholder")]
    settings = {"cpu_backend": "triton", "fx_graph_cache": False, "force_disable_caches": True}
    with (torch_internals.triton_hash_without_driver("ZB-EMIT-ONLY"), torch_internals.custom_triton_ops_opaque(),
          torch.no_grad()):
        codes = torch_internals.inductor_code(copy.deepcopy(gm), example, settings)
    return "\n\n".join(codes)


def triton_kernel_names(code: str) -> list[str]:
    """The names of the @triton.jit kernels in a generated module."""
    return re.findall(r"@triton\.jit\s*\ndef (\w+)\(", code)


def emit_plan(plan: Plan, directory: pathlib.Path) -> list[tuple[pathlib.Path, int]]:
    """Write `stage<i>_<piece>.triton.py` for every piece (and zb's own attention kernels when the plan uses them);
    returns each file with its number of Triton kernels."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    uses_attention = False
    for stage in plan.stages:
        for name in PIECES:
            gm = stage.pieces.get(name)
            if gm is None:
                continue
            uses_attention |= any("flash_attention" in str(n.target) for n in gm.graph.nodes)
            code = emit_triton(gm)
            path = directory / f"stage{stage.index}_{name}.triton.py"
            path.write_text(f"# zb stage {stage.index} {name}: Inductor's Triton output (emitted on "
                            f"{'a GPU' if torch.cuda.is_available() else 'CPU, not run'})\n" + code)
            written.append((path, len(triton_kernel_names(code))))
    if uses_attention:
        from zb.ops import attention_kernels

        source = pathlib.Path(attention_kernels.__file__).read_text()
        path = directory / "zb_flash_attention.triton.py"
        path.write_text("# zb's flash-attention kernels (torch.ops.zb.flash_attention and its backward); the pieces "
                        "above call the operator\n" + source)
        written.append((path, len(triton_kernel_names(source))))
    return written
