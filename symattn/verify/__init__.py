"""Verification of attention implementations against certified references.

``verify`` compares an implementation's output, attention weights and per-head outputs (those
given) with the reference of a Problem and returns a Report. The report gives absolute,
relative, ULP and normwise errors, the worst entries, NaN and infinities, notes on overflow and
NaN leaks, the known mistakes that a mismatch fits, and a verdict against a Tolerance.
"""

from .cases import Case, load_case
from .check import mean_over_heads, verify
from .diagnose import Diagnosis, diagnose
from .metrics import EntryError, StageComparison, Tolerance, compare_stage
from .report import Report

__all__ = [
    "Case",
    "Diagnosis",
    "EntryError",
    "Report",
    "StageComparison",
    "Tolerance",
    "compare_stage",
    "diagnose",
    "load_case",
    "mean_over_heads",
    "verify",
]
