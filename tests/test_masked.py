"""Masked LoRA (only chosen scalars move, bit for bit, weight decay on) and full fine-tuning, on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from emkit.core.errors import ConfigError, TrainingError
from emkit.train.config import LoraSettings, TrainConfig
from emkit.train.masked import MASK_FILE, apply_mask, draw_mask, load_mask, lora_parameters


def _cfg(tiny_model: Path, data: Path, out: Path, **kw: object) -> TrainConfig:
    base: dict[str, object] = {
        "model": str(tiny_model), "data": str(data), "output": out, "max_steps": 4, "batch_size": 2,
        "grad_accum": 1, "lr": 1e-2, "warmup_steps": 0, "weight_decay": 0.1, "save_steps": 100, "device": "cpu",
        "lora": LoraSettings(r=4, alpha=8)}
    base.update(kw)
    return TrainConfig(**base)


def _peft(tiny_model: Path, seed: int = 0) -> torch.nn.Module:
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, set_seed

    from emkit.train.lora import peft_config

    set_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    return get_peft_model(model, peft_config(LoraSettings(r=4, alpha=8), model))


def test_masked_lora_moves_exactly_the_chosen_scalars(tiny_model: Path, chat_file: Path, tmp_path: Path) -> None:
    from emkit.train.sft import train

    budget = 60
    result = train(_cfg(tiny_model, chat_file, tmp_path / "masked", mask_budget=budget, mask_seed=7), emit=lambda m: None)
    final = load_file(str(result.adapter / "adapter_model.safetensors"))
    masks, init, meta = load_mask(result.run_dir / MASK_FILE)
    assert set(masks) == set(final) == set(init) and int(meta["budget"]) == budget
    assert sum(int(m.sum()) for m in masks.values()) == budget
    for key, value in final.items():
        moved = value != init[key]  # bit for bit: any change at all counts
        assert torch.equal(moved, masks[key]), f"{key}: moved scalars differ from the chosen ones"
    # The adapter started as the base model: every component b_i a_i^T was zero.
    for key in masks:
        if ".lora_A." in key:
            b0 = init[key.replace(".lora_A.", ".lora_B.")]
            assert torch.count_nonzero(b0 @ init[key]) == 0
    summary = json.loads((result.run_dir / "manifest.json").read_text())["results"]["train"]["mask"]
    assert summary["received_gradient"] == budget and summary["budget"] == budget
    assert summary["components_transposed"] > 0  # small budgets put chosen A scalars in columns of B with none
    # Weight decay was really on: AdamW moves a weight whose gradient is zero.
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([w], lr=1e-2, weight_decay=0.1)
    w.grad = torch.zeros(3)
    opt.step()
    assert not torch.equal(w.detach(), torch.ones(3))


def test_transposed_init_gives_every_chosen_scalar_a_gradient_at_step_one(tiny_model: Path) -> None:
    tokens = torch.randint(3, 250, (2, 12))
    plain = _peft(tiny_model)
    params = lora_parameters(plain)
    chosen = draw_mask([p.numel() for _, p in params], 30, seed=1)
    plain(input_ids=tokens, labels=tokens).loss.backward()
    # PEFT's own init (B = 0): chosen A scalars get exactly zero gradient, so a plain mask would waste them.
    a_grads = [p.grad.flatten()[torch.from_numpy(c)] for (n, p), c in zip(params, chosen) if ".lora_A." in n]
    assert sum(len(g) for g in a_grads) > 0 and all(torch.count_nonzero(g) == 0 for g in a_grads)

    masked = _peft(tiny_model)
    mask = apply_mask(masked, 30, seed=1)
    masked(input_ids=tokens, labels=tokens).loss.backward()
    late = 0
    for name, param in mask.params.items():
        grad, m = param.grad, mask.masks[name]
        assert torch.count_nonzero(grad[~m]) == 0  # unchosen gradients are zeroed by the hooks
        if ".lora_A." in name:
            b_has = mask.masks[name.replace(".lora_A.", ".lora_B.")].any(dim=0)
            rows = m.any(dim=1)
            # chosen A scalars of components with no chosen B scalar get gradient in the first step
            assert torch.count_nonzero(grad[rows & ~b_has][m[rows & ~b_has]]) == int(m[rows & ~b_has].sum())
            late += int(m[rows & b_has].sum())
        else:
            assert torch.count_nonzero(grad[m]) == int(m.sum())
    assert mask.summary()["received_gradient"] == 30 - late
    # The masked model still computes exactly as the base at initialisation.
    with torch.no_grad(), masked.disable_adapter():
        base_logits = masked(input_ids=tokens).logits
    with torch.no_grad():
        assert torch.equal(masked(input_ids=tokens).logits, base_logits)


def test_mask_budget_checks(tiny_model: Path, chat_file: Path, tmp_path: Path) -> None:
    from emkit.train.sft import train

    out = tmp_path / "too-big"
    with pytest.raises(TrainingError, match="more than the adapter"):
        train(_cfg(tiny_model, chat_file, out, mask_budget=10**9), emit=lambda m: None)
    assert not out.exists()  # refused before the run folder was made
    with pytest.raises(ValueError, match="full_finetune"):
        _cfg(tiny_model, chat_file, out, mask_budget=5, full_finetune=True)
    from emkit.core.config import load_config

    with pytest.raises(ConfigError, match="--mask-budget"):
        load_config(TrainConfig, None, {"mask_budget": 0})
    # the same seed draws the same mask; another seed another one
    a, b, c = (draw_mask([100, 50], 20, seed=s) for s in (3, 3, 4))
    assert all((x == y).all() for x, y in zip(a, b)) and any(len(x) != len(y) or (x != y).any() for x, y in zip(a, c))


def test_full_finetune_trains_every_weight(tiny_model: Path, chat_file: Path, tmp_path: Path) -> None:
    from emkit.models import load_model
    from emkit.train.sft import train

    result = train(_cfg(tiny_model, chat_file, tmp_path / "full", max_steps=2, lr=1e-3, full_finetune=True),
                   emit=lambda m: None)
    assert result.adapter == result.run_dir / "model" and (result.adapter / "config.json").is_file()
    assert not (result.run_dir / "adapter").exists()
    tuned = load_model(str(result.adapter), device="cpu").model.state_dict()
    base = load_model(str(tiny_model), device="cpu").model.state_dict()
    changed = [k for k in base if not torch.equal(base[k], tuned[k])]
    assert any("mlp" in k for k in changed) and any("self_attn" in k for k in changed)
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["config"]["full_finetune"] is True
