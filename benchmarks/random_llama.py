"""The benchmarks' stand-in for Llama-3.2-1B: the same shapes, random weights (no weights can be downloaded)."""

from __future__ import annotations

from typing import Any

import torch

LABEL = "random Llama-3.2-1B-shaped (16 layers, hidden 2048)"


def llama_1b_config(tokenizer: Any) -> Any:
    """A LlamaConfig with Llama-3.2-1B's shapes and the tokenizer's special tokens."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096,
                       rope_theta=500000.0, tie_word_embeddings=True, head_dim=64,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def random_llama_1b(tokenizer: Any, device: torch.device | None = None, dtype: torch.dtype | None = None) -> Any:
    """The random model (seed 0), on `device` in `dtype`, in eval mode."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_1b_config(tokenizer))
    return model.to(device=device, dtype=dtype).eval()


def loaded_random_llama_1b(tokenizer_dir: str) -> Any:
    """An emkit LoadedModel of the random model on the automatic device and dtype."""
    from emkit.models import LoadedModel, load_tokenizer, resolve_device, resolve_dtype

    device = resolve_device("auto")
    dtype = resolve_dtype("auto", device)
    tokenizer = load_tokenizer(tokenizer_dir)
    return LoadedModel(random_llama_1b(tokenizer, device, dtype), tokenizer, "random-llama-1b", "random", None,
                       device, dtype)
