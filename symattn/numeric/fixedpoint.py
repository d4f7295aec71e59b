"""Vectorised fixed-point arithmetic on limb arrays: truncated products and exp(−u).

A fixed-point number with k fraction limbs is an integer of limbs times 2^(−24·k). Products are
truncated, and every function states how many units of the last place (ulps) its result may be
off, so the callers can carry rigorous error bounds. All operands here are nonnegative, which
makes the truncation errors easy to bound.

exp(−u) for u ≥ 0 splits u into its integer part j0, the top 8 bits j1 and the next 16 bits j of
its fraction, looks up two tables, and evaluates the remaining part r < 2^-24 by its Taylor
series: exp(−u) = exp(−j0 − j1/2^8) · exp(−j/2^24) · exp(−r).
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import Callable

import numpy as np

from .blas import single_threaded_blas
from .limbs import LIMB, LIMB_BITS, from_ints, normalize


def multiply_truncated(a: np.ndarray, b: np.ndarray, drop: int, normalized: bool = True) -> np.ndarray:
    """Return the nonnegative product a · b with its ``drop`` lowest limbs removed.

    ``a`` (La, n) and ``b`` (Lb, n) or (Lb, 1) hold normalised nonnegative limbs. Partial products
    below limb position drop − 1 are skipped, so the result is below the exact a·b / 2^(24·drop)
    by less than min(La, Lb) + 2 units (see product_error).

    ``a`` may also carry a sign in its top limb (|limb| < 2^24). The skipped partial products
    then may be negative, but their size has the same bound, so the result lies within
    min(La, Lb) + 2 units of the exact value on either side.

    With ``normalized=False`` the result has the same value, but only the carry out of the
    dropped limb is propagated: its limbs are then integers below 2^53 instead of normalised.
    """
    count_a, count_b = a.shape[0], b.shape[0]
    first = max(drop - 1, 0)
    width = count_a + count_b - first
    shape = np.broadcast_shapes(a.shape[1:], b.shape[1:])
    out = np.zeros((width,) + shape)
    scratch = np.empty((count_b,) + shape)
    for i in range(count_a):
        j_start = max(0, first - i)
        if j_start >= count_b:
            continue
        rows = count_b - j_start
        np.multiply(a[i], b[j_start:], out=scratch[:rows])
        target = out[i + j_start - first:i + count_b - first]
        np.add(target, scratch[:rows], out=target)
    if normalized:
        normalize(out)
    elif drop > first:
        # Dropping limb 0 after carrying floor(limb 0 / 2^24) up gives the same value as normalising first.
        out[1] += np.floor(out[0] * (1.0 / LIMB))
    return out[drop - first:]


def product_error(count_a: int, count_b: int) -> int:
    """Return the bound, in units of the result's last place, on the error of multiply_truncated."""
    return min(count_a, count_b) + 2


def trim(limbs: np.ndarray, count: int) -> np.ndarray:
    """Drop top limbs beyond ``count`` (they must be zero)."""
    return limbs[:count]


@lru_cache(maxsize=8)
def exp_tables(fraction_limbs: int) -> dict[str, np.ndarray | int]:
    """Return the fixed-point tables for exp(−u): F = 24 · fraction_limbs fraction bits.

    "high"[j0 · 256 + j1] is exp(−j0 − j1/2^8) and "low"[j] is exp(−j/2^24) for 16-bit j. Both are
    products of floor(value · 2^F) base tables, each at most 2 units low. "taylor"[n] is
    floor(2^F / n!). Two combined tables need two products per exp instead of four.
    """
    F = LIMB_BITS * fraction_limbs
    largest_integer = math.ceil((F + 2) * math.log(2)) + 1  # exp(−j) < 2^-(F+2) beyond this
    limb_count = fraction_limbs + 1
    integer = _exp_table([-j for j in range(largest_integer + 1)], 0, F, limb_count)
    first = _exp_table([-j for j in range(256)], 8, F, limb_count)
    second = _exp_table([-j for j in range(256)], 16, F, limb_count)
    third = _exp_table([-j for j in range(256)], 24, F, limb_count)
    high = multiply_truncated(np.repeat(integer, 256, axis=1), np.tile(first, (1, largest_integer + 1)), fraction_limbs)
    low = multiply_truncated(np.repeat(second, 256, axis=1), np.tile(third, (1, 256)), fraction_limbs)
    return {
        "high": high[:limb_count],
        "low": low[:limb_count],
        "taylor": from_ints([(1 << F) // math.factorial(n) for n in range(fraction_limbs + 1)], limb_count),
        "largest_integer": largest_integer,
    }


def _exp_table(numerators: list[int], shift: int, F: int, limb_count: int) -> np.ndarray:
    """Return floor(exp(n / 2^shift) · 2^F) for each n, as limbs (limb_count, len(numerators))."""
    values = [_floor_exp_scaled(n, shift, F) for n in numerators]
    return from_ints(values, limb_count)


def _floor_exp_scaled(numerator: int, shift: int, F: int) -> int:
    """Return floor(exp(numerator / 2^shift) · 2^F), possibly one or two units low."""
    try:
        import flint
    except ImportError:
        flint = None
    if flint is not None:
        saved = flint.ctx.prec
        flint.ctx.prec = F + 64
        try:
            value = (flint.arb(numerator) / (1 << shift)).exp() * flint.arb(2) ** F
            return int(value.lower().floor().unique_fmpz())
        finally:
            flint.ctx.prec = saved
    import mpmath

    with mpmath.workprec(F + 64):
        value = mpmath.exp(mpmath.mpf(numerator) / (1 << shift)) * mpmath.mpf(2) ** F
        return int(mpmath.floor(value)) - 1


def exp_error(fraction_limbs: int) -> int:
    """Return the bound, in units of 2^-F, on |exp_negative(u) − exp(−u)| for exact u ≥ 0."""
    k = fraction_limbs
    # Horner step n works with k − n fraction limbs; its error (product, truncated r and
    # coefficient) is damped by r^n < 2^(−24·n), so each step costs at most k + 5 final units.
    taylor = k * (k + 5) + 1
    # A combined table entry: two base entries (2 units each) and their product.
    table = 2 + 2 + product_error(k + 1, k + 1)
    # Two products of factors at most 1, whose errors add.
    return 2 * product_error(k + 1, k + 1) + 2 * table + taylor


# Entries per block: a block's limb arrays stay in the processor caches between operations. On a
# 2-core AMD EPYC with 512 KiB of L2 per core and 8 MiB of L3, two workers took 125–155 ms for
# 196 608 exponentials with blocks of 16384 entries and 150–170 ms with blocks of 32768.
BLOCK = 16384
# Threads that evaluate blocks at once (at most one per processor core).
MAX_WORKERS = 4


def exp_negative(u: np.ndarray, fraction_limbs: int) -> np.ndarray:
    """Return exp(−u) in fixed point with ``fraction_limbs`` fraction limbs, for u ≥ 0.

    ``u`` contains normalised nonnegative limbs (count ≥ fraction_limbs + 1) with the same fraction
    limbs. The result has fraction_limbs + 1 limbs and is within exp_error(fraction_limbs) units
    of the exact value; entries with exp(−u) < 2^-(F+2) come out as exactly 0.
    """
    result = np.empty((fraction_limbs + 1, u.shape[1]))
    exp_tables(fraction_limbs)  # build the tables once, before any worker needs them

    def run(start: int) -> None:
        stop = min(start + BLOCK, u.shape[1])
        result[:, start:stop] = _exp_negative_block(u[:, start:stop], fraction_limbs)

    in_threads(run, range(0, u.shape[1], BLOCK))
    return result


def in_threads(function: Callable[[int], None], starts: range) -> None:
    """Call ``function(start)`` for every start, on up to MAX_WORKERS threads (one per processor core).

    NumPy releases the GIL inside its array operations, so blocks on other threads run in parallel.
    OpenBLAS runs on one thread meanwhile, so that its idle threads leave the cores to the workers.
    """
    workers = min(len(starts), os.cpu_count() or 1, MAX_WORKERS)
    if workers <= 1:
        for start in starts:
            function(start)
        return
    with single_threaded_blas(), ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(function, starts))


def _exp_negative_block(u: np.ndarray, k: int) -> np.ndarray:
    tables = exp_tables(k)
    n = u.shape[1]

    # Integer part j0 and the three 8-bit groups of the fraction's top limb.
    integer = np.zeros(n)
    for l in range(u.shape[0] - 1, k - 1, -1):
        integer = integer * LIMB + u[l]
    too_small = integer > tables["largest_integer"]
    j0 = np.where(too_small, 0, integer)
    top = u[k - 1]
    j1 = np.floor(top * 2.0**-16)
    high_index = (j0 * 256.0 + j1).astype(np.intp)  # exp(−j0 − j1/2^8)
    low_index = (top - j1 * 65536.0).astype(np.intp)  # exp(−j/2^24) for the low 16 bits

    # exp(−r) for the rest r < 2^-24 by Horner, p_n = c_n − r · p_(n+1). Step n keeps k − n
    # fraction limbs, because r^n < 2^(−24·n) damps its error.
    r = u[:k - 1]  # fraction limbs below the top one, so r < 2^-24
    coefficients = tables["taylor"]
    p = np.zeros((1, n))  # p_k = floor(1/k!) with no fraction limbs: 0 for k ≥ 2
    for step in range(k - 1, -1, -1):
        kept = k - step  # fraction limbs of p_step
        r_kept = r[k - kept:]  # r at 2^(−24·kept) resolution; its top limb (2^-24) is 0
        coefficient = coefficients[k - kept:, step:step + 1]  # floor(1/step! · 2^(24·kept))
        if not r_kept.shape[0] or step == k - 1:  # r · p vanishes: p is 0 or r has no limbs
            p = np.repeat(coefficient, n, axis=1)
            continue
        # p ← coefficient − r · p, in the product's own array. The product is below 2^-24, so the
        # limbs above kept + 1 are zero once normalised.
        product = multiply_truncated(r_kept, p, kept - 1, normalized=False)
        product = _pad(product, max(kept + 1, product.shape[0]))  # pads only, never drops limbs
        np.negative(product, out=product)
        product[:kept + 1] += coefficient
        p = normalize(product)[:kept + 1]

    # Multiply the table factors, all at most 1, into the result.
    result = multiply_truncated(p, np.take(tables["low"], low_index, axis=1), k)[: k + 1]
    result = multiply_truncated(result, np.take(tables["high"], high_index, axis=1), k)[: k + 1]
    result[:, too_small] = 0.0
    return result


def _pad(limbs: np.ndarray, count: int) -> np.ndarray:
    """Return limbs with zero limbs added on top (or extra zero top limbs removed) to ``count`` limbs."""
    if limbs.shape[0] >= count:
        return limbs[:count]
    padding = np.zeros((count - limbs.shape[0],) + limbs.shape[1:])
    return np.concatenate([limbs, padding], axis=0)
