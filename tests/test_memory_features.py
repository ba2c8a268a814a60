"""ATLAS's polynomial feature map of the keys (section 3.1): the map itself against monomials
written out, the memory ops with keys wider than values (every path equal in float64, every
gradient), and the layer storing phi(k) -> v."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from titans.layers.features import PolynomialFeatures, polynomial_feature_dim
from titans.layers.neural_memory import NeuralMemory
from titans.model import TitansConfig
from titans.ops.memory import chunk_memory, memory_shapes, naive_memory, step_memory

F64 = torch.float64


def test_the_map_lists_every_monomial_once_with_its_degrees_coefficient():
    f = PolynomialFeatures(3, 3).double()
    assert f.out_dim == polynomial_feature_dim(3, 3) == math.comb(6, 3) == 20
    torch.testing.assert_close(f.coefficients, torch.tensor([1, 1, 1 / 2, 1 / 6], dtype=F64))
    x = torch.randn(5, 3, dtype=F64)
    expected = []
    for row in x:
        feats = []
        for degree in range(4):
            for combo in itertools.combinations_with_replacement(range(3), degree):
                feats.append(float(f.coefficients[degree].detach()) * math.prod(float(row[i]) for i in combo))
        expected.append(torch.tensor(feats, dtype=F64))
    torch.testing.assert_close(f(x), torch.stack(expected))
    torch.autograd.gradcheck(lambda t: f(t), (torch.randn(2, 3, dtype=F64, requires_grad=True),))
    for bad in (0, True, 1.5):
        with pytest.raises(ValueError, match="degree must be an integer"):
            PolynomialFeatures(3, bad)


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_ops_with_keys_wider_than_values_agree_on_every_path(depth):
    g = torch.Generator().manual_seed(depth)
    B, T, H, Dk, Dv = 2, 11, 2, 10, 4
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    uni = lambda *s: torch.rand(*s, generator=g, dtype=F64)  # noqa: E731
    kw = dict(q=rnd(B, T, H, Dk), k=rnd(B, T, H, Dk), v=rnd(B, T, H, Dv), theta=uni(B, T, H) * 0.1,
              eta=uni(B, T, H), alpha=uni(B, T, H) * 0.1)  # fmt: skip
    kw["weights"] = [rnd(H, o, i) * 0.3 for o, i in memory_shapes(Dv, depth, 2.0, key_dim=Dk)]
    leaves = [kw[n].requires_grad_() for n in ("q", "k", "v", "theta")] + [w.requires_grad_() for w in kw["weights"]]
    yn, _ = naive_memory(**kw, chunk_size=4, max_grad_norm=0.5)
    yc, _ = chunk_memory(**kw, chunk_size=4, max_grad_norm=0.5)
    assert yn.shape == (B, T, H, Dv)
    torch.testing.assert_close(yc, yn, rtol=1e-10, atol=1e-12)
    for a, b in zip(torch.autograd.grad((yc**2).sum(), leaves), torch.autograd.grad((yn**2).sum(), leaves)):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    ys, state = [], None
    for t in range(T):
        part = {n: kw[n][:, t : t + 1].detach() for n in ("q", "k", "v", "theta", "eta", "alpha")}
        start = {"weights": [w.detach() for w in kw["weights"]]} if state is None else {"state": state}
        y, state = step_memory(**part, **start, chunk_size=4, max_grad_norm=0.5)
        ys.append(y)
    torch.testing.assert_close(torch.cat(ys, 1), yn.detach(), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="residual=True adds the key"):
        chunk_memory(**kw, chunk_size=4, residual=True)


def test_the_layer_stores_features_of_its_keys_and_streams():
    torch.manual_seed(0)
    layer = NeuralMemory(16, heads=2, depth=2, chunk_size=4, feature_degree=2).double()
    assert layer.initial_weights[0].shape == (2, 32, polynomial_feature_dim(8, 2))  # [H, hidden, C(8 + 2, 2)]
    x = torch.randn(2, 9, 16, dtype=F64)
    y, state = layer(x)
    y1, s1 = layer(x[:, :4])
    y2, _ = layer(x[:, 4:], s1)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y)
    read, _ = layer.retrieve(x, state.memory.weights)
    assert read.shape == y.shape
    with pytest.raises(ValueError, match="feature_degree and residual"):
        NeuralMemory(16, heads=2, feature_degree=2, residual=True)
    for bad in (0, True, 2.0):
        with pytest.raises(ValueError, match="memory_feature_degree must be None or an integer"):
            TitansConfig(variant="lmm", memory_feature_degree=bad)
