"""Model specs: parsing, loading a local folder, adapters with the base reachable from one load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from emkit.core.errors import ModelSpecError
from emkit.models import ACCEPTED, load_model, parse_spec, resolve_device, resolve_dtype


def test_parse_spec_forms(tiny_model: Path, tmp_path: Path) -> None:
    assert parse_spec("bundled:smollm2-135m-instruct").kind == "bundled"
    assert parse_spec(str(tiny_model)).kind == "local"
    assert parse_spec("HuggingFaceTB/SmolLM2-135M-Instruct").kind == "hub"
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert parse_spec(str(gguf)).kind == "gguf"
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    assert parse_spec(str(adapter)).kind == "adapter"


@pytest.mark.parametrize("spec", ["bundled:gpt-5", "./no/such/folder", "not a model", ""])
def test_unknown_specs_list_what_is_accepted(spec: str) -> None:
    with pytest.raises(ModelSpecError) as info:
        parse_spec(spec)
    assert ACCEPTED in str(info.value)


def test_folder_without_config_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ModelSpecError, match="neither config.json nor adapter_config.json"):
        parse_spec(str(tmp_path))


def test_auto_device_and_dtype() -> None:
    device = resolve_device("auto")
    assert device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    if not torch.cuda.is_available():
        with pytest.raises(ModelSpecError, match="CUDA is not available"):
            resolve_device("cuda")


def test_load_local_with_dtype_override(tiny_model: Path) -> None:
    loaded = load_model(str(tiny_model), device="cpu", dtype="bfloat16")
    assert loaded.model.dtype == torch.bfloat16 and not loaded.has_adapter
    assert loaded.tokenizer.pad_token is not None


def _save_random_adapter(model_dir: Path, out: Path, base_spec: str) -> Path:
    from peft import LoraConfig, get_peft_model

    loaded = load_model(str(model_dir), device="cpu")
    peft = get_peft_model(loaded.model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(1)
    for name, param in peft.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.5)
    peft.peft_config["default"].base_model_name_or_path = base_spec
    peft.save_pretrained(out)
    return out


def test_adapter_on_top_with_base_from_the_same_load(tiny_model: Path, tmp_path: Path) -> None:
    adapter = _save_random_adapter(tiny_model, tmp_path / "adapter", str(tiny_model))
    ids = torch.tensor([[1, 5, 9, 12, 40]])
    base = load_model(str(tiny_model), device="cpu")
    with torch.no_grad():
        base_logits = base.model(ids).logits
    organism = load_model(str(tiny_model), adapter=adapter, device="cpu")
    assert organism.has_adapter
    with torch.no_grad():
        tuned = organism.model(ids).logits
        with organism.base() as model:
            restored = model(ids).logits
    assert not torch.allclose(tuned, base_logits)
    torch.testing.assert_close(restored, base_logits)
    # An adapter folder alone is a spec too: its base comes from adapter_config.json.
    alone = load_model(str(adapter), device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(alone.model(ids).logits, tuned)


def test_adapter_errors(tiny_model: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelSpecError, match="not a PEFT adapter folder"):
        load_model(str(tiny_model), adapter=tmp_path, device="cpu")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(ModelSpecError, match="no base_model_name_or_path"):
        load_model(str(bad), device="cpu")
