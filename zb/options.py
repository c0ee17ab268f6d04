"""The options of the zb backend: one frozen dataclass, validated once, shared by every pass.

`torch.compile(model, backend="zb", options={...})` hands the dict to `Options.from_dict`. Each field carries
its documentation and its check in `metadata`, so the error for a wrong value, the `zb inspect --help` text and
docs all come from the same place. A later capability adds a field here and nothing else changes.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from zb.errors import ZbOptionError


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ZbOptionError(f"option {name!r} must be a positive int, got {value!r}")
    return value


def _choice(*choices: str) -> Callable[[str, Any], str]:
    def check(name: str, value: Any) -> str:
        if value not in choices:
            raise ZbOptionError(
                f"option {name!r} must be one of {', '.join(map(repr, choices))}; got {value!r}"
            )
        return value

    check.choices = choices  # type: ignore[attr-defined]
    return check


def _option(default: Any, doc: str, check: Callable[[str, Any], Any]) -> Any:
    return field(default=default, metadata={"doc": doc, "check": check})


@dataclass(frozen=True)
class Options:
    microbatches: int = _option(
        1, "number of microbatches; every tensor input is split along dim 0 into this many pieces", _positive_int
    )
    compiler: str = _option(
        "inductor",
        "how each F/B/W piece is compiled: 'inductor' (C++ on CPU, Triton on GPU) or 'eager' (plain FX, "
        "for debugging)",
        _choice("inductor", "eager"),
    )

    @classmethod
    def from_dict(cls, options: dict[str, Any] | None) -> Options:
        """Validate a user's options dict; unknown names and wrong values raise ZbOptionError."""
        if options is None:
            return cls()
        if isinstance(options, Options):
            return options
        if not isinstance(options, dict):
            raise ZbOptionError(f"options must be a dict, got {type(options).__name__}")
        known = {f.name: f for f in dataclasses.fields(cls)}
        values = {}
        for name, value in options.items():
            if name not in known:
                close = difflib.get_close_matches(str(name), known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ZbOptionError(
                    f"unknown zb option {name!r}{hint}; valid options: {', '.join(sorted(known))}"
                )
            values[name] = known[name].metadata["check"](name, value)
        return cls(**values)

    @classmethod
    def parse_cli_value(cls, name: str, text: str) -> Any:
        """Turn a command-line string into the field's type (validation happens in from_dict)."""
        default = {f.name: f.default for f in dataclasses.fields(cls)}[name]
        if isinstance(default, bool):
            return text.lower() in ("1", "true", "yes", "on")
        if isinstance(default, int):
            try:
                return int(text)
            except ValueError:
                raise ZbOptionError(f"option {name!r} takes an int, got {text!r}") from None
        return text

    @classmethod
    def describe(cls) -> list[tuple[str, Any, str]]:
        """(name, default, doc) for every option, in declaration order."""
        return [(f.name, f.default, f.metadata["doc"]) for f in dataclasses.fields(cls)]

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
