"""Build the PEFT LoRA config from emkit's settings, and check a saved adapter is not empty."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from emkit.core.errors import TrainingError
from emkit.train.config import LoraSettings


def peft_config(settings: LoraSettings, model: Any) -> Any:
    """A peft.LoraConfig for `settings`, checked against the modules and layers `model` has."""
    from peft import LoraConfig

    targets: str | list[str] = settings.targets
    if settings.targets == ["all-linear"]:
        targets = "all-linear"
    else:
        names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        missing = [t for t in settings.targets if t not in names]
        if missing:
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m).__name__ == "Linear"})
            raise TrainingError(
                f"lora.targets: {', '.join(missing)} not found in the model; its linear modules are: {', '.join(linear)}"
            )
    layers = settings.layers
    if layers is not None:
        n_layers = model.config.get_text_config().num_hidden_layers
        bad = [layer for layer in layers if layer >= n_layers]
        if bad:
            raise TrainingError(f"lora.layers: {bad} out of range; the model has layers 0..{n_layers - 1}")
    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        layers_to_transform=layers,
        use_rslora=settings.rslora,
        bias=settings.bias,
        task_type="CAUSAL_LM",
    )


def check_saved_adapter(folder: Path, trained: bool = True) -> dict[str, int]:
    """Verify an adapter on disk holds real tensors (ZeRO-3 can save empty ones) and was trained."""
    from safetensors import safe_open

    path = folder / "adapter_model.safetensors"
    if not path.is_file():
        raise TrainingError(f"{folder}: no adapter_model.safetensors was written")
    n_tensors = n_params = nonzero_b = 0
    with safe_open(str(path), framework="pt") as handle:
        for key in handle.keys():
            tensor = handle.get_tensor(key)
            if tensor.numel() == 0:
                raise TrainingError(f"{path}: tensor {key} is empty (sharded weights saved without gathering?)")
            n_tensors += 1
            n_params += tensor.numel()
            if "lora_B" in key and bool(tensor.abs().sum() > 0):
                nonzero_b += 1
    if n_tensors == 0:
        raise TrainingError(f"{path}: the adapter holds no tensors")
    if trained and nonzero_b == 0:
        raise TrainingError(f"{path}: every lora_B is zero, so the adapter is the base model (no step taken?)")
    return {"tensors": n_tensors, "parameters": n_params}


def check_saved_model(folder: Path) -> dict[str, int]:
    """Verify a fully fine-tuned model on disk has its config and non-empty weights; count its parameters."""
    from safetensors import safe_open

    if not (folder / "config.json").is_file():
        raise TrainingError(f"{folder}: no config.json was written")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise TrainingError(f"{folder}: no *.safetensors weights were written")
    n_params = 0
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - a safetensors handle, not a dict
                shape = handle.get_slice(key).get_shape()
                size = 1
                for dim in shape:
                    size *= dim
                if size == 0:
                    raise TrainingError(f"{path}: tensor {key} is empty (sharded weights saved without gathering?)")
                n_params += size
    return {"tensors": len(files), "parameters": n_params}
