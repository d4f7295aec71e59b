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
The last line reads ``ratio_vs_numpy_float64 128x128x768x12: R``.

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
    print(f"ratio_vs_numpy_float64 128x128x768x12: {ratios[(128, 128, 768, 12)]:.1f}")


if __name__ == "__main__":
    main()
