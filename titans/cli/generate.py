"""``titans generate``: continue a prompt with a trained checkpoint."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser(
        "generate", help="continue a prompt with a trained checkpoint",
        description="Prefill the prompt in parallel, then decode one token at a time with the model's state.",
    )  # fmt: skip
    p.add_argument("--checkpoint", required=True, help="checkpoint directory, or a run directory (its latest checkpoint)")
    p.add_argument("--prompt", default="", help="prompt text (default: empty, i.e. start of a document)")
    p.add_argument("--prompt-file", help="read the prompt from this file instead (any length: it is streamed)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate (default 200)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--chunk-tokens", type=int, default=4096, help="prompt tokens per prefill call (default 4096)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    p.add_argument("--compile", action="store_true",
                   help="run the memory (and a MAC's one-token decode step) through torch.compile: "
                        "compiles first (tens of seconds on CPU), then decodes several times faster")  # fmt: skip
    p.set_defaults(func=run)


def _read_prompt(path: str) -> str:
    from pathlib import Path

    from ..io.config_files import ConfigError

    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"--prompt-file {path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:  # missing, a directory, unreadable
        raise ConfigError(f"--prompt-file {path} cannot be read: {err.strerror or err}") from None


def run(args) -> int:
    import math

    import torch

    from ..io.config_files import ConfigError, check_range, check_seed
    from ..train.checkpoint import load_pretrained
    from ..train.trainer import resolve_device

    if args.max_new_tokens < 0:
        raise ConfigError("--max-new-tokens must be >= 0")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise ConfigError(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise ConfigError(f"--top-k must be >= 1, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:  # NaN fails this too
        raise ConfigError(f"--top-p must lie in (0, 1], got {args.top_p}")
    check_range("--chunk-tokens", args.chunk_tokens, 1, 1 << 32)
    check_range("--max-new-tokens", args.max_new_tokens, 0, 10**7)
    check_seed("--seed", args.seed)
    prompt = _read_prompt(args.prompt_file) if args.prompt_file else args.prompt
    device = resolve_device(args.device, "--device")
    model, tokenizer, info = load_pretrained(args.checkpoint, map_location=device)
    model.set_memory_compile(args.compile)
    ids = tokenizer.encode(prompt) if prompt else [tokenizer.eos_id]  # eos = "a document starts here"
    ids = torch.tensor([ids], device=device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    state = None
    with torch.inference_mode():
        # stream all but the last prompt token in chunks: constant memory for any prompt length
        for start in range(0, ids.shape[1] - 1, args.chunk_tokens):
            _, _, state = model(ids[:, start : min(start + args.chunk_tokens, ids.shape[1] - 1)], state=state)
        temperature, top_k = (1.0, 1) if args.temperature == 0 else (args.temperature, args.top_k)
        out, _ = model.generate(
            ids[:, -1:], args.max_new_tokens, temperature=temperature, top_k=top_k, top_p=args.top_p,
            eos_token_id=tokenizer.eos_id, state=state, generator=generator,
        )  # fmt: skip
    new = [t for t in out[0, 1:].tolist() if t != tokenizer.eos_id]
    print(prompt + tokenizer.decode(new))
    return 0
