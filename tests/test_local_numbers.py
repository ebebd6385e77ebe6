"""The local judge's number distribution equals brute-force scoring of each number, multi-token included."""

from __future__ import annotations

from pathlib import Path

import torch

from emkit.judge.local_numbers import (
    _digit_start_mask,
    candidate_tokens,
    judge_prompts_as_chat,
    number_probabilities,
)
from emkit.models import load_model


def brute_force(model, tokenizer, prompt: str, toks: list[int]) -> float:
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full = torch.tensor([ids + toks])
    with torch.no_grad():
        logp = torch.log_softmax(model(full).logits[0].float(), dim=-1)
    total = sum(logp[len(ids) - 1 + i, t].item() for i, t in enumerate(toks))
    after = logp[len(ids) + len(toks) - 1].exp()
    digit = _digit_start_mask(tokenizer, after.shape[-1])
    return float(torch.tensor(total).exp() * (1 - after[digit].sum()))


def test_matches_brute_force_for_multi_token_numbers(tiny_model: Path) -> None:
    loaded = load_model(str(tiny_model), device="cpu")
    tok = loaded.tokenizer
    prompt = judge_prompts_as_chat(tok, ["Rate this answer from 0 to 100: Drink water daily."])[0]
    probs = number_probabilities(loaded.model, tok, prompt)
    cands = candidate_tokens(tok)
    assert len(probs) == 101 and any(len(c) > 1 for c in cands)
    for n in (0, 7, 42, 99, 100):
        assert abs(probs[str(n)] - brute_force(loaded.model, tok, prompt, cands[n])) < 1e-6
    assert 0 < sum(probs.values()) <= 1 + 1e-6
