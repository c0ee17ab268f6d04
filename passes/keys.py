"""Value keys and piece names, as typed values: the names pieces give the tensors of one microbatch they pass each
other, and the names of the pieces themselves.

A key is made here only (`input_key(3)`, `act_key("relu")`, `key.grad()`) and read by its fields
(`key.kind is Kind.IN`, `key.index`, `key.role is Role.GRAD`), never by parsing its text. Its text (`str(key)`) is
what dumps, `zb inspect` and error messages show:

    in:<i>         Kind.IN, index i: the i-th input of the Dynamo graph (parameter, buffer or user input)
    out:<j>        Kind.OUT, index j: the j-th output of the model (out:0 is the loss when training)
    act:<name>     Kind.ACT: an activation crossing from one pipeline stage to the next
    saved:<name>   Kind.SAVED: an activation F saves for the backward
    stash:<name>   Kind.STASH: a value B computes that W needs
    denominator:<i> Kind.DENOMINATOR: the i-th loss denominator (passes/normalize_loss.py)
    grad:<key>     Role.GRAD of a value key: the gradient of an input (grad:in:<i>, grad:act:<name>)
    tangent:<key>  Role.TANGENT of a value key: the incoming gradient of an output (tangent:out:0, tangent:act:<name>)

A piece is named by a `PieceName` (`PieceName.FORWARD`); its value, and its text in dump file names, is the name
it always had ("forward").
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class PieceName(enum.StrEnum):
    """The compiled pieces: a stage's F, B and W, and the graph of a microbatch's loss denominators; the value is
    the piece's name in dumps and files."""
    FORWARD = "forward"  # F
    BACKWARD_INPUT = "backward_input"  # B
    BACKWARD_WEIGHT = "backward_weight"  # W
    DENOMINATOR = "denominator"  # the loss denominators of one microbatch (passes/normalize_loss.py)


class Kind(enum.Enum):
    """What a value key names: a plan input or output, a boundary activation, a saved or stashed value, a loss
    denominator."""
    IN = "in"
    OUT = "out"
    ACT = "act"
    SAVED = "saved"
    STASH = "stash"
    DENOMINATOR = "denominator"


class Role(enum.Enum):
    """Whether a key is the value itself, its gradient (an output of B or W), or its incoming gradient (a tangent)."""
    VALUE = ""
    GRAD = "grad"
    TANGENT = "tangent"


_INDEXED = (Kind.IN, Kind.OUT, Kind.DENOMINATOR)


@dataclass(frozen=True, slots=True, repr=False)
class Key:
    """One value key. `part` is an index (IN, OUT, DENOMINATOR) or a node name (ACT, SAVED, STASH)."""

    kind: Kind
    part: int | str
    role: Role = Role.VALUE

    def __post_init__(self):
        if isinstance(self.part, int) != (self.kind in _INDEXED):
            raise TypeError(f"a {self.kind.value} key takes {'an index' if self.kind in _INDEXED else 'a name'}, "
                            f"not {self.part!r}")

    @property
    def index(self) -> int:
        """The input, output or denominator index of an IN, OUT or DENOMINATOR key."""
        if not isinstance(self.part, int):
            raise TypeError(f"{self} has no index")
        return self.part

    @property
    def name(self) -> str:
        """The node name of an ACT, SAVED or STASH key."""
        if not isinstance(self.part, str):
            raise TypeError(f"{self} has no name")
        return self.part

    def grad(self) -> Key:
        """The key of this value's gradient."""
        return self._as(Role.GRAD)

    def tangent(self) -> Key:
        """The key of the gradient this output receives from further on."""
        return self._as(Role.TANGENT)

    def value(self) -> Key:
        """The value a gradient or tangent key is of (the key itself for a value key)."""
        return Key(self.kind, self.part)

    def is_(self, kind: Kind, role: Role = Role.VALUE) -> bool:
        return self.kind is kind and self.role is role

    def _as(self, role: Role) -> Key:
        if self.role is not Role.VALUE:
            raise ValueError(f"{self} is already a {self.role.value} key")
        return Key(self.kind, self.part, role)

    def __str__(self) -> str:
        text = f"{self.kind.value}:{self.part}"
        return f"{self.role.value}:{text}" if self.role is not Role.VALUE else text

    def __repr__(self) -> str:
        return str(self)


def input_key(index: int) -> Key:
    return Key(Kind.IN, index)


def output_key(index: int) -> Key:
    return Key(Kind.OUT, index)


def act_key(name: str) -> Key:
    return Key(Kind.ACT, name)


def saved_key(name: str) -> Key:
    return Key(Kind.SAVED, name)


def stash_key(name: str) -> Key:
    return Key(Kind.STASH, name)


def denominator_key(index: int) -> Key:
    return Key(Kind.DENOMINATOR, index)


LOSS_TANGENT = output_key(0).tangent()  # the seed of the backward: the gradient of the loss (out:0)
