"""Attentional biases: the per-token loss whose gradient is the memory's surprise.

A memory rule writes token t by a gradient step on ``loss(e_t)``, where ``e_t = M(k_t) - v_t`` is
the memory's error on that token (``[..., D]``, one per head). Whatever the loss, the gradient with
respect to the weights keeps the outer-product form of the paper's rule: the error signal
``g(e) = d loss / d M(k)`` back-propagated through the memory MLP, outer each layer's input. So an
objective is three functions of the error (and of its per-token parameter, if any):

- ``loss(e, delta)``: the definition, summed over the last dim; the token loop (``naive``)
  differentiates it with autograd, independently of the two below;
- ``grad(e, delta)``: the error signal g(e), which the chunk and step paths use in place of 2e;
- ``grad_backward(e, delta, gg)``: the vector-Jacobian product of g, ``(gg . dg/de, gg . dg/d delta)``,
  which the chunk path's analytic backward needs (the only second derivative a rule contributes).

The objectives (``OBJECTIVES``):

- ``"l2"``: ``||e||_2^2``, g = 2e (Titans, eq. 12: the paper's associative memory loss).
- ``"lp"``: ``||e||_p^p = sum_j |e_j|^p``, g = p sign(e) |e|^(p-1) (MIRAS, eq. 10-11: Moneta's
  attentional bias; the paper's default p = 3). p >= 2 only: for p < 2 the derivative of g is
  unbounded at e = 0 and the papers smooth sign and |.| with constants they do not fix.
- ``"huber"``: MIRAS eq. 16, the norm-gated mixture Yaad uses: ``||e||^2 / 2`` while
  ``||e||_2 <= delta``, else ``delta ||e||_1``, so g = e inside and ``delta sign(e)`` outside;
  ``delta`` is a per-token, per-head threshold (data-dependent in Yaad). g jumps at the boundary
  (as in the paper); its derivative is taken piecewise (1 inside, 0 outside; ``dg/d delta`` =
  sign(e) outside).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["OBJECTIVES", "Objective", "as_objective"]

OBJECTIVES = ("l2", "lp", "huber")


@dataclass(frozen=True)
class Objective:
    """An attentional bias (see the module docstring). ``p``: the exponent of ``"lp"``."""

    name: str = "l2"
    p: float = 3.0

    def __post_init__(self):
        if self.name not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.name!r}")
        if self.name == "lp" and not (isinstance(self.p, (int, float)) and self.p >= 2 and self.p == self.p):
            raise ValueError(f"the lp objective needs p >= 2 (its error signal's derivative is unbounded at 0 "
                             f"for p < 2), got p={self.p!r}")  # fmt: skip

    @property
    def needs_delta(self) -> bool:
        """Whether the objective takes a per-token threshold ``delta`` ``[..., n]``."""
        return self.name == "huber"

    def loss(self, e: Tensor, delta: Tensor | None = None) -> Tensor:
        """The per-token loss ``[...]`` of the error ``e`` ``[..., D]`` (the definition)."""
        if self.name == "l2":
            return e.square().sum(-1)
        if self.name == "lp":
            return e.abs().pow(self.p).sum(-1)
        inside = e.square().sum(-1) <= delta.square()
        return torch.where(inside, 0.5 * e.square().sum(-1), delta * e.abs().sum(-1))

    def grad(self, e: Tensor, delta: Tensor | None = None) -> Tensor:
        """The error signal ``g(e) = d loss / d M(k)`` ``[..., D]``."""
        if self.name == "l2":
            return 2 * e
        if self.name == "lp":
            return self.p * e * e.abs().pow(self.p - 2)
        inside = (e.square().sum(-1) <= delta.square()).unsqueeze(-1)
        return torch.where(inside, e, delta.unsqueeze(-1) * torch.sign(e))

    def grad_backward(self, e: Tensor, delta: Tensor | None, gg: Tensor) -> tuple[Tensor, Tensor | None]:
        """Given ``gg`` = d L / d g(e) ``[..., D]``: ``(d L / d e [..., D], d L / d delta [...] or None)``."""
        if self.name == "l2":
            return 2 * gg, None
        if self.name == "lp":
            return gg * (self.p * (self.p - 1)) * e.abs().pow(self.p - 2), None
        inside = e.square().sum(-1) <= delta.square()
        ge = torch.where(inside.unsqueeze(-1), gg, torch.zeros_like(gg))
        gdelta = torch.where(inside, torch.zeros_like(delta), (gg * torch.sign(e)).sum(-1))
        return ge, gdelta


L2 = Objective("l2")


def as_objective(objective: "Objective | str | None") -> Objective:
    """An ``Objective`` from itself, its name (with the default p) or None (the paper's l2)."""
    if objective is None:
        return L2
    if isinstance(objective, Objective):
        return objective
    if isinstance(objective, str):
        return Objective(objective)
    raise TypeError(f"objective must be an Objective or one of {OBJECTIVES}, got {type(objective).__name__}")
