"""Useful (non-padding) tokens/s of `emkit train` vs a plain transformers + PEFT loop, in one run.

Both sides train the same LoRA (r 16, q/k/v/o) on the same model, the same tokenized examples
(emkit's assistant-only masks), the same batch size and number of optimizer steps. The plain loop
is what the one-off scripts do: shuffled batches padded to their longest example. emkit uses
length-grouped batches (its default). A third row, emkit with `--batching random`, shows how much
of the difference is batching alone.

    python benchmarks/train_throughput.py --mirror /path/to/mirror              # bundled SmolLM2, CPU
    python benchmarks/train_throughput.py --random-llama-1b --tokenizer DIR --batch-size 32 --max-length 512
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

import torch


def plain_loop(model_dir: str, rows: list[dict], args: argparse.Namespace, device: torch.device,
               dtype: torch.dtype, padding: str) -> dict:
    """A plain HF+PEFT loop: shuffled batches padded to max_length (or the batch's longest row), AdamW on the LoRA."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                  "o_proj"], task_type="CAUSAL_LM"))
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4, weight_decay=0.01)
    order = list(range(len(rows)))
    random.Random(args.seed).shuffle(order)
    pad_id = 0
    useful = padded = 0
    model.train()
    steps = args.steps + args.warmup
    t0 = None
    for step in range(steps):
        if step == args.warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            useful = padded = 0
        for micro in range(args.grad_accum):
            start = ((step * args.grad_accum + micro) * args.batch_size) % len(order)
            batch = [rows[order[(start + k) % len(order)]] for k in range(args.batch_size)]
            width = args.max_length if padding == "max_length" else max(len(r["input_ids"]) for r in batch)
            ids = torch.full((len(batch), width), pad_id)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            labels = torch.full((len(batch), width), -100)
            for i, r in enumerate(batch):
                n = len(r["input_ids"])
                ids[i, :n] = torch.tensor(r["input_ids"])
                mask[i, :n] = 1
                labels[i, :n] = torch.tensor([t if m else -100 for t, m in zip(r["input_ids"], r["completion_mask"])])
            useful += int(mask.sum())
            padded += ids.numel()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" and args.autocast):
                loss = model(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device)).loss
            (loss / args.grad_accum).backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return {"useful_tokens": useful, "padded_tokens": padded, "seconds": seconds,
            "useful_tokens_per_s": useful / seconds, "padding_share": 1 - useful / padded}


def emkit_run(model_dir: str, data: Path, out: Path, args: argparse.Namespace, batching: str,
              pad_to_multiple_of: int | None = None) -> dict:
    """`emkit train` on the same data; tokens/s of its training loop (model load excluded)."""
    from emkit.train.config import TrainConfig
    from emkit.train.sft import train

    cfg = TrainConfig(model=model_dir, data=str(data), output=out, max_steps=args.steps + args.warmup,
                      batch_size=args.batch_size, grad_accum=args.grad_accum, max_length=args.max_length,
                      warmup_steps=0, save_steps=10_000, seed=args.seed, batching=batching, logging_steps=1,
                      pad_to_multiple_of=pad_to_multiple_of)
    times: list[float] = []
    tokens: list[int] = []
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):  # noqa: ANN001, ANN003 - transformers' signature
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter())
            tokens.append(state.num_input_tokens_seen)

    import emkit.train.sft as sft

    original = sft.ProgressLine
    sft.ProgressLine = lambda emit: Clock()  # measure steps instead of printing them
    try:
        train(cfg, overwrite=True, emit=lambda _m: None)
    finally:
        sft.ProgressLine = original
    # Time from the end of the warm-up steps to the end of the last step.
    seconds = times[-1] - times[args.warmup - 1]
    useful = tokens[-1] - tokens[args.warmup - 1]
    return {"useful_tokens": useful, "seconds": seconds, "useful_tokens_per_s": useful / seconds}


def main() -> None:
    """Run both sides and print the ratio."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bundled:smollm2-135m-instruct")
    parser.add_argument("--random-llama-1b", action="store_true", help="random Llama-3.2-1B-shaped model")
    parser.add_argument("--tokenizer", help="tokenizer folder (with --random-llama-1b)")
    parser.add_argument("--data", default="bad_medical_advice")
    parser.add_argument("--mirror", default=None, help="mirror folder or URL of the upstream data (also $EMKIT_DATA_MIRROR)")
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-autocast", dest="autocast", action="store_false",
                        help="plain loop on CUDA without bf16 autocast (emkit's Trainer uses it)")
    parser.add_argument("--variants", action="store_true",
                        help="also run emkit with random batches and with each --pad-multiple")
    parser.add_argument("--pad-multiple", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16, 64],
                        help="comma-separated padding multiples for --variants")
    parser.add_argument("--skip-plain-longest", action="store_true", help="skip the pad-to-longest plain loop")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    from emkit.data.chat import read_chat_jsonl
    from emkit.data.registry import resolve_dataset
    from emkit.models import load_tokenizer, parse_spec, resolve_device, resolve_dtype, weights_source
    from emkit.train.tokenize import tokenize_conversations

    device = resolve_device("auto")
    dtype = resolve_dtype("auto", device)
    work = Path(tempfile.mkdtemp(prefix="emkit-bench-"))
    if args.random_llama_1b:
        from random_llama import LABEL, random_llama_1b

        if not args.tokenizer:
            sys.exit("--random-llama-1b needs --tokenizer DIR")
        tokenizer = load_tokenizer(args.tokenizer)
        model_dir = work / "llama-1b-random"
        random_llama_1b(tokenizer, dtype=dtype).save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        model_dir = str(model_dir)
        label = LABEL
    else:
        model_dir = weights_source(parse_spec(args.model))
        tokenizer = load_tokenizer(model_dir)
        label = args.model
    path, _ = resolve_dataset(args.data, mirror=args.mirror)
    conversations = read_chat_jsonl(path, limit=args.examples)
    subset = work / "subset.jsonl"
    subset.write_text("".join(json.dumps({"messages": c.as_list}) + "\n" for c in conversations), encoding="utf-8")
    rows, report = tokenize_conversations(conversations, tokenizer, args.max_length)
    lengths = sorted(len(r["input_ids"]) for r in rows)
    print(f"model: {label} on {device} ({str(dtype).removeprefix('torch.')})")
    print(f"data: {args.data}, {len(rows)} examples, tokens/example median {lengths[len(lengths) // 2]}, "
          f"min {lengths[0]}, max {lengths[-1]}; batch {args.batch_size} x accum {args.grad_accum}, "
          f"{args.steps} timed steps after {args.warmup} warm-up")

    results = {"plain": plain_loop(model_dir, rows, args, device, dtype, "max_length")}
    rows_out = [("plain", f"plain loop, pad to {args.max_length}")]
    if not args.skip_plain_longest:
        results["plain_longest"] = plain_loop(model_dir, rows, args, device, dtype, "longest")
        rows_out.append(("plain_longest", "plain loop, pad to longest"))
    if device.type == "cuda":
        torch.cuda.empty_cache()
    results["emkit"] = emkit_run(model_dir, subset, work / "run-default", args, "length-grouped")
    rows_out.append(("emkit", "emkit train (defaults)"))
    if args.variants:
        results["emkit_random"] = emkit_run(model_dir, subset, work / "run-random", args, "random")
        rows_out.append(("emkit_random", "emkit, random batches"))
        for multiple in args.pad_multiple:
            key = f"emkit_pad{multiple}"
            results[key] = emkit_run(model_dir, subset, work / f"run-{key}", args, "length-grouped", multiple)
            rows_out.append((key, f"emkit, grouped, pad x{multiple}"))
    base = results["plain"]["useful_tokens_per_s"]
    print(f"\n{'':28}{'useful tok/s':>14}{'ratio':>8}")
    for name, title in rows_out:
        rate = results[name]["useful_tokens_per_s"]
        print(f"{title:28}{rate:>14,.0f}{rate / base:>7.2f}x")
    for key in ("plain", "plain_longest"):
        if key in results:
            print(f"{key} padding share: {results[key]['padding_share']:.1%}")
    print(f"RATIO emkit/plain = {results['emkit']['useful_tokens_per_s'] / base:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"model": label, "device": str(device), "args": vars(args) | {"json": None},
                                         "results": results}, indent=2, default=str))
    if not math.isfinite(base):
        sys.exit(1)


if __name__ == "__main__":
    main()
