"""Nadaraya–Watson kernel regression (Nadaraya 1964, Watson 1964), chapter 0.

Attention before neural networks. To predict ``y`` at a new input ``x``, average the
observed ``y_i``, each weighted by how close ``x`` is to its ``x_i``:

    f(x) = Σ_i K(‖x - x_i‖ / σ) y_i  /  Σ_j K(‖x - x_j‖ / σ)

with a kernel ``K`` and a bandwidth ``σ``. In the words of attention: the new input
is a *query*, the ``x_i`` are *keys*, the ``y_i`` are *values*, and the weights are
a softmax of fixed scores, ``α_i(x) = softmax_i(log K(‖x - x_i‖ / σ))``. For the
Gaussian kernel ``K(u) = exp(-u²/2)`` the score is ``-‖x - x_i‖² / (2σ²)``.

Computed as a softmax (shifted by the row's maximum), the weights stay finite for
every bandwidth: σ → 0 gives the nearest neighbour (the fit interpolates the data),
σ → ∞ gives equal weights (the fit is the mean of the ``y_i``). Kernels with a
finite support (``"boxcar"``, ``"epanechnikov"``) give the score ``-inf`` to points
farther than σ; a query with no point within reach, like a query whose keys are all
masked, gets weights 0 and the prediction 0, not NaN.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import torch

from ._checks import _check_mask_tensor, _shape
from .softmax import softmax

__all__ = ["KERNELS", "kernel_scores", "nadaraya_watson", "nadaraya_watson_weights"]


def _gaussian(u: torch.Tensor) -> torch.Tensor:
    return -0.5 * u * u  # log exp(-u²/2)


def _boxcar(u: torch.Tensor) -> torch.Tensor:
    return torch.where(u <= 1, torch.zeros_like(u), torch.full_like(u, -math.inf))  # log 1[u <= 1]


def _epanechnikov(u: torch.Tensor) -> torch.Tensor:
    inside = u < 1
    return torch.where(inside, torch.log1p(-(u * u).clamp(max=1)), torch.full_like(u, -math.inf))  # log (1 - u²)₊


# name -> log K(u) for u = distance / bandwidth >= 0 (constant factors of K cancel).
KERNELS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gaussian": _gaussian,
    "boxcar": _boxcar,
    "epanechnikov": _epanechnikov,
}


def _check_points(x_query, x_keys) -> None:
    for name, t in (("x_query", x_query), ("x_keys", x_keys)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() not in (1, 2):
            raise ValueError(
                f"{name} must be (L,) or (L, d) for scalar or d-dimensional inputs; got shape {_shape(t)}"
            )
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if x_query.dim() != x_keys.dim() or x_query.shape[1:] != x_keys.shape[1:]:
        raise ValueError(
            f"x_query and x_keys must both be scalar inputs (L,), (S,) or both (·, d) with the same d; "
            f"got x_query {_shape(x_query)}, x_keys {_shape(x_keys)}"
        )
    if x_query.dtype != x_keys.dtype or x_query.device != x_keys.device:
        raise ValueError(
            f"x_query and x_keys must share dtype and device; got {x_query.dtype} on {x_query.device} "
            f"and {x_keys.dtype} on {x_keys.device}"
        )


def _check_bandwidth(bandwidth, like: torch.Tensor) -> torch.Tensor | float:
    if isinstance(bandwidth, torch.Tensor):
        if bandwidth.dim() != 0 or not bandwidth.is_floating_point():
            raise ValueError(
                f"bandwidth must be a positive number or a 0-d floating-point tensor; got a tensor of shape "
                f"{_shape(bandwidth)} and dtype {bandwidth.dtype}"
            )
        if not (torch.isfinite(bandwidth) and bandwidth > 0):
            raise ValueError(f"bandwidth must be positive and finite, got {bandwidth.item()!r}")
        return bandwidth.to(like.dtype)
    if isinstance(bandwidth, bool) or not isinstance(bandwidth, numbers.Real):
        raise ValueError(f"bandwidth must be a positive number or a 0-d tensor, got {type(bandwidth).__name__}")
    bw = float(bandwidth)  # numbers.Real promises __float__, not comparisons with int
    if not (math.isfinite(bw) and bw > 0):
        raise ValueError(f"bandwidth must be positive and finite, got {bandwidth!r}")
    return bw


def kernel_scores(
    x_query: torch.Tensor,
    x_keys: torch.Tensor,
    bandwidth: float | torch.Tensor,
    *,
    kernel: str = "gaussian",
) -> torch.Tensor:
    """The scores ``log K(‖x_query_i - x_keys_j‖ / bandwidth)``: (L, S).

    Args:
        x_query: (L,) scalar inputs or (L, d).
        x_keys: (S,) or (S, d), the observed inputs.
        bandwidth: σ > 0, a number or a 0-d tensor (differentiable: it can be learned).
        kernel: a name in :data:`KERNELS`.

    Returns:
        (L, S) scores in the inputs' dtype; ``-inf`` where a finite-support kernel is 0.
    """
    _check_points(x_query, x_keys)
    sigma = _check_bandwidth(bandwidth, x_query)
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {sorted(KERNELS)}, got {kernel!r}")
    q = x_query if x_query.dim() == 2 else x_query.unsqueeze(-1)  # (L, d)
    k = x_keys if x_keys.dim() == 2 else x_keys.unsqueeze(-1)  # (S, d)
    diff = q.unsqueeze(1) - k.unsqueeze(0)  # (L, S, d)
    dist = diff.square().sum(-1)  # (L, S): squared distances, kept squared for the Gaussian
    if kernel == "gaussian":
        return dist / (-2 * sigma**2)  # -‖x - x_i‖² / (2σ²), no sqrt (its gradient at 0 is inf)
    return KERNELS[kernel](dist.sqrt() / sigma)


def nadaraya_watson_weights(
    x_query: torch.Tensor,
    x_keys: torch.Tensor,
    bandwidth: float | torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    *,
    kernel: str = "gaussian",
) -> torch.Tensor:
    """The weights ``α_ij = softmax_j(log K(‖x_i - x_j‖ / σ) + mask)``: (L, S).

    Args:
        x_query: (L,) or (L, d).
        x_keys: (S,) or (S, d).
        bandwidth: σ > 0, a number or a 0-d tensor.
        attn_mask: broadcastable to (L, S); bool (True = may use key ``j``) or an
            additive float mask. Leave-one-out is ``attn_mask=~torch.eye(S, dtype=torch.bool)``.
        kernel: a name in :data:`KERNELS`.

    Returns:
        (L, S); each row sums to 1, or is all 0 if no key is within reach.
    """
    scores = kernel_scores(x_query, x_keys, bandwidth, kernel=kernel)  # (L, S)
    if attn_mask is not None:
        _check_mask_tensor(attn_mask, scores, tuple(scores.shape))
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, -math.inf)
        else:
            scores = scores + attn_mask.to(scores.dtype)
    if scores.shape[-1] == 0:  # no observations at all: no key is within reach of any query
        return scores.new_zeros(scores.shape)
    return softmax(scores, dim=-1)


def nadaraya_watson(
    x_query: torch.Tensor,
    x_keys: torch.Tensor,
    y_values: torch.Tensor,
    bandwidth: float | torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    *,
    kernel: str = "gaussian",
) -> torch.Tensor:
    """Nadaraya–Watson regression: ``f(x_i) = Σ_j α_ij y_j`` with kernel weights.

    Args:
        x_query: (L,) scalar inputs or (L, d): where to predict.
        x_keys: (S,) or (S, d): the observed inputs.
        y_values: (S,) or (S, Dv): the observed outputs.
        bandwidth: σ > 0, a number or a 0-d tensor (differentiable).
        attn_mask: broadcastable to (L, S), bool (True = may use) or additive float.
        kernel: ``"gaussian"`` (default), ``"boxcar"`` or ``"epanechnikov"``.

    Returns:
        (L,) if ``y_values`` is (S,), else (L, Dv); 0 where no key is within reach.

    Raises:
        ValueError: naming the argument and the shapes seen.
    """
    _check_points(x_query, x_keys)
    if not isinstance(y_values, torch.Tensor):
        raise ValueError(f"y_values must be a torch.Tensor, got {type(y_values).__name__}")
    if (y_values.dim() not in (1, 2) or y_values.shape[0] != x_keys.shape[0]):
        raise ValueError(
            f"y_values must be (S,) or (S, Dv) with one value per key; got y_values {_shape(y_values)}, "
            f"x_keys {_shape(x_keys)}"
        )
    if y_values.dtype != x_query.dtype:
        raise ValueError(f"y_values must have the inputs' dtype {x_query.dtype}, got {y_values.dtype}")
    weights = nadaraya_watson_weights(x_query, x_keys, bandwidth, attn_mask, kernel=kernel)  # (L, S)
    return weights @ y_values  # (L,) or (L, Dv)
