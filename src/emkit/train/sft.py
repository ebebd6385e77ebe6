"""`emkit train`: LoRA SFT of an instruct model on chat data with TRL, into a resumable run folder.

Run folder of a training run:
    config.yaml, manifest.json   resolved config; versions, seeds, dataset hash, git commit, timings
    adapter/                     the final adapter (written last, atomically)
    checkpoints/step-N/          the adapter every `save_steps` steps, kept for analysis
    train_state/checkpoint-N/    the trainer's resumable state (optimizer too), last few only
    train_log.jsonl              the trainer's log history (loss, lr, tokens/s per step)

Everything the user can get wrong (config, data, model spec, a mask that trains nothing) is checked
before the run folder is created. Under `accelerate launch` every process runs this same function.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emkit.core.errors import TrainingError
from emkit.core.runfolder import RunFolder, atomic_dir, atomic_write_text
from emkit.data.chat import content_sha256, read_chat_jsonl
from emkit.data.registry import resolve_dataset
from emkit.models import load_model, parse_spec
from emkit.train.callbacks import ExportCheckpoints, ProgressLine
from emkit.train.config import TrainConfig
from emkit.train.lora import check_saved_adapter, check_saved_model, peft_config
from emkit.train.tokenize import tokenize_conversations

TRAINER_STATE = "trainer_state.json"
GPU_PAD_MULTIPLE = 16


@dataclass
class TrainResult:
    """Where a finished run is and what it did."""

    run_dir: Path
    adapter: Path  # the adapter folder; with full_finetune, the whole model's folder (model/)
    skipped: bool
    metrics: dict[str, Any]
    model: Any = None  # the trained PEFT model, in memory (None when skipped)


def last_complete_checkpoint(folder: Path) -> Path | None:
    """Newest trainer checkpoint that was fully written; incomplete ones are removed."""
    if not folder.is_dir():
        return None
    checkpoints = sorted(
        (p for p in folder.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]),
    )
    complete = None
    for path in checkpoints:
        # trainer_state.json is the last file the Trainer writes into a checkpoint.
        if (path / TRAINER_STATE).is_file():
            complete = path
        else:
            shutil.rmtree(path, ignore_errors=True)
    return complete


def pad_multiple(cfg: TrainConfig, device: Any) -> int | None:
    """Batch width multiple: on GPU every new batch shape costs (allocator, kernel choice), so widths are
    rounded up to a multiple of 16 by default; on CPU shapes are free and batches are not padded further."""
    multiple = cfg.pad_to_multiple_of
    if multiple is None:
        multiple = GPU_PAD_MULTIPLE if device.type == "cuda" else 1
    return multiple if multiple > 1 else None


def _sft_config(cfg: TrainConfig, run_dir: Path, device: Any, dtype: Any) -> Any:
    import torch
    from trl import SFTConfig

    sampling = {"length-grouped": "group_by_length", "packed": "random", "random": "random"}[cfg.batching]
    return SFTConfig(
        output_dir=str(run_dir / "train_state"),
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps or -1,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        warmup_steps=cfg.warmup_steps,
        lr_scheduler_type=cfg.scheduler,
        weight_decay=cfg.weight_decay,
        optim=cfg.optimizer,
        max_length=cfg.max_length,
        pad_to_multiple_of=pad_multiple(cfg, device),
        completion_only_loss=True,
        packing=cfg.batching == "packed",
        packing_strategy="bfd",
        train_sampling_strategy=sampling,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.keep_train_states,
        logging_steps=cfg.logging_steps,
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu=device.type == "cpu",
        gradient_checkpointing=cfg.gradient_checkpointing,
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=True,
        report_to="none",
        ddp_find_unused_parameters=False,
        dataloader_num_workers=0,
    )


def train(
    cfg: TrainConfig,
    *,
    mirror: str | None = None,
    overwrite: bool = False,
    emit: Callable[[str], None] = print,
) -> TrainResult:
    """Train a LoRA organism as `cfg` says, resuming a partial run in the same folder."""
    import torch
    from accelerate import PartialState
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import PrinterCallback, set_seed
    from trl import SFTTrainer

    # PEFT probes the base's config at save time to detect resized embeddings; emkit's spec strings
    # (bundled:...) are not folders, and the vocabulary is never resized here.
    warnings.filterwarnings("ignore", message="Could not find a config file in")
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # Accelerate keeps its device choice in a process-wide singleton; a previous Trainer in this
        # process (e.g. a CPU run) must not decide the device of this one.
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
    on_cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
    state = PartialState(cpu=on_cpu)  # cpu=True is what makes several CPU processes one gloo group
    main = state.is_main_process
    say = emit if main else (lambda _msg: None)

    # 1. Inputs, all checked before anything is written.
    data_path, entry = resolve_dataset(cfg.data, mirror=mirror)
    conversations = read_chat_jsonl(data_path, limit=cfg.max_examples)
    holdout = None
    if cfg.holdout:
        from emkit.train.holdout import load_partner, resolve_partner, split_holdout

        partner, role = resolve_partner(cfg.data, cfg.holdout_partner,
                                        cfg.holdout_partner_role if cfg.holdout_partner else None)
        holdout = split_holdout(conversations, load_partner(partner, mirror), cfg.holdout, cfg.seed,
                                partner_role=role, partner_name=partner)
        conversations = holdout.train
    parse_spec(cfg.model)
    run = RunFolder(cfg.output)
    # Read-only check: a folder of another config or a non-run folder fails here, before any work.
    if not overwrite and run.open("train", cfg, main_process=False) == "complete":
        say(f"{cfg.output}: already complete (same config); nothing to do")
        return TrainResult(cfg.output, cfg.output / _weights_folder(cfg), True,
                           (run.read_manifest() or {}).get("results", {}))

    set_seed(cfg.seed)
    device = cfg.device
    if device == "auto" and torch.cuda.is_available():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    loaded = load_model(cfg.model, device=str(device), dtype=cfg.dtype)
    tokenizer, model = loaded.tokenizer, loaded.model
    rows, report = tokenize_conversations(conversations, tokenizer, cfg.max_length)
    lora = peft_config(cfg.lora, model)
    say(f"data: {data_path} ({len(conversations)} conversations)")
    say(f"loss mask: {report.summary()}")
    for sample in report.samples:
        say("  trained spans in [[ ]]: " + sample.replace("\n", "\\n")[:600])
    # The adapter is made (and a mask drawn) before the run folder opens, so a bad mask budget fails
    # first; no random numbers are drawn in between, so the adapter's initialisation is the same.
    model.config.use_cache = False
    mask = None
    if not cfg.full_finetune:
        model = get_peft_model(model, lora)
        if cfg.mask_budget is not None:
            from emkit.train.masked import apply_mask

            mask = apply_mask(model, cfg.mask_budget, cfg.mask_seed)

    # 2. The run folder: new, resumed, or already complete.
    with state.main_process_first():
        opened = run.open("train", cfg, overwrite=overwrite, main_process=main)
    if opened == "complete":
        say(f"{cfg.output}: already complete (same config); nothing to do")
        return TrainResult(cfg.output, cfg.output / _weights_folder(cfg), True,
                           (run.read_manifest() or {}).get("results", {}))
    if main:
        run.update(
            seeds={"seed": cfg.seed, "data_seed": cfg.seed},
            dataset={"path": str(data_path), "name": entry.name if entry else None,
                     "sha256": content_sha256(data_path), "conversations": len(conversations)},
            model={"spec": loaded.spec, "source": loaded.source, "device": str(loaded.device),
                   "dtype": str(loaded.dtype).removeprefix("torch.")},
            loss_mask={"examples": report.examples, "tokens": report.tokens, "trained_tokens": report.trained_tokens,
                       "trained_share": round(report.trained_share, 4), "truncated": report.truncated,
                       "dropped": report.dropped},
            world_size=state.num_processes,
        )
        if mask is not None:
            from emkit.train.masked import MASK_FILE

            mask.save(run.path / MASK_FILE)
            run.update(mask=mask.summary())
        if holdout is not None:
            from emkit.train.holdout import HOLDOUT_FILE, pairs_payload

            atomic_write_text(run.path / HOLDOUT_FILE, pairs_payload(holdout.pairs))
            run.update(holdout={"pairs": len(holdout.pairs), "partner": holdout.partner,
                                "partner_role": holdout.partner_role, "file": HOLDOUT_FILE,
                                "trained_on": len(conversations)})
            say(f"held out {len(holdout.pairs)} prompts of {cfg.data} (answered by {holdout.partner}) as the "
                f"in-domain test; training on the other {len(conversations)}")

    # 3. Model and trainer.
    if cfg.full_finetune:
        total = sum(p.numel() for p in model.parameters())
        say(f"model: {loaded.spec} on {loaded.device} ({str(loaded.dtype).removeprefix('torch.')}); "
            f"full fine-tuning: all {total:,} parameters trainable")
    else:
        # Written into adapter_config.json, so `--model runs/x/adapter` finds its base by emkit spec.
        model.peft_config["default"].base_model_name_or_path = loaded.spec
        trainable, total = model.get_nb_trainable_parameters()
        say(f"model: {loaded.spec} on {loaded.device} ({str(loaded.dtype).removeprefix('torch.')}); "
            f"LoRA r={cfg.lora.r} alpha={cfg.lora.alpha} on {','.join(cfg.lora.targets)}"
            f"{' layers ' + ','.join(map(str, cfg.lora.layers)) if cfg.lora.layers else ''}: "
            f"{trainable:,} trainable of {total:,} parameters")
        if mask is not None:
            say(f"masked LoRA: {mask.budget:,} of {mask.total:,} adapter scalars train (mask seed {mask.seed}); "
                f"{mask.transposed} component(s) initialised transposed so their chosen A scalars get gradient")
    args = _sft_config(cfg, run.path, loaded.device, loaded.dtype)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=[ProgressLine(say), ExportCheckpoints(run.path / "train_state", run.path / "checkpoints"),
                   *([mask.callback()] if mask is not None else [])],
    )
    trainer.remove_callback(PrinterCallback)  # ProgressLine replaces its raw dict lines
    _verify_trainer_labels(trainer, report.trained_tokens, packed=cfg.batching == "packed")

    # 4. Train (resuming from the last complete trainer checkpoint), then save the adapter.
    resume = last_complete_checkpoint(run.path / "train_state")
    if resume is not None:
        say(f"resuming from {resume.name}")
    with run.stage("train", enabled=main) as record:
        output = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        metrics = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in output.metrics.items()}
        record.update(metrics=metrics, resumed_from=resume.name if resume else None)
    staging = run.path / ".adapter-staging"
    trainer.save_model(str(staging))  # every process: gathers sharded weights under FSDP / ZeRO-3
    metrics = dict(metrics)
    final = run.path / _weights_folder(cfg)
    if main:
        with atomic_dir(final) as tmp:
            for name in os.listdir(staging):
                shutil.move(str(staging / name), tmp / name)
        shutil.rmtree(staging, ignore_errors=True)
        if cfg.full_finetune:
            sizes = check_saved_model(final)
        else:
            sizes = check_saved_adapter(final, trained=trainer.state.global_step > 0)
        atomic_write_text(
            run.path / "train_log.jsonl", "".join(json.dumps(h) + "\n" for h in trainer.state.log_history)
        )
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        metrics.update(steps=trainer.state.global_step, first_loss=losses[0] if losses else None,
                       final_loss=losses[-1] if losses else None, tokens_seen=trainer.state.num_input_tokens_seen,
                       adapter_parameters=sizes["parameters"])
        if mask is not None:
            metrics["mask"] = mask.summary()
        run.complete(train=metrics)
        say(f"done: {'model' if cfg.full_finetune else 'adapter'} in {final} ({trainer.state.global_step} steps, "
            f"loss {metrics['first_loss']} -> {metrics['final_loss']})")
    state.wait_for_everyone()
    return TrainResult(run.path, final, False, metrics, model=trainer.model)


def _weights_folder(cfg: TrainConfig) -> str:
    """Where a run's trained weights go: adapter/ (LoRA), or model/ (full fine-tuning)."""
    return "model" if cfg.full_finetune else "adapter"


def _verify_trainer_labels(trainer: Any, expected: int, packed: bool) -> None:
    """The dataset TRL will train on must carry exactly the loss tokens emkit's mask chose."""
    dataset = trainer.train_dataset
    if "labels" not in dataset.column_names:
        raise TrainingError("internal: TRL prepared no labels; the assistant-only mask would be ignored")
    got = sum(sum(1 for t in labels if t != -100) for labels in dataset["labels"])
    # Packing shifts labels by nothing but may split sequences; the count of loss tokens is preserved.
    if got != expected:
        raise TrainingError(
            f"internal: the trainer's data has {got} loss tokens, the assistant mask has {expected}"
            f"{' (packing)' if packed else ''}; refusing to train on a different mask"
        )
