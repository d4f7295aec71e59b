"""The certified pipeline entry by entry, for any ball or interval arithmetic.

Projections and QKᵀ are exact integer arithmetic (``ScaledIntegers``, NumPy object arrays of
Python ints). From the scale on, each entry is one of three kinds. It is an exact ``Fraction``
while everything it depends on is exact, such as a rational scale or a query row with one visible
key. Otherwise it is an enclosure from the ``Arithmetic`` in use (mpmath.iv intervals or
python-flint arb balls), or a special value (NaN, −inf). Python loops over entries make this path slow beyond a few thousand logits;
it is the mpmath engine, and the plain path that the fast flint engine is checked against.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Union

import numpy as np

from ..exact_arrays import ScaledIntegers
from ..problem import Problem
from .reference import Intervals

NAN = float("nan")
NEG_INF = float("-inf")

Enclosure = object  # an mpmath.iv interval or a flint.arb ball
Value = Union[Fraction, Enclosure, float]  # exact, enclosure, or NaN / -inf


class Arithmetic:
    """Ball or interval arithmetic at a fixed working precision: what the pipeline needs of it.

    Enclosures must support +, −, * and / with each other (rigorously, rounding outward).
    """

    zero: Enclosure

    def enclose(self, value: Fraction) -> Enclosure:
        """Return an enclosure of an exact rational."""
        raise NotImplementedError

    def sqrt(self, value: Enclosure) -> Enclosure:
        raise NotImplementedError

    def exp(self, value: Enclosure) -> Enclosure:
        raise NotImplementedError

    def approximate(self, value: Enclosure) -> float:
        """Return a float near the value (no accuracy is promised)."""
        raise NotImplementedError

    def endpoints(self, value: Enclosure) -> tuple[int, int, int]:
        """Return (lo, hi, den) with lo/den ≤ value ≤ hi/den exactly."""
        raise NotImplementedError


def run_pipeline(problem: Problem, stages: set[str], arithmetic: Arithmetic) -> dict[str, Intervals]:
    """Evaluate the requested stages entry by entry with the given arithmetic."""
    return _Pipeline(problem, stages, arithmetic).run()


class _Pipeline:
    def __init__(self, problem: Problem, stages: set[str], arithmetic: Arithmetic) -> None:
        self.problem = problem
        self.stages = stages
        self.arithmetic = arithmetic
        self.results: dict[str, Intervals] = {}

    def keep(self, name: str, make) -> None:
        if name in self.stages:
            self.results[name] = make()

    def run(self) -> dict[str, Intervals]:
        problem = self.problem
        exact = {name: ScaledIntegers.from_array(array) for name, array in problem.inputs.items()}

        # Projections, exact: rows are tokens, so Q = X_q W_Q + b_Q.
        if problem.direct:
            Q, K, V = exact["Q"], exact["K"], exact["V"]
        else:
            Q = _project(exact["query_source"], exact["W_Q"], exact.get("b_Q"))
            K = _project(exact["key_source"], exact["W_K"], exact.get("b_K"))
            V = _project(exact["value_source"], exact["W_V"], exact.get("b_V"))
        for name, matrix in (("Q", Q), ("K", K), ("V", V)):
            self.keep(name, lambda matrix=matrix: _exact_intervals(matrix))

        visible, bias = problem.visibility()
        scale_a, scale_b = problem.scale_factor()
        arithmetic = self.arithmetic
        scale = None if scale_b == 1 else arithmetic.enclose(scale_a) * arithmetic.sqrt(arithmetic.enclose(scale_b))
        d_k, d_v = problem.d_k, problem.d_v
        head_outputs = []
        for i in range(problem.heads):
            Q_i = Q.columns(i * d_k, (i + 1) * d_k)
            K_i = K.columns(i * d_k, (i + 1) * d_k)
            V_i = V.columns(i * d_v, (i + 1) * d_v)
            Z_i = Q_i @ K_i.T  # (n_q, n_kv), exact
            for name, matrix in (("Q", Q_i), ("K", K_i), ("V", V_i), ("Z", Z_i)):
                self.keep(f"{name}_{i}", lambda matrix=matrix: _exact_intervals(matrix))

            Z_scaled = _scaled(Z_i, scale_a, scale, arithmetic)
            self.keep(f"Z_scaled_{i}", lambda values=Z_scaled: self.intervals(values))
            Z_masked = _masked(Z_scaled, visible[i], None if bias is None else bias[i], arithmetic)
            self.keep(f"Z_masked_{i}", lambda values=Z_masked: self.intervals(values))
            # A logit is s·z + b, so equal exact (z, b) pairs mean exactly equal logits.
            logit_keys = _logit_keys(Z_i, None if bias is None else bias[i])
            A_i = _softmax_rows(Z_masked, logit_keys, problem.spec.masked_rows, arithmetic)
            self.keep(f"A_{i}", lambda values=A_i: self.intervals(values))
            O_i = _matmul(A_i, _fraction_rows(V_i), arithmetic)  # (n_q, d_v)
            self.keep(f"O_{i}", lambda values=O_i: self.intervals(values))
            head_outputs.append(O_i)

        # Heads are concatenated head-major along features: (n_q, h * d_v).
        concat = [sum((rows[r] for rows in head_outputs), []) for r in range(problem.n_q)]
        self.keep("concat", lambda: self.intervals(concat))
        if "output" in self.stages:
            output = concat
            if "W_O" in exact:
                output = _matmul(concat, _fraction_rows(exact["W_O"]), arithmetic)
                if "b_O" in exact:
                    b_O = _fraction_rows(exact["b_O"])[0]
                    output = [[_add(value, b, arithmetic) for value, b in zip(row, b_O)] for row in output]
            self.results["output"] = self.intervals(output)
        return self.results

    def intervals(self, rows: list[list[Value]]) -> Intervals:
        """Convert rows of exact values, enclosures and special values to exact interval endpoints."""
        shape = (len(rows), len(rows[0]))
        lo, hi, den, special = [], [], [], {}
        for k, value in enumerate(v for row in rows for v in row):
            if isinstance(value, float):
                special[k] = value
                low, high, denominator = 0, 0, 1
            elif isinstance(value, Fraction):
                low = high = value.numerator
                denominator = value.denominator
            else:
                low, high, denominator = self.arithmetic.endpoints(value)
            lo.append(low)
            hi.append(high)
            den.append(denominator)
        return Intervals(shape, lo, hi, den, special)


def _project(source: ScaledIntegers, weight: ScaledIntegers, bias: ScaledIntegers | None) -> ScaledIntegers:
    projected = source @ weight
    return projected if bias is None else projected + bias


def _fraction_rows(matrix: ScaledIntegers) -> list[list[Fraction]]:
    numerators, denominator = matrix.fractions()
    columns = matrix.shape[1]
    values = [Fraction(n, denominator) for n in numerators]
    return [values[r * columns:(r + 1) * columns] for r in range(matrix.shape[0])]


def _scaled(Z: ScaledIntegers, scale_a: Fraction, scale: Enclosure | None,
            arithmetic: Arithmetic) -> list[list[Value]]:
    """Multiply by the scale: exactly when it is rational, otherwise as enclosures."""
    rows = _fraction_rows(Z)
    if scale is None:
        return [[z * scale_a for z in row] for row in rows]
    return [[arithmetic.enclose(z) * scale for z in row] for row in rows]


def _masked(Z_scaled: list[list[Value]], visible: np.ndarray, bias: np.ndarray | None,
            arithmetic: Arithmetic) -> list[list[Value]]:
    """Add the exact additive bias to visible logits and put −inf where a key is hidden."""
    rows = []
    for i, row in enumerate(Z_scaled):
        masked = []
        for j, value in enumerate(row):
            if not visible[i, j]:
                masked.append(NEG_INF)
            elif bias is None or bias[i, j] == 0:
                masked.append(value)
            else:
                masked.append(_add(value, Fraction(bias[i, j]), arithmetic))
        rows.append(masked)
    return rows


def _logit_keys(Z: ScaledIntegers, bias: np.ndarray | None) -> list[list[tuple]]:
    """Return the exact (z, b) pair behind each logit s·z + b of one head."""
    rows = _fraction_rows(Z)
    if bias is None:
        return [[(z, 0) for z in row] for row in rows]
    return [[(z, Fraction(bias[i, j])) for j, z in enumerate(row)] for i, row in enumerate(rows)]


def _softmax_rows(Z: list[list[Value]], keys: list[list[tuple]], masked_rows: str,
                  arithmetic: Arithmetic) -> list[list[Value]]:
    """Return e^{z_ij − m_i} / Σ_k e^{z_ik − m_i} per row, with m_i near the row maximum.

    Subtracting the same number m_i from every logit of a row leaves the softmax unchanged and
    keeps every exponential at most about 1. Hidden keys weigh exactly 0. A row with one visible
    key, or whose visible logits are exactly equal (equal ``keys``), has exact weights 1/count,
    as SymPy's automatic simplification gives them.
    """
    rows = []
    for i, row in enumerate(Z):
        kept = [j for j, value in enumerate(row) if not _is_special(value)]
        if not kept:
            fill = Fraction(0) if masked_rows == "zeros" else NAN
            rows.append([fill] * len(row))
            continue
        if len({keys[i][j] for j in kept}) == 1:
            weight = Fraction(1, len(kept))
            rows.append([weight if j in kept else Fraction(0) for j in range(len(row))])
            continue
        approximations = [float(row[j]) if isinstance(row[j], Fraction) else arithmetic.approximate(row[j]) for j in kept]
        shift = arithmetic.enclose(Fraction(max(approximations)))  # a float, so the enclosure is exact
        exps = {j: arithmetic.exp(_enclose(row[j], arithmetic) - shift) for j in kept}
        total = sum(exps.values(), arithmetic.zero)
        rows.append([exps[j] / total if j in exps else Fraction(0) for j in range(len(row))])
    return rows


def _matmul(left: list[list[Value]], right: list[list[Fraction]], arithmetic: Arithmetic) -> list[list[Value]]:
    """Multiply a matrix of values by an exact matrix; a NaN in a row spreads to the whole output row."""
    inner, columns = len(right), len(right[0])
    result = []
    for row in left:
        if any(isinstance(value, float) for value in row):
            result.append([NAN] * columns)
            continue
        out_row = []
        for c in range(columns):
            total: Value = Fraction(0)
            for k in range(inner):
                if right[k][c] == 0 or (isinstance(row[k], Fraction) and row[k] == 0):
                    continue
                total = _add(total, _multiply(row[k], right[k][c], arithmetic), arithmetic)
            out_row.append(total)
        result.append(out_row)
    return result


def _is_special(value: Value) -> bool:
    return isinstance(value, float)


def _add(a: Value, b: Value, arithmetic: Arithmetic) -> Value:
    if _is_special(a) and _is_special(b):
        return a + b
    if _is_special(a):  # NaN or −inf absorbs any finite term
        return a
    if _is_special(b):
        return b
    if isinstance(a, Fraction) and isinstance(b, Fraction):
        return a + b
    return _enclose(a, arithmetic) + _enclose(b, arithmetic)


def _multiply(a: Value, b: Value, arithmetic: Arithmetic) -> Value:
    if isinstance(a, Fraction) and isinstance(b, Fraction):
        return a * b
    return _enclose(a, arithmetic) * _enclose(b, arithmetic)


def _enclose(value: Value, arithmetic: Arithmetic) -> Enclosure:
    return arithmetic.enclose(value) if isinstance(value, Fraction) else value


def _exact_intervals(matrix: ScaledIntegers) -> Intervals:
    numerators, denominator = matrix.fractions()
    return Intervals.exact(matrix.shape, numerators, denominator)
