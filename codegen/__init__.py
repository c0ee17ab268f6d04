"""Codegen: each piece of a plan -> a callable (Inductor-compiled, or the FX graph itself for "eager")."""

from zb.codegen.inductor import CompiledPiece, compile_plan

__all__ = ["CompiledPiece", "compile_plan"]
