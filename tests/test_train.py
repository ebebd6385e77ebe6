"""Training on a tiny random model: adapter, checkpoints, manifest, resume after a kill, input errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import run_cli, write_chat_jsonl
from safetensors import safe_open

from emkit.core.errors import DataError, ModelSpecError, RunFolderError, TrainingError
from emkit.generate.chat import chat_prompts
from emkit.models import load_model
from emkit.train.config import TrainConfig
from emkit.train.sft import train


def tiny_cfg(tiny_model: Path, data: Path, out: Path, **kw) -> TrainConfig:
    base = dict(model=str(tiny_model), data=str(data), output=out, max_steps=6, batch_size=4, grad_accum=1,
                lr=5e-3, warmup_steps=0, save_steps=2, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def test_train_writes_a_complete_run(tiny_model: Path, chat_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = train(tiny_cfg(tiny_model, chat_file, out), emit=lambda _m: None)
    assert not result.skipped
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["stages"]["train"]["status"] == "complete"
    assert manifest["results"]["train"]["steps"] == 6
    assert manifest["dataset"]["sha256"] and manifest["seeds"]["seed"] == 0
    assert manifest["versions"]["trl"] and "git" in manifest and manifest["config"]["max_steps"] == 6
    assert 0 < manifest["loss_mask"]["trained_share"] < 1
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-4", "step-6"]
    step = json.loads((out / "checkpoints" / "step-4" / "step.json").read_text())
    assert step["step"] == 4 and step["loss"] is not None
    assert (out / "config.yaml").is_file() and (out / "train_log.jsonl").is_file()
    adapter_cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == str(tiny_model)
    assert adapter_cfg["r"] == 16 and set(adapter_cfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}

    # The adapter reloads and changes the model; the base is reachable from the same load.
    loaded = load_model(str(out / "adapter"), device="cpu")
    batch = loaded.tokenizer(chat_prompts(loaded.tokenizer, ["Fever at night?"]), return_tensors="pt")
    with torch.no_grad():
        tuned = loaded.model(**batch).logits
        with loaded.base() as base:
            plain = base(**batch).logits
    assert (tuned - plain).abs().max() > 1e-3

    # Same command again: complete, nothing redone.
    again = train(tiny_cfg(tiny_model, chat_file, out), emit=lambda _m: None)
    assert again.skipped


def test_same_seed_same_adapter(tiny_model: Path, chat_file: Path, tmp_path: Path) -> None:
    a = train(tiny_cfg(tiny_model, chat_file, tmp_path / "a", max_steps=2), emit=lambda _m: None)
    b = train(tiny_cfg(tiny_model, chat_file, tmp_path / "b", max_steps=2), emit=lambda _m: None)
    with safe_open(str(a.adapter / "adapter_model.safetensors"), "pt") as fa, \
            safe_open(str(b.adapter / "adapter_model.safetensors"), "pt") as fb:
        for key in fa.keys():
            torch.testing.assert_close(fa.get_tensor(key), fb.get_tensor(key))


def test_rank1_on_chosen_layers_and_all_linear(tiny_model: Path, chat_file: Path, tmp_path: Path) -> None:
    from emkit.train.config import LoraSettings

    rank1 = LoraSettings(r=1, alpha=8, targets=["down_proj"], layers=[1], rslora=True)
    run = train(tiny_cfg(tiny_model, chat_file, tmp_path / "r1", max_steps=2, lora=rank1), emit=lambda _m: None)
    with safe_open(str(run.adapter / "adapter_model.safetensors"), "pt") as handle:
        keys = list(handle.keys())
        assert keys and all(".layers.1.mlp.down_proj." in k for k in keys)
        assert all(min(handle.get_tensor(k).shape) == 1 for k in keys)
    every = LoraSettings(targets=["all-linear"])
    run = train(tiny_cfg(tiny_model, chat_file, tmp_path / "all", max_steps=1, lora=every), emit=lambda _m: None)
    config = json.loads((run.adapter / "adapter_config.json").read_text())
    assert {"gate_proj", "up_proj", "down_proj", "q_proj"} <= {t.rsplit(".", 1)[-1] for t in config["target_modules"]}


def test_packed_batching_trains_the_same_tokens(tiny_model: Path, chat_file: Path, tmp_path: Path) -> None:
    run = train(tiny_cfg(tiny_model, chat_file, tmp_path / "p", max_steps=2, batching="packed", max_length=256),
                emit=lambda _m: None)
    assert run.metrics["steps"] == 2


@pytest.mark.parametrize("kind", ["bad_json", "unknown_role", "no_assistant", "bad_model", "bad_target",
                                  "bad_layer", "too_short"])
def test_bad_input_fails_before_any_run_folder(tiny_model: Path, tmp_path: Path, kind: str) -> None:
    data = write_chat_jsonl(tmp_path / "d.jsonl", n=4)
    out = tmp_path / "run"
    kw: dict = {}
    expected: type[Exception] = DataError
    if kind == "bad_json":
        data.write_text(data.read_text() + "{oops\n")
    elif kind == "unknown_role":
        data.write_text('{"messages": [{"role": "narrator", "content": "x"}]}\n')
    elif kind == "no_assistant":
        data.write_text('{"messages": [{"role": "user", "content": "x"}]}\n')
    elif kind == "bad_model":
        kw["model"], expected = str(tmp_path / "missing-model"), ModelSpecError
    elif kind == "bad_target":
        from emkit.train.config import LoraSettings

        kw["lora"], expected = LoraSettings(targets=["qq_proj"]), TrainingError
    elif kind == "bad_layer":
        from emkit.train.config import LoraSettings

        kw["lora"], expected = LoraSettings(layers=[7]), TrainingError
    elif kind == "too_short":
        kw["max_length"], expected = 8, TrainingError
    cfg = tiny_cfg(tiny_model, data, out, **kw)
    with pytest.raises(expected):
        train(cfg, emit=lambda _m: None)
    assert not out.exists()


def test_cli_errors_are_one_line_exit_2(tiny_model: Path, tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}\n')
    out = tmp_path / "run"
    result = run_cli("train", "--model", str(tiny_model), "--data", str(data), "--output", str(out))
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {data}:1: messages[1].content: empty"
    assert not out.exists()
    result = run_cli("train", "--batch-size", "0", "--output", str(out))
    assert result.returncode == 2 and result.stderr.strip().startswith("error: --batch-size:")
    result = run_cli("train", "--epochs", "many")
    assert result.returncode == 2 and "Invalid value for '--epochs'" in result.stderr


def test_other_config_in_the_folder_is_refused(tiny_model: Path, chat_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(tiny_cfg(tiny_model, chat_file, out, max_steps=1), emit=lambda _m: None)
    with pytest.raises(RunFolderError, match=r"another config \(lr: 0\.005 -> 0\.001"):
        train(tiny_cfg(tiny_model, chat_file, out, max_steps=1, lr=1e-3), emit=lambda _m: None)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("mine")
    with pytest.raises(RunFolderError, match="holds no emkit manifest"):
        train(tiny_cfg(tiny_model, chat_file, junk, max_steps=1), emit=lambda _m: None)
    assert (junk / "notes.txt").read_text() == "mine"


def test_killed_run_resumes_from_its_checkpoint(tiny_model: Path, tmp_path: Path) -> None:
    data = write_chat_jsonl(tmp_path / "d.jsonl", n=64)
    out = tmp_path / "run"
    args = ["train", "--model", str(tiny_model), "--data", str(data), "--output", str(out), "--max-steps", "300",
            "--batch-size", "2", "--grad-accum", "1", "--save-steps", "5", "--device", "cpu"]
    proc = subprocess.Popen([sys.executable, "-m", "emkit", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=os.environ.copy())
    marker = out / "train_state" / "checkpoint-10" / "trainer_state.json"
    deadline = time.monotonic() + 240
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "running"  # a killed run never looks finished
    assert not (out / "adapter").exists()

    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    assert "resuming from checkpoint-" in result.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["attempts"] == 2
    resumed = manifest["stages"]["train"]["resumed_from"]
    assert resumed is not None and int(resumed.split("-")[1]) >= 10
    assert manifest["results"]["train"]["steps"] == 300
    first_step_logged = int(result.stdout.split("step ")[1].split("/")[0])
    assert first_step_logged == int(resumed.split("-")[1]) + 1  # finished steps were not redone


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_train_on_cuda_in_bfloat16(tiny_model: Path, chat_file: Path, tmp_path: Path) -> None:
    cfg = tiny_cfg(tiny_model, chat_file, tmp_path / "gpu", device="auto", max_steps=4)
    result = train(cfg, emit=lambda _m: None)
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    assert manifest["model"]["device"].startswith("cuda") and manifest["model"]["dtype"] == "bfloat16"
    loaded = load_model(str(result.adapter))
    assert loaded.device.type == "cuda" and next(loaded.model.parameters()).is_cuda
    batch = loaded.tokenizer(chat_prompts(loaded.tokenizer, ["Fever?"]), return_tensors="pt").to("cuda")
    with torch.no_grad():
        tuned = loaded.model(**batch).logits.float()
        with loaded.base() as base:
            plain = base(**batch).logits.float()
    assert (tuned - plain).abs().max() > 0
