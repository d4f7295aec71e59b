"""The python-flint engine: exact projections and QKᵀ, then rigorous enclosures of the rest.

Two paths compute the same certified stages:

- Small problems run the entry-by-entry pipeline (``entrywise``) with python-flint arb balls.
  It keeps exact values exact where SymPy would (a row with one visible key has weight exactly 1).
- Larger problems run the vectorised path below. Float inputs are dyadic rationals, so each input
  matrix becomes an integer matrix times a power of two, and the projections, QKᵀ, A·V and the
  output projection are exact integer matrix products. Those go through a residue number system,
  one exact float64 BLAS product per prime (``limbs``). The softmax runs in fixed point with
  F = 24·k fraction bits (``fixedpoint``), and every step adds a proven bound to a float64 radius.

Why not arb for the large path: python-flint 0.9 costs about 1 µs per entry for each exp and for
each conversion into or out of arb. An arb_mat product with 150-bit entries costs about as much per
element (measured on a 2-core AMD EPYC). At 128×128 tokens, d_model 768 and 12 heads that adds up to well
over a second, so the vectorised path does the same work with whole-array NumPy operations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from ..errors import EvaluationError
from ..exact_arrays import lowest_bit_exponent
from ..problem import Problem
from .blas import single_threaded_blas
from .fixedpoint import exp_error, exp_negative, multiply_truncated, product_error
from .limbs import (
    LIMB_BITS, CapacityError, approximate, float_limbs, from_ints, limb_count, normalize, primes_for, signed_chunks,
    to_ints,
)
from .reference import Intervals
from .stage_values import BallValues, ExactValues, dyadic_ball_endpoints

# Problems with fewer logits (heads · n_q · n_kv) than this run entry by entry.
VECTORISED_MIN_LOGITS = 1024
# Integer forms of inputs wider than this many bits run entry by entry instead.
MAX_INPUT_BITS = 900
# Working precisions above this run entry by entry. A fixed-point softmax that needs more bits
# is one whose weights are tiny (logits thousands apart), which arb balls carry with their own
# exponents, and the exp tables of the fixed-point path grow with the square of the precision.
VECTORISED_MAX_PRECISION = 1024


def evaluate(problem: Problem, precision: int, stages: set[str]) -> dict[str, object]:
    """Evaluate the requested stages at ``precision`` bits plus guard bits."""
    inputs = integer_inputs(problem) if enough_logits(problem) and precision <= VECTORISED_MAX_PRECISION else None
    if inputs is not None:
        try:
            return VectorisedPipeline(problem, precision, stages, inputs).run()
        except CapacityError:
            # Integers wider than 31 primes can hold (very wide inputs or a precision of many
            # hundred bits) go through the entry-by-entry path, which is slow but has no limit.
            pass
    return evaluate_entrywise(problem, precision, stages)


def use_vectorised(problem: Problem) -> bool:
    """Return whether the vectorised path applies: enough logits, and float or integer inputs of moderate range."""
    return enough_logits(problem) and integer_inputs(problem) is not None


def enough_logits(problem: Problem) -> bool:
    return problem.heads * problem.n_q * problem.n_kv >= VECTORISED_MIN_LOGITS


def integer_inputs(problem: Problem) -> dict[str, "IntegerMatrix"] | None:
    """Return the inputs as integer matrices, or None when one is too wide for the vectorised path."""
    inputs = {}
    converted: dict[int, IntegerMatrix] = {}
    for name, array in problem.inputs.items():
        # One array may serve as two inputs (keys and values of cross attention); convert it once.
        matrix = converted.get(id(array))
        if matrix is None:
            matrix = converted[id(array)] = IntegerMatrix.from_array(array)
        if matrix is None:
            return None
        inputs[name] = matrix
    return inputs


def evaluate_entrywise(problem: Problem, precision: int, stages: set[str]) -> dict[str, Intervals]:
    """Evaluate the requested stages entry by entry with arb balls at ``precision`` bits plus guard bits."""
    import flint

    from .entrywise import run_pipeline

    guard = 2 * max(problem.n_kv, problem.d_vmodel).bit_length() + 16
    saved = flint.ctx.prec
    flint.ctx.prec = precision + guard
    try:
        return run_pipeline(problem, stages, BallArithmetic())
    finally:
        flint.ctx.prec = saved


class BallArithmetic:
    """python-flint arb balls at the current ``flint.ctx.prec``, for the entry-by-entry pipeline."""

    def __init__(self) -> None:
        import flint

        self.flint = flint
        self.zero = flint.arb(0)

    def enclose(self, value: Fraction):
        return self.flint.arb(value.numerator) / value.denominator

    def sqrt(self, value):
        return value.sqrt()

    def exp(self, value):
        return value.exp()

    def approximate(self, value) -> float:
        return float(value)

    def endpoints(self, value) -> tuple[int, int, int]:
        return ball_endpoints(value)


def ball_endpoints(value) -> tuple[int, int, int]:
    """Return (lo, hi, den) with lo/den = mid − rad and hi/den = mid + rad of an arb, exactly."""
    mantissa, exponent = (int(part) for part in value.mid().man_exp())
    radius_mantissa, radius_exponent = (int(part) for part in value.rad().man_exp())
    return dyadic_ball_endpoints(mantissa, exponent, radius_mantissa, radius_exponent)


@dataclass
class IntegerMatrix:
    """An exact input as integers in float64: value = values · 2^exponent, with |values| < 2^bits.

    A float64 represents any integer m · 2^s with |m| < 2^53 exactly, so a float matrix scaled to its
    smallest exponent stays a float64 array of exact integers, even above 2^53.
    """

    values: np.ndarray
    exponent: int
    bits: int

    @classmethod
    def from_array(cls, array: np.ndarray) -> "IntegerMatrix | None":
        """Return the exact integer form of a float or integer array, or None when it is too wide."""
        if array.ndim == 1:
            array = array.reshape(1, -1)
        if array.dtype.kind in "iu":
            values = array.astype(np.float64)
            if values.size and float(np.max(np.abs(values))) >= 2.0**53:
                return None
            return cls(values, 0, _bits_of(values))
        if array.dtype.kind != "f":
            return None
        base = lowest_bit_exponent(array)
        if base is None:
            return cls(np.zeros(array.shape), 0, 0)
        array = array.astype(np.float64, copy=False)
        largest = max(float(array.max()), -float(array.min()))
        if math.frexp(largest)[1] - base > MAX_INPUT_BITS:
            return None
        # Every value is a multiple of 2^base, so the scaling is exact. Where 2^-base is a normal
        # float64, a product takes 0.4 ms for 768 × 768 entries and ldexp 3.7 ms.
        values = array * 2.0**-base if -1022 <= -base <= 1023 else np.ldexp(array, -base)
        return cls(values, base, math.frexp(largest)[1] - base)

    def largest_scaled(self) -> float:
        """Return max |values| · 2^-bits, at most 1."""
        return math.ldexp(max(float(self.values.max()), -float(self.values.min()), 0.0), -self.bits)

    def chunks(self) -> np.ndarray:
        """Return 24-bit chunks c with values = Σ_j c[j] · 2^(24·j), shape (J, *shape): normalised limbs."""
        return float_limbs(self.values, max(1, math.ceil((self.bits + 1) / LIMB_BITS)))

    def limbs(self) -> np.ndarray:
        return self.chunks()


def _bits_of(values: np.ndarray) -> int:
    largest = float(np.max(np.abs(values))) if values.size else 0.0
    return math.frexp(largest)[1] if largest else 0


def _bits_of_limbs(limbs: np.ndarray, exponent_shift: int = 0) -> int:
    largest = float(np.max(np.abs(approximate(limbs)))) if limbs.size else 0.0
    return math.frexp(largest * (1 + 2.0**-40))[1] + exponent_shift if largest else 0


class VectorisedPipeline:
    """The certified stages of one problem, computed with whole-array operations."""

    def __init__(self, problem: Problem, precision: int, stages: set[str],
                 inputs: dict[str, IntegerMatrix] | None = None) -> None:
        self.problem = problem
        self.inputs = inputs if inputs is not None else integer_inputs(problem)
        self.stages = stages
        self.k = math.ceil(precision / LIMB_BITS)  # fraction limbs of logits and weights
        self.F = LIMB_BITS * self.k
        self.results: dict[str, object] = {}

    def wants(self, *prefixes: str) -> bool:
        return any(name == prefix or name.startswith(prefix + "_") for name in self.stages for prefix in prefixes)

    def run(self) -> dict[str, object]:
        problem = self.problem
        inputs = self.inputs

        # Projections, exact: rows are tokens, so Q = X_q W_Q + b_Q.
        if problem.direct:
            Q, K, V = (self._direct(inputs[name]) for name in ("Q", "K", "V"))
        else:
            Q = self._project(inputs["query_source"], inputs["W_Q"], inputs.get("b_Q"))
            K = self._project(inputs["key_source"], inputs["W_K"], inputs.get("b_K"))
            V = self._project(inputs["value_source"], inputs["W_V"], inputs.get("b_V"))
        self._keep_exact_projections(Q, K, V)
        if not self.wants("Z", "Z_scaled", "Z_masked", "A", "O", "concat", "output"):
            return self.results

        self._logits(Q, K)
        if not self.wants("A", "O", "concat", "output"):
            return self.results
        E = self._exponentials()
        self._weights(E)
        O = self._head_outputs(E, V)
        self._output(O, inputs)
        return self.results

    # Exact products -----------------------------------------------------------------------

    def _direct(self, matrix: IntegerMatrix) -> tuple[np.ndarray, int, int]:
        return matrix.limbs(), matrix.exponent, matrix.bits

    def _project(self, X: IntegerMatrix, W: IntegerMatrix, b: IntegerMatrix | None) -> tuple[np.ndarray, int, int]:
        """Return (limbs, exponent, bits) of X W + b exactly."""
        product_exponent = X.exponent + W.exponent
        exponent = product_exponent if b is None else min(product_exponent, b.exponent)
        X_scaled = np.abs(np.ldexp(X.values, -X.bits))
        # |X W| ≤ (largest row sum of |X|) · max |W|, which costs one pass over the small X. The
        # product's bound can be a few bits tighter: it is computed only when those bits could save a prime.
        inner = X.values.shape[1]
        scale = X.bits + W.bits + product_exponent - exponent  # |X W| ≤ bound · 2^scale, units 2^exponent
        bound = _rounded_up(float(X_scaled.sum(axis=1).max()), inner) * W.largest_scaled()
        bits = _bits_with_bias(bound, scale, b, exponent)
        if _could_save_a_prime(bits, inner):
            W_scaled = np.abs(np.ldexp(W.values, -W.bits))
            bits = _bits_with_bias(_product_bound(X_scaled, W_scaled), scale, b, exponent)
        primes = primes_for(bits, inner)
        # The power of two that aligns the exponents and the recombination factors ride on X's residues.
        factors = primes.recombination_factors(product_exponent - exponent)
        residues = _product_residues(primes.residues_of_floats(X.chunks(), LIMB_BITS, factors), W, primes)
        if b is not None:
            bias = primes.residues_of_floats(b.chunks(), LIMB_BITS, primes.recombination_factors(b.exponent - exponent))
            residues = primes.reduce_array(residues + bias)  # bias (P, 1, d) broadcasts over rows
        return primes.to_limbs(residues, limb_count(bits), recombining=True), exponent, bits

    def _product_of_limbs(self, left: np.ndarray, left_bits: int, right: np.ndarray, right_bits: int,
                          inner: int) -> tuple[np.ndarray, int]:
        """Return (limbs, bits) of the exact batched product left @ right of limb arrays (L, ..., m, inner) @ (L, ..., inner, n)."""
        bits = left_bits + right_bits + math.ceil(math.log2(max(inner, 2))) + 1
        if _could_save_a_prime(bits, inner):
            bound = _product_bound(_magnitudes(left, left_bits), _magnitudes(right, right_bits))
            bits = min(bits, _bits_with_bias(bound, left_bits + right_bits, None, 0))
        primes = primes_for(bits, inner)
        # The recombination factors ride on the smaller factor's residues.
        factors = primes.recombination_factors()
        left_factors, right_factors = (factors, None) if left[0].size <= right[0].size else (None, factors)
        residues = primes.reduce_array(np.matmul(primes.residues_of_limbs(left, left_factors),
                                                 primes.residues_of_limbs(right, right_factors)))
        return primes.to_limbs(residues, limb_count(bits), recombining=True), bits

    def _keep_exact_projections(self, Q: tuple, K: tuple, V: tuple) -> None:
        problem = self.problem
        h, d_k, d_v = problem.heads, problem.d_k, problem.d_v
        for name, (limbs, exponent, _), width in (("Q", Q, d_k), ("K", K, d_k), ("V", V, d_v)):
            if name in self.stages:
                self.results[name] = _exact(limbs, exponent)
            for i in range(h):
                if f"{name}_{i}" in self.stages:
                    self.results[f"{name}_{i}"] = _exact(limbs[:, :, i * width:(i + 1) * width], exponent)

    # Logits and softmax ---------------------------------------------------------------------

    def _logits(self, Q: tuple, K: tuple) -> None:
        """Compute Z_i exactly, the logits in fixed point and the shifted arguments u = m_i − logit ≥ 0."""
        problem = self.problem
        h, n_q, n_kv, d_k = problem.heads, problem.n_q, problem.n_kv, problem.d_k
        (Q_limbs, Q_exponent, Q_bits), (K_limbs, K_exponent, K_bits) = Q, K

        # Z_i = Q_i K_iᵀ for every head at once: (L, h, n_q, d_k) @ (L, h, d_k, n_kv).
        Q_heads = Q_limbs.reshape(-1, n_q, h, d_k).transpose(0, 2, 1, 3)
        K_heads = K_limbs.reshape(-1, n_kv, h, d_k).transpose(0, 2, 3, 1)
        Z, Z_bits = self._product_of_limbs(Q_heads, Q_bits, K_heads, K_bits, d_k)
        Z_exponent = Q_exponent + K_exponent
        for i in range(h):
            if f"Z_{i}" in self.stages:
                self.results[f"Z_{i}"] = _exact(Z[:, i], Z_exponent)

        visible, bias = problem.visibility()
        self.visible = visible
        self.visible_count = visible.sum(axis=2)  # (h, n_q)
        scale_a, scale_b = problem.scale_factor()

        # Fixed-point logits T·2^F, then the additive mask.
        scaled, scaled_error = _scaled_fixed(Z, Z_bits, Z_exponent, scale_a, scale_b, self.F)
        T, T_error = scaled, scaled_error
        if bias is not None:
            added = _fixed_of_fractions(bias, self.F)
            count = max(T.shape[0], added.shape[0]) + 1
            T = normalize(_pad(T, count) + _pad(added, count))
            T_error += 1
        if T.shape[0] < self.k + 1:  # logits below one unit: give T its integer limb
            T = normalize(_pad(T, self.k + 1))
        self.T_error = T_error
        rational_scale = scale_b == 1
        # s · 0 = 0 exactly, so a logit whose Z is exactly 0 (and whose additive mask adds 0) has no radius.
        zero_logit = ~Z.any(axis=0)
        if bias is not None:
            zero_logit &= np.asarray(bias == 0, dtype=bool)
        for i in range(h):
            hidden = ~visible[i].reshape(-1)
            exact_zero = zero_logit[i].reshape(-1)
            if f"Z_scaled_{i}" in self.stages:
                self.results[f"Z_scaled_{i}"] = (
                    _exact(Z[:, i], Z_exponent, factor=scale_a) if rational_scale
                    else _ball(scaled[:, i], -self.F, np.where(~Z[:, i].any(axis=0).reshape(-1), 0.0, float(scaled_error)),
                               -self.F)
                )
            if f"Z_masked_{i}" in self.stages:
                added = None if bias is None else np.asarray(bias[i], dtype=object).reshape(-1)
                self.results[f"Z_masked_{i}"] = (
                    _exact(Z[:, i], Z_exponent, factor=scale_a, added=added, hidden=hidden) if rational_scale
                    else _ball(T[:, i], -self.F, np.where(hidden | exact_zero, 0.0, float(T_error)), -self.F,
                               hidden=hidden)
                )

        # Shift each row by m_i = (its largest visible floor(T · 2^24)) + 1 in units of 2^-24, so
        # that u = m_i − T ≥ 0 and the smallest u is below 2^-23.
        shift_limbs = _row_shift_limbs(T[self.k - 1:], visible)[..., None]
        # m_i · 2^F has the limbs of m_i · 2^24 shifted up by k − 1 places, because F − 24 = 24 · (k − 1).
        count = max(shift_limbs.shape[0] + self.k - 1, T.shape[0]) + 1
        u = np.zeros((count,) + T.shape[1:])
        np.negative(T, out=u[:T.shape[0]])
        u[self.k - 1:self.k - 1 + shift_limbs.shape[0]] += shift_limbs
        normalize(u)
        if not visible.all():
            u *= visible  # hidden keys get u = 0; their exponentials are set to 0 afterwards
        if np.any(u[-1] < 0):
            raise EvaluationError("internal error: a shifted logit came out negative; please report this case")
        self.u = u

    def _exponentials(self) -> np.ndarray:
        """Return E = exp(−u) in fixed point (k + 1 limbs, h, n_q, n_kv), exactly 0 for hidden keys."""
        u = self.u
        shape = u.shape[1:]
        E = exp_negative(u.reshape(u.shape[0], -1), self.k).reshape((self.k + 1,) + shape)
        if not self.visible.all():
            E[:, ~self.visible] = 0.0
        # exp is 1-Lipschitz for u ≥ 0, so the logit error adds to the exp error.
        self.E_error = exp_error(self.k) + self.T_error
        sums = normalize(_pad(E.sum(axis=3), E.shape[0] + 2))  # exact: limb sums stay below n_kv · 2^24
        self.S = to_ints(sums)  # per (head, query), units 2^-F
        self.empty = self.visible_count == 0
        return E

    def _reciprocals(self, exponent_gap: int) -> tuple[np.ndarray, int, int]:
        """Return (limbs (L, h, n_q, 1), d, bits) of R = floor(2^(exponent_gap + 24·d) / S) per row.

        d is chosen so that R has at least F + 30 bits, making its relative error below 2^-(F+30).
        """
        largest_S = max(self.S) if self.S else 1
        d = max(0, math.ceil((self.F + 30 + largest_S.bit_length() - exponent_gap) / LIMB_BITS))
        G = exponent_gap + LIMB_BITS * d
        reciprocals = [(1 << G) // S if S > 0 else 0 for S in self.S]
        bits = max(reciprocals).bit_length() if reciprocals else 1
        limbs = from_ints(reciprocals, limb_count(bits)).reshape(-1, self.problem.heads, self.problem.n_q, 1)
        return limbs, d, bits

    def _sum_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Return (S_lower, S_error) per row as float64 values: S ≥ S_lower > 0 where a key is visible."""
        S = np.array([float(s) for s in self.S]).reshape(self.empty.shape) * 2.0**-self.F
        S_error = self.visible_count * self.E_error * 2.0**-self.F * (1 + 2.0**-30)
        return np.maximum(S - S_error, 0.0), S_error

    def _weights(self, E: np.ndarray) -> None:
        """Keep A_i = E / S for the heads whose weights are requested.

        NOTE: E is fixed point, so a weight far below 1 is accurate to about 2^-F absolutely but not
        relatively. compute_reference then raises the precision until it is, which can take
        several passes when some weights are below 2^-100.
        """
        problem = self.problem
        h, n_q, n_kv = problem.heads, problem.n_q, problem.n_kv
        wanted = [i for i in range(h) if f"A_{i}" in self.stages]
        if not wanted:
            return
        # A·2^(F+24) = E_int · 2^(F+24) / S_int ≈ E_int · R · 2^(-24·d).
        fraction_bits = self.F + LIMB_BITS
        R, d, _ = self._reciprocals(fraction_bits)
        A = multiply_truncated(E, R, d)
        S_lower, _ = self._sum_bounds()
        # |Ẽ/S̃ − E/S| ≤ (|Ẽ − E| + (E/S) · |S̃ − S|) / S_lower with E/S ≤ 1.
        with np.errstate(divide="ignore", invalid="ignore"):
            propagated = self.E_error * 2.0**-self.F * (1 + self.visible_count[..., None]) / S_lower[..., None]
        radius = (propagated * 2.0**fraction_bits + product_error(E.shape[0], R.shape[0])
                  + approximate(E) * 2.0**(-LIMB_BITS * d)) * (1 + 2.0**-20)
        radius = np.where(self.visible, radius, 0.0)
        nan_rows = self.empty & (problem.spec.masked_rows == "nan")
        for i in wanted:
            nan = np.repeat(nan_rows[i][:, None], n_kv, axis=1).reshape(-1)
            self.results[f"A_{i}"] = _ball(A[:, i], -fraction_bits, np.where(nan, 0.0, radius[i].reshape(-1)),
                                           -fraction_bits, nan=nan)

    def _head_outputs(self, E: np.ndarray, V: tuple) -> tuple[np.ndarray, int, np.ndarray, np.ndarray]:
        """Return (limbs (L, n_q, h·d_v), exponent, radius, nan) of the concatenated O_i = E V_i / S."""
        problem = self.problem
        h, n_q, n_kv, d_v = problem.heads, problem.n_q, problem.n_kv, problem.d_v
        V_limbs, V_exponent, V_bits = V

        # E V_i for every head, exactly: value EV · 2^(V_exponent − F).
        V_heads = V_limbs.reshape(-1, n_kv, h, d_v).transpose(0, 2, 1, 3)
        EV, _ = self._product_of_limbs(E, self.F + 1, V_heads, V_bits, n_kv)

        # O_i = EV / S in fixed point: value O · 2^O_exponent with about F + 5 bits. The exp errors
        # already make the radius thousands of units; three more bits would cost the output
        # projection a prime at (128, 128, 768, 12).
        O_exponent = V_exponent + V_bits - (self.F + 5)
        R, d, R_bits = self._reciprocals(V_exponent - O_exponent)
        drop = max(0, (LIMB_BITS * d - R_bits - 2) // LIMB_BITS)  # low EV limbs worth < 1/4 unit
        # EV keeps its sign: multiply_truncated's error bound holds on either side for a signed top limb.
        O = multiply_truncated(EV[drop:], R, d - drop)

        # Radius in units of 2^O_exponent: propagated exp errors, truncations and the reciprocal's floor.
        V_values = np.abs(approximate(V_heads, -V_bits)) * (1 + 2.0**-40)  # |V| · 2^-(V_exponent + V_bits)
        visible = self.visible.astype(np.float64)
        V_sum = visible @ V_values  # Σ_visible |V_jc|, (h, n_q, d_v)
        V_max = V_values.max(axis=1)[:, None, :]  # max_j |V_jc|, (h, 1, d_v)
        S_lower, _ = self._sum_bounds()
        with np.errstate(divide="ignore", invalid="ignore"):
            propagated = (self.E_error * 2.0**-self.F * (V_sum + self.visible_count[..., None] * V_max)
                          / S_lower[..., None]) * 2.0**(V_bits + V_exponent - O_exponent)
        reciprocal = np.abs(approximate(EV)) * 2.0**(-LIMB_BITS * d)
        # Where EV is exactly 0 the fixed-point product and its floor are exact too.
        truncation = np.where(EV.any(axis=0), product_error(EV.shape[0] - drop, R.shape[0]) + 1 + reciprocal, 0.0)
        radius = (propagated + truncation) * (1 + 2.0**-20)

        masked_rows = problem.spec.masked_rows
        radius = np.where(self.empty[..., None], 0.0, radius)
        O = np.where(self.empty[None, ..., None], 0.0, O)
        nan = np.repeat(self.empty[..., None], d_v, axis=2) if masked_rows == "nan" else np.zeros(radius.shape, bool)

        for i in range(h):
            if f"O_{i}" in self.stages:
                self.results[f"O_{i}"] = _ball(O[:, i], O_exponent, radius[i].reshape(-1), O_exponent,
                                               nan=nan[i].reshape(-1))
        # Heads are concatenated head-major along features: (n_q, h · d_v).
        concat = O.transpose(0, 2, 1, 3).reshape(O.shape[0], n_q, h * d_v)
        concat_radius = radius.transpose(1, 0, 2).reshape(n_q, h * d_v)
        concat_nan = nan.transpose(1, 0, 2).reshape(n_q, h * d_v)
        if "concat" in self.stages:
            self.results["concat"] = _ball(concat, O_exponent, concat_radius.reshape(-1), O_exponent,
                                           nan=concat_nan.reshape(-1))
        return concat, O_exponent, concat_radius, concat_nan

    def _output(self, concat: tuple, inputs: dict) -> None:
        if "output" not in self.stages:
            return
        limbs, exponent, radius, nan = concat
        if "W_O" not in inputs:
            self.results["output"] = _ball(limbs, exponent, radius.reshape(-1), exponent, nan=nan.reshape(-1))
            return
        W, b = inputs["W_O"], inputs.get("b_O")

        # Midpoints exactly: concat · W_O + b_O, with the exponents aligned as in the projections.
        product_exponent = exponent + W.exponent
        out_exponent = product_exponent if b is None else min(product_exponent, b.exponent)
        concat_bits = _bits_of_limbs(limbs)
        inner = W.values.shape[0]
        # |concat · W_O| ≤ bound · 2^scale in units of 2^out_exponent; first the bound from bit lengths.
        scale = concat_bits + W.bits + product_exponent - out_exponent
        bound = 2.0 ** (math.ceil(math.log2(max(inner, 2))) + 1)
        W_scaled = np.abs(np.ldexp(W.values, -W.bits))
        if _could_save_a_prime(_bits_with_bias(bound, scale, b, out_exponent), inner):
            bound = min(bound, _product_bound(_magnitudes(limbs, concat_bits), W_scaled))
        bits = _bits_with_bias(bound, scale, b, out_exponent)
        primes = primes_for(bits, W.values.shape[0])
        factors = primes.recombination_factors(product_exponent - out_exponent)
        residues = _product_residues(primes.residues_of_limbs(limbs, factors), W, primes)
        if b is not None:
            bias = primes.residues_of_floats(b.chunks(), LIMB_BITS, primes.recombination_factors(b.exponent - out_exponent))
            residues = primes.reduce_array(residues + bias)
        output = primes.to_limbs(residues, limb_count(bits), recombining=True)

        # Radius: |concat − mid| @ |W_O|, rounded up for the float64 sums (units 2^exponent). |W_O| is
        # W_scaled · 2^(W.bits + W.exponent), a power of two applied after the sums (2^-1074 covers
        # a result that lands among the subnormals).
        concat_radius = np.where(nan, 0.0, radius)
        products = np.ldexp(_rounded_up(concat_radius @ W_scaled, inner), W.bits + W.exponent) + 2.0**-1074
        # A row of exact concatenated outputs gives exact products: no radius, not even for underflow.
        out_radius = np.where((concat_radius > 0).any(axis=1)[:, None], products, 0.0)
        out_nan = np.repeat(nan.any(axis=1)[:, None], W.values.shape[1], axis=1)
        self.results["output"] = _ball(output, out_exponent, np.where(out_nan, 0.0, out_radius).reshape(-1), exponent,
                                       nan=out_nan.reshape(-1))


def _bits_with_bias(bound: float, scale: int, b: "IntegerMatrix | None", exponent: int) -> int:
    """Return bits with |P + b| < 2^bits, for |P| ≤ bound · 2^scale and the bias b in units of 2^exponent.

    Adding the two bounds as floats costs at most a bit where the bias is as large as the product,
    and nothing where it is much smaller (a bit-length bound would add one bit either way).
    """
    if b is None:
        return math.frexp(bound * (1 + 2.0**-50))[1] + scale
    b_bound, b_scale = b.largest_scaled(), b.bits + b.exponent - exponent  # |b| ≤ b_bound · 2^b_scale
    top = max(scale, b_scale)
    total = math.ldexp(bound, scale - top) + math.ldexp(b_bound, b_scale - top) + 2.0**-1000
    return math.frexp(total * (1 + 2.0**-50))[1] + top


def _rounded_up(value, terms: int):
    """Return an upper bound on an exact sum of ``terms`` nonnegative products that float64 computed as ``value``.

    In any order, with or without fused multiply-adds, the computed sum is at least (1 − γ)
    times the exact one with γ = n·2^-53 / (1 − n·2^-53), so the factor 1 + (n + 2)·2^-52
    covers it; n·2^-1074 covers products that underflowed.
    """
    return value * (1 + (terms + 2) * 2.0**-52) + terms * 2.0**-1074


def _product_bound(left: np.ndarray, right: np.ndarray) -> float:
    """Return an upper bound on the largest entry of left @ right for nonnegative float64 arrays."""
    return float(_rounded_up(np.matmul(left, right).max(), left.shape[-1]))


def _magnitudes(limbs: np.ndarray, bits: int) -> np.ndarray:
    """Return float64 upper bounds on |x| · 2^-bits for the integers x given by normalised limbs."""
    return np.abs(approximate(limbs, -bits)) * (1 + 2.0**-40)  # approximate is within 2^-47 relatively


def _could_save_a_prime(bits: int, inner: int) -> bool:
    """Return whether a bound up to log2(inner) + 1 bits tighter than ``bits`` could need fewer primes."""
    return len(primes_for(bits, inner)) > len(primes_for(bits - math.ceil(math.log2(max(inner, 2))) - 1, inner))


# Rows of a weight matrix per block when its residues are computed: a block's chunks and residues
# for a group of primes then stay in the processor cache between the steps.
WEIGHT_ROWS = 16
# Rows per block when a weight matrix is split into chunks. This runs once per weight, not once
# per prime, so longer NumPy calls matter more here than cache-sized blocks.
CHUNK_ROWS = 64
# Primes whose weight residues are made at once (4 · 768 · 768 float64 is 19 MB).
PRIME_GROUP = 4


def _product_residues(left: np.ndarray, W: "IntegerMatrix", primes) -> np.ndarray:
    """Return the residues (P, n, d_out) of left_int @ W_int from left's residues (P, n, d_in).

    W is split into chunks once. Its residues are then made PRIME_GROUP primes at a time in one
    reused array, and each group is multiplied right away. glibc maps arrays over 32 MiB as fresh
    pages on every call, and page faults cost more than the arithmetic they feed (one array for
    13 primes of a 768 × 768 W would be 61 MB).
    """
    rows, columns = W.values.shape
    count, width = primes.chunking(W.bits)
    weights = primes.chunk_weights(count, width)
    group = min(len(primes), PRIME_GROUP)
    chunks = np.empty((count, rows, columns))
    right = np.empty((group, rows, columns))
    out = np.empty((len(primes),) + left.shape[1:-1] + (columns,))
    # One thread: two workers made the conversion slower (15 ms against 9 ms for 7 primes of a
    # 768 × 768 W), because each block is many short NumPy calls that wait for the GIL. The small
    # products per block (3 rows deep) run on one BLAS thread as well.
    with single_threaded_blas():
        for start in range(0, rows, CHUNK_ROWS):
            chunks[:, start:start + CHUNK_ROWS] = signed_chunks(W.values[start:start + CHUNK_ROWS], count, width)
    for first in range(0, len(primes), group):
        size = min(group, len(primes) - first)
        with single_threaded_blas():
            for start in range(0, rows, WEIGHT_ROWS):
                stop = min(start + WEIGHT_ROWS, rows)
                block = right[:size, start:stop].reshape(size, -1)  # a view: rows of one prime are contiguous
                np.matmul(weights[first:first + size], chunks[:, start:stop].reshape(count, -1), out=block)
                primes.reduce_rows(block, first)
        np.matmul(left[first:first + size], right[:size], out=out[first:first + size])
    return primes.reduce_array(out)


def _exact(limbs: np.ndarray, exponent: int, factor: Fraction = Fraction(1), added: np.ndarray | None = None,
           hidden: np.ndarray | None = None) -> ExactValues:
    shape = limbs.shape[1:]
    return ExactValues((int(shape[0]), int(shape[1])), limbs.reshape(limbs.shape[0], -1), exponent,
                       Fraction(factor), added, hidden)


def _ball(limbs: np.ndarray, exponent: int, radius: np.ndarray, radius_exponent: int,
          nan: np.ndarray | None = None, hidden: np.ndarray | None = None) -> BallValues:
    shape = limbs.shape[1:]
    return BallValues((int(shape[0]), int(shape[1])), limbs.reshape(limbs.shape[0], -1), exponent,
                      np.asarray(radius, dtype=np.float64).reshape(-1), radius_exponent, nan, hidden)


def _row_shift_limbs(top: np.ndarray, visible: np.ndarray) -> np.ndarray:
    """Return limbs (L, h, n_q) of 1 + the largest visible integer per row of ``top`` (L, h, n_q, n_kv).

    ``top`` contains normalised limbs. Their float64 values are exact below 2^53; rows with an entry
    beyond that are compared as Python integers. A row with no visible key gets 0.
    """
    values = approximate(top)
    with np.errstate(invalid="ignore"):
        largest = np.where(visible, values, -np.inf).max(axis=2)
        beyond = np.where(visible, np.abs(values), 0.0).max(axis=2) >= 2.0**52
    largest = np.where(np.isfinite(largest), largest + 1, 0.0)
    if not beyond.any():
        return float_limbs(largest, limb_count(_bits_of(largest)))
    shifts = [int(value) for value in largest.reshape(-1)]
    for flat in np.flatnonzero(beyond.reshape(-1)):
        head, row = np.unravel_index(flat, beyond.shape)
        keys = np.flatnonzero(visible[head, row])
        shifts[flat] = max(to_ints(top[:, head, row, keys])) + 1
    return from_ints(shifts, limb_count(max(abs(v) for v in shifts).bit_length())).reshape((-1,) + largest.shape)


def _pad(limbs: np.ndarray, count: int) -> np.ndarray:
    """Return limbs with zero top limbs added up to ``count`` limbs (a negative top limb stays the sign)."""
    if limbs.shape[0] >= count:
        return limbs
    padding = np.zeros((count - limbs.shape[0],) + limbs.shape[1:])
    return np.concatenate([limbs, padding], axis=0)


def _scaled_fixed(Z: np.ndarray, Z_bits: int, Z_exponent: int, scale_a: Fraction, scale_b: Fraction,
                  F: int) -> tuple[np.ndarray, int]:
    """Return (limbs, error) of s · Z · 2^(Z_exponent + F) for s = a·√b, error in units.

    The low limbs of Z that are worth less than 1/4 unit are dropped first (a floor, also for
    negative Z), and s is taken as floor(|s| · 2^G) with G large enough that its error costs at
    most one unit. Z keeps its sign, which multiply_truncated allows with the same error bound.
    """
    scale_float = abs(float(scale_a)) * math.sqrt(float(scale_b))
    scale_bits = math.frexp(scale_float)[1]  # |s| < 2^scale_bits
    drop = max(0, math.floor((-2 - scale_bits - Z_exponent - F) / LIMB_BITS))
    if drop >= Z.shape[0]:
        # |s · Z| is below 1/4 unit: the fixed-point logit is 0, within the usual error.
        return np.zeros((1,) + Z.shape[1:]), product_error(1, 1) + 2
    kept = Z[drop:]
    kept_bits = max(Z_bits - LIMB_BITS * drop, 1)
    d = math.ceil((kept_bits + 2) / LIMB_BITS)
    G = LIMB_BITS * (drop + d) + Z_exponent + F
    squared = scale_a * scale_a * scale_b  # s² = a²·b
    scaled = squared * (Fraction(4) ** G if G >= 0 else Fraction(1, 4 ** -G))
    S = math.isqrt(scaled.numerator // scaled.denominator)  # floor(|s| · 2^G)
    # Low zero limbs of S (a power-of-two scale has all but one) shift the product instead of
    # multiplying by zeros: kept · S / 2^(24·d) = kept · (S / 2^(24·z)) / 2^(24·(d − z)).
    zeros = min(d, ((S & -S).bit_length() - 1) // LIMB_BITS) if S else 0
    S >>= LIMB_BITS * zeros
    S_limbs = from_ints([S], limb_count(S.bit_length() + 1))
    product = multiply_truncated(kept, S_limbs.reshape((S_limbs.shape[0],) + (1,) * (Z.ndim - 1)), d - zeros)
    if scale_a < 0:
        product = normalize(-product)
    return product, product_error(kept.shape[0], S_limbs.shape[0]) + 2


def _fixed_of_fractions(values: np.ndarray, F: int) -> np.ndarray:
    """Return limbs of floor(v · 2^F) for an object array of Fractions (one conversion per distinct value)."""
    flat = values.reshape(-1)
    cache: dict = {}
    integers = []
    for value in flat.tolist():
        fixed = cache.get(value)
        if fixed is None:
            fixed = cache[value] = math.floor(Fraction(value) * (1 << F))
        integers.append(fixed)
    bits = max((abs(v).bit_length() for v in integers), default=1)
    return normalize(from_ints(integers, limb_count(bits) + 1)).reshape((-1,) + values.shape)
