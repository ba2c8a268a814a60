"""Probe a NIAH checkpoint trained on pair-pk needles (docs/experiments/single-needle.md): recall against the
stretch of noise haystack between a needle and its question, and the growth of the memory weights
while the noise haystack streams.

    python benchmarks/niah_probe.py gaps titans/checkpoints/niah-pair-lmm-3
    python benchmarks/niah_probe.py drift titans/checkpoints/niah-pair-lmm-3 --tokens 24576
    python benchmarks/niah_probe.py far titans/checkpoints/niah-pair-mac-2 --passages 8,128,512,1024,2730
    python benchmarks/niah_probe.py late titans/checkpoints/niah-pair-mac-2 --passages 1,512,1024,2048,2730
    python benchmarks/niah_probe.py keys titans/checkpoints/niah-pair-mac-2
    python benchmarks/niah_probe.py rates titans/checkpoints/niah-pair-mac-5

``gaps``: for each (passages before the needle, passages between needle and question), 8 keys
with random 3-digit values; a hit is the value as the most likely next token after
``"Recall the pair: {key}"``. One passage is the noise haystack's 24-token paragraph.
``drift``: the largest per-head Frobenius norm of each block's memory weights every 4,096 tokens.
``far``: the 8 pairs written after one passage and read back after ``--passages`` passages of
noise (up to 65K tokens; one stream per key, the state copied at each gap), with the memory's
largest weight norm per block and the mean test-time learning rate theta and forgetting alpha its
gates gave the noise since the previous gap.
``late``: the 8 pairs written after ``--passages`` passages of noise and read back 192 tokens
later: can a memory that has streamed that much haystack still store a needle? Also prints how far
the needle's line moved each block's weights, relative to their norm.
``rates``: each memory head's write rate ``theta / max_lr`` on the noise haystack (mean and max
over 2,304 tokens, after 4K tokens of it) and its largest on a needle's line, and its forget gate
alpha on the noise with the share of a write that survives a million such tokens: the haystack's
writes and forgetting are what a needle written before it has to outlast.
``keys``: how alike the memory's write keys are, per block and head: the mean cosine between the
keys of noise tokens, and between the key written at a needle's value token and the noise keys
(a write moves the read-out of every key it shares directions with).
"""

from __future__ import annotations

import argparse
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F

CELLS = [(1, 2), (1, 8), (1, 12), (1, 16), (1, 32), (1, 64), (1, 128), (64, 2), (256, 2)]
KEYS = ["apple", "river", "castle", "pencil", "garden", "doctor", "window", "engine"]


def gaps(model, tok) -> None:
    from titans.tasks.niah import NOISE_SENTENCES

    rng = np.random.default_rng(0)
    print(f"{'before':>6} {'between':>7} {'tokens':>6} | recalled  mean log p(value)")
    for before, between in CELLS:
        hits, logp = 0, 0.0
        for key in KEYS:
            value = int(rng.integers(100, 1000))
            text = (" ".join([NOISE_SENTENCES] * before) + f"\nRemember the pair: {key} {value}.\n"
                    + " ".join([NOISE_SENTENCES] * between) + f"\nRecall the pair: {key}")  # fmt: skip
            ids = torch.tensor([tok.encode(text)])
            (target,) = tok.encode(f" {value}")
            with torch.inference_mode():
                lp = model(ids)[0][0, -1].float().log_softmax(-1)
            hits += int(lp.argmax() == target)
            logp += float(lp[target])
        print(f"{before:>6} {between:>7} {ids.shape[1]:>6} | {hits}/{len(KEYS)}      {logp / len(KEYS):.2f}", flush=True)


def drift(model, tok, tokens: int) -> None:
    from titans.tasks.niah import NOISE_SENTENCES

    unit = tok.encode(" " + NOISE_SENTENCES)
    ids = torch.tensor([(unit * (tokens // len(unit) + 1))[:tokens]])
    state = None
    print("tokens | largest head norm of the memory weights, per block")
    with torch.inference_mode():
        for t in range(0, tokens, 4096):
            _, _, state = model(ids[:, t : t + 4096], state=state)
            norms = [max(float(w.norm(dim=(-2, -1)).max()) for w in layer.memory.memory.weights) for layer in state.layers]
            print(f"{min(t + 4096, tokens):>6} | " + "  ".join(f"{n:.2f}" for n in norms), flush=True)


def _fit_error(layer, u, memory_state) -> float:
    """How well the memory, as it stood before a piece, already answered that piece's writes:
    mean ||M(k) - v||^2 / ||v||^2 over its tokens and heads (0: nothing left to learn, so the
    test-time gradient, the paper's surprise, vanishes). ``u``: the write projections
    ``[B, T, 3 * heads * head_dim]``; ``memory_state``: the layer's state before the piece."""
    from titans.ops.memory.mlp import mlp_read

    qkv, _ = layer._conv(u, memory_state.conv)
    k, v = F.silu(qkv).reshape(*u.shape[:2], 3, layer.heads, layer.head_dim).unbind(2)[1:]  # (B, T, H, D)
    k = F.normalize(k, dim=-1)
    B, T, H, D = k.shape
    weights = [w.float().reshape(B * H, *w.shape[2:]) for w in memory_state.memory.weights]
    read = mlp_read(weights, k.float().transpose(1, 2).reshape(B * H, T, D), layer.activation, layer.residual)
    v = v.float().transpose(1, 2).reshape(B * H, T, D)
    return float((((read - v) ** 2).sum(-1) / (v**2).sum(-1).clamp_min(1e-12)).mean())


def _pairs(tok, before: str, what: str):
    """The 8 pairs' lines (``before`` + the needle line), their questions and value tokens, the
    noise paragraph's tokens and a streaming piece of whole paragraphs (~4K tokens)."""
    from titans.tasks.niah import NOISE_SENTENCES

    rng = np.random.default_rng(0)
    values = [int(rng.integers(100, 1000)) for _ in KEYS]
    lines = [tok.encode(before + f"\nRemember the pair: {k} {v}.\n") for k, v in zip(KEYS, values)]
    questions = [tok.encode(f"\nRecall the pair: {k}") for k in KEYS]
    if len({len(n) for n in lines}) != 1 or len({len(q) for q in questions}) != 1:
        raise SystemExit(f"{what} needs keys and values of one token each (the words tokenizer)")
    targets = torch.tensor([tok.encode(f" {v}")[0] for v in values])
    unit = tok.encode(" " + NOISE_SENTENCES)
    return lines, questions, targets, unit, (4096 // len(unit)) * len(unit)


@contextmanager
def _noise_rate(model, factor: float | None):
    """``--noise-theta``: inside, every memory writes at ``factor`` x its test-time learning rate
    (its bound max_lr scaled; the sigmoid theta); entered while only the noise haystack streams:
    what if the gates wrote the haystack less? ``None``: unchanged."""
    from titans.layers.neural_memory import NeuralMemory

    memories = [m for m in model.modules() if isinstance(m, NeuralMemory)]
    bounds = [m.max_lr for m in memories]
    for m in memories:
        m.max_lr *= 1.0 if factor is None else factor
    try:
        yield
    finally:
        for m, b in zip(memories, bounds):
            m.max_lr = b


def far(model, tok, passages: list[int], noise_theta: float | None = None) -> None:
    import copy

    from titans.layers.neural_memory import NeuralMemory
    from titans.tasks.niah import NOISE_SENTENCES

    heads, questions, targets, unit, piece = _pairs(tok, NOISE_SENTENCES, "far")
    gates = {"theta": [], "alpha": []}
    hooks = []
    for m in model.modules():  # the gates' pre-activations, recorded as the noise streams
        if isinstance(m, NeuralMemory):
            act = (lambda z, m=m: m.max_lr * torch.sigmoid(z)) if m.theta_activation == "sigmoid" else F.softplus
            hooks.append(m.to_theta.register_forward_hook(lambda _m, _i, z, act=act: gates["theta"].append(float(act(z).mean()))))
            if m.to_alpha is not None:
                hooks.append(m.to_alpha.register_forward_hook(lambda _m, _i, z: gates["alpha"].append(float(torch.sigmoid(z).mean()))))
    layers = [m for m in model.modules() if isinstance(m, NeuralMemory)]
    written = [[] for _ in layers]  # each memory's write projections during the current piece
    for m, out in zip(layers, written):
        hooks.append(m.to_qkv.register_forward_hook(lambda _m, _i, u, out=out: out.append(u)))
    surprise = []
    print(f"{'gap':>7} | recalled  mean log p(value) | largest weight norm per block | theta  alpha (noise) | fit error")
    with torch.inference_mode():
        _, _, state = model(torch.tensor(heads))
        done = 0
        for n in passages:
            gates["theta"].clear(), gates["alpha"].clear(), surprise.clear()
            ids = torch.tensor([unit * (n - done)] * len(KEYS))
            for s in range(0, ids.shape[1], piece):
                for out in written:
                    out.clear()
                before = state
                with _noise_rate(model, noise_theta):
                    _, _, state = model(ids[:, s : s + piece], state=state, logits_to_keep=1)
                surprise.append(np.mean([_fit_error(m, torch.cat(out, 1), layer.memory) for m, out, layer
                                         in zip(layers, written, before.layers)]))
            done = n
            # the noise's gates, taken before the questions are read (their gates would count too)
            theta = np.mean(gates["theta"])
            alpha = f"{np.mean(gates['alpha']):.1e}" if gates["alpha"] else "-"
            lp = model(torch.tensor(questions), state=copy.deepcopy(state))[0][:, -1].float().log_softmax(-1)
            hits = int((lp.argmax(-1) == targets).sum())
            norms = [max(float(w.norm(dim=(-2, -1)).max()) for w in layer.memory.memory.weights) for layer in state.layers]
            print(f"{n * len(unit):>7} | {hits}/{len(KEYS)}       {float(lp.gather(1, targets[:, None]).mean()):6.2f}           | "
                  f"{'  '.join(f'{x:5.1f}' for x in norms):<29} | {theta:.1e} {alpha} | {np.mean(surprise):.3f}", flush=True)
    for h in hooks:
        h.remove()


def late(model, tok, passages: list[int], noise_theta: float | None = None) -> None:
    import copy

    needles, questions, targets, unit, piece = _pairs(tok, "", "late")
    after = torch.tensor([unit * 8] * len(KEYS))  # 8 passages (192 tokens) between needle and question

    def weights(state):
        return [[w.float() for w in layer.memory.memory.weights] for layer in state.layers]

    print(f"{'before':>7} | recalled  mean log p(value) | largest weight norm per block | needle write, relative")
    with torch.inference_mode():
        state, done = None, 0
        for n in passages:
            ids = torch.tensor([unit * (n - done)] * len(KEYS))
            with _noise_rate(model, noise_theta):
                for s in range(0, ids.shape[1], piece):
                    _, _, state = model(ids[:, s : s + piece], state=state, logits_to_keep=1)
            done = n
            _, _, written = model(torch.tensor(needles), state=copy.deepcopy(state), logits_to_keep=1)
            # how far the needle line moved each block's weights, relative to their size
            moved = [max(float((a - b).norm(dim=(-2, -1)).max() / b.norm(dim=(-2, -1)).max()) for a, b in zip(wa, wb))
                     for wa, wb in zip(weights(written), weights(state))]
            with _noise_rate(model, noise_theta):
                _, _, asked = model(after, state=written, logits_to_keep=1)
            lp = model(torch.tensor(questions), state=asked)[0][:, -1].float().log_softmax(-1)
            hits = int((lp.argmax(-1) == targets).sum())
            norms = [max(float(w.norm(dim=(-2, -1)).max()) for w in layer.memory.memory.weights) for layer in state.layers]
            print(f"{n * len(unit):>7} | {hits}/{len(KEYS)}       {float(lp.gather(1, targets[:, None]).mean()):6.2f}           | "
                  f"{'  '.join(f'{x:5.1f}' for x in norms):<29} | {'  '.join(f'{x:.4f}' for x in moved)}", flush=True)


def rates(model, tok) -> None:
    from titans.layers.neural_memory import NeuralMemory
    from titans.tasks.niah import NOISE_SENTENCES

    memories = [m for m in model.modules() if isinstance(m, NeuralMemory)]
    seen = [([], []) for _ in memories]  # each memory's rates and alphas [B, T, H] per call
    hooks = []
    for m, (rate, alpha) in zip(memories, seen):
        hooks.append(m.to_theta.register_forward_hook(lambda _m, _i, z, out=rate: out.append(torch.sigmoid(z.float()))))
        if m.to_alpha is not None:
            hooks.append(m.to_alpha.register_forward_hook(lambda _m, _i, z, out=alpha: out.append(torch.sigmoid(z.float()))))
    unit = tok.encode(" " + NOISE_SENTENCES)
    noise = torch.tensor([unit * (4096 // len(unit) + 96)])
    line = torch.tensor([tok.encode("\nRemember the pair: apple 417.\n")])

    def gates_of(ids, state):  # per memory: (rates (T, H), alphas (T, H) or None)
        for rate, alpha in seen:
            rate.clear(), alpha.clear()
        _, _, state = model(ids, state=state, logits_to_keep=1)
        return [(torch.cat(r, 1)[0], torch.cat(a, 1)[0] if a else None) for r, a in seen], state

    with torch.inference_mode():
        _, state = gates_of(noise[:, : -96 * len(unit)], None)
        on_noise, state = gates_of(noise[:, -96 * len(unit) :], state)
        on_line, _ = gates_of(line, state)
    for h in hooks:
        h.remove()
    print("memory | per head: rate theta / max_lr on noise (mean / max) and on a needle line (max); forget gate alpha on "
          "noise (mean) and the share of a write it keeps over 1M tokens")
    for i, ((rate, alpha), (line_rate, _)) in enumerate(zip(on_noise, on_line)):
        print(f"{i:>6} | rate  " + "  ".join(f"{a:.1e} / {b:.1e}, {c:.1e}" for a, b, c in
                                           zip(rate.mean(0), rate.max(0).values, line_rate.max(0).values)))
        if alpha is not None:
            kept = torch.exp(1e6 * torch.log1p(-alpha).mean(0))  # prod (1 - alpha_t) over 1M such tokens
            print(f"{'':>6} | alpha " + "  ".join(f"{a:.1e}, keeps {k:.2f}" for a, k in zip(alpha.mean(0), kept)))
        print(f"{'':>6} | the noise's rate summed over 1M tokens, largest head: {float(rate.mean(0).max()) * 1e6:.3g}", flush=True)


def keys(model, tok) -> None:
    from titans.layers.neural_memory import NeuralMemory
    from titans.tasks.niah import NOISE_SENTENCES

    noise = " ".join([NOISE_SENTENCES] * 8)
    at = len(tok.encode(noise + "\nRemember the pair: apple"))  # the value token's position
    ids = tok.encode(noise + "\nRemember the pair: apple 417.\n" + noise)
    layers = [m for m in model.modules() if isinstance(m, NeuralMemory)]
    written = {id(m): [] for m in layers}  # the key projections of every write, in order
    hooks = [m.to_qkv.register_forward_hook(lambda m_, i, out, m=m: written[id(m)].append(out[0])) for m in layers]
    with torch.inference_mode():
        model(torch.tensor([ids]))
    for h in hooks:
        h.remove()
    print("block | mean cosine per head: noise key vs noise key | value-token key vs noise keys")
    for b, m in enumerate(layers):
        u = torch.cat(written[id(m)])[-len(ids):][None]  # (1, T, 3 * H * D); a MAC writes extra tokens first
        qkv, _ = m._conv(u, None)  # causal: one pass over the whole row equals the segment-wise passes
        k = F.normalize(F.silu(qkv[0]).reshape(len(ids), 3, m.heads, m.head_dim)[:, 1], dim=-1)  # (T, H, D)
        hay = torch.cat([k[: at - 8], k[at + 6 :]])  # noise tokens only (the needle line left out)
        sample = hay[::7]
        same = torch.einsum("thd,shd->h", sample, sample) / len(sample) ** 2
        needle = torch.einsum("hd,thd->h", k[at], hay) / len(hay)
        print(f"{b + 1:>5} | {' '.join(f'{x:5.2f}' for x in same.tolist())}   | {' '.join(f'{x:5.2f}' for x in needle.tolist())}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=("gaps", "drift", "far", "late", "rates", "keys"))
    p.add_argument("checkpoint", help="checkpoint or run directory of a model trained with the words tokenizer")
    p.add_argument("--tokens", type=int, default=24576, help="drift: tokens of noise haystack to stream")
    p.add_argument("--passages", default="8,128,512,1024,2730",
                   help="far: passages of noise (24 tokens each) between the pairs and their questions")
    p.add_argument("--pin-alpha", type=float, default=None,
                   help="far: fix every memory's forgetting alpha at this value (its gate's weight zeroed) to "
                        "tell forgetting from overwriting")
    p.add_argument("--scale-theta", type=float, default=None,
                   help="far: multiply every memory's test-time learning rate by this factor (its bound max_lr, "
                        "for the sigmoid theta): does writing everything more weakly keep a needle longer?")
    p.add_argument("--noise-theta", type=float, default=None,
                   help="far, late: multiply every memory's max_lr by this factor while the noise streams (not while "
                        "the needle and question are read): what if the gates wrote the haystack less?")
    p.add_argument("--model-setting", action="append", default=[], metavar="KEY=VALUE",
                   help="run the checkpoint with a test-time model setting changed (repeatable), e.g. "
                        "memory_max_grad_norm=10, as titans eval's --model.KEY=VALUE")
    args = p.parse_args()
    from titans.config_files import ConfigError
    from titans.eval.cli import checkpoint_settings
    from titans.train.checkpoint import CheckpointError, load_pretrained

    try:
        settings = checkpoint_settings([f"model.{item}" for item in args.model_setting])
        model, tok, info = load_pretrained(args.checkpoint, model_settings=settings)
    except (ConfigError, CheckpointError) as err:
        p.error(str(err))
    if args.what in ("drift", "far", "late", "rates", "keys") and model.cfg.variant in ("transformer", "swa"):
        p.error(f"{args.what} reads the neural memory's weights; {args.checkpoint} is a {model.cfg.variant} (no memory)")
    from titans.layers.neural_memory import NeuralMemory

    memories = [m for m in model.modules() if isinstance(m, NeuralMemory)]
    if args.pin_alpha is not None:
        if not 0 < args.pin_alpha < 1:
            p.error("--pin-alpha must lie in (0, 1)")
        for m in memories:
            if m.to_alpha is not None:
                with torch.no_grad():
                    m.to_alpha.weight.zero_()
                    m.to_alpha.bias.fill_(float(np.log(args.pin_alpha / (1 - args.pin_alpha))))
    if args.noise_theta is not None and (args.what not in ("far", "late") or args.noise_theta <= 0):
        p.error("--noise-theta is for far and late and must be > 0")
    if args.scale_theta is not None and args.scale_theta <= 0:
        p.error("--scale-theta must be > 0")
    # these read or scale theta / max_lr, which only the sigmoid theta has
    for what, wanted in (("rates", args.what == "rates"), ("--noise-theta", args.noise_theta is not None),
                         ("--scale-theta", args.scale_theta is not None)):  # fmt: skip
        if wanted and any(m.theta_activation != "sigmoid" for m in memories):
            p.error(f"{what} needs the sigmoid theta (memory_theta_activation: sigmoid)")
    if args.scale_theta is not None:
        for m in memories:
            m.max_lr *= args.scale_theta
    note = "" if args.pin_alpha is None else f", alpha pinned at {args.pin_alpha}"
    note += "" if args.scale_theta is None else f", theta scaled by {args.scale_theta}"
    note += "" if args.noise_theta is None else f", the noise written at {args.noise_theta} x theta"
    note += "".join(f", {k}={v}" for k, v in (settings or {}).items())
    print(f"{args.checkpoint} (step {info['step']}){note}")
    if args.what == "gaps":
        gaps(model, tok)
    elif args.what == "drift":
        drift(model, tok, args.tokens)
    elif args.what == "far":
        far(model, tok, sorted(int(n) for n in args.passages.split(",")), args.noise_theta)
    elif args.what == "late":
        passages = sorted(int(n) for n in args.passages.split(","))
        if passages[0] < 1:
            p.error("late: --passages must be >= 1 (the noise streamed before the needle)")
        late(model, tok, passages, args.noise_theta)
    elif args.what == "rates":
        rates(model, tok)
    else:
        keys(model, tok)


if __name__ == "__main__":
    main()
