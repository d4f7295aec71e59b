"""Time the certified 50-digit reference against a plain NumPy float64 attention.

For each size (n_q, n_kv, d_model, h) the script builds one cross-attention problem with random
float64 inputs, projection weights and biases (seed 0), then prints:

- numpy: a plain float64 implementation of the same attention, with projections (median of 5 calls);
- certified: ``compute_reference(problem, 50, stages=["output"])``, the output certified to 50
  significant digits with the engine python-flint selects;
- readout: ``rounded("float64")`` of that output, which runs entry by entry in Python;
- mpmath: the same reference with the plain mpmath engine, in a subprocess stopped after 120 s;
- peak: the largest memory the certified run allocates, measured by tracemalloc in a separate run.

Each size runs three times; the ratio is certified / numpy per run, and its median is reported.
At the largest size, output row 0 is then compared with a computation that shares no code with
symattn (exact python-flint fmpq_mat projections, arb softmax). The last line reads
``ratio_vs_numpy_float64 128x128x768x12: R``.

Run it as ``python benchmarks/reference_speed.py`` (add ``--quick`` to skip the mpmath runs).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
import tracemalloc

import numpy as np

SIZES = [(3, 4, 4, 2), (16, 16, 64, 4), (64, 64, 128, 8), (128, 128, 768, 12)]
RUNS = 3
MPMATH_LIMIT_S = 120
DIGITS = 50


def make_arrays(n_q: int, n_kv: int, d_model: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {"query_source": rng.standard_normal((n_q, d_model)), "kv_source": rng.standard_normal((n_kv, d_model))}
    for name in ("Q", "K", "V", "O"):
        arrays[f"W_{name}"] = rng.standard_normal((d_model, d_model)) / np.sqrt(d_model)
        arrays[f"b_{name}"] = rng.standard_normal(d_model) * 0.1
    return arrays


def numpy_attention(arrays: dict[str, np.ndarray], heads: int) -> np.ndarray:
    """Multi-head cross attention in float64: projections, scaled softmax per head, output projection."""
    X, Y = arrays["query_source"], arrays["kv_source"]
    Q = X @ arrays["W_Q"] + arrays["b_Q"]
    K = Y @ arrays["W_K"] + arrays["b_K"]
    V = Y @ arrays["W_V"] + arrays["b_V"]
    d_k = Q.shape[1] // heads
    outputs = []
    for i in range(heads):
        block = slice(i * d_k, (i + 1) * d_k)
        Z = Q[:, block] @ K[:, block].T / np.sqrt(d_k)
        E = np.exp(Z - Z.max(axis=1, keepdims=True))
        outputs.append((E / E.sum(axis=1, keepdims=True)) @ V[:, block])
    return np.hstack(outputs) @ arrays["W_O"] + arrays["b_O"]


def make_problem(arrays: dict[str, np.ndarray], heads: int):
    from symattn import AttentionSpec
    from symattn.problem import Problem

    inputs = {name: value for name, value in arrays.items() if name not in ("W_O", "b_O")}
    return Problem.from_arrays(spec=AttentionSpec(heads=heads), W_O=arrays["W_O"], b_O=arrays["b_O"], **inputs)


def time_numpy(arrays: dict[str, np.ndarray], heads: int) -> float:
    numpy_attention(arrays, heads)  # warm-up
    timings = []
    for _ in range(5):
        start = time.perf_counter()
        numpy_attention(arrays, heads)
        timings.append(time.perf_counter() - start)
    return statistics.median(timings)


def time_certified(problem) -> tuple[float, float, np.ndarray]:
    from symattn.numeric.reference import compute_reference

    start = time.perf_counter()
    reference = compute_reference(problem, DIGITS, stages=["output"])
    elapsed = time.perf_counter() - start
    start = time.perf_counter()
    values = reference.output.rounded("float64")
    return elapsed, time.perf_counter() - start, values


def peak_memory_mb(problem) -> float:
    from symattn.numeric.reference import compute_reference

    tracemalloc.start()
    compute_reference(problem, DIGITS, stages=["output"])
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak / 2**20


def time_mpmath(size: tuple[int, int, int, int]) -> str:
    """Run the mpmath engine in a subprocess; return its time, or why it has none."""
    n_q, n_kv, d_model, heads = size
    code = (
        "import sys, time, warnings; sys.path.insert(0, {path!r});"
        "from reference_speed import make_arrays, make_problem;"
        "from symattn.numeric.reference import compute_reference;"
        "p = make_problem(make_arrays({n_q}, {n_kv}, {d_model}), {heads});"
        "t = time.perf_counter(); compute_reference(p, {digits}, stages=['output'], engine='mpmath');"
        "print(time.perf_counter() - t)"
    ).format(path=os.path.dirname(os.path.abspath(__file__)), n_q=n_q, n_kv=n_kv, d_model=d_model,
             heads=heads, digits=DIGITS)
    try:
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=MPMATH_LIMIT_S)
    except subprocess.TimeoutExpired:
        return f"> {MPMATH_LIMIT_S} s"
    if result.returncode != 0:
        return "failed: " + result.stderr.strip().splitlines()[-1]
    return f"{float(result.stdout):.2f} s"


def independent_row(arrays: dict[str, np.ndarray], heads: int, columns: int = 8) -> list[str]:
    """Return output row 0, first ``columns`` entries, to DIGITS digits, computed without symattn.

    The projections are exact python-flint fmpq_mat products; the softmax, A·V and the output
    projection use arb balls at 400 bits. This guards the certified engine's exact products at a
    size where its integer forms are over 72 bits wide.
    """
    from fractions import Fraction

    import flint

    def exact(array: np.ndarray):
        array = np.atleast_2d(array)
        entries = [flint.fmpq(*Fraction(float(v)).as_integer_ratio()) for v in array.reshape(-1)]
        return flint.fmpq_mat(array.shape[0], array.shape[1], entries)

    def ball(value) -> object:
        return flint.arb(value.p) / value.q

    saved = flint.ctx.prec
    flint.ctx.prec = 400
    try:
        n_kv = arrays["kv_source"].shape[0]
        ones = flint.fmpq_mat(n_kv, 1, [1] * n_kv)
        Q = exact(arrays["query_source"][:1]) * exact(arrays["W_Q"]) + exact(arrays["b_Q"])
        K = exact(arrays["kv_source"]) * exact(arrays["W_K"]) + ones * exact(arrays["b_K"])
        V = exact(arrays["kv_source"]) * exact(arrays["W_V"]) + ones * exact(arrays["b_V"])
        d_k = Q.ncols() // heads
        scale = flint.arb(d_k).sqrt()
        concat = []
        for head in range(heads):
            block = range(head * d_k, (head + 1) * d_k)
            logits = [ball(sum((Q[0, c] * K[j, c] for c in block), flint.fmpq(0))) / scale for j in range(n_kv)]
            weights = [z.exp() for z in logits]
            total = sum(weights, flint.arb(0))
            concat += [sum((w * ball(V[j, c]) for j, w in enumerate(weights)), flint.arb(0)) / total for c in block]
        row = []
        for c in range(columns):
            value = ball(exact(arrays["b_O"][c:c + 1])[0, 0])
            for j, weight in enumerate(arrays["W_O"][:, c]):
                value += concat[j] * ball(flint.fmpq(*Fraction(float(weight)).as_integer_ratio()))
            row.append(value)
        return [value.str(DIGITS + 5, radius=False) for value in row]
    finally:
        flint.ctx.prec = saved


def describe_machine() -> list[str]:
    import flint

    lines = [f"python {platform.python_version()}, numpy {np.__version__}, python-flint {flint.__version__}"]
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "unknown processor"
    lines.append(f"cpu: {model}, {os.cpu_count()} logical cores")
    blas = {key: os.environ[key] for key in ("OPENBLAS_NUM_THREADS", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE") if key in os.environ}
    lines.append(f"blas environment: {blas or 'defaults'}")
    return lines


def main() -> None:
    from symattn.numeric.reference import compute_reference

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="skip the mpmath engine runs")
    args = parser.parse_args()

    for line in describe_machine():
        print(line)
    print(f"{'size (n_q, n_kv, d_model, h)':30s} {'numpy':>10s} {'certified':>11s} {'ratio':>7s} "
          f"{'readout':>9s} {'peak MB':>8s}  mpmath")
    ratios = {}
    for size in SIZES:
        n_q, n_kv, d_model, heads = size
        arrays = make_arrays(n_q, n_kv, d_model)
        problem = make_problem(arrays, heads)
        expected = numpy_attention(arrays, heads)
        runs = []
        for _ in range(RUNS):
            numpy_s = time_numpy(arrays, heads)
            certified_s, readout_s, values = time_certified(problem)
            runs.append((certified_s / numpy_s, numpy_s, certified_s, readout_s))
            # The float64 computation must be close to the correctly rounded reference.
            assert np.allclose(values, expected, rtol=1e-9, atol=1e-12)
        ratio = statistics.median(run[0] for run in runs)
        ratios[size] = ratio
        numpy_s = statistics.median(run[1] for run in runs)
        certified_s = statistics.median(run[2] for run in runs)
        readout_s = statistics.median(run[3] for run in runs)
        peak = peak_memory_mb(problem)
        mpmath_time = "skipped" if args.quick else time_mpmath(size)
        print(f"{str(size):30s} {numpy_s * 1e3:8.2f}ms {certified_s * 1e3:9.1f}ms {ratio:7.1f} "
              f"{readout_s * 1e3:7.0f}ms {peak:8.1f}  {mpmath_time}", flush=True)
    # The last size again, one row against a computation that shares no code with symattn.
    size = SIZES[-1]
    arrays = make_arrays(*size[:3])
    reference = compute_reference(make_problem(arrays, size[3]), DIGITS, stages=["output"])
    ours = reference.output.decimals()[0][:8]
    theirs = independent_row(arrays, size[3])
    agree = [_same_digits(a, b) for a, b in zip(ours, theirs)]
    print(f"independent check of output row 0 at {size}: {sum(agree)} of {len(agree)} entries agree "
          f"to {DIGITS} digits")
    if not all(agree):
        raise SystemExit(f"certified {ours} differ from the independent computation {theirs}")
    print(f"ratio_vs_numpy_float64 128x128x768x12: {ratios[(128, 128, 768, 12)]:.1f}")


def _same_digits(ours: str, theirs: str) -> bool:
    """Return whether ``theirs`` (a few digits longer) rounds to the certified decimal ``ours``."""
    import decimal

    context = decimal.Context(prec=DIGITS, rounding=decimal.ROUND_HALF_EVEN)
    return context.plus(decimal.Decimal(theirs)) == decimal.Decimal(ours)


if __name__ == "__main__":
    main()
