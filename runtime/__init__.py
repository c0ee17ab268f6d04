"""The thin runtime: run compiled pieces over microbatches and hand the result back to autograd."""

from zb.runtime.microbatch import MicrobatchRunner, split_microbatches

__all__ = ["MicrobatchRunner", "split_microbatches"]
