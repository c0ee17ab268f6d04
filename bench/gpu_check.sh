#!/usr/bin/env bash
# The checks that need one CUDA GPU, in one run (about 5-10 minutes on an H100/H200):
#   1. zb's Triton attention kernels, compiled (fp32, fp16, bf16), against eager attention;
#   2. the example GPT through zb on CUDA, every schedule, Inductor emitting Triton, attention fused, against
#      eager's loss and gradients; then the fused optimizer update against torch.optim;
#   3. the attention benchmark (zb's kernels vs flash SDPA).
# Usage, from the repository root on the GPU machine (torch 2.13 with CUDA installed; with an older torch put
# bench/gpu/shim first on PYTHONPATH):
#     bash bench/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}."
PY="${PY:-python}"
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())"
echo "== 1. Triton attention kernels, compiled =="
"$PY" -m pytest -q -p no:cacheprovider tests/kernels/attention_kernels_check.py
echo "== 2. the example GPT through zb on CUDA, every schedule; the fused update =="
"$PY" bench/gpu/gpt_on_cuda.py
echo "== 3. attention benchmark =="
"$PY" bench/attention.py
echo "GPU CHECK OK"
