"""Errors zb raises on purpose: each says what is wrong and what to change."""


class ZbError(RuntimeError):
    """Base class for every error zb raises about a model, an input or an option.

    `agreed`: every rank of the job raised this same error at the same point, from data they had all gathered, with
    no communication left outstanding; such an error does not end the pipeline (runtime/comm.py `Failures`)."""

    agreed = False


class ZbOptionError(ZbError, ValueError):
    """An unknown option, or a known option with a wrong value."""


class ZbUnsupportedError(ZbError):
    """The model does something zb cannot compile yet (a graph break, a non-scalar loss, ...)."""


class ZbPeerError(ZbError):
    """Another rank of the pipeline (or of its data-parallel group) failed: this rank abandons the step."""
