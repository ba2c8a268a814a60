"""ATLAS's Muon inner optimiser: the memory's momentum orthogonalised by Newton-Schulz steps.

ATLAS (Behrouz et al. 2025, arXiv 2505.23735, eqs. 32-33) replaces the Titans step ``M_t = a_t M_{t-1} + S_t`` by a
step along an orthogonalised momentum, each weight matrix of each memory on its own; in this
project's names (the sign of ``S`` is the Titans one: it holds the descent direction)

    S_t = eta_t S_{t-1} - G_t               G_t the token's (windowed, clipped) loss gradient
    M_t = a_t M_{t-1} + theta_t NS_k(S_t)   a_t = 1 - alpha_t, theta_t the learning rate

``NS_k`` (``newton_schulz``) is Muon's quintic iteration (Jordan et al. 2024): normalise by the
Frobenius norm, then k times ``X <- a X + (b A + c A^2) X`` with ``A = X X^T``. The learning rate
stays outside: ``NS_k(s S) = NS_k(S)`` for ``s > 0`` (up to the normalisation's eps), so a rate
inside the momentum would only weigh tokens against each other. README.md ("Muon: the ATLAS inner
optimiser") compares the sources and states the choices.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["NS_COEFFICIENTS", "NS_EPS", "check_muon_steps", "newton_schulz"]

# Muon's quintic coefficients (Jordan et al. 2024): five steps move the singular values of a
# Gaussian matrix into about [0.68, 1.14] (the cubic (3/2, -1/2) converges to exactly 1, more
# slowly); a singular value far below the largest grows by a = 3.4 per step, so a nearly
# rank-deficient momentum keeps small directions small
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_EPS = 1e-7  # X_0 = S / (|S|_F + eps): Muon's; keeps S = 0 at 0 with a finite gradient
MAX_MUON_STEPS = 64


def check_muon_steps(muon_steps, name: str = "muon_steps") -> None:
    """None (the Titans step) or k, an integer in [1, 64]: Muon with k Newton-Schulz steps."""
    if muon_steps is None:
        return
    if isinstance(muon_steps, bool) or not isinstance(muon_steps, int) or not 1 <= muon_steps <= MAX_MUON_STEPS:
        raise ValueError(f"{name} must be None or an integer in [1, {MAX_MUON_STEPS}] (Newton-Schulz steps of ATLAS's "
                         f"Muon), got {muon_steps!r}")  # fmt: skip


def newton_schulz(x: Tensor, steps: int, gram: bool | None = None) -> Tensor:
    """``NS_k`` of every matrix of x ``[..., out, in]`` (k = ``steps``): ``X_0 = x / (|x|_F + eps)``,
    then ``steps`` times ``X <- a X + (b A + c A^2) X`` with ``A = X X^T``. Differentiable by
    autograd.

    With ``s = min(out, in)`` and ``l = max(out, in)`` both forms below compute this polynomial of
    x, in the order of the smaller Gram matrix (``(X X^T) X = X (X^T X)``, so a tall matrix runs
    on ``X^T X``); they differ only in cost and rounding. ``gram=False``: the iteration as written,
    ``k (4 s^2 l + 2 s^3)`` flops. ``gram=True``: the Gram form (``_newton_schulz_gram``),
    ``4 s^2 l + (8 k - 6) s^3``: every step stays on ``s x s`` matrices, so it is the cheaper one
    once l exceeds about 1.5 s (a hidden layer ``expansion`` times its width, polynomial keys).
    None (default): whichever costs fewer flops."""
    s, l = sorted(x.shape[-2:])
    if gram is None:
        gram = 4 * s * s * l + (8 * steps - 6) * s**3 < steps * (4 * s * s * l + 2 * s**3)
    lead = x.shape[:-2]
    X = x.reshape(-1, *x.shape[-2:])
    X = X / (torch.linalg.matrix_norm(X, keepdim=True) + NS_EPS)
    X = _newton_schulz_gram(X, steps) if gram else _newton_schulz_direct(X, steps)
    return X.reshape(*lead, *X.shape[-2:])


def _newton_schulz_direct(X: Tensor, steps: int) -> Tensor:
    """The quintic iteration as Muon writes it, on normalised ``X`` ``[N, out, in]``, on the
    smaller Gram matrix (a tall X runs transposed)."""
    a, b, c = NS_COEFFICIENTS
    tall = X.shape[-2] > X.shape[-1]
    if tall:
        X = X.transpose(-1, -2)
    for _ in range(steps):
        A = X @ X.transpose(-1, -2)
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b A + c A^2
        X = torch.baddbmm(X, B, X, beta=a)  # a X + B X
    # contiguous: a state built from it keeps the layout of every other state (one compiled decode
    # graph for every token), and the chunk path flattens it next anyway
    return X.transpose(-1, -2).contiguous() if tall else X


def _newton_schulz_gram(X: Tensor, steps: int) -> Tensor:
    """The quintic iteration on normalised ``X`` ``[N, out, in]`` carried out on its ``s x s``
    Gram matrix ``A_0`` (``X X^T``, or ``X^T X`` for a tall X). Each step multiplies X from the
    left by ``Q_j = a + b A_j + c A_j^2`` with ``A_j = X_j X_j^T``; every ``Q_j`` is a polynomial in
    ``A_0``, so they commute, and

        X_k = L_k X_0,   L_k = Q_{k-1} ... Q_0,   A_{j+1} = Q_j A_j Q_j

    (``X_{j+1} X_{j+1}^T = Q_j X_j X_j^T Q_j``). Only the first Gram matrix and the last product
    touch the long side: ``4 s^2 l`` flops, and ``2 s^3`` for each of the ``4 k - 3`` products in
    between, where the iteration as written pays ``4 s^2 l`` every step."""
    a, b, c = NS_COEFFICIENTS
    tall = X.shape[-2] > X.shape[-1]
    A = X.transpose(-1, -2) @ X if tall else X @ X.transpose(-1, -2)
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    L = None
    for j in range(steps):
        Q = torch.baddbmm(A, A, A, beta=b, alpha=c) + a * eye  # a + b A + c A^2
        L = Q if L is None else Q @ L
        if j < steps - 1:
            A = (Q @ A) @ Q
    # X_k = L X_0, or for a tall X (its transpose ran) X_k = X_0 L^T
    return X @ L.transpose(-1, -2) if tall else L @ X
