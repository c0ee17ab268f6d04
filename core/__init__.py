"""What every layer shares: the errors zb raises and the options it is built with.

Nothing here imports torch at import time (options check torch types only when a value is given), so the command
line and the schedules can use these without loading torch.
"""
