"""``titans bench``: throughput and memory of a model config on this machine."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser(
        "bench", help="measure training, streaming and decoding speed of a model",
        description=(
            "Training tokens/s (forward+backward) at the config's seq_len, streaming prefill tokens/s with "
            "the state carried across calls, one-token decoding tokens/s, and peak resident memory. "
            "For the full comparison tables see benchmarks/ in the repository."
        ),
    )  # fmt: skip
    p.add_argument("--config", help="run config (YAML/TOML) whose model to measure (default: built-in defaults)")
    p.add_argument("--checkpoint", help="measure a trained checkpoint's model instead of --config")
    p.add_argument("--batch", type=int, default=1, help="sequences per call (default 1)")
    p.add_argument("--stream-tokens", type=int, default=16384, help="tokens streamed for the prefill measurement")
    p.add_argument("--decode-tokens", type=int, default=64, help="tokens decoded one at a time")
    p.add_argument("--chunk-tokens", type=int, default=2048, help="tokens per streaming call (default 2048)")
    p.set_defaults(func=run, accepts_overrides=True)


def _rss_peak_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(args) -> int:
    import time

    import torch

    from ..io.config_files import check_range
    from ..model import TitansLM
    from ..runtime.cpu import tune_cpu_allocator
    from ..train.checkpoint import load_pretrained
    from ..train.config import load_run_config

    check_range("--batch", args.batch, 1, 4096)
    check_range("--stream-tokens", args.stream_tokens, 1, 1 << 32)
    check_range("--decode-tokens", args.decode_tokens, 1, 10**7)
    check_range("--chunk-tokens", args.chunk_tokens, 1, 1 << 32)
    tune_cpu_allocator()
    run_cfg = load_run_config(args.config, args.overrides)
    if args.checkpoint:
        model, _, _ = load_pretrained(args.checkpoint)
    else:
        model = TitansLM(run_cfg.model)
    cfg = model.cfg
    T = run_cfg.train.seq_len
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, T), generator=g)
    print(f"model {cfg.variant}: {model.num_parameters() / 1e6:.2f}M parameters, dim {cfg.dim}, depth {cfg.depth}")
    model.train()
    rows = []
    for i in range(3):  # the first step warms up
        t = time.perf_counter()
        _, loss, _ = model(ids, labels=ids)
        loss.backward()
        dt = time.perf_counter() - t
    model.zero_grad(set_to_none=True)
    rows.append(("train fwd+bwd", f"T={T}", args.batch * T / dt))
    model.eval()
    stream = torch.randint(0, cfg.vocab_size, (args.batch, args.stream_tokens), generator=g)
    with torch.inference_mode():
        state, t = None, time.perf_counter()
        for s in range(0, args.stream_tokens, args.chunk_tokens):
            _, _, state = model(stream[:, s : s + args.chunk_tokens], state=state)
        rows.append(("stream prefill", f"{args.stream_tokens} tokens", args.batch * args.stream_tokens / (time.perf_counter() - t)))
        nxt = stream[:, -1:]
        t = time.perf_counter()
        for _ in range(args.decode_tokens):
            logits, _, state = model(nxt, state=state)
            nxt = logits[:, -1].argmax(-1, keepdim=True)
        rows.append(("decode", f"after {args.stream_tokens}", args.batch * args.decode_tokens / (time.perf_counter() - t)))
    print(f"{'measure':<16} {'setting':<18} {'tokens/s':>10}")
    for name, setting, tps in rows:
        print(f"{name:<16} {setting:<18} {tps:>10,.0f}")
    print(f"peak resident memory: {_rss_peak_mb():,.0f} MB")
    return 0
