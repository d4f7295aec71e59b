"""Certified numeric references: every stage of a Problem as intervals with exact endpoints.

``compute_reference`` evaluates a Problem with one of three engines:

- "flint": python-flint. Projections and QKᵀ are exact integer arithmetic, the rest is ball
  arithmetic (arb), so every value carries a rigorous error radius.
- "mpmath": the same pipeline with exact Python integers and mpmath interval arithmetic (mpmath.iv),
  much slower; it is the fallback when python-flint is not installed.
- "sympy": the exact SymPy derivation evaluated entry by entry with two precisions (Ziv's
  strategy). NOTE: the agreement of two evaluations is strong evidence, not a proof; prefer the
  other engines for certified bounds. It is practical for tutorial sizes only.

The working precision starts at digits · log2(10) + guard bits and doubles until every interval is
narrow enough (relative width below 2^-(digits · log2(10) + 8)), so the requested digits can be read
off. A later request that needs more (more digits, or an interval that straddles a float rounding
boundary) recomputes the stage at a higher precision.
"""

from __future__ import annotations

import decimal
import math
import warnings
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Iterable, Mapping, Protocol

import numpy as np

from ..derive import HEAD_STAGES
from ..errors import EvaluationError, InvalidInputError, UnsupportedError
from ..problem import Problem
from .decimals import check_digits, format_decimal
from .ieee import binary_format, round_interval, round_rational

ENGINES: tuple[str, ...] = ("auto", "flint", "mpmath", "sympy")
GUARD_BITS = 32
# Relative width a value must reach, beyond the requested digits, before the loop stops.
NARROW_MARGIN_BITS = 8
# The precision loop stops at this multiple of the starting precision; what is still wide then
# is refined on demand when it is rounded.
MAX_PRECISION_FACTOR = 8
# rounded() and decimals() refine a stage up to this many bits before they give up on an entry.
MAX_REFINE_BITS = 1 << 16

_warned_fallback = False

# Balls entirely below 2^-TINY_BITS in magnitude are enclosed in [−1, 1] · 2^-TINY_BITS (or its
# nonnegative or nonpositive half) instead: exact endpoints would need a denominator of more than
# a million bits (exp(−2^40) needs 1.6 · 10^12). Such a value rounds to zero in every binary format.
TINY_BITS = 1 << 20


def is_tiny_enclosure(lo: int, hi: int, den: int) -> bool:
    """Return whether (lo, hi, den) is the enclosure of a ball below 2^-TINY_BITS (see TINY_BITS)."""
    return den == 1 << TINY_BITS and lo in (-1, 0) and hi in (0, 1) and lo != hi


class StageValues(Protocol):
    """An engine's result for one stage: a shape, a narrowness test and exact endpoints on request."""

    shape: tuple[int, int]

    def is_narrow(self, bits: int) -> bool: ...

    def to_intervals(self) -> "Intervals": ...


@dataclass
class Intervals:
    """Flat row-major entries with lo[k]/den[k] ≤ x_k ≤ hi[k]/den[k], or a special value.

    ``special`` maps a flat index to NaN (a fully masked row under policy "nan") or to −inf
    (the masked logit of a hidden key). The lo/hi/den entries at those indices are ignored.
    """

    shape: tuple[int, int]
    lo: list[int]
    hi: list[int]
    den: list[int]
    special: dict[int, float]

    @classmethod
    def exact(cls, shape: tuple[int, int], numerators: list[int], denominator: int,
              special: dict[int, float] | None = None) -> "Intervals":
        size = len(numerators)
        return cls(tuple(shape), numerators, numerators, [denominator] * size, special or {})

    def to_intervals(self) -> "Intervals":
        return self

    def is_narrow(self, bits: int) -> bool:
        """Return whether every entry is exact or has relative width at most 2^-bits.

        An interval that contains zero can never be narrow relative to itself, so it counts as
        narrow once its width is 2^-(bits + 64) of the largest magnitude in the matrix.
        """
        largest = -math.inf
        straddling = []
        for k, (lo, hi, den) in enumerate(zip(self.lo, self.hi, self.den)):
            if k in self.special or lo == hi:
                continue
            magnitude = max(abs(lo), abs(hi))
            largest = max(largest, magnitude.bit_length() - den.bit_length())
            if (lo > 0) == (hi > 0) and lo != 0 and hi != 0:
                if (hi - lo) << bits > min(abs(lo), abs(hi)):
                    return False
            else:
                straddling.append(k)
        for k in straddling:
            width_bits = (self.hi[k] - self.lo[k]).bit_length() - self.den[k].bit_length() + 1
            if width_bits > largest - bits - 64:
                return False
        return True


class CertifiedMatrix:
    """A matrix of certified values: each entry lies in an interval with exact rational endpoints.

    Entries are read through ``rounded`` (correctly rounded floats), ``decimals`` (correctly rounded
    strings), ``radii`` and ``midpoints``. When an interval is too wide to decide a rounding, the
    stage is recomputed at a higher precision.
    """

    def __init__(self, name: str, shape: tuple[int, int], values: "StageValues",
                 precision: int, digits: int, refine: Callable[[int], "StageValues"] | None = None) -> None:
        self.name = name
        self.shape = tuple(int(n) for n in shape)
        self.precision = precision
        self.digits = digits
        self._values = values
        self._stage = values
        self._refine = refine
        self._finer: list[tuple[int, Intervals]] = []
        self._rounded: dict[str, np.ndarray] = {}

    def __repr__(self) -> str:
        return f"CertifiedMatrix({self.name!r}, shape={self.shape}, precision={self.precision} bits)"

    @property
    def intervals(self) -> Intervals:
        """The entries at the precision the reference was computed with."""
        if not isinstance(self._values, Intervals):
            self._values = self._values.to_intervals()
        return self._values

    def rounded(self, dtype: str) -> np.ndarray:
        """Return every entry correctly rounded to ``dtype``, round to nearest, ties to even.

        ``dtype`` is "float64", "float32", "float16" or "bfloat16"; bfloat16 values come back in
        a float32 array. NaN marks entries that the masked-row policy "nan" made NaN; values
        beyond the format's range become ±inf.
        """
        fmt = binary_format(dtype)
        if fmt.name not in self._rounded:
            decide = lambda lo, hi, den: round_interval(lo, hi, den, fmt)  # noqa: E731
            round_fast = getattr(self._stage, "round_fast", None)
            if round_fast is None:
                values = np.array(self._decide(decide, fmt.name), dtype=np.float64)
            else:
                # Whole-array rounding decides almost every entry; the rest take the exact path.
                values, decided = round_fast(fmt)
                undecided = np.flatnonzero(~decided).tolist()
                if undecided:
                    values = values.copy()
                    values[undecided] = self._decide(decide, fmt.name, undecided)
            array = values.reshape(self.shape).astype(fmt.storage)
            array.flags.writeable = False
            self._rounded[fmt.name] = array
        return self._rounded[fmt.name].copy()

    def decimals(self, digits: int | None = None) -> list[list[str]]:
        """Return every entry as a string correctly rounded to ``digits`` significant digits.

        Exact entries whose decimal expansion ends within ``digits`` digits are written exactly
        ("3", "0.25"); the others show exactly ``digits`` significant digits. Special entries are
        "nan" and "-inf".
        """
        digits = self.digits if digits is None else check_digits(digits)
        flat = self._decide(lambda lo, hi, den: _decimal_interval(lo, hi, den, digits), f"{digits} digits")
        columns = self.shape[1]
        return [flat[i * columns:(i + 1) * columns] for i in range(self.shape[0])]

    def radii(self) -> np.ndarray:
        """Return each entry's half interval width, rounded up to float64 (0 for exact and −inf entries)."""
        values = self.intervals
        radii = np.zeros(len(values.lo), dtype=np.float64)
        for k, (lo, hi, den) in enumerate(zip(values.lo, values.hi, values.den)):
            special = values.special.get(k)
            if special is not None:
                radii[k] = special if math.isnan(special) else 0.0
            elif hi != lo:
                radii[k] = _round_up(hi - lo, 2 * den)
        return radii.reshape(self.shape)

    def max_radius(self) -> float:
        """Return the largest radius (NaN entries are ignored)."""
        radii = self.radii()
        finite = radii[~np.isnan(radii)]
        return float(finite.max()) if finite.size else 0.0

    def midpoints(self) -> np.ndarray:
        """Return the float64 values nearest to the entries, the same as ``rounded("float64")``."""
        return self.rounded("float64")

    def _decide(self, decide: Callable[[int, int, int], object], what: str,
                indices: list[int] | None = None) -> list:
        """Apply ``decide`` to every entry (or to ``indices``), refining the stage where it returns None."""
        values = self.intervals
        chosen = range(len(values.lo)) if indices is None else indices
        results: dict[int, object] = {}
        pending = []
        for k in chosen:
            special = values.special.get(k)
            if special is not None:
                results[k] = _special_result(special, what)
                continue
            result = self._decide_entry(decide, what, k, values)
            if result is None:
                pending.append(k)
            results[k] = result
        precision = self.precision
        while pending:
            precision *= 2
            finer = self._refined(precision, what, pending)
            still = []
            for k in pending:
                result = self._decide_entry(decide, what, k, finer)
                if result is None:
                    still.append(k)
                results[k] = result
            pending = still
        return [results[k] for k in chosen]

    def _decide_entry(self, decide: Callable[[int, int, int], object], what: str, k: int, values: Intervals) -> object:
        lo, hi, den = values.lo[k], values.hi[k], values.den[k]
        if what.endswith("digits") and is_tiny_enclosure(lo, hi, den):
            row, column = divmod(k, self.shape[1])
            raise EvaluationError(
                f"entry ({row}, {column}) of stage {self.name} is below 2^-{TINY_BITS} in magnitude, too small "
                f"to print to {what}; it rounds to 0 in every binary format, so read it with rounded()"
            )
        return decide(lo, hi, den)

    def _refined(self, precision: int, what: str, pending: list[int]) -> Intervals:
        for known, values in self._finer:
            if known >= precision:
                return values
        if self._refine is None or precision > MAX_REFINE_BITS:
            k = pending[0]
            row, column = divmod(k, self.shape[1])
            raise EvaluationError(
                f"entry ({row}, {column}) of stage {self.name} could not be rounded to {what} even at "
                f"{precision // 2} bits; its value lies on a rounding boundary or closer to one than that "
                f"precision resolves, or it is an exact zero reached through cancellation"
            )
        values = self._refine(precision).to_intervals()
        self._finer.append((precision, values))
        return values


def _special_result(special: float, what: str) -> object:
    if not what.endswith("digits"):
        return special
    if math.isnan(special):
        return "nan"
    return "-inf" if special < 0 else "inf"


def _round_up(numerator: int, denominator: int) -> float:
    """Return the smallest float64 ≥ numerator/denominator (both positive)."""
    from .ieee import FORMATS

    nearest = round_rational(numerator, denominator, FORMATS["float64"])
    if math.isinf(nearest):
        return nearest
    p, q = nearest.as_integer_ratio()
    if p * denominator < numerator * q:
        nearest = math.nextafter(nearest, math.inf)
    return nearest


def _decimal_interval(lo: int, hi: int, den: int, digits: int) -> str | None:
    """Return the common `digits`-digit rounding of [lo/den, hi/den] as text, or None."""
    low = _round_decimal(lo, den, digits)
    if lo == hi:
        if _terminates_within(lo, den, digits):
            return format_decimal(low)
        return format_decimal(low, digits)
    high = _round_decimal(hi, den, digits)
    if low != high:
        return None
    return format_decimal(low, digits)


# Integers wider than this many bits are not converted to decimal.Decimal whole, because that
# conversion took minutes for the million-bit denominators of tiny weights. Their quotient is
# first enclosed with interval arithmetic.
EXACT_DECIMAL_BITS = 4096


def _round_decimal(numerator: int, denominator: int, digits: int) -> decimal.Decimal:
    """Return numerator/denominator rounded half-even to ``digits`` significant digits (denominator > 0)."""
    if max(abs(numerator).bit_length(), denominator.bit_length()) > EXACT_DECIMAL_BITS:
        rounded = _round_decimal_by_intervals(numerator, denominator, digits)
        if rounded is not None:
            return rounded
    context = decimal.Context(prec=digits, rounding=decimal.ROUND_HALF_EVEN, Emax=10**9, Emin=-(10**9))
    return context.divide(decimal.Decimal(numerator), decimal.Decimal(denominator))


def _dyadic(man_exp: tuple[int, int]) -> Fraction:
    mantissa, exponent = int(man_exp[0]), int(man_exp[1])
    return Fraction(mantissa << exponent) if exponent >= 0 else Fraction(mantissa, 1 << -exponent)


def _round_decimal_by_intervals(numerator: int, denominator: int, digits: int) -> decimal.Decimal | None:
    """Round numerator/denominator as _round_decimal does, or return None where that is not certain.

    A tiny weight such as exp(−10^5) has a denominator of about 144000 bits. mpmath's interval
    arithmetic (outward rounding) encloses q = |x| · 10^(digits − 1 − e) for the decimal exponent
    e of x; when the enclosure lies strictly between two half-integers, the integer in between is
    the correctly rounded mantissa.
    """
    import mpmath

    if numerator == 0:
        return decimal.Decimal(0)
    magnitude = abs(numerator)
    iv = mpmath.iv
    saved = iv.prec
    iv.prec = 4 * digits + 64
    try:
        value = iv.mpf(magnitude) / iv.mpf(denominator)
        # log10 |x| from the bit lengths, then corrected by the enclosure itself.
        exponent = math.floor((magnitude.bit_length() - denominator.bit_length()) * math.log10(2))
        for _ in range(4):
            scaled = value * iv.mpf(10) ** (digits - 1 - exponent)
            low, high = (_dyadic(mpmath.mp.make_mpf(end).man_exp) for end in scaled._mpi_)
            if low >= 10 ** (digits - 1) and high < 10**digits:
                break
            exponent += 1 if low >= 10**digits else -1
        else:
            return None
        nearest = round(low)
        if not (nearest - Fraction(1, 2) < low and high < nearest + Fraction(1, 2)):
            return None
        if nearest == 10**digits:  # rounded up to the next power of ten
            nearest, exponent = nearest // 10, exponent + 1
    finally:
        iv.prec = saved
    return decimal.Decimal((int(numerator < 0), tuple(int(c) for c in str(nearest)), exponent - digits + 1))


def _terminates_within(numerator: int, denominator: int, digits: int) -> bool:
    """Return whether numerator/denominator has a decimal expansion of at most ``digits`` significant digits."""
    if numerator == 0:
        return True
    divisor = math.gcd(numerator, denominator)
    numerator, denominator = numerator // divisor, denominator // divisor
    twos = (denominator & -denominator).bit_length() - 1
    rest = denominator >> twos
    fives = 0
    while rest % 5 == 0:
        rest //= 5
        fives += 1
    if rest != 1:
        return False
    # In lowest terms the expansion ends in a nonzero digit, and the integer below has at least the
    # numerator's digits and |twos − fives| more factors of 5 or 2: rule out long ones before building it.
    if abs(numerator) >= 10**digits or (twos - fives) * math.log10(5) > digits or (fives - twos) * math.log10(2) > digits:
        return False
    # numerator/denominator = numerator · 2^(s−twos) · 5^(s−fives) / 10^s with s = max(twos, fives).
    scale = max(twos, fives)
    integer = abs(numerator) * 2 ** (scale - twos) * 5 ** (scale - fives)
    return len(str(integer).rstrip("0")) <= digits


@dataclass(frozen=True)
class Reference:
    """Certified values of the requested stages of a Problem.

    ``digits``: significant digits the values were certified for; ``engine``: "flint", "mpmath"
    or "sympy"; ``stages``: stage name → CertifiedMatrix, in pipeline order.
    """

    problem: Problem
    digits: int
    engine: str
    stages: Mapping[str, CertifiedMatrix]

    def __getitem__(self, name: str) -> CertifiedMatrix:
        try:
            return self.stages[name]
        except KeyError:
            raise KeyError(f"no stage named {name!r}; this reference has {', '.join(self.stages)}") from None

    @property
    def output(self) -> CertifiedMatrix:
        return self["output"]


def stage_names(problem: Problem) -> list[str]:
    """Return every stage name of the problem in pipeline order, as Derivation names them."""
    names = ["Q", "K", "V"]
    for i in range(problem.heads):
        names.extend(f"{stage}_{i}" for stage in HEAD_STAGES)
    return names + ["concat", "output"]


def compute_reference(problem: Problem, digits: int = 50, *, stages: Iterable[str] | None = None,
                      engine: str = "auto") -> Reference:
    """Compute the certified stages of ``problem`` to ``digits`` significant digits.

    ``stages`` names the stages to keep (all when None), as Derivation names them: "Q", "K", "V",
    per head "Q_i", "K_i", "V_i", "Z_i", "Z_scaled_i", "Z_masked_i", "A_i", "O_i", then "concat"
    and "output". ``engine`` is "auto" (python-flint when installed, else mpmath with a
    SymattnWarning once), or "flint", "mpmath" or "sympy" to force one.

    >>> from symattn import AttentionSpec
    >>> p = Problem.from_arrays(spec=AttentionSpec(scale="none"), direct=True,
    ...                         Q=[[1, 0]], K=[[1, 0], [0, 1]], V=[[1], [0]])
    >>> compute_reference(p, 20, stages=["output"]).output.decimals()
    [['0.73105857863000487925']]
    """
    if not isinstance(problem, Problem):
        raise InvalidInputError(f"problem is {type(problem).__name__}; expected a symattn Problem")
    check_digits(digits)
    names = _check_stages(problem, stages)
    name = _resolve_engine(engine)
    evaluate = _engine_function(name)

    target = math.ceil(digits * math.log2(10)) + NARROW_MARGIN_BITS
    precision = start = target + GUARD_BITS
    while True:
        values = evaluate(problem, precision, set(names))
        if precision >= MAX_PRECISION_FACTOR * start or all(values[n].is_narrow(target) for n in names):
            break
        precision *= 2

    matrices = {}
    for stage in names:
        refine = (lambda bits, stage=stage: evaluate(problem, bits, {stage})[stage])
        matrices[stage] = CertifiedMatrix(stage, values[stage].shape, values[stage], precision, digits, refine)
    return Reference(problem, digits, name, matrices)


def _check_stages(problem: Problem, stages: Iterable[str] | None) -> list[str]:
    every = stage_names(problem)
    if stages is None:
        return every
    if isinstance(stages, str):
        stages = [stages]
    requested = list(stages)
    unknown = [name for name in requested if name not in every]
    if unknown:
        raise InvalidInputError(
            f"unknown stage {', '.join(map(repr, unknown))}; this problem has stages {', '.join(every)}"
        )
    return [name for name in every if name in set(requested)]


def flint_available() -> bool:
    """Return whether python-flint can be imported."""
    try:
        import flint  # noqa: F401
    except ImportError:
        return False
    return True


def _resolve_engine(engine: str) -> str:
    global _warned_fallback
    if engine not in ENGINES:
        raise InvalidInputError(f"engine is {engine!r}; expected one of {', '.join(ENGINES)}")
    if engine == "auto":
        if flint_available():
            return "flint"
        if not _warned_fallback:
            _warned_fallback = True
            from ..errors import SymattnWarning

            warnings.warn(
                "python-flint is not installed, so certified references use the mpmath engine, "
                "which is much slower; install it with pip install 'symattn[fast]'",
                SymattnWarning,
                stacklevel=3,
            )
        return "mpmath"
    if engine == "flint" and not flint_available():
        raise UnsupportedError(
            "engine 'flint' needs python-flint, which is not installed; install it with "
            "pip install 'symattn[fast]', or use the mpmath engine (--engine mpmath, or engine='mpmath' in Python)"
        )
    return engine


def _engine_function(name: str) -> Callable[[Problem, int, set], dict]:
    if name == "flint":
        from .certified import evaluate
    elif name == "mpmath":
        from .mpmath_engine import evaluate
    else:
        from .sympy_engine import evaluate
    return evaluate
