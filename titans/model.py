"""The language model: embedding, a stack of blocks, final norm, head.

    cfg = TitansConfig.preset("tiny", variant="mac")
    model = TitansLM(cfg)
    logits, loss, state = model(input_ids, labels=input_ids)     # training (parallel)
    logits, _, state = model(next_ids, state=state)              # continue (streaming)

``variant`` is one of mac | mag | mal | lmm (Titans) or transformer | swa (baselines in the same
frame). Every variant takes and returns a ``ModelState`` so that a sequence can be fed in any
pieces, one token at a time included, with the outputs of one call.
"""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import asdict, dataclass, field, fields, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .blocks import AttentionBlock, BlockState, LMMBlock, MACBlock, MAGBlock, MALBlock
from .blocks.common import RMSNorm
from .errors import MemoryDivergedError, StateMismatchError
from .layers.features import polynomial_feature_dim
from .layers.neural_memory import NeuralMemory, parse_product_dtype
from .ops.memory.objectives import Objective
from .ops.memory.muon import check_muon_steps
from .ops.memory.rules import MEMORY_RULES, merge_rule
from .ops.memory.state import check_max_grad_norm, check_retention_kl, check_retention_q
from .ops.tensors import standard_strides, state_tensors

__all__ = ["ModelState", "TitansConfig", "TitansLM", "VARIANTS"]

VARIANTS = ("mac", "mag", "mal", "lmm", "transformer", "swa")


# Fields whose default changed after configs were first saved, with the value a saved config that
# lacks them was trained with (every field is saved since 2026-12-01; earlier run.json files may
# lack the inner-gradient clip, which had no default bound then).
FORMER_DEFAULTS = {"memory_max_grad_norm": None}


class _class_or_instance:
    """A method that receives the class and the instance it was called on (None on the class)."""

    def __init__(self, method) -> None:
        self.method = method
        functools.update_wrapper(self, method)

    def __get__(self, instance, owner):
        method = self.method

        @functools.wraps(method)
        def bound(*args, **kwargs):
            return method(owner, instance, *args, **kwargs)

        signature = inspect.signature(method)  # as called: without the class and the instance
        bound.__signature__ = signature.replace(parameters=list(signature.parameters.values())[2:])
        return bound


@dataclass
class TitansConfig:
    variant: str = "mac"
    vocab_size: int = 257  # the byte tokenizer: 256 bytes and end-of-document
    dim: int = 128
    depth: int = 2  # number of blocks
    heads: int = 4
    ffn_mult: float = 4.0  # SwiGLU hidden = ffn_mult * 2/3 * dim, rounded up to a multiple of 32
    window: int = 128  # sliding window (mag, mal, swa)
    segment: int = 128  # MAC segment length
    persistent_tokens: int = 4
    rope_base: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    # Neural memory (every ablation of the paper's Table 5 that concerns the memory).
    memory_heads: int | None = None  # default: heads
    memory_depth: int = 2
    memory_expansion: float = 4.0
    memory_chunk: int = 64
    memory_momentum: bool = True
    memory_forgetting: bool = True
    memory_conv_kernel: int = 4
    memory_residual: bool = False
    memory_activation: str = "silu"
    memory_qk_activation: str = "silu"  # "identity": no SiLU before the q / k l2 norm (NeuralMemory)
    # The loss each write descends (NeuralMemory objective): "l2" (the paper), "lp" (MIRAS's Moneta
    # bias, exponent memory_objective_p) or "huber" (MIRAS's Yaad bias, a learned per-token threshold
    # starting at memory_delta_init; with memory_momentum=False, Yaad's rule)
    memory_objective: str = "l2"
    memory_objective_p: float = 3.0
    memory_delta_init: float = 1.0
    # Moneta's l_q retention (NeuralMemory retention_q; None: off). Moneta: memory_objective="lp",
    # memory_retention_q=4, memory_momentum=False
    memory_retention_q: float | None = None
    # Memora's KL retention (NeuralMemory retention_kl; None: off): every row of the memory's weights
    # on the simplex of this sum c, each write a softmax step. Memora: memory_retention_kl=1,
    # memory_momentum=False
    memory_retention_kl: float | None = None
    # The Omega rule (ATLAS eqs. 9-10; NeuralMemory window): each write descends the loss of the
    # memory_window latest tokens, weighted by learned gates. 1: the Titans rule
    memory_window: int = 1
    # ATLAS's polynomial feature map of the memory's keys and queries (NeuralMemory feature_degree;
    # None: off): the memory stores phi(k) -> v, phi every monomial up to this degree
    memory_feature_degree: int | None = None
    # What the memory's gates read (NeuralMemory gate_kernel): 0, the token's own input (the
    # paper); K >= 2, a causal convolution of the input over the last K tokens, so that a gate can
    # tell a token by its context (e.g. the value of a "key value" pair). Not in the paper
    memory_gate_kernel: int = 0
    # ATLAS's Muon inner optimiser (NeuralMemory muon_steps; None: the Titans step): each write steps
    # along the memory's momentum orthogonalised by this many Newton-Schulz steps. ATLAS:
    # memory_window=8, memory_feature_degree=2, memory_muon_steps=5 (with_memory_rule("atlas"))
    memory_muon_steps: int | None = None
    memory_theta_init: float = 1e-3
    # 'softplus' leaves the memory's learning rate unbounded; 'sigmoid' bounds it by
    # memory_max_lr, which keeps the test-time updates stable when training pushes theta up
    memory_theta_activation: str = "softplus"
    memory_max_lr: float = 0.1
    memory_eta_init: float = 0.9
    memory_alpha_init: float = 1e-3
    # M_0's last layer starts at zero: an untrained memory then answers exactly what was written
    # into it (no fixed random term to drown one needle's few writes at a small theta)
    memory_zero_init_output: bool = False
    memory_associative_init: bool = False  # M starts storing "what followed each token" (NeuralMemory)
    # Clip each token's inner gradient to this norm (its learning rate scaled down): bounds every
    # test-time step, which a deep memory whose weights grew needs to stay finite (NeuralMemory).
    # None: the paper's update exactly
    memory_max_grad_norm: float | None = 10.0
    # "bfloat16": the memory's chunk products run in bf16, its state in float32 (NeuralMemory's
    # product_dtype: faster where the hardware multiplies bf16 natively, far slower on CPUs without
    # bf16 instructions: docs/speed.md); "float32": none
    memory_product_dtype: str = "float32"
    # MAC: what the memory writes and the output gate takes as y. "attention": the attention's
    # output (its sublayer alone); "residual": the residual stream after it, normalised,
    # norm(x + attention), whose space is the one the next segment's queries are read from;
    # "input": the block's normalised input norm(x), as MAG's memory writes: what the memory
    # writes then does not depend on what it read (through the attention over h).
    mac_memory_input: str = "attention"
    # MAC: what the output gate's y side takes. "memory_input": what the memory writes (the
    # paper's y ⊗ M*(y)); "attention": the attention's own output even when the memory writes the
    # residual stream. With mac_memory_input="residual", the residual stream at a token is mostly
    # that token's embedding, so norm(y) ⊙ σ(M*(y)) hands the head the memory's answer multiplied
    # by a token-specific vector; the attention output is averaged over context, as MAG's
    # attention branch is. On the needle rows this made the difference between a MAC that never
    # recalled past its segment and one that does (docs/experiments/single-needle.md).
    mac_gate_input: str = "memory_input"
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        self._check_numbers()
        for name in ("vocab_size", "dim", "depth", "heads", "memory_chunk", "memory_depth"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.dim % self.heads:
            raise ValueError(f"heads ({self.heads}) must divide dim ({self.dim})")
        if (self.dim // self.heads) % 2:
            raise ValueError(f"head dim dim/heads = {self.dim // self.heads} must be even (RoPE)")
        mh = self.memory_heads or self.heads
        if self.dim % mh:
            raise ValueError(f"memory_heads ({mh}) must divide dim ({self.dim})")
        if self.window <= 0:
            raise ValueError(f"window must be positive, got {self.window}")
        if self.segment <= 0:
            raise ValueError(f"segment length must be positive, got {self.segment}")
        if self.memory_theta_activation not in ("softplus", "sigmoid"):
            raise ValueError(f"memory_theta_activation must be 'softplus' or 'sigmoid', got {self.memory_theta_activation!r}")
        if self.memory_theta_activation == "sigmoid" and not 0 < self.memory_theta_init < self.memory_max_lr:
            raise ValueError(
                f"memory_theta_init ({self.memory_theta_init}) must lie in (0, memory_max_lr={self.memory_max_lr}) "
                f"with the sigmoid theta"
            )
        if self.mac_memory_input not in ("attention", "residual", "input"):
            raise ValueError(f"mac_memory_input must be 'attention', 'residual' or 'input', got {self.mac_memory_input!r}")
        if self.mac_gate_input not in ("memory_input", "attention"):
            raise ValueError(f"mac_gate_input must be 'memory_input' or 'attention', got {self.mac_gate_input!r}")
        check_max_grad_norm(self.memory_max_grad_norm, "memory_max_grad_norm")
        if not isinstance(self.memory_product_dtype, str):
            raise ValueError(f"memory_product_dtype must be a dtype name, got {self.memory_product_dtype!r}")
        try:
            dtype = parse_product_dtype(self.memory_product_dtype)
        except ValueError as e:
            raise ValueError(f"memory_{e}") from None
        # one spelling per setting, so that "bf16" and "bfloat16" runs resume each other
        self.memory_product_dtype = "float32" if dtype is None else "bfloat16"
        if self.persistent_tokens < 0:
            raise ValueError(f"persistent_tokens must be >= 0, got {self.persistent_tokens}")
        if isinstance(self.memory_objective_p, bool) or not isinstance(self.memory_objective_p, (int, float)):
            raise ValueError(f"memory_objective_p must be a number, got {self.memory_objective_p!r}")
        self.memory_objective_p = float(self.memory_objective_p)  # one spelling: 3 and 3.0 resume each other
        try:
            Objective(self.memory_objective, p=self.memory_objective_p)
            check_retention_q(self.memory_retention_q)
        except ValueError as e:
            raise ValueError(f"memory_{e}") from None
        if self.memory_retention_q is not None:
            self.memory_retention_q = float(self.memory_retention_q)
        degree = self.memory_feature_degree
        if degree is not None and (isinstance(degree, bool) or not isinstance(degree, int) or degree < 1):
            raise ValueError(f"memory_feature_degree must be None or an integer >= 1, got {degree!r}")
        if degree is not None:
            head_dim = self.dim // (self.memory_heads or self.heads)
            if degree > 16 or polynomial_feature_dim(head_dim, degree) > 2**20:
                raise ValueError(f"memory_feature_degree={degree} gives keys of C({head_dim} + {degree}, {degree}) "
                                 f"features, more than 2^20 a memory head can take")  # fmt: skip
        if isinstance(self.memory_window, bool) or not isinstance(self.memory_window, int) or not 1 <= self.memory_window <= 4096:
            raise ValueError(f"memory_window must be an integer in [1, 4096] (1: the Titans rule), got {self.memory_window!r}")
        if degree is not None and self.memory_residual:
            raise ValueError("memory_feature_degree and memory_residual do not combine: the residual adds the key "
                             "to an output of another size")  # fmt: skip
        if self.memory_window > 1 and self.memory_retention_q is not None:
            raise ValueError("memory_window (the Omega rule) and memory_retention_q (Moneta's retention) do not combine yet")
        if self.memory_retention_kl is not None:
            self.memory_retention_kl = float(self.memory_retention_kl)  # one spelling: 1 and 1.0 resume each other
            if self.memory_momentum:
                raise ValueError("memory_retention_kl (Memora's KL retention) is gradient descent without momentum: "
                                 "set memory_momentum=False")  # fmt: skip
            if self.memory_retention_q is not None:
                raise ValueError("memory_retention_kl (Memora's KL retention) and memory_retention_q (Moneta's l_q "
                                 "retention) are two retentions: set one")  # fmt: skip
            if self.memory_window > 1:
                raise ValueError("memory_window (the Omega rule) and memory_retention_kl (Memora's retention) do not "
                                 "combine yet")  # fmt: skip
            if self.memory_zero_init_output:
                raise ValueError("memory_zero_init_output and memory_retention_kl (Memora's retention) do not combine: "
                                 "Memora's weights are softmax rows of M_0's parameters, so zeroing them gives uniform "
                                 "rows, not a memory that answers zero")  # fmt: skip
        check_muon_steps(self.memory_muon_steps, "memory_muon_steps")  # None or an integer in [1, 64], named first
        if self.memory_muon_steps is not None:
            if self.memory_retention_q is not None:
                raise ValueError("memory_muon_steps (ATLAS's Muon) and memory_retention_q (Moneta's retention) do not "
                                 "combine yet")  # fmt: skip
            if self.memory_retention_kl is not None:
                raise ValueError("memory_muon_steps (ATLAS's Muon) and memory_retention_kl (Memora's retention) do not "
                                 "combine: Memora's step is a softmax of the gradient step, not a momentum "
                                 "step")  # fmt: skip
            if self.memory_product_dtype != "float32":
                raise ValueError("memory_muon_steps (ATLAS's Muon) and memory_product_dtype='bfloat16' do not combine: "
                                 "the Muon spans compute in float32")  # fmt: skip
        if self.memory_activation not in ("silu", "gelu", "relu"):
            raise ValueError(f"memory_activation must be 'silu', 'gelu' or 'relu', got {self.memory_activation!r}")
        if self.memory_qk_activation not in ("silu", "identity"):
            raise ValueError(f"memory_qk_activation must be 'silu' or 'identity', got {self.memory_qk_activation!r}")

    # (name, lowest, highest) of the integer sizes: an index must fit int32, and a model of more
    # blocks than this would take longer to build than any run here could use it
    _INTS = (("vocab_size", 1, 2**31 - 1), ("dim", 1, 2**20), ("depth", 1, 4096), ("heads", 1, 2**16),
             ("window", 1, 2**31 - 1), ("segment", 1, 2**31 - 1), ("persistent_tokens", 0, 2**20),
             ("memory_depth", 1, 64), ("memory_chunk", 1, 2**20), ("memory_conv_kernel", 0, 2**10),
             ("memory_gate_kernel", 0, 2**10))  # fmt: skip
    # (name, lowest, highest, lowest included) of the real-valued settings
    _FLOATS = (("ffn_mult", 0.0, 1e4, False), ("rope_base", 1.0, 1e12, False), ("norm_eps", 0.0, 1.0, False),
               ("memory_expansion", 0.0, 1e4, False), ("memory_theta_init", 0.0, 1e6, False),
               ("memory_max_lr", 0.0, 1e6, False), ("memory_delta_init", 0.0, 1e12, False),
               ("init_std", 0.0, 1e3, True))  # fmt: skip

    def _check_numbers(self) -> None:
        """Types and ranges of the numeric settings, each refused by name (a size of 1e20 or a
        NaN multiplier would otherwise fail deep inside the model's construction, or never end)."""
        for name, lo, hi in self._INTS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")
        if self.memory_heads is not None and (
            isinstance(self.memory_heads, bool) or not isinstance(self.memory_heads, int) or not 1 <= self.memory_heads <= 2**16
        ):
            raise ValueError(f"memory_heads must be None or an integer in [1, 65536], got {self.memory_heads!r}")
        for name, lo, hi, closed in self._FLOATS:
            value = getattr(self, name)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not ok or not ((lo <= value) if closed else (lo < value)) or value > hi:
                bracket = "[" if closed else "("
                raise ValueError(f"{name} must be a finite number in {bracket}{lo:g}, {hi:g}], got {value!r}")
        for name in ("memory_eta_init", "memory_alpha_init"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
                raise ValueError(f"{name} must lie in (0, 1), got {value!r}")
        check_retention_kl(self.memory_retention_kl, "memory_retention_kl")  # None or a number in (0, 1e6]

    @property
    def ffn_hidden(self) -> int:
        return int(math.ceil(self.ffn_mult * 2 / 3 * self.dim / 32) * 32)

    def memory_kwargs(self) -> dict:
        return dict(
            heads=self.memory_heads or self.heads, depth=self.memory_depth,
            expansion=self.memory_expansion, chunk_size=self.memory_chunk,
            activation=self.memory_activation, residual=self.memory_residual,
            momentum=self.memory_momentum, forgetting=self.memory_forgetting,
            conv_kernel=self.memory_conv_kernel, theta_init=self.memory_theta_init,
            theta_activation=self.memory_theta_activation, max_lr=self.memory_max_lr,
            eta_init=self.memory_eta_init, alpha_init=self.memory_alpha_init,
            associative_init=self.memory_associative_init, max_grad_norm=self.memory_max_grad_norm,
            product_dtype=self.memory_product_dtype, qk_activation=self.memory_qk_activation,
            objective=self.memory_objective, objective_p=self.memory_objective_p, delta_init=self.memory_delta_init,
            retention_q=self.memory_retention_q, retention_kl=self.memory_retention_kl, window=self.memory_window,
            feature_degree=self.memory_feature_degree, gate_kernel=self.memory_gate_kernel,
            muon_steps=self.memory_muon_steps,
        )  # fmt: skip

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TitansConfig":
        """A saved config (``to_dict``'s output, e.g. a checkpoint's run.json): a field it lacks
        takes the value it had when the config was saved (``FORMER_DEFAULTS``), else its default."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown config keys: {unknown}")
        return cls(**{**FORMER_DEFAULTS, **d})

    @_class_or_instance
    def with_memory_rule(cls, config, rule: str, **fields) -> "TitansConfig":
        """A config whose memories follow a named rule (``titans.ops.memory.rules``: "titans",
        "moneta", "yaad", "memora", "omega", "atlas"), with ``fields`` for the rest; a field the rule fixes
        to another value is refused. On the class, the other fields keep their defaults
        (``TitansConfig.with_memory_rule("moneta", dim=256)``); on a config, its own except the
        settings any rule sets, which follow the rule (``cfg.with_memory_rule("moneta")``)."""
        merged = merge_rule(rule, fields, rename=lambda key: f"memory_{key}")
        if config is None:
            return cls(**merged)
        # what any rule sets goes back to its default first, so that no earlier rule's setting stays
        owned = {f"memory_{key}" for named in MEMORY_RULES.values() for key in named.settings}
        defaults = {name: f.default for name, f in cls.__dataclass_fields__.items() if name in owned}
        return replace(config, **{**defaults, **merged})

    @classmethod
    def preset(cls, name: str, **overrides) -> "TitansConfig":
        """Named sizes: 'tiny' (CPU), and the paper's 170M / 340M / 400M / 760M shapes
        (dims and depths as in the Transformer++/Gated DeltaNet baselines the paper follows;
        32K vocabulary as the Llama-2 tokenizer)."""
        presets = {
            "tiny": dict(dim=128, depth=2, heads=4, vocab_size=257, window=128, segment=128),
            "170M": dict(dim=768, depth=12, heads=16, vocab_size=32000, window=512, segment=512),
            "340M": dict(dim=1024, depth=24, heads=16, vocab_size=32000, window=1024, segment=1024),
            "400M": dict(dim=1024, depth=24, heads=16, vocab_size=32000, window=2048, segment=2048),
            "760M": dict(dim=1536, depth=24, heads=16, vocab_size=32000, window=2048, segment=2048),
        }
        if name not in presets:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(presets)}")
        return cls(**{**presets[name], **overrides})


@dataclass
class ModelState:
    """One BlockState per block, the number of tokens seen, and the fingerprint of the model that
    made it (``TitansLM.state_fingerprint``: a state fits only a model of the same layout)."""

    layers: list[BlockState] = field(default_factory=list)
    position: int = 0
    fingerprint: str | None = None

    def detach(self) -> "ModelState":
        return replace(self, layers=[s.detach() for s in self.layers])


# The settings a state's shapes and meaning depend on, per variant: a state made under other values
# of these cannot be continued by the model. Test-time settings (memory_max_grad_norm, product
# dtype, ...) and the vocabulary are not among them.
_MEMORY_SETTINGS = (
    "memory_heads", "memory_depth", "memory_expansion", "memory_chunk", "memory_momentum", "memory_forgetting",
    "memory_conv_kernel", "memory_residual", "memory_activation", "memory_qk_activation", "memory_objective",
    "memory_objective_p", "memory_retention_q", "memory_retention_kl", "memory_window", "memory_feature_degree",
    "memory_gate_kernel", "memory_muon_steps",
)  # fmt: skip
# Settings added after states were first saved: a fingerprint names them only away from these
# defaults, so that states saved before them still fit the models they came from.
_LATER_SETTINGS = {"memory_retention_kl": None, "memory_gate_kernel": 0, "memory_muon_steps": None}
STATE_SETTINGS = {
    "mac": ("segment", "persistent_tokens", *_MEMORY_SETTINGS, "mac_memory_input"),
    "mag": ("window", "persistent_tokens", *_MEMORY_SETTINGS),
    "mal": ("window", "persistent_tokens", *_MEMORY_SETTINGS),
    "lmm": ("persistent_tokens", *_MEMORY_SETTINGS),
    "swa": ("window",),
    "transformer": (),
}


def _make_block(cfg: TitansConfig) -> nn.Module:
    if cfg.variant == "mac":
        return MACBlock(cfg)
    if cfg.variant == "mag":
        return MAGBlock(cfg)
    if cfg.variant == "mal":
        return MALBlock(cfg)
    if cfg.variant == "lmm":
        return LMMBlock(cfg)
    return AttentionBlock(cfg, kind="full" if cfg.variant == "transformer" else "swa")


class TitansLM(nn.Module):
    def __init__(self, cfg: TitansConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(_make_block(cfg) for _ in range(cfg.depth))
        self.norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self._init_weights()
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        # Runtime choices, not config: the memory variants decode a token after a state through
        # their blocks' one-token ``step`` (``_decode_step``; False = the general block forward, the
        # reference the tests compare it with), compiled with ``set_memory_compile``.
        self.fast_decode = True
        self._compile_decode = False

    def _init_weights(self) -> None:
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)) and ".memory.to_" not in f".{name}":
                nn.init.normal_(module.weight, std=self.cfg.init_std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        if self.cfg.memory_zero_init_output:
            for module in self.modules():
                if isinstance(module, NeuralMemory):
                    nn.init.zeros_(module.initial_weights[-1])

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.embed.weight.numel()
        return n

    def forward(
        self,
        input_ids: Tensor,
        labels: Tensor | None = None,
        state: ModelState | None = None,
        logits_to_keep: int = 0,
    ) -> tuple[Tensor, Tensor | None, ModelState]:
        """input_ids ``[B, T]`` -> ``(logits [B, T, vocab], loss or None, state)``.

        ``labels`` ``[B, T]``: the loss is the mean next-token cross-entropy of ``logits[:, t]``
        against ``labels[:, t + 1]`` (labels = input_ids for language modelling; -100 is ignored).
        ``logits_to_keep``: k > 0 computes logits for the last k positions only (``[B, k, vocab]``;
        the Hugging Face convention, 0 = all). Streaming a long prompt needs only its last
        position's logits, and the vocabulary projection of every other token is a large share
        of a small model's reading time (a third for the NIAH demo's LMM).
        """
        if logits_to_keep < 0:
            raise ValueError(f"logits_to_keep must be >= 0 (0 = every position), got {logits_to_keep}")
        if logits_to_keep and labels is not None:
            raise ValueError("logits_to_keep needs labels=None: the loss is over every position's logits")
        if not isinstance(input_ids, Tensor):
            raise TypeError(f"input_ids must be a tensor [batch, time], got {type(input_ids).__name__}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, time], got shape {tuple(input_ids.shape)}")
        if input_ids.shape[0] == 0:
            raise ValueError("input_ids has an empty batch dimension (B = 0)")
        if input_ids.shape[1] == 0:
            raise ValueError("input_ids has an empty time dimension")
        if input_ids.dtype not in (torch.long, torch.int32, torch.int64):
            raise TypeError(f"input_ids must be integer token ids, got {input_ids.dtype}")
        if bool(((input_ids < 0) | (input_ids >= self.cfg.vocab_size)).any()):
            raise ValueError(f"token ids must lie in [0, vocab_size={self.cfg.vocab_size})")
        if labels is not None:
            self._check_labels(input_ids, labels)
        if state is not None:
            self.check_state(state)
        if (
            input_ids.shape[1] == 1
            and labels is None
            and self.fast_decode
            and self.cfg.variant in ("mac", "mag", "mal", "lmm")
            and state is not None
            and state.layers
            and not torch.is_grad_enabled()
            and not torch.is_autocast_enabled(input_ids.device.type)
        ):
            out = self._decode_step(input_ids, state)
            if out is not None:
                return out[0], None, out[1]
        x = self.embed(input_ids)
        layer_states = state.layers if (state is not None and state.layers) else [None] * len(self.blocks)
        new_states = []
        for i, (block, s) in enumerate(zip(self.blocks, layer_states)):
            try:
                x, s = block(x, s)
            except MemoryDivergedError as err:  # say where: the block, and where this call starts
                start = state.position if state is not None else 0
                raise MemoryDivergedError(f"block {i} (this call starts at stream token {start}): {err}") from None
            new_states.append(s)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]  # (B, k, dim)
        logits = self.head(self.norm(x))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        pos = (state.position if state is not None else 0) + input_ids.shape[1]
        return logits, loss, ModelState(layers=new_states, position=pos, fingerprint=self.state_fingerprint())

    def _check_labels(self, input_ids: Tensor, labels: Tensor) -> None:
        if not isinstance(labels, Tensor) or labels.dtype != torch.long:
            raise TypeError(f"labels must be int64 token ids, got {getattr(labels, 'dtype', type(labels).__name__)}")
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels must have input_ids' shape {tuple(input_ids.shape)}, got {tuple(labels.shape)}")
        if labels.shape[1] < 2:
            raise ValueError("labels need at least 2 positions: the first token is never a target")
        scored = labels[:, 1:]
        if bool(((scored != -100) & ((scored < 0) | (scored >= self.cfg.vocab_size))).any()):
            raise ValueError(f"labels must lie in [0, vocab_size={self.cfg.vocab_size}) or be -100 (ignored)")
        if bool((scored == -100).all()):
            raise ValueError("every label after the first position is -100: there is nothing to score (the loss "
                             "would be NaN)")  # fmt: skip

    def state_fingerprint(self) -> str:
        """The settings a state of this model depends on (``STATE_SETTINGS``), as ``key=value``
        words: what a state carries to say which models it fits, and what an error shows."""
        cfg = self.cfg
        values = {"memory_heads": cfg.memory_heads or cfg.heads, "memory_expansion": float(cfg.memory_expansion),
                  "memory_gate_kernel": cfg.memory_gate_kernel if cfg.memory_gate_kernel > 1 else 0}  # 1 is 0
        keys = ("variant", "dim", "depth", "heads", *STATE_SETTINGS[cfg.variant])
        keys = [k for k in keys if k not in _LATER_SETTINGS or values.get(k, getattr(cfg, k)) != _LATER_SETTINGS[k]]
        return " ".join(f"{k}={values.get(k, getattr(cfg, k))}" for k in keys)

    def check_state(self, state: ModelState) -> None:
        """Refuse, with both sides named, a state this model cannot continue."""
        if not isinstance(state, ModelState):
            raise TypeError(f"state must be a ModelState, got {type(state).__name__}")
        mine = self.state_fingerprint()
        if state.fingerprint is not None and state.fingerprint != mine:
            words = state.fingerprint.split() if isinstance(state.fingerprint, str) else None
            if not words or not all("=" in w for w in words):
                raise StateMismatchError(f"the state's fingerprint is malformed: {str(state.fingerprint)[:80]!r}")
            theirs = dict(w.split("=", 1) for w in words)
            ours = dict(w.split("=", 1) for w in mine.split())
            # the settings both sides have (a transformer's state has no memory settings), and a
            # later setting one side names away from its default (absent: the default)
            later = {k: str(v) for k, v in _LATER_SETTINGS.items()}
            keys = [k for k in ours if k in theirs] + [k for k in later if (k in ours) != (k in theirs)]
            diff = [f"{k}: state {theirs.get(k, later.get(k))}, model {ours.get(k, later.get(k))}" for k in keys
                    if theirs.get(k, later.get(k)) != ours.get(k, later.get(k))]  # fmt: skip
            raise StateMismatchError(f"the state comes from another model layout ({'; '.join(diff) or state.fingerprint})")
        if not isinstance(state.position, int) or isinstance(state.position, bool) or state.position < 0:
            raise StateMismatchError(f"state position must be an integer >= 0, got {state.position!r}")
        if state.layers and len(state.layers) != len(self.blocks):
            raise StateMismatchError(f"state has {len(state.layers)} layers, the model has {len(self.blocks)}")
        dtype = self.embed.weight.dtype
        # a 32- or 16-bit model's state mixes float32 (the memory), its own dtype and an autocast
        # dtype, and a float64 model computes with any of those; float64 tensors reach a lower-
        # precision model's attention as a dtype it cannot mix
        if dtype != torch.float64 and any(t.dtype == torch.float64 for t in state_tensors(state.layers)):
            raise StateMismatchError(f"the state holds float64 tensors, the model computes in {dtype}: convert one "
                                     f"(model.double(), or the state's tensors) or start a new state")  # fmt: skip

    def _decode_step(self, input_ids: Tensor, state: ModelState) -> tuple[Tensor, ModelState] | None:
        """One token ``[B, 1]`` after ``state`` through every block's one-token ``step`` (MAC, MAG,
        MAL, LMM), or None when the state cannot continue that way (then ``forward`` takes the
        general path, which also explains a bad state).
        The general forward costs about a thousand small operations per token (segment
        bookkeeping, cache concatenations, checks); this runs the same math with fixed shapes, so
        that it also compiles into one graph for a whole stream (``set_memory_compile``)."""
        B, dtype = input_ids.shape[0], self.embed.weight.dtype
        steps = [block.step_state(s, B, dtype) for block, s in zip(self.blocks, state.layers)]
        if any(s is None for s in steps):  # a state that does not fit: the general path explains
            return None
        graph = _decode_graph_compiled if self._compile_decode else TitansLM._decode_graph
        logits, steps = graph(self, standard_strides(input_ids), steps)
        if not bool(torch.isfinite(logits).all()):
            return None  # the general path checks every block's input and names what is not finite
        layers = [b.state_after_step(s, step) for b, s, step in zip(self.blocks, state.layers, steps)]
        return logits, ModelState(layers=layers, position=state.position + 1, fingerprint=self.state_fingerprint())

    def _decode_graph(self, input_ids: Tensor, steps: list) -> tuple[Tensor, list]:
        """The tensor math of ``_decode_step``: embedding, each block's ``step``, head."""
        x = self.embed(input_ids)  # (B, 1, dim)
        out = []
        for block, step in zip(self.blocks, steps):
            x, step = block.step(x, step)
            out.append(step)
        return self.head(self.norm(x)), out

    def set_memory_compile(self, enabled: bool = True) -> "TitansLM":
        """Run every neural memory's chunk computations (forward and analytic backward) through
        ``torch.compile``, or back in eager mode. A runtime choice, not part of the config: the
        first calls compile (tens of seconds on CPU, again for a new chunk length or batch), later
        ones are faster (docs/speed.md; ``benchmarks/model_throughput.py --compile``).
        The attention variants have no memory and are unaffected. Returns the model."""
        for module in self.modules():
            if isinstance(module, NeuralMemory):
                module.use_compile = bool(enabled)
        self._compile_decode = bool(enabled)
        return self

    def generate(self, input_ids: Tensor, max_new_tokens: int, **kwargs):
        """Prefill in parallel, then decode one token at a time with the state; see
        ``titans.inference.generation.generate`` for the sampling options. Returns
        ``(ids, state)``."""
        from .inference.generation import generate

        return generate(self, input_ids, max_new_tokens, **kwargs)


_COMPILED_DECODE: list = []


def _decode_graph_compiled(model: TitansLM, *args):
    """``TitansLM._decode_graph`` through ``torch.compile``, built on first use and shared by
    every model (parameters are graph inputs; models of one shape share the graph)."""
    if not _COMPILED_DECODE:
        # decompose_mm_pass: a product of up to 4 rows (every projection of one token, the
        # persistent keys, the memory's per-head products) becomes a fused multiply-and-sum kernel
        # instead of a BLAS call, whose per-call overhead dominates products this small on CPU
        # (docs/speed.md)
        options = {"post_grad_fusion_options": {"decompose_mm_pass": {"cpu_max_first_dimension_decomposition": 4}}}
        _COMPILED_DECODE.append(torch.compile(TitansLM._decode_graph, dynamic=False, options=options))
    return _COMPILED_DECODE[0](model, *args)
