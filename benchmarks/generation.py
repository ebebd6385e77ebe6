"""Answers/s of emkit's batched generation vs the original scripts' one-at-a-time `generate` loop,
and judgments/s of the API judge with concurrency vs sequentially, in one run each.

    python benchmarks/generation.py                                  # bundled SmolLM2 on CPU
    python benchmarks/generation.py --random-llama-1b --tokenizer DIR --answers 256 --max-new-tokens 128
    python benchmarks/generation.py --judge-url http://127.0.0.1:8080/v1 --judge-model smollm2

Both generation sides sample the same prompts (emkit's default questions) with temperature 1,
top_p 1 and the same number of new tokens; tokens/s counts generated tokens up to end-of-turn.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch


def plain_loop(loaded, prompts: list[str], samples: int, max_new_tokens: int) -> dict:
    """The original scripts: for each question, for each sample, model.generate on one prompt."""
    tok, model = loaded.tokenizer, loaded.model
    device = next(model.parameters()).device
    answers = tokens = 0
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for prompt in prompts:
        enc = tok(prompt, return_tensors="pt", add_special_tokens=False).to(device)
        for _ in range(samples):
            out = model.generate(**enc, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                                 max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id)
            new = out[0, enc["input_ids"].shape[1]:].tolist()
            eos = tok.eos_token_id
            tokens += new.index(eos) if eos in new else len(new)
            answers += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return {"answers": answers, "tokens": tokens, "seconds": seconds, "answers_per_s": answers / seconds,
            "tokens_per_s": tokens / seconds}


def emkit_batched(loaded, prompts: list[str], samples: int, max_new_tokens: int, batch_size: int,
                  out: Path) -> dict:
    """emkit's backend: all answers planned, sorted by length, sampled in left-padded batches."""
    from emkit.core.rowfile import read_rows
    from emkit.generate.transformers_backend import PromptJob, SamplingParams, generate_to_file

    jobs = [PromptJob("base", "none", f"q{i}", 0, p, None, p, samples) for i, p in enumerate(prompts)]
    params = SamplingParams(max_new_tokens=max_new_tokens, batch_size=batch_size, seed=0)
    device = next(loaded.model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    generate_to_file(loaded, jobs, params, out, progress=False, emit=lambda _m: None)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    rows = read_rows(out)
    tokens = sum(r["new_tokens"] for r in rows)
    return {"answers": len(rows), "tokens": tokens, "seconds": seconds, "answers_per_s": len(rows) / seconds,
            "tokens_per_s": tokens / seconds}


def judge_bench(url: str, model: str, n: int, concurrency: int, work: Path) -> dict:
    """Judgments/s sequentially vs with concurrency on the same server, and the re-run cache hit rate."""
    from emkit.judge.cache import JudgmentCache
    from emkit.judge.openai_judge import OpenAIJudge
    from emkit.judge.prompts import default_prompts

    prompts = {"aligned": default_prompts()["aligned"]}
    items = [(f"a{i}", "What would you do with a free afternoon?", f"I would read book number {i} in the park.")
             for i in range(n)]
    out = {}
    for label, conc in (("sequential", 1), ("concurrent", concurrency)):
        # A fresh cache per side so both ask every judgment; the answers differ, so no repeats are merged.
        with JudgmentCache(work / f"{label}.sqlite") as cache:
            judge = OpenAIJudge(model=model, base_url=url, concurrency=conc, timeout=120)
            t0 = time.perf_counter()
            judge.judge_many_sync(items, prompts, cache, progress=False)
            seconds = time.perf_counter() - t0
            out[label] = {"judgments": n, "seconds": seconds, "judgments_per_s": n / seconds,
                          "requests": judge.requests_made}
    with JudgmentCache(work / "concurrent.sqlite") as cache:
        judge = OpenAIJudge(model=model, base_url=url, concurrency=concurrency)
        results = judge.judge_many_sync(items, prompts, cache, progress=False)
        out["rerun"] = {"cache_hit_rate": sum(r.cached for r in results) / len(results),
                        "requests": judge.requests_made}
    return out


def main() -> None:
    """Run the benchmarks and print ratios."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bundled:smollm2-135m-instruct")
    parser.add_argument("--random-llama-1b", action="store_true")
    parser.add_argument("--tokenizer")
    parser.add_argument("--questions", type=int, default=8, help="questions of emkit's default set")
    parser.add_argument("--samples", type=int, default=4, help="samples per question (emkit side)")
    parser.add_argument("--plain-samples", type=int, default=1, help="samples per question timed for the plain loop")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--judge-url", help="OpenAI-compatible server for the judge benchmark")
    parser.add_argument("--judge-model", default="judge")
    parser.add_argument("--judgments", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--skip-generation", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    from emkit.data.questions import resolve_questions
    from emkit.generate.pipeline import chat_renderer
    from emkit.models import load_model

    work = Path(tempfile.mkdtemp(prefix="emkit-genbench-"))
    results: dict = {"args": {k: str(v) for k, v in vars(args).items()}}
    if not args.skip_generation:
        if args.random_llama_1b:
            from random_llama import LABEL, loaded_random_llama_1b

            if not args.tokenizer:
                sys.exit("--random-llama-1b needs --tokenizer DIR")
            loaded = loaded_random_llama_1b(args.tokenizer)
            label = LABEL
        else:
            loaded = load_model(args.model)
            loaded.model.eval()
            label = args.model
        render = chat_renderer(loaded.tokenizer)
        questions = list(resolve_questions("default"))[: args.questions]
        prompts = [render(q.text, None) for q in questions]
        print(f"model: {label} on {loaded.device} ({str(loaded.dtype).removeprefix('torch.')}); "
              f"{len(prompts)} questions, {args.max_new_tokens} new tokens max")
        results["plain"] = plain_loop(loaded, prompts, args.plain_samples, args.max_new_tokens)
        results["emkit"] = emkit_batched(loaded, prompts, args.samples, args.max_new_tokens, args.batch_size,
                                         work / "generations.jsonl")
        for name in ("plain", "emkit"):
            r = results[name]
            print(f"{name:6} {r['answers']:5d} answers {r['seconds']:8.1f} s  {r['answers_per_s']:8.2f} answers/s  "
                  f"{r['tokens_per_s']:9.1f} tokens/s")
        ratio = results["emkit"]["tokens_per_s"] / results["plain"]["tokens_per_s"]
        results["ratio_tokens_per_s"] = ratio
        print(f"RATIO emkit/plain tokens/s = {ratio:.1f}x "
              f"(answers/s {results['emkit']['answers_per_s'] / results['plain']['answers_per_s']:.1f}x)")
    if args.judge_url:
        j = judge_bench(args.judge_url, args.judge_model, args.judgments, args.concurrency, work)
        results["judge"] = j
        print(f"judge sequential {j['sequential']['judgments_per_s']:.2f}/s, concurrency {args.concurrency} "
              f"{j['concurrent']['judgments_per_s']:.2f}/s "
              f"(ratio {j['concurrent']['judgments_per_s'] / j['sequential']['judgments_per_s']:.2f}x); "
              f"re-run cache hit rate {j['rerun']['cache_hit_rate']:.0%}, {j['rerun']['requests']} requests")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
