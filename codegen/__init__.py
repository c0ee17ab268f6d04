"""Codegen: a plan -> an executable program (each piece Inductor-compiled, or the FX graph itself for "eager",
with the data the runtime needs to run it; see program.py)."""

from zb.codegen.inductor import CompiledPiece, compile_plan
from zb.codegen.program import Piece, Program, Route, StageProgram, TensorSpec, build_program

__all__ = ["CompiledPiece", "Piece", "Program", "Route", "StageProgram", "TensorSpec", "build_program",
           "compile_plan"]
