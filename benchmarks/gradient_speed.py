"""Time the exact gradient of one output entry with respect to one weight entry, fully symbolic.

Every input, weight and bias is a matrix of symbols, at (n_q, n_kv, d_model, h) = (4, 4, 8, 2)
and (8, 8, 16, 2), with an output projection. For each size this prints:

- the time to build the stages (``derive``, not part of the gradient time);
- the time of ``Derivation.grad(("output", 0, 0), "W_Q")``, reverse mode through the stages,
  which forms the whole 8 × 8 or 16 × 16 gradient of W_Q (entry (0, 0) among them);
- beside it, SymPy's plain ``diff`` of the expanded output entry with respect to W_Q[0, 0],
  in a subprocess stopped after CAP_SECONDS (expand and diff timed together).

The reverse-mode entry is checked against a central difference of the output entry (step
1e-20, 80 digits) at a random rational point, and, when the plain diff finishes, against the
plain derivative there too. The last line reads ``gradient_seconds 8x8x16x2: T`` with T the
reverse-mode time.

Run: python benchmarks/gradient_speed.py
"""

from __future__ import annotations

import multiprocessing
import platform
import random
import time

import sympy as sp

from symattn import derive, symbol_matrix

SIZES = ((4, 4, 8, 2), (8, 8, 16, 2))
CAP_SECONDS = 120


def symbolic_derivation(n_q: int, n_kv: int, d_model: int, heads: int):
    """Return the derivation with every input, weight and bias a matrix of distinct symbols."""
    return derive(
        symbol_matrix("x", n_q, d_model),
        key_source=symbol_matrix("y", n_kv, d_model),
        value_source=symbol_matrix("z", n_kv, d_model),
        W_Q=symbol_matrix("a", d_model, d_model),
        W_K=symbol_matrix("b", d_model, d_model),
        W_V=symbol_matrix("c", d_model, d_model),
        b_Q=symbol_matrix("p", 1, d_model),
        b_K=symbol_matrix("q", 1, d_model),
        b_V=symbol_matrix("r", 1, d_model),
        W_O=symbol_matrix("o", d_model, d_model),
        b_O=symbol_matrix("s", 1, d_model),
        heads=heads,
        max_expression_size=None,  # the point is to build these large stages
    )


def plain_diff(size: tuple[int, int, int, int], results) -> None:
    """Expand output[0, 0] and differentiate it with respect to W_Q[0, 0]; report through ``results``."""
    derivation = symbolic_derivation(*size)
    started = time.perf_counter()
    expanded = sp.expand(derivation.output[0, 0])
    derivative = sp.diff(expanded, derivation.inputs["W_Q"][0, 0])
    results.put((time.perf_counter() - started, derivative))


def time_plain_diff(size: tuple[int, int, int, int]) -> tuple[float | None, sp.Expr | None]:
    """Return (seconds, derivative), or (None, None) when the plain diff runs past CAP_SECONDS.

    The child builds the stages first, which takes a few seconds and is not timed, so the parent
    waits CAP_SECONDS plus a margin of twice the build time measured here and 5 s.
    """
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    child = context.Process(target=plain_diff, args=(size, results), daemon=True)
    build_started = time.perf_counter()
    symbolic_derivation(*size)
    build_seconds = time.perf_counter() - build_started
    child.start()
    child.join(CAP_SECONDS + 2 * build_seconds + 5)
    if child.is_alive():
        child.terminate()
        child.join()
        return None, None
    seconds, derivative = results.get(timeout=5)
    return (seconds, derivative) if seconds <= CAP_SECONDS else (None, None)


def processor_name() -> str:
    """Return the CPU model from /proc/cpuinfo where there is one (Linux), else the architecture."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def random_point(symbols: set[sp.Symbol]) -> dict[sp.Symbol, sp.Rational]:
    rng = random.Random(0)
    return {symbol: sp.Rational(rng.randint(-4, 4), rng.randint(3, 9)) for symbol in sorted(symbols, key=str)}


def agree(first: sp.Expr, second: sp.Expr, point: dict) -> bool:
    """Return whether two expressions agree to 30 digits at the point."""
    difference = sp.N(first.xreplace(point), 40) - sp.N(second.xreplace(point), 40)
    return abs(difference) < sp.Float("1e-30")


def central_difference(expr: sp.Expr, symbol: sp.Symbol, point: dict) -> sp.Float:
    """Return (f(x + h) − f(x − h)) / 2h at the point with h = 1e-20, evaluated to 80 digits."""
    step = sp.Rational(1, 10**20)
    plus, minus = dict(point), dict(point)
    plus[symbol] += step
    minus[symbol] -= step
    return (sp.N(expr.xreplace(plus), 80) - sp.N(expr.xreplace(minus), 80)) / (2 * step)


def main() -> None:
    print(f"machine: {processor_name()}, {multiprocessing.cpu_count()} cores; "
          f"Python {platform.python_version()}, SymPy {sp.__version__}")
    lines = []
    for size in SIZES:
        label = "x".join(map(str, size))
        started = time.perf_counter()
        derivation = symbolic_derivation(*size)
        derive_seconds = time.perf_counter() - started

        started = time.perf_counter()
        gradient = derivation.grad(("output", 0, 0), "W_Q")
        gradient_seconds = time.perf_counter() - started
        entry = gradient[0, 0]

        point = random_point(derivation.free_symbols)
        difference = central_difference(derivation.output[0, 0], derivation.inputs["W_Q"][0, 0], point)
        checked = "yes" if agree(entry, difference, point) else "NO"

        plain_seconds, plain = time_plain_diff(size)
        if plain is None:
            plain_text = f"did not finish within {CAP_SECONDS} s"
        else:
            plain_text = f"{plain_seconds:.2f} s (agrees at the point: {'yes' if agree(entry, plain, point) else 'NO'})"
        print(f"{label}: derive {derive_seconds:.2f} s; reverse-mode gradient of W_Q {gradient_seconds:.3f} s "
              f"(agrees with a central difference at a random point: {checked}); "
              f"plain diff of the expanded entry {plain_text}", flush=True)
        lines.append(f"gradient_seconds {label}: {gradient_seconds:.3f}")
    for line in lines:
        print(line)


if __name__ == "__main__":
    main()
