"""Generation: prefill + decode with the state equals re-running the whole prefix (greedy), never
re-reads the prefix, samples within top-k/top-p, stops at eos, continues from a saved state."""

from __future__ import annotations

import pytest
import torch

from titans.inference.generation import generate, sample_next
from titans.inference.state_io import load_state, save_state
from titans.model import TitansConfig, TitansLM


def _model(variant):
    torch.manual_seed(0)
    cfg = TitansConfig(variant=variant, vocab_size=40, dim=32, depth=2, heads=2, window=6, segment=6,
                       memory_chunk=4, persistent_tokens=2, memory_expansion=2.0)  # fmt: skip
    return TitansLM(cfg).double().eval()


@pytest.mark.parametrize("variant", ["mac", "mag", "mal", "lmm", "swa", "transformer"])
def test_greedy_generation_equals_full_recompute(variant):
    model = _model(variant)
    prompt = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(0))
    ids, state = model.generate(prompt, 12, temperature=0)
    assert ids.shape == (2, 21) and state.position == 21  # the state has read every token
    # The slow way: re-run the whole prefix for every new token.
    ref = prompt
    with torch.no_grad():
        for _ in range(12):
            nxt = model(ref)[0][:, -1].argmax(-1, keepdim=True)
            ref = torch.cat([ref, nxt], 1)
    assert torch.equal(ids, ref)


def test_decoding_reads_each_token_once():
    model = _model("mac")
    calls = []
    orig = model.forward

    def counting(input_ids, labels=None, state=None, logits_to_keep=0):
        calls.append(input_ids.shape[1])
        return orig(input_ids, labels, state, logits_to_keep)

    model.forward = counting
    generate(model, torch.zeros(1, 10, dtype=torch.long), 5, temperature=0)
    assert calls == [10, 1, 1, 1, 1, 1]  # the prompt once, then each new token once


def test_continue_from_saved_state(tmp_path):
    model = _model("mag")
    doc = torch.randint(0, 40, (1, 30), generator=torch.Generator().manual_seed(1))
    question = torch.randint(0, 40, (1, 4), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        _, _, state = model(doc)
    save_state(state, tmp_path / "doc")
    ids_direct, state_direct = model.generate(torch.cat([doc, question], 1), 6, temperature=0)
    loaded, _ = load_state(tmp_path / "doc")
    ids_later, state_later = model.generate(question, 6, temperature=0, state=loaded)
    assert torch.equal(ids_later[:, 4:], ids_direct[:, 34:])
    assert state_later.position == state_direct.position == 40


def test_sampling_options():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 10.0]])
    assert sample_next(logits, temperature=0).item() == 4
    for _ in range(20):
        assert sample_next(logits, top_k=2, generator=g).item() in (3, 4)
        assert sample_next(logits, top_p=0.5, generator=g).item() == 4
    with pytest.raises(ValueError, match="temperature"):
        sample_next(logits, temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        sample_next(logits, top_p=0)
    with pytest.raises(ValueError, match="top_k"):
        sample_next(logits, top_k=0)


def test_eos_stops_generation():
    model = _model("lmm")
    prompt = torch.zeros(2, 3, dtype=torch.long)
    first, _ = model.generate(prompt, 1, temperature=0)
    eos = int(first[0, -1])
    ids, _ = model.generate(prompt, 10, temperature=0, eos_token_id=eos)
    assert ids[0, 3].item() == eos
    if ids[1, 3].item() == eos:
        assert ids.shape[1] == 4  # both finished at once: stop early
