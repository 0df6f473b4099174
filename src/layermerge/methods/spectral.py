"""Linear algebra shared by the SVD-based merges (TSV-M in ``tsv``, ISO-C and ISO-CTS in ``iso``).

All three work on one weight matrix at a time and only ever return products U·Σ·Vᵀ, which do not
depend on the signs (or, within a repeated singular value, the basis) an SVD routine happens to
pick. Two choices keep them deterministic where the released code is not:

* SVDs run in float64. The inputs are float32 weights, but the orthogonalisation and the flat
  spectra amplify rounding differently on different BLAS builds; float64 keeps results within 1e-6
  of an independent reference.
* Components the float32 inputs cannot tell from zero are dropped (``numerical_rank``). Their
  singular vectors are arbitrary — any orthonormal completion is an equally valid SVD — so keeping
  them, as the released code does, adds directions that depend on the LAPACK build. For the
  full-rank matrices of a full fine-tune nothing is dropped and the results are the same.
"""

from __future__ import annotations

import torch

FLOAT32_EPS = torch.finfo(torch.float32).eps


def matrix_view(tensor: torch.Tensor) -> torch.Tensor | None:
    """The tensor as the matrix of its linear map, or None: a non-empty 2-D tensor as it is, and a 1×1
    convolution's (out, in, 1, 1) weight as (out, in) — the same map applied at every pixel, as
    RegMean treats it — so CNNs such as EfficientNet are merged spectrally too (the papers' ViTs have
    no such layers). Everything else (biases, norms, spatial kernels, scalars) is not a matrix."""
    if tensor.numel() == 0:
        return None
    if tensor.dim() == 2:
        return tensor
    if tensor.dim() == 4 and tuple(tensor.shape[2:]) == (1, 1):
        return tensor.reshape(tensor.shape[0], tensor.shape[1])
    return None


def is_matrix(tensor: torch.Tensor) -> bool:
    """The tensors merged spectrally (see ``matrix_view``). Everything else takes the mean task
    vector, as in both papers' code."""
    return matrix_view(tensor) is not None


def thin_svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U, S, Vᵀ of the reduced SVD in float64 (S descending)."""
    return torch.linalg.svd(matrix.to(torch.float64), full_matrices=False)


def numerical_rank(singular_values: torch.Tensor, scale: float, shape: tuple[int, ...]) -> int:
    """How many of the (descending) singular values exceed ``scale · max(shape) · ε_float32``.

    NumPy's ``matrix_rank`` rule, at the precision of the float32 checkpoints: a component below it
    is rounding noise, and its singular vectors are not determined by the data. ``scale`` is the
    largest singular value of the matrix (or of the family of matrices) being decomposed.
    """
    tolerance = scale * max(shape) * FLOAT32_EPS
    if tolerance <= 0:
        return 0
    return int((singular_values > tolerance).sum())


def polar_factor(matrix: torch.Tensor) -> torch.Tensor:
    """The orthogonal matrix closest to ``matrix`` in Frobenius norm: P·Qᵀ from its SVD P·S·Qᵀ.

    TSV-M and ISO-CTS use it to decorrelate singular vectors gathered from several tasks. When the
    gathered vectors are linearly dependent (two experts sharing a direction) only the components
    of numerically nonzero S are used — the partial isometry with the same range, the polar factor
    that is unique — so identical experts do not bring in arbitrary directions.
    """
    left, values, right = thin_svd(matrix)
    rank = numerical_rank(values, float(values[0]) if values.numel() else 0.0, tuple(matrix.shape))
    return left[:, :rank] @ right[:rank]


def mean_task_vector(base: torch.Tensor, experts: list[torch.Tensor]) -> torch.Tensor:
    """(1/T) Σ_i τ_i, in float32: what TSV-M, ISO-C and ISO-CTS use for every non-matrix tensor."""
    total = experts[0] - base
    for expert in experts[1:]:
        total += expert - base
    return total.div_(len(experts))


def summed_task_vector(base: torch.Tensor, experts: list[torch.Tensor]) -> torch.Tensor:
    """M = Σ_i τ_i in float64 (the Task Arithmetic matrix ISO-C and ISO-CTS decompose)."""
    base64 = base.to(torch.float64)
    total = torch.zeros_like(base64)
    for expert in experts:
        total += expert.to(torch.float64) - base64
    return total


def add_scaled(base: torch.Tensor, merged: torch.Tensor, scaling: float) -> torch.Tensor:
    """θ0 + α·merged, summed in float64 and returned as float32."""
    return (base.to(torch.float64) + scaling * merged.to(torch.float64)).to(torch.float32)
