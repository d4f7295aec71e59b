"""Exact big-integer arrays in NumPy: limbs, residue number system and Chinese remaindering.

A big integer is stored as LIMB_BITS-bit limbs in float64, least significant first along axis 0:
x = Σ_l limbs[l] · 2^(LIMB_BITS · l). Normalised limbs lie in [0, 2^LIMB_BITS) except the top one,
which carries the sign, so −1 is [2^24 − 1, −1]. Every operation keeps each float64 an integer
below 2^53 in magnitude, so all arithmetic is exact.

Matrix products of big integers go through a residue number system. The factors are reduced
modulo primes p of 22 to 24 bits, and each product of residues is an ordinary BLAS float64 product
whose sums stay below 2^53, so it is exact. The Chinese remainder theorem then recombines the
residues into limbs. This is the residue variant of the Ozaki scheme for exact products with floating-point
BLAS; it needs one BLAS product per prime instead of one per pair of slices.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

class CapacityError(ValueError):
    """A value too wide for exact residue arithmetic with at most 31 primes or 32 limbs."""


LIMB_BITS = 24
LIMB = float(1 << LIMB_BITS)
INVERSE_LIMB = 1.0 / LIMB
EXACT = float(1 << 53)
# Entries per block in reduce_rows: 256 KiB of float64, which fits a 512 KiB L2 cache. Blocks of 8192
# entries took twice as long on a (7, 768 · 768) array, from the fixed cost of each NumPy call.
REDUCE_BLOCK = 32768


def normalize(limbs: np.ndarray) -> np.ndarray:
    """Propagate carries in place so every limb but the top one lies in [0, 2^24); return the array."""
    if limbs.shape[0] < 2:
        return limbs
    carry = np.empty(limbs.shape[1:])
    shifted = np.empty(limbs.shape[1:])
    for l in range(limbs.shape[0] - 1):
        np.multiply(limbs[l], INVERSE_LIMB, out=carry)
        np.floor(carry, out=carry)
        np.multiply(carry, LIMB, out=shifted)
        np.subtract(limbs[l], shifted, out=limbs[l])
        np.add(limbs[l + 1], carry, out=limbs[l + 1])
    return limbs


def float_limbs(values: np.ndarray, count: int) -> np.ndarray:
    """Return normalised limbs (count, *shape) of float64 arrays of exact integers (|v| < 2^(24·count − 1)).

    The magnitudes are split first (see signed_chunks), so every step is exact; the limbs of a
    negative value are then negated and the borrows propagated.
    """
    return normalize(signed_chunks(values, count, LIMB_BITS))


def signed_chunks(values: np.ndarray, count: int, width: int) -> np.ndarray:
    """Return chunks (count, *shape) with values = Σ_j chunks[j] · 2^(width·j) exactly and |chunks| < 2^width.

    ``values`` are float64 arrays of exact integers below 2^(width·count) in magnitude. The chunks
    of |v| come from a power-of-two scaling, a floor and the subtraction of the leading part. Each
    remainder is smaller than the float it came from and a multiple of that float's last bit, so it
    is exact. (Splitting a negative value directly is not: −(2^52 + 1) + 2^72 needs 72 bits.) Every
    chunk then takes the sign of its value.
    """
    rest = np.abs(values)
    chunks = np.empty((count,) + values.shape)
    for j in range(count - 1, 0, -1):
        chunk = chunks[j]
        np.multiply(rest, 2.0 ** (-width * j), out=chunk)
        np.floor(chunk, out=chunk)
        rest -= chunk * 2.0 ** (width * j)
    chunks[0] = rest
    chunks *= np.sign(values)
    return chunks


def from_ints(values: list[int], count: int) -> np.ndarray:
    """Return the limbs (count, len(values)) of Python ints, each of which must fit in count limbs.

    The low limbs travel as little-endian bytes (three per limb) through one NumPy buffer, so the
    Python work is one to_bytes call per value.
    """
    limbs = np.empty((count, len(values)))
    shift = LIMB_BITS * (count - 1)
    if count > 1 and values:
        mask = (1 << shift) - 1
        data = b"".join((value & mask).to_bytes(3 * (count - 1), "little") for value in values)
        raw = np.frombuffer(data, dtype=np.uint8).reshape(len(values), count - 1, 3).astype(np.int64)
        limbs[:-1] = (raw[..., 0] | (raw[..., 1] << 8) | (raw[..., 2] << 16)).T
    limbs[-1] = [value >> shift for value in values]
    return limbs


def to_ints(limbs: np.ndarray) -> list[int]:
    """Return the Python ints of a (count, n) limb array (n entries).

    Normalised low limbs travel as bytes, as in from_ints; other limbs are summed one by one.
    """
    flat = limbs.reshape(limbs.shape[0], -1)
    count = flat.shape[0]
    low = flat[:-1].T.astype(np.int64)  # (n, count − 1)
    tops = flat[-1].astype(np.int64).tolist()
    if count == 1:
        return tops
    shift = LIMB_BITS * (count - 1)
    if low.size and (low.min() < 0 or low.max() >= 1 << LIMB_BITS):
        values = []
        for column, top in zip(low.tolist(), tops):
            value = top
            for limb in reversed(column):
                value = (value << LIMB_BITS) + limb
            values.append(value)
        return values
    raw = np.empty(low.shape + (3,), dtype=np.uint8)
    raw[..., 0], raw[..., 1], raw[..., 2] = low & 0xFF, (low >> 8) & 0xFF, low >> 16
    data, width = raw.tobytes(), 3 * (count - 1)
    return [int.from_bytes(data[i * width:(i + 1) * width], "little") + (top << shift) for i, top in enumerate(tops)]


def limb_count(bits: int) -> int:
    """Return how many limbs hold a signed integer of ``bits`` bits, top limb included."""
    return bits // LIMB_BITS + 1


def magnitudes(limbs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (negative, |x| limbs): the sign of each normalised entry and its normalised magnitude."""
    negative = limbs[-1] < 0
    if not negative.any():
        return negative, limbs
    return negative, normalize(np.where(negative, -limbs, limbs))


def approximate(limbs: np.ndarray, exponent: int = 0) -> np.ndarray:
    """Return float64 approximations of normalised limbs · 2^exponent (relative error below 2^-47).

    Horner's rule from the top limb: v ← v · 2^24 + limb. The steps are exact while |v| < 2^53,
    which covers any cancellation between a negative top limb and the nonnegative limbs below
    it. Once |v| ≥ 2^53 the next limb changes v by at most a 2^-29 fraction, so each later step
    adds one rounding of relative size 2^-53, at most 32 of them.
    """
    count = limbs.shape[0]
    if count > 40:  # v could overflow float64; sum the magnitude's limbs one by one instead
        negative, magnitude = magnitudes(limbs)
        value = np.zeros(limbs.shape[1:])
        for l in range(count - 1, -1, -1):
            value = value + np.ldexp(magnitude[l], LIMB_BITS * l + exponent)
        return np.where(negative, -value, value)
    value = limbs[count - 1].copy()
    for l in range(count - 2, -1, -1):
        value *= LIMB
        value += limbs[l]
    return np.ldexp(value, exponent) if exponent else value


def magnitude_bits(limbs: np.ndarray) -> int:
    """Return an upper bound on the bit length of the largest |entry| of normalised limbs."""
    if limbs.size == 0:
        return 0
    for l in range(limbs.shape[0] - 1, -1, -1):
        largest = float(np.max(np.abs(limbs[l])))
        if largest:
            return LIMB_BITS * l + math.frexp(largest)[1] + 1
    return 0


# Residue number system ------------------------------------------------------------------------


@lru_cache(maxsize=None)
def primes_up_to(limit: int, count: int) -> tuple[int, ...]:
    """Return the ``count`` largest odd primes at most ``limit``, largest first."""
    primes = []
    candidate = limit if limit % 2 else limit - 1
    while len(primes) < count:
        if _is_prime(candidate):
            primes.append(candidate)
        candidate -= 2
    return tuple(primes)


def _is_prime(n: int) -> bool:
    if n < 2 or n % 2 == 0:
        return n == 2
    for d in range(3, math.isqrt(n) + 1, 2):
        if n % d == 0:
            return False
    return True


def prime_limit_for(inner: int) -> int:
    """Return the largest prime size that keeps a float64 dot product of ``inner`` residues exact.

    Symmetric residues satisfy |r| ≤ (p + 1)/2, so every partial sum of ``inner`` products stays
    at most inner · ((p + 1)/2)², which must not exceed 2^53. Primes also stay below 2^24, which
    keeps the products in reduction and recombination below 2^48.
    """
    return min((1 << 24) - 1, 2 * math.isqrt((1 << 53) // max(inner, 1)) - 1)


class PrimeSet:
    """A set of primes with the constants for reduction and Chinese remaindering into limbs."""

    def __init__(self, primes: tuple[int, ...]) -> None:
        self.primes = primes
        self.p = np.array(primes, dtype=np.float64)
        self.inverse_p = 1.0 / self.p
        modulus = math.prod(primes)
        self.modulus = modulus
        self.out_limbs = limb_count(modulus.bit_length() + 8)
        # Explicit CRT: x = Σ_k y_k · (M/p_k) − t · M with y_k = r_k · ((M/p_k)^-1 mod p_k) mod p_k.
        cofactors = [modulus // p for p in primes]
        self.inverse_cofactors = np.array([pow(c % p, -1, p) for c, p in zip(cofactors, primes)], dtype=np.float64)
        self.cofactor_limbs = from_ints(cofactors, self.out_limbs)  # (out_limbs, P), limbs < 2^24
        self.modulus_limbs = from_ints([modulus], self.out_limbs)[:, 0]
        self._chunk_weights: dict[tuple[int, int], np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.primes)

    def power_of_two_residues(self, exponent: int) -> np.ndarray:
        """Return 2^exponent mod p for each prime, as symmetric residues (exponent ≥ 0)."""
        return self.reduce_array(np.array([float(pow(2, exponent, p)) for p in self.primes]))

    def recombination_factors(self, exponent: int = 0) -> np.ndarray:
        """Return c_k = 2^exponent · (M/p_k)^-1 mod p_k per prime, as symmetric residues.

        Residues r of x multiplied by these factors are the y_k = x · 2^exponent · (M/p_k)^-1
        mod p_k that ``to_limbs(…, recombining=True)`` takes. Folding the factors into the
        residues of one factor of a product costs nothing extra.
        """
        return self.multiply(self.power_of_two_residues(exponent), self.inverse_cofactors.copy())

    def reduce_array(self, values: np.ndarray) -> np.ndarray:
        """Reduce a C-contiguous array (P, ...) with |values| < 2^52 to symmetric residues, in place."""
        self.reduce_rows(values.reshape(len(self.primes), -1))
        return values

    def reduce_rows(self, rows: np.ndarray, first: int = 0) -> None:
        """Reduce a (P, n) array or view with |values| < 2^52 in place, row k modulo prime first + k.

        The work runs on all rows at once, in column blocks of about REDUCE_BLOCK entries with one
        scratch block, so no temporary as large as ``rows`` is allocated (large ones are freshly
        mapped pages, which cost more than the arithmetic here), and each NumPy call is long
        enough that its fixed cost stays small.
        """
        count, width = rows.shape
        inverse = self.inverse_p[first:first + count, None]
        p = self.p[first:first + count, None]
        columns = max(1, min(width, REDUCE_BLOCK // count))
        scratch = np.empty((count, columns))
        for start in range(0, width, columns):
            block = rows[:, start:start + columns]
            quotient = scratch[:, :block.shape[1]]
            np.multiply(block, inverse, out=quotient)
            np.rint(quotient, out=quotient)
            np.multiply(quotient, p, out=quotient)
            np.subtract(block, quotient, out=block)

    def _weights(self, count: int, chunk_bits: int, factors: np.ndarray | None) -> np.ndarray:
        """Return (P, count) residues of 2^(chunk_bits · c), times the per-prime ``factors`` when given."""
        weights = np.stack([self.power_of_two_residues(chunk_bits * c) for c in range(count)], axis=1)
        if factors is not None:
            weights = self.multiply(weights, factors[:, None])
        return weights

    def chunking(self, bits: int) -> tuple[int, int]:
        """Return (count, width): the fewest chunks of ``width`` bits that represent integers below 2^bits.

        residues_of_floats needs each chunk times a symmetric weight (at most 2^23), summed over
        ``count`` chunks, to stay below 2^52.
        """
        for count in range(1, 64):
            width = max(1, math.ceil(bits / count))
            if width + 23 + math.ceil(math.log2(count)) < 52:
                return count, width
        raise CapacityError(f"integers of {bits} bits are too wide to split into chunks")

    def chunk_weights(self, count: int, width: int) -> np.ndarray:
        """Return the (P, count) residues of 2^(width · c), cached per (count, width)."""
        key = (count, width)
        if key not in self._chunk_weights:
            self._chunk_weights[key] = self._weights(count, width, None)
        return self._chunk_weights[key]

    def residues_of_limbs(self, limbs: np.ndarray, factors: np.ndarray | None = None) -> np.ndarray:
        """Return the symmetric residues (P, ...) of the integers given by limbs (L, ...).

        With ``factors`` (P,) the result is the residues of x · factors[k] mod p_k instead.
        """
        count = limbs.shape[0]
        # Each term is below 2^24 · 2^23, so a sum of up to 2^5 limbs stays below 2^52.
        if count > 32:
            raise CapacityError(f"{count} limbs exceed the exact residue sum; split the value first")
        residues = self._weights(count, LIMB_BITS, factors) @ limbs.reshape(count, -1)
        return self.reduce_array(residues).reshape((len(self.primes),) + limbs.shape[1:])

    def residues_of_floats(self, chunks: np.ndarray, chunk_bits: int, factors: np.ndarray | None = None) -> np.ndarray:
        """Return residues of integers given as float chunks x = Σ_c chunks[c] · 2^(chunk_bits · c).

        The chunks are integers whose products with symmetric weights (at most 2^23), summed over
        the chunks, stay below 2^52: chunks below 2^24 always do, and wider ones as chunking()
        chooses them. This is the same computation as for limbs with another chunk width.
        """
        count = chunks.shape[0]
        residues = self._weights(count, chunk_bits, factors) @ chunks.reshape(count, -1)
        return self.reduce_array(residues).reshape((len(self.primes),) + chunks.shape[1:])

    def multiply(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Return a · b mod p elementwise for symmetric residues (products stay below 2^46)."""
        return self.reduce_array(a * b)

    def to_limbs(self, residues: np.ndarray, count: int | None = None, recombining: bool = False) -> np.ndarray:
        """Recombine symmetric residues (P, ...) of integers |x| < M/4 into normalised limbs.

        With ``count`` the result has that many limbs, which must hold x: |x| < 2^(24·count − 1).
        The sum then runs modulo 2^(24·count), and the top limb is wrapped into [−2^23, 2^23).
        With ``recombining`` the residues are already the y_k of ``recombination_factors``.
        """
        P = len(self.primes)
        shape = residues.shape[1:]
        y = residues.reshape(P, -1)
        if not recombining:
            y = self.reduce_array(y * self.inverse_cofactors[:, None])
        # x = Σ_k y_k · (M/p_k) − t · M with symmetric y_k, and t = round(Σ y_k / p_k): the sum is
        # within 1/4 of an integer because |x| < M/4, and |t| ≤ P/2 + 1.
        t = np.rint(self.inverse_p @ y)
        out = self.out_limbs if count is None else min(count, self.out_limbs)
        # Each product of a limb (< 2^24) and |y_k| (≤ 2^23) is below 2^47; P ≤ 31 keeps sums exact.
        limbs = self.cofactor_limbs[:out] @ y  # (out, n)
        scratch = np.empty_like(t)
        for l in range(out):  # limb by limb, so the temporary stays one row
            np.multiply(t, self.modulus_limbs[l], out=scratch)
            np.subtract(limbs[l], scratch, out=limbs[l])
        normalize(limbs)
        if count is not None and count < self.out_limbs:
            # The limbs hold x modulo 2^(24·count); x fits, so its top limb is the signed remainder.
            top = limbs[count - 1]
            top -= np.floor((top + 2.0 ** (LIMB_BITS - 1)) * INVERSE_LIMB) * LIMB
        return limbs.reshape((limbs.shape[0],) + shape)


@lru_cache(maxsize=None)
def prime_set(limit: int, count: int) -> PrimeSet:
    return PrimeSet(primes_up_to(limit, count))


def primes_for(product_bits: int, inner: int) -> PrimeSet:
    """Return primes whose product M exceeds 2^(product_bits + 2), sized for dot products of length ``inner``.

    Integers below 2^product_bits in magnitude are then below M/4, as ``to_limbs`` needs.
    """
    limit = prime_limit_for(inner)
    total = 0.0
    for count, p in enumerate(primes_up_to(limit, 31), start=1):
        total += math.log2(p)
        if total >= product_bits + 2.1:  # 0.1 covers the rounding of the float64 logarithms
            return prime_set(limit, count)
    raise CapacityError(f"a product of {product_bits} bits needs more than 31 primes below {limit}; "
                        f"at most 31 keep the recombination exact")
