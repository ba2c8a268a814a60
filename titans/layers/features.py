"""Feature maps of the memory's keys and queries (ATLAS section 3.1).

``PolynomialFeatures(dim, degree)``: ``phi(x) = [a_0, a_1 x, a_2 x^(2), ..., a_p x^(p)]`` where
``x^(i)`` lists every monomial of total degree ``i`` once (``x_1 x_2`` but not also ``x_2 x_1``), and
``a_i`` is one learnable coefficient per degree, initialised at ``1 / i!`` so that ``phi`` starts as
the Taylor terms of ``exp`` (the sources' choice). The memory then stores ``phi(k) -> v``: a matrix
memory's capacity grows from ``D`` to ``C(D + p, p)`` independent keys.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor, nn

__all__ = ["PolynomialFeatures", "polynomial_feature_dim"]


def polynomial_feature_dim(dim: int, degree: int) -> int:
    """``C(dim + degree, degree)``: the monomials of total degree <= ``degree`` in ``dim`` variables."""
    return math.comb(dim + degree, degree)


class PolynomialFeatures(nn.Module):
    """``[..., dim]`` -> ``[..., polynomial_feature_dim(dim, degree)]`` (see the module docstring)."""

    def __init__(self, dim: int, degree: int) -> None:
        super().__init__()
        if isinstance(degree, bool) or not isinstance(degree, int) or degree < 1:
            raise ValueError(f"degree must be an integer >= 1, got {degree!r}")
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.dim, self.degree = dim, degree
        self.out_dim = polynomial_feature_dim(dim, degree)
        self.coefficients = nn.Parameter(torch.empty(degree + 1))
        # the variables of each monomial of degree i, in ascending order: built here, not stored
        # (a model built on the meta device and loaded from weights has them too), one copy per device
        self._combos = {i: list(itertools.combinations_with_replacement(range(dim), i)) for i in range(2, degree + 1)}
        self._on: dict[tuple[torch.device, int], Tensor] = {}
        self.reset_parameters()

    def index(self, degree: int, device: torch.device) -> Tensor:
        """``[M, degree]``: the variables of each monomial of ``degree``, on ``device``."""
        key = (device, degree)
        if key not in self._on:  # built where it is used (never on the meta device a model may be built on)
            self._on[key] = torch.tensor(self._combos[degree], dtype=torch.long, device=device)
        return self._on[key]

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.coefficients.copy_(torch.tensor([1 / math.factorial(i) for i in range(self.degree + 1)]))

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.dim:
            raise ValueError(f"PolynomialFeatures expects [..., {self.dim}], got shape {tuple(x.shape)}")
        a = self.coefficients.to(x.dtype)
        parts = [a[0] * torch.ones_like(x[..., :1]), a[1] * x]
        for i in range(2, self.degree + 1):
            index = self.index(i, x.device)  # (M_i, i)
            parts.append(a[i] * x[..., index].prod(-1))  # (..., M_i)
        return torch.cat(parts, dim=-1)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, degree={self.degree}, out_dim={self.out_dim}"
