"""What every layer shares: the errors zb raises, the options it is built with, and the one door to PyTorch's private
APIs (torch_internals.py: every internal zb uses, why, and the torch version it was checked on).

errors and options import no torch at import time (options check torch types only when a value is given), so the
command line and the schedules can use them without loading torch; torch_internals is imported by the modules that
use torch, and loads Dynamo, AOTAutograd and Inductor only when first asked for them.
"""
