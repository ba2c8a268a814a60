"""Hugging Face interop (titans.hf): config, save_pretrained / from_pretrained round trip through
the Auto classes, HF loss == TitansLM loss, HF generate() == our generate() with our state as the
cache (prompt read once, then one token a step), continuing from a ModelState, errors."""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from titans.hf import TitansForCausalLM, TitansHFConfig  # noqa: E402
from titans.model import ModelState, TitansConfig, TitansLM  # noqa: E402

hf_logging.disable_progress_bar()

SMALL = dict(vocab_size=40, dim=32, depth=2, heads=2, window=6, segment=6, memory_chunk=4,
             persistent_tokens=2, memory_expansion=2.0)  # fmt: skip


def _config(variant, **kw):
    return TitansHFConfig(variant=variant, **{**SMALL, **kw})


def _model(variant, seed=0, **kw):
    torch.manual_seed(seed)
    return TitansForCausalLM(_config(variant, **kw)).eval()


def _ids(B=2, T=9, seed=0):
    return torch.randint(0, 40, (B, T), generator=torch.Generator().manual_seed(seed))


def _record_lengths(model):
    """Wrap the inner TitansLM's forward; returns the list of input lengths it sees."""
    lengths, orig = [], model.model.forward

    def recording(input_ids, labels=None, state=None, logits_to_keep=0):
        lengths.append(input_ids.shape[1])
        return orig(input_ids, labels, state, logits_to_keep)

    model.model.forward = recording
    return lengths


def test_config_carries_every_titans_field():
    cfg = TitansConfig(variant="mag", memory_heads=1, memory_depth=1, memory_residual=True,
                       tie_embeddings=False, **SMALL)  # fmt: skip
    hf = TitansHFConfig.from_titans_config(cfg, eos_token_id=3, pad_token_id=0)
    assert hf.to_titans_config() == cfg
    assert hf.tie_word_embeddings is False and hf.tie_embeddings is False
    assert (hf.hidden_size, hf.num_hidden_layers, hf.num_attention_heads) == (32, 2, 2)
    assert (hf.eos_token_id, hf.pad_token_id, hf.bos_token_id) == (3, 0, None)
    again = TitansHFConfig.from_dict(hf.to_dict())
    assert again.to_titans_config() == cfg and again.eos_token_id == 3
    assert TitansHFConfig(tie_embeddings=False).tie_word_embeddings is False
    with pytest.raises(ValueError, match="variant"):
        TitansHFConfig(variant="rnn")
    with pytest.raises(ValueError, match="contradicts"):
        TitansHFConfig(tie_word_embeddings=True, tie_embeddings=False)


def test_fresh_model_keeps_titans_initialisation():
    """HF's generic init pass must not overwrite TitansLM's own (same seed -> same weights)."""
    hf = _model("mac", seed=3)
    torch.manual_seed(3)
    ref = TitansLM(_config("mac").to_titans_config())
    ref_sd = ref.state_dict()
    assert all(torch.equal(v, ref_sd[k]) for k, v in hf.model.state_dict().items())
    assert hf.model.head.weight is hf.model.embed.weight


@pytest.mark.parametrize(
    "variant, kw",
    [("mac", {}), ("mag", {}), ("transformer", {}), ("lmm", {"tie_embeddings": False}),
     ("lmm", {"memory_feature_degree": 2, "memory_window": 3, "memory_objective": "huber"}),
     ("mag", {"memory_muon_steps": 3}), ("mac", {"memory_gate_kernel": 3})],
)
def test_save_pretrained_from_pretrained_round_trip(tmp_path, variant, kw):
    model = _model(variant, **kw)
    ids = _ids(T=13)
    model.save_pretrained(tmp_path)
    files = list(tmp_path.glob("*.safetensors"))
    assert files, sorted(p.name for p in tmp_path.iterdir())
    saved = {k for f in files for k in load_file(str(f))}
    assert ("model.head.weight" in saved) == (not model.config.tie_word_embeddings)
    assert (
        AutoConfig.from_pretrained(tmp_path).to_titans_config() == model.config.to_titans_config()
    )
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is TitansForCausalLM and not loaded.training
    assert (
        loaded.model.head.weight is loaded.model.embed.weight
    ) == model.config.tie_word_embeddings
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_missing_checkpoint_weights_get_titans_initialisation(tmp_path):
    model = _model("mac")
    model.save_pretrained(tmp_path)
    (f,) = tmp_path.glob("*.safetensors")
    sd = load_file(str(f))
    gone = ("model.norm.weight", "model.blocks.0.memory.to_theta.bias")
    save_file({k: v for k, v in sd.items() if k not in gone}, str(f), metadata={"format": "pt"})
    loaded = TitansForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(loaded.model.norm.weight, torch.ones(32))
    theta_bias = model.model.blocks[0].memory.to_theta.bias  # a constant set by NeuralMemory's init
    assert torch.equal(loaded.model.blocks[0].memory.to_theta.bias, theta_bias)
    kept = {k: v for k, v in model.state_dict().items() if k not in gone}
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in kept.items())


def test_a_checkpoint_without_the_gates_convolution_loads_with_the_starting_taps(tmp_path):
    """A model saved without gate_kernel, loaded with it: the new taps read the current token
    alone (NeuralMemory's init, not PyTorch's random Conv1d init), so the logits are the saved
    model's."""
    model = _model("mag")
    model.save_pretrained(tmp_path)
    loaded = TitansForCausalLM.from_pretrained(tmp_path, memory_gate_kernel=3)
    taps = loaded.model.blocks[0].memory.gate_conv.weight
    assert torch.equal(taps[:, 0, -1], torch.ones(32)) and not taps[:, 0, :-1].any()
    ids = _ids(T=13)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("variant", ["mac", "transformer"])
def test_loss_equals_titans_loss(variant):
    model = _model(variant)
    ids = _ids(T=11)
    labels = ids.clone()
    labels[0, 4:7] = -100
    out = model(ids, labels=labels)
    _, ref_loss, _ = model.model(ids, labels=labels)
    assert torch.equal(out.loss, ref_loss)
    logits = out.logits
    manual = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten()
    )
    assert torch.allclose(out.loss, manual)
    out.loss.backward()  # trainable through the wrapper
    assert model.model.embed.weight.grad is not None
    # HF Trainer's gradient accumulation: summed loss over num_items_in_batch
    n = int((labels[:, 1:] != -100).sum())
    with torch.no_grad():
        acc = model(ids, labels=labels, num_items_in_batch=torch.tensor(2 * n)).loss
    assert torch.allclose(acc, ref_loss.detach() / 2)
    # logits_to_keep (generate()'s prefill) matches the full logits' tail and refuses labels on both paths
    with torch.no_grad():
        tail = model(ids, logits_to_keep=torch.tensor(3)).logits
    assert tail.shape[1] == 3 and torch.allclose(tail, logits[:, -3:].detach())
    for extra in ({}, {"num_items_in_batch": torch.tensor(n)}):
        with pytest.raises(ValueError, match="labels=None"):
            model(ids, labels=labels, logits_to_keep=1, **extra)


def test_forward_state_and_tuple_output():
    model = _model("mag")
    ids = _ids(T=12)
    with torch.no_grad():
        full = model(ids)
        first = model(ids[:, :7])
        rest = model(ids[:, 7:], past_key_values=first.past_key_values)
        assert isinstance(first.past_key_values, ModelState) and rest.past_key_values.position == 12
        assert torch.allclose(rest.logits, full.logits[:, 7:], atol=1e-5)
        assert model(ids, use_cache=False).past_key_values is None
        logits, state = model(ids, return_dict=False)
        assert torch.equal(logits, full.logits) and isinstance(state, ModelState)


@pytest.mark.parametrize("variant", ["mac", "mag", "lmm", "swa"])
def test_greedy_generate_equals_titans_generate(variant):
    model = _model(variant)
    prompt = _ids(T=9, seed=1)
    lengths = _record_lengths(model)
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                         max_new_tokens=8, pad_token_id=0)  # fmt: skip
    assert lengths == [9] + [1] * 7  # the prompt once, then each new token (the last is not fed)
    ref, _ = model.model.generate(prompt, 8, temperature=0)
    assert torch.equal(out, ref)


def test_generate_without_cache_recomputes_the_prefix():
    model = _model("swa")
    prompt = _ids(T=5, seed=5)
    lengths = _record_lengths(model)
    kw = {"attention_mask": torch.ones_like(prompt), "do_sample": False, "max_new_tokens": 4}
    out = model.generate(prompt, use_cache=False, pad_token_id=0, **kw)
    assert lengths == [5, 6, 7, 8]
    assert torch.equal(out, model.model.generate(prompt, 4, temperature=0)[0])
    with pytest.raises(ValueError, match="use_cache"):
        model.generate(prompt, past_key_values=ModelState(), use_cache=False, pad_token_id=0, **kw)


def test_generate_returns_our_state_and_samples():
    model = _model("mal")
    prompt = _ids(T=5, seed=2)
    lengths = _record_lengths(model)
    torch.manual_seed(0)
    res = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, top_k=5,
                         max_new_tokens=6, pad_token_id=0, return_dict_in_generate=True)  # fmt: skip
    assert lengths == [5] + [1] * 5 and res.sequences.shape == (2, 11)
    state = res.past_key_values
    assert isinstance(state, ModelState) and state.position == 10  # read all but the last token


def test_generate_continues_from_a_model_state():
    """As with any HF cache: input_ids holds the whole sequence; only the unread part is fed."""
    model = _model("mac")
    doc, question = _ids(B=1, T=14, seed=3), _ids(B=1, T=4, seed=4)
    full = torch.cat([doc, question], 1)
    kw = {"attention_mask": torch.ones_like(full), "do_sample": False, "max_new_tokens": 5}
    kw["pad_token_id"] = 0
    direct = model.generate(full, **kw)
    with torch.no_grad():
        state = model(doc).past_key_values
    lengths = _record_lengths(model)
    later = model.generate(full, past_key_values=state, **kw)
    assert lengths == [4, 1, 1, 1, 1]
    assert torch.equal(later, direct)


def test_unsupported_inputs_raise():
    model = _model("mac")
    ids = _ids(T=6)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding
    with pytest.raises(ValueError, match="left padding"):
        model(ids, attention_mask=mask)
    right = torch.ones_like(ids)
    right[0, -2:] = 0  # right padding is harmless for a causal model
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=right).logits, model(ids).logits)
    with pytest.raises(ValueError, match="only supports"):
        model.generate(ids, num_beams=2, max_new_tokens=2, pad_token_id=0)
    with pytest.raises(TypeError, match="ModelState"):
        model(ids, past_key_values=((torch.zeros(1),),))
    with pytest.raises(NotImplementedError, match="inputs_embeds"):
        model(inputs_embeds=torch.zeros(2, 6, 32))


def test_from_titans_wraps_a_trained_model():
    torch.manual_seed(0)
    lm = TitansLM(TitansConfig(variant="lmm", **SMALL)).double()
    hf = TitansForCausalLM.from_titans(lm, eos_token_id=1)
    ids = _ids(T=8)
    assert hf.config.eos_token_id == 1 and hf.dtype == torch.float64
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, lm(ids)[0])


def test_registration_is_idempotent():
    import titans.hf

    titans.hf._register()
    titans.hf._register()
    assert isinstance(AutoConfig.for_model("titans", **SMALL), TitansHFConfig)


def test_import_without_transformers_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    monkeypatch.delitem(sys.modules, "titans.hf")  # restored (the real module) after the test
    with pytest.raises(ImportError, match=re.escape("pip install 'titans-ltm[hf]'")):
        importlib.import_module("titans.hf")


def test_nothing_else_imports_transformers():
    root = Path(__file__).resolve().parents[1] / "titans"
    pattern = re.compile(r"^\s*(import|from)\s+transformers\b", re.MULTILINE)
    offenders = [
        p.name for p in root.rglob("*.py") if p.name != "hf.py" and pattern.search(p.read_text())
    ]
    assert offenders == []


def test_an_lmm_exported_without_persistent_tokens_is_refused_with_the_way_to_load_it(tmp_path):
    """transformers would draw the missing tokens at random and only warn, changing what the
    trained model computes."""
    import json

    from titans.train.checkpoint import CheckpointError

    model = _model("lmm", persistent_tokens=0)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "persistent_tokens": 4}))
    with pytest.raises(CheckpointError, match=r"no persistent tokens.*asks for 4.*persistent_tokens=0"):
        TitansForCausalLM.from_pretrained(tmp_path)
    loaded = TitansForCausalLM.from_pretrained(tmp_path, persistent_tokens=0)
    ids = _ids()
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    again, info = TitansForCausalLM.from_pretrained(tmp_path, persistent_tokens=0, output_loading_info=True)
    assert not info["missing_keys"] and isinstance(again, TitansForCausalLM)
