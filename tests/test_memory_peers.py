"""Peer checks against rules nobody here wrote (docs/design.md §1).

With depth 1, no momentum, no forgetting and chunk size 1 our rule is exactly the delta rule
with write strength beta = 2 theta: compared with flash-linear-attention's pure-PyTorch
reference. With forgetting it is a gated delta rule whose decay acts after the delta step.
"""

from __future__ import annotations

import pytest
import torch
from _helpers import make_inputs, rel_rms

from titans.ops.memory import chunk_memory, naive_memory

_FLA_MISSING = ""
try:  # the test extra installs it; its modules import on CPU once triton is installed
    from fla.ops.delta_rule.naive import delta_rule_recurrence
except Exception as exc:  # pragma: no cover - exercised only without the test extra
    delta_rule_recurrence = None
    _FLA_MISSING = f"flash-linear-attention cannot be imported ({exc!r}): pip install -e '.[test]'"


@pytest.mark.skipif(delta_rule_recurrence is None, reason=_FLA_MISSING)
@pytest.mark.parametrize("path", [chunk_memory, naive_memory])
def test_linear_memory_is_fla_delta_rule(path):
    B, T, H, D = 2, 50, 3, 16
    kw, _ = make_inputs(B=B, T=T, H=H, D=D, depth=1, momentum=False, forgetting=False, dtype=torch.float32, seed=21)
    with torch.no_grad():
        y, s = path(**kw, chunk_size=1)
        # fla is head-first [B, H, T, D], scales q by D**-0.5 and stores S = M^T ([d_k, d_v]).
        hf = lambda x: x.transpose(1, 2).contiguous()  # noqa: E731
        M0 = kw["weights"][0]  # (H, D_out, D_in)
        o, S = delta_rule_recurrence(
            hf(kw["q"]), hf(kw["k"]), hf(kw["v"]), hf(2 * kw["theta"]),
            initial_state=M0.transpose(-1, -2).unsqueeze(0).expand(B, -1, -1, -1).clone(),
            output_final_state=True,
        )  # fmt: skip
    assert rel_rms(y * D**-0.5, o.transpose(1, 2)) < 1e-5
    assert rel_rms(s.weights[0], S.transpose(-1, -2)) < 1e-5


def test_linear_memory_with_forgetting_is_after_step_gated_delta_rule():
    """M_t = (1 - alpha_t) (M_{t-1} + beta'_t (v_t - M_{t-1} k_t) k_t^T), beta' = 2 theta / (1 - alpha)."""
    kw, _ = make_inputs(B=2, T=40, H=2, D=8, depth=1, momentum=False, forgetting=True, seed=22)
    with torch.no_grad():
        y, s = chunk_memory(**kw, chunk_size=1)
    q, k, v, theta, alpha = (kw[n] for n in ("q", "k", "v", "theta", "alpha"))
    M = kw["weights"][0].unsqueeze(0).expand(2, -1, -1, -1).clone()  # (B, H, D, D)
    ys = []
    for t in range(40):
        a = (1 - alpha[:, t])[..., None, None]
        beta = (2 * theta[:, t] / (1 - alpha[:, t]))[..., None, None]
        err = v[:, t] - torch.einsum("bhij,bhj->bhi", M, k[:, t])
        M = a * (M + beta * err[..., :, None] * k[:, t][..., None, :])
        ys.append(torch.einsum("bhij,bhj->bhi", M, q[:, t]))
    assert rel_rms(y, torch.stack(ys, 1)) < 1e-12
    assert rel_rms(s.weights[0], M) < 1e-12


def test_gated_delta_rule_ordering_differs():
    """Gated DeltaNet decays before the delta step; the two orderings are different rules
    (the paper's Appendix C equivalence holds only up to that ordering)."""
    kw, _ = make_inputs(B=1, T=30, H=1, D=8, depth=1, momentum=False, forgetting=True, seed=23)
    with torch.no_grad():
        y, _ = chunk_memory(**kw, chunk_size=1)
    q, k, v, theta, alpha = (kw[n] for n in ("q", "k", "v", "theta", "alpha"))
    M = kw["weights"][0].unsqueeze(0).clone()
    ys = []
    for t in range(30):
        M = (1 - alpha[:, t])[..., None, None] * M
        err = v[:, t] - torch.einsum("bhij,bhj->bhi", M, k[:, t])
        M = M + (2 * theta[:, t])[..., None, None] * err[..., :, None] * k[:, t][..., None, :]
        ys.append(torch.einsum("bhij,bhj->bhi", M, q[:, t]))
    assert rel_rms(y, torch.stack(ys, 1)) > 1e-3
