"""Operators zb's passes insert and its runtime calls: the flash-attention torch.library operator with its
Triton and CPU kernels (attention.py, attention_kernels.py), and the fused parameter updates (optimizer.py).

The bottom layer above core: it imports no other zb layer, so passes, codegen and runtime can all use it.
"""
