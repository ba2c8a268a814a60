"""How far Memora's chunk path (the papers' chunk approximation, MIRAS eqs. 30-32) is from the exact
rule (eq. 27 token by token), the numbers quoted in titans/ops/memory/README.md ("Memora: KL
retention").

For each scale of the inner learning rate theta, one table row: how much the writes move the exact
rule's outputs at all (against the same stream with theta = 0), then for chunk sizes 1, 4, 16 and
64 the relative RMS of the chunk path's outputs and of its final weights against the exact rule's.
The last two columns are the same at chunk 64 for a variant this project does not ship: the
weights carried from chunk to chunk in W (not in log-weights), as the equations of one
transcription read literally, the next lag token taking the log of the linear end weights (floored
at the dtype's tiny where the linear steps left them <= 0).

Float64, B=2, 2 heads of 8, memory depth 2, expansion 2, 256 tokens, theta uniform in
[0, 2 scale], forget gate alpha uniform in [0, 0.01] (``tests/_helpers.py::memora_gap``).

    python benchmarks/memora_approximation.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def literal_w_carry(scale: float, chunk_size: int, T: int = 256, seed: int = 0) -> tuple[float, float]:
    """The W-space carry: relative RMS of its outputs and final weights against the exact rule."""
    from _helpers import memora_inputs, rel_rms

    from titans.ops.memory import naive_memory
    from titans.ops.memory.state import kl_simplex

    kw = memora_inputs(scale, T, seed)
    y_ref, s_ref = naive_memory(**kw, chunk_size=1, retention_kl=1.0)
    _, W = kl_simplex([w.unsqueeze(0).expand(2, *w.shape) for w in kw["weights"]], 1.0)
    tiny = torch.finfo(torch.float64).tiny

    def mlp(ws, x):
        for i, w in enumerate(ws):
            x = torch.einsum("bhoi,bhi->bho", w, x)
            x = torch.nn.functional.silu(x) if i < len(ws) - 1 else x
        return x

    ys, Wc = [], W
    for t in range(T):
        ws = [w.detach().requires_grad_(True) for w in (W if t % chunk_size == 0 else Wc)]
        grads = torch.autograd.grad((mlp(ws, kw["k"][:, t]) - kw["v"][:, t]).square().sum(), ws)
        th, keep = kw["theta"][:, t, :, None, None], 1 - kw["alpha"][:, t, :, None, None]
        if t % chunk_size == 0:  # the lag token: the log of the carried W
            W = kl_simplex([keep * w.clamp_min(tiny).log() - th * g for w, g in zip(W, grads)], 1.0)[1]
            Wc = W
        else:
            W = [keep * w - th * g for w, g in zip(W, grads)]
        ys.append(mlp(W, kw["q"][:, t]))
    W_end = kl_simplex([w.clamp_min(tiny).log() for w in W], 1.0)[1]  # where the next lag starts from
    flat = lambda ws: torch.cat([w.flatten() for w in ws])  # noqa: E731
    return rel_rms(torch.stack(ys, 1), y_ref), rel_rms(flat(W_end), flat(s_ref.weights))


def main() -> None:
    from _helpers import memora_gap

    torch.set_num_threads(1)
    sizes = (1, 4, 16, 64)
    print("relative RMS against the exact rule (eq. 27 token by token); outputs / final weights")
    head = ["theta scale", "writes"] + [f"chunk {b}" for b in sizes] + ["W carry, chunk 64"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for scale in (0.01, 0.1, 1.0):
        gap = memora_gap(scale, sizes)
        cells = [f"{scale:g}", f"{gap['writes']:.2g}"]
        cells += [f"{gap[b][0]:.2g} / {gap[b][1]:.2g}" for b in sizes]
        y_err, w_err = literal_w_carry(scale, 64)
        cells.append(f"{y_err:.2g} / {w_err:.2g}")
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
