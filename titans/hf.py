"""Optional Hugging Face ``transformers`` interop: config, causal-LM wrapper, Auto* registration.

    pip install 'titans-ltm[hf]'

    from titans.hf import TitansHFConfig, TitansForCausalLM      # registers model_type "titans"
    model = TitansForCausalLM(TitansHFConfig(variant="mac", dim=128, depth=2, heads=4))
    model.save_pretrained("ckpt")                                 # config.json + model.safetensors
    model = AutoModelForCausalLM.from_pretrained("ckpt")
    out = model(input_ids, labels=input_ids)                      # CausalLMOutputWithPast
    ids = model.generate(input_ids, max_new_tokens=32, do_sample=False)

The wrapped ``TitansLM`` is ``model.model``; a trained one can be exported with
``TitansForCausalLM.from_titans(lm)``. The cache (``past_key_values``) is the model's own recurrent
``ModelState``: ``generate()`` reads the prompt once, then feeds one token per step with the state,
never re-reading the prefix. A ``ModelState`` (e.g. from ``titans.inference.state_io.load_state``)
can be passed to ``generate(past_key_values=state)`` with, as for any HF cache, ``input_ids``
holding the whole sequence (the tokens the state has read, then the new ones).

Supported generation modes: greedy and multinomial sampling (the recurrent state cannot be
reordered across beams nor rolled back for assisted decoding). No left padding: the state reads
every token it is given, so a batch of prompts must have equal lengths. Nothing else in ``titans``
imports ``transformers``.
"""

from __future__ import annotations

import warnings
from dataclasses import fields
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:
    import transformers
    from packaging.version import Version
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        GenerationMixin,
        PretrainedConfig,
        PreTrainedModel,
    )
    from transformers.generation.configuration_utils import GenerationMode
    from transformers.modeling_outputs import CausalLMOutputWithPast
except ImportError as exc:  # pragma: no cover - exercised by a test that hides transformers
    raise ImportError(
        "titans.hf needs Hugging Face transformers (>= 4.40): pip install 'titans-ltm[hf]'"
    ) from exc

if Version(transformers.__version__) < Version("4.40"):  # pragma: no cover
    raise ImportError(
        f"titans.hf needs transformers >= 4.40, found {transformers.__version__}: pip install -U 'titans-ltm[hf]'"
    )

from .layers.attention import PersistentMemory
from .layers.features import PolynomialFeatures
from .layers.neural_memory import NeuralMemory
from .model import FORMER_DEFAULTS, ModelState, TitansConfig, TitansLM

__all__ = ["TitansForCausalLM", "TitansHFConfig"]

_TRANSFORMERS_V5 = Version(transformers.__version__) >= Version("5.0.0.dev0")
_TITANS_DEFAULTS = {f.name: f.default for f in fields(TitansConfig)}


class TitansHFConfig(PretrainedConfig):
    """Every ``TitansConfig`` field as an attribute, plus the usual HF ones. ``tie_word_embeddings``
    is ``TitansConfig.tie_embeddings`` (``config.tie_embeddings`` reads and writes it too);
    ``hidden_size`` / ``num_hidden_layers`` / ``num_attention_heads`` alias ``dim`` / ``depth`` /
    ``heads``. The Titans fields are validated by ``TitansConfig`` on construction."""

    model_type = "titans"
    keys_to_ignore_at_inference = ["past_key_values"]
    attribute_map = {
        "tie_embeddings": "tie_word_embeddings",
        "hidden_size": "dim",
        "num_hidden_layers": "depth",
        "num_attention_heads": "heads",
    }

    def __init__(
        self,
        tie_word_embeddings: bool | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        use_cache: bool = True,
        **kwargs,
    ) -> None:
        tie_alias = kwargs.pop("tie_embeddings", None)
        if (
            tie_word_embeddings is not None
            and tie_alias is not None
            and bool(tie_word_embeddings) != bool(tie_alias)
        ):
            raise ValueError(
                f"tie_word_embeddings={tie_word_embeddings} contradicts tie_embeddings={tie_alias} (the same setting)"
            )
        tie = tie_word_embeddings if tie_word_embeddings is not None else tie_alias
        tie = _TITANS_DEFAULTS["tie_embeddings"] if tie is None else bool(tie)
        titans = {k: kwargs.pop(k, v) for k, v in _TITANS_DEFAULTS.items() if k != "tie_embeddings"}
        TitansConfig(**titans, tie_embeddings=tie)  # validate now, with TitansConfig's messages
        for k, v in titans.items():
            setattr(self, k, v)
        self.use_cache = use_cache
        super().__init__(
            tie_word_embeddings=tie,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            **kwargs,
        )

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """A saved config.json (``from_pretrained`` reads through here): a Titans field it lacks
        takes the value it had when it was saved (``FORMER_DEFAULTS``), not today's default."""
        return super().from_dict({**FORMER_DEFAULTS, **config_dict}, **kwargs)

    def to_titans_config(self) -> TitansConfig:
        d = {k: getattr(self, k) for k in _TITANS_DEFAULTS if k != "tie_embeddings"}
        return TitansConfig.from_dict({**d, "tie_embeddings": bool(self.tie_word_embeddings)})

    @classmethod
    def from_titans_config(cls, cfg: TitansConfig, **kwargs) -> TitansHFConfig:
        """``kwargs``: HF fields such as ``eos_token_id``."""
        return cls(**cfg.to_dict(), **kwargs)


class _GenerationCache:
    """The cache HF's ``generate()`` carries between steps: our ``ModelState`` (``None`` before the
    prompt), with the few things generate asks of a cache (how many tokens it has read, that it
    can be neither compiled nor cropped). ``generate()`` hands the bare ``ModelState`` back."""

    is_compileable = False
    is_croppable = False
    # transformers 5.2x: a cache whose layers are all "linear" (recurrent) gets no count of new
    # tokens; ours wants it (get_seq_length is exact), so it reports as one attention-like layer
    is_linear = (False,)

    def __init__(self, state: ModelState | None) -> None:
        self.state = state

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        return 0 if self.state is None else self.state.position


# transformers 5.2x calls the cache ``cache`` (``past_key_values`` is its deprecated alias, still
# read on outputs); 4.x calls it ``past_key_values``. We take either name and write the current one.
_CACHE = "cache" if "cache" in {f.name for f in fields(CausalLMOutputWithPast)} else "past_key_values"


def _one_cache(past_key_values, cache):
    if past_key_values is not None and cache is not None:
        raise ValueError("pass the state as past_key_values or as cache, not both")
    return cache if past_key_values is None else past_key_values


def _as_state(past) -> ModelState | None:
    if past is None or isinstance(past, ModelState):
        return past
    if isinstance(past, _GenerationCache):
        return past.state
    raise TypeError(
        "past_key_values must be a titans ModelState (the recurrent state returned by a previous call), "
        f"got {type(past).__name__}"
    )


def _check_attention_mask(mask: Tensor | None) -> None:
    """Right padding is harmless (causal model; pad the labels with -100), left padding or holes are
    not: the recurrent state reads every token it is given."""
    if mask is None:
        return
    if mask.dim() != 2:
        raise ValueError(f"attention_mask must be [batch, time], got shape {tuple(mask.shape)}")
    m = mask.bool()
    if bool((~m[:, :-1] & m[:, 1:]).any()):
        raise ValueError(
            "titans models do not support left padding (nor masked tokens followed by real ones): the "
            "recurrent state reads every token. Use prompts of equal length, or right padding for "
            "training. Without padding, pass attention_mask=torch.ones_like(input_ids) to generate(), "
            "which otherwise takes every pad_token_id in the prompt for padding."
        )


def _normal_init(module: nn.Module, std: float) -> None:
    nn.init.normal_(module.weight, std=std)
    if getattr(module, "bias", None) is not None:
        nn.init.zeros_(module.bias)


def _titans_init_plan(lm: TitansLM) -> dict:
    """module -> how ``TitansLM`` initialises its own parameters: its constructor's rule for the
    Linear / Embedding layers (normal(init_std), except the neural memories' ``to_*``), the neural
    memories' own init for their gates, the gates' convolution and M_0, PyTorch's default for the
    rest."""
    owners, gate_taps = {}, {}
    for m in lm.modules():
        if isinstance(m, NeuralMemory) and m.gate_kernel:  # starts at the current token (gate_kernel)
            gate_taps[m.gate_conv] = m.reset_gate_taps
        if isinstance(m, NeuralMemory):
            for child in (m.to_theta, m.to_eta, m.to_alpha, m.to_delta, m.to_gamma, m.initial_weights):
                if child is not None:
                    owners[child] = m
    plan = {}
    for name, m in lm.named_modules():
        if isinstance(m, (nn.Linear, nn.Embedding)) and ".memory.to_" not in f".{name}":
            plan[m] = partial(_normal_init, m, lm.cfg.init_std)
        elif m in owners:
            plan[m] = owners[m].reset_parameters
        elif m in gate_taps:
            plan[m] = gate_taps[m]
        elif isinstance(m, PersistentMemory):
            plan[m] = partial(nn.init.normal_, m.tokens, std=0.02)
        elif isinstance(m, PolynomialFeatures):
            plan[m] = m.reset_parameters
        elif isinstance(m, (nn.Linear, nn.Embedding, nn.Conv1d, nn.RMSNorm)):
            plan[m] = m.reset_parameters
    return plan


def _own_aligned_storage(model: nn.Module) -> None:
    """Give CPU parameters loaded as views into one checkpoint buffer (unaligned) their own,
    aligned memory: CPU kernels take other vector paths on unaligned data, so the logits would
    differ from the saved model's in the last bit. Tied parameters stay tied (same Parameter)."""
    for p in model.parameters():
        if p.device.type == "cpu" and type(p.data) is Tensor and p.data_ptr() % 64:
            p.data = p.data.clone(memory_format=torch.contiguous_format)


def _check_loading_info(config: TitansHFConfig, info: dict, source) -> None:
    """Refuse an LMM exported before the LMM read persistent tokens, loaded with a config that
    asks for them: its tokens would be drawn at random, changing what the trained model computes.
    Other missing weights follow the transformers convention (initialised as TitansLM does, with
    transformers' report), which fine-tuning from a partial checkpoint relies on."""
    from .train.checkpoint import CheckpointError

    missing = sorted(info.get("missing_keys") or ())
    if config.variant == "lmm" and any(".persistent." in name for name in missing):
        raise CheckpointError(
            f"{source}: this LMM checkpoint has no persistent tokens (saved before the LMM read them) but its "
            f"config asks for {config.persistent_tokens}; load it with "
            f"TitansForCausalLM.from_pretrained(path, persistent_tokens=0)"
        )


class TitansForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = TitansHFConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _input_embed_layer = "embed"
    # transformers 5 maps tied target -> source; 4.x lists the tied (target) keys.
    _tied_weights_keys = (
        {"model.head.weight": "model.embed.weight"} if _TRANSFORMERS_V5 else ["model.head.weight"]
    )
    _no_split_modules = ["MACBlock", "MAGBlock", "MALBlock", "LMMBlock", "AttentionBlock"]
    # The cache is our recurrent ModelState, not an HF Cache: no DynamicCache, no beam reordering,
    # no rollback (assisted decoding).
    _is_stateful = True
    _supports_cache_class = False  # transformers 4.x
    _supported_generation_modes = (
        GenerationMode.GREEDY_SEARCH,
        GenerationMode.SAMPLE,
    )  # transformers 5

    def __init__(self, config: TitansHFConfig) -> None:
        super().__init__(config)
        self.model = TitansLM(config.to_titans_config())
        self.post_init()

    @classmethod
    def from_titans(cls, lm: TitansLM, **config_kwargs) -> TitansForCausalLM:
        """Wrap (a copy of the weights of) a trained ``TitansLM``; ``config_kwargs``: HF fields such
        as ``eos_token_id``."""
        model = cls(TitansHFConfig.from_titans_config(lm.cfg, **config_kwargs))
        p = next(lm.parameters())
        model.to(device=p.device, dtype=p.dtype)
        model.model.load_state_dict(lm.state_dict())
        return model

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """``PreTrainedModel.from_pretrained``; an LMM saved without persistent tokens is refused
        unless loaded with ``persistent_tokens=0`` (``_check_loading_info``). Weights are read
        from safetensors only: a ``pytorch_model.bin`` (a pickle) is refused unless the caller
        passes ``use_safetensors=False``, which unpickles it (restricted to tensors by torch)."""
        kwargs.setdefault("use_safetensors", True)
        wants_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        _check_loading_info(model.config, info, args[0] if args else kwargs.get("pretrained_model_name_or_path"))
        _own_aligned_storage(model)
        return (model, info) if wants_info else model

    # ---- weights ------------------------------------------------------------------------------

    def init_weights(self):
        """``TitansLM`` initialises its parameters as it is built, with its own scheme (memory
        gates from theta/eta/alpha, M_0, ...): a new model is only tied here, HF's generic pass
        would overwrite that. Weights missing from a checkpoint go through ``_init_weights``."""
        self.tie_weights()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Initialise ``module`` as ``TitansLM`` and its layers do (HF calls this for modules whose
        weights a checkpoint lacks; transformers 5 guards ``torch.nn.init`` so loaded ones stay)."""
        init = _titans_init_plan(self.model).get(module)
        if init is not None:
            init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embed = value

    def get_output_embeddings(self) -> nn.Module:
        return self.model.head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.model.head = value

    # ---- forward ------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: Tensor | None = None,
        labels: Tensor | None = None,
        past_key_values: ModelState | None = None,
        use_cache: bool | None = True,
        return_dict: bool | None = True,
        attention_mask: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        cache: ModelState | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ):
        """``input_ids`` ``[B, T]``: the tokens after those ``past_key_values`` (or ``cache``, its
        name in transformers >= 5.2x: a ``ModelState``)
        has read. ``labels`` ``[B, T]`` are aligned with ``input_ids`` and shifted inside (HF
        convention; -100 is ignored). Returns ``CausalLMOutputWithPast`` whose ``past_key_values``
        is the ``ModelState`` after ``input_ids`` (None when ``use_cache=False``).
        ``attention_mask`` may only mark right padding; ``position_ids`` and other HF extras are
        ignored (positions come from the state). ``logits_to_keep`` (k > 0: logits of the last k
        positions only, as ``generate()`` asks for while prefilling) needs ``labels=None``."""
        if inputs_embeds is not None:
            raise NotImplementedError("titans models take input_ids, not inputs_embeds")
        if input_ids is None:
            raise ValueError("input_ids is required")
        _check_attention_mask(attention_mask)
        past_key_values = _one_cache(past_key_values, cache)
        state = _as_state(past_key_values)
        use_cache = getattr(self.config, "use_cache", True) if use_cache is None else use_cache
        return_dict = (
            getattr(self.config, "return_dict", True) if return_dict is None else return_dict
        )

        if isinstance(logits_to_keep, Tensor):
            if logits_to_keep.numel() != 1:
                raise NotImplementedError("logits_to_keep as a tensor of positions; pass a count")
            logits_to_keep = int(logits_to_keep)
        n_items = kwargs.get("num_items_in_batch")  # HF Trainer, gradient accumulation
        if labels is not None and n_items is not None:
            if logits_to_keep:  # as TitansLM refuses it in the other branch
                raise ValueError("logits_to_keep needs labels=None: the loss is over every position's logits")
            logits, _, new_state = self.model(input_ids, state=state)
            loss = (
                F.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                    labels[:, 1:].reshape(-1).to(logits.device),
                    ignore_index=-100,
                    reduction="sum",
                )
                / n_items
            )
        else:
            logits, loss, new_state = self.model(input_ids, labels=labels, state=state, logits_to_keep=logits_to_keep)
        past = new_state if use_cache else None
        if past is not None and isinstance(past_key_values, _GenerationCache):
            past = _GenerationCache(past)  # inside generate()
        if not return_dict:
            out = (logits,) + ((past,) if past is not None else ())
            return ((loss,) + out) if loss is not None else out
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE: past})

    # ---- generation ---------------------------------------------------------------------------

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # our cache is the ModelState our forward returns

    def generate(self, *args, past_key_values=None, cache=None, **kwargs):
        """HF ``generate``; ``past_key_values`` may be a ``ModelState`` to continue from (then
        ``input_ids`` is the whole sequence: the tokens the state has read, then new ones). With
        ``return_dict_in_generate=True``, ``past_key_values`` is the ``ModelState`` at the end.
        ``cache`` is the same argument under its transformers-5 name."""
        past_key_values = _one_cache(past_key_values, cache)
        if past_key_values is not None and not isinstance(past_key_values, ModelState):
            raise TypeError(
                f"past_key_values must be a titans ModelState, got {type(past_key_values).__name__}"
            )
        gen_config = kwargs.get("generation_config") or self.generation_config
        use_cache = kwargs.get("use_cache", getattr(gen_config, "use_cache", True))
        if use_cache is False:
            if past_key_values is not None:
                raise ValueError("continuing from past_key_values needs use_cache=True")
        else:
            kwargs[_CACHE] = _GenerationCache(past_key_values)
        out = super().generate(*args, **kwargs)
        if isinstance(getattr(out, _CACHE, None), _GenerationCache):
            setattr(out, _CACHE, getattr(out, _CACHE).state)
        return out

    def prepare_inputs_for_generation(
        self,
        input_ids: Tensor,
        past_key_values=None,
        attention_mask: Tensor | None = None,
        cache=None,
        inputs_embeds: Tensor | None = None,
        next_sequence_length: int | None = None,
        use_cache: bool = True,
        **kwargs,
    ) -> dict:
        """Only the tokens the state has not read: the whole prompt first, then one token a step."""
        past_key_values = _one_cache(past_key_values, cache)
        if inputs_embeds is not None:
            raise NotImplementedError("titans models take input_ids, not inputs_embeds")
        state = _as_state(past_key_values)
        if state is not None:
            if next_sequence_length is not None:  # transformers 5 tells how many are new
                new = next_sequence_length
            else:  # 4.x: the attention mask (or input_ids) spans the whole sequence
                total = (
                    attention_mask.shape[1] if attention_mask is not None else input_ids.shape[1]
                )
                new = total - state.position
            new = min(new, input_ids.shape[1])
            if new < 1:
                raise ValueError(
                    f"the state has read {state.position} tokens; pass the whole sequence (those tokens, "
                    "then the new ones) as input_ids"
                )
            input_ids = input_ids[:, -new:]
        if input_ids.device != self.device and self.device.type != "meta":
            input_ids = input_ids.to(self.device)
        inputs = {
            "input_ids": input_ids.contiguous(),
            "past_key_values": past_key_values,
            "use_cache": use_cache,
        }
        if attention_mask is not None:
            inputs["attention_mask"] = attention_mask
        return inputs


def _register() -> None:
    """Map model_type "titans" to these classes for the Auto* factories. Registering again (a
    second call, ``importlib.reload``) simply maps "titans" to the current classes; transformers
    only refuses a name one of its own models uses, and then we warn instead of failing."""
    try:
        AutoConfig.register("titans", TitansHFConfig)
        AutoModelForCausalLM.register(TitansHFConfig, TitansForCausalLM)
    except ValueError as exc:  # pragma: no cover - only if transformers ships its own "titans"
        warnings.warn(
            f"titans.hf could not register model_type 'titans' with the Auto classes ({exc}); "
            "use TitansHFConfig / TitansForCausalLM directly",
            stacklevel=2,
        )


_register()
