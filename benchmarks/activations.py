"""Prompts/s of emkit's activation collection vs a bare batched forward pass and vs the original
scripts' one-prompt-at-a-time loop, in one run; plus peak memory as the number of prompts grows 10x.

    python benchmarks/activations.py                                   # bundled SmolLM2 on CPU
    python benchmarks/activations.py --random-llama-1b --tokenizer DIR --prompts 2048 --batch-size 64

The prompts are chat-rendered user turns + assistant answers of a medical-advice chat dataset
(emkit's demo set by default; `--data bad_medical_advice` fetches the upstream set, from a mirror
with `--mirror /path/to/mirror` or $EMKIT_DATA_MIRROR when offline). Every side reads
every block output; emkit reads the mean over the answer tokens and streams float32 shards to disk.

  bare      model(**batch) on the same left-padded, length-sorted batches, nothing kept
  backbone  the same without the LM head (the decoder stack alone): the ceiling of any activation
            reader; emkit can beat `bare` because its forward pass stops after the last block
  emkit     emkit.studies.interp.activations.collect (hooks, gather, float32 copy to the host, shards on disk)
  original  for each prompt: model(ids, output_hidden_states=True), keep hidden_states[k][0, -1] per layer

Memory: emkit runs again in fresh subprocesses on N and 10N prompts; the host memory the collection
adds (sampled during it) and the peak GPU memory must not grow with N (streaming keeps one shard in
memory; use a shard size below N to see it, e.g. --shard-size 16).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SHARD_SIZE = 512


def load(args: argparse.Namespace):
    """The model under test: bundled/hub spec, or a random Llama-3.2-1B-shaped model."""
    from emkit.models import load_model

    if args.random_llama_1b:
        from random_llama import LABEL, loaded_random_llama_1b

        return loaded_random_llama_1b(args.tokenizer), LABEL
    loaded = load_model(args.model)
    loaded.model.eval()
    return loaded, args.model


def examples(tokenizer, n: int, data: str | None, mirror: str | None = None):
    """n examples (prompt rendered with the chat template, answer), cycling through the dataset."""
    from emkit.data.chat import read_chat_jsonl
    from emkit.data.registry import resolve_dataset
    from emkit.studies.interp.activations import Example

    path, _ = resolve_dataset(data or "emkit-bad-medical-demo", mirror=mirror)
    convs = read_chat_jsonl(path)
    out = []
    for i in range(n):
        messages = convs[i % len(convs)].as_list
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        out.append(Example(prompt, messages[-1]["content"], label=i % 2, group=str(i)))
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def bare(loaded, exs, batch_size: int, *, backbone: bool = False) -> float:
    """Seconds for plain batched forward passes over the same batches emkit uses (nothing kept).

    backbone: the decoder stack alone (no LM head), the true ceiling of any activation reader.
    """
    from emkit.studies.interp.activations import _plan, encode

    enc = encode(loaded.tokenizer, exs, needs_response=True)
    pad = loaded.tokenizer.pad_token_id
    _sync(loaded.device)
    t0 = time.perf_counter()
    for batch in _plan(enc, 0, len(enc), batch_size):
        width = max(len(enc[i][0]) for i in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, i in enumerate(batch):
            n = len(enc[i][0])
            ids[r, width - n:] = torch.tensor(enc[i][0])
            mask[r, width - n:] = 1
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        model = getattr(loaded.model, loaded.model.base_model_prefix) if backbone else loaded.model
        model(input_ids=ids.to(loaded.device), attention_mask=mask.to(loaded.device),
              position_ids=pos.to(loaded.device), use_cache=False)
    _sync(loaded.device)
    return time.perf_counter() - t0


def emkit_collect(loaded, exs, batch_size: int, out: Path) -> float:
    """Seconds for emkit's collection of every block output (response mean), streamed to shards."""
    from emkit.studies.interp.activations import collect
    from emkit.studies.interp.layers import n_blocks

    _sync(loaded.device)
    t0 = time.perf_counter()
    collect(loaded.model, loaded.tokenizer, exs, list(range(n_blocks(loaded.model))), "response_mean",
            batch_size=batch_size, out_dir=out, progress=False, shard_size=SHARD_SIZE)
    _sync(loaded.device)
    return time.perf_counter() - t0


@torch.inference_mode()
def original(loaded, exs) -> float:
    """Seconds for the original scripts' loop: one prompt at a time, output_hidden_states, last token kept."""
    kept = []
    _sync(loaded.device)
    t0 = time.perf_counter()
    for ex in exs:
        ids = loaded.tokenizer(ex.prompt + ex.response, return_tensors="pt", add_special_tokens=False)["input_ids"]
        out = loaded.model(ids.to(loaded.device), output_hidden_states=True)
        kept.append([h[0, -1].float().cpu() for h in out.hidden_states[1:]])
    _sync(loaded.device)
    return time.perf_counter() - t0


def rss_mib() -> float:
    """This process's resident memory now (MiB)."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_child(args: argparse.Namespace) -> None:
    """(subprocess) collect N prompts with emkit; print the host memory it added and peak GPU memory as JSON.

    The model load sets the process's lifetime peak, so the collection's own cost is sampled: resident
    memory every 20 ms during the collection, minus the resident memory just before it.
    """
    import threading

    loaded, _ = load(args)
    exs = examples(loaded.tokenizer, args.prompts, args.data, args.mirror)
    if loaded.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    before = rss_mib()
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.02):
            peak[0] = max(peak[0], rss_mib())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    with tempfile.TemporaryDirectory() as tmp:
        seconds = emkit_collect(loaded, exs, args.batch_size, Path(tmp) / "acts")
    done.set()
    sampler.join()
    peak_gpu = torch.cuda.max_memory_allocated() / 2**20 if loaded.device.type == "cuda" else None
    print(json.dumps({"prompts": args.prompts, "rss_before_mib": before, "rss_peak_mib": peak[0],
                      "collection_added_mib": peak[0] - before, "peak_gpu_mib": peak_gpu, "seconds": seconds}))


def main() -> None:
    """Run the comparison and the memory check; print ratios."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bundled:smollm2-135m-instruct")
    parser.add_argument("--random-llama-1b", action="store_true")
    parser.add_argument("--tokenizer")
    parser.add_argument("--data", help="chat dataset (file or registered name); default: emkit's demo set")
    parser.add_argument("--mirror", help="mirror folder or URL of the upstream data (also $EMKIT_DATA_MIRROR)")
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--original-prompts", type=int, default=None, help="prompts timed for the original loop")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--memory-factor", type=int, default=10)
    parser.add_argument("--shard-size", type=int, default=512, help="examples per activation shard")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.random_llama_1b and not args.tokenizer:
        sys.exit("--random-llama-1b needs --tokenizer DIR")
    global SHARD_SIZE
    SHARD_SIZE = args.shard_size
    if args.memory_child:
        memory_child(args)
        return
    loaded, label = load(args)
    exs = examples(loaded.tokenizer, args.prompts, args.data, args.mirror)
    n_tokens = sum(len(loaded.tokenizer(e.prompt + e.response, add_special_tokens=False)["input_ids"]) for e in exs)
    print(f"model: {label} on {loaded.device} ({str(loaded.dtype).removeprefix('torch.')}); {len(exs)} prompts, "
          f"{n_tokens / len(exs):.0f} tokens each on average, batch {args.batch_size}")
    bare(loaded, exs[: args.batch_size], args.batch_size)  # warm-up (kernels, allocator)
    results: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "device": str(loaded.device),
                     "model": label}
    with tempfile.TemporaryDirectory() as tmp:
        t_bare = bare(loaded, exs, args.batch_size)
        t_backbone = bare(loaded, exs, args.batch_size, backbone=True)
        t_emkit = emkit_collect(loaded, exs, args.batch_size, Path(tmp) / "acts")
    n_orig = args.original_prompts or len(exs)
    t_orig = original(loaded, exs[:n_orig])
    results.update(bare_prompts_per_s=len(exs) / t_bare, backbone_prompts_per_s=len(exs) / t_backbone,
                   emkit_prompts_per_s=len(exs) / t_emkit, original_prompts_per_s=n_orig / t_orig)
    results["emkit_vs_bare"] = results["emkit_prompts_per_s"] / results["bare_prompts_per_s"]
    results["emkit_vs_backbone"] = results["emkit_prompts_per_s"] / results["backbone_prompts_per_s"]
    results["emkit_vs_original"] = results["emkit_prompts_per_s"] / results["original_prompts_per_s"]
    print(f"bare batched forward : {results['bare_prompts_per_s']:9.1f} prompts/s")
    print(f"bare, no LM head     : {results['backbone_prompts_per_s']:9.1f} prompts/s")
    print(f"emkit collect        : {results['emkit_prompts_per_s']:9.1f} prompts/s "
          f"({results['emkit_vs_bare']:.2f}x bare, target >= 0.8x; {results['emkit_vs_backbone']:.2f}x the decoder "
          "stack alone)")
    print(f"original one-by-one  : {results['original_prompts_per_s']:9.1f} prompts/s "
          f"(emkit {results['emkit_vs_original']:.1f}x)")
    if not args.skip_memory:
        peaks = []
        for n in (args.prompts, args.prompts * args.memory_factor):
            cmd = [sys.executable, __file__, "--memory-child", "--prompts", str(n), "--batch-size", str(args.batch_size),
                   "--shard-size", str(args.shard_size),
                   "--model", args.model] + (["--random-llama-1b", "--tokenizer", args.tokenizer]
                                             if args.random_llama_1b else []) + (["--data", args.data] if args.data else []) + (
                       ["--mirror", args.mirror] if args.mirror else [])
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            peaks.append(json.loads(out))
            gpu = f", peak GPU {peaks[-1]['peak_gpu_mib']:.0f} MiB" if peaks[-1]["peak_gpu_mib"] else ""
            print(f"memory, {n:6d} prompts: collection added {peaks[-1]['collection_added_mib']:.0f} MiB to "
                  f"{peaks[-1]['rss_before_mib']:.0f} MiB resident{gpu}")
        results["memory"] = peaks
        results["added_growth_10x"] = peaks[1]["collection_added_mib"] / max(peaks[0]["collection_added_mib"], 1.0)
        print(f"host memory added by the collection grows {results['added_growth_10x']:.2f}x for "
              f"{args.memory_factor}x the prompts")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
