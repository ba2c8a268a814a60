"""ATLAS's Muon inner optimiser: the memory's momentum orthogonalised by Newton-Schulz steps.

ATLAS (Behrouz et al. 2025, eqs. 32-33) replaces the Titans step ``M_t = a_t M_{t-1} + S_t`` by a
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


def newton_schulz(x: Tensor, steps: int) -> Tensor:
    """``NS_k`` of every matrix of x ``[..., out, in]`` (k = ``steps``): ``X_0 = x / (|x|_F + eps)``,
    then ``steps`` times ``X <- a X + (b A + c A^2) X`` with ``A = X X^T``.

    A matrix with more rows than columns runs transposed (``A = X^T X``, the smaller Gram matrix):
    ``(X X^T) X = X (X^T X)``, so both orders compute the same polynomial of x; only the cost
    differs, ``O(out in min(out, in))`` per step. Differentiable by autograd."""
    a, b, c = NS_COEFFICIENTS
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = x.transpose(-1, -2)
    lead = x.shape[:-2]
    X = x.reshape(-1, *x.shape[-2:])
    X = X / (torch.linalg.matrix_norm(X, keepdim=True) + NS_EPS)
    for _ in range(steps):
        A = X @ X.transpose(-1, -2)
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b A + c A^2
        X = torch.baddbmm(X, B, X, beta=a)  # a X + B X
    X = X.reshape(*lead, *X.shape[-2:])
    # contiguous: a state built from it keeps the layout of every other state (one compiled decode
    # graph for every token), and the chunk path flattens it next anyway
    return X.transpose(-1, -2).contiguous() if tall else X
