"""PyTorch autograd's gradients of attention against the exact gradients.

For a call of ``torch.nn.MultiheadAttention`` or ``scaled_dot_product_attention`` and an upstream
gradient G, the objective is L = ⟨G, output⟩ = Σ G ∘ output. The call runs in each requested dtype
with fresh leaf copies of query, key and value (so in self attention each role gets its own
gradient, as symattn's ``query_role``, ``key_role`` and ``value_role`` do; the total over the
roles, ``grad(d, objective, "source")``, is their sum), then
``backward`` runs with G. The exact gradients come from symattn's reverse mode at the very values
PyTorch received in that dtype, and are certified to ``digits`` digits by ball arithmetic.

Layouts are converted at the edge: PyTorch's weights are Wᵀ, so ∂L/∂in_proj_weight stacks
(∂L/∂W_Q)ᵀ, (∂L/∂W_K)ᵀ and (∂L/∂W_V)ᵀ, and ∂L/∂out_proj.weight is (∂L/∂W_O)ᵀ. Weight gradients
sum over the batch exactly before they are rounded.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np
import sympy as sp
import torch

from ..errors import InvalidInputError, UnsupportedError
from ..gradients import backward, hessian_vector_product
from ..numeric.balls import certified_decimals
from ..torch import MHA, problems_from_call
from .floats import dtype_name, round_fraction
from .metrics import StageComparison, Tolerance, compare_stage
from .report import Report

DEFAULT_DIGITS = 30
DEFAULT_DTYPES: tuple[str, ...] = ("float64", "float32")
_TORCH_DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class GradientReport:
    """The gradient comparison of one PyTorch call, one Report per dtype.

    In each Report, a "stage" is one gradient, named after the tensor it belongs to, for
    example "grad query" or "grad in_proj_weight".
    """

    implementation: str
    reports: tuple[Report, ...]

    @property
    def passed(self) -> bool:
        return all(report.passed for report in self.reports)

    def report(self, dtype: str) -> Report:
        """Return the Report of one dtype."""
        for report in self.reports:
            if report.dtype == dtype:
                return report
        raise KeyError(f"no report for {dtype!r}; the dtypes are {', '.join(r.dtype for r in self.reports)}")

    def to_dict(self) -> dict:
        return {
            "format": "symattn-gradient-verification/1",
            "implementation": self.implementation,
            "passed": self.passed,
            "reports": [report.to_dict() for report in self.reports],
        }

    def to_table(self) -> str:
        """Return one table per dtype, each headed by the implementation and objective."""
        parts = [f"gradients of {self.implementation} (L = sum of upstream ∘ output) against exact gradients\n"]
        parts.extend(report.to_table() for report in self.reports)
        return "\n".join(parts)


def compare_gradients(
    fn: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *args: Any,
    upstream: Any = None,
    dtypes: tuple[str, ...] = DEFAULT_DTYPES,
    digits: int = DEFAULT_DIGITS,
    tolerance: Tolerance | None = None,
    masked_rows: str = "error",
    **kwargs: Any,
) -> GradientReport:
    """Compare autograd's gradients of ``fn(query, key, value, *args, **kwargs)`` with the exact ones.

    ``fn`` is an ``nn.MultiheadAttention`` (whose parameters get gradients too) or
    ``torch.nn.functional.scaled_dot_product_attention``. ``upstream`` is G, shaped like the
    output (ones when None). For each dtype the module, the inputs, float masks and G are cast
    to it. The tolerance is torch.testing's default for the dtype unless given.
    """
    reports = []
    for dtype in dtypes:
        run = _autograd_run(fn, query, key, value, args, kwargs, upstream, dtype_name(dtype))
        exact = _exact_gradients(run, masked_rows, digits)
        stages = tuple(
            compare_stage(actual, exact[name][0], dtype=run.dtype, rounded=exact[name][1],
                          tolerance=tolerance, name=name, axes=_axes(fn, actual.ndim, name, kwargs))
            for name, actual in run.gradients.items()
        )
        notes = tuple(note for name, actual in run.gradients.items() if (note := _zero_note(name, actual, exact[name][0])))
        reports.append(
            Report(dtype=run.dtype, tolerance=tolerance or Tolerance.default(run.dtype), digits=digits,
                   engine=_engine(), stages=stages, notes=notes)
        )
    name = "nn.MultiheadAttention" if isinstance(fn, torch.nn.MultiheadAttention) else "scaled_dot_product_attention"
    return GradientReport(name, tuple(reports))


def compare_problem_gradients(
    problem: Any,
    *,
    upstream: Any = None,
    dtypes: tuple[str, ...] = DEFAULT_DTYPES,
    digits: int = DEFAULT_DIGITS,
    tolerance: Tolerance | None = None,
) -> GradientReport:
    """Run PyTorch on a Problem and compare its autograd gradients with the exact ones.

    A Problem with projections runs as an ``nn.MultiheadAttention`` (which needs the query
    width, d_model and the output width to be equal), a Problem given as Q, K and V as
    ``scaled_dot_product_attention`` with its heads on dimension -3. Masks become one float
    attention mask (−inf where hidden) and fully masked rows follow the problem's policy.

    NOTE: the inputs, an additive mask and a scale other than 1/√d_k reach PyTorch as float64
    values, so a rational such as 1/3 is rounded first. The exact gradients are those of the
    rounded values that PyTorch received.
    """
    fn, tensors, options = _torch_call(problem)
    return compare_gradients(
        fn, *tensors, upstream=upstream, dtypes=dtypes, digits=digits, tolerance=tolerance,
        masked_rows=problem.spec.masked_rows, **options,
    )


def _torch_call(problem: Any) -> tuple[Any, tuple[torch.Tensor, ...], dict]:
    """Return (callable, (query, key, value), keyword arguments) that compute ``problem`` in PyTorch."""
    inputs = {name: torch.tensor(np.asarray(value, dtype=np.float64)) for name, value in problem.inputs.items()}
    mask = _float_mask(problem)
    if problem.direct:
        if "W_O" in inputs:
            raise UnsupportedError(
                "a problem given as Q, K and V with an output projection has no PyTorch "
                "equivalent here; drop W_O, or give the sources and weights instead"
            )
        heads = problem.heads
        # (n, h·d) with head i in columns i·d … (i+1)·d − 1  ->  (h, n, d).
        tensors = tuple(inputs[name].reshape(inputs[name].shape[0], heads, -1).transpose(0, 1) for name in ("Q", "K", "V"))
        options = {"attn_mask": None if mask is None else mask}
        scale = problem.spec.scale
        if scale != "sqrt_dk":
            options["scale"] = float(problem.spec.scale_value(problem.d_k, problem.n_kv))
        return torch.nn.functional.scaled_dot_product_attention, tensors, options
    return _mha_module(problem, inputs), (inputs["query_source"], inputs["key_source"], inputs["value_source"]), {
        "attn_mask": mask, "need_weights": False,
    }


def _float_mask(problem: Any) -> torch.Tensor | None:
    """Return the problem's masks as one additive float mask (heads, n_q, n_kv), or None."""
    if not problem.spec.has_mask:
        return None
    visible, bias = problem.visibility()
    values = np.zeros(visible.shape) if bias is None else np.vectorize(float, otypes=[np.float64])(bias)
    return torch.tensor(np.where(visible, values, -np.inf))


def _mha_module(problem: Any, inputs: dict[str, torch.Tensor]) -> torch.nn.MultiheadAttention:
    """Build an nn.MultiheadAttention with the problem's weights (transposed to PyTorch's layout)."""
    W_Q = inputs["W_Q"]
    E = W_Q.shape[1]
    if W_Q.shape[0] != E or inputs["W_V"].shape[1] != E or ("W_O" in inputs and tuple(inputs["W_O"].shape) != (E, E)):
        raise UnsupportedError(
            f"nn.MultiheadAttention needs W_Q and W_O of shape ({E}, {E}) and W_V with {E} "
            f"columns, but W_Q is {tuple(W_Q.shape)}, W_V is {tuple(inputs['W_V'].shape)}"
            + (f" and W_O is {tuple(inputs['W_O'].shape)}" if "W_O" in inputs else "")
            + "; compare such a problem through its own implementation instead"
        )
    has_bias = any(name in inputs for name in ("b_Q", "b_K", "b_V", "b_O"))
    module = torch.nn.MultiheadAttention(
        E, problem.heads, bias=has_bias, kdim=inputs["W_K"].shape[0], vdim=inputs["W_V"].shape[0],
        dtype=torch.float64,
    )
    zeros = torch.zeros(E, dtype=torch.float64)
    with torch.no_grad():
        # PyTorch computes x Wᵀ + b, so each weight goes in transposed; a missing bias is 0.
        if module._qkv_same_embed_dim:
            module.in_proj_weight.copy_(torch.cat([inputs[name].T for name in ("W_Q", "W_K", "W_V")]))
        else:
            for letter, name in zip("qkv", ("W_Q", "W_K", "W_V")):
                getattr(module, f"{letter}_proj_weight").copy_(inputs[name].T)
        module.out_proj.weight.copy_(inputs["W_O"].T if "W_O" in inputs else torch.eye(E, dtype=torch.float64))
        if has_bias:
            module.in_proj_bias.copy_(torch.cat([inputs.get(name, zeros).reshape(-1) for name in ("b_Q", "b_K", "b_V")]))
            module.out_proj.bias.copy_(inputs.get("b_O", zeros).reshape(-1))
    return module


@dataclass(frozen=True)
class _Run:
    """One autograd run: the cast call, its output, upstream gradient and autograd's gradients."""

    fn: Any
    tensors: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    args: tuple
    kwargs: dict
    upstream: torch.Tensor
    gradients: dict[str, np.ndarray]
    dtype: str


def _autograd_run(fn, query, key, value, args, kwargs, upstream, dtype: str) -> _Run:
    torch_dtype = _TORCH_DTYPES[dtype]
    if isinstance(fn, torch.nn.MultiheadAttention):
        fn = copy.deepcopy(fn).to(torch_dtype)
        fn.zero_grad(set_to_none=True)
    tensors = tuple(t.detach().to(torch_dtype).clone().requires_grad_(True) for t in (query, key, value))
    args = tuple(_cast_float(a, torch_dtype) for a in args)
    kwargs = {name: _cast_float(a, torch_dtype) for name, a in kwargs.items()}

    result = fn(*tensors, *args, **kwargs)
    output = result[0] if isinstance(result, tuple) else result
    G = torch.ones_like(output) if upstream is None else torch.as_tensor(upstream).to(torch_dtype)
    if G.shape != output.shape:
        raise InvalidInputError(
            f"upstream has shape {tuple(G.shape)} but the output has shape {tuple(output.shape)}; "
            f"give one weight per output entry"
        )
    output.backward(G)

    gradients = {f"grad {name}": _numpy(t.grad) for name, t in zip(("query", "key", "value"), tensors)}
    if isinstance(fn, torch.nn.MultiheadAttention):
        for name, parameter in fn.named_parameters():
            if parameter.grad is not None:
                gradients[f"grad {name}"] = _numpy(parameter.grad)
    return _Run(fn, tensors, args, kwargs, G.detach(), gradients, dtype)


def _exact_gradients(run: _Run, masked_rows: str, digits: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Return, for every tensor in ``run.gradients``, the exact gradient in PyTorch's layout as
    (nearest float64 values, values correctly rounded to the run's dtype)."""
    call = problems_from_call(run.fn, *run.tensors, *run.args, masked_rows=masked_rows, **run.kwargs)
    upstream = _numpy(run.upstream)
    exact = _mha_exact(run.fn, call, upstream) if call.kind == MHA else _sdpa_exact(run, call, upstream)
    arrays = {}
    for name, matrices in exact.items():
        shape = run.gradients[name].shape
        if isinstance(matrices, list):
            stacked = [np.array(arrays) for arrays in zip(*(_rounded(m, run.dtype, digits) for m in matrices))]
            arrays[name] = tuple(_input_layout(call, values, shape) for values in stacked)
        else:
            arrays[name] = tuple(values.reshape(shape) for values in _rounded(matrices, run.dtype, digits))
    return arrays


def _mha_exact(module: torch.nn.MultiheadAttention, call, upstream: np.ndarray) -> dict:
    """Return exact input gradients (one matrix per batch element) and parameter gradients
    (summed over the batch, transposed to PyTorch's layout)."""
    if module.bias_k is not None or module.add_zero_attn:
        raise UnsupportedError(
            "gradients with bias_k, bias_v or add_zero_attn are not compared yet; build the module "
            "without add_bias_kv and add_zero_attn"
        )
    grads = []
    for problem, G in zip(call.problems, _mha_batches(call, upstream)):
        grads.append(backward(problem.to_derivation(), {"output": _exact_matrix(G)}))

    def total(name: str) -> sp.Matrix:
        return sp.Matrix(sum((g[name] for g in grads), sp.zeros(*grads[0][name].shape)))

    exact: dict[str, Any] = {
        "grad query": [g["query_source"] for g in grads],
        "grad key": [g["key_source"] for g in grads],
        "grad value": [g["value_source"] for g in grads],
        "grad out_proj.weight": total("W_O").T,
    }
    if module._qkv_same_embed_dim:
        exact["grad in_proj_weight"] = sp.Matrix.vstack(total("W_Q").T, total("W_K").T, total("W_V").T)
    else:
        for name, weight in (("q", "W_Q"), ("k", "W_K"), ("v", "W_V")):
            exact[f"grad {name}_proj_weight"] = total(weight).T
    if module.in_proj_bias is not None:
        exact["grad in_proj_bias"] = sp.Matrix.hstack(total("b_Q"), total("b_K"), total("b_V"))
    if module.out_proj.bias is not None:
        exact["grad out_proj.bias"] = total("b_O")
    return exact


def _mha_batches(call, array: np.ndarray) -> np.ndarray:
    """Return an output-shaped array of nn.MultiheadAttention as (batch, L, E)."""
    if not call.batch_shape:
        return array[None]
    return array if call.batch_first else array.transpose(1, 0, 2)


def _sdpa_exact(run: _Run, call, upstream: np.ndarray) -> dict:
    if run.kwargs.get("enable_gqa"):
        raise UnsupportedError(
            "gradients with enable_gqa are not compared yet; repeat the key and value heads "
            "yourself (torch.repeat_interleave on dimension -3)"
        )
    heads = call.problems[0].heads
    # The output (..., h, L, E_v) becomes one (L, h·E_v) matrix per problem, heads side by side.
    per_problem = upstream.reshape((len(call.problems), heads) + upstream.shape[-2:])
    exact: dict[str, list] = {"grad query": [], "grad key": [], "grad value": []}
    for problem, G in zip(call.problems, per_problem):
        grads = backward(problem.to_derivation(), {"output": _exact_matrix(np.concatenate(list(G), axis=1))})
        for name, stage in (("grad query", "Q"), ("grad key", "K"), ("grad value", "V")):
            exact[name].append(grads[stage])
    return exact


def _input_layout(call, stacked: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Arrange per-problem input gradients, shaped (problems, n, width), as the tensor's shape."""
    if call.kind == MHA:
        if not call.batch_shape:
            return stacked[0]
        return stacked if call.batch_first else stacked.transpose(1, 0, 2)
    # scaled_dot_product_attention: (problems, n, h·E) -> (..., h, n, E).
    problems, n, width = stacked.shape
    heads = call.problems[0].heads
    per_head = stacked.reshape(problems, n, heads, width // heads).transpose(0, 2, 1, 3)
    return per_head.reshape(shape)


def _axes(fn: Any, ndim: int, name: str, kwargs: dict) -> tuple[str, ...]:
    """Name the axes of a gradient for the report's entry locations."""
    if name not in ("grad query", "grad key", "grad value"):
        return {1: ("entry",), 2: ("row", "column")}.get(ndim, tuple(f"axis {i}" for i in range(ndim)))
    if isinstance(fn, torch.nn.MultiheadAttention):
        if ndim == 2:
            return ("position", "feature")
        return ("batch", "position", "feature") if fn.batch_first else ("position", "batch", "feature")
    leading = ("batch",) * (ndim - 3) + ("head",) if ndim >= 3 else ()
    return leading + ("position", "feature")


def _zero_note(name: str, actual: np.ndarray, nearest: np.ndarray) -> str | None:
    """Explain ULP errors measured against an exact zero, which count from the smallest subnormal."""
    zero = (nearest == 0) & (actual != 0) & np.isfinite(actual)
    if not np.any(zero):
        return None
    return (
        f"{name}: {int(np.count_nonzero(zero))} entries have an exact gradient of 0 but a nonzero "
        f"computed one (at most {float(np.max(np.abs(actual[zero]))):.3g} in magnitude); their ULP "
        f"errors count from the smallest subnormal, so judge them by the absolute error"
    )


def _rounded(matrix: sp.MatrixBase, dtype: str, digits: int) -> tuple[np.ndarray, np.ndarray]:
    """Return the matrix's entries as nearest float64 values and correctly rounded to ``dtype``."""
    decimals = certified_decimals(sp.Matrix(matrix), digits).decimals
    values = [[Fraction(text) if text != "nan" else None for text in row] for row in decimals]
    nearest = np.array([[np.nan if v is None else round_fraction(v, "float64") for v in row] for row in values])
    rounded = np.array([[np.nan if v is None else round_fraction(v, dtype) for v in row] for row in values])
    return nearest, rounded


def _exact_matrix(array: np.ndarray) -> sp.Matrix:
    """Return a float array's entries at their exact binary values."""
    from ..values import to_matrix

    return to_matrix(np.asarray(array, dtype=np.float64), "upstream gradient")


def _cast_float(value: Any, torch_dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.detach().to(torch_dtype)
    return value


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()  # every bfloat16 value is a float32 value
    return tensor.numpy()


def _engine() -> str:
    from ..numeric import balls

    return "flint" if balls.flint is not None else "sympy"


# Second order.

@dataclass(frozen=True)
class HessianVectorCheck:
    """Autograd's double backward against the exact Hessian-vector product of one weight."""

    weight: str
    comparison: StageComparison
    exact: list[list[str]]

    @property
    def passed(self) -> bool:
        return self.comparison.passed


def compare_hessian_vector_product(
    module: torch.nn.MultiheadAttention,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    weight: str,
    direction: Any,
    upstream: Any = None,
    digits: int = DEFAULT_DIGITS,
    tolerance: Tolerance | None = None,
    masked_rows: str = "error",
    **kwargs: Any,
) -> HessianVectorCheck:
    """Compare H v for one weight of an nn.MultiheadAttention, in float64, with the exact H v.

    ``weight`` is "W_Q", "W_K", "W_V" or "W_O" in symattn's layout (in, out), and ``direction``
    v has that shape. Autograd computes ∂/∂W ⟨∂L/∂W, v⟩ by double backward
    (``torch.autograd.grad`` with ``create_graph=True``), L = ⟨G, output⟩.
    """
    if weight not in ("W_Q", "W_K", "W_V", "W_O"):
        raise InvalidInputError(f"weight is {weight!r}; expected 'W_Q', 'W_K', 'W_V' or 'W_O'")
    module = copy.deepcopy(module).to(torch.float64)
    tensors = tuple(t.detach().to(torch.float64) for t in (query, key, value))
    kwargs = {name: _cast_float(a, torch.float64) for name, a in kwargs.items()}
    parameter, rows = _weight_parameter(module, weight)
    v = torch.as_tensor(np.asarray(direction, dtype=np.float64))
    packed_direction = torch.zeros_like(parameter)
    packed_direction[rows] = v.T  # PyTorch stores Wᵀ

    result = module(*tensors, **kwargs)
    output = result[0] if isinstance(result, tuple) else result
    G = torch.ones_like(output) if upstream is None else torch.as_tensor(upstream).to(torch.float64)
    (gradient,) = torch.autograd.grad((output * G).sum(), parameter, create_graph=True)
    # The output is linear in W_O, so its gradient may not depend on W_O at all: H v is then 0.
    (hvp,) = torch.autograd.grad((gradient * packed_direction).sum(), parameter, allow_unused=True)
    actual = np.zeros(tuple(v.shape)) if hvp is None else _numpy(hvp[rows]).T

    call = problems_from_call(module, *tensors, masked_rows=masked_rows, **kwargs)
    exact = sp.zeros(*actual.shape)
    for problem, G_b in zip(call.problems, _mha_batches(call, _numpy(G))):
        derivation = problem.to_derivation()
        exact += hessian_vector_product(derivation, _exact_matrix(G_b), weight, _exact_matrix(np.asarray(direction)))
    nearest, rounded = _rounded(exact, "float64", digits)
    comparison = compare_stage(actual, nearest, dtype="float64", rounded=rounded, tolerance=tolerance,
                               name=f"Hessian-vector product of {weight}")
    return HessianVectorCheck(weight, comparison, certified_decimals(exact, digits).decimals)


def _weight_parameter(module: torch.nn.MultiheadAttention, weight: str) -> tuple[torch.Tensor, slice]:
    """Return the PyTorch parameter that stores ``weight`` (transposed) and its rows there."""
    E = module.embed_dim
    if weight == "W_O":
        return module.out_proj.weight, slice(None)
    index = ("W_Q", "W_K", "W_V").index(weight)
    if module._qkv_same_embed_dim:
        return module.in_proj_weight, slice(index * E, (index + 1) * E)
    return getattr(module, f"{'qkv'[index]}_proj_weight"), slice(None)
